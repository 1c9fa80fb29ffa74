"""Models <-> entries: encode a (partly) compressed model's state, size it, write it, and
rebuild the nn.Module from a packed file. Compressed layer types are handled through the
codec registry (codecs.py), which the methods fill."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..walk import set_module
from .arch import arch_spec, build_arch, check_against_architecture, check_packable, check_state, is_custom
from .codecs import EncodeOptions, LayerCodec, codec_for, rebuild_codec
from .container import EXTRA, Packed, addend_of, file_chunks, read_packed, without_addends, write_packed
from .entries import Decoded, decode_entry, encode_dense, encode_sparse
from .errors import PackedFormatError

__all__ = ["arch_spec", "build_from_packed", "dense_or_sparse", "extra_tensors", "load_packed", "model_entries", "pack_model",
           "packed_nbytes"]


def model_entries(model: nn.Module, float_dtype: str = "f16", codebook_dtype: str = "f16",
                  entropy: bool = True, layer_codebooks: dict[str, str] | None = None) -> list[tuple[str, str, dict, bytes]]:
    """Encode a (partly) compressed model's state: each registered layer type (PQ layers as
    codes + codebook, uniform layers as affine codes, ...) by its codec, the rest dense in
    ``float_dtype``. Integer buffers (BatchNorm's batch counter) are not stored.
    An integer ``codebook_dtype`` (i8, ...) applies to PQ codebooks; uniform layers' scales then stay f16.
    ``entropy``: range-code each layer's codes where that makes it smaller (lossless).
    ``layer_codebooks``: {layer name: codebook storage} for layers stored otherwise than
    ``codebook_dtype`` (what a byte budget chose per layer).
    A coded layer inside another (the parts of a layer whose weight is a sum) is written by the
    outermost one's codec, not a second time."""
    opts = EncodeOptions(float_dtype, codebook_dtype, entropy, layer_codebooks)
    coded = {n: (m, c) for n, m in model.named_modules() if (c := codec_for(m)) is not None}
    done: set[str] = set()
    entries = []
    for key, t in model.state_dict().items():
        mod = _owner(key, coded)
        if mod is not None:
            if mod not in done:  # the layer's entries go where its first own tensor is
                done.add(mod)
                m, codec = coded[mod]
                entries.extend(codec.encode(m, mod, opts))
            continue
        if not t.is_floating_point():
            continue
        entries.append((key, *dense_or_sparse(t, float_dtype)))
    return entries


def _owner(key: str, coded: dict[str, tuple[nn.Module, LayerCodec]]) -> str | None:
    """The outermost coded module whose codec writes the state tensor ``key`` (the first name
    of the rest of the key is one of its state_keys), or None."""
    names = key.split(".")
    for i in range(len(names)):
        mod = ".".join(names[:i])
        if mod in coded and names[i] in coded[mod][1].state_keys:
            return mod
    return None


def dense_or_sparse(t: torch.Tensor, dtype: str) -> tuple[str, dict, bytes]:
    """A weight matrix with enough zeros (a pruned layer) is smaller as positions + values."""
    p, data = encode_dense(t, dtype)
    if t.dim() >= 2 and (t == 0).float().mean() > 0.05:
        sp, sdata = encode_sparse(t, dtype)
        if len(sdata) < len(data):
            return "sparse", sp, sdata
    return "dense", p, data


def packed_nbytes(model: nn.Module, float_dtype: str = "f16", codebook_dtype: str = "f16", arch: dict | None = None,
                  meta: dict | None = None, entropy: bool = True, layer_codebooks: dict[str, str] | None = None) -> int:
    """The size in bytes of the file ``pack_model`` would write, without writing it."""
    chunks = file_chunks(arch or {"name": type(model).__name__}, meta or {},
                         model_entries(model, float_dtype, codebook_dtype, entropy, layer_codebooks))
    return sum(len(c) for c in chunks)


def pack_model(
    model: nn.Module, path: str | Path, arch: dict, meta: dict | None = None,
    float_dtype: str = "f16", codebook_dtype: str = "f16", entropy: bool = True, extra: dict[str, torch.Tensor] | None = None,
    layer_codebooks: dict[str, str] | None = None,
) -> int:
    """Write ``model`` to ``path``; returns the file's size in bytes. ``entropy=False`` keeps
    every code array bit-packed (by default each is range coded where that is smaller).
    ``extra``: tensors that are not the model's (a method's state beside a checkpoint), stored
    exactly (f32) and read back with :func:`extra_tensors`. ``layer_codebooks``: {layer name:
    codebook storage} where a layer's differs from ``codebook_dtype``.

    ``arch`` (:func:`arch_spec`) must rebuild a module with exactly the model's tensors (checked
    here, on the meta device: a ValueError otherwise, nothing written), or name the user's own
    class as ``custom:<name>``, loaded with ``load_packed(path, skeleton=...)``."""
    entries = model_entries(model, float_dtype, codebook_dtype, entropy, layer_codebooks)
    check_packable(arch, without_addends([(name, p["shape"]) for name, _, p, _ in entries]))
    for name, t in (extra or {}).items():
        entries.append((EXTRA + name, "dense", *encode_dense(t.detach().float().cpu(), "f32")))
    return write_packed(path, arch, meta or {}, entries)


def extra_tensors(packed: Packed) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors :func:`pack_model` stored beside the model."""
    out = {}
    for name, enc, p, buf in packed.entries:
        if name.startswith(EXTRA):
            if enc != "dense":
                raise PackedFormatError(f"tensor {name!r}: extra tensors are dense, not {enc}")
            out[name[len(EXTRA):]] = decode_entry(name, enc, p, buf).weight()
    return out


def build_from_packed(packed: Packed, materialize: bool = True, skeleton: nn.Module | None = None) -> nn.Module:
    """Rebuild the nn.Module. ``materialize=True`` decodes compressed weights into ordinary
    dense layers (fastest inference); ``False`` keeps the compressed layer types (PQLayers
    with trainable codebooks, ...), as registered in codecs.py. A weight stored as a sum of
    parts (``<name>`` and its addends ``<name>+1``, ...) is their sum, or with ``False`` the
    layer type registered for kind "additive", rebuilt from the decoded parts.

    The file's tensors are checked against the architecture (built on the meta device, its
    arguments bounded) before the model is built or anything decoded. ``skeleton``: a module of
    the architecture (its weights do not matter) to load the file into, in place, instead of
    building one by name: required for a ``custom:`` architecture (the user's own class)."""
    shapes = without_addends([(n, p["shape"]) for n, _, p, _ in packed.model_entries()])
    if skeleton is not None:
        check_state(packed.arch["name"], skeleton.state_dict(), shapes)
        model = skeleton
    elif is_custom(packed.arch):
        raise PackedFormatError(f"architecture {packed.arch['name']!r} is a class of the user's own: load the file into "
                                f"an instance of it, load_packed(path, skeleton=<model>)")
    else:
        check_against_architecture(packed.arch, shapes)
        model = build_arch(packed.arch)
    parts: dict[str, dict[int, tuple[str, Decoded]]] = {}  # tensor -> {0: its own entry, i: its i-th addend}
    for name, enc, p, buf in packed.model_entries():
        dec = decode_entry(name, enc, p, buf)
        if dec.kind == "affine":
            codes = dec.parts["codes"]
            if codes.numel() and int(codes.max()) >= 2 ** p["bits"]:
                raise PackedFormatError(f"tensor {name!r} ({enc}): corrupted codes: beyond the number of levels")
        base, i = addend_of(name) or (name, 0)
        parts.setdefault(base, {})[i] = (enc, dec)
    state: dict[str, torch.Tensor] = {}
    for name, by_index in parts.items():
        encs = " + ".join(by_index[i][0] for i in sorted(by_index))
        decoded = [by_index[i][1] for i in sorted(by_index)]
        if materialize or (len(decoded) == 1 and decoded[0].kind == "dense"):
            weights = [d.weight() for d in decoded]
            state[name] = sum(weights[1:], weights[0])  # added in order, as a layer whose weight is a sum adds them
            continue
        mod = name.rpartition(".")[0]
        if len(decoded) == 1:
            codec, what = rebuild_codec(decoded[0].kind), decoded[0].parts
        else:
            codec, what = rebuild_codec("additive"), {"parts": decoded}
        try:
            layer, own = codec.rebuild(model.get_submodule(mod), what)
        except (ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise PackedFormatError(f"tensor {name!r} ({encs}): cannot rebuild its layer: {e}") from None
        set_module(model, mod, layer)
        state.update({f"{mod}.{k}": v for k, v in own.items()})
    check_state(packed.arch["name"], model.state_dict(), [(k, list(t.shape)) for k, t in state.items()])
    model.load_state_dict(state, strict=False)
    return model.eval()


def decoded_tensors(packed: Packed) -> dict[str, torch.Tensor]:
    """Every tensor of the file as the loaded model holds it (addends summed), without building
    the model: what ``modelpress inspect`` reads, a ``custom:`` architecture's file included.
    A named architecture's shapes are checked first, as :func:`build_from_packed` checks them."""
    if not is_custom(packed.arch):
        check_against_architecture(packed.arch, without_addends([(n, p["shape"]) for n, _, p, _ in packed.model_entries()]))
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, enc, p, buf in packed.model_entries():
        base, i = addend_of(name) or (name, 0)
        parts.setdefault(base, {})[i] = decode_entry(name, enc, p, buf).weight()
    out = {}
    for name, by_index in parts.items():
        weights = [by_index[i] for i in sorted(by_index)]
        out[name] = sum(weights[1:], weights[0])
    return out


def load_packed(path: str | Path, materialize: bool = True, skeleton: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a packed file: returns (model in eval mode, metadata). ``skeleton``: see
    :func:`build_from_packed` (a file packed as ``custom:<name>`` needs one)."""
    packed = read_packed(path)
    return build_from_packed(packed, materialize, skeleton), packed.meta
