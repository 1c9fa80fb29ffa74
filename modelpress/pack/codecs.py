"""The registry of layer codecs: how a compressed layer type (a method's module, such as
PQLayer or UniformLayer) becomes entries of the packed file, and how it is rebuilt from them.

The dependency is one way: a method registers its layer type here (at the bottom of the
module that defines it); nothing in ``modelpress.pack`` imports ``modelpress.methods``.
``import modelpress`` imports every method, so any user of the package has them registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn

from .errors import PackedFormatError

Entry = tuple[str, str, dict, bytes]


@dataclass(frozen=True)
class EncodeOptions:
    """How a model is being packed: raw floats, codebooks, entropy coding of codes."""

    float_dtype: str = "f16"
    codebook_dtype: str = "f16"
    entropy: bool = True
    layer_codebooks: Mapping[str, str] | None = None  # a layer's own codebook storage (a byte budget's choice)

    def codebook_of(self, layer: str) -> str:
        """The codebook storage of the layer named ``layer``."""
        return (self.layer_codebooks or {}).get(layer, self.codebook_dtype)


@dataclass(frozen=True)
class LayerCodec:
    module_type: type
    # the module's own state the codec writes (a submodule's name: all of its state); the rest (bias) is stored as plain tensors
    state_keys: tuple[str, ...]
    encode: Callable[[nn.Module, str, EncodeOptions], list[Entry]]  # (module, its name, options) -> entries
    # the decoded kind it rebuilds: "pq", "affine" or "lowrank" (see entries.Decoded), or "additive": a weight stored as a
    # sum of entries (model.build_from_packed), its parts {"parts": [Decoded, ...]} in order
    kind: str
    rebuild: Callable[[nn.Module, dict], tuple[nn.Module, dict[str, torch.Tensor]]]  # (plain layer, parts) -> (module, its state)


_BY_TYPE: dict[type, LayerCodec] = {}
_BY_KIND: dict[str, LayerCodec] = {}


def register_layer_codec(module_type: type, *, state_keys: tuple[str, ...], encode, kind: str, rebuild) -> None:
    """Register (or replace) the codec of ``module_type``; ``kind`` is the decoded entry kind
    ("pq", "affine", or "additive" for a sum of entries) that ``build_from_packed(...,
    materialize=False)`` rebuilds as this type."""
    codec = LayerCodec(module_type, tuple(state_keys), encode, kind, rebuild)
    _BY_TYPE[module_type] = codec
    _BY_KIND[kind] = codec


def codec_for(module: nn.Module) -> LayerCodec | None:
    """The codec of a module's type (a subclass counts), or None for a plain module."""
    codec = _BY_TYPE.get(type(module))
    if codec is not None:
        return codec
    return next((c for t, c in _BY_TYPE.items() if isinstance(module, t)), None)


def rebuild_codec(kind: str) -> LayerCodec:
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise PackedFormatError(f"no layer type registered for encoding {kind!r}; import modelpress.methods") from None
