"""The pipeline's steps as file-in/file-out functions.

Prefect tasks (tasks/) and DVC stages (``modelpress stage <name>``) both call these, so the
logic exists once. Each stage writes its outputs atomically under ``recipe.run.workdir`` and
records a key (a hash of everything it depends on); a stage whose outputs carry the current
key returns them without recomputing. That is how a crashed run resumes: finished stages are
skipped and the PQ layer loop continues from its per-layer checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_write
from .data import fetch_files, load_dataset, sha256_file
from .data.datasets import DATASET_INFO
from .methods import compress
from .methods.pq.layer import PQLayer
from .models import build_model, parameter_bytes
from .pack import arch_spec, load_packed, pack_model, read_packed
from .pack.format import build_from_packed
from .progress import log
from .recipe import Recipe
from .train import distill, evaluate, loader, recalibrate_batchnorm, resolve_device, train_classifier


class StageError(RuntimeError):
    """A stage cannot run with the given inputs; the message names the cause."""


# ---- small helpers --------------------------------------------------------------------------

def workdir(recipe: Recipe) -> Path:
    return Path(recipe.run.workdir)


def paths(recipe: Recipe) -> dict[str, Path]:
    """Every artifact's documented location (dvc.yaml lists the same paths)."""
    w = workdir(recipe)
    return {
        "data": w / "datasets" / recipe.data.name,
        "teacher": w / "teacher" / "teacher.mpk",
        "teacher_info": w / "teacher" / "teacher.json",
        "checkpoint": w / "compress" / "checkpoint.mpk",
        "compressed": w / "compress" / "compressed.mpk",
        "layers": w / "compress" / "layers.json",
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


def _device(recipe: Recipe) -> torch.device:
    device = resolve_device(recipe.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError("run.device is 'cuda' but no CUDA device is available")
    return device


def _datasets(recipe: Recipe) -> tuple[Dataset, Dataset]:
    return load_dataset(recipe.data.name, paths(recipe)["data"])


def _input_meta(recipe: Recipe) -> dict:
    info = DATASET_INFO[recipe.data.name]
    return {
        "dataset": recipe.data.name,
        "shape": list(info["input_shape"]),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "classes": list(info["classes"]),
    }


def calibration_images(dataset: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images chosen by a seeded permutation (in-domain, no labels used)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    batch = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=len(idx))
    return next(iter(batch))[0]


def _data_key(recipe: Recipe) -> dict:
    return {"name": recipe.data.name, "files": recipe.data.files}


# ---- stages -----------------------------------------------------------------------------------

def fetch(recipe: Recipe) -> Path:
    """Fetch the dataset files into the cache, verified by sha256."""
    out = paths(recipe)["data"]
    fetch_files(recipe.data.sources, recipe.data.files, out, log=log.info)
    return out


def teacher_key(recipe: Recipe) -> str:
    """Teacher settings, data, seed, and the weights file's content when it is a local file
    (replacing the file at the same path invalidates everything downstream)."""
    weights = recipe.teacher.weights
    content = sha256_file(weights) if weights and Path(weights).is_file() else None
    return recipe.section_hash("teacher", extra=[_data_key(recipe), recipe.run.seed, content])


def _load_weights(model: torch.nn.Module, path: Path, expected_sha: str | None) -> None:
    if not path.is_file():
        raise StageError(f"teacher weights {path}: no such file")
    if expected_sha and sha256_file(path) != expected_sha.lower():
        raise StageError(f"teacher weights {path}: sha256 does not match teacher.weights_sha256")
    if path.suffix == ".mpk":
        src = build_from_packed(read_packed(path))
        state = src.state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
            raise StageError(f"teacher weights {path}: cannot be loaded safely (weights_only=True): {str(e).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise StageError(f"teacher weights {path}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StageError(f"teacher weights {path} do not fit {type(model).__name__}: {str(e).splitlines()[1].strip()}") from None


def teacher(recipe: Recipe, weights_path: str | None = None) -> Path:
    """Load (or train) the teacher, evaluate it, store it as an fp32 packed file.

    ``weights_path`` is a local file already resolved from ``teacher.weights`` (callers
    resolve MLflow URIs; the library knows nothing of MLflow).
    """
    p, key = paths(recipe), teacher_key(recipe)
    info = read_json(p["teacher_info"])
    if info and info.get("key") == key and p["teacher"].is_file():
        log.info("teacher: up to date (%s, top-1 %.2f%%)", recipe.teacher.arch, info["top1"])
        return p["teacher"]
    device = _device(recipe)
    log.info("teacher: device %s", device)
    info_meta = DATASET_INFO[recipe.data.name]
    model = build_model(recipe.teacher.arch, **_arch_kwargs(recipe))
    train, test = _datasets(recipe)
    t0 = time.perf_counter()
    source = weights_path or recipe.teacher.weights
    if source:
        _load_weights(model, Path(source), recipe.teacher.weights_sha256)
        model.to(device)
    else:
        torch.manual_seed(recipe.run.seed)
        model.to(device)
        log.info("teacher: training %s for %g epochs", recipe.teacher.arch, recipe.teacher.epochs)
        train_classifier(
            model, loader(train, recipe.teacher.batch_size, True, recipe.run.seed), recipe.teacher.epochs,
            recipe.teacher.lr, optimizer="sgd", weight_decay=recipe.teacher.weight_decay, warmup_frac=0.05,
            stage="teacher", device=device,
        )
    top1 = evaluate(model, loader(test, recipe.data.batch_size, False), device)
    log.info("teacher: %s top-1 %.2f%% on %d test images", recipe.teacher.arch, top1, len(test))
    pack_model(model, p["teacher"], _arch(recipe), {"input": _input_meta(recipe)}, float_dtype="f32")
    write_json(p["teacher_info"], {
        "key": key, "arch": recipe.teacher.arch, "top1": top1, "params": sum(q.numel() for q in model.parameters()),
        "fp32_bytes": parameter_bytes(model), "source": source or "trained", "trained": not source,
        "seconds": time.perf_counter() - t0, "num_classes": info_meta["num_classes"],
        "sha256": sha256_file(p["teacher"]),
    })
    return p["teacher"]


def _arch_kwargs(recipe: Recipe) -> dict:
    info = DATASET_INFO[recipe.data.name]
    kwargs = {"num_classes": info["num_classes"]}
    if not recipe.teacher.arch.startswith("torchvision:"):
        kwargs["in_channels"] = info["input_shape"][0]
    return kwargs


def _arch(recipe: Recipe) -> dict:
    return arch_spec(recipe.teacher.arch, **_arch_kwargs(recipe))


def _load_teacher(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    model, _ = load_packed(paths(recipe)["teacher"])
    return model.to(device).eval()


def compress_key(recipe: Recipe) -> str:
    return recipe.section_hash("method", extra=teacher_key(recipe))


def compress_stage(recipe: Recipe) -> Path:
    """Layer-by-layer compression, checkpointed after every layer (a retry continues)."""
    p, key = paths(recipe), compress_key(recipe)
    layers = read_json(p["layers"])
    if layers and layers.get("key") == key and p["compressed"].is_file():
        log.info("compress: up to date (%d layers)", len(layers["layers"]))
        return p["compressed"]
    device = _device(recipe)
    teacher_model = _load_teacher(recipe, device)
    train, _ = _datasets(recipe)
    stats: list[dict] = []
    ckpt = read_packed(p["checkpoint"]) if p["checkpoint"].is_file() else None
    if ckpt is not None and ckpt.meta.get("key") == key:
        student = build_from_packed(ckpt, materialize=False).to(device)
        stats = ckpt.meta["layers"]
        log.info("compress: resuming after %d finished layers (%s)", len(stats), ", ".join(s["layer"] for s in stats))
    else:
        student = copy.deepcopy(teacher_model)
    cfg = recipe.method
    calib = calibration_images(train, cfg.calibration_images, cfg.seed)
    meta = {"key": key, "input": _input_meta(recipe)}

    def checkpoint(name: str, model: torch.nn.Module, layer_stats: dict) -> None:
        stats.append(layer_stats)
        pack_model(model, p["checkpoint"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")

    compress(student, cfg, calibration=calib, train_batches=loader(train, recipe.finetune.batch_size, True, cfg.seed),
             teacher=teacher_model, on_layer=checkpoint)
    pack_model(student, p["compressed"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")
    write_json(p["layers"], {"key": key, "layers": stats})
    p["checkpoint"].unlink(missing_ok=True)
    return p["compressed"]


def finetune_key(recipe: Recipe) -> str:
    return recipe.section_hash("finetune", extra=compress_key(recipe))


def finetune_stage(recipe: Recipe) -> Path:
    """Distil all codebooks together from the teacher (no labels), then re-estimate BatchNorm."""
    p, key = paths(recipe), finetune_key(recipe)
    if p["finetuned"].is_file() and read_packed(p["finetuned"]).meta.get("key") == key:
        log.info("finetune: up to date")
        return p["finetuned"]
    device, cfg = _device(recipe), recipe.finetune
    teacher_model = _load_teacher(recipe, device)
    student = build_from_packed(read_packed(p["compressed"]), materialize=False).to(device)
    train, _ = _datasets(recipe)
    torch.manual_seed(recipe.run.seed)
    if cfg.epochs > 0:
        params = [m.codebook for m in student.modules() if isinstance(m, PQLayer)]
        if cfg.train_other:
            params += [q for n, q in student.named_parameters() if not n.endswith(".codebook") and _is_small(n, student)]
        distill(student, teacher_model, loader(train, cfg.batch_size, True, recipe.run.seed), params, cfg.epochs, cfg.lr,
                temperature=cfg.temperature, stage="finetune", device=device)
    if cfg.bn_batches > 0:
        recalibrate_batchnorm(student, loader(train, recipe.data.batch_size, True, recipe.run.seed + 1), cfg.bn_batches)
    _round_codebooks(student, recipe.pack.codebook_dtype)
    pack_model(student, p["finetuned"], _arch(recipe), {"key": key, "input": _input_meta(recipe)}, "f32", "f32")
    return p["finetuned"]


def _is_small(name: str, model: torch.nn.Module) -> bool:
    """Biases and BatchNorm parameters (not dense weights of layers left unquantized)."""
    mod = model.get_submodule(name.rpartition(".")[0])
    return name.endswith(".bias") or isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)


def _round_codebooks(model: torch.nn.Module, dtype: str) -> None:
    """Round codebooks to their storage precision so memory and file hold the same weights."""
    if dtype == "f16":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, PQLayer):
                    m.codebook.copy_(m.codebook.half().float())


def pack_stage(recipe: Recipe) -> Path:
    """Write the final compact file; its size on disk is the size we report."""
    p = paths(recipe)
    student = build_from_packed(read_packed(p["finetuned"]), materialize=False)
    teacher_info = read_json(p["teacher_info"]) or {}
    meta = {
        "input": _input_meta(recipe),
        "method": recipe.method.name,
        "teacher": {k: teacher_info.get(k) for k in ("arch", "top1", "fp32_bytes", "sha256", "source")},
        "recipe_key": finetune_key(recipe),
    }
    size = pack_model(student, p["packed"], _arch(recipe), meta, recipe.pack.float_dtype, recipe.pack.codebook_dtype)
    log.info("pack: %s, %d bytes", p["packed"], size)
    return p["packed"]


def evaluate_file(packed_path: Path, recipe: Recipe, limit: int | None = None) -> dict:
    """Top-1 of the model *as loaded from the packed file*, on the full test set."""
    device = _device(recipe)
    t0 = time.perf_counter()
    model, meta = load_packed(packed_path)
    load_s = time.perf_counter() - t0
    _, test = _datasets(recipe)
    if limit:
        test = torch.utils.data.Subset(test, range(min(limit, len(test))))
    top1 = evaluate(model.to(device), loader(test, recipe.data.batch_size, False), device)
    return {"top1": top1, "test_images": len(test), "load_s": load_s, "packed_bytes": os.path.getsize(packed_path),
            "sha256": sha256_file(packed_path)}


def summarize(recipe: Recipe, evaluation: dict) -> dict:
    """The run's summary (metrics.json): what a person or DVC compares between runs."""
    p = paths(recipe)
    t = read_json(p["teacher_info"]) or {}
    layers = (read_json(p["layers"]) or {}).get("layers", [])
    summary = {
        "teacher_top1": t.get("top1"),
        "compressed_top1": evaluation["top1"],
        "top1_drop": None if t.get("top1") is None else t["top1"] - evaluation["top1"],
        "packed_bytes": evaluation["packed_bytes"],
        "teacher_fp32_bytes": t.get("fp32_bytes"),
        "compression_ratio": (t.get("fp32_bytes") or 0) / evaluation["packed_bytes"],
        "test_images": evaluation["test_images"],
        "layers_quantized": len(layers),
        "packed_sha256": evaluation["sha256"],
        "device": str(_device(recipe)),
        "host": platform.node(),
    }
    write_json(p["metrics"], summary)
    return summary
