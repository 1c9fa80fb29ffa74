"""A Conv2d or Linear whose weight is the product of two factors, U (out x r) and V (r x in*kh*kw):
two layers at run time (a Conv2d: an r-channel convolution with the original kernel, then a 1x1
convolution), one "lowrank" entry in the packed file."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...pack.codecs import EncodeOptions, register_layer_codec
from ...pack.entries import encode_lowrank


class LowRankLayer(nn.Module):
    """Drop-in for a Conv2d (groups=1) or Linear: ``u`` (out, r) and ``v`` (r, in*kh*kw), both
    trainable; the bias is kept as is."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("a low-rank grouped convolution is not supported")
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        self.weight_shape = tuple(layer.weight.shape)
        rest = layer.weight[0].numel()
        if u.shape[0] != self.weight_shape[0] or v.shape[1] != rest or u.shape[1] != v.shape[0]:
            raise ValueError(f"factors {tuple(u.shape)} x {tuple(v.shape)} do not make a weight of shape {self.weight_shape}")
        if self.kind == "conv2d":
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        device = layer.weight.device
        self.u = nn.Parameter(u.detach().clone().to(device, torch.float32))
        self.v = nn.Parameter(v.detach().clone().to(device, torch.float32))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return (self.u @ self.v).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(F.linear(x, self.v), self.u, self.bias)
        kernel = self.v.reshape(self.rank, *self.weight_shape[1:])
        return F.conv2d(F.conv2d(x, kernel, None, **self.conv_args), self.u[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.weight_shape}, rank={self.rank}"


def _encode(m: LowRankLayer, name: str, opts: EncodeOptions) -> list:
    p, data = encode_lowrank(m.u.detach(), m.v.detach(), m.weight_shape, opts.float_dtype)
    return [(f"{name}.weight", "lowrank", p, data)]


def _rebuild(layer: nn.Module, parts: dict) -> tuple[LowRankLayer, dict]:
    lr = LowRankLayer(layer, parts["u"], parts["v"])
    return lr, {"u": parts["u"], "v": parts["v"]}


register_layer_codec(LowRankLayer, state_keys=("u", "v"), encode=_encode, kind="lowrank", rebuild=_rebuild)
