"""Settings of iterative magnitude pruning with rewinding (Renda, Frankle & Carbin 2020), and
of its composition with quantization of the surviving weights."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PruneConfig(BaseModel):
    """Global magnitude pruning in cycles, each followed by retraining."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prune"] = "prune"
    target_sparsity: float = Field(
        0.9, gt=0, lt=1, description="Share of prunable weights that end at zero (strictly between 0 and 1)."
    )
    target_bytes: int | None = Field(
        None, ge=1, description="Instead of a sparsity: keep pruning until the packed file fits in this many bytes."
    )
    rate: float = Field(0.2, gt=0, lt=1, description="Share of the *remaining* weights pruned in each cycle.")
    milestones: list[float] = Field(
        [], description="Extra sparsities the schedule stops at exactly; every cycle's model is kept, so one run gives several points."
    )
    retrain: Literal["lr_rewind", "finetune", "weight_rewind"] = Field(
        "lr_rewind",
        description="lr_rewind: keep the weights, replay the original LR schedule; finetune: small constant LR; "
                    "weight_rewind: reset the survivors to their values at that point of the original training, then replay.",
    )
    rewind_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the original schedule each cycle replays (1.0 = all of it, as in the paper)."
    )
    epochs: float | None = Field(None, gt=0, le=1000, description="Length of the original schedule in epochs; empty: teacher.epochs.")
    lr: float | None = Field(None, gt=0, description="Peak LR of the original schedule; empty: teacher.lr.")
    finetune_lr: float = Field(1e-3, gt=0, description="Constant LR of retrain=finetune.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Warm-up share of the original schedule (replayed when rewinding to its start).")
    weight_decay: float | None = Field(None, ge=0, description="Empty: teacher.weight_decay.")
    batch_size: int | None = Field(None, ge=1, le=65536, description="Empty: teacher.batch_size.")
    loss: Literal["labels", "distill"] = Field("labels", description="Retrain on labels (as the paper) or distil from the teacher.")
    exclude: list[str] = Field([], description="Layer names (glob patterns) never pruned. Biases and BatchNorm never are.")
    seed: int = 0

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        for m in v:
            if not 0 < m < 1:
                raise ValueError(f"milestone {m} must be strictly between 0 and 1")
        return sorted(set(v))


    def key_params(self) -> str:
        goal = f"target_bytes={self.target_bytes}" if self.target_bytes else f"sparsity={self.target_sparsity}"
        return f"{goal} rate={self.rate} retrain={self.retrain} rewind_fraction={self.rewind_fraction}"


class ValueQuantConfig(BaseModel):
    """Quantization of the surviving weights: per-layer k-means codebook over their values."""

    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(1, ge=1, le=64, description="Surviving values per sub-vector (1 = scalar weight sharing).")
    k: int = Field(16, ge=2, le=65536, description="Centroids per layer.")
    kmeans_iters: int = Field(30, ge=1, le=1000)
    finetune_epochs: float = Field(0.2, ge=0, description="Distillation epochs tuning all codebooks after clustering.")
    finetune_lr: float = Field(1e-3, gt=0)
    seed: int = 0


class PrunePQConfig(BaseModel):
    """Prune (as ``prune``), then product-quantize each layer's surviving weights."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prune_pq"] = "prune_pq"
    prune: PruneConfig = PruneConfig()
    quantize: ValueQuantConfig = ValueQuantConfig()

    def key_params(self) -> str:
        q = self.quantize
        return f"{self.prune.key_params()} values=block{q.block_size}/k{q.k}"

    @field_validator("prune")
    @classmethod
    def _no_byte_target(cls, v: PruneConfig) -> PruneConfig:
        if v.target_bytes is not None:
            raise ValueError("target_bytes is not supported with prune_pq (quantization changes the size); set prune.target_sparsity")
        return v
