"""Progress of long work: log lines with rate and ETA, plus listeners (e.g. a UI bar).

The library reports through ``logging`` (logger ``modelpress``) and through listeners that
callers register; it knows nothing of who listens.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("modelpress")


def error_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what one-line
    reports of a failure show."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

Listener = Callable[[dict], None]
_listeners: list[Listener] = []


def add_listener(fn: Listener) -> Callable[[], None]:
    """Register ``fn(event)``; returns a function that removes it."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn) if fn in _listeners else None


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts steps of one stage; logs at most every ``every_s`` seconds and at the end."""

    def __init__(self, stage: str, total: int, every_s: float = 5.0, unit: str = "step"):
        self.stage, self.total, self.every_s, self.unit = stage, max(1, total), every_s, unit
        self.done = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1, **metrics: float | str) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info(
            "[%s] %s %d/%d (%d%%) %s elapsed %s eta %s",
            self.stage, self.unit, self.done, self.total, 100 * self.done // self.total, shown,
            _fmt_seconds(elapsed), _fmt_seconds(eta),
        )
        event = {"stage": self.stage, "done": self.done, "total": self.total, "elapsed_s": elapsed, "eta_s": eta, **metrics}
        for fn in list(_listeners):
            fn(event)
