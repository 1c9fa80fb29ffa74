"""A registration killed mid-way leaves its MLflow run RUNNING; the next registration from the
same work directory marks it KILLED (it holds the work directory's lock: nothing else is alive)."""

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
