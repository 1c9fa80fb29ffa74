"""Baseline: scalar k-means weight sharing per layer (Han et al., "Deep Compression", 2016).

Every weight of a layer is replaced by the nearest of 2**bits shared values found by plain
k-means on the weights themselves (linearly spaced initial centroids, as the paper found
best); the centroids are then fine-tuned with the gradients of their members (the shared
fine-tuning step). This is product quantization with sub-vectors of length 1, a weight-space
objective and no per-layer tuning, so it runs on the PQ machinery and packs as PQ entries.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..base import Method, codebooks
from ..pq import PQConfig, PQLayer, quantize_pq
from ..pq.config import BlockSpec
from ..pq.method import check as pq_check


class KMeansConfig(BaseModel):
    """Per-layer scalar weight sharing with 2**bits values."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["kmeans"] = "kmeans"
    bits: int = Field(4, ge=1, le=8, description="Bits per weight index (2**bits shared values per layer).")
    exclude: list[str] = Field([], description="Layer names (glob patterns) kept dense.")
    kmeans_iters: int = Field(30, ge=1, le=1000)
    seed: int = 0

    def as_pq(self) -> PQConfig:
        spec = BlockSpec(block_size=1, k=2 ** self.bits)
        return PQConfig(conv=spec, pointwise=spec, linear=spec, exclude=self.exclude, activation_weighted=False,
                        kmeans_init="linear", kmeans_iters=self.kmeans_iters, layer_finetune_epochs=0,
                        calibration_images=256, seed=self.seed)

    def key_params(self) -> str:
        return f"bits={self.bits}" + (f" exclude={self.exclude}" if self.exclude else "")


def quantize_kmeans(model: nn.Module, cfg: KMeansConfig, **data) -> tuple[nn.Module, list[dict]]:
    """Quantize ``model`` in place; ``data`` as for :func:`quantize_pq` (calibration images
    are only used to report each layer's output error)."""
    return quantize_pq(model, cfg.as_pq(), **data)


METHOD = Method(
    name="kmeans", config=KMeansConfig, summary="baseline: scalar k-means weight sharing per layer (Han et al. 2016)",
    check=lambda model, cfg, ctx: pq_check(model, cfg.as_pq(), ctx),
    apply=lambda model, cfg, ctx: quantize_pq(model, cfg.as_pq(), ctx.calibration, ctx.train_batches, ctx.teacher,
                                              ctx.on_layer, ctx.codebook_dtype)[1],
    calibration=lambda cfg: (cfg.as_pq().calibration_images, cfg.seed),
    trainable=codebooks, layers=(PQLayer,),
)

__all__ = ["METHOD", "KMeansConfig", "quantize_kmeans"]
