"""Register the packed model in MLflow: a run with params, metrics, the per-layer table and
lineage tags, then a registered model version carrying the packed file as a pyfunc model,
with a model card, the ``candidate`` alias and, when the promotion rule holds, ``champion``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

import modelpress
from modelpress import stages
from modelpress.models import needs_torchvision
from modelpress.pack import read_packed
from modelpress.recipe import Recipe

from . import registry
from .transient import retry_transient
from .versioning import lineage_dir

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY = Path(modelpress.__file__).resolve().parent
# What `modelpress` imports when it loads a packed file; pinned to this environment's versions
# in the logged model's requirements.txt (MLflow adds its own pin), so that the model's
# environment can be rebuilt from the registry alone (tests/test_boundary.py loads every
# architecture family with these alone).
RUNTIME_PACKAGES = ("torch", "numpy", "pydantic", "constriction")
TEXT_PACKAGES = ("transformers", "tokenizers")  # a text encoder's: its class, its tokenizer
T = registry.TAG


def runtime_requirements(arch: str, text: bool = False) -> list[str]:
    """The pinned packages that loading a packed file of architecture ``arch`` imports."""
    names = RUNTIME_PACKAGES + (("torchvision",) if needs_torchvision(arch) else ()) + (TEXT_PACKAGES if text else ())
    # A local version label (torch 2.14.1+cu124 from PyTorch's own index) is not on a consumer's
    # index: the public release it labels is pinned.
    return [f"{name}=={metadata.version(name).split('+', 1)[0]}" for name in names]


def _not_library(folder: str, names: list[str]) -> set[str]:
    """Caches, and the orchestration (installed as modelpress.flows / modelpress.tasks): the
    consumer loads a packed file with the core library alone."""
    top = Path(folder).resolve() == LIBRARY
    return {n for n in names if n == "__pycache__" or n.endswith(".pyc") or (top and n in ("flows", "tasks"))}


def _library_copy(dst: Path) -> Path:
    """The library's source (no caches) to log with the model: a consumer needs nothing else
    from modelpress, and no package index has to publish it."""
    return Path(shutil.copytree(LIBRARY, dst / "modelpress", ignore=_not_library))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def settings_key(recipe: Recipe) -> str:
    """Every stage's settings, input files and code, in one key (the evaluation's, which holds the
    others'): a deployment sweep's rerun finds a point already registered by it."""
    return stages.stage_key(recipe, "evaluate")


def version_tags(recipe: Recipe, summary: dict) -> dict[str, str]:
    """Lineage and key figures of a model version (strings, as MLflow stores tags)."""
    p = stages.paths(recipe)
    teacher = stages.read_json(p["teacher_info"]) or {}
    m = recipe.method
    key_params = f"{m.key_params()} finetune_epochs={recipe.finetune.epochs}"
    tags = {
        "method": m.name, "key_params": key_params,
        "packed_bytes": summary["packed_bytes"], "compression_ratio": f"{summary['compression_ratio']:.3f}",
        "teacher_top1": f"{summary['teacher_top1']:.2f}", "compressed_top1": f"{summary['compressed_top1']:.2f}",
        "top1_drop": f"{summary['top1_drop']:.2f}",
        "metric": summary.get("metric", "top1"),  # what the *_top1 figures are (embedding_cosine for a text encoder)
        "test_images": summary.get("test_images", ""),  # how many test inputs they were measured on
        "teacher_arch": recipe.teacher.arch, "teacher_source": teacher.get("source", ""),
        "teacher_sha256": teacher.get("sha256", ""),
        "dataset": recipe.data.name,
        "dataset_sha256": ",".join(f"{k}:{v}" for k, v in sorted(recipe.data.files.items())),
        "packed_sha256": summary["packed_sha256"],
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
        "settings_key": settings_key(recipe),
    }
    versioning = summary.get("versioning") or {}
    tags["dvc"] = versioning.get("dvc", "skipped")
    for key in ("dvc_revision", "remote_url", "remote_endpoint"):
        if versioning.get(key):
            tags[key if key.startswith("dvc") else f"dvc_{key}"] = versioning[key]
    src = recipe.finetune.distill_from  # the model the final fine-tuning imitated, when not the teacher
    if src is not None:
        tags["distilled_from"] = f"{src.arch}:{src.weights}"
        tags["distilled_from_sha256"] = stages.file_content(src.weights) or ""
    return {T + k: str(v) for k, v in tags.items()}


def _log_cycle_metrics(recipe: Recipe, summary: dict) -> None:
    """Iterative methods: each step's figures (pruning: sparsity, top-1, packed bytes; LC: mu,
    ||w - Delta(theta)||, loss, top-1 and bytes of Delta(theta)) as metric steps, and a plot as an
    artifact (accuracy vs sparsity for pruning, accuracy by step otherwise)."""
    import tempfile

    import mlflow

    from modelpress.report import plot_cycles, plot_steps

    cycles = (stages.read_json(stages.paths(recipe)["cycles_log"]) or {}).get("cycles", [])
    if stages.method(recipe).steps is None or not cycles:
        return
    for step, c in enumerate(cycles, 1):  # every figure of every step (pruning: sparsity, top1, packed_bytes, ...)
        mlflow.log_metrics({f"cycle_{k}": float(v) for k, v in c.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "cycle"}, step=step)
    with tempfile.TemporaryDirectory() as tmp:
        if all("sparsity" in c for c in cycles):
            png = plot_cycles(cycles, Path(tmp) / "accuracy_vs_sparsity.png", summary.get("teacher_top1"), recipe.run.name)
        else:  # WFN iterations, LC steps
            label = stages.method(recipe).steps.label
            png = plot_steps(cycles, Path(tmp) / "accuracy_by_step.png", summary.get("teacher_top1"), recipe.run.name, label)
        mlflow.log_artifact(str(png))
    mlflow.log_dict({"cycles": cycles}, "cycles.json")


@task(name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def register_model(recipe: Recipe, packed_path: str, summary: dict, parent_run_id: str | None = None) -> dict:
    """Log the run and register a model version. The version is created last, so a failure
    leaves no registered version (the run is then marked FAILED). A packed file already
    registered under this name is not registered again. ``parent_run_id`` nests the run
    (a sweep's points under the sweep's run)."""
    import mlflow
    import numpy as np

    registry.configure_mlflow()
    name = recipe.registered_name()
    owner = registry.owner_tag(recipe.run.workdir)
    registry.end_stale_runs(recipe.registry.experiment, owner)  # a killed registration's run, still RUNNING
    existing = registry.find_duplicate(name, summary["packed_sha256"])
    if existing is not None:
        if flow_run.get_id():  # which flow run found it (a deployment sweep's point reads its figures back by this)
            registry.client().set_model_version_tag(name, existing.version, T + "last_prefect_flow_run_id", str(flow_run.get_id()))
        registry.client().set_model_version_tag(name, existing.version, T + "settings_key", settings_key(recipe))
        decision = existing.tags.get(T + "promotion") or registry.promote(name, existing.version, recipe.registry.max_top1_drop)
        return {"model_name": name, "version": existing.version, "run_id": existing.run_id,
                "model_uri": existing.source, "duplicate": True, "promotion": decision}
    registry.use_experiment(recipe.registry.experiment)
    tags = version_tags(recipe, summary)
    packed = read_packed(packed_path)
    inputs = packed.meta["input"]
    text = inputs.get("kind") == "tokens"
    input_shape = ["text"] if text else inputs["shape"]
    layers = (stages.read_json(stages.paths(recipe)["layers"]) or {}).get("layers", [])
    start_tags = {T + "owner": owner, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with mlflow.start_run(run_name=recipe.run.name, tags=start_tags) as run:
        try:
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(recipe.model_dump(mode="json")).items()})
            mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
            mlflow.log_metrics({f"seconds_{k}": float(v) for k, v in (summary.get("seconds") or {}).items()})
            mlflow.set_tags(tags)
            mlflow.log_dict({"layers": layers}, "layers.json")
            _log_cycle_metrics(recipe, summary)
            # What reproduces this version: its parameters and dvc.lock (`modelpress reproduce`).
            for f in sorted(lineage_dir(recipe).glob("*")):
                mlflow.log_artifact(str(f), artifact_path="lineage")
            artifacts = {"packed": packed_path}
            if text:  # the consumer tokenizes strings as the run did
                artifacts["tokenizer"] = str(stages.tokenizer_file(recipe))
            with tempfile.TemporaryDirectory() as tmp:
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_CODE), artifacts=artifacts,
                    code_paths=[str(_library_copy(Path(tmp)))],
                    input_example=["a short sentence", "another one"] if text else np.zeros([2, *input_shape], dtype=np.float32),
                    pip_requirements=runtime_requirements(packed.arch["name"], text),
                    model_config={"packed_sha256": summary["packed_sha256"]},  # checked when a consumer loads it
                )
            card_facts = {**summary, "input_shape": input_shape, "input": inputs}
            card = registry.model_card(name, tags, card_facts)
            version = registry.create_version(name, info.model_uri, run.info.run_id, tags, card, info.model_id)
            registry.describe_version(name, version.version, tags, card_facts)
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
    decision = registry.promote(name, version.version, recipe.registry.max_top1_drop)
    return {"run_id": run.info.run_id, "model_name": name, "version": version.version, "model_uri": info.model_uri,
            "duplicate": False, "promotion": decision}
