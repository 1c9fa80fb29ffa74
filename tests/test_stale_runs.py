"""The registry across runs: a registration killed mid-way leaves its MLflow run RUNNING, and the
next registration from the same work directory marks it KILLED (it holds the work directory's
lock: nothing else is alive); a teacher named by a registry alias is the version it names when
a run starts."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.pipeline


def test_a_killed_registrations_run_is_marked_killed(tmp_path, own_store):
    from mlflow import MlflowClient

    from modelpress.tasks import registry

    uri = own_store
    registry.use_experiment("exp")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp").experiment_id
    mine = registry.owner_tag(str(tmp_path / "data"))
    dead = client.create_run(exp, tags={registry.TAG + "owner": mine}).info.run_id  # left RUNNING
    other = client.create_run(exp, tags={registry.TAG + "owner": registry.owner_tag(str(tmp_path / "elsewhere"))}).info.run_id
    assert registry.end_stale_runs("exp", mine) == [dead]
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another work directory's: not ours to end
    assert registry.end_stale_runs("exp", mine) == []


def test_a_teacher_alias_is_pinned_to_the_version_it_names_now(tmp_path, own_store):
    """teacher.weights models:/<name>@champion: each run keys (and records) the version the alias
    names when it starts, so a nightly takes the new teacher once the alias moves."""
    from mlflow import MlflowClient

    from modelpress import stages
    from modelpress.tasks.resolve import pin_model_uri
    from modelpress.tasks.steps import pin_teacher

    from helpers import tiny_recipe

    client = MlflowClient(own_store, own_store)
    client.create_registered_model("teachers")
    for _ in range(2):
        client.create_model_version("teachers", source=str(tmp_path))
    client.set_registered_model_alias("teachers", "champion", "1")
    recipe = tiny_recipe(tmp_path / "w", teacher={"weights": "models:/teachers@champion"})
    first = pin_teacher.fn(recipe)
    assert first.teacher.weights == "models:/teachers/1"
    client.set_registered_model_alias("teachers", "champion", "2")
    second = pin_teacher.fn(recipe)
    assert second.teacher.weights == "models:/teachers/2"
    assert stages.stage_key(second, "teacher") != stages.stage_key(first, "teacher")
    assert pin_model_uri("models:/teachers/latest") == "models:/teachers/2"
    assert pin_model_uri("models:/teachers/1") == "models:/teachers/1" and pin_model_uri("runs:/abc/w.pt") == "runs:/abc/w.pt"
    with pytest.raises(stages.StageError, match="models:/teachers@nope: cannot resolve in the MLflow registry"):
        pin_model_uri("models:/teachers@nope")
