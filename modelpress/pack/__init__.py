"""The packed format shared by every method (see format.py for the layout)."""

from .format import (
    Packed,
    PackedFormatError,
    arch_spec,
    build_from_packed,
    load_packed,
    pack_model,
    read_packed,
)

__all__ = ["Packed", "PackedFormatError", "arch_spec", "build_from_packed", "load_packed", "pack_model", "read_packed"]
