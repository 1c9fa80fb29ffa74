"""A Conv2d/Linear whose weight is a product-quantized codebook lookup.

Sub-vector layout (as in Stock et al.): the weight is viewed as (out, in * kh * kw), each row
is cut into contiguous blocks of ``block_size``; for a 3x3 conv with block 9 a block is one
kernel. The matching input rows come from ``im2col`` in the same order.

Grouped and depthwise convolutions (``groups > 1``): a row is one output channel's
(in / groups) * kh * kw weights, and a block never crosses a group (the block size divides the
row), so ``im2col``'s columns cut into blocks are exactly the inputs of some row's blocks: one
Gram over them all, as for any layer. A depthwise 3x3 with block 9 has one block per channel.

Attention (``nn.MultiheadAttention``): its in-projection ``in_proj_weight`` (3 * embed, embed) is
quantized like a Linear's weight, as a PQAttention; the Gram is over the query's tokens (and the
key's and value's when they are other tensors, as in cross-attention: then one Gram serves all
three row groups, their sum). Its ``out_proj`` is an nn.Linear, quantized as any other; the
attention never calls it (it reads its weight), so its inputs, the heads' outputs, are measured by
calling the attention again with an identity projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import inputs as model_inputs
from ...pack.codebook import round_codebook
from ...pack.codecs import EncodeOptions, register_layer_codec
from ...pack.entries import encode_pq, encode_sparse_pq
from ...progress import log
from ...walk import is_attention, is_transposed_linear, weight_of


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


def _layer_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a layer's weight multiplies: its input; an attention's query, key and value
    (each distinct tensor once)."""
    if not is_attention(layer):
        return [args[0] if args else kwargs["input"]]
    named = dict(zip(("query", "key", "value"), args)) | {k: v for k, v in kwargs.items() if k in ("query", "key", "value")}
    out: list[torch.Tensor] = []
    for t in (named.get("query"), named.get("key"), named.get("value")):
        if t is not None and not any(t is o for o in out):
            out.append(t)
    return out


def _attention_owning(model: nn.Module, layer: nn.Module) -> nn.MultiheadAttention | None:
    """The nn.MultiheadAttention whose ``out_proj`` ``layer`` is, if any."""
    if not isinstance(layer, nn.Linear):
        return None
    return next((m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m.out_proj is layer), None)


@torch.no_grad()
def input_gram(model: nn.Module, layer: nn.Module, images: model_inputs.Inputs, block_size: int,
               batch_size: int = 256, per_position: bool = False) -> torch.Tensor:
    """G = X^T X over the layer's input blocks, X taken from ``model`` on ``images`` (a tensor,
    or a tuple or dict of tensors: see modelpress.inputs). With an ``attention_mask`` among the
    inputs, the padding tokens' rows are left out of every (batch, tokens, features) input.
    ``per_position``: one Gram per block position of a row, (positions, d, d)."""
    device = next(model.parameters()).device
    positions = weight_of(layer)[0].numel() // block_size if per_position else 1
    g = torch.zeros(positions, block_size, block_size, dtype=torch.float64, device=device)
    mask: list[torch.Tensor | None] = [None]
    calls = [0]

    def add(x: torch.Tensor) -> None:
        x = x.detach() if isinstance(layer, nn.Conv2d) else model_inputs.token_rows(x.detach(), mask[0])
        rows = input_rows(layer, x, block_size).double()
        if positions == 1:
            g[0].add_(rows.T @ rows)
        else:
            rows = rows.reshape(-1, positions, block_size)
            g.add_(torch.einsum("npd,npe->pde", rows, rows))

    def hook(_m, args, kwargs):
        calls[0] += 1
        for x in _layer_inputs(layer, args, kwargs):
            add(x)

    owner = _attention_owning(model, layer)
    if owner is None:
        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        # An attention's out_proj is never called: the attention reads its weight. Its input is
        # the attention's output before that projection: the same call with an identity there.
        inside = [False]

        def owner_hook(attention, args, kwargs):
            if inside[0]:
                return
            calls[0] += 1
            identity = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
            with torch.no_grad():
                identity.weight.copy_(torch.eye(layer.out_features, layer.in_features))
                identity.bias.zero_()
            inside[0], attention.out_proj = True, identity
            try:
                add(attention(*args, **kwargs)[0])
            finally:
                inside[0], attention.out_proj = False, layer

        handle = owner.register_forward_pre_hook(owner_hook, with_kwargs=True)
    # nn.TransformerEncoderLayer and nn.MultiheadAttention have a fused inference path that
    # never calls their Linear/attention modules (no hook would see an input): off while measuring.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        model.eval()
        for i in range(0, model_inputs.count(images), batch_size):
            batch = model_inputs.to(model_inputs.take(images, i, i + batch_size), device)
            mask[0] = model_inputs.token_mask(batch)
            model_inputs.call(model, batch)
    finally:
        handle.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if not calls[0]:  # a layer the forward pass does not use: weight-space k-means (G = I)
        log.warning("pq: the model never called a %s on the calibration inputs: its codebook is fitted to "
                    "the weights alone", type(layer).__name__)
        g = torch.eye(block_size, dtype=torch.float64).expand(positions, -1, -1).clone()
    return g.cpu() if per_position else g[0].cpu()


def _lookup(codebook: torch.Tensor, codes: torch.Tensor, storage: str | None) -> torch.Tensor:
    """The codebook's rows for ``codes``; while a codebook with a ``storage`` trains, rounded to
    that storage with the gradient passed straight through to the unrounded values."""
    if storage is not None and codebook.requires_grad:
        codebook = codebook + (round_codebook(codebook, storage) - codebook).detach()
    return codebook.index_select(0, codes)


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
        # a Hugging Face Conv1D stores its weight (in, out): quantized and computed as the Linear
        # it is, (out, in); the packed entry keeps its layout (transposed=True)
        self.transposed = is_transposed_linear(layer)
        self.weight_shape = tuple(weight_of(layer).shape)
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
        values = _lookup(self.codebook, self.codes, self.storage)
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
        stored = ", stored transposed" if self.transposed else ""
        return f"{self.kind}, shape={self.weight_shape}, block={self.block_size}, k={self.k}{sparse}{stored}"


class PQAttention(nn.MultiheadAttention):
    """An nn.MultiheadAttention whose ``in_proj_weight`` is a codebook lookup: trainable
    ``codebook`` (k, d), fixed ``codes``. Everything else (biases, ``out_proj``, the forward pass)
    is the attention's own; ``storage`` as for PQLayer."""

    def __init__(self, attention: nn.MultiheadAttention, codebook: torch.Tensor, codes: torch.Tensor, block_size: int):
        if not is_attention(attention):
            raise ValueError("only an attention whose query, key and value share one in-projection can be quantized")
        nn.Module.__init__(self)
        # its settings (embed_dim, num_heads, batch_first, ...), not nn.Module's bookkeeping
        self.__dict__.update({k: v for k, v in vars(attention).items() if not k.startswith("_") or k == "_qkv_same_embed_dim"})
        weight = attention.in_proj_weight
        self.weight_shape = tuple(weight.shape)
        self.block_size = block_size
        self.storage: str | None = None
        for name, p in attention._parameters.items():  # the codebook where in_proj_weight was: same entry order
            if name == "in_proj_weight":
                self.codebook = nn.Parameter(codebook.detach().clone().to(weight.device, torch.float32))
            else:
                self.register_parameter(name, p)
        self.register_buffer("codes", codes.detach().to(weight.device, torch.long))
        for name, b in attention._buffers.items():
            self.register_buffer(name, b)
        for name, m in attention._modules.items():
            self.add_module(name, m)

    @property
    def in_proj_weight(self) -> torch.Tensor:  # type: ignore[override]
        if "in_proj_weight" in self._parameters:  # nn.MultiheadAttention.__init__'s own, before ours
            return self._parameters["in_proj_weight"]
        return _lookup(self.codebook, self.codes, self.storage).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        return self.in_proj_weight

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    def extra_repr(self) -> str:
        return f"in_proj {self.weight_shape}, block={self.block_size}, k={self.k}"


PQ_LAYERS = (PQLayer, PQAttention)


def make_pq(layer: nn.Module, codebook: torch.Tensor, codes: torch.Tensor, block_size: int,
            mask: torch.Tensor | None = None) -> PQLayer | PQAttention:
    """The PQ module that replaces ``layer``: a PQAttention for an attention, else a PQLayer."""
    if is_attention(layer):
        if mask is not None:
            raise ValueError("a sparse attention in-projection is not supported")
        return PQAttention(layer, codebook, codes, block_size)
    return PQLayer(layer, codebook, codes, block_size, mask=mask)


# ---- the packed file: a PQ layer is one "pq" entry, or a "sparse" one with PQ values -------

def _encode(m: PQLayer, name: str, opts: EncodeOptions) -> list:
    if m.mask is not None:
        p, data = encode_sparse_pq(m.mask, m.codebook, m.codes, opts.codebook_of(name), opts.entropy)
        return [(f"{name}.weight", "sparse", p, data)]
    shape = m.weight_shape[::-1] if m.transposed else m.weight_shape
    p, data = encode_pq(m.codebook, m.codes, shape, opts.codebook_of(name), opts.entropy, transposed=m.transposed)
    return [(f"{name}.weight", "pq", p, data)]


def _encode_attention(m: PQAttention, name: str, opts: EncodeOptions) -> list:
    p, data = encode_pq(m.codebook, m.codes, m.weight_shape, opts.codebook_of(name), opts.entropy)
    return [(f"{name}.in_proj_weight", "pq", p, data)]


def _rebuild(layer: nn.Module, parts: dict) -> tuple[PQLayer | PQAttention, dict]:
    pq = make_pq(layer, parts["codebook"], parts["codes"], parts["d"], mask=parts["mask"])
    state = {"codebook": parts["codebook"], "codes": parts["codes"]}
    if parts["mask"] is not None:
        state["mask"] = parts["mask"]
    return pq, state


register_layer_codec(PQAttention, state_keys=("codebook", "codes"), encode=_encode_attention, kind="pq", rebuild=_rebuild)
register_layer_codec(PQLayer, state_keys=("codebook", "codes", "mask"), encode=_encode, kind="pq", rebuild=_rebuild)
