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


def test_loading_a_lora_keeps_the_sized_groups(tiny_dir) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdxl_split.shared.models.test_assets import tiny_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    apply_sized_group_offload(pipe.unet, torch.device("cpu"), 4096, use_stream=False)
    pipe.load_lora_into_unet(_lora_state(tiny_lora("unet", seed=3)), None, pipe.unet, adapter_name="style",
                             _pipeline=pipe)
    # The LoRA's layers joined the UNet, and diffusers re-applied offload its own way (one group per layer).
    planned = {"", *(group.name for group in plan_groups(pipe.unet, 4096))}
    assert set(_group_hooks(pipe.unet)) != planned
    assert reapply_sized_group_offload(pipe.unet)
    assert set(_group_hooks(pipe.unet)) == planned
    assert any(".lora_A." in name for name in planned)
    assert not reapply_sized_group_offload(torch.nn.Linear(2, 2)), "never grouped here: nothing to put back"


def _lora_state(data: bytes) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load

    state = load(data)
    unet_state, _ = StableDiffusionXLPipeline.lora_state_dict(state)
    return unet_state
