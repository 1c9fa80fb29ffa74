"""The production deployments of the compression flow, and the worker-side bookkeeping.

    python -m modelpress.flows.deploy [--pool gpu] [--cron "0 2 * * *"] [--timezone UTC] [--source DIR|GIT-URL] [--params FILE]
        creates (or updates) two deployments of flow ``modelpress-compress`` on the work pool:
          modelpress-compress/nightly    cron schedule (MODELPRESS_NIGHTLY_CRON, default 02:00 UTC)
          modelpress-compress/on-demand  no schedule: run it from the UI, the API or
                                         `prefect deployment run modelpress-compress/on-demand`
          modelpress-sweep/on-demand     a sweep (flows/sweep.py) whose points run as flow runs of
                                         modelpress-compress/on-demand on the pool (runner:
                                         deployment): the points spread over the pool's workers.
                                         The sweep itself runs on its own pool (--sweep-pool,
                                         default <pool>-sweeps; infra/prefect-worker.sh with
                                         MODELPRESS_WORKER_KIND=control): it only waits, and must
                                         not hold a GPU worker's one slot its points need
        The compression deployments take the one parameter ``recipe`` (modelpress.recipe.Recipe), so the UI shows a typed
        form with the schema's defaults and descriptions; ``--params`` (default: params.yaml of the
        source; of this checkout for a git URL) sets the form's defaults and the nightly's recipe,
        as of this command: rerun it after editing params.yaml (the deployments' descriptions name
        the file and the sha256 of the recipe). The worker runs the flow from ``--source``: a directory it can
        read (the repository checkout; default: this one) or a git URL it clones.

    python -m modelpress.flows.deploy worker-setup [--no-gpu] POOL WORKER_NAME
        what infra/prefect-worker.sh runs before starting a worker: creates the process work pool
        if missing and this machine's GPU concurrency limit (limit 1), recreated empty when no
        flow-run process is alive on this machine (nothing here can hold the GPU then; a run that
        outlived its worker keeps its slot). Then reschedules this worker's runs that a crash
        interrupted, which resume, skipping finished stages and finished layers:
          - runs still Running/Pending whose process is gone (machine, or worker and run, killed);
          - runs that Crashed within MODELPRESS_RESCHEDULE_CRASHED_S (default 21600) and ran fewer
            than MODELPRESS_RESCHEDULE_MAX_RUNS times (default 3), e.g. a run stopped with its
            worker or whose process died when the worker did.
        Their task runs still Running or Pending (the dead attempt's) are marked Crashed first.
        Prints the GPU limit's name.

    python -m modelpress.flows.deploy reschedule FLOW_RUN_ID ...
        puts runs back into Scheduled so a worker picks them up again (same run id); their task
        runs still Running or Pending are marked Crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from uuid import UUID

import yaml

FLOW_NAME = "modelpress-compress"
ENTRYPOINT = "flows/compress.py:compress_flow"
SWEEP_FLOW, SWEEP_ENTRYPOINT = "modelpress-sweep", "flows/sweep.py:sweep_flow"
NIGHTLY, ON_DEMAND = "nightly", "on-demand"
DEFAULT_CRON = "0 2 * * *"
REPO = Path(__file__).resolve().parents[1]
# Library progress lines (layer i/n, ETA, "resuming after ...") go to the Prefect run logs.
JOB_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "modelpress", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# A process worker streams a flow-run process's output through a pipe it reads: when the worker
# dies, the run's next log line raises BrokenPipeError and the run crashes. Not streamed, the run
# outlives its worker (its logs still go to the Prefect API: the UI and `prefect flow-run logs`).
JOB_VARIABLES = {"env": JOB_ENV, "stream_output": False}
RESCHEDULE_CRASHED_S = float(os.environ.get("MODELPRESS_RESCHEDULE_CRASHED_S", 6 * 3600))
RESCHEDULE_MAX_RUNS = int(os.environ.get("MODELPRESS_RESCHEDULE_MAX_RUNS", 3))


def gpu_limit_name(host: str | None = None) -> str:
    return f"gpu-{host or socket.gethostname()}"


def default_parameters(params_file: Path | None, base: Path | None = None) -> dict:
    """The deployments' default parameters (the UI form's pre-filled values), validated. A
    ``--params`` file may be partial: it is merged onto ``base``, the source's committed
    params.yaml (runs never rewrite it); without one, ``base`` itself."""
    from modelpress.recipe import Recipe

    params_file = params_file or base
    if params_file is None or not params_file.is_file():
        return {}
    return {"recipe": Recipe.from_yaml(params_file, base=base).model_dump(mode="json")}


def parameters_note(parameters: dict, params_file: Path | None, base: Path | None) -> str:
    """What a deployment's description says of its parameters: a snapshot of which files, and the
    sha256 of the recipe they make (compare it with the checkout's to see a drift)."""
    if not parameters:
        return "Parameters: the built-in defaults."
    files = " merged onto ".join(str(f) for f in (params_file, base) if f is not None)
    return (f"Parameters: {files} as of this deploy (recipe sha256 {recipe_sha256(parameters['recipe'])}); "
            "rerun infra/deploy.sh after editing them.")


def recipe_sha256(recipe: dict) -> str:
    """First 12 hex digits of the sha256 of a recipe's canonical JSON."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def sweep_defaults(parameters: dict) -> dict:
    """The sweep form's default: a budget sweep of the compress deployments' default recipe (the
    built-in one where they have none: no params.yaml to be read), points on the pool."""
    from modelpress.recipe import Recipe

    base = parameters.get("recipe") or Recipe().model_dump(mode="json")
    return {"sweep": {"name": "front", "base": base, "budgets": [120000, 80000, 50000],
                      "runner": "deployment", "deployment": f"{FLOW_NAME}/{ON_DEMAND}", "concurrency": 4}}


def deploy(pool: str, cron: str, timezone: str, source: str, params_file: Path | None,
           sweep_pool: str | None = None) -> dict[str, UUID]:
    """Create or update the nightly and on-demand deployments; returns their ids."""
    from prefect import deploy as prefect_deploy
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    sweep_pool = sweep_pool or f"{pool}-sweeps"
    asyncio.run(_ensure_pool(pool))
    asyncio.run(_ensure_pool(sweep_pool))
    flow = prefect_flow.from_source(source=source, entrypoint=ENTRYPOINT)
    from modelpress.tasks.versioning import checkout_params

    # The source's params.yaml (even while a run's versioning holds it); for a git URL, the one of
    # this checkout, the deployer's (keep it at the commit the URL serves).
    base = checkout_params(Path(source) if "://" not in source else REPO)
    parameters = default_parameters(params_file, base)
    description = ("Compress a model (PQ), evaluate the packed file, version outputs with DVC, register in MLflow. "
                   + parameters_note(parameters, params_file, base))
    common = dict(parameters=parameters, job_variables=JOB_VARIABLES, tags=["modelpress", "gpu"],
                  enforce_parameter_schema=True)
    nightly = flow.to_deployment(
        name=NIGHTLY, schedules=[Cron(cron, timezone=timezone, slug="nightly")],
        description=f"{description} Scheduled: cron '{cron}' ({timezone}).", **common)
    on_demand = flow.to_deployment(name=ON_DEMAND, description=f"{description} Triggered from the UI or the API.", **common)
    sweep_params = sweep_defaults(parameters)
    sweep = prefect_flow.from_source(source=source, entrypoint=SWEEP_ENTRYPOINT).to_deployment(
        name=ON_DEMAND, description="Compress one teacher at many points (methods x knobs or byte budgets); "
                                    "Pareto front of accuracy vs packed bytes.",
        **{**common, "parameters": sweep_params, "tags": ["modelpress"]})
    ids = prefect_deploy(nightly, on_demand, work_pool_name=pool, build=False, push=False,
                         print_next_steps_message=False, ignore_warnings=True)
    ids += prefect_deploy(sweep, work_pool_name=sweep_pool, build=False, push=False,
                          print_next_steps_message=False, ignore_warnings=True)
    return {NIGHTLY: ids[0], ON_DEMAND: ids[1], f"sweep-{ON_DEMAND}": ids[2]}


def _process_alive(pid: str | None) -> bool:
    if not pid:
        return False
    try:
        pid_int = int(str(pid).rsplit(":", 1)[-1])
        os.kill(pid_int, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # guard against pid reuse: it must still be a Python (flow-run) process
        return "python" in Path(f"/proc/{pid_int}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


async def ensure_pool(client, pool: str) -> None:
    """The work pool, created as a process pool if it does not exist yet. For docker or
    kubernetes pools create them with infra/docker or infra/k8s's base job templates."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        await client.read_work_pool(pool)
    except ObjectNotFound:
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created work pool {pool!r} (process)", file=sys.stderr)
        except ObjectAlreadyExists:
            pass


async def _ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await ensure_pool(client, pool)


async def _crash_task_runs(client, run_id: UUID, why: str) -> int:
    """Mark the task runs of a dead attempt that are still Running or Pending as Crashed (the
    process that ran them is gone; without this the UI shows them running forever)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    task_runs = await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
            any_=[StateType.RUNNING, StateType.PENDING]))),
    )
    for task_run in task_runs:
        await client.set_task_run_state(task_run.id, Crashed(message=why), force=True)
    return len(task_runs)


async def _reschedule_run(client, run, why: str, crash: bool = False) -> None:
    """Back to Scheduled (same run id), the dead attempt's task runs marked Crashed; ``crash``:
    record the flow run's own crash first (it is still Running with its process gone)."""
    from prefect.states import Crashed, Scheduled

    if crash:
        await client.set_flow_run_state(run.id, Crashed(message=why), force=True)
    await _crash_task_runs(client, run.id, why)
    await client.set_flow_run_state(run.id, Scheduled(), force=True)


def _is_ours(run, worker_name: str) -> bool:
    return (run.labels or {}).get("prefect.worker.name") == worker_name


async def _worker_setup(pool: str, worker_name: str, gpu: bool = True) -> str:
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = gpu_limit_name()
    async with get_client() as client:
        await ensure_pool(client, pool)
        live = await client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        if gpu:
            alive_here = [r for r in live if _process_alive(r.infrastructure_pid)]
            if not alive_here:
                # Nothing on this machine can hold the GPU: a fresh limit, so that slots of killed
                # processes (leases lost by a server that kept them in memory) cannot block it.
                try:
                    await client.delete_global_concurrency_limit_by_name(limit)
                except ObjectNotFound:
                    pass
            else:
                print(f"kept GPU limit {limit!r}: flow-run processes alive here "
                      f"({', '.join(r.name for r in alive_here)})", file=sys.stderr)
            try:
                await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:
                pass
        else:
            limit = ""

        in_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
        orphans = [r for r in await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))), work_pool_filter=in_pool)
            if _is_ours(r, worker_name) and not _process_alive(r.infrastructure_pid)]
        for run in orphans:
            await _reschedule_run(client, run, f"worker {worker_name} restarted; the run's process is gone", crash=True)
            print(f"rescheduled orphaned flow run {run.name} ({run.id}): it resumes where it stopped", file=sys.stderr)

        since = datetime.now(timezone.utc) - timedelta(seconds=RESCHEDULE_CRASHED_S)
        # Newest first: the server returns at most 200, and crashed runs of the past pile up.
        crashed = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.CRASHED]))), work_pool_filter=in_pool, sort=FlowRunSort.END_TIME_DESC)
        for run in crashed:
            if not _is_ours(run, worker_name) or run.state is None or run.state.timestamp < since:
                continue
            if run.run_count >= RESCHEDULE_MAX_RUNS:
                print(f"not rescheduling crashed flow run {run.name} ({run.id}): it ran {run.run_count} times",
                      file=sys.stderr)
                continue
            await _reschedule_run(client, run, run.state.message or "crashed")
            print(f"rescheduled crashed flow run {run.name} ({run.id}): it resumes where it stopped", file=sys.stderr)
    return limit


async def _reschedule(ids: list[str]) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for run_id in ids:
            run = await client.read_flow_run(UUID(run_id))
            await _reschedule_run(client, run, "rescheduled by hand")
            print(f"rescheduled {run_id}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker-setup"]:
        p = argparse.ArgumentParser(prog="python -m modelpress.flows.deploy worker-setup")
        p.add_argument("--no-gpu", action="store_true", help="a control worker: no GPU concurrency limit")
        p.add_argument("pool")
        p.add_argument("worker_name")
        a = p.parse_args(argv[1:])
        print(asyncio.run(_worker_setup(a.pool, a.worker_name, gpu=not a.no_gpu)))
        return 0
    if argv[:1] == ["reschedule"]:
        asyncio.run(_reschedule(argv[1:]))
        return 0
    p = argparse.ArgumentParser(prog="python -m modelpress.flows.deploy", description="Create the nightly and on-demand deployments.")
    p.add_argument("--pool", default=os.environ.get("MODELPRESS_POOL", "gpu"))
    p.add_argument("--cron", default=os.environ.get("MODELPRESS_NIGHTLY_CRON", DEFAULT_CRON))
    p.add_argument("--timezone", default=os.environ.get("MODELPRESS_NIGHTLY_TZ", "UTC"))
    p.add_argument("--source", default=os.environ.get("MODELPRESS_SOURCE", str(REPO)),
                   help="repository checkout the worker reads (a directory) or a git URL it clones")
    p.add_argument("--params", type=Path, default=None, help="defaults of the UI form (default: params.yaml of the source)")
    p.add_argument("--sweep-pool", default=os.environ.get("MODELPRESS_SWEEP_POOL"),
                   help="work pool of the sweep deployment (default <pool>-sweeps)")
    a = p.parse_args(argv)
    if a.params is not None and not a.params.is_file():  # else the deployments would run the built-in defaults
        p.error(f"--params {a.params}: no such file")
    ids = deploy(a.pool, a.cron, a.timezone, a.source, a.params, a.sweep_pool)
    names = {k: f"{SWEEP_FLOW}/{k.removeprefix('sweep-')}" if k.startswith("sweep-") else f"{FLOW_NAME}/{k}" for k in ids}
    print(yaml.safe_dump({names[k]: str(v) for k, v in ids.items()}, sort_keys=False).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
