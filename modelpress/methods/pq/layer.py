"""A Conv2d/Linear whose weight is a product-quantized codebook lookup.

Sub-vector layout (as in Stock et al.): the weight is viewed as (out, in * kh * kw), each row
is cut into contiguous blocks of ``block_size``; for a 3x3 conv with block 9 a block is one
kernel. The matching input rows come from ``im2col`` in the same order.

Grouped and depthwise convolutions (``groups > 1``): a row is one output channel's
(in / groups) * kh * kw weights, and a block never crosses a group (the block size divides the
row), so ``im2col``'s columns cut into blocks are exactly the inputs of some row's blocks: one
Gram over them all, as for any layer. A depthwise 3x3 with block 9 has one block per channel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...pack.codebook import round_codebook
from ...pack.codecs import EncodeOptions, register_layer_codec
from ...pack.entries import encode_pq, encode_sparse_pq


def to_subvectors(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """(out, in, *k) weight -> (n, block_size) sub-vectors."""
    row = weight.reshape(weight.shape[0], -1)
    if row.shape[1] % block_size:
        raise ValueError(f"block size {block_size} does not divide the layer's input size {row.shape[1]}")
    return row.reshape(-1, block_size)


def input_rows(layer: nn.Module, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The layer's input as (rows, block_size): im2col for convs, one row per block."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, in*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    return rows.reshape(-1, block_size)


@torch.no_grad()
def input_gram(model: nn.Module, layer: nn.Module, images: torch.Tensor, block_size: int, batch_size: int = 256) -> torch.Tensor:
    """G = X^T X over the layer's input blocks, X taken from ``model`` on ``images``."""
    device = next(model.parameters()).device
    g = torch.zeros(block_size, block_size, dtype=torch.float64, device=device)

    def hook(_m, inputs):
        rows = input_rows(layer, inputs[0].detach(), block_size).double()
        g.add_(rows.T @ rows)

    handle = layer.register_forward_pre_hook(hook)
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(device))
    finally:
        handle.remove()
    return g.cpu()


class PQLayer(nn.Module):
    """Drop-in for a Conv2d or Linear; trainable ``codebook`` (k, d), fixed ``codes`` (n,).

    ``storage`` (None, or a codebook dtype of the packed file such as "i8"): while the codebook
    trains, the forward pass uses it rounded to that storage, with the gradient passed straight
    through to the unrounded values, so training sees the weights the file will hold.

    With a ``mask`` (bool, the weight's shape) the layer is sparse: the codes quantize only
    the kept weights, in row-major order (padded to whole sub-vectors), and the rest are zero.
    """

    def __init__(
        self, layer: nn.Conv2d | nn.Linear, codebook: torch.Tensor, codes: torch.Tensor, block_size: int,
        mask: torch.Tensor | None = None,
    ):
        super().__init__()
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        self.weight_shape = tuple(layer.weight.shape)
        self.block_size = block_size
        if self.kind == "conv2d":
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.codebook = nn.Parameter(codebook.detach().clone().to(layer.weight.device, torch.float32))
        self.register_buffer("codes", codes.detach().to(layer.weight.device, torch.long))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        if mask is not None:
            if tuple(mask.shape) != self.weight_shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {self.weight_shape}")
            self.register_buffer("mask", mask.detach().to(layer.weight.device, torch.bool))
            self.kept = int(self.mask.sum())
        else:
            self.mask, self.kept = None, None
        self.storage: str | None = None

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        codebook = self.codebook
        if self.storage is not None and codebook.requires_grad:
            codebook = codebook + (round_codebook(codebook, self.storage) - codebook).detach()  # straight-through
        values = codebook.index_select(0, self.codes)
        if self.mask is None:
            return values.reshape(self.weight_shape)
        kept = values.reshape(-1)[: self.kept]
        return torch.zeros(self.weight_shape, device=kept.device, dtype=kept.dtype).masked_scatter(self.mask, kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        sparse = "" if self.mask is None else f", kept={self.kept}"
        return f"{self.kind}, shape={self.weight_shape}, block={self.block_size}, k={self.k}{sparse}"


# ---- the packed file: a PQ layer is one "pq" entry, or a "sparse" one with PQ values -------

def _encode(m: PQLayer, name: str, opts: EncodeOptions) -> list:
    if m.mask is not None:
        p, data = encode_sparse_pq(m.mask, m.codebook, m.codes, opts.codebook_dtype, opts.entropy)
        return [(f"{name}.weight", "sparse", p, data)]
    p, data = encode_pq(m.codebook, m.codes, m.weight_shape, opts.codebook_dtype, opts.entropy)
    return [(f"{name}.weight", "pq", p, data)]


def _rebuild(layer: nn.Module, parts: dict) -> tuple[PQLayer, dict]:
    pq = PQLayer(layer, parts["codebook"], parts["codes"], parts["d"], mask=parts["mask"])
    state = {"codebook": parts["codebook"], "codes": parts["codes"]}
    if parts["mask"] is not None:
        state["mask"] = parts["mask"]
    return pq, state


register_layer_codec(PQLayer, state_keys=("codebook", "codes", "mask"), encode=_encode, kind="pq", rebuild=_rebuild)
