"""Codebooks and code widths: the one home of the storage dtypes of the packed file.

A codebook (``k`` x ``d``) is stored ``f32``/``f16`` raw, or as an integer codebook ``iB``
(B = 8, 6, 5 or 4 bits): ``d`` f16 column scales, then the ``k`` x ``d`` values q in
[-(2^(B-1) - 1), 2^(B-1) - 1], the centroid being ``q * scale``; ``i8`` stores q as int8,
the others bit-pack q + 2^(B-1) - 1 with B bits each.

A grouped integer codebook ``gB`` has one row of ``d`` f16 scales per group of GROUP centroids
(in codebook order) instead of one for all: an outlier centroid (transformers' outlier weights)
then coarsens only its own group's grid, not every centroid's.
"""

from __future__ import annotations

import numpy as np
import torch

from .bits import pack_bits, unpack_bits
from .errors import PackedFormatError

FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16}  # raw float storage
INT_BITS = {"i8": 8, "i6": 6, "i5": 5, "i4": 4}  # integer codebooks: bits per value
GROUPED_BITS = {"g8": 8, "g6": 6, "g5": 5, "g4": 4}  # integer codebooks with one scale row per GROUP centroids
GROUP = 16
_DTYPES, _INT_BITS = FLOAT_DTYPES, INT_BITS  # the names format.py used
CODEBOOK_DTYPES = (*FLOAT_DTYPES, *INT_BITS, *GROUPED_BITS)


def _bits(dtype: str) -> int | None:
    """Bits per value of an integer codebook dtype (None: a float dtype)."""
    return INT_BITS.get(dtype) or GROUPED_BITS.get(dtype)


def _groups(k: int, dtype: str) -> int:
    """Rows of scales of a (k, d) integer codebook."""
    return -(-k // GROUP) if dtype in GROUPED_BITS else 1


def float_nbytes(count: int, dtype: str) -> int:
    """Bytes of ``count`` raw values stored as ``dtype`` (f32 or f16)."""
    if dtype not in FLOAT_DTYPES:
        raise PackedFormatError(f"unknown float dtype {dtype!r}")
    return count * np.dtype(FLOAT_DTYPES[dtype]).itemsize


def is_int_codebook(dtype: str) -> bool:
    return _bits(dtype) is not None


def code_bits(k: int) -> int:
    """Bits of one code indexing ``k`` centroids (at least 1)."""
    return max(1, int(k - 1).bit_length())


def codebook_nbytes(k: int, d: int, dtype: str) -> int:
    """Bytes of a (k, d) codebook stored as ``dtype`` (f32, f16, or i8/i6/i5/i4 with d f16 scales,
    g8/g6/g5/g4 with d f16 scales per group of GROUP centroids)."""
    bits = _bits(dtype)
    if bits is not None:
        return -(-k * d * bits // 8) + float_nbytes(_groups(k, dtype) * d, "f16")
    if dtype not in FLOAT_DTYPES:
        raise PackedFormatError(f"unknown codebook dtype {dtype!r}")
    return float_nbytes(k * d, dtype)


def _int_codebook(c: torch.Tensor, bits: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, each exactly an f16 value; values (k, d) int64 in [-qmax, qmax]): symmetric, one
    scale per column, (d,); with ``groups`` > 1 one per column and group of GROUP rows, (groups,
    d). Runs on the codebook's device."""
    qmax = 2 ** (bits - 1) - 1
    c = c.detach().float()
    if groups == 1:
        scale = (c.abs().amax(0) / qmax).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, (c / scale).round().clamp(-qmax, qmax).long()
    k, d = c.shape
    padded = torch.cat([c.abs(), c.new_zeros(groups * GROUP - k, d)]).reshape(groups, GROUP, d)
    scale = (padded.amax(1) / qmax).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    per_row = scale.repeat_interleave(GROUP, 0)[:k]
    return scale, (c / per_row).round().clamp(-qmax, qmax).long()


def _scales_per_row(scale: torch.Tensor, k: int) -> torch.Tensor:
    return scale if scale.dim() == 1 else scale.repeat_interleave(GROUP, 0)[:k]


def round_codebook(c: torch.Tensor, dtype: str) -> torch.Tensor:
    """The codebook as it will be stored (and loaded): rounding it first makes the model in
    memory and the model read from the file the same."""
    bits = _bits(dtype)
    if bits is not None:
        scale, q = _int_codebook(c, bits, _groups(c.shape[0], dtype))
        return q.float() * _scales_per_row(scale, c.shape[0])
    return c.detach().half().float() if dtype == "f16" else c.detach().float()


def encode_float(t: torch.Tensor, dtype: str) -> bytes:
    """A tensor's values, flat, as raw ``dtype`` (f32/f16)."""
    return t.detach().cpu().float().numpy().astype(FLOAT_DTYPES[dtype]).tobytes()


def decode_float(buf: bytes, dtype: str) -> np.ndarray:
    """Raw ``dtype`` values as float32 (a copy: writable)."""
    return np.frombuffer(buf, FLOAT_DTYPES[dtype]).astype(np.float32)


def encode_codebook(c: torch.Tensor, dtype: str) -> bytes:
    bits = _bits(dtype)
    if bits is not None:
        scale, q = _int_codebook(c, bits, _groups(c.shape[0], dtype))
        head = scale.cpu().numpy().astype(np.float16).tobytes()
        q = q.cpu().numpy().reshape(-1)
        return head + (q.astype(np.int8).tobytes() if bits == 8 else pack_bits(q + 2 ** (bits - 1) - 1, bits))
    return encode_float(c, dtype)


def decode_codebook(buf: bytes, k: int, d: int, dtype: str) -> torch.Tensor:
    """The (k, d) float32 codebook at the start of ``buf`` (which may go on with the codes)."""
    n = codebook_nbytes(k, d, dtype)
    if len(buf) < n:
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes, shorter than its codebook")
    bits = _bits(dtype)
    if bits is not None:
        groups = _groups(k, dtype)
        head = float_nbytes(groups * d, "f16")
        scale = decode_float(buf[:head], "f16").reshape(groups, d)
        if bits == 8:
            q = np.frombuffer(buf[head:n], np.int8).astype(np.float32)
        else:
            q = unpack_bits(buf[head:n], bits, k * d).astype(np.float32) - (2 ** (bits - 1) - 1)
        per_row = np.repeat(scale, GROUP, axis=0)[:k] if groups > 1 else scale
        with np.errstate(invalid="ignore", over="ignore"):  # a scale may be inf/nan: the file says so
            return torch.from_numpy(q.reshape(k, d) * per_row)
    return torch.from_numpy(decode_float(buf[:n], dtype).reshape(k, d))
