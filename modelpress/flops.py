"""Multiply-accumulates of a model's weight layers, counted on a real forward pass (not
estimated from shapes): each Conv2d/Linear (or compressed stand-in with a ``weight_shape``) is
hooked and its output's positions counted."""

from __future__ import annotations

import torch
import torch.nn as nn


def _weight_shape(m: nn.Module) -> tuple[int, ...] | None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return tuple(m.weight.shape)
    shape = getattr(m, "weight_shape", None)
    return tuple(shape) if shape is not None else None


def _is_conv(m: nn.Module, shape: tuple[int, ...]) -> bool:
    return isinstance(m, nn.Conv2d) or getattr(m, "kind", None) == "conv2d" or len(shape) == 4


@torch.no_grad()
def output_positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """For each weight layer, how many times per input sample its weight is applied: the output's
    spatial positions for a convolution (H_out * W_out), the leading positions for a Linear (1
    for a classifier head). ``example`` is a batch of inputs (its first sample is used)."""
    found: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        shape = _weight_shape(m)
        if shape is None:
            continue

        def hook(mod, _inp, out, name=name, shape=shape):
            per_sample = out.shape[1:]
            if _is_conv(mod, shape):
                found[name] = int(per_sample[1:].numel()) if len(per_sample) > 1 else 1
            else:
                found[name] = int(per_sample[:-1].numel()) if len(per_sample) > 1 else 1

        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(example[:1].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per input sample of each weight layer as it is now: a dense layer's
    weight size times its positions, a low-rank layer's rank * (out + in*kh*kw) per position.
    Multiply by 2 for FLOPs."""
    positions = output_positions(model, example)
    macs = {}
    for name, m in model.named_modules():
        if name not in positions:
            continue
        shape = _weight_shape(m)
        assert shape is not None
        rank = getattr(m, "rank", None)
        out, rest = shape[0], int(torch.Size(shape[1:]).numel())
        per_position = rank * (out + rest) if isinstance(rank, int) else out * rest
        macs[name] = per_position * positions[name]
    return macs
