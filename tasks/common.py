"""What every task shares: retry policy (tasks/transient.py), progress bridge to the Prefect UI."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from modelpress.progress import add_listener, error_line, log

from .transient import retry_transient  # noqa: F401 - every task's retry condition, re-exported

# Library progress lines (logger "modelpress") reach Prefect's logs when
# PREFECT_LOGGING_EXTRA_LOGGERS includes "modelpress"; INFO is their level.
logging.getLogger("modelpress").setLevel(logging.INFO)


class ProgressMirror:
    """A progress listener that hands library events to ``post`` (a Prefect API call) from a
    thread of its own, at most one every ``every_s`` (and the last one), the newest replacing any
    not yet posted. The work never waits for the API: while it is unreachable (a server restart,
    an outage longer than the client's minute of retries) the bar stops moving and one warning
    says so; the task goes on, as the GPU slot's lease does."""

    def __init__(self, post, every_s: float = 2.0):
        self.post, self.every_s = post, every_s
        self._latest: dict | None = None
        self._last = float("-inf")
        self._wake, self._closing, self.failures = threading.Event(), False, 0
        self._lock = threading.Lock()  # the hand-over of the newest event
        # Run in a copy of this context: the task run's Prefect settings and client, not a bare thread's.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="modelpress-progress", daemon=True)
        self._thread.start()

    def __call__(self, event: dict) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and event["done"] < event["total"]:
            return
        self._last = now
        with self._lock:
            self._latest = event
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                event, self._latest = self._latest, None
            if event is not None:
                try:
                    self.post(event)
                except Exception as e:  # noqa: BLE001 - the bar is a convenience; the work must go on
                    self.failures += 1
                    if self.failures == 1:
                        log.warning(
                            "progress bar not updated (the Prefect API did not answer: %s); the work goes on", error_line(e))
            with self._lock:
                if self._closing and self._latest is None:
                    return

    def close(self, wait_s: float = 5.0) -> None:
        """Post what is pending, waiting at most ``wait_s`` (an unreachable API is not waited for)."""
        self._closing = True
        self._wake.set()
        self._thread.join(wait_s)


@contextlib.contextmanager
def ui_progress(key: str, every_s: float = 2.0):
    """Mirror library progress events into a Prefect progress artifact (a bar in the UI)."""
    if TaskRunContext.get() is None:
        yield
        return
    try:
        artifact = create_progress_artifact(0.0, description=f"{key} progress")
    except Exception as e:  # noqa: BLE001 - no bar, same work
        log.warning("no progress bar for %s (the Prefect API did not answer: %s)", key, error_line(e))
        yield
        return
    try:
        mirror = ProgressMirror(lambda event: update_progress_artifact(
            artifact, 100.0 * event["done"] / event["total"], description=f"{event['stage']}: {event['done']}/{event['total']}"),
            every_s)
    except RuntimeError as e:  # no thread to be had: no bar, same work
        log.warning("no progress bar for %s: %s", key, error_line(e))
        yield
        return
    remove = add_listener(mirror)
    try:
        yield
    finally:
        remove()
        mirror.close()


# GPU-heavy tasks (teacher, compress, fine-tune) hold one slot of the global concurrency limit
# named by MODELPRESS_GPU_LIMIT while they run. infra/prefect-worker.sh creates that limit
# (one per machine, limit 1) and sets the variable, so a worker machine never runs two of them
# at once even if flow runs overlap. Unset (local runs): no limit, nothing to acquire.
GPU_TAG = "gpu"


@contextlib.contextmanager
def gpu_slot(lease_s: float = 300.0, renew_every_s: float = 15.0):
    """Hold one slot of the GPU limit while the block runs (see above).

    The slot is a lease the server expires ``lease_s`` after its last renewal, so the slot of a
    killed process frees itself. A thread renews it every ``renew_every_s`` (environment
    MODELPRESS_GPU_LEASE_RENEW_S overrides it). The lease survives a server restart when the server
    keeps leases on disk (infra/prefect-server.sh sets PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE).
    Unlike Prefect's ``concurrency(strict=True)``, which cancels the task when a renewal fails
    (seen as a misleading TaskRunTimeoutError) and so did after a restart of a server that had
    kept the lease in memory (410 Gone), the work always goes on: while the server is unreachable
    (beyond the client's own minute of retries) renewal is retried every 5 s; if the server no
    longer knows the lease (lost, or expired during an outage longer than ``lease_s``) a new one is
    taken as soon as a slot is free. On exit the lease is released, retrying for up to a minute.
    """
    name = os.environ.get("MODELPRESS_GPU_LIMIT", "").strip()
    ctx = TaskRunContext.get()
    if not name or ctx is None:
        yield
        return
    renew_every_s = float(os.environ.get("MODELPRESS_GPU_LEASE_RENEW_S", renew_every_s))
    from uuid import UUID

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    log = get_run_logger()
    holder = ConcurrencyLeaseHolder(type="task_run", id=ctx.task_run.id)

    def take(client, wait: bool) -> UUID | None:
        """A new lease on one slot; with ``wait``, until a slot is free (server outages included)."""
        unreachable = False
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=lease_s, holder=holder)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                delay = min(float(exc.response.headers.get("Retry-After", 5)), 10.0)
            except httpx.TransportError as exc:
                if not unreachable:
                    log.warning("GPU slot %r: Prefect server unreachable (%s); retrying", name, exc)
                    unreachable = True
                delay = 5.0
            else:
                body = response.json()
                if not body.get("limits"):
                    raise RuntimeError(f"GPU concurrency limit {name!r} does not exist "
                                       "(infra/prefect-worker.sh creates it; MODELPRESS_GPU_LIMIT names it)")
                return UUID(body["lease_id"])
            if not wait or stop.wait(delay):
                return None

    def keep(lease_id: UUID) -> None:
        """Renew until stopped; tolerate outages; take a new lease if the server lost this one."""
        away_since = None
        with get_client(sync_client=True) as client:
            while not stop.wait(renew_every_s if away_since is None else 5.0):
                try:
                    if lease_id is None:
                        lease_id = take(client, wait=False)
                        if lease_id is not None:
                            log.warning("GPU slot %r: holding it again under a new lease", name)
                            lease[0] = lease_id
                        continue
                    client.renew_concurrency_lease(lease_id, lease_duration=lease_s)
                    if away_since is not None:
                        log.info("GPU slot %r: Prefect server back after %.0f s; lease renewed", name,
                                 time.monotonic() - away_since)
                        away_since = None
                except httpx.TransportError as exc:
                    if away_since is None:
                        away_since = time.monotonic()
                        log.warning("GPU slot %r: Prefect server unreachable (%s); the work goes on, "
                                    "renewing the lease when it is back", name, exc)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code in (404, 410):
                        log.warning("GPU slot %r: the server lost this task's lease; taking a new one "
                                    "when a slot is free", name)
                        lease_id = lease[0] = None
                        away_since = None
                    else:
                        log.warning("GPU slot %r: lease renewal failed (%s); retrying", name, exc)
                except Exception as exc:  # noqa: BLE001 - never let the keeper thread die silently
                    log.warning("GPU slot %r: lease renewal failed (%s); retrying", name, exc)

    stop = threading.Event()
    log.info("waiting for GPU slot %r", name)
    with get_client(sync_client=True) as client:
        lease = [take(client, wait=True)]
    log.info("holding GPU slot %r", name)
    keeper = threading.Thread(target=keep, args=(lease[0],), daemon=True, name=f"gpu-slot-{name}")
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=30)
        if lease[0] is not None:
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        client.release_concurrency_slots_with_lease(lease[0])
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            log.warning("GPU slot %r: could not release the lease; the server frees "
                                        "it when it expires (%.0f s)", name, lease_s)
                            break
                        time.sleep(5)
                    except Exception as exc:  # noqa: BLE001 - must not hide the block's own outcome
                        log.warning("GPU slot %r: releasing the lease failed (%s); the server frees it "
                                    "when it expires (%.0f s)", name, exc, lease_s)
                        break


def log_device(requested: str) -> str:
    """Log (and return) the device a task computes on: CUDA when present, else the CPU. On a
    worker declared a GPU worker (MODELPRESS_REQUIRE_CUDA=1) no CUDA device is an error, unless
    the recipe asks for the CPU."""
    import torch

    from modelpress.train import resolve_device

    device = resolve_device(requested)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if not cuda and requested != "cpu" and os.environ.get("MODELPRESS_REQUIRE_CUDA", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("this worker is declared a GPU worker (MODELPRESS_REQUIRE_CUDA) but torch sees no CUDA device "
                           "(driver, the container's GPU access, or a CPU build of torch): the run would crawl on the CPU; "
                           "fix the machine, or give run.device: cpu to compute on the CPU anyway")
    if cuda:
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
