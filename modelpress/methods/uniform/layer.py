"""A Conv2d/Linear whose weight is ``offset[c] + codes * scale[c]`` per output channel c."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...pack.codecs import EncodeOptions, register_layer_codec
from ...pack.entries import affine_scale_dtype, encode_affine
from ...walk import check_patterns, matches, named_layers, set_module
from .config import UniformConfig


class UniformLayer(nn.Module):
    """Drop-in for a Conv2d or Linear; trainable per-channel ``scale`` and ``offset``,
    fixed integer ``codes`` in [0, 2**bits). Built from the layer's own weight when no codes
    are given (min-max per output channel)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bits: int, codes: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, offset: torch.Tensor | None = None):
        super().__init__()
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        self.weight_shape = tuple(layer.weight.shape)
        self.bits = bits
        if self.kind == "conv2d":
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        device = layer.weight.device
        if codes is None:
            w = layer.weight.detach().float().reshape(self.weight_shape[0], -1)
            lo, hi = w.min(1).values, w.max(1).values
            scale = (hi - lo) / (2 ** bits - 1)
            codes = torch.round((w - lo[:, None]) / scale.clamp_min(1e-12)[:, None]).clamp_(0, 2 ** bits - 1)
            offset = lo
        self.scale = nn.Parameter(scale.detach().clone().to(device, torch.float32).reshape(-1))
        self.offset = nn.Parameter(offset.detach().clone().to(device, torch.float32).reshape(-1))
        self.register_buffer("codes", codes.detach().to(device, torch.long).reshape(self.weight_shape[0], -1))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return (self.offset[:, None] + self.codes * self.scale[:, None]).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.weight_shape}, bits={self.bits}"


def _encode(m: UniformLayer, name: str, opts: EncodeOptions) -> list:
    p, data = encode_affine(m.scale, m.offset, m.codes, m.bits, m.weight_shape, affine_scale_dtype(opts.codebook_dtype),
                            opts.entropy)
    return [(f"{name}.weight", "affine", p, data)]


def _rebuild(layer: nn.Module, parts: dict) -> tuple[UniformLayer, dict]:
    q = UniformLayer(layer, parts["bits"], parts["codes"], parts["scale"], parts["offset"])
    return q, {"scale": parts["scale"], "offset": parts["offset"], "codes": parts["codes"]}


# the packed file: a uniform layer is one "affine" entry
register_layer_codec(UniformLayer, state_keys=("scale", "offset", "codes"), encode=_encode, kind="affine", rebuild=_rebuild)


@torch.no_grad()
def quantize_uniform(model: nn.Module, cfg: UniformConfig) -> tuple[nn.Module, list[dict]]:
    """Replace every Conv2d/Linear (but ``cfg.exclude``) of ``model`` in place."""
    check_patterns(model, cfg.exclude, "exclude")
    stats = []
    for name, layer in list(named_layers(model)):
        if matches(name, cfg.exclude):
            continue
        q = UniformLayer(layer, cfg.bits)
        w = layer.weight.detach()
        stats.append({"layer": name, "weights": w.numel(), "bits": cfg.bits,
                      "weight_rel_error": float((w - q.weight).norm() / w.norm().clamp_min(1e-30))})
        set_module(model, name, q)
    return model, stats
