"""Bad input refused up front, by the one schema (what the CLI, the Prefect form and DVC read):
each case fails with a RecipeError (the CLI prints it as one line) naming the field or file."""

from __future__ import annotations

import os

import pytest

from modelpress.recipe import Recipe, RecipeError

pytestmark = pytest.mark.unit

BAD_FIELDS = [
    ({"run": {"name": "../../x y/z"}}, "run.name"),
    ({"run": {"name": ""}}, "run.name"),
    ({"run": {"workdir": ""}}, "run.workdir"),
    ({"run": {"device": "tpu"}}, "run.device"),
    ({"run": {"seed": "zero"}}, "run.seed"),
    ({"registry": {"model_name": "my model v1"}}, "registry.model_name"),
    ({"registry": {"model_name": "team/model"}}, "registry.model_name"),
    ({"registry": {"experiment": "../../evil-exp"}}, "registry.experiment"),
    ({"registry": {"experiment": "a/../b"}}, "registry.experiment"),
    ({"registry": {"max_top1_drop": -1}}, "registry.max_top1_drop"),
    ({"method": {"budget_k": []}}, "method.budget_k"),
    ({"method": {"budget_k": [0]}}, "method.budget_k"),
    ({"method": {"budget_k": [70000]}}, "method.budget_k"),
    ({"method": {"target_bytes": 0}}, "method.target_bytes"),
    ({"method": {"name": "nope"}}, "method"),
    ({"method": {"name": "prune", "target_sparsity": 1.0}}, "method.target_sparsity"),
    ({"method": {"name": "kmeans", "bits": 9}}, "method.bits"),
    ({"method": {"name": "uniform", "bits": 0}}, "method.bits"),
    ({"data": {"files": {}}}, "data.files"),
    ({"data": {"files": {"a.gz": "xyz"}}}, "data.files"),
    ({"data": {"sources": []}}, "data.sources"),
    ({"data": {"name": "imagenet"}}, "data.name"),
    ({"teacher": {"arch": "resnet9000"}}, "teacher.arch"),
    ({"teacher": {"epochs": 0}}, "teacher.epochs"),
    ({"teacher": {"snapshots": [1.5]}}, "teacher.snapshots"),
    ({"finetune": {"epochs": -1}}, "finetune.epochs"),
    ({"pack": {"codebook_dtype": "i3"}}, "pack.codebook_dtype"),
    ({"unknown_section": {}}, "unknown_section"),
]


@pytest.mark.parametrize(("raw", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_field_names_itself(raw, field):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(raw)
    assert f": {field}" in str(e.value) and "\n" not in str(e.value)


BAD_FILES = [
    ("", "empty"),
    ("run:\n  name: a\nrun:\n  seed: 1\n", "given twice"),
    ("method:\n  kmeans_iters: 3\n  kmeans_iters: 4\n", "given twice"),
    ("- a\n- b\n", "expected a mapping"),
    ("run: [unclosed\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_FILES)
def test_bad_params_file_names_the_file(tmp_path, text, needle):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=needle) as e:
        Recipe.from_yaml(path)
    assert str(path) in str(e.value)


def test_binary_params_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RecipeError, match="not a text file"):
        Recipe.from_yaml(path)


def test_bad_override_value_names_the_override(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("run:\n  seed: 1\n")
    with pytest.raises(RecipeError, match="method.budget_k=\\[16"):
        Recipe.from_yaml(path, ["method.budget_k=[16, 32"])
    with pytest.raises(RecipeError, match="section.key=value"):
        Recipe.from_yaml(path, ["no-equals-sign"])


def test_cuda_on_a_machine_without_one_fails_up_front():
    import torch

    from modelpress.stages import preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        preflight(Recipe.parse({"run": {"device": "cuda"}}))


def test_deploy_with_a_missing_params_file_fails_naming_it(tmp_path, capsys):
    """`infra/deploy.sh --params FILE` with a wrong path: an error, not deployments that would
    run the built-in defaults every night (checked before any server is asked)."""
    from modelpress.flows import deploy

    missing = tmp_path / "nightly.yaml"
    with pytest.raises(SystemExit) as exit_:
        deploy.main(["--params", str(missing)])
    assert exit_.value.code == 2
    assert f"--params {missing}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("override", [{"run.seed": 7}, {"run": {"seed": 7}}, {"teacher": {"epochs": 3}},
                                      {"data.batch_size": 64}, {"registry": {"model_name": "x"}}])
def test_a_sweep_point_cannot_change_what_the_points_share(override):
    """The teacher, data, seed, folder and registry are the sweep's: a point that sets one, as a
    dotted key or inside a section's mapping, is refused naming it."""
    from pydantic import ValidationError

    from modelpress.sweep import SweepConfig

    with pytest.raises(ValidationError, match="are the sweep's, set them in the base recipe"):
        SweepConfig.model_validate({"points": [{"name": "a", "set": override}], "base": Recipe()})
    assert SweepConfig.model_validate({"points": [{"name": "a", "set": {"method": {"kmeans_iters": 3}}}], "base": Recipe()})


@pytest.mark.pipeline
def test_mlflow_server_with_an_artifact_store_it_cannot_reach_does_not_start(tmp_path):
    """infra/mlflow-server.sh with the default s3:// store and no endpoint or credentials (or a
    wrong endpoint) would start, and the first registration would fail after a whole run."""
    import socket
    import subprocess

    from helpers import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{closed}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.run([str(REPO / "infra" / "mlflow-server.sh"), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mlflow-server.sh: artifact store s3://modelpress/mlflow: bucket 'modelpress' not reachable at "
                           f"http://127.0.0.1:{closed}") and "MLFLOW_ARTIFACTS to a local folder" in line, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.pipeline
def test_s3_server_on_a_port_in_use_fails_with_one_line():
    """infra/s3-server.sh on a port another program holds: one line naming it, not a bucket made in
    whatever answers there or a traceback."""
    import socket
    import subprocess

    from helpers import REPO

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([str(REPO / "infra" / "s3-server.sh"), str(port), "modelpress"], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"s3-server.sh: moto_server exited before it answered: is port {port} in use?"


def test_the_sweep_form_has_a_default_even_without_a_params_file():
    """Deployments with no parameters file to read: the compress deployments run the built-in
    recipe, and the sweep's UI form is still pre-filled with a valid budget sweep of it."""
    from modelpress.flows.deploy import sweep_defaults
    from modelpress.sweep import SweepConfig

    for parameters in ({}, {"recipe": Recipe.parse({"finetune": {"epochs": 3}}).model_dump(mode="json")}):
        sweep = SweepConfig.model_validate(sweep_defaults(parameters)["sweep"])
        assert sweep.runner == "deployment" and len(sweep.expand()) == 3
        assert sweep.base == Recipe.parse(parameters.get("recipe") or {})


def test_the_flow_checks_the_tracking_server_before_any_work(tmp_path, monkeypatch):
    """A scheduled or UI-triggered run whose registry cannot be written fails at its first task
    with the store named, not at registration after the compression (the CLI checked it, the
    flow did not)."""
    from modelpress.tasks.steps import check_recipe

    from helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path / "w")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/modelpress-nowhere/mlflow.db")
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI sqlite:////proc/modelpress-nowhere/mlflow.db"):
        check_recipe.fn(recipe)
    check_recipe.fn(recipe.with_overrides({"registry.enabled": False}))  # nothing to register: nothing to check
