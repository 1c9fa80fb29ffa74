"""Turn a teacher weights reference into a local file: a path stays a path; an MLflow
``models:/`` or ``runs:/`` URI is downloaded from the tracking server. A ``models:/`` URI that
names a version indirectly (an alias, ``latest``) is first pinned to the version it names now."""

from __future__ import annotations

from pathlib import Path

from modelpress.progress import error_line
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
        # chained: a network failure underneath is transient (tasks/transient.py), so the task is retried
        raise StageError(f"teacher.weights {ref}: cannot download from MLflow: {error_line(e)}") from e
    if local.is_file():
        return str(local)
    found = sorted(p for p in local.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise StageError(f"teacher.weights {ref}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) in the MLflow artifact")
    return str(found[0])


def pin_model_uri(ref: str | None) -> str | None:
    """``models:/<name>@<alias>`` or ``models:/<name>/latest`` as ``models:/<name>/<version>``,
    the version it names now; any other reference as it is. A run keys its teacher on the pinned
    URI, so the nightly compresses the new version once the alias moves (and its lineage names
    the version it used), where the unchanged alias string kept the old teacher."""
    if not ref or not ref.startswith("models:/"):
        return ref
    name, sep, rest = ref.removeprefix("models:/").partition("/")
    from mlflow import MlflowClient

    from .registry import configure_mlflow

    configure_mlflow()
    try:
        if "@" in name and not sep:
            name, alias = name.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        elif sep and rest == "latest":
            found = MlflowClient().search_model_versions(f"name='{name}'")
            if not found:
                raise StageError(f"teacher.weights {ref}: the registered model has no version")
            version = str(max(int(v.version) for v in found))
        else:
            return ref  # a fixed version (or a stage name, left to MLflow)
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types
        raise StageError(f"teacher.weights {ref}: cannot resolve in the MLflow registry: {str(e).splitlines()[0]}") from e  # a network cause stays transient
    return f"models:/{name}/{version}"
