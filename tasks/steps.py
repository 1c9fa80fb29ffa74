"""The pipeline's steps as Prefect tasks. Each calls the same function the DVC stage calls."""

from __future__ import annotations

import os

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from modelpress import stages
from modelpress.recipe import Recipe
from modelpress.report import markdown_table, metric_label

from .common import GPU_TAG, gpu_slot, log_device, retry_transient, ui_progress
from .resolve import pin_model_uri, resolve_teacher_weights

RETRY = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)


def gpu_task_timeout_s(env=os.environ) -> float:
    """The time limit of one attempt of a GPU task (teacher, method step, compress, fine-tune),
    waiting for the machine's GPU slot included: MODELPRESS_GPU_TASK_TIMEOUT_H hours (default 6),
    for work that takes longer on the pool's machines (a long fine-tuning of a large model)."""
    raw = env.get("MODELPRESS_GPU_TASK_TIMEOUT_H", "6")
    try:
        hours = float(raw)
    except ValueError:
        hours = float("nan")
    if not (0 < hours <= 24 * 365):  # nan, inf and the absurd: a timer cannot be set to them
        raise ValueError(f"MODELPRESS_GPU_TASK_TIMEOUT_H={raw!r}: give the hours one GPU task may take, "
                         "a number > 0 (at most a year)")
    return hours * 3600


GPU_TIMEOUT_S = gpu_task_timeout_s()


@task(name="fetch", timeout_seconds=3600, **RETRY)
def fetch_dataset(recipe: Recipe) -> str:
    """Fetch the dataset files (local, HTTP(S) or S3), checked against their sha256."""
    return str(stages.fetch(recipe))


@task(name="pin-teacher", timeout_seconds=300, **RETRY)
def pin_teacher(recipe: Recipe) -> Recipe:
    """The recipe with teacher.weights ``models:/<name>@<alias>`` (or ``/latest``) replaced by the
    version it names now: the run's keys and lineage then name that version, and the next run
    takes the next one once the alias moves."""
    pinned = pin_model_uri(recipe.teacher.weights)
    return recipe if pinned == recipe.teacher.weights else recipe.with_overrides({"teacher.weights": pinned}, "pinned teacher")


@task(name="teacher", timeout_seconds=GPU_TIMEOUT_S, tags=[GPU_TAG], **RETRY)
def prepare_teacher(recipe: Recipe, data_dir: str) -> str:
    """Load the teacher (file or MLflow URI) or train one; evaluate it."""
    log_device(recipe.run.device)
    with gpu_slot(), ui_progress("teacher"):
        path = stages.teacher(recipe, resolve_teacher_weights(recipe.teacher.weights))
    info = stages.read_teacher(recipe).model_dump()
    create_table_artifact([{k: info[k] for k in ("arch", "top1", "params", "fp32_bytes", "source")}],
                          key="teacher", description="Teacher model")
    return str(path)


@task(name="check", timeout_seconds=300)
def check_recipe(recipe: Recipe) -> None:
    """Fail in seconds on settings the architecture cannot take (layer names, budgets), and on a
    tracking server that does not answer (not after hours of compression, at registration)."""
    stages.preflight(recipe)
    if recipe.registry.enabled:
        from prefect.runtime import deployment

        from .registry import DEFAULT_TRACKING_URI, check_name, check_reachable

        if deployment.get_id() and not os.environ.get("MLFLOW_TRACKING_URI"):
            get_run_logger().warning(
                "MLFLOW_TRACKING_URI is not set on this worker: the model is registered in %s on the worker's own "
                "disk, not in the team's registry (set it in the worker's environment: infra/README.md)", DEFAULT_TRACKING_URI)
        check_reachable()
        check_name(recipe.registered_name(), recipe.data.name)


@task(name="method-step", task_run_name="{label}-{step}", timeout_seconds=GPU_TIMEOUT_S, tags=[GPU_TAG], **RETRY)
def method_step(recipe: Recipe, teacher_path: str, step: int, label: str = "step") -> dict:
    """One step (1-based) of an iterative method (a pruning cycle): run it, evaluate,
    checkpoint. A retry restarts this step from the previous one's checkpoint; finished steps
    are never redone."""
    log_device(recipe.run.device)
    with gpu_slot(), ui_progress(f"{label}-{step}"):
        record = stages.method_step(recipe, step - 1)
    if not record.get("skipped"):
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
               if isinstance(v, (int, float, str)) and k not in ("done", "state")}
        create_table_artifact([row], key=f"{label}-{step}", description=f"{recipe.method.name}: {label} {step}")
    return record


@task(name="compress", timeout_seconds=GPU_TIMEOUT_S, tags=[GPU_TAG], **RETRY)
def compress_model(recipe: Recipe, teacher_path: str) -> str:
    """Layer-by-layer compression; checkpoints each layer, so a retry continues."""
    log_device(recipe.run.device)
    with gpu_slot(), ui_progress("compress"):
        path = stages.compress_stage(recipe)
    layers = stages.read_json(stages.paths(recipe)["layers"])["layers"]
    create_table_artifact(layer_rows(layers), key="layers", description="Per-layer size and error")
    return str(path)


@task(name="finetune", timeout_seconds=GPU_TIMEOUT_S, tags=[GPU_TAG], **RETRY)
def finetune_model(recipe: Recipe, compressed_path: str) -> str:
    """Distil all codebooks from the teacher; re-estimate BatchNorm statistics."""
    log_device(recipe.run.device)
    with gpu_slot(), ui_progress("finetune"):
        return str(stages.finetune_stage(recipe))


@task(name="pack", timeout_seconds=600, **RETRY)
def pack_model(recipe: Recipe, finetuned_path: str) -> str:
    """Write the final packed file."""
    return str(stages.pack_stage(recipe))


@task(name="evaluate", timeout_seconds=3600, **RETRY)
def evaluate_packed(recipe: Recipe, packed_path: str) -> dict:
    """Evaluate the packed file in a fresh process, exactly as a consumer would load it."""
    return stages.evaluate_in_fresh_process(recipe)


def layer_rows(layers: list[dict]) -> list[dict]:
    """Every scalar figure of each layer's statistics (whatever the method reports)."""
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
             if isinstance(v, (int, float, str)) and k != "index"} for s in layers]


def summary_markdown(summary: dict) -> str:
    m = metric_label(summary.get("metric"))
    rows = [
        (f"teacher {m}", f"{summary['teacher_top1']:.2f} %"),
        (f"compressed {m} (from the packed file, {summary.get('test_images') or '?'} test inputs)", f"{summary['compressed_top1']:.2f} %"),
        (f"{m} drop", f"{summary['top1_drop']:.2f} points"),
        ("packed file", f"{summary['packed_bytes']:,} bytes"),
        ("teacher fp32 weights", f"{summary['teacher_fp32_bytes']:,} bytes"),
        ("compression ratio", f"{summary['compression_ratio']:.1f}x"),
    ]
    return markdown_table([{"": a, " ": b} for a, b in rows], ["", " "])


@task(name="summarize", **RETRY)
def publish_summary(recipe: Recipe, summary: dict) -> None:
    """The run's summary and stage times: ``run_timings.json`` in the workdir and two Prefect
    artifacts (whatever started the run: the CLI, a schedule or the UI)."""
    seconds = summary.get("seconds") or {}
    stages.write_json(stages.paths(recipe)["timings"], seconds)
    create_markdown_artifact(f"# {recipe.run.name}\n\n" + summary_markdown(summary), key="summary",
                             description="Compression run summary")
    create_table_artifact([{"stage": k, "seconds": v} for k, v in seconds.items()], key="stage-seconds",
                          description="Seconds per stage")
