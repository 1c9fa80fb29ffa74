"""Retries only for transient failures: one classifier (tasks/transient.py), a case per class,
real failures where they can be made on loopback, and a real Prefect task that is retried
only when the failure is transient."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from modelpress.data import SourceUnavailable
from modelpress.data.fetch import fetch_files
from modelpress.tasks.transient import is_transient, retry_transient
from modelpress.tasks.versioning import DvcError, dvc

from services import free_port  # a loopback port nothing listens on

pytestmark = pytest.mark.unit


def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("nothing raised")


# ---- the network ---------------------------------------------------------------------------

def test_network_failures_are_transient():
    port = free_port()
    refused = _raised(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5))
    assert isinstance(refused, urllib.error.URLError) and is_transient(refused)
    assert is_transient(_raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=5)))
    for exc in (TimeoutError("timed out"), socket.timeout(), ConnectionResetError(), BrokenPipeError(),
                http.client.RemoteDisconnected("closed"), OSError(110, "Connection timed out")):
        assert is_transient(exc), exc


def test_local_and_input_errors_are_not_transient(tmp_path):
    for exc in (FileNotFoundError(2, "No such file", "x"), PermissionError(13, "Permission denied"),
                IsADirectoryError(21, "Is a directory"), OSError(28, "No space left on device"),
                ValueError("bad"), KeyError("k"), TypeError("t")):
        assert not is_transient(exc), exc
    # A task, flow or sweep point past its own time limit would only run out of it again.
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    from modelpress.sweep import PointTimeout

    for exc in (TaskRunTimeoutError("Scope timed out after 21600 second(s)."), FlowRunTimeoutError("timed out"),
                PointTimeout("point a timed out after 60 s")):
        assert isinstance(exc, TimeoutError) and not is_transient(exc), exc
    # A RuntimeError from a bad configuration is never retried...
    assert not is_transient(RuntimeError("dvc remote default failed: No default remote set"))
    # ...unless it was raised from a transient cause.
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)


# ---- HTTP and the fetch step ---------------------------------------------------------------

def test_http_status_codes():
    def err(code):
        return urllib.error.HTTPError("http://x/", code, "msg", {}, None)

    assert [is_transient(err(c)) for c in (500, 502, 503, 504, 408, 429)] == [True] * 6
    assert [is_transient(err(c)) for c in (400, 401, 403, 404, 410)] == [False] * 5


def test_fetch_failures_say_whether_they_are_transient(tmp_path, http_root):
    url, _root = http_root  # an HTTP server serving an empty directory: every file is a 404
    sha = "0" * 64
    missing_dir = _raised(lambda: fetch_files([str(tmp_path / "no-such-dir")], {"a.gz": sha}, tmp_path / "c1"))
    assert isinstance(missing_dir, SourceUnavailable) and not is_transient(missing_dir)
    not_found = _raised(lambda: fetch_files([url], {"a.gz": sha}, tmp_path / "c2"))
    assert isinstance(not_found, SourceUnavailable) and not is_transient(not_found)
    unreachable = _raised(lambda: fetch_files([f"http://127.0.0.1:{free_port()}"], {"a.gz": sha}, tmp_path / "c3"))
    assert isinstance(unreachable, SourceUnavailable) and is_transient(unreachable)
    # Any transient source makes the whole failure worth another try.
    mixed = _raised(lambda: fetch_files([str(tmp_path / "no-such-dir"), f"http://127.0.0.1:{free_port()}"],
                                        {"a.gz": sha}, tmp_path / "c4"))
    assert is_transient(mixed)


# ---- S3 --------------------------------------------------------------------------------------

def test_s3_errors(s3_env):
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    missing = _raised(lambda: s3_env.get_object(Bucket="no-such-bucket-here", Key="k"))
    assert isinstance(missing, ClientError) and not is_transient(missing)

    def client_error(status, code):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error(503, "SlowDown"))
    assert is_transient(client_error(500, "InternalError"))
    assert is_transient(client_error(400, "ThrottlingException"))
    assert not is_transient(client_error(403, "AccessDenied"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(NoCredentialsError())


def test_s3_endpoint_unreachable_is_transient(monkeypatch, tmp_path):
    import boto3
    from botocore.config import Config

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    assert is_transient(_raised(lambda: client.list_buckets()))


# ---- MLflow ----------------------------------------------------------------------------------

def test_mlflow_errors(monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = f"http://127.0.0.1:{free_port()}"
    down = _raised(lambda: MlflowClient(url, url).search_experiments())
    assert isinstance(down, MlflowException) and is_transient(down)
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE))


# ---- DVC -------------------------------------------------------------------------------------

@pytest.mark.pipeline
def test_dvc_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")  # a new DVC repo reports usage (a daemon per command) unless told not to
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q", cwd=repo)
    bad_config = _raised(lambda: dvc("remote", "modify", "no-such-remote", "url", "s3://b/p", cwd=repo))
    assert isinstance(bad_config, DvcError) and not is_transient(bad_config)
    # A remote that does not answer: the push is worth another try.
    (repo / "f.txt").write_text("x")
    dvc("add", "-q", "f.txt", cwd=repo)
    dvc("remote", "add", "-d", "r", "s3://bucket/p", cwd=repo)
    dvc("remote", "modify", "r", "endpointurl", f"http://127.0.0.1:{free_port()}", cwd=repo)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        unreachable = _raised(lambda: dvc("push", "-r", "r", cwd=repo, timeout=300))
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert isinstance(unreachable, DvcError) and is_transient(unreachable), unreachable
    # DVC's message when another DVC process holds the repository lock.
    lock_text = "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly."
    assert DvcError("dvc commit failed", transient=True).transient
    from modelpress.tasks.versioning import TRANSIENT_DVC

    assert TRANSIENT_DVC.search(lock_text)
    assert not TRANSIENT_DVC.search("ERROR: configuration error - config file error: remote 'x' doesn't exist")


# ---- a real Prefect task ---------------------------------------------------------------------

@pytest.mark.pipeline
def test_prefect_task_retries_only_transient_failures(prefect_server):
    from prefect import flow, task

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky(kind: str) -> str:
        calls.append(kind)
        if kind == "network" and calls.count(kind) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        if kind == "config":
            raise RuntimeError("bad configuration")
        return "ok"

    @flow
    def run(kind: str) -> str:
        return flaky(kind)

    assert run("network") == "ok" and calls.count("network") == 3  # two transient failures, retried
    with pytest.raises(RuntimeError, match="bad configuration"):
        run("config")
    assert calls.count("config") == 1  # never retried


def test_classifier_is_the_one_every_task_uses():
    """Every retrying task of the pipeline uses tasks/transient.py's condition."""
    from prefect import Task

    import modelpress.flows.compress  # noqa: F401 - imports every task module
    import modelpress.flows.sweep  # noqa: F401

    mods = [m for name, m in sys.modules.items() if name.startswith("modelpress.tasks.")]
    retrying = [obj for m in mods for obj in vars(m).values() if isinstance(obj, Task) and obj.retries]
    assert len(retrying) >= 8
    for t in retrying:
        assert t.retry_condition_fn is retry_transient, t.name
    assert Path(sys.modules["modelpress.tasks.common"].__file__).read_text().count("PERMANENT") == 0


# ---- the progress bar, while the Prefect API is away ---------------------------------------------

def test_progress_bar_updates_never_hold_up_the_work_and_an_unreachable_api_costs_a_warning(caplog):
    """The UI's progress bar is posted from a thread of its own: a post that hangs (the client
    retrying a server that is down) does not slow the loop that reports progress, and a post that
    fails (the retries exhausted) is one warning, not an exception in the task."""
    import threading
    import time

    from modelpress.progress import Progress, add_listener
    from modelpress.tasks.common import ProgressMirror

    release = threading.Event()
    posted: list[dict] = []

    def hanging(event: dict) -> None:
        posted.append(event)
        release.wait(30)
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    mirror = ProgressMirror(hanging, every_s=0.0)
    remove = add_listener(mirror)
    try:
        t0 = time.monotonic()
        bar = Progress("finetune", total=200, every_s=0.0)
        for _ in range(200):
            bar.update()
        loop_s = time.monotonic() - t0
    finally:
        remove()
    assert loop_s < 5, f"the loop waited for the API: {loop_s:.1f} s"
    deadline = time.monotonic() + 10
    while not posted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(posted) == 1, "a second post started while the first still hung"
    with caplog.at_level("WARNING", logger="modelpress"):
        release.set()
        mirror.close(wait_s=10)
    # After the hung post, the newest event (the last) is posted, no other in between.
    done = [p["done"] for p in posted]
    assert done[-1] == 200 and len(done) <= 2 and mirror.failures == len(done), (mirror.failures, done)
    warnings = [r.getMessage() for r in caplog.records if "progress bar not updated" in r.getMessage()]
    assert len(warnings) == 1 and "Connection refused" in warnings[0], warnings


def test_the_gpu_tasks_time_limit_is_set_by_the_worker_environment():
    """One attempt of a GPU task may take 6 h by default; MODELPRESS_GPU_TASK_TIMEOUT_H sets it
    (a fine-tuning that takes longer on the pool's machines), and a bad value names itself."""
    from modelpress.tasks import steps

    assert steps.gpu_task_timeout_s({}) == 6 * 3600
    assert steps.gpu_task_timeout_s({"MODELPRESS_GPU_TASK_TIMEOUT_H": "12.5"}) == 45_000
    for bad in ("0", "-1", "six", "nan", "inf"):
        with pytest.raises(ValueError, match=f"MODELPRESS_GPU_TASK_TIMEOUT_H='{bad}'"):
            steps.gpu_task_timeout_s({"MODELPRESS_GPU_TASK_TIMEOUT_H": bad})
    expected = steps.gpu_task_timeout_s(os.environ)
    for task in (steps.prepare_teacher, steps.method_step, steps.compress_model, steps.finetune_model):
        assert task.timeout_seconds == expected, task.name


def test_a_gpu_worker_without_cuda_fails_instead_of_crawling_on_the_cpu(monkeypatch):
    """MODELPRESS_REQUIRE_CUDA on a worker (infra/docker/compose.prod.yaml sets it): no CUDA
    device is an error naming the cause, unless the recipe asks for the CPU; unset, the CPU."""
    import torch

    from modelpress.tasks.common import log_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing falls back")
    assert log_device("auto") == "cpu"
    monkeypatch.setenv("MODELPRESS_REQUIRE_CUDA", "1")
    for requested in ("auto", "cuda"):
        with pytest.raises(RuntimeError, match="declared a GPU worker .MODELPRESS_REQUIRE_CUDA. but torch sees no CUDA device"):
            log_device(requested)
    assert log_device("cpu") == "cpu"
