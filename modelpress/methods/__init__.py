"""Compression methods behind one verb: ``compress(model, config, ...)``.

The handler is looked up by the config's type, as torchao's ``quantize_`` does; adding a
method means adding a subpackage and one line here. ``data`` carries what methods need;
each takes what it uses:

- ``calibration``: in-domain images (PQ's activation-weighted objective);
- ``train_batches``: a DataLoader of (image, label) batches (fine-tuning, retraining);
- ``teacher``: the dense model (distillation); ``on_layer`` / ``on_cycle``: callbacks.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Callable, Union

import torch.nn as nn
from pydantic import Discriminator, Tag

from .kmeans import KMeansConfig, quantize_kmeans
from .pq import PQConfig, quantize_pq
from .prune import PruneConfig, PrunePQConfig, prune_imp, prune_pq
from .uniform import UniformConfig, quantize_uniform

_HANDLERS: dict[type, Callable] = {
    PQConfig: quantize_pq, PruneConfig: prune_imp, PrunePQConfig: prune_pq,
    # baselines, packed and measured the same way
    KMeansConfig: quantize_kmeans, UniformConfig: quantize_uniform,
}
METHOD_NAMES = ("pq", "prune", "prune_pq", "kmeans", "uniform")


def _method_name(value) -> str:
    """The method a config (or raw mapping) is for; a mapping without ``name`` means PQ."""
    return value.get("name", "pq") if isinstance(value, dict) else getattr(value, "name", "pq")


MethodConfig = Annotated[
    Union[Annotated[PQConfig, Tag("pq")], Annotated[PruneConfig, Tag("prune")], Annotated[PrunePQConfig, Tag("prune_pq")],
          Annotated[KMeansConfig, Tag("kmeans")], Annotated[UniformConfig, Tag("uniform")]],
    Discriminator(_method_name),
]


def compress(model: nn.Module, config, **data) -> tuple[nn.Module, list[dict]]:
    """Compress ``model`` in place with the method ``config`` describes.

    Returns the compressed model and per-layer (or per-cycle) statistics.
    """
    try:
        handler = _HANDLERS[type(config)]
    except KeyError:
        raise TypeError(f"no compression method for {type(config).__name__}") from None
    accepted = inspect.signature(handler).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    return handler(model, config, **{k: v for k, v in data.items() if takes_all or k in accepted})
