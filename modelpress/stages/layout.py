"""Where every artifact of a run lives under ``run.workdir``, and atomic JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..recipe import Recipe


class StageError(RuntimeError):
    """A stage cannot run with the given inputs; the message names the cause."""


def workdir(recipe: Recipe) -> Path:
    return Path(recipe.run.workdir)


def paths(recipe: Recipe) -> dict[str, Path]:
    """Every artifact's documented location (dvc.yaml is generated from the same names)."""
    w = workdir(recipe)
    return {
        "data": w / "datasets" / recipe.data.name,
        "teacher_dir": w / "teacher",
        "teacher": w / "teacher" / "teacher.mpk",
        "teacher_info": w / "teacher" / "teacher.json",
        "snapshots": w / "teacher" / "snapshots",
        "compress_dir": w / "compress",
        "checkpoint": w / "compress" / "checkpoint.mpk",
        "cycles": w / "compress" / "cycles",
        "cycles_log": w / "compress" / "cycles.json",
        "compressed": w / "compress" / "compressed.mpk",
        "layers": w / "compress" / "layers.json",
        "allocation": w / "compress" / "allocation.json",
        "cache": w / "cache",  # results reusable across runs of one workdir (not a DVC output)
        "finetune_dir": w / "finetune",
        "finetuned": w / "finetune" / "finetuned.mpk",
        "packed": w / "model.mpk",
        "metrics": w / "metrics.json",
        "timings": w / "run_timings.json",
    }


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: readers never see half a file."""
    atomic_write(path, [json.dumps(obj, indent=2, sort_keys=True).encode()])


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
