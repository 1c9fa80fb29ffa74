"""Model architectures modelpress can rebuild from a name.

A packed file records only an architecture *name* and its keyword arguments; the loader
looks that name up here. Nothing from the file is ever executed, so only architectures in
this registry (and torchvision's own builders) can be rebuilt.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from .cnn import FashionCNN
from .resnet_cifar import cifar_resnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": FashionCNN,
    "cifar_resnet20": lambda **kw: cifar_resnet(20, **kw),
    "cifar_resnet32": lambda **kw: cifar_resnet(32, **kw),
    "cifar_resnet44": lambda **kw: cifar_resnet(44, **kw),
    "cifar_resnet56": lambda **kw: cifar_resnet(56, **kw),
}

TORCHVISION_PREFIX = "torchvision:"


class UnknownModelError(ValueError):
    """The architecture name is not one modelpress can build."""


def known_models() -> list[str]:
    return sorted(_REGISTRY) + [TORCHVISION_PREFIX + "<name>"]


def is_known(arch: str) -> bool:
    """True if ``build_model(arch)`` can build it (no model is built)."""
    if arch in _REGISTRY:
        return True
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        return arch[len(TORCHVISION_PREFIX):] in torchvision.models.list_models()
    return False


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build an untrained model by registry name, or ``torchvision:<name>``.

    Torchvision models are always built with ``weights=None``: weights come from a file,
    never from a download.
    """
    if arch in _REGISTRY:
        return _REGISTRY[arch](**kwargs)
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX):]
        if name not in torchvision.models.list_models():
            raise UnknownModelError(f"unknown torchvision model {name!r}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise UnknownModelError(
        f"unknown model {arch!r}; known: {', '.join(known_models())}"
    )


def parameter_bytes(model: nn.Module, bytes_per_value: int = 4) -> int:
    """Size of the model's parameters stored densely (fp32 by default)."""
    return sum(p.numel() for p in model.parameters()) * bytes_per_value
