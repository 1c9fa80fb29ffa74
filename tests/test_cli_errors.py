"""Bad input through the real command: one clear line naming the cause, a non-zero exit,
nothing half written in the work directory, nothing registered."""

from __future__ import annotations

import gzip
import shutil
import socket
import time
from pathlib import Path

import pytest

from modelpress.data import sha256_file

from helpers import FMNIST, run_cli

pytestmark = pytest.mark.pipeline

FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modelpress: error: ")
    for n in needles:
        assert n in last, last
    return last


def _no_partial_files(root: Path) -> None:
    if root.exists():
        assert not [p for p in root.rglob("*") if p.name.startswith(".partial")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("method.linear.k=1", "method.linear.k"),
        ("finetune.epochs=-1", "finetune.epochs"),
        ("method.lnear.k=8", "method.lnear"),
        ("teacher.arch=resnet999", "unknown model 'resnet999'"),
        ("run.device=tpu", "run.device"),
    ],
)
def test_invalid_params_fail_before_any_work(tmp_path, override, needle):
    proc = run_cli("run", "-S", f"run.workdir={tmp_path / 'w'}", "-S", override)
    _one_line_error(proc, needle)
    assert not (tmp_path / "w").exists()  # failed before any work


def test_invalid_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("method:\n  kmeans_iters: many\n")
    _one_line_error(run_cli("run", "--params", str(bad)), "method.kmeans_iters")


def _truncated_source(tmp_path: Path) -> tuple[Path, str, bytes]:
    """A copy of the data set whose t10k images are cut to a third, and a data.files override
    with the checksums of those bytes (so the fetch passes): (folder, override, original bytes)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in FILES:
        shutil.copy(FMNIST / f, src / f)
    blob = (src / "t10k-images-idx3-ubyte.gz").read_bytes()
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 3])
    files = "{" + ", ".join(f"{f}: {sha256_file(src / f)}" for f in FILES) + "}"
    return src, files, blob


def test_failure_inside_a_task_is_one_line_and_the_traceback_is_in_the_log(tmp_path):
    """A data file that passes its checksum (recorded for the truncated bytes) but cannot be read
    fails inside the teacher task, not up front: the terminal shows the one-line error and no
    traceback, the run's log file has the traceback, nothing is retried."""
    src, files, _ = _truncated_source(tmp_path)
    work = tmp_path / "w"
    proc = run_cli("run", "-S", f"run.workdir={work}", "-S", "registry.enabled=false", "-S", f"data.sources=[{src}]",
                   "-S", f"data.files={files}", env={"MODELPRESS_DVC": "off"})
    _one_line_error(proc, "t10k-images-idx3-ubyte.gz", "truncated or corrupt")
    assert "Traceback" not in proc.stderr and "Retry" not in proc.stderr
    logs = list((work / "logs").glob("run-*.log"))
    assert len(logs) == 1 and f"log (with tracebacks): {logs[0]}" in proc.stderr
    assert "Traceback (most recent call last)" in logs[0].read_text()


def test_unreachable_tracking_server_fails_within_a_minute(tmp_path):
    t0 = time.monotonic()
    proc = run_cli("run", "-S", f"run.workdir={tmp_path / 'w'}", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"})
    _one_line_error(proc, "MLflow tracking server", "unreachable")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "w").exists()  # nothing started


def test_wrong_checksum(tmp_path):
    files = "{" + ", ".join(f"{f}: {'ab' * 32 if f.startswith('t10k-labels') else sha256_file(FMNIST / f)}" for f in FILES) + "}"
    proc = run_cli("stage", "fetch", "-S", f"run.workdir={tmp_path}", "-S", f"data.sources=[{FMNIST}]", "-S", f"data.files={files}")
    _one_line_error(proc, "t10k-labels-idx1-ubyte.gz", "sha256")
    assert not (tmp_path / "datasets" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    _no_partial_files(tmp_path)


def test_missing_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("stage", "fetch", "-S", f"run.workdir={tmp_path / 'w'}", "-S", f"data.sources=[{empty}]")
    _one_line_error(proc, "train-images-idx3-ubyte.gz", "no such file")
    _no_partial_files(tmp_path / "w")


def test_unreachable_url(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/fmnist"
    proc = run_cli("stage", "fetch", "-S", f"run.workdir={tmp_path}", "-S", f"data.sources=[{url}]")
    _one_line_error(proc, "127.0.0.1", "refused")
    _no_partial_files(tmp_path)


def test_unreachable_s3_bucket(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        proc = run_cli("stage", "fetch", "-S", f"run.workdir={tmp_path}", "-S", "data.sources=[s3://no-such-bucket/fmnist]", env=env)
    finally:
        server.stop()
    _one_line_error(proc, "no-such-bucket")
    _no_partial_files(tmp_path)


def test_truncated_archive(tmp_path):
    """A truncated .gz whose checksum was (wrongly) recorded for the truncated bytes passes
    the fetch, and the data set reader names it."""
    src, files, blob = _truncated_source(tmp_path)
    work = tmp_path / "w"
    fetch = run_cli("stage", "fetch", "-S", f"run.workdir={work}", "-S", f"data.sources=[{src}]", "-S", f"data.files={files}")
    assert fetch.returncode == 0, fetch.stderr
    proc = run_cli("stage", "teacher", "-S", f"run.workdir={work}", "-S", f"data.sources=[{src}]", "-S", f"data.files={files}")
    _one_line_error(proc, "t10k-images-idx3-ubyte.gz", "truncated or corrupt")
    assert not (work / "teacher").exists()
    with pytest.raises(EOFError):
        gzip.decompress(blob[: len(blob) // 3])


def test_tampered_packed_file_is_refused(tmp_path, workdir):
    packed = workdir / "teacher" / "teacher.mpk"
    data = bytearray(packed.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "bad.mpk"
    bad.write_bytes(bytes(data))
    _one_line_error(run_cli("inspect", str(bad)), "checksum mismatch")
    ok = run_cli("inspect", str(packed))
    assert ok.returncode == 0 and "fmnist_cnn" in ok.stdout


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.target_sparsity=1.0"], "method.target_sparsity: Input should be less than 1"),
        (["method.target_sparsity=0"], "method.target_sparsity: Input should be greater than 0"),
        (["method.exclude=[classifier.9]"], "exclude: 'classifier.9' matches no Conv2d/Linear layer"),
        (["method.exclude=['*']"], "no prunable layers in FashionCNN"),
        (["method.target_bytes=1000"], "smallest reachable packed size is"),
    ],
)
def test_invalid_pruning_settings_fail_before_any_training(tmp_path, overrides, needle):
    args = ["run", "-S", f"run.workdir={tmp_path / 'w'}", "-S", "method.name=prune"]
    for o in overrides:
        args += ["-S", o]
    _one_line_error(run_cli(*args), needle)
    assert not (tmp_path / "w").exists()


def test_unreachable_s3_endpoint_fails_within_a_minute(tmp_path):
    """An S3 endpoint nobody answers on: one line naming the source, well within 60 s (boto3's
    connect timeout and retries are bounded by the fetcher)."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.monotonic()
    proc = run_cli("stage", "fetch", "-S", f"run.workdir={tmp_path / 'w'}", "-S", "data.sources=[s3://bucket/fmnist]", env=env)
    elapsed = time.monotonic() - t0
    _one_line_error(proc, "s3://bucket/fmnist")
    assert elapsed < 60, f"{elapsed:.0f} s"
    print(f"unreachable S3 endpoint: failed after {elapsed:.1f} s (process start included)")
    _no_partial_files(tmp_path)
