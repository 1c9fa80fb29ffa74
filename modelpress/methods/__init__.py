"""Compression methods behind one verb: ``compress(model, config, ...)``.

The handler is looked up by the config's type, as torchao's ``quantize_`` does; adding a
method means adding a subpackage and one line here.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .pq import PQConfig, quantize_pq

_HANDLERS: dict[type, Callable] = {PQConfig: quantize_pq}

MethodConfig = PQConfig


def compress(model: nn.Module, config, **data) -> tuple[nn.Module, list[dict]]:
    """Compress ``model`` in place with the method ``config`` describes.

    ``data`` carries what the method needs (calibration images, training batches, teacher).
    Returns the compressed model and per-layer statistics.
    """
    try:
        handler = _HANDLERS[type(config)]
    except KeyError:
        raise TypeError(f"no compression method for {type(config).__name__}") from None
    return handler(model, config, **data)
