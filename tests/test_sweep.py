"""Sweeps: points fan out concurrently, a killed sweep reruns only its missing points, the
Pareto front is computed right and lands in the folder, Prefect and MLflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from modelpress.recipe import Recipe, RecipeError
from modelpress.report import pareto_front
from modelpress.sweep import SweepConfig

from helpers import REPO, TEST_IMAGES, TINY, run_cli

pytestmark = pytest.mark.pipeline

POINTS = [
    {"name": "uniform4", "series": "uniform (baseline)", "set": {"method.name": "uniform", "method.bits": 4}},
    {"name": "kmeans3", "set": {"method.name": "kmeans", "method.bits": 3, "method.kmeans_iters": 5}},
    {"name": "pq", "set": {"method.linear": {"block_size": 8, "k": 32}}},
]


def test_pareto_front():
    rows = [{"packed_bytes": b, "top1": a, "name": n} for n, b, a in
            [("a", 100, 80.0), ("b", 200, 79.0), ("c", 300, 85.0), ("d", 300, 84.0), ("e", 50, 70.0), ("f", 400, 85.0)]]
    front = {r["name"] for r in pareto_front(rows) if r["on_front"]}
    assert front == {"e", "a", "c"}  # b is beaten by the smaller a, d and f by c


def test_sweep_file_errors(tmp_path):
    base = Recipe()
    def load(raw):
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump(raw))
        return SweepConfig.from_yaml(f, base)
    with pytest.raises(RecipeError, match="unique: a"):
        load({"points": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(RecipeError, match="teacher.epochs.*base recipe"):
        load({"points": [{"name": "a", "set": {"teacher.epochs": 1}}]})
    with pytest.raises(RecipeError, match="at least one point"):
        load({"name": "x"})
    with pytest.raises(RecipeError, match="concurrency"):
        load({"budgets": [50000], "concurrency": 0})
    sweep = load({"name": "s", "budgets": [50000], "points": [{"name": "u", "set": {"method.name": "uniform"}}]})
    points = dict(sweep.expand())
    assert points["pq-50000B"].method.target_bytes == 50000 and points["u"].method.name == "uniform"
    assert points["u"].run.workdir == str(sweep.root() / "points" / "u")
    with pytest.raises(RecipeError, match="points b and c have the same settings"):  # c sets the base's own value
        load({"points": [{"name": "b", "set": {"method.name": "uniform"}},
                         {"name": "c", "set": {"method.name": "uniform", "finetune.train_other": True}}]}).expand()
    with pytest.raises(RecipeError, match="point bad: method.bits"):
        SweepConfig(name="s", points=[{"name": "bad", "set": {"method.name": "uniform", "method.bits": 9}}]).expand()


def test_bad_point_fails_before_any_work(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "bad", "workdir": str(tmp_path / "out"), "points": [
        {"name": "ok", "set": {"method.name": "uniform"}},
        {"name": "typo", "set": {"method.name": "kmeans", "method.exclude": ["no_such_layer"]}}]}))
    proc = run_cli("sweep", str(sweep), "--params", str(_params(tmp_path, tmp_path / "work")))
    assert proc.returncode == 1
    assert "sweep point typo: exclude: 'no_such_layer' matches no Conv2d/Linear layer" in proc.stderr
    assert not (tmp_path / "out").exists()


def _params(tmp_path, workdir):
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["run"]["workdir"] = str(workdir)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(raw))
    return path


def test_kill_mid_sweep_then_rerun_completes_only_the_missing_points(trained_workdir, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(trained_workdir, root)  # the sweep's shared dataset and (current) teacher
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "kill", "workdir": str(root), "concurrency": 1, "points": POINTS}))
    params = _params(tmp_path, tmp_path / "unused")
    cmd = [sys.executable, "-m", "modelpress", "sweep", str(sweep), "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (done := list(root.glob("points/*/point.json"))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: CLI, Prefect server, point worker
    proc.wait()
    done_before = {p.parent.name for p in root.glob("points/*/point.json")}
    assert done_before and done_before != {p["name"] for p in POINTS}
    assert not (root / "sweep.json").exists()
    first = done[0]
    stamp = first.stat().st_mtime_ns

    rerun = run_cli("sweep", str(sweep), "--params", str(params))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert first.stat().st_mtime_ns == stamp  # not recomputed
    record = json.loads((root / "sweep.json").read_text())
    rows = {r["point"]: r for r in record["points"]}
    assert set(rows) == {p["name"] for p in POINTS} and not record["failed"]
    assert {n for n, r in rows.items() if r["reused"]} == done_before
    for name, r in rows.items():  # every number comes from the point's own packed file
        metrics = json.loads((root / "points" / name / "metrics.json").read_text())
        assert r["packed_bytes"] == (root / "points" / name / "model.mpk").stat().st_size == metrics["packed_bytes"]
        assert r["top1"] == metrics["compressed_top1"] and metrics["test_images"] == TEST_IMAGES
    assert {r["method"] for r in rows.values()} == {"uniform", "kmeans", "pq"}
    assert rows["uniform4"]["series"] == "uniform (baseline)" and rows["pq"]["series"] == "pq"
    assert any(r["on_front"] for r in rows.values())
    for f in ("front.md", "front.csv", "front.png"):
        assert (root / f).stat().st_size > 0
    assert (root / "front.png").read_bytes()[:4] == b"\x89PNG"

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])  # where the sweep wrote
    versions = {str(v.version): v for v in client.search_model_versions("name='fmnist-cnn-kill'")}
    assert {str(r["version"]) for r in rows.values()} <= set(versions)
    for r in rows.values():
        tags = versions[str(r["version"])].tags
        assert tags["modelpress.pareto_front"] == str(r["on_front"]).lower() and tags["modelpress.sweep"] == "kill"
    parent = client.search_runs([client.get_experiment_by_name("modelpress").experiment_id],
                                "tags.`modelpress.sweep` = 'kill'")[0]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"front.png", "front.csv", "sweep.json", "sweep_config.json", "base_recipe.json"} <= arts
    config = json.loads(open(client.download_artifacts(parent.info.run_id, "sweep_config.json", str(tmp_path))).read())
    assert [p["name"] for p in config["points"]] == [p["name"] for p in POINTS]  # the definition, kept beside the results
    children = {client.get_run(versions[str(r["version"])].run_id).data.tags.get("mlflow.parentRunId") for r in rows.values()
                if not r["reused"]}
    assert children == {parent.info.run_id}


def test_a_failing_point_is_reported_not_retried_and_does_not_sink_the_sweep(trained_workdir, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(trained_workdir, root)
    (root / "points" / "broken").mkdir(parents=True)
    (root / "points" / "broken" / "compress").write_text("a file where the point's folder must go")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "fail", "workdir": str(root), "points": [
        {"name": "good", "set": {"method.name": "uniform", "method.bits": 8}},
        {"name": "broken", "set": {"method.name": "uniform", "method.bits": 4}}]}))
    proc = run_cli("sweep", str(sweep), "--params", str(_params(tmp_path, tmp_path / "unused")))
    assert proc.returncode == 1  # a nightly job must notice
    out = proc.stdout + proc.stderr
    # A file where a folder must go is bad input: not retried (tasks/transient.py), reported.
    assert "Retry 1/1" not in out and "failed: broken" in out
    # The sweep's flow run ends Failed (a green run in the UI hid the failed point), its front published.
    assert re.search(r"Finished in state Failed\([\"']sweep fail: 1 of 2 points failed \(broken: ", out), out[-3000:]
    record = json.loads((root / "sweep.json").read_text())
    assert [r["point"] for r in record["points"]] == ["good"] and "broken" in record["failed"]
    assert "broken" in (root / "front.md").read_text()


def test_local_sweep_runs_points_with_the_library_alone(trained_workdir, tmp_path):
    """python -m modelpress.sweep (for a GPU box with PyTorch and little else): same point folders
    and results as the sweep command, no Prefect or MLflow imported, finished points not redone,
    a point past --deadline-s killed and reported."""
    root = tmp_path / "sweep"
    shutil.copytree(trained_workdir, root)
    sweep = tmp_path / "sweep.yaml"
    quick = {**POINTS[0], "set": {**POINTS[0]["set"], "finetune.epochs": 0}}  # no distillation: seconds
    sweep.write_text(yaml.safe_dump({"name": "local", "workdir": str(root), "points": [
        quick, {"name": "slow", "set": {"method.name": "kmeans", "method.bits": 2, "finetune.epochs": 50}}]}))
    blocked = tmp_path / "blocked"
    for mod in ("prefect", "mlflow", "dvc"):
        (blocked / mod).mkdir(parents=True)
        (blocked / mod / "__init__.py").write_text(f"raise ImportError('{mod} must not be imported here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO)])}
    cmd = [sys.executable, "-m", "modelpress.sweep", str(sweep), "--params", str(_params(tmp_path, tmp_path / "x")),
           "--concurrency", "2", "--threads", "1", "--out", str(tmp_path / "r.json")]
    first = subprocess.run(cmd + ["--only", "uniform4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    metrics = json.loads((root / "points" / "uniform4" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "r.json").read_text())["points"]["uniform4"]["summary"]
    assert summary["compressed_top1"] == metrics["compressed_top1"]
    assert summary["packed_bytes"] == (root / "points" / "uniform4" / "model.mpk").stat().st_size
    stamp = (root / "points" / "uniform4" / "point.json").stat().st_mtime_ns
    # Every point, with a deadline: the finished one is not recomputed (however slow this machine
    # is, it needs no time), the slow one trains on one core until it is killed at the deadline.
    proc = subprocess.run(cmd + ["--deadline-s", "15"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "r.json").read_text())
    assert set(out["points"]) == {"uniform4"} and "timed out after" in out["failed"]["slow"], out["failed"]
    assert "(--deadline-s)" in out["failed"]["slow"]
    assert out["points"]["uniform4"]["summary"] == summary
    assert not (root / "points" / "slow" / "point.json").exists()
    assert (root / "points" / "uniform4" / "point.json").stat().st_mtime_ns == stamp  # not recomputed
    # Without --deadline-s the sweep file's own limit per point holds (a hung point is not waited for).
    raw = yaml.safe_load(sweep.read_text())
    sweep.write_text(yaml.safe_dump({**raw, "point_timeout_h": 0.004}))  # 14 s
    proc = subprocess.run(cmd + ["--only", "slow"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = json.loads((tmp_path / "r.json").read_text())["failed"]
    assert "timed out after 14 s (sweep point_timeout_h)" in failed["slow"], failed


def test_a_point_whose_registration_fails_is_reported_and_the_others_keep_their_versions():
    """The registry failing for one point (an S3 403 on its file, a server error after the
    retries) must not lose the front every point computed for hours."""
    from modelpress.tasks.sweep import register_points

    rows = [{"point": n} for n in ("a", "b", "c")]
    results = {"a": {"registered": {"version": "3"}}, "b": {}, "c": {}}

    def register(name, _rec):
        if name == "b":
            raise RuntimeError("S3 PutObject: AccessDenied\nmore lines")
        return {"version": "7"}

    failed: dict[str, str] = {}
    register_points(rows, results, register, failed)
    assert [r["version"] for r in rows] == ["3", None, "7"]
    assert failed == {"b": "registration failed: S3 PutObject: AccessDenied"}


@pytest.mark.unit
def test_the_front_says_what_was_measured_and_on_how_many_inputs(tmp_path):
    """A quick sweep (-S data.test_images=2000) or a text encoder's (embedding cosine) must not be
    published as top-1 on the full test set."""
    from modelpress.sweep import result_row, write_results

    def rec(top1, size, **more):
        summary = {"compressed_top1": top1, "top1_drop": 91.0 - top1, "packed_bytes": size, "compression_ratio": 1e6 / size,
                   "method": "pq", "packed_sha256": "x", "test_images": 2000, **more}
        return {"summary": summary, "seconds": {"total": 10.0}}

    sweep = SweepConfig(name="quick", workdir=str(tmp_path / "q"), points=[{"name": "a"}])
    write_results(sweep, [result_row("a", rec(90.5, 50_000))], {"arch": "cnn", "top1": 91.0, "fp32_bytes": 10**6}, {}, 12.0)
    head = (tmp_path / "q" / "front.md").read_text().splitlines()[2]
    assert "Top-1 (column top1) on the 2,000 test images, from each packed file" in head and "full" not in head
    text = SweepConfig(name="text", workdir=str(tmp_path / "t"), points=[{"name": "a"}])
    write_results(text, [result_row("a", rec(97.0, 50_000, metric="embedding_cosine"))], {"arch": "hf", "top1": 100.0}, {}, 1.0)
    head = (tmp_path / "t" / "front.md").read_text().splitlines()[2]
    assert head.startswith("Teacher hf: embedding cosine to the teacher 100.00 %")
    assert "Embedding cosine to the teacher (column top1) on the 2,000 test texts" in head


@pytest.mark.unit
def test_the_library_sweep_command_answers_bad_input_with_one_line(tmp_path, capsys):
    from modelpress.sweep import main

    params = _params(tmp_path, tmp_path / "work")
    cases = [({"points": [{"name": "a"}, {"name": "a"}]}, "point names must be unique: a"),
             ({"points": [{"name": "typo", "set": {"method.name": "kmeans", "method.exclude": ["no_such_layer"]}}]},
              "sweep point typo: exclude: 'no_such_layer' matches no Conv2d/Linear layer"),
             ({"points": [{"name": "a", "set": {"method.nmae": "pq"}}]}, "nmae")]
    for content, needle in cases:
        sweep = tmp_path / "s.yaml"
        sweep.write_text(yaml.safe_dump({"workdir": str(tmp_path / "out"), **content}))
        assert main([str(sweep), "--params", str(params)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m modelpress.sweep: error: ") and needle in err[0], err
    sweep.write_text(yaml.safe_dump({"workdir": str(tmp_path / "out"), "points": [{"name": "a"}]}))
    assert main([str(sweep), "--params", str(params), "--only", "nope"]) == 2
    assert "no such point" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.unit
def test_the_library_sweep_reads_its_base_recipe_as_the_sweep_command_does(tmp_path, monkeypatch):
    """`python -m modelpress.sweep S --params P` on the GPU box and `modelpress sweep S --params P`
    after it must compute the same points (the same keys), or the second redoes them all."""
    from modelpress.cli import _recipe
    from modelpress.sweep import base_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pack": {"codebook_dtype": "i8"}, "finetune": {"epochs": 3}}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"finetune": {"epochs": 8}}))
    lib = base_recipe("p.yaml", ["run.seed=3"])
    assert lib.pack.codebook_dtype == "i8" and lib.finetune.epochs == 8 and lib.run.seed == 3
    args = type("Args", (), {"params": "p.yaml", "set": ["run.seed=3"], "whole": False})()
    assert lib == _recipe(args)
    assert base_recipe("p.yaml", [], whole=True).pack.codebook_dtype == "f16"


def test_a_sweep_point_is_measured_by_a_fresh_process(trained_workdir, tmp_path, monkeypatch):
    """A point's figures (and the registry card built from them) come from the packed file loaded
    by a new interpreter, as the compression flow measures and as a consumer loads it."""
    from modelpress import stages
    from modelpress.stages import pipeline
    from modelpress.sweep import run_point

    from helpers import tiny_recipe

    work = shutil.copytree(trained_workdir, tmp_path / "w")
    recipe = tiny_recipe(work, method={"name": "uniform", "bits": 4}, finetune={"epochs": 0})

    def here(*_a, **_k):
        raise AssertionError("evaluated in the point's own process")

    monkeypatch.setattr(stages, "evaluate_file", here)
    monkeypatch.setattr(pipeline, "evaluate_file", here)
    rec = run_point(recipe)
    assert rec["summary"]["packed_bytes"] == stages.paths(recipe)["packed"].stat().st_size
    assert rec["summary"]["test_images"] == TEST_IMAGES


def test_a_local_sweep_is_refused_on_a_control_worker(tmp_path, monkeypatch):
    """A sweep from the UI form with runner 'local' would compute every point on the sweeps'
    control worker (no GPU, no GPU slot): refused before any work, naming the choice to make."""
    from modelpress.tasks.sweep import check_sweep

    sweep = SweepConfig(name="ui", workdir=str(tmp_path / "s"), runner="local", points=[{"name": "a"}])
    monkeypatch.setenv("MODELPRESS_WORKER_KIND", "control")
    with pytest.raises(ValueError, match="choose runner 'deployment'"):
        check_sweep.fn(sweep)
