"""A registration killed mid-way leaves its MLflow run RUNNING; the next registration from the
same work directory marks it KILLED (it holds the work directory's lock: nothing else is alive)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.pipeline


@pytest.fixture
def own_store(tmp_path):
    """A tracking store of this test's own. MLflow's set_tracking_uri/set_registry_uri (which the
    product calls) also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into os.environ: both the
    process-wide URIs and those variables are put back after the test, or every later test and
    the subprocesses it starts would talk to this test's store."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {n: os.environ.get(n) for n in names}
    uris = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    yield uri
    mlflow.set_tracking_uri(uris[0])
    mlflow.set_registry_uri(uris[1])
    for n, v in env.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


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
