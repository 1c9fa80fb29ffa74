"""Settings of Weight Fixing Networks (Subia-Waud & Dasmahapatra, ECCV 2022, arXiv:2210.13554)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PAPER_FRACTIONS = [0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0]


class WFNConfig(BaseModel):
    """Fix every Conv2d/Linear weight of the network, in iterations, onto one small network-wide
    set of powers of two (and sums of two), retraining the weights still free in between."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["wfn"] = Field("wfn", description="Weight Fixing Networks (Subia-Waud & Dasmahapatra, ECCV 2022).")
    distance_allowed: float = Field(
        0.01, gt=0, le=0.5,
        description="delta: a free weight w may be fixed to a value c when its relative distance |w - c| / |w| is at "
                    "most this (the paper: 0.0075, 0.01, 0.015). Smaller: more unique values, less damage.",
    )
    distance_rule: Literal["mean", "each"] = Field(
        "mean",
        description="How delta bounds what one value takes: mean = its closest free weights while their mean relative "
                    "distance is within delta (the reference code); each = every weight within delta on its own "
                    "(stricter: fewer weights per value, so more values and higher entropy).",
    )
    fractions: list[float] = Field(
        PAPER_FRACTIONS,
        description="Share of all fixable weights that is fixed after each iteration: strictly increasing in (0, 1], "
                    "ending at 1.0. One iteration = one checkpointed step; the last one fixes everything.",
    )
    zero_distance: float = Field(
        2 ** -7, gt=0, le=1,
        description="gamma_0: weights whose magnitude is below this are fixed to 0 (pruned); the smallest non-zero "
                    "value is the power of two just below it.",
    )
    regularisation_ratio: float = Field(
        5.0, ge=0,
        description="Weight of the term pulling free weights toward the nearest value already in use, as a ratio "
                    "of the task loss at each step (0 = no regularisation). 5: one epoch brings most free weights "
                    "within delta of the values in use, so later iterations add few values (the reference code's 1 "
                    "needs its 10 epochs per iteration).",
    )
    epochs_per_iteration: float = Field(
        1.0, ge=0, le=1000, description="Epochs of retraining of the free weights after each iteration but the last.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of each retraining (cosine decay to 0 within the iteration).")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (Adam, as the reference code) or sgd (Nesterov momentum 0.9).",
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the retraining (fixed weights stay exact regardless).")
    max_order: int = Field(
        2, ge=1, le=3,
        description="Most signed powers of two per value: 1 = powers of two only, 2 = also 2^a +- 2^b, 3 = three terms. "
                    "Lower orders are always tried first.",
    )
    exclude: list[str] = Field([], description="Layer names (glob patterns) never fixed (kept dense). Biases and BatchNorm never are.")
    loss: Literal["distill", "labels"] = Field(
        "distill", description="Retrain against the teacher's outputs (distill, no labels) or on the labels (as the paper).",
    )
    batch_size: int | None = Field(None, ge=1, le=65536, description="Batch size of the retraining; empty: teacher.batch_size.")
    seed: int = Field(0, description="Seed of the retraining's batch order (each iteration adds its index).")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one fraction (the last must be 1.0)")
        for f in v:
            if not 0 < f <= 1:
                raise ValueError(f"fraction {f} must be in (0, 1]")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"fractions must be strictly increasing (got {v})")
        if v[-1] != 1.0:
            raise ValueError(f"fractions must end at 1.0, every weight fixed (got {v[-1]})")
        return v

    def key_params(self) -> str:
        return (f"delta={self.distance_allowed} ({self.distance_rule}) iterations={len(self.fractions)} zero={self.zero_distance:g} "
                f"max_order={self.max_order} reg={self.regularisation_ratio}")
