"""Settings of layer-by-layer product quantization (Stock et al. 2019)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

CodebookDtype = Literal["f16", "f32", "i8", "i6", "i5", "i4", "g8", "g6", "g5", "g4"]


class BlockSpec(BaseModel):
    """How one layer (or one type of layer) is cut and clustered."""

    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(ge=1, le=64, description="Length of each sub-vector of the weight.")
    k: int = Field(ge=2, le=65536, description="Centroids in the layer's codebook (capped by its number of sub-vectors).")
    codebook: CodebookDtype | None = Field(None, description="This layer's codebook storage (a byte budget's choice); "
                                                             "empty: pack.codebook_dtype.")

    @model_serializer(mode="wrap")
    def _leave_out_empty_codebook(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("codebook", "") is None:
            del data["codebook"]  # the keys of work done before the field existed stay
        return data


LATER_FIELDS = ("metric", "budget_linear_blocks", "budget_scope", "budget_codebooks")


class PQConfig(BaseModel):
    """Product quantization, layer by layer, on the student's own activations."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["pq"] = "pq"
    conv: BlockSpec = Field(BlockSpec(block_size=9, k=256), description="k x k convolutions (k > 1); block 9 = one 3x3 kernel "
                                                                         "(a layer whose rows it does not divide, e.g. a 7x7 stem: one kernel row per block).")
    pointwise: BlockSpec = Field(BlockSpec(block_size=4, k=256), description="1x1 convolutions.")
    linear: BlockSpec = Field(BlockSpec(block_size=8, k=256), description="Fully connected layers.")
    overrides: dict[str, BlockSpec] = Field({}, description="Per-layer settings by layer name (glob patterns allowed).")
    exclude: list[str] = Field([], description="Layer names (glob patterns) kept dense.")
    target_bytes: int | None = Field(
        None, ge=1, description="Byte budget of the packed file: each layer's block size and k (or fp16) are chosen "
                                "to fit it with the least damage; conv/pointwise/linear/overrides are then ignored.",
    )
    budget_k: list[int] = Field([16, 32, 64, 128, 256], min_length=1,
                                description="Centroid counts the byte budget chooses from (each 2..65536).")
    budget_codebooks: list[CodebookDtype] | None = Field(
        None, description="Codebook storages the byte budget chooses from per layer, each candidate's damage measured "
                          "with its codebook so stored (e.g. [i6, g6]: grouped scales where a layer's outlier centroids "
                          "need them); empty: every layer in pack.codebook_dtype.")
    budget_images: int = Field(256, ge=16, description="Calibration images on which each candidate's damage is measured.")
    budget_linear_blocks: list[int] | None = Field(
        None, description="Block sizes the byte budget tries for Linear layers and attention in-projections "
                          "(empty: 4, 8, 16); transformers gain from 2.")
    budget_scope: Literal["file", "layers"] | None = Field(
        None, description="What target_bytes counts: the whole packed file ('file', the default when empty), or only "
                          "the weights of the layers it allocates ('layers': embeddings, norms, biases and header are "
                          "not counted, e.g. a transformer whose embeddings stay fp16).")
    activation_weighted: bool = Field(True, description="Minimise ||X(W - W_hat)||^2 on in-domain inputs instead of ||W - W_hat||^2.")
    metric: Literal["shared", "position"] | None = Field(
        None, description="The activation metric of a layer's k-means: one Gram matrix shared by every block position "
                          "of a row ('shared', the default when empty), or one per block position ('position': input "
                          "channels with outlier activations, as transformers have, keep their weight).")
    calibration_images: int = Field(1024, ge=16, description="In-domain images whose activations define each layer's objective.")
    kmeans_iters: int = Field(30, ge=1, le=1000)
    kmeans_init: Literal["kmeans++", "random", "linear"] = Field(
        "kmeans++", description="Initial centroids; 'linear' (evenly spaced values) needs block size 1.")
    repair_empty: bool = Field(True, description="Split the largest cluster into empty ones.")
    layer_finetune_epochs: float = Field(0.1, ge=0, description="Distillation epochs (fractions allowed) tuning each new codebook; 0 disables.")
    layer_finetune_lr: float = Field(1e-3, gt=0)
    temperature: float = Field(1.0, gt=0, description="Distillation temperature.")
    seed: int = 0

    @field_validator("budget_linear_blocks")
    @classmethod
    def _blocks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or not all(1 <= b <= 64 for b in v)):
            raise ValueError(f"block sizes must be a non-empty list of 1..64, got {v}")
        return None if v is None else sorted(set(v))

    @field_validator("budget_k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if not 2 <= k <= 65536]
        if bad:
            raise ValueError(f"every k must be in 2..65536, got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _linear_init_scalar(self) -> "PQConfig":
        specs = [self.conv, self.pointwise, self.linear, *self.overrides.values()]
        if self.kmeans_init == "linear" and (self.target_bytes or any(s.block_size != 1 for s in specs)):
            raise ValueError("kmeans_init 'linear' needs block_size 1 for every layer (and no target_bytes)")
        return self

    @model_validator(mode="after")
    def _codebooks_need_a_budget(self) -> "PQConfig":
        if self.budget_codebooks is not None and self.target_bytes is None:
            raise ValueError("budget_codebooks is the byte budget's choice: set target_bytes too (or pack.codebook_dtype alone)")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_empty_new_fields(self, handler):
        """Fields added after runs were made, left empty, are not written: the keys of work done
        before they existed stay."""
        data = handler(self)
        if isinstance(data, dict):
            for name in LATER_FIELDS:
                if data.get(name, "") is None:
                    del data[name]
        return data

    def key_params(self) -> str:
        if self.target_bytes:
            return f"target_bytes={self.target_bytes} budget_k={self.budget_k}"
        return (f"conv={self.conv.block_size}/{self.conv.k} pointwise={self.pointwise.block_size}/{self.pointwise.k} "
                f"linear={self.linear.block_size}/{self.linear.k}")
