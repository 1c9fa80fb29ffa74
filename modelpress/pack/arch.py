"""The architecture a packed file names: its schema, its arguments' bounds, and a check of the
file's tensors against it that allocates nothing (the model is built on the meta device).

A file names an architecture ``load_packed`` can rebuild (modelpress.models: the project's own
and torchvision's builders, with keyword arguments), or, for a model of the user's own class,
``custom:<name>``: such a file is loaded into a module the user passes
(``load_packed(path, skeleton=MyNet())``), as nothing is ever imported or executed from a file."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..models import UnknownModelError, build_model, check_kwargs
from .errors import PackedFormatError

MAX_ARCH_NAME = 200
CUSTOM_PREFIX = "custom:"


def is_custom(arch: dict) -> bool:
    """The file names a model of the user's own class: loaded only into a skeleton they pass."""
    return str(arch.get("name", "")).startswith(CUSTOM_PREFIX)


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


def check_state(arch_name: str, own: dict[str, torch.Tensor], shapes: list[tuple[str, list[int]]]) -> None:
    """The file's tensors (name, shape) against a module's state: every floating tensor present
    once, nothing extra, shapes equal."""
    names = {n for n, _ in shapes}
    missing = [k for k in own if k not in names and own[k].is_floating_point()]
    unexpected = [n for n, _ in shapes if n not in own]
    if missing or unexpected:
        raise PackedFormatError(f"file does not match architecture {arch_name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes:
        if tuple(shape) != tuple(own[name].shape):
            raise PackedFormatError(f"tensor {name}: shape {tuple(shape)} in file, {tuple(own[name].shape)} in architecture")


def check_against_architecture(arch: dict, shapes: list[tuple[str, list[int]]]) -> nn.Module | None:
    """The file's tensors (name, shape) against the architecture's state (see check_state).
    Returns the meta-device model; None for a ``custom:`` architecture, which only the skeleton
    given to the loader can check."""
    if is_custom(arch):
        return None
    model = build_arch(arch, "meta")
    check_state(arch["name"], model.state_dict(), shapes)
    return model


def check_packable(arch: dict, shapes: list[tuple[str, list[int]]]) -> None:
    """At pack time: the architecture the file will name rebuilds a module with exactly these
    tensors, so that ``load_packed`` can load the file; else one ValueError naming the escape."""
    try:
        check_arch_schema(arch)
        check_against_architecture(arch, shapes)
    except PackedFormatError as e:
        reason = str(e).removeprefix("corrupted header: ")
        raise ValueError(
            f"cannot pack the model as architecture {arch.get('name') if isinstance(arch, dict) else arch!r}: {reason}; "
            f"a model load_packed cannot rebuild by name is packed with arch_spec('{CUSTOM_PREFIX}<name>') and "
            f"loaded with load_packed(path, skeleton=<an instance of its class>)") from None
