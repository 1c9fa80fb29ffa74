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
from pydantic import Field

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


# Discriminated by ``name``: the JSON schema (Prefect's UI form, the API's validation) shows
# the method as a choice and names a bad field inside the chosen method. A mapping without
# ``name`` means PQ (``Recipe`` fills it in before validation).
MethodConfig = Annotated[
    Union[PQConfig, PruneConfig, PrunePQConfig, KMeansConfig, UniformConfig],
    Field(discriminator="name"),
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
