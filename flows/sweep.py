"""check -> fetch -> teacher -> every point at once (bounded by ``concurrency``) ->
register each -> Pareto front.

One compression run per point, fanned out through Prefect: locally each point is a worker
process; with ``runner: deployment`` each is a run of the compression deployment on the work
pool, so the sweep scales across worker machines. A failed point is retried, then reported,
and does not sink the others (their front is published; the sweep's run then ends Failed, its
record as the state's data); finished points are not recomputed when the sweep is rerun.
"""

from __future__ import annotations

import time

from prefect import flow

from modelpress import stages
from modelpress.progress import error_line
from modelpress.sweep import SweepConfig
from modelpress.tasks.register import register_model
from modelpress.tasks.steps import fetch_dataset, pin_teacher, prepare_teacher
from modelpress.tasks.sweep import (
    check_sweep,
    publish_front,
    register_points,
    rows_of,
    start_parent_run,
    sweep_point_task,
)


@flow(name="modelpress-sweep", log_prints=True)
def sweep_flow(sweep: SweepConfig) -> dict:
    """Compress one teacher at every point of the sweep; returns the sweep record."""
    check_sweep(sweep)
    with sweep.lock():  # the same sweep again (the schedule, a click in the UI) waits for this one to end
        return _sweep(sweep)


def _sweep(sweep: SweepConfig) -> dict:
    if (sweep.base.teacher.weights or "").startswith("models:/"):  # an alias as the version it names now, for every point
        sweep = sweep.model_copy(update={"base": pin_teacher(sweep.base)})
    points = sweep.expand()
    if sweep.runner == "local":  # deployment points fetch and load the teacher on their workers
        shared = sweep.shared_recipe()
        prepare_teacher(shared, fetch_dataset(shared))
    t0 = time.perf_counter()
    futures = {name: sweep_point_task.submit(sweep, name, recipe) for name, recipe in points}
    results, failed = {}, {}
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except Exception as e:  # noqa: BLE001 - one failed point does not sink the sweep
            failed[name] = error_line(e)
    wall_s = time.perf_counter() - t0
    if not results:
        raise RuntimeError(f"every point of sweep {sweep.name} failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    rows = rows_of(sweep, results)
    parent = None
    if sweep.base.registry.enabled:
        parent = start_parent_run(sweep)
        recipes = dict(points)
        register_points(rows, results, lambda name, rec: register_model(
            recipes[name], str(stages.paths(recipes[name])["packed"]), rec["summary"], parent), failed)
    record = publish_front(sweep, rows, failed, wall_s, parent)
    if failed:  # the front of the others is published; the run still ends Failed, for the UI and automations
        from prefect.states import Failed

        return Failed(message=f"sweep {sweep.name}: {len(failed)} of {len(points)} points failed ("
                              + "; ".join(f"{k}: {v}" for k, v in failed.items()) + "); the others' front is published",
                      data=record)
    return record
