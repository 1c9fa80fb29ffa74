"""The one error every reader of a packed file raises."""


class PackedFormatError(ValueError):
    """The file is not a valid packed model (wrong magic, truncated, corrupted, unknown parts,
    claims beyond the reader's bounds). The message names the file part or entry at fault."""
