"""--offload group's sized grouping: the plan (full-size SDXL UNet, on the meta device) and the hooks (tiny UNet on
the CPU, where "uploading" leaves tensors in place, so the outputs must be bit-identical)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

from sdxl_split.denoiser_service.config import DEFAULT_OFFLOAD_GROUP_MIB
from sdxl_split.denoiser_service.offload_groups import (
    apply_sized_group_offload,
    plan_groups,
    reapply_sized_group_offload,
)
from sdxl_split.shared.models.architectures import SDXL_UNET, TINY_UNET

MIB = 2**20


def _group_hooks(model: torch.nn.Module) -> dict[str, object]:
    hooks = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            hooks[name] = hook
    return hooks


def test_the_default_plan_puts_every_sdxl_weight_in_one_group_of_at_most_a_block() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).half()
    cap = DEFAULT_OFFLOAD_GROUP_MIB * MIB
    plan = plan_groups(unet, cap)
    owner: dict[int, str] = {}
    for group in plan:
        tensors = [*group.module.parameters(recurse=not group.own_only),
                   *group.module.buffers(recurse=not group.own_only)]
        for tensor in tensors:
            assert id(tensor) not in owner, f"{group.name} and {owner[id(tensor)]} both hold a tensor"
            owner[id(tensor)] = group.name
        assert group.nbytes <= cap, group.name
    assert len(owner) == len(list(unet.parameters())) + len(list(unet.buffers()))
    names = [group.name for group in plan]
    # A transformer block and a ResNet block each stay whole; the 1280-wide blocks holding them are split.
    assert "up_blocks.0.attentions.0.transformer_blocks.9" in names and "up_blocks.0.resnets.0" in names
    assert not any(name in names for name in ("up_blocks.0", "down_blocks.2", "mid_block"))
    assert 80 <= len(plan) <= 130, len(plan)
    # With no room for a block, each layer is its own group.
    per_layer = plan_groups(unet, 0)
    assert all(not list(group.module.children()) for group in per_layer) and len(per_layer) > 1000


def _unet_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    grouped = UNet2DConditionModel(**TINY_UNET).eval()
    plain = UNet2DConditionModel(**TINY_UNET).eval()
    plain.load_state_dict(grouped.state_dict())
    return grouped, plain


def _unet_inputs() -> tuple:
    generator = torch.Generator().manual_seed(1)
    pooled_width = TINY_UNET["projection_class_embeddings_input_dim"] - 6 * TINY_UNET["addition_time_embed_dim"]
    cond = {"text_embeds": torch.randn(2, pooled_width, generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator)}
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor(10),
            torch.randn(2, 77, TINY_UNET["cross_attention_dim"], generator=generator), cond)


class _HostStream:
    """Stands in for a CUDA stream on the CPU: the hooks' prefetch chain runs, and every copy is immediate."""

    def synchronize(self) -> None:
        pass


@pytest.fixture()
def host_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _HostStream())
    monkeypatch.setattr(torch.cpu, "current_stream", lambda *a, **k: _HostStream())
    monkeypatch.setattr(torch.cpu, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


def test_streamed_groups_chain_in_the_order_they_run_and_compute_the_same(host_streams) -> None:
    grouped, plain = _unet_pair()
    plan = apply_sized_group_offload(grouped, torch.device("cpu"), 4096, use_stream=True)
    x, t, context, cond = _unet_inputs()
    with torch.no_grad():
        for _ in range(2):  # the first pass traces the order, the second prefetches along it
            assert torch.equal(grouped(x, t, context, added_cond_kwargs=cond).sample,
                               plain(x, t, context, added_cond_kwargs=cond).sample)
    hooks = _group_hooks(grouped)
    assert set(hooks) == {"", *(group.name for group in plan)}
    # One chain from the root through every group: each but the root is uploaded by the one before it.
    chain, hook = [], hooks[""]
    groups_by_id = {id(h.group): name for name, h in hooks.items()}
    while hook.next_group is not None:
        chain.append(groups_by_id[id(hook.next_group)])
        hook = hooks[chain[-1]]
    assert sorted(chain) == sorted(group.name for group in plan)
    first_up = next(name for name in chain if name.startswith("up_blocks.0."))
    assert chain.index("conv_in") < chain.index(first_up) < chain.index("conv_out")
    assert sum(h.group.onload_self for h in hooks.values()) == 1


def test_the_lora_bank_keeps_the_sized_groups_through_loads_and_evictions(tiny_dir, tmp_path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdxl_split.denoiser_service.lora_bank import LoraBank
    from sdxl_split.shared.loras import LoraFinder
    from sdxl_split.shared.models.test_assets import tiny_lora

    for seed, name in ((1, "style"), (2, "detail")):
        (tmp_path / f"{name}.safetensors").write_bytes(tiny_lora("unet", seed=seed))
    finder = LoraFinder(tmp_path, tmp_path / "cache")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    apply_sized_group_offload(pipe.unet, torch.device("cpu"), 4096, use_stream=False)
    bank = LoraBank(pipe, finder, capacity=1)
    for name in ("style", "detail"):  # the second load evicts the first (diffusers re-applies offload for each)
        bank.apply((finder.find(name).use(0.8),))
        planned = {"", *(group.name for group in plan_groups(pipe.unet, 4096))}
        assert set(_group_hooks(pipe.unet)) == planned, f"after {name}: diffusers' per-layer groups were left"
        assert any(".lora_A." in group for group in planned)
    assert list(pipe.unet.peft_config) == [f"lora_{finder.find('detail').sha256[:16]}"]
    # diffusers' own re-application differs, or this test could not tell the two apart.
    pipe.delete_adapters(list(pipe.unet.peft_config))
    assert set(_group_hooks(pipe.unet)) != {"", *(group.name for group in plan_groups(pipe.unet, 4096))}
    assert not reapply_sized_group_offload(torch.nn.Linear(2, 2)), "never grouped here: nothing to put back"


def test_a_unet_batch_cap_set_before_the_groups_holds_on_every_call(host_streams) -> None:
    from sdxl_split.denoiser_service.unet_batch import limit_unet_batch

    grouped, plain = _unet_pair()
    limit_unet_batch(grouped, 1)  # the order place() uses: the offload hooks wrap the loop
    apply_sized_group_offload(grouped, torch.device("cpu"), 4096, use_stream=True)
    rows: list[int] = []
    grouped.conv_in.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    x, t, context, cond = _unet_inputs()
    with torch.no_grad():
        for _ in range(3):  # the first call's tracing hook is removed after it; the cap must outlive it
            rows.clear()
            out = grouped(x, t, context, added_cond_kwargs=cond).sample
            assert rows == [1, 1], rows
    expected = plain(x, t, context, added_cond_kwargs=cond).sample
    assert torch.allclose(out, expected, atol=1e-5)
