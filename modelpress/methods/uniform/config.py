"""Settings of the per-channel uniform quantization baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class UniformConfig(BaseModel):
    """Per-output-channel affine quantization of every Conv2d/Linear weight."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["uniform"] = "uniform"
    bits: int = Field(8, ge=1, le=8, description="Bits per weight (2**bits levels per output channel).")
    exclude: list[str] = Field([], description="Layer names (glob patterns) kept dense.")

    def key_params(self) -> str:
        return f"bits={self.bits}" + (f" exclude={self.exclude}" if self.exclude else "")
