"""The packed file shared by every method: one compact, pickle-free file per compressed model.

Modules, by concern (nothing here imports ``modelpress.methods``; methods register their layer
types in codecs.py):

- ``bits``: bit packing, LEB128 varints, range coding of integer codes (constriction).
- ``codebook``: storage dtypes (f32/f16, integer codebooks i8..i4), codebook bytes, rounding,
  bits per code.
- ``entries``: tensor codecs (dense, pq, sparse, affine), one size function each, validation
  of an entry's params before decoding, decoding.
- ``container``: magic, header schema, ``write_packed`` / ``read_packed``, ``Packed``.
- ``errors``: ``PackedFormatError``, the one error every reader raises.
- ``arch``: the architecture a file names, its arguments' bounds, the meta-device check of the
  file's tensors against it.
- ``codecs``: the registry of compressed layer types (encode / rebuild).
- ``model``: model <-> entries (``pack_model``, ``packed_nbytes``, ``build_from_packed``,
  ``load_packed``).
- ``format``: a re-export shim of the old single module.

The size we report for a model is ``os.path.getsize`` of the file, nothing else.
"""

from .arch import arch_spec
from .codebook import code_bits, codebook_nbytes, round_codebook
from .codecs import EncodeOptions, register_layer_codec
from .container import MAGIC, Packed, read_packed, write_packed
from .errors import PackedFormatError
from .model import build_from_packed, extra_tensors, load_packed, model_entries, pack_model, packed_nbytes

__all__ = [
    "MAGIC", "EncodeOptions", "Packed", "PackedFormatError", "arch_spec", "build_from_packed", "code_bits", "extra_tensors", "codebook_nbytes",
    "load_packed", "model_entries", "pack_model", "packed_nbytes", "read_packed", "register_layer_codec", "round_codebook",
    "write_packed",
]
