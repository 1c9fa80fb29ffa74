"""Integer codes as bytes: bit packing (LSB first), LEB128 varints, and range coding with
``constriction`` (see format.py for where they sit in the file).

The decoders here trust nothing but their arguments' types: sizes are checked against the
buffer before anything is allocated, and the native range decoder is only called on input
whose output size is bounded (a huge symbol count makes it abort the process on allocation).
"""

from __future__ import annotations

import numpy as np

from .errors import PackedFormatError

MAX_CODE_BITS = 16  # widest code pack_bits/unpack_bits handle
MAX_DECODE_SYMBOLS = 2 ** 28  # most codes one call of the range decoder may produce
_CHUNK = 2 ** 16  # codes unpacked at a time (a multiple of 8: each chunk starts on a byte)
_DECODE_CHUNK = 2 ** 20  # codes range-decoded at a time: the native decoder aborts the process when its output cannot be allocated


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits each, bit-packed."""
    return -(-count * bits // 8)


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
    if not 1 <= bits <= 32:
        raise PackedFormatError(f"corrupted entry: {bits}-bit codes")
    if count < 0 or len(buf) < packed_nbytes(count, bits):
        raise PackedFormatError(f"corrupted entry: {len(buf)} bytes hold fewer than {count} codes of {bits} bits")
    if bits == 8:
        return np.frombuffer(buf, np.uint8, count).astype(np.int64)
    if bits == 16:
        return np.frombuffer(buf, "<u2", count).astype(np.int64)
    raw, out = np.frombuffer(buf, np.uint8), np.empty(count, np.int64)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    for start in range(0, count, _CHUNK):  # in chunks of whole bytes: the bit planes of all codes at once take 8 bytes a bit
        stop = min(count, start + _CHUNK)
        planes = np.unpackbits(raw[start * bits // 8:-(-stop * bits // 8)], count=(stop - start) * bits, bitorder="little")
        out[start:stop] = planes.reshape(stop - start, bits) @ weights
    return out


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


def _read_varints(buf: bytes, count: int, limit: int) -> np.ndarray:
    """``count`` LEB128 numbers filling ``buf`` exactly, each at most ``limit``."""
    values, v, shift = [], 0, 0
    for byte in buf:
        v |= (byte & 0x7F) << shift
        shift += 7
        if v > limit:
            raise PackedFormatError("corrupted entry: bad code histogram (a count beyond the codes)")
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
        if len(buf) != packed_nbytes(count, p["bits"]):
            raise PackedFormatError(f"corrupted entry: {len(buf)} bytes where its shape needs {packed_nbytes(count, p['bits'])}")
        codes = unpack_bits(buf, p["bits"], count)
    elif coder == "range":
        import constriction

        hist_n = p.get("hist_n")
        if (type(hist_n) is not int or not 0 < hist_n <= len(buf) or not 2 <= k <= 2 ** MAX_CODE_BITS
                or not 0 < count <= MAX_DECODE_SYMBOLS):
            raise PackedFormatError("corrupted entry: entropy-coded codes with a bad histogram size, k or count")
        counts = _read_varints(buf[:hist_n], k, count)
        words = buf[hist_n:]
        if int(counts.sum()) != count or len(words) % 4:
            raise PackedFormatError("corrupted entry: entropy-coded codes do not match their count")
        try:
            decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
            model, codes = _categorical(counts), np.empty(count, np.int64)
            for start in range(0, count, _DECODE_CHUNK):  # the decoder allocates only a chunk's output at a time
                stop = min(count, start + _DECODE_CHUNK)
                codes[start:stop] = decoder.decode(model, stop - start)
        except BaseException as e:  # constriction: AssertionError on invalid data, a Rust panic as PanicException (a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise PackedFormatError(f"corrupted entry: entropy-coded codes do not decode ({type(e).__name__}: {e})") from None
        if codes.shape != (count,) or not np.array_equal(np.bincount(codes, minlength=k)[:k], counts):
            raise PackedFormatError("corrupted entry: entropy-coded codes do not match their histogram")
    else:
        raise PackedFormatError(f"unknown code coder {coder!r}")
    if codes.size and int(codes.max()) >= k:
        raise PackedFormatError("corrupted codes: index beyond codebook")
    return codes
