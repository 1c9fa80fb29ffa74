"""The pipeline's stages, declared once: what each reads (parameters, earlier stages, files,
library code) and what it writes. From these declarations come

- each stage's **key** (a hash of its parameters, the keys of the stages it reads and the
  content of the files it names): a stage whose record holds the current key is skipped, so a
  re-run resumes where the last one stopped;
- **dvc.yaml** (``modelpress dvc-yaml``; a test checks the committed file is this output), so the
  flow's keys and DVC's dependencies cannot drift apart.

The library code a stage runs is in its key as well as a DVC dependency: after an upgrade the
next run (the nightly, ``dvc repro``) redoes the stages whose code changed and what follows
them, so a fix reaches the model; a run killed and rerun on the same code resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import sha256_file
from ..progress import log
from ..recipe import DataConfig, Recipe, RunConfig
from .layout import paths, read_json, write_json


@dataclass(frozen=True)
class StageSpec:
    name: str
    params: tuple[str, ...]  # recipe fields it reads (a section stands for all its fields)
    deps: tuple[str, ...] = ()  # earlier stages whose outputs it reads
    files: tuple[str, ...] = ()  # recipe fields naming input files: their content is in the key
    folders: tuple[str, ...] = ()  # recipe fields that may name a model folder (hf:<folder>/): its files' content too
    code: tuple[str, ...] = ()  # library code it runs (its .py files: in the key, and DVC dependencies)
    outs: tuple[str, ...] = ()  # layout names (stages.layout.paths) of its outputs
    result: str = ""  # layout name of the output the stage returns
    resumable: bool = False  # skipped when its record holds the current key (else it always runs)
    identity: tuple[str, ...] | None = None  # the params that identify its outputs for later stages (default: params)
    persist: bool = False  # DVC keeps the outputs before re-running (checkpoints survive; a busy folder loses nothing)
    metrics: tuple[str, ...] = ()  # layout names of metrics files (DVC, not cached)
    note: str = ""


STAGES: tuple[StageSpec, ...] = (
    StageSpec("fetch", params=("data.name", "data.files"), code=("modelpress/data",),
              outs=("data",), result="data", identity=("data.name", "data.files"), persist=True,
              note="not data.sources: they only say where to get these same files (checked by sha256)"),
    StageSpec("teacher", params=("teacher", "run.seed", "data.batch_size", "data.test_images", "data.max_tokens"), deps=("fetch",),
              files=("teacher.weights",), folders=("teacher.arch",),
              code=("modelpress/models", "modelpress/train.py", "modelpress/inputs.py", "modelpress/data/datasets.py",
                    "modelpress/data/text.py", "modelpress/pack", "modelpress/stages/pipeline.py"),
              outs=("teacher_dir",), result="teacher", resumable=True, persist=True),
    StageSpec("compress", params=("method", "pack", "finetune.batch_size", "finetune.loss", "teacher.epochs", "teacher.lr",
                                  "teacher.weight_decay", "teacher.batch_size", "data.test_images"),
              deps=("teacher",), code=("modelpress/methods", "modelpress/pack", "modelpress/train.py", "modelpress/inputs.py",
                                       "modelpress/walk.py", "modelpress/flops.py", "modelpress/stages/pipeline.py"),
              outs=("compress_dir",), result="compressed", resumable=True, persist=True,
              note="pruning replays the teacher's schedule where its own is left empty; a byte budget sizes with pack; "
                   "layer tuning and retraining distil with finetune.loss"),
    StageSpec("finetune", params=("finetune", "pack.codebook_dtype", "run.seed", "data.batch_size"), deps=("compress",),
              files=("finetune.distill_from.weights",),
              code=("modelpress/methods", "modelpress/pack", "modelpress/train.py", "modelpress/inputs.py",
                    "modelpress/stages/pipeline.py"),
              outs=("finetune_dir",), result="finetuned", resumable=True, persist=True),
    StageSpec("pack", params=("pack",), deps=("finetune",), code=("modelpress/pack", "modelpress/stages/pipeline.py"),
              outs=("packed",), result="packed"),
    StageSpec("evaluate", params=("data.test_images",), deps=("pack",),
              code=("modelpress/pack", "modelpress/models", "modelpress/data/datasets.py", "modelpress/data/text.py",
                    "modelpress/stages/pipeline.py"), metrics=("metrics",),
              result="metrics"),
)
SPECS = {s.name: s for s in STAGES}


def _value(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def file_content(path: str | None) -> str | None:
    """sha256 of a local file (None for a URI or no file): keys include it, so replacing the
    file at the same path invalidates what was made from it. Hashed once per version of the
    file (a run computes keys many times: every step's key holds the teacher's)."""
    if not path:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _sha256_of(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def folder_content(arch: str | None) -> str | None:
    """sha256 over the files of the model folder an ``hf:<folder>/`` architecture names (None
    for any other architecture)."""
    from ..models.hf import is_folder_ref

    if not arch or not is_folder_ref(arch):
        return None
    folder = Path(arch[len("hf:"):])
    return hashlib.sha256(json.dumps([[f, file_content(str(folder / f))] for f in FOLDER_FILES]).encode()).hexdigest()


LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # the folder holding modelpress/ (a checkout or site-packages)


def code_content(names: tuple[str, ...]) -> str:
    """sha256 over the library code a stage runs: the .py files of its ``code`` entries, so a
    stage whose code changed is not taken for current. Read once per process: the code this
    process runs, even if the files change under it (a `git pull` during a run)."""
    return _code_content(LIBRARY_ROOT, tuple(names))


@functools.lru_cache(maxsize=256)
def _code_content(root: Path, names: tuple[str, ...]) -> str:
    entries = []
    for name in names:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            entries.append([f.relative_to(root).as_posix(), file_content(str(f))])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, _mtime_ns: int, _size: int) -> str:
    return sha256_file(path)


def _params(dump: dict, names: tuple[str, ...]) -> dict:
    """The values of a stage's params for its key. A single field left empty (None) is left out,
    so adding an optional field does not change the key of work done before it existed."""
    values = {p: _value(dump, p) for p in names}
    return {p: v for p, v in values.items() if not ("." in p and v is None)}


def stage_key(recipe: Recipe, name: str, _dump: dict | None = None, leave_out: tuple[str, ...] = (),
              code: tuple[str, ...] | None = None) -> str:
    """The hash of everything stage ``name`` depends on (its declaration says what), less the
    params in ``leave_out``, with ``code`` for the declared code (the teacher's training: what
    the stage reads only to evaluate left out, the training code alone)."""
    spec = SPECS[name]
    dump = recipe.model_dump(mode="json") if _dump is None else _dump
    blob = [
        name,
        _params(dump, tuple(p for p in spec.params if p not in leave_out)),
        {f: file_content(_value(dump, f)) for f in spec.files}
        | {f: c for f in spec.folders if (c := folder_content(_value(dump, f))) is not None},
        [identity_key(recipe, d, dump) for d in spec.deps],
        code_content(spec.code if code is None else code),
    ]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def identity_key(recipe: Recipe, name: str, _dump: dict | None = None) -> str:
    """What a later stage sees of stage ``name``: its key, or for a stage whose outputs are
    fixed by fewer parameters (fetch: the files' names and checksums) the hash of those."""
    spec = SPECS[name]
    if spec.identity is None:
        return stage_key(recipe, name, _dump)
    dump = recipe.model_dump(mode="json") if _dump is None else _dump
    blob = [name, _params(dump, spec.identity), [identity_key(recipe, d, dump) for d in spec.deps]]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def record_path(recipe: Recipe, name: str) -> Path:
    """A resumable stage's record (key, seconds), written after all its outputs."""
    return paths(recipe)[SPECS[name].outs[0]] / "stage.json"


def is_current(recipe: Recipe, name: str) -> bool:
    spec = SPECS[name]
    rec = read_json(record_path(recipe, name))
    return rec is not None and rec.get("key") == stage_key(recipe, name) and paths(recipe)[spec.result].exists()


def stage(name: str) -> Callable:
    """Run a stage function ``fn(recipe, key, *args)`` under its declaration: a resumable stage
    whose record holds the current key returns its result without running; otherwise its record
    is removed, it runs and, once its outputs are written (each atomically), its record is written."""
    spec = SPECS[name]

    def wrap(fn: Callable[..., Path]) -> Callable[..., Path]:
        @functools.wraps(fn)
        def run(recipe: Recipe, *args: Any, **kwargs: Any) -> Path:
            key = stage_key(recipe, name)
            result = paths(recipe)[spec.result]
            if spec.resumable:
                rec = read_json(record_path(recipe, name))
                if rec and rec.get("key") == key and result.exists():
                    log.info("%s: up to date", name)
                    return result
                # The outputs are about to be rewritten: a run killed half way must not leave them
                # under the record of the settings that made the earlier ones.
                record_path(recipe, name).unlink(missing_ok=True)
            t0 = time.perf_counter()
            out = fn(recipe, key, *args, **kwargs)
            if spec.resumable:
                write_json(record_path(recipe, name), {"key": key, "seconds": round(time.perf_counter() - t0, 3)})
            return out

        run.spec = spec  # type: ignore[attr-defined]
        return run

    return wrap


def _template() -> dict[str, str]:
    """Layout names as DVC path templates (``${run.workdir}``, ``${data.name}``)."""
    placeholder = Recipe.model_construct(run=RunConfig.model_construct(workdir="${run.workdir}"),
                                         data=DataConfig.model_construct(name="${data.name}"))  # type: ignore[arg-type]
    return {k: str(v) for k, v in paths(placeholder).items()}


def dvc_yaml() -> str:
    """dvc.yaml, generated from STAGES."""
    where = _template()
    lines = [
        "# Generated from modelpress/stages/declare.py by `modelpress dvc-yaml > dvc.yaml`; do not edit by hand.",
        "# The same pipeline as flows/compress.py, stage by stage: each stage calls the same library function as",
        "# the Prefect task (`modelpress stage NAME`) and lists what it reads, so a change reruns only what it",
        "# affects. Paths come from params.yaml. A weights file named in params (teacher.weights,",
        "# finetune.distill_from.weights) is part of the stage's own key, not a DVC dependency (it may be",
        "# empty): after replacing one at the same path, `dvc repro -f -s teacher`.",
        "stages:",
    ]
    for s in STAGES:
        lines += [f"  {s.name}:", f"    cmd: modelpress stage {s.name}"]
        if s.note:
            lines.append(f"    # {s.note}")
        deps = [where[o] for d in s.deps for o in SPECS[d].outs] + list(s.code)
        if deps:
            lines += ["    deps:"] + [f"      - {d}" for d in deps]
        if s.params:
            lines.append(f"    params: [{', '.join(s.params)}]")
        if s.outs:
            lines.append("    outs:")
            for o in s.outs:
                lines.append(f"      - {where[o]}:\n          persist: true" if s.persist else f"      - {where[o]}")
        if s.metrics:
            lines.append("    metrics:")
            lines += [f"      - {where[m]}:\n          cache: false" for m in s.metrics]
    return "\n".join(lines) + "\n"
