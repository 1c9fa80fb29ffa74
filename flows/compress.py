"""check -> fetch -> teacher -> [method steps] -> compress -> fine-tune -> pack -> evaluate ->
version (DVC) -> register.

The flow takes the one parameter schema (modelpress.recipe.Recipe); the Prefect UI renders
it as a typed form. Every step is a retriable task; finished steps are skipped on a re-run
because each stage recognises its own up-to-date outputs.
"""

from __future__ import annotations

import time

from prefect import flow

from modelpress.atomic import workdir_lock
from modelpress.methods import REGISTRY
from modelpress.methods.base import until_done
from modelpress.recipe import Recipe
from modelpress.stages import unless_skipped
from modelpress.tasks.register import register_model
from modelpress.tasks.steps import (
    check_recipe,
    compress_model,
    evaluate_packed,
    fetch_dataset,
    finetune_model,
    method_step,
    pack_model,
    pin_teacher,
    prepare_teacher,
    publish_summary,
)
from modelpress.tasks.versioning import version_outputs


@flow(name="modelpress-compress", log_prints=True)
def compress_flow(recipe: Recipe = Recipe()) -> dict:
    """Compress a model end to end and register the result. Returns the run summary. One run
    at a time per work directory: a second one waits for the first."""
    with workdir_lock(recipe.run.workdir):
        return _compress(recipe)


def _compress(recipe: Recipe) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(name, task, *args):
        t0 = time.perf_counter()
        out = task(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        return out

    check_recipe(recipe)
    if (recipe.teacher.weights or "").startswith("models:/"):  # an alias as the version it names now
        recipe = pin_teacher(recipe)
    data_dir = timed("fetch", fetch_dataset, recipe)
    teacher = timed("teacher", prepare_teacher, recipe, data_dir)
    steps = REGISTRY[recipe.method.name].steps
    if steps is not None:
        # An iterative method (pruning cycles): one task per step, each retried on its own and
        # checkpointed, so a run killed in step 7 resumes at step 7. The goal sets the number.
        t0 = time.perf_counter()
        until_done(lambda index: unless_skipped(method_step(recipe, teacher, index + 1, steps.label)))
        timings["steps"] = round(time.perf_counter() - t0, 1)
    compressed = timed("compress", compress_model, recipe, teacher)
    finetuned = timed("finetune", finetune_model, recipe, compressed)
    packed = timed("pack", pack_model, recipe, finetuned)
    summary = timed("evaluate", evaluate_packed, recipe, packed)
    summary["versioning"] = timed("version", version_outputs, recipe, summary)
    summary["seconds"] = timings  # stage times so far; registered with the model's metrics
    if recipe.registry.enabled:
        summary["registered"] = timed("register", register_model, recipe, packed, summary)
    timings["total"] = round(time.perf_counter() - started, 1)
    publish_summary(recipe, summary)
    return summary
