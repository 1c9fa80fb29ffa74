"""One module walker shared by every method: layers by fully qualified name.

A layer is a Conv2d or a Linear (``.weight``); with ``extended=True`` (what product quantization
handles) also:

- an nn.MultiheadAttention whose query, key and value share the input size: its packed
  in-projection ``in_proj_weight`` (3 * embed, embed) is a weight matrix like a Linear's, the
  inputs of its rows being the attention's query, key and value (its ``out_proj`` is an
  nn.Linear, a layer of its own);
- a Hugging Face ``Conv1D`` (GPT-2 style): a Linear whose ``weight`` is stored transposed,
  (in, out); recognised by its type's name and attributes, without importing transformers.

``weight_of`` gives a layer's matrix as (out, in...) whatever its type, ``weight_name`` the
attribute that holds it."""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterator

import torch
import torch.nn as nn

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def is_attention(module: nn.Module) -> bool:
    """An nn.MultiheadAttention with one packed in-projection (query, key and value of one size)."""
    return isinstance(module, nn.MultiheadAttention) and bool(module._qkv_same_embed_dim)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Hugging Face Conv1D: ``x @ weight + bias`` with ``weight`` of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor)


def weight_name(layer: nn.Module) -> str:
    """The attribute that holds a layer's weight matrix."""
    return "in_proj_weight" if is_attention(layer) else "weight"


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A layer's weight matrix as (out, in...): ``weight``, an attention's ``in_proj_weight``, a
    Conv1D's weight transposed (a view)."""
    weight = getattr(layer, weight_name(layer))
    return weight.T if is_transposed_linear(layer) else weight


def named_layers(
    model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None, extended: bool = False,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (fqn, module) for Conv2d/Linear layers in registration order; ``extended``: the
    attentions' in-projections (each before its out_proj, as in the forward pass) and Hugging
    Face Conv1D layers too."""
    for name, module in model.named_modules():
        wanted = isinstance(module, COMPRESSIBLE) or (extended and (is_attention(module) or is_transposed_linear(module)))
        if wanted and (filter_fn is None or filter_fn(name, module)):
            yield name, module


def matches(name: str, patterns: list[str]) -> bool:
    """True if the layer name matches any glob pattern (``features.0.*``, ``linear``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(model: nn.Module, patterns: list[str], what: str, extended: bool = False) -> None:
    """Refuse a pattern that matches no compressible layer: it is almost always a typo."""
    names = [n for n, _ in named_layers(model, extended=extended)]
    kinds = "Conv2d/Linear"
    if extended and any(map(is_attention, model.modules())):
        kinds += "/MultiheadAttention"
    if extended and any(map(is_transposed_linear, model.modules())):
        kinds += "/Conv1D"
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{what}: {p!r} matches no {kinds} layer; layers are: {', '.join(names)}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` (dotted path) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
