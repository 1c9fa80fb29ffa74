"""The architecture a packed file names: its schema, its arguments' bounds, and a check of the
file's tensors against it that allocates nothing (the model is built on the meta device)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..models import UnknownModelError, build_model, check_kwargs
from .errors import PackedFormatError

MAX_ARCH_NAME = 200


def arch_spec(name: str, **kwargs: Any) -> dict:
    return {"name": name, "kwargs": kwargs}


def check_arch_schema(arch) -> None:
    """Types of the header's ``arch``: ``{"name": str, "kwargs": {str: simple value}}``."""
    if not isinstance(arch, dict) or set(arch) - {"name", "kwargs"} or "name" not in arch:
        raise PackedFormatError("corrupted header: arch is not {name, kwargs}")
    name = arch["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_ARCH_NAME:
        raise PackedFormatError("corrupted header: arch name is not a short string")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(
            v is None or isinstance(v, (bool, int, float, str)) for v in kwargs.values()):
        raise PackedFormatError("corrupted header: arch kwargs are not a mapping of simple values")


def build_arch(arch: dict, device: str | torch.device | None = None) -> nn.Module:
    """Build the architecture of a (schema-checked) ``arch``, its arguments checked first;
    ``device="meta"`` allocates nothing."""
    name, kwargs = arch["name"], arch.get("kwargs", {})
    try:
        check_kwargs(name, kwargs)
        if device is None:
            return build_model(name, **kwargs)
        with torch.device(device):
            return build_model(name, **kwargs)
    except (UnknownModelError, TypeError, ValueError, ImportError) as e:
        raise PackedFormatError(f"cannot rebuild architecture: {e}") from None
    except Exception as e:  # the builder failed on these (bounded, simple) arguments: the file is at fault
        raise PackedFormatError(f"cannot rebuild architecture {name}: {type(e).__name__}: {e}") from None


def check_against_architecture(arch: dict, shapes: list[tuple[str, list[int]]]) -> nn.Module:
    """The file's tensors (name, shape) against the architecture's state: every floating
    tensor present once, nothing extra, shapes equal. Returns the meta-device model."""
    model = build_arch(arch, "meta")
    own = model.state_dict()
    names = {n for n, _ in shapes}
    missing = [k for k in own if k not in names and own[k].is_floating_point()]
    unexpected = [n for n, _ in shapes if n not in own]
    if missing or unexpected:
        raise PackedFormatError(f"file does not match architecture {arch['name']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes:
        if tuple(shape) != tuple(own[name].shape):
            raise PackedFormatError(f"tensor {name}: shape {tuple(shape)} in file, {tuple(own[name].shape)} in architecture")
    return model
