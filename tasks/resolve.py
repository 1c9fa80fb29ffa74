"""Turn a teacher weights reference into a local file: a path stays a path; an MLflow
``models:/`` or ``runs:/`` URI is downloaded from the tracking server."""

from __future__ import annotations

from pathlib import Path

from modelpress.stages import StageError

WEIGHT_SUFFIXES = (".mpk", ".pt", ".pth", ".th", ".bin")


def resolve_teacher_weights(ref: str | None) -> str | None:
    if not ref or not ref.startswith(("models:/", "runs:/")):
        return ref
    import mlflow

    from .registry import configure_mlflow

    configure_mlflow()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    except Exception as e:  # noqa: BLE001 - MLflow raises many types
        raise StageError(f"teacher.weights {ref}: cannot download from MLflow: {str(e).splitlines()[0]}") from None
    if local.is_file():
        return str(local)
    found = sorted(p for p in local.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise StageError(f"teacher.weights {ref}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) in the MLflow artifact")
    return str(found[0])
