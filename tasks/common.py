"""What every task shares: retry policy, progress bridge to the Prefect UI."""

from __future__ import annotations

import contextlib
import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from modelpress.data import ChecksumMismatch, DatasetError
from modelpress.pack import PackedFormatError
from modelpress.progress import add_listener
from modelpress.recipe import RecipeError
from modelpress.stages import StageError

# Library progress lines (logger "modelpress") reach Prefect's logs when
# PREFECT_LOGGING_EXTRA_LOGGERS includes "modelpress"; INFO is their level.
logging.getLogger("modelpress").setLevel(logging.INFO)

# Errors that a retry cannot fix: bad input. Everything else (network, S3, a killed worker,
# CUDA hiccups) is worth another try.
PERMANENT = (ChecksumMismatch, DatasetError, PackedFormatError, RecipeError, StageError, ValueError, TypeError, KeyError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry unless the failure is bad input."""
    try:
        state.result()
    except PERMANENT:
        return False
    except BaseException:  # noqa: BLE001 - anything else is treated as transient
        return True
    return True


@contextlib.contextmanager
def ui_progress(key: str, every_s: float = 2.0):
    """Mirror library progress events into a Prefect progress artifact (a bar in the UI)."""
    if TaskRunContext.get() is None:
        yield
        return
    artifact = create_progress_artifact(0.0, description=f"{key} progress")
    last = [0.0]

    def on_event(event: dict) -> None:
        now = time.monotonic()
        if now - last[0] < every_s and event["done"] < event["total"]:
            return
        last[0] = now
        pct = 100.0 * event["done"] / event["total"]
        update_progress_artifact(artifact, pct, description=f"{event['stage']}: {event['done']}/{event['total']}")

    remove = add_listener(on_event)
    try:
        yield
    finally:
        remove()
