"""The pipeline's steps as file-in/file-out functions.

Prefect tasks (tasks/) and DVC stages (``modelpress stage <name>``) both call these, so the
logic exists once. Each stage writes its outputs atomically under ``recipe.run.workdir`` and
records a key (a hash of everything it depends on); a stage whose outputs carry the current
key returns them without recomputing. That is how a crashed run resumes: finished stages are
skipped and the PQ layer loop continues from its per-layer checkpoint.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
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
from .methods.pq.budget import check_reachable, measure, measure_key, plan_budget, table_from_json, table_to_json
from .methods.pq.layer import PQLayer
from .methods.pq.quantize import plan as pq_plan
from .methods.prune import (
    keep_masks,
    masks_of,
    next_sparsity,
    prunable,
    prune_cycle,
    quantize_survivors,
    schedule,
    tune_codebooks,
)
from .methods.prune.imp import check_budget, require_schedule
from .methods.uniform import UniformLayer
from .models import build_model, parameter_bytes
from .pack import arch_spec, load_packed, pack_model, read_packed
from .pack.format import build_from_packed, packed_nbytes, round_codebook
from .progress import log
from .recipe import Recipe
from .train import (
    distill,
    evaluate,
    loader,
    recalibrate_batchnorm,
    resolve_device,
    train_classifier,
)


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
        "snapshots": w / "teacher" / "snapshots",
        "checkpoint": w / "compress" / "checkpoint.mpk",
        "cycles": w / "compress" / "cycles",
        "cycles_log": w / "compress" / "cycles.json",
        "compressed": w / "compress" / "compressed.mpk",
        "layers": w / "compress" / "layers.json",
        "allocation": w / "compress" / "allocation.json",
        "cache": w / "cache",  # results reusable across runs of one workdir (not a DVC output)
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


# ---- checks before any work ----------------------------------------------------------------

def preflight(recipe: Recipe) -> None:
    """Check what can be checked from the recipe and the architecture alone (layer names,
    block sizes, prunable layers, byte budgets), so a bad setting fails in seconds, before a
    teacher is trained or a dataset fetched. Raises ValueError naming the problem."""
    model = build_model(recipe.teacher.arch, **_arch_kwargs(recipe))
    src = recipe.finetune.distill_from
    if src is not None:
        build_model(src.arch, **_arch_kwargs(recipe, src.arch))  # a known architecture
        if not Path(src.weights).is_file():
            raise ValueError(f"finetune.distill_from.weights {src.weights}: no such file")
    if recipe.method.name in ("pq", "kmeans"):
        cfg = _pq_config(recipe)
        pq_plan(model, cfg, recipe.pack.codebook_dtype)
        check_reachable(model, cfg, recipe.pack.float_dtype, _arch(recipe), {"input": _input_meta(recipe)},
                        recipe.pack.codebook_dtype)
        return
    if recipe.method.name == "uniform":
        compress(model, recipe.method)  # checks the exclude patterns; instant on an untrained model
        return
    cfg = recipe.prune_settings()
    require_schedule(cfg)
    prunable(model, cfg.exclude)
    check_budget(model, cfg, _size_fn(recipe))
    if cfg.retrain == "weight_rewind":
        point = round(1 - cfg.rewind_fraction, 4)
        if recipe.teacher.weights:
            raise ValueError("retrain=weight_rewind needs the weights from the teacher's own training; with "
                             "teacher.weights set there are none (use lr_rewind, or let the pipeline train the teacher)")
        if not any(abs(f - point) < 1e-4 for f in recipe.teacher.snapshots):
            raise ValueError(f"retrain=weight_rewind with rewind_fraction={cfg.rewind_fraction:g} rewinds to "
                             f"{point:g} of the teacher's schedule: add {point:g} to teacher.snapshots")


# ---- stages -----------------------------------------------------------------------------------

def fetch(recipe: Recipe) -> Path:
    """Fetch the dataset files into the cache, verified by sha256."""
    out = paths(recipe)["data"]
    fetch_files(recipe.data.sources, recipe.data.files, out, log=log.info)
    return out


def weights_content(weights: str | None) -> str | None:
    """sha256 of a weights file when it is a local file (None for a URI or no file): keys
    include it, so replacing the file at the same path invalidates what was made from it."""
    return sha256_file(weights) if weights and Path(weights).is_file() else None


def teacher_key(recipe: Recipe) -> str:
    """Teacher settings, data, seed, and the weights file's content when it is a local file
    (replacing the file at the same path invalidates everything downstream)."""
    content = weights_content(recipe.teacher.weights)
    return recipe.section_hash("teacher", extra=[_data_key(recipe), recipe.run.seed, content])


def _load_weights(model: torch.nn.Module, path: Path, expected_sha: str | None, what: str = "teacher") -> None:
    if not path.is_file():
        raise StageError(f"{what} weights {path}: no such file")
    if expected_sha and sha256_file(path) != expected_sha.lower():
        raise StageError(f"{what} weights {path}: sha256 does not match {what}.weights_sha256")
    if path.suffix == ".mpk":
        src = build_from_packed(read_packed(path))
        state = src.state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
            raise StageError(f"{what} weights {path}: cannot be loaded safely (weights_only=True): {str(e).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise StageError(f"{what} weights {path}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StageError(f"{what} weights {path} do not fit {type(model).__name__}: {str(e).splitlines()[1].strip()}") from None


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
    torch.manual_seed(recipe.run.seed)  # before building: the initial weights come from it
    model = build_model(recipe.teacher.arch, **_arch_kwargs(recipe))
    train, test = _datasets(recipe)
    t0 = time.perf_counter()
    source = weights_path or recipe.teacher.weights
    if source:
        _load_weights(model, Path(source), recipe.teacher.weights_sha256)
        model.to(device)
    else:
        model.to(device)
        log.info("teacher: training %s for %g epochs", recipe.teacher.arch, recipe.teacher.epochs)
        keep = _snapshot_keeper(recipe, model)
        train_classifier(
            model, loader(train, recipe.teacher.batch_size, True, recipe.run.seed), recipe.teacher.epochs,
            recipe.teacher.lr, optimizer="sgd", weight_decay=recipe.teacher.weight_decay, warmup_frac=0.05,
            stage="teacher", device=device, on_step=keep,
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


def snapshot_path(recipe: Recipe, fraction: float) -> Path:
    return paths(recipe)["snapshots"] / f"at-{fraction:.4f}.mpk"


def _snapshot_keeper(recipe: Recipe, model: torch.nn.Module):
    """Keep the teacher's weights at the fractions of its schedule in teacher.snapshots
    (what weight rewinding rewinds to)."""
    fractions = recipe.teacher.snapshots
    meta = {"input": _input_meta(recipe)}
    if 0.0 in fractions:
        pack_model(model, snapshot_path(recipe, 0.0), _arch(recipe), {**meta, "fraction": 0.0}, "f32")

    def on_step(step: int, total: int) -> None:
        for f in fractions:
            if f > 0 and step == max(1, round(f * total)):
                pack_model(model, snapshot_path(recipe, f), _arch(recipe), {**meta, "fraction": f}, "f32")

    return on_step


def _arch_kwargs(recipe: Recipe, arch: str | None = None) -> dict:
    info = DATASET_INFO[recipe.data.name]
    kwargs = {"num_classes": info["num_classes"]}
    if not (arch or recipe.teacher.arch).startswith("torchvision:"):
        kwargs["in_channels"] = info["input_shape"][0]
    return kwargs


def _arch(recipe: Recipe) -> dict:
    return arch_spec(recipe.teacher.arch, **_arch_kwargs(recipe))


def _load_teacher(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    model, _ = load_packed(paths(recipe)["teacher"])
    return model.to(device).eval()


def _distill_source(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """What the final fine-tuning distils from: finetune.distill_from, else the teacher."""
    src = recipe.finetune.distill_from
    if src is None:
        return _load_teacher(recipe, device)
    model = build_model(src.arch, **_arch_kwargs(recipe, src.arch))
    _load_weights(model, Path(src.weights), src.weights_sha256, what="finetune.distill_from")
    log.info("finetune: distilling from %s (%s)", src.arch, src.weights)
    return model.to(device).eval()


def prune_key(recipe: Recipe) -> str:
    """What the pruning cycles depend on: resolved prune settings, data, teacher."""
    return recipe.section_hash(extra=[recipe.prune_settings().model_dump(mode="json"), teacher_key(recipe),
                                      recipe.pack.float_dtype])


def cycle_schedule(recipe: Recipe) -> list[float] | None:
    """The sparsity after each cycle when the goal is a sparsity (None for a byte budget,
    where each cycle's target follows from the model's packed size)."""
    cfg = recipe.prune_settings()
    return None if cfg.target_bytes else schedule(cfg.target_sparsity, cfg.rate, cfg.milestones)


def cycle_key(recipe: Recipe, index: int) -> str | None:
    """Identity of cycle ``index``: the settings that shape retraining plus the sparsities of
    cycles 0..index. A run to 95 % therefore reuses the cycles of a finished run to 90 % with
    the same schedule. None when the schedule has no such cycle."""
    cfg = recipe.prune_settings()
    base = cfg.model_dump(mode="json", exclude={"target_sparsity", "target_bytes", "milestones"})
    steps = cycle_schedule(recipe)
    if steps is None:
        path = ["bytes", cfg.target_bytes, recipe.pack.float_dtype, index]
    elif index < len(steps):
        path = steps[: index + 1]
    else:
        return None
    return recipe.section_hash(extra=[base, teacher_key(recipe), path])


def compress_key(recipe: Recipe) -> str:
    prune = prune_key(recipe) if recipe.prune_settings() else None
    # The codebook storage sets what a byte budget buys (and what the final rounding does);
    # the default, f16, adds nothing, so runs made before i8 existed keep their keys.
    storage = [] if recipe.pack.codebook_dtype == "f16" else [recipe.pack.codebook_dtype]
    return recipe.section_hash("method", extra=[teacher_key(recipe), prune, *storage])


def compress_stage(recipe: Recipe) -> Path:
    """Compress the teacher with the recipe's method (PQ layer by layer, or pruning cycles
    with optional quantization of the survivors). Checkpointed as it goes; a retry continues."""
    if recipe.method.name in ("pq", "kmeans", "uniform"):
        return _compress_pq(recipe)
    return _compress_pruned(recipe)


def _pq_config(recipe: Recipe):
    """The layer-wise method's settings; scalar k-means weight sharing is PQ with block 1."""
    return recipe.method.as_pq() if recipe.method.name == "kmeans" else recipe.method


def _compress_pq(recipe: Recipe) -> Path:
    """Layer-by-layer compression, checkpointed after every layer (a retry continues).
    Uniform quantization (no data, no per-layer loop) goes the same way in one step."""
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
    cfg = _pq_config(recipe)
    calib = calibration_images(train, getattr(cfg, "calibration_images", 16), getattr(cfg, "seed", recipe.run.seed))
    meta = {"key": key, "input": _input_meta(recipe)}
    if getattr(cfg, "target_bytes", None) is not None:
        cfg = _budget_plan(recipe, teacher_model, calib, key)

    def checkpoint(name: str, model: torch.nn.Module, layer_stats: dict) -> None:
        stats.append(layer_stats)
        pack_model(model, p["checkpoint"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")

    _, all_stats = compress(student, cfg, calibration=calib, teacher=teacher_model, on_layer=checkpoint,
                            codebook_dtype=recipe.pack.codebook_dtype,
                            train_batches=loader(train, recipe.finetune.batch_size, True, getattr(cfg, "seed", 0)))
    stats = stats or all_stats  # methods without per-layer callbacks report at the end
    pack_model(student, p["compressed"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")
    write_json(p["layers"], {"key": key, "layers": stats})
    p["checkpoint"].unlink(missing_ok=True)
    return p["compressed"]


def _final_meta(recipe: Recipe) -> dict:
    """Metadata of the final packed file (its size counts against a byte budget)."""
    teacher_info = read_json(paths(recipe)["teacher_info"]) or {}
    return {
        "input": _input_meta(recipe),
        "method": recipe.method.name,
        "teacher": {k: teacher_info.get(k) for k in ("arch", "top1", "fp32_bytes", "sha256", "source")},
        "recipe_key": finetune_key(recipe),
    }


def _budget_plan(recipe: Recipe, teacher_model: torch.nn.Module, calib: torch.Tensor, key: str):
    """Per-layer settings chosen for method.target_bytes, computed once and kept beside the
    checkpoint (a resumed run uses the same plan)."""
    path = paths(recipe)["allocation"]
    saved = read_json(path)
    if saved and saved.get("key") == key:
        return recipe.method.model_validate(saved["config"])
    cfg = recipe.method
    # The damage of every candidate does not depend on the budget: kept in the run's cache
    # folder (shared by the points of a sweep), so a sweep over budgets measures it once.
    dkey = hashlib.sha256(json.dumps([teacher_key(recipe), recipe.section_hash("data"), recipe.run.seed,
                                      measure_key(cfg)], sort_keys=True).encode()).hexdigest()[:16]
    dpath = paths(recipe)["cache"] / f"budget-damage-{dkey}.json"
    dpath.parent.mkdir(parents=True, exist_ok=True)
    with open(dpath.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # points started together: one measures, the others wait and read
        cached = read_json(dpath)
        if cached is None:
            table = measure(teacher_model, cfg, calib[: cfg.budget_images])
            write_json(dpath, table_to_json(table))
        else:
            log.info("budget: damage of every candidate measured before (%s)", dpath)
            table = table_from_json(cached)
    cfg, rows = plan_budget(teacher_model, cfg, calib, recipe.pack.float_dtype, _arch(recipe), _final_meta(recipe), table,
                            recipe.pack.codebook_dtype)
    write_json(path, {"key": key, "config": cfg.model_dump(mode="json"), "layers": rows})
    return cfg


def _size_fn(recipe: Recipe):
    arch = _arch(recipe)
    return lambda model: packed_nbytes(model, recipe.pack.float_dtype, recipe.pack.codebook_dtype, arch,
                                       {"input": _input_meta(recipe)})


def cycle_path(recipe: Recipe, index: int) -> Path:
    return paths(recipe)["cycles"] / f"cycle-{index + 1:02d}.mpk"


def _cycle_done(recipe: Recipe, index: int) -> dict | None:
    """The record of cycle ``index`` if its checkpoint is there and current."""
    path = cycle_path(recipe, index)
    if not path.is_file():
        return None
    meta = read_packed(path).meta
    key = cycle_key(recipe, index)
    if key is None or meta.get("key") != key:
        return None
    steps = cycle_schedule(recipe)  # a cycle reused from a run with another goal: is it our last?
    return meta["cycle"] if steps is None else {**meta["cycle"], "done": index == len(steps) - 1}


def _cycle_start(recipe: Recipe, index: int, device: torch.device) -> torch.nn.Module:
    """The model cycle ``index`` starts from: the previous cycle's checkpoint, or the teacher."""
    if index == 0:
        return _load_teacher(recipe, device)
    if _cycle_done(recipe, index - 1) is None:
        raise StageError(f"prune cycle {index + 1} needs cycle {index} first (no current checkpoint {cycle_path(recipe, index - 1)})")
    return build_from_packed(read_packed(cycle_path(recipe, index - 1))).to(device)


def prune_cycle_stage(recipe: Recipe, index: int) -> dict:
    """Pruning cycle ``index`` (0-based): start from cycle index-1's checkpoint, prune to the
    schedule's next sparsity, retrain, evaluate, checkpoint. A current checkpoint is returned
    as is, so a re-run skips finished cycles. The record's ``done`` says whether the goal is
    met (no further cycle)."""
    cfg = recipe.prune_settings()
    done = _cycle_done(recipe, index)
    if done is not None:
        log.info("prune: cycle %d up to date (sparsity %.2f%%)", index + 1, 100 * done["sparsity"])
        return done
    device = _device(recipe)
    model = _cycle_start(recipe, index, device)
    size_fn = _size_fn(recipe)
    steps = cycle_schedule(recipe)
    if steps is None:
        if index == 0:
            check_budget(model, cfg, size_fn)
        target = next_sparsity(model, cfg, size_fn)
    else:
        target = steps[index] if index < len(steps) else None
    if target is None:
        return {"cycle": index + 1, "done": True, "skipped": True}
    train, test = _datasets(recipe)
    teacher_model = _load_teacher(recipe, device) if cfg.loss == "distill" else None
    rewind = None
    if cfg.retrain == "weight_rewind":
        snap = snapshot_path(recipe, round(1 - cfg.rewind_fraction, 4))
        if not snap.is_file():
            raise StageError(f"weight rewinding: no teacher snapshot {snap} (add it to teacher.snapshots)")
        rewind = build_from_packed(read_packed(snap)).to(device).state_dict()
    stats = prune_cycle(model, cfg, index, target, loader(train, cfg.batch_size, True, cfg.seed), teacher_model, device,
                        rewind)
    stats["top1"] = evaluate(model, loader(test, recipe.data.batch_size, False), device)
    stats["packed_bytes"] = size_fn(model)
    stats["done"] = index == len(steps) - 1 if steps is not None else next_sparsity(model, cfg, size_fn) is None
    log.info("prune: cycle %d: sparsity %.2f%%, top-1 %.2f%%, %d bytes packed%s", index + 1, 100 * stats["sparsity"],
             stats["top1"], stats["packed_bytes"], " (goal reached)" if stats["done"] else "")
    pack_model(model, cycle_path(recipe, index), _arch(recipe),
               {"key": cycle_key(recipe, index), "cycle": stats, "input": _input_meta(recipe)}, "f32", "f32")
    _log_cycles(recipe)
    return stats


def _log_cycles(recipe: Recipe) -> list[dict]:
    """cycles.json: every finished cycle's record (what MLflow logs as steps)."""
    records, index = [], 0
    while (rec := _cycle_done(recipe, index)) is not None:
        records.append(rec)
        index += 1
    write_json(paths(recipe)["cycles_log"], {"key": prune_key(recipe), "cycles": records})
    return records


def _compress_pruned(recipe: Recipe) -> Path:
    """Run (or skip) every pruning cycle, then, for prune_pq, quantize the survivors."""
    p, key = paths(recipe), compress_key(recipe)
    layers = read_json(p["layers"])
    if layers and layers.get("key") == key and p["compressed"].is_file():
        log.info("compress: up to date")
        return p["compressed"]
    index, last = 0, None
    while True:
        rec = prune_cycle_stage(recipe, index)
        if rec.get("skipped"):
            break
        last = index
        if rec["done"]:
            break
        index += 1
    device = _device(recipe)
    model = _load_teacher(recipe, device) if last is None else build_from_packed(read_packed(cycle_path(recipe, last))).to(device)
    stats = []
    if recipe.method.name == "prune_pq":
        q = recipe.method.quantize
        stats = quantize_survivors(model, q, recipe.method.prune.exclude)
        train, _ = _datasets(recipe)
        tune_codebooks(model, _load_teacher(recipe, device), loader(train, recipe.finetune.batch_size, True, q.seed),
                       q.finetune_epochs, q.finetune_lr, q.seed, device)
    meta = {"key": key, "input": _input_meta(recipe)}
    pack_model(model, p["compressed"], _arch(recipe), meta, "f32", "f32")
    rows = _weight_rows(p["compressed"], stats)
    write_json(p["layers"], {"key": key, "layers": rows, "cycles": _log_cycles(recipe)})
    return p["compressed"]


def _weight_rows(path: Path, stats: list[dict]) -> list[dict]:
    """Per-layer table of a pruned model: weights, kept, sparsity (+ clustering stats)."""
    extra = {s["layer"]: s for s in stats}
    rows = []
    for r in read_packed(path).summary():
        if "sparsity" not in r:
            continue
        layer = r["tensor"].removesuffix(".weight")
        n = 1
        for dim in r["shape"].split("x"):
            n *= int(dim)
        rows.append({"layer": layer, "weights": n, "kept": round(n * (1 - r["sparsity"])), "sparsity": r["sparsity"],
                     **{k: v for k, v in extra.get(layer, {}).items() if k in ("block_size", "k", "weight_rel_error", "kmeans_s")}})
    return rows


def finetune_key(recipe: Recipe) -> str:
    src = recipe.finetune.distill_from  # its file's content, as for the teacher's
    extra = compress_key(recipe) if src is None else [compress_key(recipe), weights_content(src.weights)]
    return recipe.section_hash("finetune", extra=extra)


def finetune_stage(recipe: Recipe) -> Path:
    """Distil all codebooks together from the teacher (no labels), then re-estimate BatchNorm."""
    p, key = paths(recipe), finetune_key(recipe)
    if p["finetuned"].is_file() and read_packed(p["finetuned"]).meta.get("key") == key:
        log.info("finetune: up to date")
        return p["finetuned"]
    device, cfg = _device(recipe), recipe.finetune
    teacher_model = _distill_source(recipe, device)
    student = build_from_packed(read_packed(p["compressed"]), materialize=False).to(device)
    train, _ = _datasets(recipe)
    torch.manual_seed(recipe.run.seed)
    if cfg.epochs > 0:
        params = [m.codebook for m in student.modules() if isinstance(m, PQLayer)]
        if recipe.pack.codebook_dtype.startswith("i"):  # train against the integer codebooks the file will hold
            for m in student.modules():
                if isinstance(m, PQLayer):
                    m.storage = recipe.pack.codebook_dtype
        masks = {}
        if recipe.method.name == "prune":  # sparse dense weights: tuned with their masks held
            masks = masks_of(student, recipe.method.exclude)
            params += [student.get_submodule(n).weight for n in masks]
        if cfg.train_other:
            params += [q for n, q in student.named_parameters() if not n.endswith(".codebook") and _is_small(n, student)]
            params += [w for w in _dense_weights(student) if all(w is not q for q in params)]
        with keep_masks(student, masks):
            distill(student, teacher_model, loader(train, cfg.batch_size, True, recipe.run.seed), params, cfg.epochs,
                    cfg.lr, temperature=cfg.temperature, stage="finetune", device=device, augment=cfg.augment,
                    seed=recipe.run.seed)
    _round_codebooks(student, recipe.pack.codebook_dtype)  # before BatchNorm sees the weights it will run with
    if cfg.bn_batches > 0:
        recalibrate_batchnorm(student, loader(train, recipe.data.batch_size, True, recipe.run.seed + 1), cfg.bn_batches)
    pack_model(student, p["finetuned"], _arch(recipe), {"key": key, "input": _input_meta(recipe)}, "f32", "f32")
    return p["finetuned"]


def _is_small(name: str, model: torch.nn.Module) -> bool:
    """Biases and BatchNorm parameters (not dense weights of layers left unquantized)."""
    mod = model.get_submodule(name.rpartition(".")[0])
    return name.endswith(".bias") or isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)


def _dense_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights of the Conv2d/Linear layers the method left dense (stored as floats, e.g. a first
    conv or a classifier kept fp16): tuning them costs no bytes."""
    return [m.weight for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and isinstance(m.weight, torch.nn.Parameter)]


def _round_codebooks(model: torch.nn.Module, dtype: str) -> None:
    """Round codebooks to their storage precision so memory and file hold the same weights
    (uniform layers' scales and offsets: f16 unless f32)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PQLayer):
                m.codebook.copy_(round_codebook(m.codebook, dtype))
            elif isinstance(m, UniformLayer) and dtype != "f32":
                for t in (m.scale, m.offset):
                    t.copy_(t.half().float())


def pack_stage(recipe: Recipe) -> Path:
    """Write the final compact file; its size on disk is the size we report."""
    p = paths(recipe)
    student = build_from_packed(read_packed(p["finetuned"]), materialize=False)
    meta = _final_meta(recipe)
    budget = getattr(recipe.method, "target_bytes", None)
    if budget is not None:
        size = packed_nbytes(student, recipe.pack.float_dtype, recipe.pack.codebook_dtype, _arch(recipe), meta)
        if size > budget:
            raise StageError(f"packed file would be {size} bytes, over method.target_bytes={budget}")
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
        "method": recipe.method.name,
        "packed_sha256": evaluation["sha256"],
        "device": str(_device(recipe)),
        "host": platform.node(),
    }
    if layers and all("kept" in r for r in layers):
        summary["sparsity"] = 1 - sum(r["kept"] for r in layers) / sum(r["weights"] for r in layers)
    write_json(p["metrics"], summary)
    return summary
