"""Production orchestration against the real services on loopback (infra/*.sh): deployments on a
Prefect server, a process worker executing them, MLflow with artifacts in S3, a DVC remote on
S3, and a worker killed with SIGKILL in the middle of the layer loop."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modelpress import stages
from modelpress.pack import read_packed
from modelpress.pack.format import build_from_packed

from helpers import REPO, SLOW, layers_done, tiny_recipe
from services import Stack, need_binaries

pytestmark = pytest.mark.services

FLOW = "modelpress-compress"
POOL = "gpu-test"


def _checkout(dst: Path, params: dict) -> Path:
    """A clean checkout of the working tree (what a worker machine has), its own git + DVC repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "checkout"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def _tiny_params(**sections) -> dict:
    """A full recipe (JSON) with the TINY settings, workdir ``data`` inside the checkout."""
    return tiny_recipe(Path("data"), **sections).model_dump(mode="json")


def _deploy(api: str, stack: Stack, *args: str, pool: str = POOL) -> str:
    proc = subprocess.run([sys.executable, "-m", "modelpress.flows.deploy", "--pool", pool, *args], cwd=REPO,
                          env={**stack.env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: api})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return _Ctx()


def _trigger(api: str, parameters: dict):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return run_deployment(f"{FLOW}/on-demand", parameters=parameters, timeout=0, as_subflow=False)


def _wait_final(api: str, run_id, timeout: float, workers=()):
    deadline = time.monotonic() + timeout
    with _client(api) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    logs = "\n".join(w.tail(6000) for w in workers)
    raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f} s (state {run.state_name}):\n{logs}")


def _run_logs(api: str, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(api) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return "\n".join(log.message for log in logs)


# ---- deployments as the UI sees them ----------------------------------------------------------

@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_nightly_schedule_and_parameter_form_read_back_from_server(prefect_stack):
    from modelpress.recipe import Recipe

    api, stack = prefect_stack
    _deploy(api, stack)
    with _client(api) as client:
        nightly = client.read_deployment_by_name(f"{FLOW}/nightly")
        on_demand = client.read_deployment_by_name(f"{FLOW}/on-demand")
        pool = client.read_work_pool(POOL)
    assert pool.type == "process"
    assert nightly.work_pool_name == on_demand.work_pool_name == POOL
    (schedule,) = nightly.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert on_demand.schedules == []

    for dep in (nightly, on_demand):
        schema = dep.parameter_openapi_schema
        assert list(schema["properties"]) == ["recipe"]
        defs = schema["definitions"]
        assert set(defs) >= {"Recipe", "RunConfig", "DataConfig", "TeacherConfig", "FinetuneConfig", "PackConfig", "RegistryConfig"}
        device = defs["RunConfig"]["properties"]["device"]
        assert device["enum"] == ["auto", "cpu", "cuda"] and device["default"] == "auto"
        assert "CUDA" in device["description"]
        assert defs["RegistryConfig"]["properties"]["max_top1_drop"]["minimum"] == 0
        assert defs["DataConfig"]["properties"]["batch_size"]["maximum"] == 65536
        assert "description" in defs["FinetuneConfig"]["properties"]["epochs"]
        # The form is pre-filled with params.yaml, validated by the schema.
        assert Recipe.model_validate(dep.parameters["recipe"]) == Recipe.from_yaml(REPO / "params.yaml")
        assert dep.enforce_parameter_schema
        # They hold params.yaml as of this deploy: the description says which, and the recipe's sha256.
        from modelpress.flows.deploy import recipe_sha256

        sha = recipe_sha256(Recipe.from_yaml(REPO / "params.yaml").model_dump(mode="json"))
        assert f"params.yaml as of this deploy (recipe sha256 {sha}); rerun infra/deploy.sh" in dep.description, dep.description

    # The sweep deployment: its form is the sweep schema, pre-filled with a budget sweep of
    # params.yaml whose points run as runs of the on-demand deployment on the same pool.
    from modelpress.sweep import SweepConfig

    with _client(api) as client:
        sweep = client.read_deployment_by_name("modelpress-sweep/on-demand")
    assert sweep.work_pool_name == f"{POOL}-sweeps" and list(sweep.parameter_openapi_schema["properties"]) == ["sweep"]
    assert "runner" in sweep.parameter_openapi_schema["definitions"]["SweepConfig"]["properties"]
    default = SweepConfig.model_validate(sweep.parameters["sweep"])
    assert default.runner == "deployment" and default.deployment == f"{FLOW}/on-demand"
    assert default.base == Recipe.from_yaml(REPO / "params.yaml") and default.budgets

    # A point that no worker takes (none serves this pool here) is cancelled after point_timeout_h
    # and fails as a timeout (not retried), where the sweep waited for ever.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from modelpress.sweep import PointTimeout
    from modelpress.tasks.sweep import _on_deployment

    late = SweepConfig.model_validate({"name": "late", "points": [{"name": "a"}], "base": default.base,
                                       "runner": "deployment", "deployment": f"{FLOW}/on-demand", "point_timeout_h": 0.002})
    (name, recipe), = late.expand()
    with temporary_settings({PREFECT_API_URL: api}), pytest.raises(PointTimeout, match="cancelled"):
        _on_deployment(late, name, recipe)
    with _client(api) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[recipe.run.name])))
    assert run.state.type.value in ("CANCELLING", "CANCELLED"), run.state

    # The documented docker and kubernetes pools (GPU requests) are accepted by the server.
    from prefect.client.schemas.actions import WorkPoolCreate

    with _client(api) as client:
        for kind, path in TEMPLATES.items():
            client.create_work_pool(WorkPoolCreate(name=f"gpu-{kind}", type=kind, base_job_template=json.loads(path.read_text())))
            assert client.read_work_pool(f"gpu-{kind}").base_job_template["variables"]["properties"]["gpus"]["default"] == 1

    # The schedule is configurable; redeploying replaces it.
    _deploy(api, stack, "--cron", "30 1 * * 1-5", "--timezone", "Europe/Berlin")
    with _client(api) as client:
        (schedule,) = client.read_deployment_by_name(f"{FLOW}/nightly").schedules
    assert schedule.schedule.cron == "30 1 * * 1-5" and schedule.schedule.timezone == "Europe/Berlin"


# ---- a worker killed in the middle of the layer loop ------------------------------------------

def _state(path):
    return build_from_packed(read_packed(path), materialize=False).state_dict()


@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_worker_killed_mid_layer_loop_resumes_after_restart(on_prefect_stack, trained_workdir, slow_reference, tmp_path):
    api, stack, pool = on_prefect_stack
    params = _tiny_params(method=SLOW, registry={"enabled": False})
    repo = _checkout(tmp_path / "checkout", params)
    shutil.copytree(trained_workdir, repo / "data", dirs_exist_ok=True)  # fetched data + teacher
    _deploy(api, stack, "--source", str(repo), pool=pool)
    env = {"MODELPRESS_DVC": "off"}
    worker = stack.worker(api, pool, env, name="worker-1")

    t0 = time.monotonic()
    run = _trigger(api, {"recipe": params})
    ckpt = repo / "data" / "compress" / "checkpoint.mpk"
    while layers_done(ckpt) < 1 and time.monotonic() - t0 < 240:
        assert worker.proc.poll() is None, worker.tail()
        time.sleep(0.1)
    worker.kill()  # SIGKILL to the worker and its flow-run process at once: the machine is lost
    done_at_kill = layers_done(ckpt)
    killed_at = time.monotonic() - t0
    with _client(api) as client:
        assert client.read_flow_run(run.id).state_name == "Running"  # nobody left to report the crash
    assert 1 <= done_at_kill, "no layer finished before the kill"
    assert not (repo / "data" / "compress" / "compressed.mpk").exists(), "the layer loop ended before the kill"

    ref = slow_reference  # the same compression, uninterrupted
    n_layers = len(stages.read_json(ref / "compress" / "layers.json")["layers"])
    assert done_at_kill < n_layers

    t1 = time.monotonic()
    worker2 = stack.worker(api, pool, env, name="worker-2")  # same machine, same worker name
    assert f"rescheduled orphaned flow run {run.name}" in worker2.tail(20000)
    final = _wait_final(api, run.id, 240, [worker2])
    assert final.state_name == "Completed", worker2.tail()
    resumed_s = time.monotonic() - t1

    logs = _run_logs(api, run.id)
    assert f"compress: resuming after {done_at_kill} finished layers" in logs, logs[-3000:]
    assert "teacher: up to date" in logs
    # Finished layers were not recomputed: after resuming, the loop reports them as done before
    # and runs k-means only for the others.
    resumed = [line for line in logs.split("resuming after")[-1].splitlines() if "[pq layers]" in line]
    assert len(resumed) == n_layers, resumed
    assert all("status=done before" in line and "kmeans_s" not in line for line in resumed[:done_at_kill]), resumed
    assert all("kmeans_s=" in line and "done before" not in line for line in resumed[done_at_kill:]), resumed

    a, b = _state(ref / "compress" / "compressed.mpk"), _state(repo / "data" / "compress" / "compressed.mpk")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    print(f"killed after {killed_at:.0f} s with {done_at_kill}/{n_layers} layers done; resumed run finished in {resumed_s:.0f} s")


# ---- everything together ----------------------------------------------------------------------

def test_end_to_end_deployment_run_on_worker_registers_in_mlflow_and_pushes_dvc(trained_workdir, tmp_path):
    import boto3
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    need_binaries()
    stack = Stack(tmp_path / "stack")
    try:
        s3 = stack.s3("modelpress")
        mlflow_url = stack.mlflow(s3, "s3://modelpress/mlflow")
        api = stack.prefect()
        repo = _checkout(tmp_path / "checkout", _tiny_params())
        shutil.copytree(trained_workdir, repo / "data", dirs_exist_ok=True)
        worker = stack.worker(api, POOL, {
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MODELPRESS_DVC_REMOTE": "s3://modelpress/dvc", "MODELPRESS_DVC_ENDPOINT_URL": s3,
        })
        _deploy(api, stack, "--source", str(repo))

        # Non-default parameters, through the Prefect API, as the UI's form would send them.
        params = _tiny_params(registry={"model_name": "orchestration-e2e"}, method={"kmeans_iters": 4})
        run = _trigger(api, {"recipe": params})
        final = _wait_final(api, run.id, 300, [worker])
        assert final.state_name == "Completed", worker.tail()
        assert final.parameters["recipe"]["method"]["kmeans_iters"] == 4

        # MLflow: the version carries the run's parameters, lineage, and its artifacts are in S3.
        ml = MlflowClient(mlflow_url, mlflow_url)
        (version,) = ml.search_model_versions("name='orchestration-e2e'")
        mlrun = ml.get_run(version.run_id)
        assert mlrun.data.params["method.kmeans_iters"] == "4"
        assert mlrun.data.params["registry.model_name"] == "orchestration-e2e"
        lock = (repo / "dvc.lock").read_bytes()
        assert version.tags["modelpress.dvc_revision"] == hashlib.sha256(lock).hexdigest()[:16]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        assert version.tags["modelpress.git_commit"] == head
        assert version.tags["modelpress.prefect_flow_run_id"] == str(run.id)
        bucket = boto3.client("s3", endpoint_url=s3, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = [o["Key"] for page in bucket.get_paginator("list_objects_v2").paginate(Bucket="modelpress")
                for o in page.get("Contents", [])]
        assert any(k.startswith("mlflow/") and k.endswith("/model.mpk") for k in keys), keys

        # DVC: dvc.lock records this run's outputs and the remote on S3 holds them.
        locked = yaml.safe_load(lock)["stages"]
        assert locked["compress"]["params"]["params.yaml"]["method"]["kmeans_iters"] == 4
        (pack_out,) = locked["pack"]["outs"]
        assert pack_out["md5"] == hashlib.md5((repo / "data" / "model.mpk").read_bytes()).hexdigest()
        for stage in ("teacher", "compress", "finetune", "pack"):
            for out in locked[stage]["outs"]:
                md5 = out["md5"]
                assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys, (stage, out["path"])
        status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status"], cwd=repo,
                                capture_output=True, text=True).stdout
        # The outputs are the ones dvc.lock records (its params are the run's, not params.yaml's).
        assert "changed outs" not in status and "not in cache" not in status, status
        # The worker's checkout is as committed: the run's parameters live in its lineage, not in params.yaml.
        assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                              capture_output=True, text=True).stdout == ""
        assert (repo / "data" / "lineage" / "dvc.lock").read_bytes() == lock
        assert version.tags["modelpress.dvc"] == "pushed" and version.tags["modelpress.dvc_remote_url"] == "s3://modelpress/dvc"

        # A second clean clone restores this version's packed file from its lineage alone.
        clone2 = _checkout(tmp_path / "clone2", yaml.safe_load((REPO / "params.yaml").read_text()))
        proc = subprocess.run([sys.executable, "-m", "modelpress", "reproduce", f"models:/orchestration-e2e/{version.version}"],
                              cwd=clone2, capture_output=True, text=True, timeout=300,
                              env={**stack.env, "MLFLOW_TRACKING_URI": mlflow_url})
        assert proc.returncode == 0, proc.stderr[-3000:]
        restored = clone2 / "data" / "model.mpk"
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == version.tags["modelpress.packed_sha256"]
        assert restored.read_bytes() == (repo / "data" / "model.mpk").read_bytes()

        # Re-deploying (say, to change the cron) keeps the nightly recipe the committed params.yaml.
        _deploy(api, stack, "--source", str(repo), "--cron", "15 3 * * *")
        with _client(api) as client:
            nightly = client.read_deployment_by_name(f"{FLOW}/nightly")
        committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, capture_output=True, text=True, check=True).stdout
        from modelpress.recipe import Recipe

        assert Recipe.model_validate(nightly.parameters["recipe"]) == Recipe.model_validate(yaml.safe_load(committed))
        assert nightly.parameters["recipe"]["method"]["kmeans_iters"] != 4  # not the last on-demand run's recipe

        # Prefect artifacts of the run: summary and per-layer table.
        with _client(api) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert {"summary", "layers"} <= {a.key for a in arts}
        assert any(a.type == "table" and a.key == "layers" and json.loads(a.data) for a in arts)

        # A sweep from the UI whose points run as runs of the compression deployment on the
        # pool (runner: deployment); the front comes back from what the points registered. The
        # sweep itself runs on a control worker of the sweep pool, never in the GPU worker's slot.
        control = stack.worker(api, f"{POOL}-sweeps", {"MLFLOW_TRACKING_URI": mlflow_url, "MODELPRESS_WORKER_KIND": "control"},
                               name="control-worker")
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # The teacher to compress is given (as a team sweeps a model it has): each point loads it.
        teacher = {"weights": str(repo / "data" / "teacher" / "teacher.mpk")}
        sweep = {"name": "e2e", "base": _tiny_params(teacher=teacher), "runner": "deployment", "concurrency": 2,
                 "points": [{"name": "u8", "set": {"method.name": "uniform", "method.bits": 8}},
                            {"name": "u4", "set": {"method.name": "uniform", "method.bits": 4}}]}
        with temporary_settings({PREFECT_API_URL: api}):
            srun = run_deployment("modelpress-sweep/on-demand", parameters={"sweep": sweep}, timeout=0, as_subflow=False)
        final = _wait_final(api, srun.id, 400, [worker, control])
        assert final.state_name == "Completed", control.tail()
        with _client(api) as client:
            names = {r.name: r for r in client.read_flow_runs() if r.name in ("e2e-u8", "e2e-u4")}
        assert set(names) == {"e2e-u8", "e2e-u4"} and all(r.state_name == "Completed" for r in names.values())
        record = json.loads((repo / "data" / "sweeps" / "e2e" / "sweep.json").read_text())
        assert {r["point"] for r in record["points"]} == {"u8", "u4"} and not record["failed"]
        versions = {str(v.version): v for v in ml.search_model_versions("name='fmnist-cnn-e2e'")}
        for r in record["points"]:
            v = versions[str(r["version"])]
            assert v.tags["modelpress.prefect_flow_run_id"] == str(names[f"e2e-{r['point']}"].id)
            assert v.tags["modelpress.pareto_front"] == str(r["on_front"]).lower()
            assert int(v.tags["modelpress.packed_bytes"]) == r["packed_bytes"]
        assert "sweep-e2e" in [r.info.run_name for r in ml.search_runs([ml.get_experiment_by_name("modelpress").experiment_id])]
        # The same sweep again (the schedule, a second click): its points are registered with these
        # settings, so none is submitted to the GPU pool again.
        with temporary_settings({PREFECT_API_URL: api}):
            again = run_deployment("modelpress-sweep/on-demand", parameters={"sweep": sweep}, timeout=0, as_subflow=False)
        assert _wait_final(api, again.id, 300, [worker, control]).state_name == "Completed", control.tail()
        with _client(api) as client:
            assert sorted(r.name for r in client.read_flow_runs() if r.name in ("e2e-u8", "e2e-u4")) == ["e2e-u4", "e2e-u8"]
        rerun = json.loads((repo / "data" / "sweeps" / "e2e" / "sweep.json").read_text())
        assert rerun["reused"] == 2 and [r["version"] for r in rerun["points"]] == [r["version"] for r in record["points"]]
        assert "on the 2,000 test images" in (repo / "data" / "sweeps" / "e2e" / "front.md").read_text()
    finally:
        left = stack.close()
    assert left == [], f"processes left after stopping the services: {left}"


# ---- production configuration that cannot run here (no Docker, no Kubernetes, no GPU) ---------

INFRA = REPO / "infra"
TEMPLATES = {"docker": INFRA / "docker" / "work-pool-docker.json", "kubernetes": INFRA / "k8s" / "work-pool-kubernetes.json"}


def _placeholders(obj) -> set[str]:
    import re

    return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(obj)))


def test_production_configuration_parses():
    for kind, path in TEMPLATES.items():
        template = json.loads(path.read_text())
        assert set(template) == {"job_configuration", "variables"}, path
        props = template["variables"]["properties"]
        assert _placeholders(template["job_configuration"]) <= set(props), (kind, _placeholders(template["job_configuration"]) - set(props))
        assert props["gpus"]["default"] == 1 and "modelpress-worker" in props["image"]["default"]
    k8s = json.loads(TEMPLATES["kubernetes"].read_text())["job_configuration"]["job_manifest"]
    (container,) = k8s["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    docker = json.loads(TEMPLATES["docker"].read_text())["job_configuration"]
    assert docker["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]

    compose = yaml.safe_load((INFRA / "docker" / "compose.prod.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker", "sweep-worker"}
    assert services["sweep-worker"]["command"] == ["gpu-sweeps"] and services["sweep-worker"]["environment"]["MODELPRESS_WORKER_KIND"] == "control"
    assert {v.split(":")[1] for v in services["worker"]["volumes"]} == {"/opt/modelpress/data", "/opt/modelpress/.dvc/cache"}
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS"].startswith("${MLFLOW_ARTIFACTS")
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert (INFRA / "docker" / services["postgres"]["volumes"][1].split(":")[0]).is_file()
    # A store that is not AWS: the second file passes its endpoint to MLflow and the workers.
    endpoint = yaml.safe_load((INFRA / "docker" / "compose.s3-endpoint.yaml").read_text())["services"]
    assert endpoint["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("${S3_ENDPOINT_URL:?")
    assert {"MODELPRESS_DVC_ENDPOINT_URL", "AWS_ENDPOINT_URL"} <= set(endpoint["worker"]["environment"])
    assert set(endpoint) <= set(services)

    dockerfile = (INFRA / "docker" / "Dockerfile.worker").read_text()
    assert dockerfile.splitlines()[[line.startswith("FROM") for line in dockerfile.splitlines()].index(True)].startswith("FROM nvidia/cuda:")
    entry = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT")).split(None, 1)[1])
    assert (REPO / entry[0]).is_file()
    # The image builds its own venv, then copies the checkout over it: the host's .venv (whose
    # scripts name the host's interpreter) and run outputs stay out.
    lines = dockerfile.splitlines()
    assert lines.index("COPY . .") > next(i for i, line in enumerate(lines) if ".venv/bin/pip install" in line)
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv/", "mlruns/", ".state/", "data/*", ".dvc/cache/", ".dvc/config.local"} <= ignored
    # Every package the image installs is pinned by the lock (the MLflow service's Postgres driver too).
    installs = [line for line in lines if "pip install" in line]
    assert all("-r requirements.lock" in line or line.endswith("--no-deps -e .") for line in installs), installs
    import sqlalchemy

    sqlalchemy.create_engine("postgresql://mlflow@127.0.0.1:1/mlflow")  # loads the driver: MLflow on Postgres outside Docker
    for script in ("s3-server.sh", "mlflow-server.sh", "prefect-server.sh", "prefect-worker.sh", "deploy.sh"):
        assert subprocess.run(["bash", "-n", str(INFRA / script)]).returncode == 0, script
