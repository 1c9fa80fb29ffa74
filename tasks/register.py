"""Register the packed model in MLflow: run with params, metrics, per-layer table, lineage
tags, and a registered model version carrying the packed file (a pyfunc model)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

from modelpress import stages
from modelpress.recipe import Recipe

from .common import retry_transient

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def configure_mlflow() -> str:
    """Tracking URI from MLFLOW_TRACKING_URI, else a local sqlite store (registry included)."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    return uri


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


@task(name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def register_model(recipe: Recipe, packed_path: str, summary: dict) -> dict:
    """Log the run and register a model version. The version is created last, so a failure
    leaves no registered version; the run is then marked FAILED."""
    import mlflow
    import numpy as np

    configure_mlflow()
    mlflow.set_experiment(recipe.registry.experiment)
    p = stages.paths(recipe)
    layers = (stages.read_json(p["layers"]) or {}).get("layers", [])
    teacher = stages.read_json(p["teacher_info"]) or {}
    name = recipe.registered_name()
    tags = {
        "modelpress.method": recipe.method.name,
        "modelpress.teacher_arch": recipe.teacher.arch,
        "modelpress.teacher_source": teacher.get("source", ""),
        "modelpress.teacher_sha256": teacher.get("sha256", ""),
        "modelpress.dataset": recipe.data.name,
        "modelpress.dataset_sha256": ",".join(f"{k}:{v[:16]}" for k, v in recipe.data.files.items()),
        "modelpress.packed_sha256": summary["packed_sha256"],
        "modelpress.packed_bytes": str(summary["packed_bytes"]),
        "modelpress.git_commit": _git_commit(),
        "modelpress.prefect_flow_run_id": str(flow_run.get_id() or ""),
    }
    with mlflow.start_run(run_name=recipe.run.name) as run:
        try:
            params = {k: str(v)[:500] for k, v in _flat(recipe.model_dump(mode="json")).items()}
            mlflow.log_params(params)
            mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
            mlflow.set_tags(tags)
            mlflow.log_dict({"layers": layers}, "layers.json")
            mlflow.log_artifact(packed_path, "packed")
            example = np.zeros([1, *summary_input_shape(packed_path)], dtype=np.float32)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"packed": packed_path},
                input_example=example, pip_requirements=["torch", "numpy", "modelpress"],
            )
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
    return {"run_id": run.info.run_id, "model_name": name, "version": version.version, "model_uri": info.model_uri}


def summary_input_shape(packed_path: str) -> list[int]:
    from modelpress.pack import read_packed

    return read_packed(packed_path).meta["input"]["shape"]
