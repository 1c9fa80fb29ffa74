"""Atomic file writes: readers (and a crashed run's successor) never see half a file; and one
writer at a time per folder."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator


def remove_partials(root: str | Path, skip: tuple[str, ...] = ()) -> int:
    """Remove the ``.partial-*`` files a killed writer left under ``root`` but not in its
    subfolders named in ``skip`` (call it only while no other process writes there); returns
    how many there were."""
    n = 0
    for p in Path(root).rglob(".partial-*"):
        if p.is_file() and p.relative_to(root).parts[0] not in skip:
            p.unlink(missing_ok=True)
            n += 1
    return n


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock (``folder_lock(..., wait=False)``)."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait: bool = True, what: str = "run.workdir", user: str = "run",
                skip: tuple[str, ...] = ()) -> Iterator[None]:
    """One writer at a time in ``folder`` (two runs there would overwrite each other's stages):
    an exclusive lock on ``<folder>/.lock``, held in the ``with`` block. ``wait=False``: refuse at
    once with :class:`FolderBusy` naming the holder; else wait for it (logged). Once held, the
    partial files a killed writer left are removed, except in the subfolders named in ``skip``
    (another lock's: a run's sweeps, a sweep's points)."""
    log = logging.getLogger("modelpress")
    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise FolderBusy(f"{what} {folder} is in use by another {user} ({holder}): wait for it to end, "
                                 f"or give this {user} another {what}") from None
            log.info("waiting for the %s holding %s (%s)", user, folder, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        stale = remove_partials(folder, skip)  # the lock holder is the only writer: these are a killed run's
        if stale:
            log.info("removed %d partial files a stopped %s left in %s", stale, user, folder)
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


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


def workdir_lock(workdir: str | Path, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """One run at a time in a work directory (two would overwrite each other's stages): the flow
    waits for the run holding it, the commands refuse at once (``wait=False``). Its ``sweeps/``
    are the sweeps' own (each under its sweep lock)."""
    return folder_lock(workdir, wait, skip=("sweeps",))
