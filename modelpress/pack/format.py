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
  bits each (LSB first); the weight is ``codebook[codes].reshape(shape)``.

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


def encode_pq(codebook: torch.Tensor, codes: torch.Tensor, shape: tuple, cb_dtype: str) -> tuple[dict, bytes]:
    k, d = codebook.shape
    bits = max(1, int(k - 1).bit_length())
    cb = codebook.detach().cpu().float().numpy().astype(_DTYPES[cb_dtype]).tobytes()
    data = cb + pack_bits(codes.detach().cpu().numpy(), bits)
    return {"shape": list(shape), "d": d, "k": k, "bits": bits, "cb": cb_dtype, "n": len(data)}, data


def decode_pq(p: dict, buf: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (k, d) float32, codes (n,) int64)."""
    k, d = p["k"], p["d"]
    cb_len = k * d * np.dtype(_DTYPES[p["cb"]]).itemsize
    count = int(np.prod(p["shape"])) // d
    _expect_bytes(buf, cb_len + -(-count * p["bits"] // 8))
    codebook = torch.from_numpy(np.frombuffer(buf[:cb_len], _DTYPES[p["cb"]]).astype(np.float32).reshape(k, d).copy())
    codes = torch.from_numpy(unpack_bits(buf[cb_len:], p["bits"], count))
    if codes.numel() and int(codes.max()) >= k:
        raise PackedFormatError("corrupted codes: index beyond codebook")
    return codebook, codes


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
            else:
                weight = decode_dense(p, buf)
                row.update(dtype=p["dtype"])
            if name.endswith(".weight") and len(p["shape"]) > 1:
                row["sparsity"] = round(float((weight == 0).float().mean()), 4)
            rows.append(row)
        return rows


def write_packed(path: str | Path, arch: dict, meta: dict, entries: list[tuple[str, str, dict, bytes]]) -> int:
    """Write entries ``(name, encoding, params, data)`` atomically; return the file size."""
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
    path = Path(path)
    atomic_write(path, [MAGIC, struct.pack("<I", len(blob)), blob, payload])
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
        if enc not in ("dense", "pq"):
            raise PackedFormatError(f"{path}: unknown encoding {enc!r} for {name}")
        packed.entries.append((name, enc, p, payload[offset:offset + p["n"]]))
        offset += p["n"]
    return packed


# ---- models <-> entries -------------------------------------------------------------------

def model_entries(model: nn.Module, float_dtype: str = "f16", codebook_dtype: str = "f16") -> list[tuple[str, str, dict, bytes]]:
    """Encode a (partly) compressed model's state: PQ layers as codes + codebook, the rest
    dense in ``float_dtype``. Integer buffers (BatchNorm's batch counter) are not stored."""
    from ..methods.pq.layer import PQLayer

    pq_layers = {n: m for n, m in model.named_modules() if isinstance(m, PQLayer)}
    entries = []
    for key, t in model.state_dict().items():
        mod, _, attr = key.rpartition(".")
        if mod in pq_layers:
            if attr == "codebook":
                m = pq_layers[mod]
                p, data = encode_pq(m.codebook, m.codes, m.weight_shape, codebook_dtype)
                entries.append((f"{mod}.weight", "pq", p, data))
                continue
            if attr == "codes":
                continue
        if not t.is_floating_point():
            continue
        p, data = encode_dense(t, float_dtype)
        entries.append((key, "dense", p, data))
    return entries


def pack_model(
    model: nn.Module, path: str | Path, arch: dict, meta: dict | None = None,
    float_dtype: str = "f16", codebook_dtype: str = "f16",
) -> int:
    """Write ``model`` to ``path``; returns the file's size in bytes."""
    return write_packed(path, arch, meta or {}, model_entries(model, float_dtype, codebook_dtype))


def build_from_packed(packed: Packed, materialize: bool = True) -> nn.Module:
    """Rebuild the nn.Module. ``materialize=True`` decodes PQ weights into ordinary dense
    layers (fastest inference); ``False`` keeps PQLayers with trainable codebooks."""
    from ..methods.pq.layer import PQLayer
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
        codebook, codes = decode_pq(p, buf)
        if materialize:
            state[name] = codebook[codes].reshape(p["shape"])
        else:
            mod = name.rpartition(".")[0]
            set_module(model, mod, PQLayer(model.get_submodule(mod), codebook, codes, p["d"]))
            state[f"{mod}.codebook"], state[f"{mod}.codes"] = codebook, codes
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
