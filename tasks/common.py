"""What every task shares: retry policy (tasks/transient.py), progress bridge to the Prefect UI."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from modelpress.progress import add_listener

from .transient import retry_transient  # noqa: F401 - every task's retry condition, re-exported

# Library progress lines (logger "modelpress") reach Prefect's logs when
# PREFECT_LOGGING_EXTRA_LOGGERS includes "modelpress"; INFO is their level.
logging.getLogger("modelpress").setLevel(logging.INFO)


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


# GPU-heavy tasks (teacher, compress, fine-tune) hold one slot of the global concurrency limit
# named by MODELPRESS_GPU_LIMIT while they run. infra/prefect-worker.sh creates that limit
# (one per machine, limit 1) and sets the variable, so a worker machine never runs two of them
# at once even if flow runs overlap. Unset (local runs): no limit, nothing to acquire.
GPU_TAG = "gpu"


@contextlib.contextmanager
def gpu_slot():
    name = os.environ.get("MODELPRESS_GPU_LIMIT", "").strip()
    if not name or TaskRunContext.get() is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    get_run_logger().info("waiting for GPU slot %r", name)
    with concurrency(name, occupy=1, strict=True, lease_duration=120):
        get_run_logger().info("holding GPU slot %r", name)
        yield


def log_device(requested: str) -> str:
    """Log (and return) the device a task computes on: CUDA when present, else the CPU."""
    import torch

    from modelpress.train import resolve_device

    device = resolve_device(requested)
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        what = f"cuda:{idx} ({torch.cuda.get_device_name(idx)}, {torch.cuda.device_count()} visible)"
    elif device.type == "cuda":
        what = "cuda requested but no CUDA device is available"
    else:
        what = f"cpu ({torch.get_num_threads()} threads; no CUDA device)" if requested == "auto" else "cpu (requested)"
    msg = f"device: {what} [run.device={requested}]"
    if TaskRunContext.get() is not None:
        get_run_logger().info(msg)
    else:
        logging.getLogger("modelpress").info(msg)
    return str(device)
