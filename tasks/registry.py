"""The MLflow model registry side of modelpress, in plain MLflow (no Prefect, no DVC), so the
register task, the `modelpress models` commands and registry consumers share it.

Rules, documented in the README:
- **Name**: one registered model per (teacher, method): ``<teacher arch>-<method>``, unless
  ``registry.model_name`` is set.
- **Duplicates**: a version whose packed file has the same sha256 as an existing version of the
  same registered model is not created again; the existing version is returned.
- **Aliases**: ``candidate`` is the newest version. ``champion`` goes to the version that
  (1) loses at most ``max_top1_drop`` points of top-1 against its teacher (against the best
  teacher among the compared versions, when its own scored lower: ``loss``) and (2) has the
  smallest packed file among the versions meeting (1) (ties: higher top-1, then newer), among
  the versions of the same data set measured on the most test inputs (``comparable``). The
  decision is written to the new version's ``modelpress.promotion`` tag.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TAG = "modelpress."


def sqlite_db(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (relative or absolute), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def configure_mlflow() -> str:
    """Tracking URI from MLFLOW_TRACKING_URI, else a local sqlite store (registry included)."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    db = sqlite_db(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    return uri


def check_reachable(deadline_s: float = 30.0) -> None:
    """Fail in seconds, not after MLflow's long retry schedule, when an http(s) tracking server
    does not answer: tried every few seconds for ``deadline_s``, then a RuntimeError naming it.
    A sqlite store is a file: its folder must be creatable and writable (checked at once)."""
    import time
    import urllib.error
    import urllib.request

    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    db = sqlite_db(uri)
    if db is not None:  # a file: its folder must exist or be creatable, and be writable
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"MLFLOW_TRACKING_URI {uri}: cannot create the folder of its database "
                               f"({e.strerror or e})") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise RuntimeError(f"MLFLOW_TRACKING_URI {uri}: its database is not writable here")
        return
    if not uri.startswith(("http://", "https://")):
        return
    url, end, last = uri.rstrip("/") + "/health", time.monotonic() + deadline_s, ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - the configured tracking server
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # it answers (a server without /health, or behind auth): reachable
                return
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= end:
            raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({last}; tried for {deadline_s:.0f} s)")
        time.sleep(3)


def owner_tag(workdir: str) -> str:
    """Who a run belongs to: the work directory (host and absolute path) it registers from."""
    return f"{os.uname().nodename}:{Path(workdir).resolve()}"


def end_stale_runs(experiment: str, owner: str) -> list[str]:
    """Runs of ``owner`` (a work directory) still RUNNING in ``experiment`` were left by a killed
    registration: the caller holds the work directory's lock, so none is alive. They are marked
    KILLED (not left RUNNING for ever); returns their ids."""
    from mlflow import MlflowClient

    configure_mlflow()
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return []
    c = MlflowClient()
    stale = c.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG}owner` = '{owner}'")
    for r in stale:
        c.set_terminated(r.info.run_id, status="KILLED")
    return [r.info.run_id for r in stale]


def use_experiment(name: str) -> None:
    """Select (creating if needed) the experiment. With a sqlite store, artifacts live beside
    the database (``<db dir>/artifacts``) rather than in the current directory."""
    import mlflow

    db = sqlite_db(configure_mlflow())
    if mlflow.get_experiment_by_name(name) is None:
        location = (db.resolve().parent / "artifacts").as_uri() if db is not None else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def client():
    from mlflow import MlflowClient

    configure_mlflow()
    return MlflowClient()


def versions(name: str) -> list:
    """All versions of a registered model, newest first ([] if it does not exist)."""
    found = client().search_model_versions(f"name='{name}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def find_duplicate(name: str, packed_sha256: str):
    """The existing version holding exactly this packed file, if any."""
    return next((v for v in versions(name) if v.tags.get(TAG + "packed_sha256") == packed_sha256), None)


def _num(v, key: str, default: float = float("nan")) -> float:
    try:
        return float(v.tags[TAG + key])
    except (KeyError, ValueError):
        return default


def choose_champion(candidates: list, max_top1_drop: float):
    """Apply the promotion rule to model versions; returns the winner or None."""
    best = best_teacher_top1(candidates)
    eligible = [v for v in candidates if loss(v, best) <= max_top1_drop]
    if not eligible:
        return None
    return min(eligible, key=lambda v: (_num(v, "packed_bytes"), -_num(v, "compressed_top1"), -int(v.version)))


def _teacher_top1(v) -> float:
    own = _num(v, "teacher_top1")
    return own if own == own else _num(v, "compressed_top1") + _num(v, "top1_drop")


def best_teacher_top1(versions_: list) -> float:
    """The best teacher top-1 among ``versions_`` (NaN when none is known)."""
    known = [t for t in map(_teacher_top1, versions_) if t == t]
    return max(known, default=float("nan"))


def loss(v, best_teacher: float) -> float:
    """A version's top-1 points under the best teacher of those it is compared with: its own drop
    when it was compressed from that teacher; plus the gap to it when its teacher scored lower. A
    version close to a weaker teacher (a regressed retraining, another checkpoint) does not
    displace a better model by its small drop alone. NaN when its figures are not numbers."""
    gap = best_teacher - _teacher_top1(v)
    return round(_num(v, "top1_drop") + (gap if gap > 0 else 0.0), 2)  # the tags' two decimals: 1.00 is within 1.0


def comparable(all_versions: list, like) -> list:
    """The versions the promotion rule compares ``like`` with: those of its data set and figure
    (top-1, or a text encoder's cosine to its teacher), measured on the most test inputs any of them was. A quick check (``data.test_images``) never displaces a
    version measured on the whole test set, and a model of another data set registered under the
    same name is not weighed against this one. (Versions without the figures: compared.)"""
    dataset, metric = like.tags.get(TAG + "dataset", ""), like.tags.get(TAG + "metric", "top1")
    same = [v for v in all_versions
            if v.tags.get(TAG + "dataset", "") == dataset and v.tags.get(TAG + "metric", "top1") == metric]
    most = max((_num(v, "test_images", 0) for v in same), default=0)
    return [v for v in same if not _num(v, "test_images", 0) or _num(v, "test_images", 0) >= most]


def check_name(name: str, dataset: str) -> None:
    """Before any work: a registered name holds the models of one data set. Versions of another
    one under it would take its ``champion`` (inputs and classes of another kind for the
    consumers that serve it); ValueError naming both and the setting to change."""
    others = sorted({v.tags.get(TAG + "dataset") for v in versions(name)} - {None, "", dataset})
    if others:
        raise ValueError(f"registry: {name} holds versions of data set {', '.join(others)}, and this run's is {dataset}: "
                         f"set registry.model_name to register it under a name of its own")


def promote(name: str, new_version: str, max_top1_drop: float) -> str:
    """Put ``candidate`` on the newest version and ``champion`` on the version the rule picks
    among all versions comparable with ``new_version`` (it may be an older one: a version made
    champion under a looser ``max_top1_drop`` loses the alias to one that meets this run's). When
    none qualifies, ``champion`` stays where it is; an older version it moves to gets a
    ``modelpress.promotion`` tag saying so. Computed again when a version was added meanwhile
    (two runs registering at once under the same rule agree on the result). Returns the decision,
    also stored in the new version's ``modelpress.promotion`` tag."""
    c = client()
    for _ in range(3):
        every = versions(name)
        c.set_registered_model_alias(name, "candidate", every[0].version)
        _, decision = promotion(every, new_version, max_top1_drop)
        new = next(v for v in every if str(v.version) == str(new_version))
        best = choose_champion(comparable(every, new), max_top1_drop)
        current = (c.get_registered_model(name).aliases or {}).get("champion")
        if best is not None and str(current) != str(best.version):
            c.set_registered_model_alias(name, "champion", best.version)
            if str(best.version) != str(new_version):  # an older version: its tag says why it is champion now
                c.set_model_version_tag(name, best.version, TAG + "promotion", (
                    f"champion again at version {new_version}'s registration (max_top1_drop {max_top1_drop}): "
                    f"smallest eligible file ({int(_num(best, 'packed_bytes', 0)):,} bytes)"))
        if versions(name)[0].version == every[0].version:
            break
    c.set_model_version_tag(name, new_version, TAG + "promotion", decision)
    return decision


def promotion(all_versions: list, new_version: str, max_top1_drop: float) -> tuple[bool, str]:
    """(whether ``new_version`` becomes champion, the decision in words) under the promotion rule."""
    new = next(v for v in all_versions if str(v.version) == str(new_version))
    pool = comparable(all_versions, new)
    if new not in pool:
        most = max(_num(v, "test_images", 0) for v in pool)
        return False, (f"not promoted: measured on {int(_num(new, 'test_images', 0)):,} test inputs, where other versions "
                       f"were on {int(most):,} (data.test_images)")
    best = choose_champion(pool, max_top1_drop)
    teacher = best_teacher_top1(pool)
    drop, size = loss(new, teacher), int(_num(new, "packed_bytes", 0))
    weaker = f" (against the best teacher among the versions, {teacher:.2f}; its own {_teacher_top1(new):.2f})" \
        if _teacher_top1(new) < teacher else ""
    if best is not None and str(best.version) == str(new_version):
        return True, f"champion: top-1 drop {drop:.2f} <= {max_top1_drop}{weaker} and smallest eligible file ({size:,} bytes)"
    if not drop <= max_top1_drop:  # a drop that is not a number (NaN outputs) is not within the rule either
        return False, f"not promoted: top-1 drop {drop:.2f} > {max_top1_drop}{weaker}" if drop > max_top1_drop else \
            f"not promoted: top-1 drop {drop} is not a number"
    other = int(_num(best, "packed_bytes", 0))
    if other < size:
        return False, f"not promoted: version {best.version} is smaller ({other:,} vs {size:,} bytes)"
    return False, (f"not promoted: version {best.version} is as small ({other:,} bytes) and scores higher "
                   f"({_num(best, 'compressed_top1'):.2f} vs {_num(new, 'compressed_top1'):.2f})")


def model_card(name: str, tags: dict, summary: dict, version: str | None = None) -> str:
    """The version's description: what it is, how it was made, how to load it, what it scores."""
    import mlflow

    ref = f"models:/{name}/{version}" if version else f"models:/{name}@candidate"
    return f"""# {name}{f' version {version}' if version else ''}

**What**: `{tags[TAG + 'teacher_arch']}` compressed by modelpress ({tags[TAG + 'method']}) into one packed
file of {summary['packed_bytes']:,} bytes, {summary['compression_ratio']:.1f}x smaller than the teacher's
{summary['teacher_fp32_bytes']:,} fp32 bytes.

{_quality(tags, summary)}

**How it was made**: teacher `{tags[TAG + 'teacher_source']}` (sha256 {tags[TAG + 'teacher_sha256'][:16]}...),
data set {tags[TAG + 'dataset']}, git commit {tags[TAG + 'git_commit'][:12]}, Prefect flow run
{tags[TAG + 'prefect_flow_run_id'] or '-'}. Full parameters are in the run's params; its `lineage/`
artifacts (params.yaml, dvc.lock) restore the packed file with `modelpress reproduce {ref}`.

**How to load**: the model carries the code that reads the packed file and pins what it needs
(no modelpress, Prefect or DVC install):

```bash
pip install mlflow=={mlflow.__version__}
pip install -r "$(python -c 'import mlflow; print(mlflow.pyfunc.get_model_dependencies("{ref}"))')"
mlflow models predict -m {ref} -i batch.json -t json --env-manager local   # or --env-manager uv: builds the env itself
```

{_usage(ref, summary)}

Serve `models:/{name}@champion`, the version the promotion rule picked (see each version's
`modelpress.promotion` tag); `models:/{name}@candidate` is the newest version, whatever its quality.

{_inputs(summary)}
"""


def _is_text(summary: dict) -> bool:
    return summary.get("input_shape") == ["text"]


def _is_encoder(summary: dict) -> bool:
    return summary.get("metric") == "embedding_cosine"


def _quality(tags: dict, summary: dict) -> str:
    where = (f"{tags[TAG + 'dataset']} test set, {summary['test_images']:,} {'texts' if _is_text(summary) else 'images'}, "
             "measured on the\npacked file loaded in a fresh process")
    if _is_encoder(summary):
        return (f"**Quality** (mean cosine of its sentence embeddings to the teacher's, {where}): "
                f"{summary['compressed_top1']:.2f} % (drop {summary['top1_drop']:.2f} points).")
    return (f"**Accuracy** (top-1, {where}): {summary['compressed_top1']:.2f} % (teacher {summary['teacher_top1']:.2f} %,\n"
            f"drop {summary['top1_drop']:.2f} points).")


def _usage(ref: str, summary: dict) -> str:
    if _is_text(summary):
        what = ("vectors = model.predict(texts)  # float32 (2, hidden): sentence embeddings" if _is_encoder(summary) else
                "labels = model.predict(texts)   # int64 (2,): the class of each text")
        return f"""```python
import mlflow
model = mlflow.pyfunc.load_model("{ref}")
texts = ["first sentence", "second sentence"]
{what}
net = model.unwrap_python_model().model  # the rebuilt torch.nn.Module (a transformers model)
```"""
    return f"""```python
import mlflow
model = mlflow.pyfunc.load_model("{ref}")
logits = model.predict(batch)          # float32 array shaped like the input example
net = model.unwrap_python_model().model  # the rebuilt torch.nn.Module
```"""


def _inputs(summary: dict) -> str:
    if _is_text(summary):
        return ("Inputs: strings (a list, or a one-column table). They are tokenized with the tokenizer carried in the\n"
                "model version (`tokenizer.json`), at most the packed file's `max_tokens` tokens each; the output is " +
                ("the\nmean of the encoder's last hidden states over the real tokens." if _is_encoder(summary) else
                 "the\nlabel of each text (the argmax of the classifier's logits)."))
    meta = summary.get("input") or {}
    shape = ", ".join(map(str, summary.get("input_shape", [])))
    if "mean" not in meta:
        return f"Inputs: float32, shape (N, {shape}), normalised with the data set's mean/std (the packed file's metadata)."
    classes = meta.get("classes") or []
    return (f"Inputs: float32, shape (N, {shape}): pixels scaled to [0, 1], then per channel (x - mean) / std with\n"
            f"mean {list(meta['mean'])} and std {list(meta['std'])} (also in the packed file's metadata, `modelpress inspect`).\n"
            f"Outputs: float32 (N, {len(classes) or '?'}) logits" + (f", classes in order: {', '.join(map(str, classes))}." if classes else "."))


def describe_version(name: str, version: str, tags: dict, summary: dict) -> None:
    """Put the version's own number into its card (known only once it exists)."""
    client().update_model_version(name, version, description=model_card(name, tags, summary, version))


def create_version(name: str, source: str, run_id: str, tags: dict, description: str, model_id: str | None = None):
    """Create the version with its tags and model card in one call (no half-described version)."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.create_registered_model(name, description=f"{name}: compressed by modelpress. See each version's card.")
    except MlflowException as e:
        if "already exists" not in str(e).lower():
            raise
    return c.create_model_version(name, source, run_id=run_id, tags=tags, description=description, model_id=model_id)


def load_module(model_uri: str):
    """The rebuilt ``torch.nn.Module`` of a registered packed model (mlflow.pytorch style)."""
    import mlflow

    configure_mlflow()
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def list_rows() -> list[dict]:
    """One row per version of every modelpress model in the registry."""
    c = client()
    rows = []
    for rm in c.search_registered_models():
        aliases = {}
        for alias, ver in (rm.aliases or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        for v in versions(rm.name):
            if TAG + "method" not in v.tags:
                continue
            rows.append({
                "name": rm.name, "version": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                "bytes": int(_num(v, "packed_bytes", 0)), "ratio": round(_num(v, "compression_ratio"), 1),
                "top1": round(_num(v, "compressed_top1"), 2), "teacher_top1": round(_num(v, "teacher_top1"), 2),
                "method": v.tags[TAG + "method"],
            })
    return rows


def resolve(ref: str):
    """NAME, NAME@ALIAS or NAME/VERSION -> the model version."""
    name = ref.split("@", 1)[0].rsplit("/", 1)[0] if ("@" in ref or "/" in ref) else ref
    if not name.strip():
        raise LookupError(f"{ref!r} names no model (NAME, NAME@ALIAS or NAME/VERSION)")
    c = client()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return c.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return c.get_model_version(name, version)
    found = versions(ref)
    if not found:
        raise LookupError(f"no registered model named {ref!r}")
    return found[0]
