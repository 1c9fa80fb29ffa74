"""Pruning through the pipeline: cycles checkpoint and resume after a kill with the same final
weights, each cycle is its own Prefect task, and MLflow gets per-cycle metrics and a plot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from modelpress import stages
from modelpress.pack import read_packed
from modelpress.pack.format import build_from_packed

from helpers import REPO, run_cli, tiny_recipe

pytestmark = pytest.mark.pipeline

# Three cycles (30 %, 51 %, 60 %) of 0.075 epoch each on the real training set.
PRUNE = {"name": "prune", "target_sparsity": 0.6, "rate": 0.3, "rewind_fraction": 0.5}


def _state(path):
    return build_from_packed(read_packed(path)).state_dict()


def test_kill_during_a_cycle_then_resume(trained_workdir, tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(trained_workdir, ref)
    shutil.copytree(trained_workdir, work)
    stages.compress_stage(tiny_recipe(ref, method=PRUNE))
    assert len(stages.read_json(ref / "compress" / "cycles.json")["cycles"]) == 3

    params = tmp_path / "params.json"
    params.write_text(tiny_recipe(work, method=PRUNE).model_dump_json())
    args = ["stage", "compress", "--params", str(params)]
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    first = work / "compress" / "cycles" / "cycle-01.mpk"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well into cycle 2's retraining
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (work / "compress" / "cycles" / "cycle-03.mpk").exists()
    assert not (work / "compress" / "compressed.mpk").exists()
    untouched = first.stat().st_mtime_ns

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "prune-cycle-1: up to date" in resumed.stderr
    assert first.stat().st_mtime_ns == untouched  # finished cycles are not redone
    a, b = _state(ref / "compress" / "compressed.mpk"), _state(work / "compress" / "compressed.mpk")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for i in (1, 2, 3):
        name = f"cycle-0{i}.mpk"
        assert read_packed(ref / "compress" / "cycles" / name).meta["cycle"]["sparsity"] == \
            read_packed(work / "compress" / "cycles" / name).meta["cycle"]["sparsity"]


def test_deeper_target_reuses_finished_cycles(trained_workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained_workdir, work)
    stages.compress_stage(tiny_recipe(work, method={**PRUNE, "target_sparsity": 0.51}))
    cycles = work / "compress" / "cycles"
    before = {p.name: p.stat().st_mtime_ns for p in cycles.iterdir()}
    assert sorted(before) == ["cycle-01.mpk", "cycle-02.mpk"]
    stages.compress_stage(tiny_recipe(work, method=PRUNE))  # 60 %: same schedule, one more cycle
    after = {p.name: p.stat().st_mtime_ns for p in cycles.iterdir()}
    assert {k: after[k] for k in before} == before and "cycle-03.mpk" in after
    # A different retraining mode is a different chain: nothing reused.
    stages.compress_stage(tiny_recipe(work, method={**PRUNE, "retrain": "finetune"}))
    assert all(p.stat().st_mtime_ns != before.get(p.name) for p in cycles.iterdir())


def test_prune_pq_flow_logs_cycles_and_registers(prefect_server, workdir):
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from modelpress.flows.compress import compress_flow

    method = {"name": "prune_pq", "prune": {k: v for k, v in PRUNE.items() if k != "name"},
              "quantize": {"k": 16, "finetune_epochs": 0.02}}
    recipe = tiny_recipe(workdir, method=method, registry={"model_name": "prune-pq-test"})
    state = compress_flow(recipe, return_state=True)
    summary = state.result()
    packed = workdir / "model.mpk"
    assert summary["packed_bytes"] == os.path.getsize(packed)
    assert summary["sparsity"] == pytest.approx(0.6, abs=0.01)

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return sorted(r.name for r in runs)

    import asyncio

    names = asyncio.run(task_names())
    assert [n for n in names if n.startswith("prune-cycle")] == ["prune-cycle-1", "prune-cycle-2", "prune-cycle-3"]

    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    (version,) = client.search_model_versions("name='prune-pq-test'")
    assert version.tags["modelpress.method"] == "prune_pq"
    history = client.get_metric_history(version.run_id, "cycle_sparsity")
    assert [(m.step, round(m.value, 2)) for m in history] == [(1, 0.3), (2, 0.51), (3, 0.6)]
    assert len(client.get_metric_history(version.run_id, "cycle_top1")) == 3
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert "accuracy_vs_sparsity.png" in artifacts
    png = client.download_artifacts(version.run_id, "accuracy_vs_sparsity.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
