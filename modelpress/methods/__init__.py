"""Compression methods behind one verb: ``compress(model, config, ...)``.

The method is looked up by the config's type, as torchao's ``quantize_`` does. A method is a
subpackage exposing ``METHOD`` (the contract: ``base.py``) plus one line in ``REGISTRY``
below; the names, the parameter union of params.yaml and the pipeline's dispatch all derive
from it. ``data`` (keyword arguments) fills a :class:`base.Context`:

- ``calibration``: in-domain inputs (PQ's activation-weighted objective): images, or a tuple or
  dict of tensors (``input_ids``, ``attention_mask``: padding left out), see modelpress.inputs;
- ``train_batches``: a DataLoader of (input, label) batches (fine-tuning, retraining);
- ``teacher``: the dense model (distillation); ``on_layer``: a per-layer callback; ...

A keyword that is not a Context field is refused (a misspelt ``calibraton=`` fails).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Callable, Union

import torch.nn as nn
from pydantic import BaseModel, Field

from ..train import distill, is_bias_or_norm
from . import kmeans, lc, pq, prune, uniform, wfn
from .base import Context, Method
from .kmeans import KMeansConfig, quantize_kmeans
from .pq import PQConfig, quantize_pq
from .prune import PruneConfig, PrunePQConfig, prune_imp, prune_pq
from .uniform import UniformConfig, quantize_uniform

REGISTRY: dict[str, Method] = {m.name: m for m in (
    pq.METHOD,
    prune.METHOD,
    prune.PQ_METHOD,
    kmeans.METHOD,  # baselines, packed and measured the same way
    uniform.METHOD,
    wfn.METHOD,
    lc.METHOD,
)}
METHOD_NAMES = tuple(REGISTRY)
_BY_CONFIG = {m.config: m for m in REGISTRY.values()}

# Discriminated by ``name``: the JSON schema (Prefect's UI form, the API's validation) shows
# the method as a choice and names a bad field inside the chosen method. A mapping without
# ``name`` means PQ (``Recipe`` fills it in before validation).
if TYPE_CHECKING:
    MethodConfig = Any  # the registry's union, built at run time (a type checker cannot follow it)
else:
    MethodConfig = Annotated[Union[tuple(m.config for m in REGISTRY.values())], Field(discriminator="name")]


def method_of(config: BaseModel) -> Method:
    """The registered method a config belongs to."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"no compression method for {type(config).__name__}") from None


def compress(model: nn.Module, config: BaseModel, *, finetune_epochs: float = 0.0, finetune_lr: float = 1e-4,
             loss: str | Callable = "kl", temperature: float = 1.0, **data) -> tuple[nn.Module, list[dict]]:
    """Compress ``model`` in place with the method ``config`` describes; ``data``: the Context's
    fields (calibration=, train_batches=, teacher=, ...).

    ``finetune_epochs`` > 0: then distil, for that many passes over ``train_batches``, what the
    method made trainable (codebooks, ...), the biases and the BatchNorm and LayerNorm parameters from
    ``teacher`` (no labels), with the student's dropout off. ``loss``: ``kl`` on logits (the
    default), ``mse`` or ``cosine`` on embeddings, or a function (student output, teacher output)
    -> loss (modelpress.train.distill_loss); the method's own distillation (PQ's per-codebook
    tuning) minimises it too.

    Returns the compressed model and per-layer (or per-cycle) statistics.
    """
    method = method_of(config)
    ctx = Context.of(**data)
    ctx.loss = loss
    if finetune_epochs > 0 and (ctx.teacher is None or ctx.train_batches is None):
        raise ValueError("finetune_epochs needs teacher= and train_batches= (distillation from the teacher)")
    stats = method.run(model, config, ctx)
    if finetune_epochs > 0 and ctx.teacher is not None and ctx.train_batches is not None:
        params = method.trainable(model, config)
        params += [p for n, p in model.named_parameters() if is_bias_or_norm(model, n) and all(p is not q for q in params)]
        distill(model, ctx.teacher, ctx.train_batches, params, finetune_epochs, finetune_lr, temperature=temperature,
                stage="finetune", device=ctx.device, loss=loss, dropout=False)
    return model, stats



__all__ = [
    "METHOD_NAMES", "REGISTRY", "Context", "KMeansConfig", "Method", "MethodConfig", "PQConfig", "PruneConfig",
    "PrunePQConfig", "UniformConfig", "compress", "method_of", "prune_imp", "prune_pq", "quantize_kmeans",
    "quantize_pq", "quantize_uniform",
]
