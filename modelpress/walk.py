"""One module walker shared by every method: layers by fully qualified name."""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterator

import torch.nn as nn

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def named_layers(
    model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None
) -> Iterator[tuple[str, nn.Conv2d | nn.Linear]]:
    """Yield (fqn, module) for Conv2d/Linear layers in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE) and (filter_fn is None or filter_fn(name, module)):
            yield name, module


def matches(name: str, patterns: list[str]) -> bool:
    """True if the layer name matches any glob pattern (``features.0.*``, ``linear``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(model: nn.Module, patterns: list[str], what: str) -> None:
    """Refuse a pattern that matches no compressible layer: it is almost always a typo."""
    names = [n for n, _ in named_layers(model)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{what}: {p!r} matches no Conv2d/Linear layer; layers are: {', '.join(names)}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` (dotted path) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
