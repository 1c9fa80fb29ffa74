"""A Conv2d or Linear whose weight is a sum of parts (the LC algorithm's additive combinations:
a quantized weight plus a sparse correction, quantized plus low rank, ...): one layer at run
time, in the packed file one entry per part, ``<layer>.weight`` and its addends
``<layer>.weight+1``, ``+2``, ... each with its own encoding (pq, lowrank, sparse or dense)."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...pack.codecs import EncodeOptions, Entry, codec_for, rebuild_codec, register_layer_codec
from ...pack.container import ADDEND
from ...pack.model import dense_or_sparse


class WeightPart(nn.Module):
    """A part that is a plain trainable ``weight`` (a pruned part: with its zeros, which the
    fine-tuning keeps, see the method's held_zero)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())


class AdditiveLayer(nn.Module):
    """Drop-in for a Conv2d or Linear whose weight is the sum of its ``parts``' weights, each a
    module with a ``weight`` of the layer's shape (a PQLayer, a LowRankLayer, a WeightPart).
    The parts' biases are dropped: the layer keeps its own bias and convolution settings."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, parts: list[nn.Module]):
        super().__init__()
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        self.weight_shape = tuple(layer.weight.shape)
        if len(parts) < 2:
            raise ValueError(f"an additive layer has at least two parts, not {len(parts)}")
        for i, part in enumerate(parts):
            if isinstance(getattr(part, "bias", None), nn.Parameter):
                part.register_parameter("bias", None)
            shape = tuple(cast(torch.Tensor, part.weight).shape)
            if shape != self.weight_shape:
                raise ValueError(f"part {i} has a weight of shape {shape}, the layer {self.weight_shape}")
        if isinstance(layer, nn.Conv2d):
            self.conv_args: dict[str, Any] = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.parts = nn.ModuleList(parts)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        weights = [cast(torch.Tensor, part.weight) for part in self.parts]
        return sum(weights[1:], weights[0])  # in order, as the loader adds the decoded parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.weight_shape}"


def _encode(m: AdditiveLayer, name: str, opts: EncodeOptions) -> list[Entry]:
    """Part 0 as the layer's own weight, part i as its addend ``<name>.weight+<i>``, each by its
    own codec (a WeightPart: dense, or sparse where it has enough zeros)."""
    entries: list[Entry] = []
    for i, part in enumerate(m.parts):
        codec = codec_for(part)
        if codec is not None:
            own = codec.encode(part, name, opts)
        else:
            own = [(f"{name}.weight", *dense_or_sparse(cast(torch.Tensor, part.weight).detach(), opts.float_dtype))]
        entries += [(n if i == 0 else f"{n}{ADDEND}{i}", enc, p, data) for n, enc, p, data in own]
    return entries


def _rebuild(layer: nn.Module, parts: dict) -> tuple[AdditiveLayer, dict[str, torch.Tensor]]:
    """The layer from its decoded parts: a dense part as a WeightPart, the others by the codec of
    their kind (pq, lowrank)."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"an additive weight belongs to a Conv2d or Linear, not a {type(layer).__name__}")
    modules: list[nn.Module] = []
    state: dict[str, torch.Tensor] = {}
    for i, dec in enumerate(parts["parts"]):
        if dec.kind == "dense":
            module: nn.Module = WeightPart(dec.parts["weight"])
            own = {"weight": dec.parts["weight"]}
        else:
            module, own = rebuild_codec(dec.kind).rebuild(layer, dec.parts)
        modules.append(module)
        state.update({f"parts.{i}.{k}": v for k, v in own.items()})
    return AdditiveLayer(layer, modules), state


register_layer_codec(AdditiveLayer, state_keys=("parts",), encode=_encode, kind="additive", rebuild=_rebuild)
