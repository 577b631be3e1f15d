"""Group offload for the UNet with groups of a bounded size: each transformer block or ResNet block is one upload.

diffusers offers two groupings and neither fits SDXL's UNet:
- leaf level makes each of ~790 layers a group. The host waits for each layer's upload before it queues the next
  one, so the GPU computes one small layer at a time: 1.8x the time of no offload on an H200.
- block level groups the children of ModuleLists: a whole down or up block, up to ~2 GiB in fp16. Naming deeper
  blocks (`block_modules`) nests a prefetch tracer per level, which fails with streams in diffusers 0.42
  ("Hook with name layer_execution_tracker already exists").

So the grouping here is planned by size (the largest modules of at most `max_bytes`) and applied with diffusers' own
`ModuleGroup` and hooks, under diffusers' hook names: one prefetch tracer at the root chains every group in the
order the first forward runs them, and the rest of diffusers (pipelines, LoRA loading) sees ordinary group offload.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.group_offloading import (
    _GROUP_OFFLOADING,
    _LAYER_EXECUTION_TRACKER,
    _LAZY_PREFETCH_GROUP_OFFLOADING,
    GroupOffloadingConfig,
    GroupOffloadingHook,
    GroupOffloadingType,
    LazyPrefetchGroupOffloadingHook,
    ModuleGroup,
)

# Marks a module grouped here, so a caller can put the grouping back after diffusers re-applies its own.
_PLAN_ATTRIBUTE = "_sdxl_split_offload_group_bytes"
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList, torch.nn.ParameterDict)


@dataclass(frozen=True)
class PlannedGroup:
    """One upload: `module` whole, or (own_only) just the parameters and buffers set on it directly."""

    name: str
    module: torch.nn.Module
    own_only: bool
    nbytes: int


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _own_tensors(module: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    return list(module.parameters(recurse=False)), list(module.buffers(recurse=False))


def plan_groups(root: torch.nn.Module, max_bytes: int) -> list[PlannedGroup]:
    """The groups, in definition order: every module of at most `max_bytes` whose parent is over it, a layer over it
    on its own, and the direct tensors of each module that had to be split. Containers (ModuleList...) are never a
    group, since nothing calls their forward to trigger the upload; their children are."""
    groups: list[PlannedGroup] = []

    def visit(name: str, module: torch.nn.Module) -> None:
        total = _tensor_bytes(module.parameters()) + _tensor_bytes(module.buffers())
        if total == 0:
            return
        children = list(module.named_children())
        fits = total <= max_bytes or not children
        if fits and module is not root and not isinstance(module, _CONTAINERS):
            groups.append(PlannedGroup(name, module, own_only=False, nbytes=total))
            return
        params, buffers = _own_tensors(module)
        if (params or buffers) and module is not root:
            if isinstance(module, _CONTAINERS):
                raise ValueError(f"{name} holds tensors but is never called, so no hook could upload them")
            groups.append(PlannedGroup(name, module, own_only=True, nbytes=_tensor_bytes(params + buffers)))
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", root)
    return groups


def _register(module: torch.nn.Module, group: ModuleGroup, config: GroupOffloadingConfig) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(GroupOffloadingHook(group, config=config), _GROUP_OFFLOADING)


def apply_sized_group_offload(root: torch.nn.Module, onload_device: torch.device, max_bytes: int,
                              use_stream: bool = True) -> list[PlannedGroup]:
    """Offload `root` to pinned CPU memory in the planned groups; with `use_stream`, the next group uploads on a
    side stream while this one computes. Returns the plan."""
    offload_device = torch.device("cpu")
    stream = torch.cuda.Stream(device=onload_device) if use_stream else None
    # The config diffusers finds on the root when it re-applies offload after changing the modules (loading a
    # LoRA): leaf level, the closest of its own groupings. `reapply_sized_group_offload` then restores this one.
    config = GroupOffloadingConfig(
        onload_device=onload_device, offload_device=offload_device, offload_type=GroupOffloadingType.LEAF_LEVEL,
        non_blocking=use_stream, stream=stream, record_stream=use_stream, low_cpu_mem_usage=False)
    plan = plan_groups(root, max_bytes)

    def module_group(modules, leader, params=None, buffers=None, with_stream=True) -> ModuleGroup:
        return ModuleGroup(modules=modules, offload_device=offload_device, onload_device=onload_device,
                           offload_leader=leader, onload_leader=leader, parameters=params, buffers=buffers,
                           non_blocking=use_stream and with_stream, stream=stream if with_stream else None,
                           record_stream=use_stream and with_stream, onload_self=True, group_id=None)

    for planned in plan:
        if planned.own_only:
            params, buffers = _own_tensors(planned.module)
            _register(planned.module, module_group([], planned.module, params, buffers), config)
        else:
            _register(planned.module, module_group([planned.module], planned.module), config)
    # The root's own tensors load before anything else can run, so they load synchronously, as in diffusers'
    # block level; its hook is also where the first forward's order is traced and every group is chained.
    params, buffers = _own_tensors(root)
    _register(root, module_group([], root, params, buffers, with_stream=False), config)
    if use_stream:
        HookRegistry.check_if_exists_or_initialize(root).register_hook(
            LazyPrefetchGroupOffloadingHook(), _LAZY_PREFETCH_GROUP_OFFLOADING)
    setattr(root, _PLAN_ATTRIBUTE, (onload_device, max_bytes, use_stream))
    return plan


def reapply_sized_group_offload(root: torch.nn.Module) -> bool:
    """Put this module's sized grouping back after diffusers replaced it (it re-applies its own when a LoRA is
    loaded). Returns False if the module was never grouped here."""
    settings = getattr(root, _PLAN_ATTRIBUTE, None)
    if settings is None:
        return False
    registry = HookRegistry.check_if_exists_or_initialize(root)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    apply_sized_group_offload(root, *settings)
    return True
