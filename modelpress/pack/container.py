"""The packed file as a container: magic, header, payload; writing it and reading it back.

Layout (all integers little-endian)::

    8 bytes   magic  b"MPRESS01"  (format name + version)
    4 bytes   header length H
    H bytes   header: zlib-compressed UTF-8 JSON
    payload   tensor bytes, in the order the header lists them

The header (format 1) is ``{"format": 1, "arch": {"name", "kwargs"}, "meta": {...},
"payload_bytes", "sha256", "tensors": [[name, encoding, params], ...]}`` (see entries.py for
the encodings). The reader validates it as a schema, with bounds, before it reads the payload,
and every entry's params before anything is decoded.

A weight that is a sum of parts (the LC algorithm's additive combinations) is the entry of its
own name (the first part) and addends ``<name>+1``, ``<name>+2``, ... of the same shape, each
with its own encoding; a loader sums them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from .arch import check_against_architecture, check_arch_schema
from .entries import ENCODINGS, MAX_RATIO, check_entry, decode_entry
from .errors import PackedFormatError

MAGIC = b"MPRESS01"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 2 ** 20  # the header, compressed and decompressed
MAX_TENSORS = 100_000
MAX_NAME = 1024
MAX_TOTAL_FREE = 2 ** 24  # a file may always decode to this many values in all, beyond that MAX_RATIO per payload byte,
MAX_TOTAL_ELEMENTS = 2 ** 28  # and never to more than this
_HEADER_KEYS = ("format", "arch", "meta", "payload_bytes", "sha256", "tensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


EXTRA = "extra:"  # entries that are not the model's: a method's state kept beside a step's checkpoint
ADDEND = "+"  # "<tensor>+<i>" (i = 1, 2, ...): the i-th addend of <tensor>, a weight stored as a sum of parts


def addend_of(name: str) -> tuple[str, int] | None:
    """(tensor, i) for an addend's name ``<tensor>+<i>``; None for any other name."""
    base, sep, index = name.rpartition(ADDEND)
    if not sep or not base or not index.isdecimal() or not index.isascii() or index.startswith("0"):
        return None
    return base, int(index)


def without_addends(shapes: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """The tensors (name, shape) the architecture must have: the addends left out, once each is
    checked to add to a tensor of the file of the same shape, numbered 1, 2, ... without a gap
    (PackedFormatError naming it otherwise)."""
    own = {n: s for n, s in shapes if addend_of(n) is None}
    seen: dict[str, set[int]] = {}
    for name, shape in shapes:
        if (a := addend_of(name)) is None:
            continue
        base, i = a
        if base not in own:
            raise PackedFormatError(f"tensor {name!r}: an addend of {base!r}, which the file does not hold")
        if list(shape) != list(own[base]):
            raise PackedFormatError(f"tensor {name!r}: shape {tuple(shape)}, where {base!r} it adds to has {tuple(own[base])}")
        seen.setdefault(base, set()).add(i)
    for base, indices in seen.items():
        if indices != set(range(1, len(indices) + 1)):
            raise PackedFormatError(f"tensor {base!r}: addends {sorted(indices)}, not numbered 1, 2, ...")
    return [(n, s) for n, s in shapes if addend_of(n) is None]


@dataclass
class Packed:
    """A packed file read into memory: header fields and the raw bytes of each entry."""

    arch: dict
    meta: dict
    entries: list[tuple[str, str, dict, bytes]] = field(default_factory=list)
    size: int = 0

    def model_entries(self) -> list[tuple[str, str, dict, bytes]]:
        """The model's entries (without the ``extra:`` ones)."""
        return [e for e in self.entries if not e[0].startswith(EXTRA)]

    def check(self) -> None:
        """Check the entries against the architecture without decoding them (the model is
        built on the meta device): a missing or extra tensor, or a shape that differs, raises
        PackedFormatError."""
        check_against_architecture(self.arch, without_addends([(n, p["shape"]) for n, _, p, _ in self.model_entries()]))

    def summary(self, check: bool = True) -> list[dict]:
        """One row per tensor: name, encoding, bytes, shape, codebook (k x block) and code
        bits for PQ, storage dtype, and the sparsity (share of exact zeros) of weights (of a
        weight stored with addends: of the sum, on its own row).
        ``check``: first :meth:`check` the entries against the architecture."""
        if check:
            self.check()
        summed = {a[0] for name, *_ in self.entries if (a := addend_of(name)) is not None}
        sums: dict[str, torch.Tensor] = {}
        rows = []
        for name, enc, p, buf in self.entries:
            row = {"tensor": name, "encoding": enc, "bytes": p["n"], "shape": "x".join(map(str, p["shape"]))}
            weight = decode_entry(name, enc, p, buf).weight()
            if enc == "pq":
                row.update(block=p["d"], k=p["k"], bits=p["bits"], codebook=p["cb"])
            elif enc == "affine":
                row.update(bits=p["bits"], scales=p["cb"])
            elif enc == "lowrank":
                row.update(rank=p["rank"], dtype=p["dtype"])
            elif enc == "sparse":
                if p["values"] == "pq":
                    row.update(block=p["d"], k=p["k"], bits=p["bits"], codebook=p["cb"])
                else:
                    row.update(dtype=p["values"])
                row.update(positions=p["pos"] + (f"/{p['pos_bits']}b" if p["pos"] == "delta" else ""))
            else:
                row.update(dtype=p["dtype"])
            if p.get("coder"):
                row["coder"] = p["coder"]
            base = (addend_of(name) or (name, 0))[0]
            if base in summed:
                sums[base] = sums[base] + weight if base in sums else weight
            elif name.endswith(".weight") and len(p["shape"]) > 1:
                row["sparsity"] = _sparsity(weight)
            rows.append(row)
        for row in rows:
            if row["tensor"] in sums and row["tensor"].endswith(".weight") and sums[row["tensor"]].dim() > 1:
                row["sparsity"] = _sparsity(sums[row["tensor"]])
        return rows


def _sparsity(weight: torch.Tensor) -> float:
    return round(float((weight == 0).float().mean()), 4)


def file_chunks(arch: dict, meta: dict, entries: list[tuple[str, str, dict, bytes]]) -> list[bytes]:
    """The file's bytes, in four chunks: magic, header length, header, payload."""
    payload = b"".join(e[3] for e in entries)
    header = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "meta": meta,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": [[n, enc, p] for n, enc, p, _ in entries],
    }
    blob = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return [MAGIC, struct.pack("<I", len(blob)), blob, payload]


_file_chunks = file_chunks


def write_packed(path: str | Path, arch: dict, meta: dict, entries: list[tuple[str, str, dict, bytes]]) -> int:
    """Write entries ``(name, encoding, params, data)`` atomically; return the file size."""
    path = Path(path)
    atomic_write(path, file_chunks(arch, meta, entries))
    return os.path.getsize(path)


def _decompress_header(blob: bytes) -> dict:
    d = zlib.decompressobj()
    try:
        text = d.decompress(blob, MAX_HEADER_BYTES + 1)
    except zlib.error:
        raise PackedFormatError("corrupted or truncated header") from None
    if len(text) > MAX_HEADER_BYTES:
        raise PackedFormatError(f"corrupted header: it decompresses to more than {MAX_HEADER_BYTES} bytes")
    if not d.eof or d.unused_data:
        raise PackedFormatError("corrupted or truncated header")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise PackedFormatError("corrupted or truncated header") from None


def _no_constant(name: str):
    raise ValueError(f"{name} in the header")


def check_header(header) -> None:
    """Validate a decoded header as the format-1 schema (types and bounds of every field, not
    yet the entries' params). Raises PackedFormatError naming the field."""
    if not isinstance(header, dict):
        raise PackedFormatError("corrupted header: not an object")
    version = header.get("format")
    if type(version) is not int or version != FORMAT_VERSION:
        raise PackedFormatError(f"unsupported format version {version!r}")
    if missing := [k for k in _HEADER_KEYS if k not in header]:
        raise PackedFormatError(f"corrupted header: no {', '.join(missing)}")
    if extra := sorted(set(header) - set(_HEADER_KEYS)):
        raise PackedFormatError(f"corrupted header: unknown fields {', '.join(map(repr, extra[:5]))}")
    check_arch_schema(header["arch"])
    if not isinstance(header["meta"], dict):
        raise PackedFormatError("corrupted header: meta is not an object")
    size = header["payload_bytes"]
    if type(size) is not int or not 0 <= size < 2 ** 62:
        raise PackedFormatError(f"corrupted header: payload_bytes {size!r}")
    if not isinstance(header["sha256"], str) or not _SHA256.fullmatch(header["sha256"]):
        raise PackedFormatError("corrupted header: sha256 is not 64 hex digits")
    tensors = header["tensors"]
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise PackedFormatError(f"corrupted header: tensors is not a list of at most {MAX_TENSORS}")
    names = set()
    for i, t in enumerate(tensors):
        if not (isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], str)
                and isinstance(t[2], dict)) or not 0 < len(t[0]) <= MAX_NAME:
            raise PackedFormatError(f"corrupted header: tensor #{i} is not [name, encoding, params]")
        name, enc, _ = t
        if enc not in ENCODINGS:
            raise PackedFormatError(f"unknown encoding {enc!r} for {name}")
        if name in names:
            raise PackedFormatError(f"corrupted header: tensor {name!r} twice")
        names.add(name)


def read_packed(path: str | Path) -> Packed:
    """Read and verify a packed file. Raises PackedFormatError naming what is wrong; reads the
    payload only once the header is valid, and decodes nothing."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:8] != MAGIC:
                raise PackedFormatError(f"{path}: not a modelpress packed file (bad magic)")
            if len(head) < 12:
                raise PackedFormatError(f"{path}: truncated (no header)")
            (hlen,) = struct.unpack("<I", head[8:12])
            if hlen > MAX_HEADER_BYTES:
                raise PackedFormatError(f"{path}: corrupted header: {hlen} bytes long")
            blob = f.read(hlen)
            try:
                header = _decompress_header(blob)
                check_header(header)
            except PackedFormatError as e:
                raise PackedFormatError(f"{path}: {e}") from None
            total = os.fstat(f.fileno()).st_size
            expected = header["payload_bytes"]
            have = total - 12 - len(blob)
            if have != expected:
                raise PackedFormatError(f"{path}: truncated: payload has {have} bytes, header says {expected}")
            payload = f.read(expected)
    except FileNotFoundError:
        raise PackedFormatError(f"{path}: no such packed file") from None
    except IsADirectoryError:
        raise PackedFormatError(f"{path}: is a directory, not a packed file") from None
    except OSError as e:
        raise PackedFormatError(f"{path}: cannot read the packed file: {e.strerror or e}") from None
    if len(payload) != expected:
        raise PackedFormatError(f"{path}: truncated: payload has {len(payload)} bytes, header says {expected}")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise PackedFormatError(f"{path}: checksum mismatch: the file is corrupted or was modified")
    packed, offset, values = Packed(header["arch"], header["meta"], size=total), 0, 0
    for name, enc, p in header["tensors"]:
        try:
            values += check_entry(enc, p)
        except PackedFormatError as e:
            raise PackedFormatError(f"{path}: tensor {name!r} ({enc}): corrupted entry: {e}") from None
        packed.entries.append((name, enc, p, payload[offset:offset + p["n"]]))
        offset += p["n"]
    if offset != expected:
        raise PackedFormatError(f"{path}: corrupted header: the tensors hold {offset} bytes, the payload {expected}")
    if values > max(MAX_TOTAL_FREE, min(MAX_TOTAL_ELEMENTS, MAX_RATIO * expected)):
        raise PackedFormatError(f"{path}: corrupted header: {values} values in all, beyond the bounds for {expected} bytes")
    return packed


__all__ = ["ADDEND", "MAGIC", "FORMAT_VERSION", "Packed", "PackedFormatError", "addend_of", "check_header", "file_chunks",
           "read_packed", "without_addends", "write_packed"]
