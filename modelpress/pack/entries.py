"""Tensor codecs of the packed file: one entry ``(name, encoding, params, data)`` per tensor.

``params["n"]`` is always the entry's byte count in the payload. Encodings:

- ``dense``: raw values, ``dtype`` f32/f16, ``shape``.
- ``pq``: a codebook (``k`` x ``d``, dtype ``cb``: f32/f16 raw or an integer codebook
  i8/i6/i5/i4, see codebook.py) then the codes, ``bits`` bits each (LSB first); the weight is
  ``codebook[codes].reshape(shape)``.
- ``sparse``: a weight with ``count`` non-zeros (a pruned layer). First their positions
  (``pos_n`` bytes), then their values in row-major order. Positions are whichever is smaller
  for the layer: ``bitmask`` (one bit per weight) or ``delta``: ``tokens`` gap codes of
  ``pos_bits`` bits, where a code t < E = 2**pos_bits - 1 means "skip t zeros, then a
  non-zero" and E means "skip E zeros" (long gaps). Values are ``values`` = ``f16``/``f32``
  raw, or ``pq``: a codebook (``k`` x ``d``, ``cb``) and ``bits``-bit codes over the values
  cut into sub-vectors of ``d`` (the last one zero-padded).
- ``lowrank``: a weight of ``shape`` (out, ...) as the product of two factors of ``rank``:
  U (out x rank) then V (rank x the product of the other sizes), raw ``dtype`` f32/f16; the
  weight is ``(U @ V).reshape(shape)`` (a Conv2d's V is itself a convolution: two layers).
- ``affine``: per-output-channel uniform quantization: ``scale`` then ``offset`` (one value
  per output channel each, dtype ``cb``) then ``bits``-bit codes, one per weight; the weight
  is ``offset[c] + code * scale[c]``.

Codes (of ``pq``, ``sparse`` with PQ values and ``affine``) are bit-packed, or, where that is
smaller for the entry, entropy coded (``coder: "range"``): the code histogram (``k`` counts as
LEB128 varints, ``hist_n`` bytes) then the output of ``constriction``'s range coder (a
sequence of little-endian 32-bit words) with the categorical model of those counts
(``perfect=False``), so the loader rebuilds the same model and decodes the same codes (bits.py).

Each encoding has ONE size function (``dense_nbytes``, ``pq_nbytes``, ``affine_nbytes``,
``sparse_nbytes``): the writer's layout, the reader's checks and the PQ byte budget all use it.
:func:`check_entry` validates an entry's params (types, bounds, ``n`` equal to the bytes the
encoding needs) before anything is decoded: an entry decodes to at most MAX_ENTRY_ELEMENTS
values, and beyond FREE_ELEMENTS to at most MAX_RATIO values per byte it holds.
:func:`decode_entry` decodes a checked entry, every failure a PackedFormatError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bits import MAX_CODE_BITS, decode_codes, encode_codes, pack_bits, packed_nbytes, unpack_bits
from .codebook import (
    CODEBOOK_DTYPES,
    FLOAT_DTYPES,
    code_bits,
    codebook_nbytes,
    decode_codebook,
    decode_float,
    encode_codebook,
    encode_float,
    float_nbytes,
    is_int_codebook,
)
from .errors import PackedFormatError

ENCODINGS = ("dense", "pq", "sparse", "affine", "lowrank")
MAX_ENTRY_ELEMENTS = 2 ** 28  # most values one entry may decode to
FREE_ELEMENTS = 2 ** 22  # an entry may always decode to this many values ...
MAX_RATIO = 1024  # ... and beyond that to at most this many values per byte it holds
MAX_DIMS = 8
MAX_POS_BITS = 24


# ---- sizes: one function per encoding ------------------------------------------------------

def dense_nbytes(numel: int, dtype: str) -> int:
    return float_nbytes(numel, dtype)


def pq_nbytes(k: int, d: int, count: int, cb: str) -> int:
    """A (k, d) codebook stored as ``cb`` and ``count`` bit-packed codes."""
    return codebook_nbytes(k, d, cb) + packed_nbytes(count, code_bits(k))


def lowrank_nbytes(out: int, rest: int, rank: int, dtype: str) -> int:
    return float_nbytes((out + rest) * rank, dtype)


def affine_nbytes(out: int, numel: int, bits: int, cb: str) -> int:
    """Scales and offsets of ``out`` channels and ``numel`` bit-packed ``bits``-bit codes."""
    return 2 * float_nbytes(out, cb) + packed_nbytes(numel, bits)


def sparse_nbytes(pos_n: int, count: int, values: str, k: int = 0, d: int = 1, cb: str = "f16") -> int:
    """Positions, then ``count`` raw values, or (``values="pq"``) their codebook and bit-packed codes."""
    if values == "pq":
        return pos_n + pq_nbytes(k, d, -(-count // d), cb)
    return pos_n + float_nbytes(count, values)


def _expect_bytes(buf: bytes, expected: int) -> None:
    if len(buf) != expected:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes where its shape needs {expected}")


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


# ---- dense --------------------------------------------------------------------------------

def encode_dense(t: torch.Tensor, dtype: str) -> tuple[dict, bytes]:
    data = encode_float(t, dtype)
    return {"dtype": dtype, "shape": list(t.shape), "n": len(data)}, data


def decode_dense(p: dict, buf: bytes) -> torch.Tensor:
    _expect_bytes(buf, dense_nbytes(_numel(p["shape"]), p["dtype"]))
    return torch.from_numpy(decode_float(buf, p["dtype"]).reshape(p["shape"]))


# ---- lowrank ------------------------------------------------------------------------------

def encode_lowrank(u: torch.Tensor, v: torch.Tensor, shape: tuple, dtype: str) -> tuple[dict, bytes]:
    """Factors U (out, r) and V (r, rest) of a weight of ``shape``, raw floats."""
    out, rank = u.shape
    if tuple(v.shape) != (rank, _numel(shape[1:])) or out != shape[0]:
        raise ValueError(f"factors {tuple(u.shape)} x {tuple(v.shape)} do not make a weight of shape {tuple(shape)}")
    data = encode_float(u, dtype) + encode_float(v, dtype)
    return {"shape": list(shape), "rank": int(rank), "dtype": dtype, "n": len(data)}, data


def decode_lowrank(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    out, rank = p["shape"][0], p["rank"]
    rest = _numel(p["shape"][1:])
    _expect_bytes(buf, lowrank_nbytes(out, rest, rank, p["dtype"]))
    split = float_nbytes(out * rank, p["dtype"])
    u = torch.from_numpy(decode_float(buf[:split], p["dtype"]).reshape(out, rank))
    v = torch.from_numpy(decode_float(buf[split:], p["dtype"]).reshape(rank, rest))
    return u, v


# ---- pq -----------------------------------------------------------------------------------

def encode_pq(codebook: torch.Tensor, codes: torch.Tensor, shape: tuple, cb_dtype: str,
              entropy: bool = True, transposed: bool = False) -> tuple[dict, bytes]:
    """``transposed``: ``shape`` is (in, out) and the codes cover the (out, in) transpose (a
    Hugging Face Conv1D's weight); the entry then has ``"t": 1``."""
    k, d = codebook.shape
    bits = code_bits(k)
    cp, coded = encode_codes(codes.detach().cpu().numpy(), k, bits, entropy)
    data = encode_codebook(codebook, cb_dtype) + coded
    t = {"t": 1} if transposed else {}
    return {"shape": list(shape), "d": d, "k": k, "bits": bits, "cb": cb_dtype, **t, **cp, "n": len(data)}, data


def decode_pq(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (k, d) float32, codes (n,) int64)."""
    k, d = p["k"], p["d"]
    count = _numel(p["shape"]) // d
    codebook = decode_codebook(buf, k, d, p["cb"])
    return codebook, torch.from_numpy(decode_codes(p, buf[codebook_nbytes(k, d, p["cb"]):], k, count))


# ---- affine -------------------------------------------------------------------------------

def affine_scale_dtype(codebook_dtype: str) -> str:
    """The dtype of uniform layers' scales and offsets for a file's ``codebook_dtype`` (an
    integer codebook dtype leaves them f16)."""
    return "f16" if is_int_codebook(codebook_dtype) else codebook_dtype


def encode_affine(scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor, bits: int, shape: tuple,
                  dtype: str, entropy: bool = True) -> tuple[dict, bytes]:
    head = encode_float(scale, dtype) + encode_float(offset, dtype)
    cp, coded = encode_codes(codes.detach().cpu().reshape(-1).numpy(), 2 ** bits, bits, entropy)
    data = head + coded
    return {"shape": list(shape), "bits": bits, "cb": dtype, **cp, "n": len(data)}, data


def decode_affine(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale (out,), offset (out,), codes (out, rest) int64)."""
    out, numel = p["shape"][0], _numel(p["shape"])
    head = float_nbytes(out, p["cb"])
    if len(buf) < 2 * head:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes, shorter than its scales")
    scale, offset = (torch.from_numpy(decode_float(buf[i * head:(i + 1) * head], p["cb"])) for i in (0, 1))
    codes = torch.from_numpy(decode_codes(p, buf[2 * head:], 2 ** p["bits"], numel)).reshape(out, -1)
    return scale, offset, codes


def affine_weight(p: dict, scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (offset[:, None] + codes * scale[:, None]).reshape(p["shape"])


# ---- sparse: positions + values -----------------------------------------------------------

def encode_positions(mask: np.ndarray) -> tuple[dict, bytes]:
    """Positions of the True entries of a flat bool mask, as a bitmask or as gap codes,
    whichever takes fewer bytes."""
    mask = np.asarray(mask, bool).reshape(-1)
    best = ({"pos": "bitmask"}, np.packbits(mask, bitorder="little").tobytes())
    idx = np.flatnonzero(mask)
    gaps = np.diff(np.concatenate([[-1], idx])) - 1  # zeros skipped before each kept weight
    for bits in range(1, MAX_POS_BITS + 1):
        esc = (1 << bits) - 1
        tokens = len(gaps) + int((gaps // esc).sum())
        if packed_nbytes(tokens, bits) < len(best[1]):
            extra = gaps // esc
            codes = np.full(tokens, esc, dtype=np.int64)
            codes[np.cumsum(extra + 1) - 1] = gaps % esc
            best = ({"pos": "delta", "pos_bits": bits, "tokens": tokens}, pack_bits(codes, bits))
    p, data = best
    return {**p, "pos_n": len(data)}, data


def decode_positions(p: dict, buf: bytes, numel: int, count: int) -> np.ndarray:
    """Flat indices of the kept weights (sorted)."""
    if p["pos"] == "bitmask":
        _expect_bytes(buf, packed_nbytes(numel, 1))
        idx = np.flatnonzero(np.unpackbits(np.frombuffer(buf, np.uint8), count=numel, bitorder="little"))
    elif p["pos"] == "delta":
        bits, esc = p["pos_bits"], (1 << p["pos_bits"]) - 1
        _expect_bytes(buf, packed_nbytes(p["tokens"], bits))
        codes = unpack_bits(buf, bits, p["tokens"])
        idx = np.cumsum(np.where(codes == esc, esc, codes + 1))[codes != esc] - 1
    else:
        raise PackedFormatError(f"unknown position coding {p['pos']!r}")
    if len(idx) != count or (count and (idx[-1] >= numel or idx[0] < 0)):
        raise PackedFormatError("corrupted sparse positions")
    return idx


def _sparse_header(shape: tuple, mask: np.ndarray) -> tuple[dict, bytes]:
    pos_p, pos = encode_positions(mask)
    return {"shape": list(shape), "count": int(mask.sum()), **pos_p}, pos


def encode_sparse(t: torch.Tensor, dtype: str) -> tuple[dict, bytes]:
    """A dense tensor with zeros, stored as positions + raw values of the non-zeros."""
    flat = t.detach().cpu().float().reshape(-1).numpy()
    p, pos = _sparse_header(tuple(t.shape), flat != 0)
    values = flat[flat != 0].astype(FLOAT_DTYPES[dtype]).tobytes()
    return {**p, "values": dtype, "n": len(pos) + len(values)}, pos + values


def encode_sparse_pq(mask: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, cb_dtype: str,
                     entropy: bool = True) -> tuple[dict, bytes]:
    """A sparse PQ layer: positions, then the codebook and codes of its kept values."""
    p, pos = _sparse_header(tuple(mask.shape), mask.detach().cpu().numpy().reshape(-1))
    k, d = codebook.shape
    bits = code_bits(k)
    cp, coded = encode_codes(codes.detach().cpu().numpy(), k, bits, entropy)
    data = pos + encode_codebook(codebook, cb_dtype) + coded
    return {**p, "values": "pq", "d": d, "k": k, "bits": bits, "cb": cb_dtype, **cp, "n": len(data)}, data


def decode_sparse(p: dict, buf: bytes) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(mask (bool, shape), (codebook, codes) for PQ values or None) and the dense weight is
    rebuilt by :func:`sparse_weight`. Raw values come back as the dense weight directly."""
    numel, count = _numel(p["shape"]), p["count"]
    if len(buf) < p["pos_n"]:
        raise PackedFormatError("corrupted entry: shorter than its positions")
    if p["values"] != "pq" and p["values"] not in FLOAT_DTYPES:
        raise PackedFormatError(f"unknown value storage {p['values']!r}")
    idx = decode_positions(p, buf[:p["pos_n"]], numel, count)
    rest = buf[p["pos_n"]:]
    if p["values"] == "pq":
        mask = np.zeros(numel, bool)
        mask[idx] = True
        mask_t = torch.from_numpy(mask.reshape(p["shape"]))
        k, d = p["k"], p["d"]
        n_codes = -(-count // d)
        codebook = decode_codebook(rest, k, d, p["cb"])
        return mask_t, (codebook, torch.from_numpy(decode_codes(p, rest[codebook_nbytes(k, d, p["cb"]):], k, n_codes)))
    _expect_bytes(rest, float_nbytes(count, p["values"]))
    weight = np.zeros(numel, np.float32)
    weight[idx] = decode_float(rest, p["values"])
    return torch.from_numpy(weight.reshape(p["shape"])), None


def sparse_weight(mask: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    kept = codebook[codes].reshape(-1)[: int(mask.sum())]
    return torch.zeros(mask.shape).masked_scatter(mask, kept)


# ---- validation of params, before decoding ------------------------------------------------

_KEYS = {
    "dense": ({"dtype", "shape", "n"}, set()),
    "pq": ({"shape", "d", "k", "bits", "cb", "n"}, {"coder", "hist_n", "t"}),
    "affine": ({"shape", "bits", "cb", "n"}, {"coder", "hist_n"}),
    "lowrank": ({"shape", "rank", "dtype", "n"}, set()),
    "sparse": ({"shape", "count", "pos", "pos_n", "values", "n"}, {"pos_bits", "tokens", "d", "k", "bits", "cb", "coder", "hist_n"}),
}


def _int(p: dict, key: str, lo: int, hi: int) -> int:
    v = p.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise PackedFormatError(f"{key}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def _choice(p: dict, key: str, allowed) -> str:
    v = p.get(key)
    if type(v) is not str or v not in allowed:
        raise PackedFormatError(f"{key}={v!r} is not one of {', '.join(allowed)}")
    return v


def _check_codes(p: dict, nbytes: int, k: int, count: int) -> None:
    """``nbytes`` left for ``count`` codes in [0, k), bit-packed or range coded."""
    if "coder" not in p:
        if "hist_n" in p:
            raise PackedFormatError("hist_n without a coder")
        need = packed_nbytes(count, p["bits"])
        if nbytes != need:
            raise PackedFormatError(f"n={p['n']} bytes, where its codes need {need - nbytes:+d} more")
        return
    _choice(p, "coder", ("range",))
    if k < 2 or count < 1:
        raise PackedFormatError("range-coded codes need k >= 2 and at least one code")
    hist_n = _int(p, "hist_n", k, 5 * k)
    if nbytes < hist_n or (nbytes - hist_n) % 4:
        raise PackedFormatError(f"n={p['n']} does not hold a {hist_n}-byte histogram and whole 32-bit words")


def check_entry(enc: str, p: dict) -> int:
    """Validate an entry's params for its encoding (types, bounds, ``n`` equal to the bytes the
    encoding needs) and return the number of values it decodes to. Raises PackedFormatError."""
    if enc not in _KEYS:
        raise PackedFormatError(f"unknown encoding {enc!r}")
    if not isinstance(p, dict):
        raise PackedFormatError("params are not an object")
    required, optional = _KEYS[enc]
    if missing := required - set(p):
        raise PackedFormatError(f"{enc} entry without {', '.join(sorted(missing))}")
    if extra := set(p) - required - optional:
        raise PackedFormatError(f"{enc} entry with unknown fields {', '.join(sorted(extra))}")
    shape = p["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or any(type(s) is not int or not 0 <= s <= MAX_ENTRY_ELEMENTS for s in shape)):
        raise PackedFormatError(f"shape {shape!r} is not a list of at most {MAX_DIMS} sizes")
    numel = 1
    for s in shape:
        numel *= s
    n = _int(p, "n", 0, 2 ** 62)
    if numel > MAX_ENTRY_ELEMENTS or numel > max(FREE_ELEMENTS, MAX_RATIO * n):
        raise PackedFormatError(f"shape {shape} ({numel} values) is beyond the bounds for {n} bytes")
    if enc == "dense":
        dtype = _choice(p, "dtype", tuple(FLOAT_DTYPES))
        if n != dense_nbytes(numel, dtype):
            raise PackedFormatError(f"n={n} bytes where its shape needs {dense_nbytes(numel, dtype)}")
    elif enc == "pq":
        d = _int(p, "d", 1, max(1, numel))
        k = _int(p, "k", 1, 2 ** MAX_CODE_BITS)
        _int(p, "bits", code_bits(k), code_bits(k))
        cb = _choice(p, "cb", CODEBOOK_DTYPES)
        if "t" in p:
            _int(p, "t", 1, 1)
            if len(shape) != 2:
                raise PackedFormatError(f"a transposed (t=1) pq entry of shape {shape}, not a matrix")
        if numel % d or k * d > MAX_ENTRY_ELEMENTS:
            raise PackedFormatError(f"block d={d} does not divide the shape's {numel} values, or k*d is too large")
        head = codebook_nbytes(k, d, cb)
        if n < head:
            raise PackedFormatError(f"n={n} bytes, shorter than its codebook ({head})")
        _check_codes(p, n - head, k, numel // d)
    elif enc == "lowrank":
        if len(shape) < 2 or numel == 0:
            raise PackedFormatError(f"lowrank shape {shape} is not a non-empty matrix or kernel")
        rest = numel // shape[0]
        rank = _int(p, "rank", 1, min(shape[0], rest))
        dtype = _choice(p, "dtype", tuple(FLOAT_DTYPES))
        if n != lowrank_nbytes(shape[0], rest, rank, dtype):
            raise PackedFormatError(f"n={n} bytes where rank {rank} factors need {lowrank_nbytes(shape[0], rest, rank, dtype)}")
    elif enc == "affine":
        if not shape or shape[0] < 1:
            raise PackedFormatError(f"affine shape {shape} has no output channel")
        bits = _int(p, "bits", 1, MAX_CODE_BITS)
        cb = _choice(p, "cb", tuple(FLOAT_DTYPES))
        head = 2 * float_nbytes(shape[0], cb)
        if n < head:
            raise PackedFormatError(f"n={n} bytes, shorter than its scales ({head})")
        _check_codes(p, n - head, 2 ** bits, numel)
    else:
        count = _int(p, "count", 0, numel)
        pos_n = _int(p, "pos_n", 0, n)
        if _choice(p, "pos", ("bitmask", "delta")) == "bitmask":
            if "pos_bits" in p or "tokens" in p:
                raise PackedFormatError("a bitmask with delta fields")
            need = packed_nbytes(numel, 1)
        else:
            bits = _int(p, "pos_bits", 1, MAX_POS_BITS)
            tokens = _int(p, "tokens", count, count + (numel - count) // ((1 << bits) - 1))
            need = packed_nbytes(tokens, bits)
        if pos_n != need:
            raise PackedFormatError(f"pos_n={pos_n} bytes where its positions need {need}")
        values = _choice(p, "values", (*FLOAT_DTYPES, "pq"))
        pq_keys = {"d", "k", "bits", "cb", "coder", "hist_n"} & set(p)
        if values != "pq":
            if pq_keys:
                raise PackedFormatError(f"raw values with PQ fields {', '.join(sorted(pq_keys))}")
            if n != sparse_nbytes(pos_n, count, values):
                raise PackedFormatError(f"n={n} bytes where its positions and values need {sparse_nbytes(pos_n, count, values)}")
        else:
            d = _int(p, "d", 1, max(1, count))
            k = _int(p, "k", 1, 2 ** MAX_CODE_BITS)
            _int(p, "bits", code_bits(k), code_bits(k))
            cb = _choice(p, "cb", CODEBOOK_DTYPES)
            if k * d > MAX_ENTRY_ELEMENTS:
                raise PackedFormatError(f"codebook k*d={k * d} is too large")
            head = pos_n + codebook_nbytes(k, d, cb)
            if n < head:
                raise PackedFormatError(f"n={n} bytes, shorter than its positions and codebook ({head})")
            _check_codes(p, n - head, k, -(-count // d))
    return numel


# ---- decoding a checked entry --------------------------------------------------------------

@dataclass
class Decoded:
    """A decoded entry: ``kind`` "dense" (``weight``), "lowrank" (``u``, ``v``), "pq" (``codebook``, ``codes``, ``mask``
    or None, ``d``) or "affine" (``scale``, ``offset``, ``codes``, ``bits``)."""

    kind: str
    shape: tuple
    parts: dict

    def weight(self) -> torch.Tensor:
        q = self.parts
        if self.kind == "dense":
            return q["weight"]
        if self.kind == "lowrank":
            return (q["u"] @ q["v"]).reshape(self.shape)
        if self.kind == "affine":
            return affine_weight({"shape": list(self.shape)}, q["scale"], q["offset"], q["codes"])
        if q["mask"] is None and q.get("t"):
            return q["codebook"][q["codes"]].reshape(self.shape[1], self.shape[0]).T.contiguous()
        if q["mask"] is None:
            return q["codebook"][q["codes"]].reshape(self.shape)
        return sparse_weight(q["mask"], q["codebook"], q["codes"])


def decode_entry(name: str, enc: str, p: dict, buf: bytes) -> Decoded:
    """Validate and decode one entry; any failure is a PackedFormatError naming it."""
    try:
        check_entry(enc, p)
        if len(buf) != p["n"]:
            raise PackedFormatError(f"{len(buf)} bytes in the payload where n={p['n']}")
        shape = tuple(p["shape"])
        if enc == "dense":
            return Decoded("dense", shape, {"weight": decode_dense(p, buf)})
        if enc == "affine":
            scale, offset, codes = decode_affine(p, buf)
            return Decoded("affine", shape, {"scale": scale, "offset": offset, "codes": codes, "bits": p["bits"]})
        if enc == "lowrank":
            u, v = decode_lowrank(p, buf)
            return Decoded("lowrank", shape, {"u": u, "v": v})
        if enc == "pq":
            codebook, codes = decode_pq(p, buf)
            return Decoded("pq", shape, {"codebook": codebook, "codes": codes, "mask": None, "d": p["d"], "t": p.get("t", 0)})
        weight, pq = decode_sparse(p, buf)
        if pq is None:
            return Decoded("dense", shape, {"weight": weight})
        return Decoded("pq", shape, {"codebook": pq[0], "codes": pq[1], "mask": weight, "d": p["d"]})
    except PackedFormatError as e:
        msg = str(e) if str(e).startswith(("corrupted", "unknown")) else f"corrupted entry: {e}"
        raise PackedFormatError(f"tensor {name!r} ({enc}): {msg}") from None
    except (ValueError, IndexError, TypeError, KeyError, OverflowError, RuntimeError) as e:  # a gap in check_entry
        raise PackedFormatError(f"tensor {name!r} ({enc}): corrupted entry ({type(e).__name__}: {e})") from None
