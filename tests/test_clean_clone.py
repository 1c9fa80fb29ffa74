"""What a newcomer does first: clone the repository and run the README's run command, with no
local configuration (no .dvc/config.local, no DVC remote, no MLFLOW_/PREFECT_/AWS_/MODELPRESS_
variables). Only the training and evaluation lengths are shortened, through the Makefile's ARGS."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess

import pytest

from helpers import FMNIST, REPO
from services import free_port

pytestmark = pytest.mark.services

# The README's run command, exactly as written there.
RUN_COMMAND = "make run"
SHORT = ("-S teacher.epochs=0.2 -S method.calibration_images=256 -S method.kmeans_iters=5 "
         "-S method.layer_finetune_epochs=0.01 -S finetune.epochs=0.05 -S finetune.bn_batches=5 "
         "-S data.test_images=2000")
PROJECT_ENV = ("MODELPRESS_", "MLFLOW_", "PREFECT_", "AWS_", "DVC_", "VIRTUAL_ENV", "PYTHONPATH", "PYTEST_",
               # A workstation does not set it (CI images do: CI's own `make setup` from a clean
               # checkout takes that branch of the Makefile, this test the other).
               "PYTHONDONTWRITEBYTECODE")


def newcomer_env() -> dict:
    """The machine's environment without anything this project or its test run configures."""
    return {k: v for k, v in os.environ.items() if not k.startswith(PROJECT_ENV)}


def _git(*args: str, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_readme_run_on_clean_clone(tmp_path):
    if not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail("dataset-fashion-mnist is not installed (make setup installs it)")
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^{RUN_COMMAND}\b", readme, re.M), "the README no longer shows the run command this test runs"

    clone = tmp_path / "clone"
    _git("clone", "-q", str(REPO), str(clone), cwd=tmp_path)
    assert not (clone / ".dvc" / "config.local").exists()
    params_before = (clone / "params.yaml").read_bytes()

    proc = subprocess.run(f'{RUN_COMMAND} ARGS="{SHORT}"', shell=True, cwd=clone, env=newcomer_env(),
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    # The run's results, where the README says they are.
    assert (clone / "data" / "metrics.json").is_file()
    assert (clone / "data" / "model.mpk").stat().st_size > 0
    m = re.search(r"^registered: (\S+) version (\d+)", out, re.M)
    assert m, out[-3000:]
    with sqlite3.connect(clone / "mlruns" / "mlflow.db") as db:
        rows = db.execute("select name, version from model_versions").fetchall()
    assert rows == [(m.group(1), int(m.group(2)))]
    # No DVC remote: the outputs are committed to the local cache and the push is skipped, in one line.
    assert "DVC push skipped: no DVC remote is configured" in out
    assert (clone / "data" / "lineage" / "dvc.lock").read_bytes() == (clone / "dvc.lock").read_bytes()
    assert "Traceback" not in out

    # The checkout: tracked files untouched; the only new file is the one the README names.
    assert (clone / "params.yaml").read_bytes() == params_before
    status = _git("status", "--porcelain", cwd=clone).splitlines()
    assert status == ["?? dvc.lock"], status

    # The newcomer then adds a DVC remote that cannot be reached: the push is retried as a
    # transient failure, then the run fails with one line and registers nothing.
    closed = free_port()  # nothing listens there
    for args in (["remote", "add", "-d", "storage", "s3://modelpress/dvc"],
                 ["remote", "modify", "storage", "endpointurl", f"http://127.0.0.1:{closed}"]):
        subprocess.run([str(clone / ".venv" / "bin" / "dvc"), *args], cwd=clone, check=True, capture_output=True)
    with sqlite3.connect(clone / "mlruns" / "mlflow.db") as db:
        runs_before = db.execute("select count(*) from runs").fetchone()[0]
    env = {**newcomer_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.run(f'{RUN_COMMAND} ARGS="{SHORT}"', shell=True, cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("modelpress: error:")]
    assert len(errors) == 1 and "dvc push" in errors[0], out[-3000:]
    assert "Retry 2/2" in out  # transient: retried, and only then given up
    assert "Task run 'register" not in out
    with sqlite3.connect(clone / "mlruns" / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == runs_before
    assert (clone / "params.yaml").read_bytes() == params_before

