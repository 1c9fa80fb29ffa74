"""Model architectures modelpress can rebuild from a name.

A packed file records only an architecture *name* and its keyword arguments; the loader
looks that name up here. Nothing from the file is ever executed, so only architectures in
this registry, torchvision's own builders (``torchvision:<name>``) and the allow-listed Hugging
Face classes (``hf:<Class>``, with the config.json contents: models/hf.py) can be rebuilt.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch.nn as nn

from .cnn import FashionCNN
from .hf import HF_PREFIX, build_hf, is_folder_ref, load_hf_folder, parse_config
from .resnet_cifar import cifar_resnet
from .vit import cifar_vit


def _cifar(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": FashionCNN,
    "cifar_resnet20": _cifar(20),
    "cifar_resnet32": _cifar(32),
    "cifar_resnet44": _cifar(44),
    "cifar_resnet56": _cifar(56),
    "cifar_vit": cifar_vit,
}

# Bounds of architecture keyword arguments that come from outside (a packed file's header):
# sane sizes, so that a crafted file cannot make a builder allocate tens of gigabytes.
KWARG_BOUNDS = {"num_classes": (1, 100_000), "in_channels": (1, 4096), "width": (1, 4096), "hidden": (1, 65_536),
                "image_size": (1, 8192), "patch_size": (1, 1024), "num_layers": (1, 1024), "num_heads": (1, 1024),
                "hidden_dim": (1, 65_536), "mlp_dim": (1, 262_144)}
INT_BOUND = 1_000_000  # any other integer argument
MAX_KWARGS = 32

TORCHVISION_PREFIX = "torchvision:"
_BUILT_WITH_TORCHVISION = {"cifar_vit"}  # registry builders that import torchvision (an optional dependency)


class UnknownModelError(ValueError):
    """The architecture name is not one modelpress can build."""


def known_models() -> list[str]:
    return sorted(_REGISTRY) + [TORCHVISION_PREFIX + "<name>", HF_PREFIX + "<allow-listed class>", HF_PREFIX + "<folder>/"]


def needs_torchvision(arch: str) -> bool:
    """True if building ``arch`` imports torchvision, which the core library does not require: a
    registered model of such an architecture must list it in its requirements."""
    return arch.startswith(TORCHVISION_PREFIX) or arch in _BUILT_WITH_TORCHVISION


def is_known(arch: str) -> bool:
    """True if ``build_model(arch)`` can build it (no model is built)."""
    if arch in _REGISTRY:
        return True
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        return arch[len(TORCHVISION_PREFIX):] in torchvision.models.list_models()
    if is_folder_ref(arch):
        return True  # a local folder: checked when it is read (preflight)
    if arch.startswith(HF_PREFIX):
        from .hf import HF_CLASSES

        return arch[len(HF_PREFIX):] in HF_CLASSES
    return False


def check_kwargs(arch: str, kwargs: dict) -> None:
    """Validate keyword arguments for ``build_model(arch, **kwargs)`` without building: simple
    values only (None, bool, int, finite float, short str) within :data:`KWARG_BOUNDS`, and for
    the project's own architectures, parameters of the builder's signature. Raises ValueError."""
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_KWARGS:
        raise ValueError(f"architecture arguments must be a mapping of at most {MAX_KWARGS} names")
    if arch.startswith(HF_PREFIX):
        if set(kwargs) != {"config"}:
            raise ValueError(f"{arch} takes one argument, config (the config.json contents)")
        parse_config(arch, kwargs["config"])
        return
    allowed = None
    if arch in _REGISTRY:
        params = inspect.signature(_REGISTRY[arch]).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            allowed = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key == "weights":
            raise ValueError(f"bad architecture argument name {key!r}")
        if allowed is not None and key not in allowed:
            raise ValueError(f"{arch} takes no argument {key!r} (it takes {', '.join(sorted(allowed))})")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            lo, hi = KWARG_BOUNDS.get(key, (-INT_BOUND, INT_BOUND))
            if not lo <= value <= hi:
                raise ValueError(f"architecture argument {key}={value} is out of bounds [{lo}, {hi}]")
        elif isinstance(value, float):
            if not math.isfinite(value) or abs(value) > INT_BOUND or key in KWARG_BOUNDS:
                raise ValueError(f"architecture argument {key}={value!r} is out of bounds")
        elif isinstance(value, str):
            if len(value) > 256:
                raise ValueError(f"architecture argument {key} is a string of {len(value)} characters")
        else:
            raise ValueError(f"architecture argument {key} is a {type(value).__name__}, not a simple value")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build an untrained model by registry name, ``torchvision:<name>`` or ``hf:<Class>``; or
    load the model of a local Hugging Face folder (``hf:<folder>/``, its weights included).

    Torchvision models are always built with ``weights=None``: weights come from a file,
    never from a download. A packed file can never name a folder (its arguments are checked
    first: an ``hf:`` architecture takes exactly its configuration).
    """
    if arch in _REGISTRY:
        return _REGISTRY[arch](**kwargs)
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX):]
        if name not in torchvision.models.list_models():
            raise UnknownModelError(f"unknown torchvision model {name!r}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if is_folder_ref(arch):
        if kwargs:
            raise ValueError(f"{arch}: a model folder takes no architecture arguments (got {', '.join(kwargs)})")
        return load_hf_folder(arch[len(HF_PREFIX):])
    if arch.startswith(HF_PREFIX):
        try:
            return build_hf(arch, **kwargs)
        except ValueError as e:
            raise UnknownModelError(str(e)) from None
    raise UnknownModelError(
        f"unknown model {arch!r}; known: {', '.join(known_models())}"
    )


def parameter_bytes(model: nn.Module, bytes_per_value: int = 4) -> int:
    """Size of the model's parameters stored densely (fp32 by default)."""
    return sum(p.numel() for p in model.parameters()) * bytes_per_value
