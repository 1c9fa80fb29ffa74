"""The pipeline's stage functions: file in, file out, under their declarations (declare.py).

Prefect tasks (modelpress.tasks) and DVC stages (``modelpress stage NAME``) both call these, so
the logic exists once. Methods are reached only through their contract (methods/base.py):
nothing here names a method.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterator, Sized, cast

import torch
import torch.nn as nn
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_write
from ..data import fetch_files, load_split, sha256_file
from ..data import text as text_data
from ..data.datasets import DATASET_INFO
from ..methods import REGISTRY, Context, Method
from ..methods.base import Steps, until_done
from ..methods.pq.budget import allocated_nbytes
from ..methods.pq.layer import PQ_LAYERS
from ..methods.prune import keep_masks
from ..methods.uniform import UniformLayer
from ..models import build_model, parameter_bytes
from ..models.hf import folder_arch, folder_class, is_classifier, is_folder_ref
from ..pack import (
    Packed,
    arch_spec,
    build_from_packed,
    extra_tensors,
    load_packed,
    pack_model,
    packed_nbytes,
    read_packed,
    round_codebook,
)
from ..pack.codebook import is_int_codebook
from ..progress import error_line, log
from ..recipe import Recipe
from ..train import distill, evaluate, is_bias_or_norm, loader, recalibrate_batchnorm, resolve_device, train_classifier
from .declare import SPECS, code_content, file_content, stage, stage_key
from .layout import StageError, paths, read_json, write_json
from .records import Summary, TeacherInfo

# ---- what every stage needs -------------------------------------------------------------------


def method(recipe: Recipe) -> Method:
    return REGISTRY[recipe.method.name]


def _steps(recipe: Recipe) -> Steps:
    """The steps of the recipe's method (only iterative methods have steps)."""
    steps = method(recipe).steps
    if steps is None:
        raise StageError(f"method {recipe.method.name} has no steps")
    return steps


def method_config(recipe: Recipe) -> BaseModel:
    """The recipe's method settings, with what it leaves to the teacher's schedule filled in."""
    t = recipe.teacher
    schedule = {"epochs": t.epochs, "lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size}
    return method(recipe).defaults(recipe.method, schedule)


def _device(recipe: Recipe) -> torch.device:
    device = resolve_device(recipe.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError("run.device is 'cuda' but no CUDA device is available")
    return device


TEXT = "text-jsonl"
DEFAULT_MAX_TOKENS = 128


def is_text(recipe: Recipe) -> bool:
    """A text encoder on a JSON Lines data set (teacher.arch hf:<folder>)."""
    return recipe.data.name == TEXT


def _folder(recipe: Recipe) -> Path:
    """The local Hugging Face model folder of teacher.arch hf:<folder>."""
    return Path(recipe.teacher.arch[len("hf:"):])


def text_classes(recipe: Recipe) -> int:
    """A text run's number of classes: the folder's labels for a sequence classifier, 0 for an
    encoder (whose output is an embedding)."""
    name, labels = folder_class(_folder(recipe))
    return labels if is_classifier(name) else 0


def _is_encoder(recipe: Recipe) -> bool:
    return is_text(recipe) and text_classes(recipe) == 0


def tokenizer_file(recipe: Recipe) -> Path:
    """The text encoder's tokenizer.json as the teacher stage kept it (what a consumer tokenizes with)."""
    return paths(recipe)["teacher_dir"] / text_data.TOKENIZER_FILE


def _max_tokens(recipe: Recipe) -> int:
    return recipe.data.max_tokens or DEFAULT_MAX_TOKENS


def _datasets(recipe: Recipe) -> tuple[Dataset, Dataset]:
    """(train, test); test holds the first ``data.test_images`` images when that is set. Texts
    come tokenized with the teacher folder's tokenizer.json."""
    if is_text(recipe):
        train, test = text_data.load_text(paths(recipe)["data"], text_data.load_tokenizer(_folder(recipe)), _max_tokens(recipe))
        return train, _first(test, recipe.data.test_images)
    return _train_set(recipe), _test_set(recipe)


def _train_set(recipe: Recipe) -> Dataset:
    """The training split alone (images: the test file is not read)."""
    if is_text(recipe):
        return _datasets(recipe)[0]
    return load_split(recipe.data.name, paths(recipe)["data"], "train")


def _test_set(recipe: Recipe) -> Dataset:
    """The test split alone, cut to ``data.test_images`` (images: the training file is not read)."""
    if is_text(recipe):
        return _datasets(recipe)[1]
    return _first(load_split(recipe.data.name, paths(recipe)["data"], "test"), recipe.data.test_images)


def _first(dataset: Dataset, n: int | None) -> Dataset:
    size = len(cast(Sized, dataset))
    return dataset if not n or n >= size else torch.utils.data.Subset(dataset, range(n))


def _input_meta(recipe: Recipe) -> dict:
    if is_text(recipe):  # what a consumer needs to feed the model: its tokenizer's tokens; what it gives back
        out = {"embedding": "mean"} if _is_encoder(recipe) else {"classes": text_classes(recipe)}
        return {"dataset": recipe.data.name, "kind": "tokens", "max_tokens": _max_tokens(recipe), **out}
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
    idx = torch.randperm(len(cast(Sized, dataset)), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    batch = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=len(idx))
    return next(iter(batch))[0]


def _arch_kwargs(recipe: Recipe, arch: str | None = None) -> dict:
    if is_folder_ref(arch or recipe.teacher.arch):
        return {}
    info = DATASET_INFO[recipe.data.name]
    kwargs = {"num_classes": info["num_classes"]}
    if not (arch or recipe.teacher.arch).startswith("torchvision:"):
        kwargs["in_channels"] = info["input_shape"][0]
    if arch is None and recipe.teacher.arch_kwargs:  # the teacher's own builder arguments (image_size, width_mult...)
        kwargs.update(recipe.teacher.arch_kwargs)
    return kwargs


def _arch(recipe: Recipe) -> dict:
    if is_folder_ref(recipe.teacher.arch):  # the packed file names the class and carries config.json, not the folder
        return folder_arch(_folder(recipe))
    return arch_spec(recipe.teacher.arch, **_arch_kwargs(recipe))


def _distill_loss(recipe: Recipe) -> Any:
    """finetune.loss: a loss kind on logits, or for a text encoder a loss on its hidden states."""
    if _is_encoder(recipe):
        return text_data.hidden_state_loss(recipe.finetune.loss or "cosine")
    return recipe.finetune.loss or "kl"


def quality(recipe: Recipe, model: nn.Module, test: Dataset, device: torch.device) -> float:
    """The figure a run is judged by, in %: top-1 on the test set; for a text encoder, the mean
    cosine of its sentence embeddings to the teacher's on the held-out texts."""
    batches = loader(test, recipe.data.batch_size, False)
    if not _is_encoder(recipe):
        return evaluate(model, batches, device)
    return text_data.embedding_cosine(text_data.embeddings(model, batches, device), _teacher_embeddings(recipe, test, device))


_TEACHER_EMBEDDINGS: dict[tuple, torch.Tensor] = {}


def _teacher_embeddings(recipe: Recipe, test: Dataset, device: torch.device) -> torch.Tensor:
    """The teacher's sentence embeddings of the held-out texts, computed once per process for
    each teacher file (path, size, mtime) and test set (an iterative method scores every step)."""
    teacher = paths(recipe)["teacher"]
    st = teacher.stat()
    key = (str(teacher.resolve()), st.st_size, st.st_mtime_ns, len(cast(Sized, test)), recipe.data.batch_size, str(device))
    if key not in _TEACHER_EMBEDDINGS:
        _TEACHER_EMBEDDINGS.clear()  # one teacher at a time
        batches = loader(test, recipe.data.batch_size, False)
        _TEACHER_EMBEDDINGS[key] = text_data.embeddings(_load_teacher(recipe, device), batches, device)
    return _TEACHER_EMBEDDINGS[key]


def _size_fn(recipe: Recipe):
    arch, meta = _arch(recipe), {"input": _input_meta(recipe)}
    return lambda model: packed_nbytes(model, recipe.pack.float_dtype, recipe.pack.codebook_dtype, arch, meta)


def _context(recipe: Recipe, **more: Any) -> Context:
    """What the method gets from the pipeline (the rest is added where it is loaded)."""
    return Context(float_dtype=recipe.pack.float_dtype, codebook_dtype=recipe.pack.codebook_dtype,
                   size_fn=_size_fn(recipe), arch=_arch(recipe), meta={"input": _input_meta(recipe)}, loss=_distill_loss(recipe),
                   snapshots=None if recipe.teacher.weights else list(recipe.teacher.snapshots), **more)


def read_teacher(recipe: Recipe) -> TeacherInfo | None:
    raw = read_json(paths(recipe)["teacher_info"])
    return TeacherInfo.model_validate(raw) if raw else None


# ---- checks before any work ----------------------------------------------------------------

def preflight(recipe: Recipe) -> None:
    """Check what can be checked from the recipe and the architecture alone (layer names,
    block sizes, prunable layers, byte budgets), so a bad setting fails in seconds, before a
    teacher is trained or a dataset fetched. Raises ValueError naming the problem."""
    if recipe.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is 'cuda' but this machine has no CUDA device (use auto or cpu)")
    if is_folder_ref(recipe.teacher.arch):  # a folder without its weights or tokenizer fails now
        try:
            text_data.load_tokenizer(_folder(recipe))
            model = build_model(recipe.teacher.arch)
        except OSError as e:
            raise ValueError(f"teacher.arch {recipe.teacher.arch}: {e}") from None
    else:
        model = build_model(recipe.teacher.arch, **_arch_kwargs(recipe))
    weights = recipe.teacher.weights
    # A file that is missing, torn, unsafe or of another architecture fails now, not after the fetch;
    # a URI needs an installed resolver.
    if weights and _resolver(weights) is None:
        load_weights(model, Path(weights), recipe.teacher.weights_sha256)
    _check_takes_inputs(model, recipe)
    if _is_encoder(recipe):
        if recipe.finetune.loss == "kl":
            raise ValueError(f"finetune.loss kl compares logits; the text encoder {recipe.teacher.arch} is distilled "
                             "with cosine or mse on its hidden states")
        cfg = method_config(recipe)
        for where, c in (("method", cfg), ("method.prune", getattr(cfg, "prune", None))):
            if getattr(c, "loss", None) == "labels":
                raise ValueError(f"{where}.loss labels: a text encoder has no labels to train on; use distill "
                                 "(its hidden states, as finetune.loss says)")
    src = recipe.finetune.distill_from
    if src is not None:  # loaded now, as the teacher is: a bad file fails before the compression, not after it
        other = build_model(src.arch, **_arch_kwargs(recipe, src.arch))
        if not Path(src.weights).is_file():
            raise ValueError(f"finetune.distill_from.weights {src.weights}: no such file")
        load_weights(other, Path(src.weights), src.weights_sha256, what="finetune.distill_from")
        _check_takes_inputs(other, recipe, f"finetune.distill_from.arch {src.arch}")
    method(recipe).check(model, method_config(recipe), _context(recipe))


def _check_takes_inputs(model: nn.Module, recipe: Recipe, what: str = "") -> None:
    """One forward pass of a zero input of the data set's shape: an architecture that cannot take
    it (a torchvision model made for 3 channels on grey images, a ViT of another image size) fails
    here, before any work."""
    if is_text(recipe):
        shape: tuple = ("tokens",)
        dummy: Any = {"input_ids": torch.zeros(1, 2, dtype=torch.int64), "attention_mask": torch.ones(1, 2, dtype=torch.int64)}
    else:
        shape = tuple(DATASET_INFO[recipe.data.name]["input_shape"])
        dummy = torch.zeros(1, *shape)
    try:
        with torch.no_grad():
            model.eval()(**dummy) if isinstance(dummy, dict) else model.eval()(dummy)
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        first = error_line(e)
        raise ValueError(f"{what or 'teacher.arch ' + recipe.teacher.arch} does not take {recipe.data.name}'s inputs "
                         f"({'x'.join(map(str, shape))}): {first}") from None


# ---- fetch, teacher ------------------------------------------------------------------------------

def _resolver(weights: str) -> Any:
    """The entry point that resolves a ``scheme:/...`` weights URI (``modelpress.weights_resolvers``),
    None for a path; ValueError when no installed package registers the scheme."""
    scheme, sep, _ = weights.partition(":/")
    if not sep or len(scheme) < 2:
        return None
    found = entry_points(group="modelpress.weights_resolvers", name=scheme)
    if not found:
        raise ValueError(f"teacher.weights {weights}: no resolver for '{scheme}:/' URIs is installed "
                         "(MLflow URIs need the pipeline: pip install 'modelpress[pipeline]')")
    return next(iter(found))


def resolve_weights(weights: str | None) -> str | None:
    """A ``scheme:/...`` weights URI (e.g. an MLflow ``models:/``) as a local file, by the
    resolver an installed package registers for the scheme; a path is returned as it is."""
    found = _resolver(weights) if weights else None
    return weights if found is None else found.load()(weights)


@stage("fetch")
def fetch(recipe: Recipe, _key: str) -> Path:
    """Fetch the dataset files into the cache, verified by sha256."""
    out = paths(recipe)["data"]
    fetch_files(recipe.data.sources, recipe.data.files, out, log=log.info)
    return out


def load_weights(model: nn.Module, path: Path, expected_sha: str | None, what: str = "teacher") -> None:
    """Load a checkpoint (``weights_only=True``: no code runs) or a packed file into ``model``."""
    if not path.is_file():
        raise StageError(f"{what} weights {path}: no such file")
    if expected_sha and sha256_file(path) != expected_sha.lower():
        raise StageError(f"{what} weights {path}: sha256 does not match {what}.weights_sha256")
    if path.suffix == ".mpk":
        state = build_from_packed(read_packed(path)).state_dict()
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
            first = error_line(e)
            raise StageError(f"{what} weights {path}: cannot be loaded safely (weights_only=True): {first}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise StageError(f"{what} weights {path}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise StageError(f"{what} weights {path} do not fit {type(model).__name__}: {lines[1] if len(lines) > 1 else lines[0]}") from None


def _train_state(recipe: Recipe, key: str, folder: str = "teacher_dir"):
    """Epoch-boundary checkpoints of a stage's training (the teacher's, the fine-tuning's:
    ``<folder>/train-state.pt``, our own file, read back with weights_only=True): a killed
    training resumes at its last epoch."""
    path = paths(recipe)[folder] / "train-state.pt"
    saved = None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file: start over
            saved = None
        if not isinstance(saved, dict) or saved.get("key") != key:
            saved = None

    def save(state: dict) -> None:
        buf = io.BytesIO()
        torch.save({"key": key, **state}, buf)
        atomic_write(path, [buf.getvalue()])

    return saved, save


# What the teacher stage reads only to evaluate: a new value re-evaluates a teacher trained here, not retrains it;
# and the code its training runs (an edit of how the stage evaluates or packs does not retrain it either).
EVALUATION_ONLY = ("data.batch_size", "data.test_images")
TRAINING_CODE = ("modelpress/models", "modelpress/train.py", "modelpress/inputs.py", "modelpress/data/datasets.py",
                 "modelpress/data/text.py")


def _trained_before(recipe: Recipe, train_key: str) -> bool:
    """teacher.json says the teacher was trained with these settings and teacher.mpk is still the
    file it describes (a later run, killed after rewriting it, may have left another's)."""
    info, path = read_json(paths(recipe)["teacher_info"]) or {}, paths(recipe)["teacher"]
    return info.get("train_key") == train_key and path.is_file() and sha256_file(path) == info.get("sha256")


@stage("teacher")
def teacher(recipe: Recipe, key: str, weights_path: str | None = None) -> Path:
    """Load (or train) the teacher, evaluate it, store it as an fp32 packed file.

    ``weights_path`` is a local file already resolved from ``teacher.weights`` (callers
    resolve MLflow URIs; the library knows nothing of MLflow).
    """
    p = paths(recipe)
    device = _device(recipe)
    log.info("teacher: device %s", device)
    torch.manual_seed(recipe.run.seed)  # before building: the initial weights come from it
    model = build_model(recipe.teacher.arch, **_arch_kwargs(recipe))
    train, test = _datasets(recipe)
    t0 = time.perf_counter()
    source = weights_path or recipe.teacher.weights
    if is_folder_ref(recipe.teacher.arch):  # build_model read the folder's weights
        source = str(_folder(recipe))
        model.to(device)
    elif source:
        load_weights(model, Path(source), recipe.teacher.weights_sha256)
        model.to(device)
    elif _trained_before(recipe, train_key := stage_key(recipe, "teacher", leave_out=EVALUATION_ONLY, code=TRAINING_CODE)):
        model = _load_teacher(recipe, device)
        log.info("teacher: trained before with these settings (%s): evaluated again", p["teacher"])
    else:
        model.to(device)
        log.info("teacher: training %s for %g epochs", recipe.teacher.arch, recipe.teacher.epochs)
        resume, save = _train_state(recipe, train_key)
        p["teacher_info"].unlink(missing_ok=True)  # it describes the teacher being replaced
        if resume is None:  # a training from the start: snapshots of another one must not be rewound to
            for old in p["snapshots"].glob("at-*.mpk"):
                old.unlink()
        train_classifier(
            model, loader(train, recipe.teacher.batch_size, True, recipe.run.seed), recipe.teacher.epochs,
            recipe.teacher.lr, optimizer="sgd", weight_decay=recipe.teacher.weight_decay, warmup_frac=0.05,
            stage="teacher", device=device, on_step=_snapshot_keeper(recipe, model), on_epoch=save, resume=resume,
        )
    if is_text(recipe) and not _is_encoder(recipe):  # a sequence classifier is scored on the data set's labels
        _check_text_labels(recipe, test)
    if is_text(recipe):  # kept with the run's outputs: the registry hands it to consumers
        atomic_write(tokenizer_file(recipe), [(_folder(recipe) / text_data.TOKENIZER_FILE).read_bytes()])
    pack_model(model, p["teacher"], _arch(recipe), {"input": _input_meta(recipe)}, float_dtype="f32")
    top1 = quality(recipe, model, test, device)  # a text encoder: its cosine to itself as packed (100 %)
    log.info("teacher: %s %s %.2f%% on %d test %s", recipe.teacher.arch, _metric(recipe), top1, len(cast(Sized, test)),
             "texts" if is_text(recipe) else "images")
    info = TeacherInfo(
        arch=recipe.teacher.arch, top1=top1, params=sum(q.numel() for q in model.parameters()),
        fp32_bytes=parameter_bytes(model), source=source or "trained", trained=not source,
        seconds=time.perf_counter() - t0, train_key=None if source else train_key,
        num_classes=text_classes(recipe) if is_text(recipe) else DATASET_INFO[recipe.data.name]["num_classes"],
        sha256=sha256_file(p["teacher"]),
    )
    write_json(p["teacher_info"], info.model_dump(mode="json"))
    (p["teacher_dir"] / "train-state.pt").unlink(missing_ok=True)  # once the results are written: a kill before resumes from it
    return p["teacher"]


def _check_text_labels(recipe: Recipe, test: Dataset) -> None:
    base = test.dataset if isinstance(test, torch.utils.data.Subset) else test
    classes = text_classes(recipe)
    if not getattr(base, "labelled", False):
        raise StageError(f"test.jsonl has no \"label\" on its lines: {recipe.teacher.arch} is a sequence classifier "
                         f"({classes} classes), scored by top-1 on the labels")
    top = int(cast(text_data.TokenDataset, base).labels.max())
    if top >= classes:
        raise StageError(f"test.jsonl: label {top} is outside the {classes} classes of {recipe.teacher.arch}")


def snapshot_path(recipe: Recipe, fraction: float) -> Path:
    return paths(recipe)["snapshots"] / f"at-{fraction:.4f}.mpk"


def _snapshot_keeper(recipe: Recipe, model: nn.Module):
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


def _load_teacher(recipe: Recipe, device: torch.device) -> nn.Module:
    model, _ = load_packed(paths(recipe)["teacher"])
    return model.to(device).eval()


def _distill_source(recipe: Recipe, device: torch.device) -> nn.Module:
    """What the final fine-tuning distils from: finetune.distill_from, else the teacher."""
    src = recipe.finetune.distill_from
    if src is None:
        return _load_teacher(recipe, device)
    model = build_model(src.arch, **_arch_kwargs(recipe, src.arch))
    load_weights(model, Path(src.weights), src.weights_sha256, what="finetune.distill_from")
    log.info("finetune: distilling from %s (%s)", src.arch, src.weights)
    return model.to(device).eval()


# ---- compress: steps of iterative methods ---------------------------------------------------------

def step_key(recipe: Recipe, index: int) -> str | None:
    """Identity of step ``index`` of an iterative method (the method says what it depends on,
    besides the teacher); None when its plan has no such step."""
    ident = _steps(recipe).identity(method_config(recipe), index, _context(recipe))
    if ident is None:
        return None
    loss = [recipe.finetune.loss] if recipe.finetune.loss else []  # retraining's loss; empty: the keys of earlier work stay
    return recipe.section_hash(extra=[ident, stage_key(recipe, "teacher"), code_content(SPECS["compress"].code), *loss])


def cycle_path(recipe: Recipe, index: int) -> Path:
    return paths(recipe)["cycles"] / f"cycle-{index + 1:02d}.mpk"


def _current_step(recipe: Recipe, index: int) -> Packed | None:
    """Step ``index``'s checkpoint (read once) if it is there and current."""
    path = cycle_path(recipe, index)
    if not path.is_file():
        return None
    packed = read_packed(path)
    key = step_key(recipe, index)
    return packed if key is not None and packed.meta.get("key") == key else None


def _step_done(recipe: Recipe, index: int) -> dict | None:
    """The record of step ``index`` if its checkpoint is there and current."""
    packed = _current_step(recipe, index)
    if packed is None:
        return None
    record, steps, cfg = packed.meta["cycle"], _steps(recipe), method_config(recipe)
    if steps.done is not None:  # a step reused from a run with another goal: is it our last?
        return {**record, "done": steps.done(cfg, index, record)}
    n = steps.count(cfg)
    return record if n is None else {**record, "done": index == n - 1}


def _step_model(recipe: Recipe, index: int, device: torch.device) -> tuple[nn.Module, dict]:
    """The model and record of step ``index``'s current checkpoint (what step index + 1 starts from)."""
    packed = _current_step(recipe, index)
    if packed is None:
        raise StageError(f"step {index + 2} needs step {index + 1} first (no current checkpoint {cycle_path(recipe, index)})")
    tensors = extra_tensors(packed)
    record = {**packed.meta["cycle"], "tensors": tensors} if tensors else packed.meta["cycle"]
    return build_from_packed(packed).to(device), record


def method_step(recipe: Recipe, index: int) -> dict:
    """Step ``index`` (0-based) of an iterative method (a pruning cycle): start from step
    index-1's checkpoint, run the step, evaluate, checkpoint. A current checkpoint is returned
    as is, so a re-run skips finished steps. The record's ``done`` says whether the goal is met."""
    done = _step_done(recipe, index)
    if done is not None:
        log.info("%s-%d: up to date", _steps(recipe).label, index + 1)
        return done
    m, steps, cfg = method(recipe), _steps(recipe), method_config(recipe)
    device = _device(recipe)
    model, previous = (_load_teacher(recipe, device), None) if index == 0 else _step_model(recipe, index - 1, device)
    train, test = _datasets(recipe)
    batch = steps.batch_size(cfg) if steps.batch_size else recipe.finetune.batch_size
    rewind = None
    point = m.rewind_point(cfg)
    if point is not None:
        snap = snapshot_path(recipe, point)
        if not snap.is_file():
            raise StageError(f"weight rewinding: no teacher snapshot {snap} (add it to teacher.snapshots)")
        rewind = build_from_packed(read_packed(snap)).to(device).state_dict()
    ctx = _context(recipe, train_batches=loader(train, batch, True, getattr(cfg, "seed", 0)),
                   teacher=_load_teacher(recipe, device), device=device, rewind_state=rewind, previous=previous)
    if index == 0:
        steps.prepare(model, cfg, ctx)
    record = steps.run(model, cfg, index, ctx)
    if record is None:
        return {"cycle": index + 1, "done": True, "skipped": True}
    shown = steps.view(model, cfg, record) if steps.view else model  # what the step's figures are of
    tensors = record.pop("tensors", None)
    record["top1"] = quality(recipe, shown, test, device)
    record["packed_bytes"] = _size_fn(recipe)(shown)
    log.info("compress: step %d: top-1 %.2f%%, %d bytes packed%s", index + 1, record["top1"], record["packed_bytes"],
             " (goal reached)" if record["done"] else "")
    pack_model(model, cycle_path(recipe, index), _arch(recipe),
               {"key": step_key(recipe, index), "cycle": record, "input": _input_meta(recipe)}, "f32", "f32", extra=tensors)
    _log_steps(recipe)
    return record


def _log_steps(recipe: Recipe) -> list[dict]:
    """cycles.json: every finished step's record (what MLflow logs as steps)."""
    records, index = [], 0
    while (rec := _step_done(recipe, index)) is not None:
        records.append({k: v for k, v in rec.items() if k != "state"})
        index += 1
    write_json(paths(recipe)["cycles_log"], {"key": stage_key(recipe, "compress"), "cycles": records})
    return records


def run_method_steps(recipe: Recipe) -> int | None:
    """Every step (or its checkpoint); the index of the last step that ran, None if none was needed."""
    records = until_done(lambda index: unless_skipped(method_step(recipe, index)))
    return len(records) - 1 if records else None


def unless_skipped(record: dict) -> dict | None:
    """A step that found the goal met before it (``skipped``) ends the loop as no step."""
    return None if record.get("skipped") else record


# ---- compress ----------------------------------------------------------------------------------

@stage("compress")
def compress_stage(recipe: Recipe, key: str) -> Path:
    """Compress the teacher with the recipe's method: layer by layer with a checkpoint after
    each layer, or step by step (each step checkpointed). A retry continues where it stopped."""
    p, m, cfg = paths(recipe), method(recipe), method_config(recipe)
    device = _device(recipe)
    teacher_model = _load_teacher(recipe, device)
    train = _train_set(recipe)
    meta = {"key": key, "input": _input_meta(recipe)}
    if m.steps is not None:
        last = run_method_steps(recipe)
        student, previous = (teacher_model, None) if last is None else _step_model(recipe, last, device)
        ctx = _context(recipe, teacher=_load_teacher(recipe, device), device=device,
                       train_batches=loader(train, recipe.finetune.batch_size, True, getattr(cfg, "seed", 0)),
                       previous=previous)
        finished = m.steps.finish(student, cfg, ctx)
        pack_model(student, p["compressed"], _arch(recipe), meta, "f32", "f32")
        write_json(p["layers"], {"key": key, "layers": _weight_rows(p["compressed"], finished), "cycles": _log_steps(recipe)})
        return p["compressed"]
    assert m.apply is not None  # a method has apply or steps
    stats: list[dict] = []
    ckpt = read_packed(p["checkpoint"]) if p["checkpoint"].is_file() else None
    if ckpt is not None and ckpt.meta.get("key") == key:
        student = build_from_packed(ckpt, materialize=False).to(device)
        stats = ckpt.meta["layers"]
        log.info("compress: resuming after %d finished layers (%s)", len(stats), ", ".join(s["layer"] for s in stats))
    else:
        student = copy.deepcopy(teacher_model)
    n, seed = m.calibration(cfg) or (16, recipe.run.seed)
    ctx = _context(recipe, calibration=calibration_images(train, n, seed), teacher=teacher_model, device=device,
                   train_batches=loader(train, recipe.finetune.batch_size, True, getattr(cfg, "seed", 0)))
    cfg = _planned(recipe, m, cfg, teacher_model, ctx, key)
    ctx.meta = {"input": _input_meta(recipe)}

    def checkpoint(_name: str, model: nn.Module, layer_stats: dict) -> None:
        stats.append(layer_stats)
        pack_model(model, p["checkpoint"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")

    ctx.on_layer = checkpoint
    all_stats = m.apply(student, cfg, ctx)
    stats = stats or all_stats  # methods without per-layer callbacks report at the end
    pack_model(student, p["compressed"], _arch(recipe), {**meta, "layers": stats}, "f32", "f32")
    write_json(p["layers"], {"key": key, "layers": stats})
    p["checkpoint"].unlink(missing_ok=True)
    return p["compressed"]


def _planned(recipe: Recipe, m: Method, cfg: BaseModel, teacher_model: nn.Module, ctx: Context, key: str) -> BaseModel:
    """The method's settings resolved before the work (a byte budget's allocation), computed
    once and kept beside the checkpoint (a resumed run uses the same plan)."""
    path = paths(recipe)["allocation"]
    saved = read_json(path)
    if saved and saved.get("key") == key:
        return type(cfg).model_validate(saved["config"])
    ctx.cache, ctx.meta = _cache(recipe), _final_meta(recipe)  # the final file's header counts against a budget
    planned, rows = m.plan(teacher_model, cfg, ctx)
    if planned is not cfg or rows:
        write_json(path, {"key": key, "config": planned.model_dump(mode="json"), "layers": rows})
    return planned


def _cache(recipe: Recipe):
    """``cache(name, key, compute)``: results a method reuses across the runs of one workdir
    (the points of a sweep), keyed by the teacher, data and seed besides the method's key;
    runs started together: one computes, the others wait and read."""
    def cached(name: str, method_key: Any, compute):
        k = hashlib.sha256(json.dumps([stage_key(recipe, "teacher"), recipe.section_hash("data"), recipe.run.seed,
                                       method_key], sort_keys=True).encode()).hexdigest()[:16]
        path = paths(recipe)["cache"] / f"{name}-{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            value = read_json(path)
            if value is None:
                value = compute()
                write_json(path, value)
            else:
                log.info("%s: computed before (%s)", name, path)
        return value

    return cached


def _weight_rows(path: Path, stats: list[dict]) -> list[dict]:
    """Per-layer table of a pruned model: weights, kept, sparsity (+ clustering stats)."""
    extra = {s["layer"]: s for s in stats}
    packed = read_packed(path)
    shapes = {name: p["shape"] for name, _enc, p, _buf in packed.entries}
    rows = []
    for r in packed.summary():
        if "sparsity" not in r:
            continue
        layer = r["tensor"].removesuffix(".weight")
        n = math.prod(shapes[r["tensor"]])
        rows.append({"layer": layer, "weights": n, "kept": round(n * (1 - r["sparsity"])), "sparsity": r["sparsity"],
                     **{k: v for k, v in extra.get(layer, {}).items() if k in ("block_size", "k", "weight_rel_error", "kmeans_s")}})
    return rows


# ---- fine-tune, pack, evaluate ---------------------------------------------------------------------

@stage("finetune")
def finetune_stage(recipe: Recipe, key: str) -> Path:
    """Distil what the method made trainable (codebooks, surviving weights) and, by default,
    biases, BatchNorm and dense layers from the teacher (no labels); re-estimate BatchNorm."""
    p, cfg, m = paths(recipe), recipe.finetune, method(recipe)
    device = _device(recipe)
    teacher_model = _distill_source(recipe, device)
    compressed = read_packed(p["compressed"])
    student = build_from_packed(compressed, materialize=False).to(device)
    own = _layer_codebooks(compressed.meta.get("layers") or [])
    train = _train_set(recipe)
    torch.manual_seed(recipe.run.seed)
    if cfg.epochs > 0:
        mcfg = method_config(recipe)
        params = m.trainable(student, mcfg)
        for name, layer in student.named_modules():  # train against the integer codebooks the file will hold
            storage = own.get(name, recipe.pack.codebook_dtype)
            if isinstance(layer, PQ_LAYERS) and is_int_codebook(storage):
                layer.storage = storage
        masks = m.held_zero(student, mcfg)
        if cfg.train_other:
            params += [q for n, q in student.named_parameters() if not n.endswith(".codebook") and is_bias_or_norm(student, n)]
            params += [w for w in _dense_weights(student) if all(w is not q for q in params)]
        resume, save = _train_state(recipe, key, "finetune_dir")
        with keep_masks(student, masks):
            distill(student, teacher_model, loader(train, cfg.batch_size, True, recipe.run.seed), params, cfg.epochs,
                    cfg.lr, temperature=cfg.temperature, stage="finetune", device=device, augment=cfg.augment,
                    seed=recipe.run.seed, loss=_distill_loss(recipe), dropout=not is_text(recipe),
                    on_epoch=save, resume=resume)
    _round_codebooks(student, recipe.pack.codebook_dtype, own)  # before BatchNorm sees the weights it will run with
    if cfg.bn_batches > 0:
        recalibrate_batchnorm(student, loader(train, recipe.data.batch_size, True, recipe.run.seed + 1), cfg.bn_batches)
    meta = {"key": key, "input": _input_meta(recipe), **({"codebooks": own} if own else {})}
    pack_model(student, p["finetuned"], _arch(recipe), meta, "f32", "f32")
    (p["finetune_dir"] / "train-state.pt").unlink(missing_ok=True)  # once the result is written: a kill before resumes from it
    return p["finetuned"]


def _layer_codebooks(stats: list[dict]) -> dict[str, str]:
    """{layer: codebook storage} for the layers whose stats name their own (a byte budget's
    per-layer choice); the others are stored as pack.codebook_dtype."""
    return {s["layer"]: s["codebook"] for s in stats if isinstance(s, dict) and s.get("codebook") and s.get("layer")}


def _dense_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of the Conv2d/Linear layers the method left dense (stored as floats, e.g. a first
    conv or a classifier kept fp16): tuning them costs no bytes."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(m.weight, nn.Parameter)]


def _round_codebooks(model: nn.Module, dtype: str, own: dict[str, str] | None = None) -> None:
    """Round codebooks to their storage precision (a layer's ``own``, else ``dtype``) so memory
    and file hold the same weights (uniform layers' scales and offsets: f16 unless f32)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, PQ_LAYERS):
                m.codebook.copy_(round_codebook(m.codebook, (own or {}).get(name, dtype)))
            elif isinstance(m, UniformLayer) and dtype != "f32":
                for t in (m.scale, m.offset):
                    t.copy_(t.half().float())


def _final_meta(recipe: Recipe) -> dict:
    """Metadata of the final packed file (its size counts against a byte budget)."""
    info = read_json(paths(recipe)["teacher_info"]) or {}
    return {
        "input": _input_meta(recipe),
        "method": recipe.method.name,
        "teacher": {k: info.get(k) for k in ("arch", "top1", "fp32_bytes", "sha256", "source")},
        "recipe_key": stage_key(recipe, "finetune"),
    }


@stage("pack")
def pack_stage(recipe: Recipe, _key: str) -> Path:
    """Write the final compact file; its size on disk is the size we report."""
    p = paths(recipe)
    finetuned = read_packed(p["finetuned"])
    student = build_from_packed(finetuned, materialize=False)
    own = finetuned.meta.get("codebooks") or None  # codebook storages a byte budget chose per layer
    meta = _final_meta(recipe)
    budget = getattr(recipe.method, "target_bytes", None)
    if budget is not None and getattr(recipe.method, "budget_scope", None) == "layers":
        size = allocated_nbytes(student, recipe.method.exclude, recipe.pack.float_dtype, recipe.pack.codebook_dtype, own)
        if size > budget:
            raise StageError(f"the allocated layers' weights would be {size} bytes, over method.target_bytes={budget}")
    elif budget is not None:
        size = packed_nbytes(student, recipe.pack.float_dtype, recipe.pack.codebook_dtype, _arch(recipe), meta,
                             layer_codebooks=own)
        if size > budget:
            raise StageError(f"packed file would be {size} bytes, over method.target_bytes={budget}")
    size = pack_model(student, p["packed"], _arch(recipe), meta, recipe.pack.float_dtype, recipe.pack.codebook_dtype,
                      layer_codebooks=own)
    log.info("pack: %s, %d bytes", p["packed"], size)
    return p["packed"]


def evaluate_file(packed_path: Path, recipe: Recipe, limit: int | None = None) -> dict:
    """Top-1 of the model *as loaded from the packed file*, on the test set (its first ``limit``
    images, or ``data.test_images``, when given)."""
    device = _device(recipe)
    t0 = time.perf_counter()
    model, _meta = load_packed(packed_path)
    load_s = time.perf_counter() - t0
    test = _first(_test_set(recipe), limit)
    top1 = quality(recipe, model.to(device), test, device)
    return {"top1": top1, "test_images": len(cast(Sized, test)), "load_s": load_s, "packed_bytes": os.path.getsize(packed_path),
            "sha256": sha256_file(packed_path)}


def die_with_parent() -> None:
    """For ``preexec_fn`` (Linux): the child is killed when the process that started it dies, so a
    killed run or sweep point leaves no orphan computing on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@contextlib.contextmanager
def stage_command(name: str, recipe: Recipe) -> Iterator[list[str]]:
    """``modelpress stage NAME --json`` for ``recipe`` in a new interpreter: the command line, its
    recipe in a temporary file read whole (not merged onto a params.yaml), removed after the block."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(recipe.model_dump_json())
    try:
        yield [sys.executable, "-m", "modelpress", "stage", name, "--params", f.name, "--whole", "--json"]
    finally:
        Path(f.name).unlink(missing_ok=True)


def evaluate_in_fresh_process(recipe: Recipe) -> dict:
    """The run's summary, its figures measured by a new interpreter that loads the packed file
    exactly as a consumer would (``modelpress stage evaluate``): nothing this process holds in
    memory can reach them."""
    import subprocess

    with stage_command("evaluate", recipe) as cmd:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              preexec_fn=die_with_parent if sys.platform == "linux" else None)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation process failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metric(recipe: Recipe) -> str:
    return "embedding_cosine" if _is_encoder(recipe) else "top1"


def summarize(recipe: Recipe, evaluation: dict) -> dict:
    """The run's summary (metrics.json): what a person or DVC compares between runs."""
    p = paths(recipe)
    t = read_teacher(recipe)
    layers = (read_json(p["layers"]) or {}).get("layers", [])
    summary = Summary(
        teacher_top1=t.top1 if t else None,
        compressed_top1=evaluation["top1"],
        top1_drop=None if t is None else t.top1 - evaluation["top1"],
        packed_bytes=evaluation["packed_bytes"],
        teacher_fp32_bytes=t.fp32_bytes if t else None,
        compression_ratio=(t.fp32_bytes if t else 0) / evaluation["packed_bytes"],
        test_images=evaluation["test_images"],
        layers_quantized=len(layers),
        method=recipe.method.name,
        metric=_metric(recipe),
        packed_sha256=evaluation["sha256"],
        device=str(_device(recipe)),
        host=platform.node(),
    )
    if layers and all("kept" in r for r in layers):
        summary.sparsity = 1 - sum(r["kept"] for r in layers) / sum(r["weights"] for r in layers)
    out = summary.model_dump(mode="json")
    if summary.sparsity is None:
        out.pop("sparsity")
    if summary.metric == "top1":  # the figures are top-1 unless said otherwise
        out.pop("metric")
    write_json(p["metrics"], out)
    return out


__all__ = [
    "calibration_images", "compress_stage", "cycle_path", "die_with_parent", "evaluate_file", "evaluate_in_fresh_process",
    "fetch", "file_content", "finetune_stage", "stage_command", "unless_skipped",
    "load_weights", "method", "method_config", "method_step", "pack_stage", "preflight", "read_teacher", "resolve_weights",
    "snapshot_path", "step_key", "summarize", "teacher", "tokenizer_file",
]
