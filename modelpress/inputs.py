"""Model inputs of any structure: a tensor (images), a tuple of tensors (positional arguments) or a
dict of tensors (keyword arguments: ``input_ids``, ``attention_mask``, ...), all with the batch
as their first dimension. Calibration and distillation slice, move and feed them through these
few functions, whatever the model takes.

A dict's ``attention_mask`` (1 = a real token, 0 = padding) marks the padding positions: the
activation statistics of a layer (the Gram matrices of product quantization) leave them out
(:func:`token_rows`)."""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn as nn

Inputs = Union[torch.Tensor, tuple, dict]
MASK_KEY = "attention_mask"


def _first(x: Inputs) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    values = list(x.values()) if isinstance(x, dict) else list(x)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        raise TypeError("model inputs hold no tensor")
    return tensors[0]


def count(x: Inputs) -> int:
    """The number of examples (the first dimension)."""
    return len(_first(x))


def take(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of every tensor."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, dict):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return tuple(v[start:stop] if isinstance(v, torch.Tensor) else v for v in x)


def to(x: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return tuple(v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in x)


def call(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def token_mask(x: Inputs) -> torch.Tensor | None:
    """The (batch, tokens) bool mask of real tokens, when the inputs carry one."""
    if isinstance(x, dict) and isinstance(x.get(MASK_KEY), torch.Tensor):
        return x[MASK_KEY].bool()
    return None


def token_rows(activation: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer's (batch, tokens, features) input without its padding positions, as (rows,
    features); batch-second (tokens, batch, features) inputs too. An input of another shape (an
    image batch, a pooled vector) is returned as it is."""
    if mask is None or activation.dim() != 3:
        return activation
    if activation.shape[:2] == mask.shape:
        return activation[mask]
    if activation.shape[:2] == mask.T.shape:
        return activation[mask.T]
    return activation
