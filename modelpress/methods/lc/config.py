"""Settings of the LC algorithm (Carreira-Perpinan & Idelbayev: "Model compression as constrained
optimization", and the LC toolkit, arXiv:2005.07786)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMES = ("quantize", "binary", "ternary", "prune", "lowrank")


class LCTask(BaseModel):
    """One compression of a group of layers: which layers (glob patterns of Conv2d/Linear
    names) and how (the C step's scheme and its settings)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[str] = Field(["*"], min_length=1, description="Glob patterns of the Conv2d/Linear layers this task compresses.")
    scheme: Literal["quantize", "binary", "ternary", "prune", "lowrank"] = Field(
        "quantize", description="quantize: an adaptive codebook of k values per layer (1-D k-means); binary: {-c, c}; "
                                "ternary: {-c, 0, c} (closed forms; per layer, or per output channel with per_channel); "
                                "prune: a sparsity constraint; lowrank: truncated SVD (Conv2d as out x in*kh*kw).",
    )
    k: int = Field(2, ge=2, le=256, description="quantize: values per layer (2 = 1 bit per weight).")
    per_channel: bool = Field(
        False, description="binary/ternary: one scale c per output channel (stored as an affine entry: a scale and an "
                           "offset per channel, then the codes) instead of one per layer.",
    )
    nonzero: float | None = Field(
        None, gt=0, le=1,
        description="ternary: at most this share of each layer's (each channel's, with per_channel) codes non-zero; the "
                    "closed form then picks the best threshold within it. Fewer non-zero codes entropy-code smaller: a share q "
                    "costs at most h(q) + q bits per weight (0.4: 1.37; ternary's own threshold keeps 0.54 of "
                    "Gaussian-like weights: 1.54). Empty: no bound.",
    )
    keep: float = Field(0.1, gt=0, le=1, description="prune (l0): share of the task's weights kept non-zero.")
    norm: Literal["l0", "l1"] = Field("l0", description="prune: l0 (keep the largest) or l1 (a bound on the sum of magnitudes).")
    l1_fraction: float = Field(
        0.25, gt=0, le=1, description="prune with norm l1: the bound, as a share of the task's l1 norm in the teacher.",
    )
    per_layer: bool = Field(False, description="prune: keep the share in each layer (default: over the task's layers together).")
    rank: int | None = Field(None, ge=1, description="lowrank: one rank for every layer (or give alpha to select ranks).")
    alpha: float | None = Field(
        None, gt=0, description="lowrank: select each layer's rank trading ||error||^2 against alpha * cost (CVPR 2020).",
    )
    cost: Literal["flops", "bytes"] = Field("flops", description="lowrank with alpha: the cost a rank unit adds.")
    additive: bool = Field(
        False, description="Sum this task's Delta(theta) with that of the other additive tasks on the layers they share "
                           "(e.g. binary plus a sparse correction, prune with a small keep); a layer may be in several "
                           "tasks only if each of them is additive.",
    )

    @model_validator(mode="after")
    def _settings(self) -> LCTask:
        if self.scheme == "lowrank" and (self.rank is None) == (self.alpha is None):
            raise ValueError("lowrank: give exactly one of rank (fixed) or alpha (rank selection)")
        if self.per_channel and self.scheme not in ("binary", "ternary"):
            raise ValueError(f"per_channel is a setting of schemes binary and ternary, not {self.scheme}")
        if self.nonzero is not None and self.scheme != "ternary":
            raise ValueError(f"nonzero is a setting of scheme ternary, not {self.scheme}")
        if self.scheme != "lowrank" and (self.rank is not None or self.alpha is not None):
            raise ValueError(f"rank/alpha are settings of scheme lowrank, not {self.scheme}")
        return self


class LCConfig(BaseModel):
    """Learning-compression: minimise the task loss subject to w = Delta(theta) by an augmented
    Lagrangian, alternating L steps (training with a penalty pulling w toward Delta(theta)) and
    C steps (the best theta for the current w, per task), while mu grows."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["lc"] = Field("lc", description="The LC algorithm (Carreira-Perpinan & Idelbayev).")
    tasks: list[LCTask] = Field(
        [LCTask()], min_length=1,
        description="Compression tasks; each Conv2d/Linear layer belongs to at most one, or to several that are all "
                    "additive (their outputs summed) (default: every layer, k = 2).",
    )
    mu0: float = Field(
        0.03, gt=0, description="Penalty of the first LC step (mu_j = mu0 * mu_growth^j). Too small and the first steps "
                                "train w as if uncompressed (CIFAR-10 ResNet-20, ternary, 1-epoch L steps: 0.001 left w "
                                "half its norm away from Delta(theta) for 7 of 12 steps; 0.032 was +2.3 points).",
    )
    mu_growth: float = Field(1.5, gt=1, le=10, description="Growth of the penalty per LC step (> 1).")
    lc_steps: int = Field(20, ge=1, le=1000, description="LC steps (each: an L step, a C step, the multipliers' update).")
    l_step_epochs: float = Field(1.0, gt=0, le=1000, description="Epochs of training in each L step.")
    lr: float = Field(0.01, gt=0, description="Learning rate of the first L step (constant within a step, times lr_decay from one to the next).")
    lr_decay: float = Field(0.95, gt=0, le=1, description="Factor of the learning rate from one L step to the next.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (Nesterov momentum 0.9, as the toolkit) or adamw.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the L steps.")
    loss: Literal["distill", "labels"] = Field("distill", description="L steps' task loss: distillation from the teacher or labels.")
    tolerance: float = Field(
        0.0, ge=0, description="Stop early when ||w - Delta(theta)|| / ||w|| falls below this (0: run every step).",
    )
    batch_size: int | None = Field(None, ge=1, le=65536, description="Batch size of the L steps; empty: teacher.batch_size.")
    seed: int = Field(0, description="Seed of the L steps' batch order (each step adds its index).")

    def mu(self, step: int) -> float:
        """The penalty of LC step ``step`` (1-based; step 0 is the direct compression)."""
        return self.mu0 * self.mu_growth ** (step - 1)

    def key_params(self) -> str:
        schemes = "+".join(t.scheme for t in self.tasks)
        return f"{schemes} mu0={self.mu0:g} growth={self.mu_growth:g} steps={self.lc_steps}"
