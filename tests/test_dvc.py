"""`dvc repro` runs the same stages as the flow, and reruns only what a change affects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TINY

pytestmark = pytest.mark.pipeline


def _sh(*cmd: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.usefixtures("fmnist_available")
def test_dvc_repro_reproduces_a_run(tmp_path, prefect_server, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, repo / f)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "t"]):
        _sh(*cmd, cwd=repo, env=env)

    out = _sh("dvc", "repro", cwd=repo, env=env)
    ran = yaml.safe_load((repo / "params.yaml").read_text())
    for stage in ("fetch", "teacher", "compress", "finetune", "pack", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = yaml.safe_load((repo / "data" / "metrics.json").read_text())
    assert metrics["packed_bytes"] == (repo / "data" / "model.mpk").stat().st_size
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "teacher", "compress", "finetune", "pack", "evaluate"}

    assert "Running stage" not in _sh("dvc", "repro", cwd=repo, env=env)  # all up to date
    params["method"]["kmeans_iters"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _sh("dvc", "status", cwd=repo, env=env)
    assert "compress:" in status and "teacher:" not in status and "fetch:" not in status

    # A run versioned from a checkout whose params.yaml names another work directory (a -S
    # override, a recipe from the UI form) pushes what its own dvc.lock names, and leaves the
    # checkout's params.yaml as it was.
    from prefect import flow

    from modelpress.recipe import Recipe
    from modelpress.tasks.versioning import version_outputs

    checkout = yaml.safe_dump({**ran, "run": {**ran["run"], "workdir": "elsewhere"}}, sort_keys=False)
    (repo / "params.yaml").write_text(checkout)
    remote = tmp_path / "remote"
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MODELPRESS_DVC", "on")
    monkeypatch.setenv("MODELPRESS_DVC_REMOTE", str(remote))

    @flow(validate_parameters=False)
    def version(recipe: Recipe) -> dict:
        return version_outputs(recipe, {})

    result = version(Recipe.parse(ran))
    assert result["dvc"] == "pushed" and result["remote"] == "modelpress"
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    outs = [o for st in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values() for o in st.get("outs", [])]
    assert len(outs) >= 6 and len(pushed) >= len(outs), (len(pushed), len(outs))
    assert (repo / "params.yaml").read_text() == checkout
