"""Operating the production services (infra/*.sh, started on loopback by tests/services.py): the
nightly schedule creates a run that a worker executes; a Prefect server restarted and a worker
killed in the middle of a compression do not lose the run nor the machine's GPU slot; every
service stops on one SIGTERM; a rescheduled run's dead attempt leaves no task run "Running"."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import SLOW, layers_done
from services import STOP_GRACE_S, Stack, need_binaries
from test_orchestration import (
    FLOW,
    POOL,
    _checkout,
    _client,
    _deploy,
    _run_logs,
    _tiny_params,
    _trigger,
    _wait_final,
)

pytestmark = pytest.mark.services

WORKER_ENV = {"MODELPRESS_DVC": "off", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _repo(tmp_path: Path, trained_workdir: Path, params: dict) -> Path:
    (tmp_path / "checkout").mkdir()
    repo = _checkout(tmp_path / "checkout", params)
    shutil.copytree(trained_workdir, repo / "data", dirs_exist_ok=True)  # fetched data + teacher
    return repo


def _closed(stack: Stack) -> None:
    left = stack.close()
    assert left == [], f"stopping the services: {left}"


def _wait_layers(ckpt: Path, n: int, worker, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while layers_done(ckpt) < n:
        assert time.monotonic() - t0 < timeout, f"no {n} finished layer(s) after {timeout:.0f} s:\n{worker.tail()}"
        assert worker.proc.poll() is None, worker.tail()
        time.sleep(0.1)
    assert not ckpt.with_name("compressed.mpk").exists(), "the layer loop ended before the fault"


def _gpu_slots(api: str) -> int:
    from modelpress.flows.deploy import gpu_limit_name

    with _client(api) as client:
        return client.read_global_concurrency_limit_by_name(gpu_limit_name()).active_slots


def _gpu_leases(stack: Stack, api: str) -> list[Path]:
    """The lease files (infra/prefect-server.sh keeps them on disk) that hold the GPU limit."""
    import json

    from modelpress.flows.deploy import gpu_limit_name

    with _client(api) as client:
        limit_id = str(client.read_global_concurrency_limit_by_name(gpu_limit_name()).id)
    leases = Path(stack.env["PREFECT_HOME"]) / "concurrency_leases"
    return [f for f in leases.glob("*-*.json") if limit_id in json.loads(f.read_text())["resource_ids"]]


def _task_runs(api: str, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(api) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _completed(api: str, run_id, timeout: float, worker):
    """Wait for the run's end; it must be Completed (else: the run's own logs, which go to the API
    and not to the worker's output since flow-run output is not streamed)."""
    final = _wait_final(api, run_id, timeout, [worker])
    assert final.state_name == "Completed", f"{final.state_name}: {final.state.message}\n{_run_logs(api, run_id)[-4000:]}"
    return final


def _assert_settled(api: str, run_id) -> None:
    """Nothing of the run still claims to be running, and the GPU slot is free again."""
    running = [(t.name, t.state_name) for t in _task_runs(api, run_id) if t.state_type.value in ("RUNNING", "PENDING")]
    assert running == [], running
    assert _gpu_slots(api) == 0, "a GPU slot is still taken after the run"


# ---- the nightly schedule, executed ------------------------------------------------------------

@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_scheduled_nightly_run_is_created_and_completed_by_the_worker(on_prefect_stack, trained_workdir, tmp_path):
    """A deployment due within a minute: the server's scheduler must create the run (SQLAlchemy
    2.1 silently stopped it) and the worker must execute it to the end."""
    api, stack, pool = on_prefect_stack
    t0 = time.monotonic()
    params = _tiny_params(registry={"enabled": False})
    repo = _repo(tmp_path, trained_workdir, params)
    worker = stack.worker(api, pool, WORKER_ENV, name="schedule-worker")
    _deploy(api, stack, "--source", str(repo), "--cron", "* * * * *", pool=pool)
    with _client(api) as client:
        nightly = client.read_deployment_by_name(f"{FLOW}/nightly")
    assert nightly.schedules[0].schedule.cron == "* * * * *"

    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    by_nightly = DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id]))
    deadline = time.monotonic() + 90
    runs = []
    with _client(api) as client:
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=by_nightly, sort="EXPECTED_START_TIME_ASC")
            time.sleep(1)
    server_log = stack.services[0].tail(3000)
    assert runs, f"the scheduler created no run of the nightly deployment in 90 s; server log:\n{server_log}"
    first = runs[0]
    assert first.auto_scheduled and first.work_pool_name == pool
    wait_s = (first.expected_start_time - first.created).total_seconds()
    assert wait_s <= 61, (first.created, first.expected_start_time)

    # What the runbook says to look at: the next runs are there, scheduled.
    cli = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "ls", "--state", "Scheduled"],
                         env={**stack.env, "PREFECT_API_URL": api, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr[-2000:]
    with _client(api) as client:
        scheduled = client.read_flow_runs(deployment_filter=by_nightly, flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    assert len(scheduled) >= 2, [r.name for r in scheduled]
    assert any(r.name in cli.stdout for r in scheduled), cli.stdout[-2000:]

    _completed(api, first.id, 200, worker)
    assert (repo / "data" / "model.mpk").is_file() and (repo / "data" / "metrics.json").is_file()
    with _client(api) as client:  # stop the every-minute schedule: no more runs for this server
        client.delete_deployment(nightly.id)
    assert worker.stop() == []
    print(f"scheduled run {first.name} due {wait_s:.0f} s after creation, completed "
          f"{time.monotonic() - t0:.0f} s after the deployment was created")


@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_reschedule_marks_the_dead_attempts_task_runs_crashed(prefect_stack):
    """`python -m modelpress.flows.deploy reschedule` (and a worker's start, which shares the code): the task
    runs the dead attempt left Running or Pending become Crashed; finished ones stay as they are."""
    import asyncio

    from prefect import flow, task
    from prefect.states import Completed, Pending, Running

    from modelpress.flows.deploy import _reschedule

    api, _ = prefect_stack

    @flow(name="ops-dead-attempt")
    def dead_attempt():
        pass

    @task(name="step")
    def step():
        pass

    with _client(api) as client:
        run = client.create_flow_run(dead_attempt, state=Running())
        states = {"finished": Completed(), "computing": Running(), "waiting": Pending()}
        task_runs = {key: client.create_task_run(step, run.id, dynamic_key=key, name=key, state=state)
                     for key, state in states.items()}

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        asyncio.run(_reschedule([str(run.id)]))
    with _client(api) as client:
        assert client.read_flow_run(run.id).state_name == "Scheduled"
        after = {key: client.read_task_run(tr.id).state for key, tr in task_runs.items()}
    assert {k: s.name for k, s in after.items()} == {"finished": "Completed", "computing": "Crashed", "waiting": "Crashed"}
    assert "rescheduled by hand" in after["computing"].message


# ---- the Prefect server restarted in the middle of a compression --------------------------------

def test_server_restart_mid_compression_completes_and_frees_the_gpu_slot(trained_workdir, tmp_path):
    """SIGKILL the Prefect server while the GPU task holds the machine's slot, start it again on
    the same port and database: the run completes by itself and the slot is free afterwards."""
    need_binaries()
    stack = Stack(tmp_path / "stack")
    try:
        api = stack.prefect()
        port = int(api.rsplit(":", 1)[1].split("/")[0])
        params = _tiny_params(method=SLOW, registry={"enabled": False})
        repo = _repo(tmp_path, trained_workdir, params)
        _deploy(api, stack, "--source", str(repo))
        # The GPU lease renewed every 2 s: a renewal certainly reaches the restarted server before
        # the task ends. A server that lost the lease (memory storage) answers 410, on which
        # Prefect's concurrency(strict=True) cancelled the task (TaskRunTimeoutError).
        worker = stack.worker(api, POOL, {**WORKER_ENV, "MODELPRESS_GPU_LEASE_RENEW_S": "2"})
        run = _trigger(api, {"recipe": params})
        ckpt = repo / "data" / "compress" / "checkpoint.mpk"
        _wait_layers(ckpt, 1, worker)
        assert _gpu_slots(api) == 1  # the compress task holds it
        assert _gpu_leases(stack, api), "the GPU slot's lease is not on disk"

        stack.services[0].kill()  # SIGKILL: the server and its children, nothing flushed
        down_at, done_at_kill = time.monotonic(), layers_done(ckpt)
        time.sleep(5)
        assert layers_done(ckpt) >= 1 and worker.proc.poll() is None
        stack.prefect(port=port, name="prefect-server-2")
        down_s = time.monotonic() - down_at

        _completed(api, run.id, 240, worker)
        _assert_settled(api, run.id)
        assert _gpu_leases(stack, api) == [], "a lease on the GPU slot is left"
        compress = [t for t in _task_runs(api, run.id) if t.name.startswith("compress")]
        logs = _run_logs(api, run.id)
        assert "TaskRunTimeoutError" not in logs and "exceeded timeout" not in logs, logs[-3000:]
        slot_lines = [line for line in logs.splitlines() if "GPU slot" in line]
        assert not any("lost this task's lease" in line for line in slot_lines), slot_lines
        assert [t.run_count for t in compress] == [1], "the compress task was interrupted"
        print(f"server down {down_s:.0f} s from layer {done_at_kill} on; compress task runs: "
              f"{[(t.name, t.state_name, t.run_count) for t in compress]}; " + " | ".join(slot_lines))
    finally:
        _closed(stack)


# ---- a worker killed alone (its flow-run process is not) ---------------------------------------

@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_worker_killed_alone_mid_compression_the_run_goes_on(on_prefect_stack, trained_workdir, tmp_path):
    """SIGKILL the worker process only: its flow-run process, no longer writing into the worker's
    pipe, goes on and completes; a worker started again with the same name leaves it alone and
    keeps the GPU limit it holds."""
    api, stack, pool = on_prefect_stack
    params = _tiny_params(method=SLOW, registry={"enabled": False})
    repo = _repo(tmp_path, trained_workdir, params)
    _deploy(api, stack, "--source", str(repo), pool=pool)
    worker = stack.worker(api, pool, WORKER_ENV, name="worker-1")
    run = _trigger(api, {"recipe": params})
    _wait_layers(repo / "data" / "compress" / "checkpoint.mpk", 1, worker)
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    assert children, "no flow-run process"
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    time.sleep(3)
    assert all(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), "the run died with its worker"

    worker2 = stack.worker(api, pool, WORKER_ENV, name="worker-2")  # same machine, same worker name
    assert "kept GPU limit" in worker2.tail(20000) and "rescheduled" not in worker2.tail(20000), worker2.tail()
    final = _completed(api, run.id, 240, worker2)
    assert final.run_count == 1, final.run_count
    _assert_settled(api, run.id)
    assert "resuming after" not in _run_logs(api, run.id)  # one uninterrupted attempt


@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_worker_killed_alone_crashed_run_is_rescheduled_and_resumes(on_prefect_stack, trained_workdir, tmp_path):
    """The same kill on a run whose output the worker still streams (a deployment made before
    stream_output was turned off): writing to the dead worker's pipe ends the run, Crashed
    ("Execution was aborted by Python system exit call"); the restarted worker reschedules it, it
    resumes at the next layer and completes, and the dead attempt's task runs are Crashed, not
    Running."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, stack, pool = on_prefect_stack
    params = _tiny_params(method=SLOW, registry={"enabled": False})
    repo = _repo(tmp_path, trained_workdir, params)
    _deploy(api, stack, "--source", str(repo), pool=pool)
    worker = stack.worker(api, pool, WORKER_ENV, name="worker-1")
    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment(f"{FLOW}/on-demand", parameters={"recipe": params}, timeout=0, as_subflow=False,
                             job_variables={"stream_output": True})
    ckpt = repo / "data" / "compress" / "checkpoint.mpk"
    _wait_layers(ckpt, 1, worker)
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    crashed = _wait_final(api, run.id, 90)
    assert crashed.state_name == "Crashed", crashed.state_name
    print(f"crashed {(crashed.state.timestamp - crashed.start_time).total_seconds():.0f} s after its start: "
          f"{crashed.state.message}")
    done = layers_done(ckpt)

    worker2 = stack.worker(api, pool, WORKER_ENV, name="worker-2")
    assert f"rescheduled crashed flow run {run.name}" in worker2.tail(20000), worker2.tail()
    _completed(api, run.id, 240, worker2)
    _assert_settled(api, run.id)
    logs = _run_logs(api, run.id)
    assert f"compress: resuming after {done} finished layers" in logs, logs[-3000:]
    states = sorted(t.state_name for t in _task_runs(api, run.id) if t.name.startswith("compress"))
    print(f"crashed with {done} layers done; compress task runs: {states}")


@pytest.mark.xdist_group("prefect-server")  # the shared server (fixtures_servers.py)
def test_worker_stopped_by_one_sigterm_mid_compression_run_resumes_after_restart(on_prefect_stack, trained_workdir, tmp_path):
    """One SIGTERM to a worker started in the background (SIGINT ignored, as `cmd &` does) while
    it runs a compression: it stops within STOP_GRACE_S, stopping the run's process; started again
    under the same name it reschedules the run, which resumes at the next layer."""
    api, stack, pool = on_prefect_stack
    params = _tiny_params(method=SLOW, registry={"enabled": False})
    repo = _repo(tmp_path, trained_workdir, params)
    _deploy(api, stack, "--source", str(repo), pool=pool)
    worker = stack.worker(api, pool, WORKER_ENV, name="worker-1", background=True)
    run = _trigger(api, {"recipe": params})
    ckpt = repo / "data" / "compress" / "checkpoint.mpk"
    _wait_layers(ckpt, 1, worker)
    assert worker.stop() == [], worker.tail()
    done = layers_done(ckpt)

    worker2 = stack.worker(api, pool, WORKER_ENV, name="worker-2")
    assert f"rescheduled orphaned flow run {run.name}" in worker2.tail(20000), worker2.tail()
    _completed(api, run.id, 240, worker2)
    _assert_settled(api, run.id)
    assert f"compress: resuming after {done} finished layers" in _run_logs(api, run.id)
    print(f"worker stopped {worker.stop_s:.1f} s after SIGTERM, with {done} layers done")


# ---- every service stops on one SIGTERM ---------------------------------------------------------

def test_every_service_stops_on_one_sigterm(tmp_path):
    """S3, MLflow, Prefect server, a GPU worker and a control worker, started as `cmd &` starts
    them (SIGINT ignored: how the worker came to ignore SIGTERM), each stop on one SIGTERM to their
    main process within STOP_GRACE_S, leaving no process. Prints each one's idle memory (RSS)."""
    need_binaries()
    stack = Stack(tmp_path / "stack", background=True)
    try:
        s3 = stack.s3("modelpress")
        stack.mlflow(s3, "s3://modelpress/mlflow")
        api = stack.prefect()
        stack.worker(api, POOL, WORKER_ENV, name="gpu-worker")
        stack.worker(api, f"{POOL}-sweeps", {"MODELPRESS_WORKER_KIND": "control"}, name="control-worker")
        time.sleep(15)  # idle
        rss = {svc.name: sum(p.memory_info().rss for p in svc.processes() if p.name() not in ("bash", "sh"))
               for svc in stack.services}
    finally:
        left = stack.close()
    assert left == [], left
    times = {svc.name: svc.stop_s for svc in stack.services}
    assert all(t is not None and t <= STOP_GRACE_S for t in times.values()), times
    print("stopped after one SIGTERM (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print("idle RSS (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items()))
