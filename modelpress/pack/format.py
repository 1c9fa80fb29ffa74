"""The packed file: one compact, pickle-free file per compressed model.

Layout (all integers little-endian)::

    8 bytes   magic  b"MPRESS01"  (format name + version)
    4 bytes   header length H
    H bytes   header: zlib-compressed UTF-8 JSON
    payload   tensor bytes, in the order the header lists them

The header names the architecture (looked up in ``modelpress.models``; nothing in the file is
ever executed), free-form metadata, the sha256 and length of the payload, and one entry per
tensor: ``[name, encoding, params]``. ``params["n"]`` is the entry's byte count in the
payload. Encodings:

- ``dense``: raw values, ``dtype`` f32/f16, ``shape``.
- ``pq``: a codebook (``k`` x ``d``, dtype ``cb``) then the codes, bit-packed with ``bits``
  bits each (LSB first); the weight is ``codebook[codes].reshape(shape)``. A codebook is
  ``f32``/``f16`` raw, or an integer codebook ``iB`` (B = 8, 6, 5 or 4 bits): ``d`` f16 column
  scales, then the ``k`` x ``d`` values q in [-(2^(B-1) - 1), 2^(B-1) - 1], the centroid being
  ``q * scale`` (symmetric, one scale per position in the sub-vector); ``i8`` stores q as int8,
  the others bit-pack q + 2^(B-1) - 1 with B bits each, like the codes.
- ``sparse``: a weight with ``count`` non-zeros (a pruned layer). First their positions
  (``pos_n`` bytes), then their values in row-major order. Positions are whichever is smaller
  for the layer: ``bitmask`` (one bit per weight) or ``delta``: ``tokens`` gap codes of
  ``pos_bits`` bits, where a code t < E = 2**pos_bits - 1 means "skip t zeros, then a
  non-zero" and E means "skip E zeros" (long gaps). Values are ``values`` = ``f16``/``f32``
  raw, or ``pq``: a codebook (``k`` x ``d``, ``cb``) and ``bits``-bit codes over the values
  cut into sub-vectors of ``d`` (the last one zero-padded).
- ``affine``: per-output-channel uniform quantization: ``scale`` then ``offset`` (one value
  per output channel each, dtype ``cb``) then ``bits``-bit codes, one per weight; the weight
  is ``offset[c] + code * scale[c]``.

Codes (of ``pq``, ``sparse`` with PQ values and ``affine``) are bit-packed, or, where that is
smaller for the entry, entropy coded (``coder: "range"``): the code histogram (``k`` counts as
LEB128 varints, ``hist_n`` bytes) then the output of ``constriction``'s range coder (0.5, a
sequence of little-endian 32-bit words) with the categorical model of those counts
(``perfect=False``), so the loader rebuilds the same model and decodes the same codes.

The size we report for a model is ``os.path.getsize`` of this file, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..atomic import atomic_write

MAGIC = b"MPRESS01"
_DTYPES = {"f32": np.float32, "f16": np.float16}
_INT_BITS = {"i8": 8, "i6": 6, "i5": 5, "i4": 4}  # integer codebooks: bits per value


class PackedFormatError(ValueError):
    """The file is not a valid packed model (wrong magic, truncated, corrupted, unknown parts)."""


# ---- bit packing of integer codes -------------------------------------------------------

def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative ints < 2**bits into ``ceil(len * bits / 8)`` bytes."""
    values = np.asarray(values)
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    if bits == 16:
        return values.astype("<u2").tobytes()
    v = values.astype(np.uint32)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return np.frombuffer(buf, np.uint8, count).astype(np.int64)
    if bits == 16:
        return np.frombuffer(buf, "<u2", count).astype(np.int64)
    planes = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


# ---- entropy coding of integer codes -------------------------------------------------------

def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits per byte, high bit set on every byte but a number's last."""
    out = bytearray()
    for v in np.asarray(values, np.int64).tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_varints(buf: bytes, count: int) -> np.ndarray:
    values, v, shift = [], 0, 0
    for byte in buf:
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(v)
            v, shift = 0, 0
    if len(values) != count or shift:
        raise PackedFormatError("corrupted entry: bad code histogram")
    return np.array(values, np.int64)


def _categorical(counts: np.ndarray):
    import constriction  # a compiled module: its parts are attributes, not importable submodules

    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def encode_codes(codes: np.ndarray, k: int, bits: int, entropy: bool = True) -> tuple[dict, bytes]:
    """Codes in [0, k): bit-packed with ``bits`` bits each, or range coded with their own
    histogram when that (histogram included) takes fewer bytes. Returns (params, data); the
    params are empty for bit-packing."""
    codes = np.asarray(codes, np.int64).reshape(-1)
    plain = pack_bits(codes, bits)
    if not entropy or codes.size == 0 or k < 2:
        return {}, plain
    import constriction

    counts = np.bincount(codes, minlength=k)
    hist = _varints(counts)
    if len(hist) >= len(plain):
        return {}, plain
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(codes.astype(np.int32), _categorical(counts))
    coded = hist + encoder.get_compressed().astype("<u4").tobytes()
    if len(coded) >= len(plain):
        return {}, plain
    return {"coder": "range", "hist_n": len(hist)}, coded


def decode_codes(p: dict, buf: bytes, k: int, count: int) -> np.ndarray:
    """Inverse of :func:`encode_codes` (``p`` holds ``bits`` and, if range coded, ``coder``
    and ``hist_n``)."""
    coder = p.get("coder")
    if coder is None:
        _expect_bytes(buf, -(-count * p["bits"] // 8))
        codes = unpack_bits(buf, p["bits"], count)
    elif coder == "range":
        import constriction

        counts = _read_varints(buf[:p["hist_n"]], k)
        words = buf[p["hist_n"]:]
        if int(counts.sum()) != count or len(words) % 4:
            raise PackedFormatError("corrupted entry: entropy-coded codes do not match their count")
        try:
            decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
            codes = np.asarray(decoder.decode(_categorical(counts), count), np.int64)
        except (ValueError, RuntimeError) as e:
            raise PackedFormatError(f"corrupted entry: entropy-coded codes do not decode ({e})") from None
        if not np.array_equal(np.bincount(codes, minlength=k)[:k], counts):
            raise PackedFormatError("corrupted entry: entropy-coded codes do not match their histogram")
    else:
        raise PackedFormatError(f"unknown code coder {coder!r}")
    if codes.size and int(codes.max()) >= k:
        raise PackedFormatError("corrupted codes: index beyond codebook")
    return codes


# ---- tensor encodings ---------------------------------------------------------------------

def encode_dense(t: torch.Tensor, dtype: str) -> tuple[dict, bytes]:
    data = t.detach().cpu().float().numpy().astype(_DTYPES[dtype]).tobytes()
    return {"dtype": dtype, "shape": list(t.shape), "n": len(data)}, data


def _expect_bytes(buf: bytes, expected: int) -> None:
    if len(buf) != expected:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes where its shape needs {expected}")


def decode_dense(p: dict, buf: bytes) -> torch.Tensor:
    _expect_bytes(buf, int(np.prod(p["shape"])) * np.dtype(_DTYPES[p["dtype"]]).itemsize)
    arr = np.frombuffer(buf, _DTYPES[p["dtype"]]).astype(np.float32)
    return torch.from_numpy(arr.reshape(p["shape"]).copy())


def codebook_nbytes(k: int, d: int, dtype: str) -> int:
    """Bytes of a (k, d) codebook stored as ``dtype`` (f32, f16, or i8/i6/i5/i4 with d f16 scales)."""
    if dtype in _INT_BITS:
        return -(-k * d * _INT_BITS[dtype] // 8) + 2 * d
    if dtype not in _DTYPES:
        raise PackedFormatError(f"unknown codebook dtype {dtype!r}")
    return k * d * np.dtype(_DTYPES[dtype]).itemsize


def _int_codebook(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (d,) float32, each exactly an f16 value; values (k, d) int64 in [-qmax, qmax]):
    symmetric, one scale per column. Runs on the codebook's device."""
    qmax = 2 ** (bits - 1) - 1
    c = c.detach().float()
    scale = (c.abs().amax(0) / qmax).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, (c / scale).round().clamp(-qmax, qmax).long()


def round_codebook(c: torch.Tensor, dtype: str) -> torch.Tensor:
    """The codebook as it will be stored (and loaded): rounding it first makes the model in
    memory and the model read from the file the same."""
    if dtype in _INT_BITS:
        scale, q = _int_codebook(c, _INT_BITS[dtype])
        return q.float() * scale
    return c.detach().half().float() if dtype == "f16" else c.detach().float()


def encode_codebook(c: torch.Tensor, dtype: str) -> bytes:
    if dtype in _INT_BITS:
        bits = _INT_BITS[dtype]
        scale, q = _int_codebook(c, bits)
        head = scale.cpu().numpy().astype(np.float16).tobytes()
        q = q.cpu().numpy().reshape(-1)
        return head + (q.astype(np.int8).tobytes() if bits == 8 else pack_bits(q + 2 ** (bits - 1) - 1, bits))
    return c.detach().cpu().float().numpy().astype(_DTYPES[dtype]).tobytes()


def decode_codebook(buf: bytes, k: int, d: int, dtype: str) -> torch.Tensor:
    """The (k, d) float32 codebook at the start of ``buf`` (which may go on with the codes)."""
    n = codebook_nbytes(k, d, dtype)
    if len(buf) < n:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes, shorter than its codebook")
    if dtype in _INT_BITS:
        bits = _INT_BITS[dtype]
        scale = np.frombuffer(buf[:2 * d], np.float16).astype(np.float32)
        if bits == 8:
            q = np.frombuffer(buf[2 * d:n], np.int8).astype(np.float32)
        else:
            q = unpack_bits(buf[2 * d:n], bits, k * d).astype(np.float32) - (2 ** (bits - 1) - 1)
        return torch.from_numpy(q.reshape(k, d) * scale)
    return torch.from_numpy(np.frombuffer(buf[:n], _DTYPES[dtype]).astype(np.float32).reshape(k, d).copy())


def encode_pq(codebook: torch.Tensor, codes: torch.Tensor, shape: tuple, cb_dtype: str,
              entropy: bool = True) -> tuple[dict, bytes]:
    k, d = codebook.shape
    bits = max(1, int(k - 1).bit_length())
    cp, coded = encode_codes(codes.detach().cpu().numpy(), k, bits, entropy)
    data = encode_codebook(codebook, cb_dtype) + coded
    return {"shape": list(shape), "d": d, "k": k, "bits": bits, "cb": cb_dtype, **cp, "n": len(data)}, data


def decode_pq(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (k, d) float32, codes (n,) int64)."""
    k, d = p["k"], p["d"]
    count = int(np.prod(p["shape"])) // d
    codebook = decode_codebook(buf, k, d, p["cb"])
    return codebook, torch.from_numpy(decode_codes(p, buf[codebook_nbytes(k, d, p["cb"]):], k, count))


def encode_affine(scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor, bits: int, shape: tuple,
                  dtype: str, entropy: bool = True) -> tuple[dict, bytes]:
    head = b"".join(t.detach().cpu().float().numpy().astype(_DTYPES[dtype]).tobytes() for t in (scale, offset))
    cp, coded = encode_codes(codes.detach().cpu().reshape(-1).numpy(), 2 ** bits, bits, entropy)
    data = head + coded
    return {"shape": list(shape), "bits": bits, "cb": dtype, **cp, "n": len(data)}, data


def decode_affine(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale (out,), offset (out,), codes (out, rest) int64)."""
    out, numel = p["shape"][0], int(np.prod(p["shape"]))
    head = out * np.dtype(_DTYPES[p["cb"]]).itemsize
    if len(buf) < 2 * head:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes, shorter than its scales")
    scale, offset = (torch.from_numpy(np.frombuffer(buf[i * head:(i + 1) * head], _DTYPES[p["cb"]]).astype(np.float32).copy())
                     for i in (0, 1))
    codes = torch.from_numpy(decode_codes(p, buf[2 * head:], 2 ** p["bits"], numel)).reshape(out, -1)
    return scale, offset, codes


def affine_weight(p: dict, scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (offset[:, None] + codes * scale[:, None]).reshape(p["shape"])


# ---- sparse weights: positions + values ----------------------------------------------------

def encode_positions(mask: np.ndarray) -> tuple[dict, bytes]:
    """Positions of the True entries of a flat bool mask, as a bitmask or as gap codes,
    whichever takes fewer bytes."""
    mask = np.asarray(mask, bool).reshape(-1)
    best = ({"pos": "bitmask"}, np.packbits(mask, bitorder="little").tobytes())
    idx = np.flatnonzero(mask)
    gaps = np.diff(np.concatenate([[-1], idx])) - 1  # zeros skipped before each kept weight
    for bits in range(1, 25):
        esc = (1 << bits) - 1
        tokens = len(gaps) + int((gaps // esc).sum())
        if -(-tokens * bits // 8) < len(best[1]):
            extra = gaps // esc
            codes = np.full(tokens, esc, dtype=np.int64)
            codes[np.cumsum(extra + 1) - 1] = gaps % esc
            best = ({"pos": "delta", "pos_bits": bits, "tokens": tokens}, pack_bits(codes, bits))
    p, data = best
    return {**p, "pos_n": len(data)}, data


def decode_positions(p: dict, buf: bytes, numel: int, count: int) -> np.ndarray:
    """Flat indices of the kept weights (sorted)."""
    if p["pos"] == "bitmask":
        _expect_bytes(buf, -(-numel // 8))
        idx = np.flatnonzero(np.unpackbits(np.frombuffer(buf, np.uint8), count=numel, bitorder="little"))
    elif p["pos"] == "delta":
        bits, esc = p["pos_bits"], (1 << p["pos_bits"]) - 1
        _expect_bytes(buf, -(-p["tokens"] * bits // 8))
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
    values = flat[flat != 0].astype(_DTYPES[dtype]).tobytes()
    return {**p, "values": dtype, "n": len(pos) + len(values)}, pos + values


def encode_sparse_pq(mask: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, cb_dtype: str,
                     entropy: bool = True) -> tuple[dict, bytes]:
    """A sparse PQ layer: positions, then the codebook and codes of its kept values."""
    p, pos = _sparse_header(tuple(mask.shape), mask.detach().cpu().numpy().reshape(-1))
    k, d = codebook.shape
    bits = max(1, int(k - 1).bit_length())
    cp, coded = encode_codes(codes.detach().cpu().numpy(), k, bits, entropy)
    data = pos + encode_codebook(codebook, cb_dtype) + coded
    return {**p, "values": "pq", "d": d, "k": k, "bits": bits, "cb": cb_dtype, **cp, "n": len(data)}, data


def decode_sparse(p: dict, buf: bytes) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(mask (bool, shape), (codebook, codes) for PQ values or None) and the dense weight is
    rebuilt by :func:`sparse_weight`. Raw values come back as the dense weight directly."""
    numel, count = int(np.prod(p["shape"])), p["count"]
    if len(buf) < p["pos_n"]:
        raise PackedFormatError("corrupted entry: shorter than its positions")
    idx = decode_positions(p, buf[:p["pos_n"]], numel, count)
    mask = np.zeros(numel, bool)
    mask[idx] = True
    mask_t = torch.from_numpy(mask.reshape(p["shape"]))
    rest = buf[p["pos_n"]:]
    if p["values"] == "pq":
        k, d = p["k"], p["d"]
        n_codes = -(-count // d)
        codebook = decode_codebook(rest, k, d, p["cb"])
        return mask_t, (codebook, torch.from_numpy(decode_codes(p, rest[codebook_nbytes(k, d, p["cb"]):], k, n_codes)))
    if p["values"] not in _DTYPES:
        raise PackedFormatError(f"unknown value storage {p['values']!r}")
    _expect_bytes(rest, count * np.dtype(_DTYPES[p["values"]]).itemsize)
    weight = np.zeros(numel, np.float32)
    weight[idx] = np.frombuffer(rest, _DTYPES[p["values"]]).astype(np.float32)
    return torch.from_numpy(weight.reshape(p["shape"])), None


def sparse_weight(mask: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    kept = codebook[codes].reshape(-1)[: int(mask.sum())]
    return torch.zeros(mask.shape).masked_scatter(mask, kept)


# ---- whole files --------------------------------------------------------------------------

@dataclass
class Packed:
    """A packed file read into memory: header fields and the raw bytes of each entry."""

    arch: dict
    meta: dict
    entries: list[tuple[str, str, dict, bytes]] = field(default_factory=list)
    size: int = 0

    def summary(self) -> list[dict]:
        """One row per tensor: name, encoding, bytes, shape, codebook (k x block) and code
        bits for PQ, storage dtype, and the sparsity (share of exact zeros) of weights."""
        rows = []
        for name, enc, p, buf in self.entries:
            row = {"tensor": name, "encoding": enc, "bytes": p["n"], "shape": "x".join(map(str, p["shape"]))}
            if enc == "pq":
                codebook, codes = decode_pq(p, buf)
                weight = codebook[codes]
                row.update(block=p["d"], k=p["k"], bits=p["bits"], codebook=p["cb"])
            elif enc == "affine":
                weight = affine_weight(p, *decode_affine(p, buf))
                row.update(bits=p["bits"], scales=p["cb"])
            elif enc == "sparse":
                weight, pq = decode_sparse(p, buf)
                if pq is not None:
                    weight = sparse_weight(weight, *pq)
                    row.update(block=p["d"], k=p["k"], bits=p["bits"], codebook=p["cb"])
                else:
                    row.update(dtype=p["values"])
                row.update(positions=p["pos"] + (f"/{p['pos_bits']}b" if p["pos"] == "delta" else ""))
            else:
                weight = decode_dense(p, buf)
                row.update(dtype=p["dtype"])
            if p.get("coder"):
                row["coder"] = p["coder"]
            if name.endswith(".weight") and len(p["shape"]) > 1:
                row["sparsity"] = round(float((weight == 0).float().mean()), 4)
            rows.append(row)
        return rows


def _file_chunks(arch: dict, meta: dict, entries: list[tuple[str, str, dict, bytes]]) -> list[bytes]:
    payload = b"".join(e[3] for e in entries)
    header = {
        "format": 1,
        "arch": arch,
        "meta": meta,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": [[n, enc, p] for n, enc, p, _ in entries],
    }
    blob = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return [MAGIC, struct.pack("<I", len(blob)), blob, payload]


def write_packed(path: str | Path, arch: dict, meta: dict, entries: list[tuple[str, str, dict, bytes]]) -> int:
    """Write entries ``(name, encoding, params, data)`` atomically; return the file size."""
    path = Path(path)
    atomic_write(path, _file_chunks(arch, meta, entries))
    return os.path.getsize(path)


def read_packed(path: str | Path) -> Packed:
    """Read and verify a packed file. Raises PackedFormatError naming what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackedFormatError(f"{path}: no such packed file") from None
    if raw[:8] != MAGIC:
        raise PackedFormatError(f"{path}: not a modelpress packed file (bad magic)")
    if len(raw) < 12:
        raise PackedFormatError(f"{path}: truncated (no header)")
    (hlen,) = struct.unpack("<I", raw[8:12])
    try:
        header = json.loads(zlib.decompress(raw[12:12 + hlen]))
    except (zlib.error, ValueError):
        raise PackedFormatError(f"{path}: corrupted or truncated header") from None
    if header.get("format") != 1:
        raise PackedFormatError(f"{path}: unsupported format version {header.get('format')!r}")
    payload = raw[12 + hlen:]
    if len(payload) != header["payload_bytes"]:
        raise PackedFormatError(f"{path}: truncated: payload has {len(payload)} bytes, header says {header['payload_bytes']}")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise PackedFormatError(f"{path}: checksum mismatch: the file is corrupted or was modified")
    packed, offset = Packed(header["arch"], header["meta"], size=len(raw)), 0
    for name, enc, p in header["tensors"]:
        if enc not in ("dense", "pq", "sparse", "affine"):
            raise PackedFormatError(f"{path}: unknown encoding {enc!r} for {name}")
        packed.entries.append((name, enc, p, payload[offset:offset + p["n"]]))
        offset += p["n"]
    return packed


# ---- models <-> entries -------------------------------------------------------------------

def model_entries(model: nn.Module, float_dtype: str = "f16", codebook_dtype: str = "f16",
                  entropy: bool = True) -> list[tuple[str, str, dict, bytes]]:
    """Encode a (partly) compressed model's state: PQ layers as codes + codebook, the rest
    dense in ``float_dtype``. Integer buffers (BatchNorm's batch counter) are not stored.
    An integer ``codebook_dtype`` (i8, ...) applies to PQ codebooks; uniform layers' scales then stay f16.
    ``entropy``: range-code each layer's codes where that makes it smaller (lossless)."""
    from ..methods.pq.layer import PQLayer
    from ..methods.uniform import UniformLayer

    pq_layers = {n: m for n, m in model.named_modules() if isinstance(m, PQLayer)}
    affine = {n: m for n, m in model.named_modules() if isinstance(m, UniformLayer)}
    affine_dtype = "f16" if codebook_dtype in _INT_BITS else codebook_dtype
    entries = []
    for key, t in model.state_dict().items():
        mod, _, attr = key.rpartition(".")
        if mod in affine and attr in ("scale", "offset", "codes"):
            if attr == "scale":
                m = affine[mod]
                entries.append((f"{mod}.weight", "affine", *encode_affine(m.scale, m.offset, m.codes, m.bits, m.weight_shape,
                                                                         affine_dtype, entropy)))
            continue
        if mod in pq_layers:
            if attr == "codebook":
                m = pq_layers[mod]
                if m.mask is not None:
                    p, data = encode_sparse_pq(m.mask, m.codebook, m.codes, codebook_dtype, entropy)
                    entries.append((f"{mod}.weight", "sparse", p, data))
                else:
                    p, data = encode_pq(m.codebook, m.codes, m.weight_shape, codebook_dtype, entropy)
                    entries.append((f"{mod}.weight", "pq", p, data))
                continue
            if attr in ("codes", "mask"):
                continue
        if not t.is_floating_point():
            continue
        entries.append((key, *_dense_or_sparse(t, float_dtype)))
    return entries


def _dense_or_sparse(t: torch.Tensor, dtype: str) -> tuple[str, dict, bytes]:
    """A weight matrix with enough zeros (a pruned layer) is smaller as positions + values."""
    p, data = encode_dense(t, dtype)
    if t.dim() >= 2 and (t == 0).float().mean() > 0.05:
        sp, sdata = encode_sparse(t, dtype)
        if len(sdata) < len(data):
            return "sparse", sp, sdata
    return "dense", p, data


def packed_nbytes(model: nn.Module, float_dtype: str = "f16", codebook_dtype: str = "f16", arch: dict | None = None,
                  meta: dict | None = None, entropy: bool = True) -> int:
    """The size in bytes of the file ``pack_model`` would write, without writing it."""
    chunks = _file_chunks(arch or {"name": type(model).__name__}, meta or {},
                          model_entries(model, float_dtype, codebook_dtype, entropy))
    return sum(len(c) for c in chunks)


def pack_model(
    model: nn.Module, path: str | Path, arch: dict, meta: dict | None = None,
    float_dtype: str = "f16", codebook_dtype: str = "f16", entropy: bool = True,
) -> int:
    """Write ``model`` to ``path``; returns the file's size in bytes. ``entropy=False`` keeps
    every code array bit-packed (by default each is range coded where that is smaller)."""
    return write_packed(path, arch, meta or {}, model_entries(model, float_dtype, codebook_dtype, entropy))


def build_from_packed(packed: Packed, materialize: bool = True) -> nn.Module:
    """Rebuild the nn.Module. ``materialize=True`` decodes PQ weights into ordinary dense
    layers (fastest inference); ``False`` keeps PQLayers with trainable codebooks."""
    from ..methods.pq.layer import PQLayer
    from ..methods.uniform import UniformLayer
    from ..models import UnknownModelError, build_model
    from ..walk import set_module

    try:
        model = build_model(packed.arch["name"], **packed.arch.get("kwargs", {}))
    except (UnknownModelError, TypeError) as e:
        raise PackedFormatError(f"cannot rebuild architecture: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for name, enc, p, buf in packed.entries:
        if enc == "dense":
            state[name] = decode_dense(p, buf)
            continue
        if enc == "affine":
            scale, offset, codes = decode_affine(p, buf)
            if codes.numel() and int(codes.max()) >= 2 ** p["bits"]:
                raise PackedFormatError("corrupted codes: beyond the number of levels")
            if materialize:
                state[name] = affine_weight(p, scale, offset, codes)
            else:
                mod = name.rpartition(".")[0]
                set_module(model, mod, UniformLayer(model.get_submodule(mod), p["bits"], codes, scale, offset))
                state.update({f"{mod}.scale": scale, f"{mod}.offset": offset, f"{mod}.codes": codes})
            continue
        mask = None
        if enc == "sparse":
            weight, pq = decode_sparse(p, buf)
            if pq is None:
                state[name] = weight
                continue
            mask, (codebook, codes) = weight, pq
        else:
            codebook, codes = decode_pq(p, buf)
        if materialize:
            state[name] = codebook[codes].reshape(p["shape"]) if mask is None else sparse_weight(mask, codebook, codes)
        else:
            mod = name.rpartition(".")[0]
            set_module(model, mod, PQLayer(model.get_submodule(mod), codebook, codes, p["d"], mask=mask))
            state[f"{mod}.codebook"], state[f"{mod}.codes"] = codebook, codes
            if mask is not None:
                state[f"{mod}.mask"] = mask
    own = model.state_dict()
    missing = [k for k in own if k not in state and own[k].is_floating_point()]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise PackedFormatError(f"file does not match architecture {packed.arch['name']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise PackedFormatError(f"tensor {k}: shape {tuple(t.shape)} in file, {tuple(own[k].shape)} in architecture")
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_packed(path: str | Path, materialize: bool = True) -> tuple[nn.Module, dict]:
    """Load a packed file: returns (model in eval mode, metadata)."""
    packed = read_packed(path)
    return build_from_packed(packed, materialize), packed.meta


def arch_spec(name: str, **kwargs: Any) -> dict:
    return {"name": name, "kwargs": kwargs}
