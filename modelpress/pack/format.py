"""Compatibility shim: the packed format now lives in bits, codebook, entries, container, arch and model (import from modelpress.pack)."""

from .arch import arch_spec
from .bits import _categorical, _read_varints, _varints, decode_codes, encode_codes, pack_bits, unpack_bits
from .codebook import (
    _DTYPES,
    _INT_BITS,
    _int_codebook,
    code_bits,
    codebook_nbytes,
    decode_codebook,
    encode_codebook,
    round_codebook,
)
from .container import MAGIC, Packed, _file_chunks, read_packed, write_packed
from .entries import (
    _expect_bytes,
    _sparse_header,
    affine_weight,
    decode_affine,
    decode_dense,
    decode_positions,
    decode_pq,
    decode_sparse,
    encode_affine,
    encode_dense,
    encode_positions,
    encode_pq,
    encode_sparse,
    encode_sparse_pq,
    sparse_weight,
)
from .errors import PackedFormatError
from .model import build_from_packed, load_packed, model_entries, pack_model, packed_nbytes
from .model import dense_or_sparse as _dense_or_sparse

__all__ = [
    "MAGIC", "Packed", "PackedFormatError", "affine_weight", "arch_spec", "build_from_packed", "code_bits", "codebook_nbytes",
    "decode_affine", "decode_codebook", "decode_codes", "decode_dense", "decode_positions", "decode_pq", "decode_sparse",
    "encode_affine", "encode_codebook", "encode_codes", "encode_dense", "encode_positions", "encode_pq", "encode_sparse",
    "encode_sparse_pq", "load_packed", "model_entries", "pack_bits", "pack_model", "packed_nbytes", "read_packed",
    "round_codebook", "sparse_weight", "unpack_bits", "write_packed",
    "_DTYPES", "_INT_BITS", "_categorical", "_dense_or_sparse", "_expect_bytes", "_file_chunks", "_int_codebook",
    "_read_varints", "_sparse_header", "_varints",
]
