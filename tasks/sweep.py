"""The sweep's tasks: check every point, run one point, register and publish the front.

A point runs in its own worker process here (``modelpress stage point``: true parallelism,
and a crash or an out-of-memory kill takes down one point, not the sweep), with the CPU
threads shared out between the concurrent points; with ``runner: deployment`` it is a run of
the compression deployment instead, which the work pool's workers pick up on their machines.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from modelpress import stages
from modelpress.progress import error_line
from modelpress.recipe import Recipe
from modelpress.report import markdown_table
from modelpress.sweep import (
    COLUMNS,
    PointTimeout,
    SweepConfig,
    result_row,
    sweep_point,
    write_results,
)

from . import registry
from .transient import retry_transient

_gates: dict[tuple[str, int], threading.Semaphore] = {}
_gates_lock = threading.Lock()


def _gate(sweep: SweepConfig) -> threading.Semaphore:
    """At most ``concurrency`` points of this sweep compute at once, whatever the task runner."""
    with _gates_lock:
        return _gates.setdefault((str(sweep.root()), sweep.concurrency), threading.Semaphore(sweep.concurrency))


@task(name="check-sweep", timeout_seconds=600)
def check_sweep(sweep: SweepConfig) -> list[str]:
    """Every point's recipe is valid and fits the architecture, and the tracking server the
    points register in answers, before any work."""
    if sweep.runner == "local" and os.environ.get("MODELPRESS_WORKER_KIND") == "control":
        raise ValueError("sweep runner 'local' on a control worker would compute every point on this machine, outside "
                         "the GPU pool and its GPU slot: choose runner 'deployment' (the points run on the GPU pool)")
    names, registered = [], set()
    for name, recipe in sweep.expand():
        if sweep.runner == "deployment":  # its points run on the pool's machines (a GPU), not on this control worker
            recipe = recipe.with_overrides({"run.device": "auto"})
        try:
            stages.preflight(recipe)
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
        names.append(name)
        registered.add((recipe.registered_name(), recipe.data.name))
    if sweep.base.registry.enabled:
        registry.check_reachable()
        for model_name, dataset in sorted(registered):
            registry.check_name(model_name, dataset)
    return names


def register_points(rows: list[dict], results: dict[str, dict], register, failed: dict[str, str]) -> None:
    """Give each row its registry version: the one its point's run registered, else
    ``register(name, record)``. A point whose registration fails is reported in ``failed`` and
    keeps its row (version None): the others' versions and the front are still published."""
    for row in rows:
        rec = results[row["point"]]
        try:
            reg = rec.get("registered") or register(row["point"], rec)
        except Exception as e:  # noqa: BLE001 - one point's registry failure does not lose the sweep's front
            why = error_line(e)
            failed[row["point"]] = f"registration failed: {why}"
            reg = None
        row["version"] = reg["version"] if reg else None


def _on_deployment(sweep: SweepConfig, name: str, recipe: Recipe) -> dict:
    """Run the point as a flow run of the compression deployment (the work pool's machines).
    The run registers its model itself; the point's figures are read back from that model
    version (tagged with the flow run's id), so no shared result storage is needed."""
    from .register import settings_key

    t0 = time.perf_counter()
    key = settings_key(recipe)
    done = [v for v in registry.versions(recipe.registered_name()) if v.tags.get(registry.TAG + "settings_key") == key]
    if done:  # registered by an earlier run of this sweep (or of these settings): not submitted again
        get_run_logger().info("point %s: version %s has these settings, not recomputed", name, done[0].version)
        return {**_from_version(done[0], recipe, t0), "reused": True}
    timeout_s = sweep.point_timeout_h * 3600
    with _gate(sweep):  # at most `concurrency` points submitted at once, as on the local runner
        # Keyed by this sweep's flow run: a retry of this task, or this sweep run rescheduled after its
        # worker died, finds the point's flow run already submitted and waits for it (no second run
        # computing the same point). A run so found that had already failed (the sweep retried after
        # it ended Failed) is followed by a fresh one, keyed after it; a new sweep run submits afresh.
        ident = f"modelpress-sweep:{flow_run.get_id() or uuid.uuid4()}:{name}:{key}"
        run = _submit(sweep, recipe, ident)
        while run.state is not None and run.state.is_final() and not run.state.is_completed():
            ident = f"{ident}:after:{run.id}"
            run = _submit(sweep, recipe, ident)
        run = _wait(run.id, timeout_s)
        if run.state is None or not run.state.is_final():  # still queued or computing after point_timeout_h
            _cancel(run.id)
            raise PointTimeout(f"point {name}: flow run {run.id} not finished after {timeout_s:.0f} s "
                               "(sweep point_timeout_h); cancelled")
    if not run.state.is_completed():
        raise RuntimeError(f"point {name}: flow run {run.id} ended {run.state.name if run.state else 'without a state'}")
    # The version it registered, or (a rerun of a finished point) the one it found already registered.
    found = [v for v in registry.versions(recipe.registered_name())
             if str(run.id) in (v.tags.get(registry.TAG + "prefect_flow_run_id"), v.tags.get(registry.TAG + "last_prefect_flow_run_id"))]
    if not found:
        raise RuntimeError(f"point {name}: flow run {run.id} registered no version of {recipe.registered_name()}")
    return {**_from_version(found[0], recipe, t0), "flow_run_id": str(run.id)}


def _submit(sweep: SweepConfig, recipe: Recipe, ident: str):
    """The point's flow run on the deployment: created, or the one ``ident`` already names."""
    from prefect.deployments import run_deployment

    return run_deployment(sweep.deployment, parameters={"recipe": recipe.model_dump(mode="json")},
                          flow_run_name=recipe.run.name, timeout=0, idempotency_key=ident)


def _wait(flow_run_id, timeout_s: float, poll_s: float = 5.0):
    """The flow run once final, or as it is after ``timeout_s``."""
    from prefect.client.orchestration import get_client

    end = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state is not None and run.state.is_final()) or time.monotonic() >= end:
                return run
            time.sleep(poll_s)


def _from_version(v, recipe: Recipe, t0: float) -> dict:
    """A deployment point's record, from the figures its model version carries."""
    t = v.tags
    num = lambda k: float(t[registry.TAG + k])  # noqa: E731
    summary = {"method": t[registry.TAG + "method"], "packed_bytes": int(num("packed_bytes")),
               "compression_ratio": num("compression_ratio"), "compressed_top1": num("compressed_top1"),
               "top1_drop": num("top1_drop"), "teacher_top1": num("teacher_top1"),
               "packed_sha256": t[registry.TAG + "packed_sha256"], "metric": t.get(registry.TAG + "metric", "top1"),
               "test_images": int(t.get(registry.TAG + "test_images") or 0) or None}
    return {"summary": summary, "seconds": {"total": round(time.perf_counter() - t0, 1)}, "key_params": recipe.method.key_params(),
            "registered": {"version": v.version, "model_name": v.name}}


def _cancel(flow_run_id) -> None:
    """Ask the server to cancel a flow run (its worker stops it)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="sweep point_timeout_h"), force=True)


@task(name="sweep-point", task_run_name="point-{name}", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def sweep_point_task(sweep: SweepConfig, name: str, recipe: Recipe) -> dict:
    """One point of the sweep: a run of the compression deployment (``runner: deployment``),
    else the library's point runner (:func:`modelpress.sweep.sweep_point`) in a worker process
    here. A point that already finished with these settings is not recomputed; one that failed
    transiently is retried once (it resumes from its own checkpoints)."""
    if sweep.runner == "deployment":
        return _on_deployment(sweep, name, recipe)
    logger = get_run_logger()
    return sweep_point(sweep, name, recipe, sweep.point_timeout_h * 3600, gate=_gate(sweep), note=logger.info,
                       log=lambda line: logger.info("[%s] %s", name, line))


@task(name="sweep-parent-run", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def start_parent_run(sweep: SweepConfig) -> str:
    """The MLflow run the sweep's point runs nest under."""
    import mlflow

    registry.use_experiment(sweep.base.registry.experiment)
    with mlflow.start_run(run_name=f"sweep-{sweep.name}", tags={registry.TAG + "sweep": sweep.name}) as run:
        mlflow.log_dict(sweep.model_dump(mode="json", exclude={"base"}), "sweep_config.json")  # sweep.json is the results (publish_front)
        mlflow.log_dict(sweep.base.model_dump(mode="json"), "base_recipe.json")
    return run.info.run_id


@task(name="publish-front", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def publish_front(sweep: SweepConfig, rows: list[dict], failed: dict[str, str], wall_s: float,
                  parent_run_id: str | None) -> dict:
    """The front as files in the sweep's folder, a Prefect table artifact, the parent MLflow
    run's artifacts and metrics, and a ``modelpress.pareto_front`` tag on every version."""
    teacher = stages.read_json(stages.paths(sweep.shared_recipe())["teacher_info"]) or {}
    if not teacher and rows:  # runner=deployment: the teacher lives on the workers; its figures come with the points
        r = rows[0]
        teacher = {"arch": sweep.base.teacher.arch, "top1": r["top1"] + r["drop"], "fp32_bytes": round(r["packed_bytes"] * r["ratio"])}
    record = write_results(sweep, rows, {k: teacher.get(k) for k in ("arch", "top1", "fp32_bytes", "sha256")}, failed,
                           wall_s)
    rows = record["points"]
    key = "sweep-" + re.sub(r"[^a-z0-9-]", "-", sweep.name.lower())  # Prefect artifact keys: a-z, 0-9, '-'
    create_table_artifact([{c: r.get(c) for c in COLUMNS} for r in rows], key=key,
                          description=f"Sweep {sweep.name}: top-1 vs packed bytes (on_front = Pareto front)")
    create_markdown_artifact((sweep.root() / "front.md").read_text(), key=f"{key}-front",
                             description=f"Sweep {sweep.name}: folder {sweep.root()}")
    if parent_run_id:
        import mlflow

        registry.configure_mlflow()
        with mlflow.start_run(run_id=parent_run_id):
            for i, r in enumerate(rows):
                mlflow.log_metrics({"front_packed_bytes": r["packed_bytes"], "front_top1": r["top1"]}, step=i)
            mlflow.log_metrics({"points": len(rows), "points_failed": len(failed), "wall_s": record["wall_s"],
                                "sum_point_s": record["sum_point_s"]})
            for f in ("front.png", "front.md", "front.csv", "sweep.json"):
                mlflow.log_artifact(str(sweep.root() / f))
    client = registry.client() if any(r.get("version") for r in rows) else None
    for r in rows:
        if r.get("version"):
            client.set_model_version_tag(sweep.registered_name(), r["version"], registry.TAG + "pareto_front",
                                         str(r["on_front"]).lower())
            client.set_model_version_tag(sweep.registered_name(), r["version"], registry.TAG + "sweep", sweep.name)
    get_run_logger().info("sweep %s:\n%s", sweep.name, markdown_table(rows, COLUMNS))
    return record


def rows_of(sweep: SweepConfig, results: dict[str, dict]) -> list[dict]:
    return [{**result_row(name, rec, sweep.series_of(name)), "reused": rec.get("reused", False)} for name, rec in results.items()]
