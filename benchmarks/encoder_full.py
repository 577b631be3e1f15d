"""The encoder alone at full size (random weights): prompts/s for batch 1 and 8 on 1 and 2 threads, how far batch 8
is from batch 1 (max abs difference per tensor), and whether batch 1 is bit-identical to diffusers' encode_prompt.

Run through `python benchmarks/split_overhead.py --encoder-full`. Builds `sdxl-random` into the cache dir
(SDXL_SPLIT_CACHE, else the user cache) on first use: about 6.5 GB, a minute or so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import torch

PROMPTS = [f"a photo of a {thing}, {style}" for thing in ("cat", "lighthouse", "red bicycle", "mountain lake")
           for style in ("oil painting", "studio light", "watercolor", "35mm film")]


def encoder_full(args: argparse.Namespace) -> tuple[dict, str, str]:
    import os

    from sdxl_split.encoder_service.text_side import TextSide
    from sdxl_split.shared.embeddings import TENSOR_NAMES
    from sdxl_split.shared.models.resolve import resolve_model
    from sdxl_split.shared.prompts import PromptEntry
    from sdxl_split.shared.settings import cache_dir_from

    source = resolve_model("sdxl-random", cache_dir_from(os.environ.get("SDXL_SPLIT_CACHE")), announce=print)
    side = TextSide(source, "cpu", "fp32")
    entries = [PromptEntry(line=n + 1, prompt=text, negative_prompt="blurry") for n, text in enumerate(PROMPTS)]
    side.encode(entries[:1], None)  # warm-up: first-call allocations
    speed, outputs = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 8):
            side._negatives.clear()  # time the negative's encoding too, once per run as in a real one
            started = time.perf_counter()
            encoded = []
            for start in range(0, len(entries), batch):
                encoded += side.encode(entries[start : start + batch], None)
            seconds = time.perf_counter() - started
            speed[f"threads={threads} batch={batch}"] = len(entries) / seconds
            outputs[batch] = encoded
    error = {name: max(float((a.tensors[name] - b.tensors[name]).abs().max()) for a, b in zip(outputs[1], outputs[8]))
             for name in TENSOR_NAMES}
    with torch.inference_mode():
        reference = side.pipe.encode_prompt(prompt=PROMPTS[0], negative_prompt="blurry", device="cpu",
                                            num_images_per_prompt=1, do_classifier_free_guidance=True)
    identical = all(torch.equal(outputs[1][0].tensors[name], tensor) for name, tensor in zip(TENSOR_NAMES, reference))
    payload = {"date": dt.date.today().isoformat(), "model": source.description, "prompts": len(entries),
               "prompts_per_s": speed, "batch8_vs_batch1_max_abs": error, "batch1_bit_identical_to_diffusers":
               identical}
    lines = [f"# Encoder alone at full size, {payload['date']}", "",
             f"- {source.description}; fp32 on CPU; {len(entries)} prompts sharing the negative 'blurry' (encoded "
             "once per run)", "", "| threads | batch | prompts/s |", "| ---: | ---: | ---: |"]
    lines += [f"| {key.split()[0].split('=')[1]} | {key.split()[1].split('=')[1]} | {value:.2f} |"
              for key, value in speed.items()]
    lines += ["", "| tensor | max abs diff, batch 8 vs batch 1 |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.3g} |" for name, value in error.items()]
    lines += ["", f"- batch 1 bit-identical to diffusers' encode_prompt: {identical}"]
    return payload, "\n".join(lines) + "\n", f"encoder-full-{payload['date']}"
