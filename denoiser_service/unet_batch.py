"""Caps the rows the UNet sees per call (`--unet-batch`).

Classifier-free guidance doubles the batch: 4 images per prompt are 8 UNet rows, and the UNet's activations grow
with the rows while its weights do not. Capping the call at 4 runs the unconditional and conditional halves one
after the other, as A1111 and ComfyUI do on small GPUs: half the activation memory, for a few % of speed. Each
row's result is the same computation, but a kernel may be picked by batch size, so pixels can differ from the
whole-batch call in the last bits; that is why the setting is part of every file name.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def _rows(value: Any, total: int, part: slice) -> Any:
    """`value` cut to this part's rows where it has one row per sample; everything else passes unchanged."""
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {key: _rows(item, total, part) for key, item in value.items()}
    return value


def limit_unet_batch(unet: torch.nn.Module, rows: int) -> None:
    """From now on `unet(...)` runs in calls of at most `rows` samples and concatenates their outputs.

    Applied before offload hooks, which wrap this loop (each part then runs through them), and before
    torch.compile, which traces the loop, one graph for every part of the same size."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, not {rows}")
    whole = unet.forward

    @functools.wraps(whole)
    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        total = sample.shape[0]
        if total <= rows:
            return whole(sample, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        outputs = []
        for start in range(0, total, rows):
            part = slice(start, start + rows)
            outputs.append(whole(sample[part], *(_rows(arg, total, part) for arg in args),
                                 **_rows(kwargs, total, part), return_dict=False)[0])
        joined = torch.cat(outputs)
        if not return_dict:
            return (joined,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=joined)

    unet.forward = forward
