"""One module walker shared by every method: layers by fully qualified name.

A layer is a Conv2d or a Linear (``.weight``); with ``attention=True`` also an
nn.MultiheadAttention whose query, key and value share the input size: its packed in-projection
``in_proj_weight`` (3 * embed, embed) is a weight matrix like a Linear's, the inputs of its rows
being the attention's query, key and value. ``weight_of`` and ``weight_name`` give a layer's matrix
whatever its type. (Its ``out_proj`` is an nn.Linear, a layer of its own.)"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterator

import torch
import torch.nn as nn

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def is_attention(module: nn.Module) -> bool:
    """An nn.MultiheadAttention with one packed in-projection (query, key and value of one size)."""
    return isinstance(module, nn.MultiheadAttention) and bool(module._qkv_same_embed_dim)


def weight_name(layer: nn.Module) -> str:
    """The attribute that holds a layer's weight matrix."""
    return "in_proj_weight" if is_attention(layer) else "weight"


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A layer's weight matrix: ``weight``, or an attention's ``in_proj_weight``."""
    return getattr(layer, weight_name(layer))


def named_layers(
    model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None, attention: bool = False,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (fqn, module) for Conv2d/Linear layers in registration order; ``attention``: the
    attentions' in-projections too (each before its out_proj, as in the forward pass)."""
    for name, module in model.named_modules():
        if (isinstance(module, COMPRESSIBLE) or (attention and is_attention(module))) and (
                filter_fn is None or filter_fn(name, module)):
            yield name, module


def matches(name: str, patterns: list[str]) -> bool:
    """True if the layer name matches any glob pattern (``features.0.*``, ``linear``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(model: nn.Module, patterns: list[str], what: str, attention: bool = False) -> None:
    """Refuse a pattern that matches no compressible layer: it is almost always a typo."""
    names = [n for n, _ in named_layers(model, attention=attention)]
    kinds = "Conv2d/Linear/MultiheadAttention" if attention and any(map(is_attention, model.modules())) else "Conv2d/Linear"
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{what}: {p!r} matches no {kinds} layer; layers are: {', '.join(names)}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` (dotted path) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
