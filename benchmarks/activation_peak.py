"""Where the UNet's activation memory peaks, measured on the CPU: the full-size SDXL UNet (random weights: memory
is real, values are noise) runs one guided step of a 4-image batch, and a dispatch mode counts the bytes of every
tensor an op creates until it is freed. Weights and inputs are not counted.

    python benchmarks/activation_peak.py [--latent 64] [--out benchmarks/results]

Every activation of SDXL's UNet grows with the number of latent pixels (SDPA's flash kernels never hold the
attention matrix), so the peak at --latent 64 (512x512) times 4 is the peak at 1024x1024, and half of the fp32
figure is fp16's. Runs three ways: as diffusers runs it, with each transformer block's feed-forward chunked per
batch row (diffusers' set_chunk_feed_forward), and with half the batch per call (what --unet-batch does).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Counts the storages ops create, from creation to release, and remembers the module and op at the peak."""

    def __init__(self, ignore: list[torch.Tensor]) -> None:
        super().__init__()
        self.counted = {t.untyped_storage().data_ptr() for t in ignore}
        self.live = self.peak = 0
        self.at_peak = ("", "")
        self.modules: list[str] = []

    def _release(self, nbytes: int, pointer: int) -> None:
        self.live -= nbytes
        self.counted.discard(pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or pointer in self.counted:  # a view, an in-place result or a weight
                continue
            self.counted.add(pointer)
            self.live += nbytes
            weakref.finalize(storage, self._release, nbytes, pointer)
            if self.live > self.peak:
                self.peak, self.at_peak = self.live, (self.modules[-1] if self.modules else "", str(func))
        return out


def measure(unet: torch.nn.Module, latent: int, batch: int) -> tuple[int, tuple[str, str], float]:
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(batch, 4, latent, latent, generator=generator), torch.tensor(500),
              torch.randn(batch, 77, 2048, generator=generator))
    cond = {"text_embeds": torch.randn(batch, 1280, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator)}
    mode = LiveBytes([*unet.parameters(), *unet.buffers(), *inputs, *cond.values()])
    handles = []
    for name, module in unet.named_modules():
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: mode.modules.append(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: mode.modules.pop() and None))
    started = time.perf_counter()
    with torch.inference_mode(), mode:
        unet(*inputs, added_cond_kwargs=cond)
    for handle in handles:
        handle.remove()
    return mode.peak, mode.at_peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=64, help="Latent side (image side / 8).")
    parser.add_argument("--images", type=int, default=4, help="Images per prompt; guidance doubles the batch.")
    parser.add_argument("--out", type=Path, default=None, help="Write activation-peak-DATE.{md,json} here.")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from sdxl_split.shared.models.architectures import SDXL_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).eval()
    batch, scale = 2 * args.images, (128 / args.latent) ** 2 / 2
    runs = {}
    for label, chunk, rows in (("as diffusers runs it", None, batch),
                               ("feed-forward chunked per batch row", 1, batch),
                               ("guidance halves one after the other (--unet-batch)", None, batch // 2)):
        for module in unet.modules():
            if hasattr(module, "set_chunk_feed_forward"):
                module.set_chunk_feed_forward(chunk, 0)
        peak, where, seconds = measure(unet, args.latent, rows)
        runs[label] = {"peak_fp32_mib": peak / MIB, "fp16_1024_gib": peak * scale / 2**30, "module": where[0],
                       "op": where[1], "seconds": round(seconds, 1)}
        print(f"{label}: {peak / MIB:.0f} MiB fp32 at latent {args.latent} -> {peak * scale / 2**30:.2f} GiB fp16 "
              f"at 1024x1024; peak in {where[0]} ({where[1]}); {seconds:.0f} s")
    date = dt.date.today().isoformat()
    lines = [f"# UNet activation peak, {date}", "",
             f"- full-size SDXL UNet, random weights (memory is real, values are noise); one guided step of "
             f"{args.images} images (batch {batch}) at latent {args.latent}x{args.latent}, fp32 on the CPU; weights "
             "and inputs not counted", "- scaled to 1024x1024 fp16: x(128/latent)^2 / 2", "",
             "| run | fp32 MiB here | fp16 GiB at 1024x1024 | where it peaks |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {label} | {r['peak_fp32_mib']:.0f} | {r['fp16_1024_gib']:.2f} | `{r['module']}` ({r['op']}) |"
              for label, r in runs.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"activation-peak-{date}.md").write_text(text)
        (args.out / f"activation-peak-{date}.json").write_text(json.dumps(
            {"date": date, "latent": args.latent, "images": args.images, "random_weights": True, "runs": runs},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
