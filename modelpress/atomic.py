"""Atomic file writes: readers (and a crashed run's successor) never see half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def remove_partials(root: str | Path) -> int:
    """Remove the ``.partial-*`` files a killed writer left under ``root`` (call it only while
    no other process writes there); returns how many there were."""
    n = 0
    for p in Path(root).rglob(".partial-*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def atomic_write(path: str | Path, chunks: list[bytes]) -> None:
    """Write ``chunks`` to a ``.partial-*`` file beside ``path``, fsync, then rename it into
    place. On any failure (Ctrl-C included) the partial file is removed and ``path`` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
