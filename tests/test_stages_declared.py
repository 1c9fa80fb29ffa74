"""Stages are declared once (modelpress/stages/declare.py): the committed dvc.yaml is generated
from the declarations, and each stage's key follows exactly the parameters it declares."""

from __future__ import annotations

import pytest
import yaml

from modelpress import stages
from modelpress.methods import REGISTRY, compress
from modelpress.methods.base import Context
from modelpress.recipe import Recipe
from modelpress.stages.declare import SPECS

from helpers import REPO

pytestmark = pytest.mark.unit


def test_committed_dvc_yaml_is_generated_from_the_declarations():
    assert (REPO / "dvc.yaml").read_text() == stages.dvc_yaml(), "run: modelpress dvc-yaml > dvc.yaml"
    parsed = yaml.safe_load(stages.dvc_yaml())["stages"]
    assert list(parsed) == [s.name for s in stages.STAGES]
    assert parsed["compress"]["params"] == list(SPECS["compress"].params)


def test_a_stage_key_follows_the_code_it_runs(tmp_path, monkeypatch):
    """After an upgrade the next run (the nightly) redoes the stages whose code changed and what
    follows them, so a fix reaches the model; code no stage runs keeps every key."""
    import shutil

    from modelpress.stages import declare

    assert all((declare.LIBRARY_ROOT / c).exists() for s in stages.STAGES for c in s.code)
    copy = tmp_path / "lib"
    shutil.copytree(declare.LIBRARY_ROOT / "modelpress", copy / "modelpress", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(declare, "LIBRARY_ROOT", copy)
    recipe = Recipe()
    names = ("fetch", "teacher", "compress", "finetune", "pack")

    from modelpress.stages.pipeline import EVALUATION_ONLY, TRAINING_CODE

    def keys():
        return {n: stages.stage_key(recipe, n) for n in names} | {"step": stages.step_key(recipe.with_overrides(
            {"method": {"name": "prune", "target_sparsity": 0.5}}), 0),
            "training": stages.stage_key(recipe, "teacher", leave_out=EVALUATION_ONLY, code=TRAINING_CODE)}

    def edit(rel: str):
        before = keys()
        with open(copy / rel, "a") as f:
            f.write("\n# changed\n")
        assert keys() == before  # read once per process: the code it runs, whatever the files become
        declare._code_content.cache_clear()  # (a new process)
        after = keys()
        return sorted(k for k in before if before[k] != after[k])

    assert edit("modelpress/methods/pq/quantize.py") == ["compress", "finetune", "pack", "step"]
    assert edit("modelpress/models/cnn.py") == ["compress", "finetune", "pack", "step", "teacher", "training"]
    # How the teacher stage packs or evaluates: scored again, its training (a teacher trained here) kept.
    assert edit("modelpress/pack/format.py") == ["compress", "finetune", "pack", "step", "teacher"]
    assert edit("modelpress/stages/pipeline.py") == ["compress", "finetune", "pack", "step", "teacher"]
    assert edit("modelpress/data/fetch.py") == ["fetch"]  # the same files: later stages keep their keys
    assert edit("modelpress/report.py") == []


def _change(recipe: Recipe, dotted: str) -> Recipe | None:
    """A valid recipe differing from ``recipe`` in one field under ``dotted``, or None."""
    candidates = {
        "data.batch_size": 128, "data.sources": ["/elsewhere"], "run.seed": 7, "teacher.epochs": 2.0, "teacher.lr": 0.1,
        "teacher.weight_decay": 0.0, "teacher.batch_size": 64, "finetune.batch_size": 64, "finetune.epochs": 2.0,
        "pack.codebook_dtype": "i8", "pack.float_dtype": "f32", "method.kmeans_iters": 3, "teacher.snapshots": [0.5],
        "data.test_images": 500, "finetune.loss": "mse",
    }
    for key, value in candidates.items():
        if key == dotted or key.startswith(dotted + "."):
            return recipe.with_overrides({key: value})
    return None


@pytest.mark.parametrize("name", ["teacher", "compress", "finetune", "pack"])
def test_a_stage_key_changes_with_each_declared_parameter_and_nothing_else(name):
    base = Recipe()
    spec = SPECS[name]
    for field in ("data.batch_size", "run.seed", "teacher.epochs", "finetune.epochs", "pack.float_dtype",
                  "pack.codebook_dtype", "method.kmeans_iters", "data.sources", "data.test_images", "finetune.loss"):
        other = _change(base, field)
        declared = any(field == p or field.startswith(p + ".") for p in spec.params)
        upstream = stages.stage_key(other, name) != stages.stage_key(base, name)
        reads = declared or any(
            field == p or field.startswith(p + ".")
            for d in _upstream(name) for p in (SPECS[d].identity or SPECS[d].params))
        assert upstream == reads, f"{name}: key {'changed' if upstream else 'unchanged'} by {field}"


def _upstream(name: str) -> set[str]:
    out, todo = set(), list(SPECS[name].deps)
    while todo:
        d = todo.pop()
        out.add(d)
        todo += SPECS[d].deps
    return out


def test_an_optional_field_left_empty_keeps_the_keys_of_earlier_work():
    """data.test_images came after runs were made: empty (the whole test set), it is not in the
    keys, so a nightly run after the upgrade resumes; set, it is in every stage that evaluates."""
    base = Recipe()
    dump = base.model_dump(mode="json")
    dump["data"].pop("test_images")  # the recipe as it was before the field existed
    for name in SPECS:
        assert stages.stage_key(base, name) == stages.stage_key(base, name, dump)
    limited = base.with_overrides({"data.test_images": 500})
    changed = {n for n in SPECS if stages.stage_key(limited, n) != stages.stage_key(base, n)}
    assert changed == {"teacher", "compress", "finetune", "pack", "evaluate"}


def test_pq_metric_left_empty_keeps_the_keys_of_earlier_work():
    """method.metric (PQ's per-position metric) came after runs were made: empty, it is not
    written, so no key changes; set, the stages from compress on are new work."""
    base = Recipe()
    assert "metric" not in base.model_dump(mode="json")["method"]
    per_position = base.with_overrides({"method.metric": "position"})
    assert per_position.model_dump(mode="json")["method"]["metric"] == "position"
    changed = {n for n in SPECS if stages.stage_key(per_position, n) != stages.stage_key(base, n)}
    assert changed == {"compress", "finetune", "pack", "evaluate"}


def test_byte_budget_key_covers_the_float_storage():
    """A byte budget costs dense layers in pack.float_dtype: the compress key must follow it."""
    base = Recipe.parse({"method": {"target_bytes": 40000}})
    assert stages.stage_key(base, "compress") != stages.stage_key(base.with_overrides({"pack.float_dtype": "f32"}), "compress")


def test_every_registered_method_fulfils_the_contract():
    for name, m in REGISTRY.items():
        assert m.name == name
        assert m.config.model_fields["name"].default == name
        assert (m.apply is None) != (m.steps is None)


def test_compress_refuses_an_argument_no_method_takes():
    from modelpress.methods import UniformConfig
    from modelpress.models import build_model

    with pytest.raises(TypeError, match="calibraton"):
        compress(build_model("fmnist_cnn"), UniformConfig(), calibraton=None)
    assert Context.of(calibration=None).calibration is None


def test_a_stage_killed_with_other_settings_is_not_taken_for_the_earlier_ones(tmp_path):
    """Run A finishes a stage; run B (other settings) starts it, rewrites its output and is killed
    before its record; back on A's settings the stage must run again, not take B's output."""
    from modelpress.stages.declare import record_path, stage

    calls = []

    def teacher(recipe, key, fail=False):
        out = stages.paths(recipe)["teacher"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"teacher of seed {recipe.run.seed}")
        calls.append(recipe.run.seed)
        if fail:
            raise KeyboardInterrupt  # killed after the output, before the record
        return out

    run = stage("teacher")(teacher)
    a = Recipe.parse({"run": {"workdir": str(tmp_path), "seed": 0}})
    b = a.model_copy(update={"run": a.run.model_copy(update={"seed": 1})})
    assert run(a).read_text() == "teacher of seed 0"
    assert run(a) and calls == [0]  # current: skipped
    with pytest.raises(KeyboardInterrupt):
        run(b, fail=True)
    assert not record_path(a, "teacher").exists()
    assert run(a).read_text() == "teacher of seed 0" and calls == [0, 1, 0]


def test_the_distillation_loss_keys_the_compression_and_each_step():
    """PQ's per-layer tuning and the iterative methods' retraining distil with finetune.loss: work
    done with another loss is not reused. Left empty, it keeps the keys of earlier work."""
    from modelpress.stages.pipeline import step_key

    for method in ({}, {"name": "prune", "target_sparsity": 0.5}):
        base = Recipe.parse({"method": method})
        other = base.with_overrides({"finetune.loss": "mse"})
        assert stages.stage_key(other, "compress") != stages.stage_key(base, "compress")
        assert stages.stage_key(base.with_overrides({"finetune.loss": None}), "compress") == stages.stage_key(base, "compress")
    assert step_key(other, 0) is not None and step_key(other, 0) != step_key(base, 0)


def test_the_committed_params_yaml_holds_every_parameter_dvc_yaml_names():
    """`dvc repro` (make repro) on the checkout's params.yaml refuses a stage whose parameter is
    missing from it, even one left empty."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def has(tree, dotted):
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    named = [(s, p) for s, v in yaml.safe_load(stages.dvc_yaml())["stages"].items() for p in v.get("params", [])]
    assert len(named) > 10 and [(s, p) for s, p in named if not has(params, p)] == []


@pytest.mark.pipeline
def test_dvc_ignores_the_bytecode_beside_the_code_the_stages_depend_on():
    """Python writes .pyc files into the code folders dvc.yaml lists (they record the sources'
    mtimes): DVC must not see them, or a checkout or branch switch reruns every stage."""
    import subprocess
    import sys
    from pathlib import Path

    dvc = Path(sys.executable).parent / "dvc"
    pyc, source = "modelpress/pack/__pycache__/format.cpython-311.pyc", "modelpress/pack/format.py"
    proc = subprocess.run([str(dvc), "check-ignore", pyc, source], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == [pyc], proc.stdout + proc.stderr
