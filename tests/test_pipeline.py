"""The whole flow on real data with a real Prefect server and a real MLflow registry."""

from __future__ import annotations

import json
import os

import pytest

from helpers import TEST_IMAGES, tiny_recipe

pytestmark = pytest.mark.pipeline



def _registry():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])


def _versions(name: str) -> list:
    return _registry().search_model_versions(f"name='{name}'")


def test_flow_end_to_end_registers_packed_model(prefect_server, workdir):
    from modelpress.flows.compress import compress_flow

    recipe = tiny_recipe(workdir, registry={"model_name": "e2e-test"})
    summary = compress_flow(recipe)

    packed = workdir / "model.mpk"
    assert summary["packed_bytes"] == os.path.getsize(packed)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["packed_bytes"] == os.path.getsize(packed)
    assert metrics["test_images"] == TEST_IMAGES
    assert metrics["compression_ratio"] > 15
    # A briefly trained teacher still beats chance by far; the compressed model must follow it.
    assert metrics["teacher_top1"] > 60
    assert metrics["compressed_top1"] > metrics["teacher_top1"] - 10

    (version,) = _versions("e2e-test")
    assert version.tags["modelpress.packed_bytes"] == str(metrics["packed_bytes"])
    run = _registry().get_run(version.run_id)
    assert run.data.metrics["compressed_top1"] == pytest.approx(metrics["compressed_top1"])
    assert run.data.metrics["compression_ratio"] == pytest.approx(metrics["compression_ratio"])
    assert run.data.params["method.linear.k"] == "64"
    # Stage times of the run: in MLflow, in the workdir and as a Prefect artifact.
    timings = json.loads((workdir / "run_timings.json").read_text())
    assert {"fetch", "teacher", "compress", "finetune", "pack", "evaluate", "version", "register", "total"} <= set(timings)
    for stage in ("teacher", "compress", "finetune", "evaluate"):
        assert run.data.metrics[f"seconds_{stage}"] == pytest.approx(timings[stage])
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 1
    from prefect.artifacts import Artifact

    table = Artifact.get("stage-seconds")
    assert table is not None and {row["stage"] for row in json.loads(table.data)} == set(timings)


def test_rerun_skips_finished_stages(prefect_server, workdir):
    from modelpress.flows.compress import compress_flow

    recipe = tiny_recipe(workdir, registry={"enabled": False})
    compress_flow(recipe)
    outputs = [workdir / "teacher" / "teacher.mpk", workdir / "compress" / "compressed.mpk", workdir / "finetune" / "finetuned.mpk"]
    before = [p.stat().st_mtime_ns for p in outputs]
    compress_flow(recipe)
    assert [p.stat().st_mtime_ns for p in outputs] == before
    # A changed method parameter recomputes compression onwards, not the teacher.
    compress_flow(tiny_recipe(workdir, registry={"enabled": False}, method={"kmeans_iters": 3}))
    after = [p.stat().st_mtime_ns for p in outputs]
    assert after[0] == before[0] and after[1] != before[1] and after[2] != before[2]


def test_bad_checksum_fails_flow_and_registers_nothing(prefect_server, workdir):
    from modelpress.data import ChecksumMismatch
    from modelpress.flows.compress import compress_flow

    shutil_target = workdir / "datasets" / "fashion-mnist"
    for f in shutil_target.iterdir():
        f.unlink()
    recipe = tiny_recipe(workdir, registry={"model_name": "bad-checksum-test"})
    files = dict(recipe.data.files)
    files["t10k-labels-idx1-ubyte.gz"] = "0" * 64
    recipe = tiny_recipe(workdir, registry={"model_name": "bad-checksum-test"}, data={"files": files})
    with pytest.raises(ChecksumMismatch, match="t10k-labels-idx1-ubyte.gz"):
        compress_flow(recipe)
    assert _versions("bad-checksum-test") == []
    assert not (shutil_target / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in shutil_target.iterdir() if p.name.startswith(".partial")]
    assert not (workdir / "model.mpk").exists()


def test_the_evaluation_process_reads_the_runs_recipe_not_the_checkouts_params(workdir, tmp_path, monkeypatch):
    """The evaluate task hands the run's whole recipe to a fresh process. A field the run left
    empty (here teacher.arch_kwargs, as a Prefect form or `-S teacher.arch_kwargs=null` leaves it)
    must stay empty there, whatever the params.yaml of the directory it starts in sets."""
    import shutil

    import yaml

    from modelpress.tasks.steps import evaluate_packed

    shutil.copy(workdir / "teacher" / "teacher.mpk", workdir / "model.mpk")  # an fp32 packed file
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teacher": {"arch": "cifar_vit", "arch_kwargs": {"num_layers": 6}}}))
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(workdir)
    assert recipe.teacher.arch_kwargs is None
    summary = evaluate_packed.fn(recipe, str(workdir / "model.mpk"))
    assert summary["test_images"] == TEST_IMAGES and summary["compressed_top1"] > 60
