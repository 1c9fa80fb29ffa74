"""Version a run's outputs with DVC: record them in dvc.lock and push them to the DVC remote.

The flow computes the outputs with the same library functions the DVC stages call
(`modelpress stage NAME`), at the same paths (`dvc.yaml` uses `${run.workdir}`), so nothing is
recomputed here: `dvc commit` hashes what the flow wrote into the cache and `dvc.lock`, exactly
as if `dvc repro` had produced it, and `dvc push` uploads it.

The checkout's tracked files never change under a run: when the run's parameters differ from
params.yaml (a `-S` override, a recipe sent from the Prefect UI), params.yaml holds the run's
parameters only while `dvc commit` records them in dvc.lock and `dvc push` uploads what that
lock names, and is restored right after (a copy in ``.dvc/tmp`` restores it even after a kill;
meanwhile the pipeline's commands read the checkout's parameters from that copy,
:func:`checkout_params`). What reproduces the run, its dvc.lock and
its parameters, is copied to ``<workdir>/lineage/`` and logged with the registered version.

Runs only when the working directory is a DVC repository and `run.workdir` is a relative path
inside it (otherwise it logs why and skips). Settings (environment, never params):

- ``MODELPRESS_DVC=off`` skips versioning entirely.
- ``MODELPRESS_DVC_REMOTE``: a remote name from ``.dvc/config`` or a URL (``s3://bucket/prefix``,
  or an absolute path); a URL becomes the local remote ``modelpress`` (``.dvc/config.local``),
  with ``MODELPRESS_DVC_ENDPOINT_URL`` (else ``AWS_ENDPOINT_URL``) as its endpoint. Unset: the
  repository's default remote, if any; no remote (a fresh clone): the outputs stay in the local
  DVC cache and the push is skipped with one log line saying how to add one.
  Credentials are boto3's usual environment (``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import task
from prefect.logging import get_run_logger

from modelpress.recipe import Recipe

from .transient import retry_transient

URL_REMOTE = "modelpress"
STAGES = ("fetch", "teacher", "compress", "finetune", "pack", "evaluate")
# What a DVC failure says when trying again later may succeed: another DVC command holds the
# repository lock, or the remote's network or service failed.
TRANSIENT_DVC = re.compile(
    r"unable to acquire lock|lock.*is (held|in use)|could not connect|connection (refused|reset|aborted)|"
    r"timed? ?out|max retries|temporar(y|ily)|name resolution|name or service not known|service unavailable|"
    r"slow ?down|throttl|internal ?error|\b50[0234]\b", re.IGNORECASE)


class DvcError(RuntimeError):
    """A DVC command failed; ``transient`` says whether retrying may help (tasks/transient.py)."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def _run(args: tuple[str, ...], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc(), "--wait-for-lock", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def dvc(*args: str, cwd: Path = Path("."), timeout: float = 1800) -> str:
    """Run one DVC command. ``--wait-for-lock`` serialises it with any other DVC command on
    this repository (a concurrent `dvc repro`, another run's versioning) instead of failing."""
    return _checked(_run(args, cwd, timeout), args)


def _checked(proc: subprocess.CompletedProcess, args: tuple[str, ...]) -> str:
    """A DVC command's output, or DvcError with DVC's first error line."""
    if proc.returncode != 0:
        text = proc.stderr.strip() or proc.stdout.strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        detail = " ".join((errors or lines or [f"exit status {proc.returncode}"])[0].removeprefix("ERROR:").split())
        raise DvcError(f"dvc {' '.join(args)} failed: {detail}", transient=bool(TRANSIENT_DVC.search(text)))
    return proc.stdout


def skip_reason(recipe: Recipe, repo: Path) -> str | None:
    """Why this run's outputs cannot be versioned here (None: they can)."""
    if os.environ.get("MODELPRESS_DVC", "on").lower() in ("0", "off", "false", "no"):
        return "MODELPRESS_DVC is off"
    if not recipe.run.version_outputs:
        return "run.version_outputs is off (a sweep point)"
    if not (repo / "dvc.yaml").is_file() or not (repo / ".dvc").is_dir():
        return f"{repo.resolve()} is not a DVC repository with dvc.yaml"
    workdir = Path(recipe.run.workdir)
    if workdir.is_absolute() or ".." in workdir.parts:
        return f"run.workdir {recipe.run.workdir!r} is outside the repository (dvc.yaml tracks a relative workdir)"
    return None


def recipe_yaml(recipe: Recipe) -> str:
    """A run's parameters as a params.yaml file: every parameter dvc.yaml names, those left empty
    included (DVC refuses to record a stage whose parameter is missing)."""
    header = "# Parameters of one modelpress run (schema: modelpress/recipe.py, `modelpress schema`).\n"
    return header + yaml.safe_dump(recipe.model_dump(mode="json", context={"every_field": True}), sort_keys=False)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _params_files(repo: Path) -> tuple[Path, Path, Path]:
    """params.yaml, the copy of the checkout's own kept while a run's parameters are in it, and
    the lock runs on one checkout take turns on."""
    tmp = repo / ".dvc" / "tmp"
    return repo / "params.yaml", tmp / "modelpress-params.yaml.orig", tmp / "modelpress-params.lock"


def _put_back(path: Path, saved: Path) -> None:
    """The checkout's params.yaml from the copy a run killed in :func:`params_as` left (the
    caller holds the lock)."""
    if saved.is_file():
        _write(path, saved.read_bytes())
        saved.unlink()


def checkout_params(repo: Path = Path(".")) -> Path:
    """The file that holds the checkout's own parameters now: params.yaml, or while another
    run's versioning holds params.yaml (it records that run's parameters) the copy it keeps in
    ``.dvc/tmp``. A copy left by a killed run (no one holds the lock) is put back first."""
    path, saved, lock_path = _params_files(repo)
    if not saved.is_file():
        return path
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return saved  # a live run's versioning: it puts params.yaml back when it is done
        _put_back(path, saved)
    return path


@contextlib.contextmanager
def params_as(recipe: Recipe, repo: Path):
    """params.yaml holds the run's parameters inside the block (what `dvc commit` records) and
    its own content again afterwards; runs on one checkout take turns (a file lock). Yields the
    run's parameters file content."""
    path, saved, lock_path = _params_files(repo)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _put_back(path, saved)  # a run killed inside this block: the checkout's file first
        original = path.read_bytes() if path.is_file() else None
        try:
            same = original is not None and Recipe.from_yaml(path) == recipe
        except ValueError:
            same = False
        if same:
            yield original.decode()
            return
        text = recipe_yaml(recipe)
        if original is not None:
            _write(saved, original)
        _write(path, text.encode())
        try:
            yield text
        finally:
            if original is None:
                path.unlink(missing_ok=True)
            else:
                _write(path, original)
            saved.unlink(missing_ok=True)


def resolve_remote(repo: Path) -> str | None:
    """The DVC remote to push to (configuring a URL from the environment), or None when the
    repository has none (a fresh clone)."""
    wanted = os.environ.get("MODELPRESS_DVC_REMOTE", "").strip()
    if not wanted:
        proc = _run(("remote", "default"), repo, 120)
        # DVC exits 1 with "No default remote set" when there is none: that is an answer, not a failure.
        if proc.returncode != 0 and "no default remote" in (proc.stderr + proc.stdout).lower():
            return None
        return _checked(proc, ("remote", "default")).strip() or None
    if "://" not in wanted and not os.path.isabs(wanted):
        return wanted
    endpoint = os.environ.get("MODELPRESS_DVC_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return add_url_remote(repo, wanted, endpoint if "://" in wanted else None)


def add_url_remote(repo: Path, url: str, endpoint: str | None) -> str:
    """The local remote ``modelpress`` (``.dvc/config.local``) at ``url``; returns its name."""
    dvc("remote", "add", "--local", "--force", URL_REMOTE, url, cwd=repo)
    if endpoint:
        dvc("remote", "modify", "--local", URL_REMOTE, "endpointurl", endpoint, cwd=repo)
    return URL_REMOTE


def remote_urls(repo: Path) -> dict[str, str]:
    """Every remote of the repository: name -> URL."""
    listed = (line.split(None, 1) for line in dvc("remote", "list", cwd=repo).splitlines())
    return {parts[0]: parts[1].strip() for parts in listed if len(parts) == 2}


def remote_location(repo: Path, remote: str) -> dict[str, str]:
    """Where a remote is (URL and endpoint, never credentials): what another clone needs to pull."""
    found = {"url": remote_urls(repo).get(remote, "")}
    proc = _run(("config", f"remote.{remote}.endpointurl"), repo, 120)
    if proc.returncode == 0 and proc.stdout.strip():
        found["endpoint"] = proc.stdout.strip()
    return found


def lock_revision(lock: bytes) -> str:
    """The short hash of a dvc.lock that names a run's DVC state (tag ``modelpress.dvc_revision``)."""
    return hashlib.sha256(lock).hexdigest()[:16]


def lineage_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.workdir) / "lineage"


@task(name="version-outputs", timeout_seconds=3600, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_transient)
def version_outputs(recipe: Recipe, summary: dict) -> dict:
    """`dvc commit` the pipeline's stages (outputs into the cache, hashes into dvc.lock), then
    `dvc push` them to the remote. Writes what reproduces the run (its parameters and, when
    versioned, its dvc.lock) to ``<workdir>/lineage/``. Returns what was done, for the summary."""
    logger = get_run_logger()
    repo = Path(".")
    out = lineage_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dvc.lock").unlink(missing_ok=True)
    reason = skip_reason(recipe, repo)
    if reason:
        _write(out / "params.yaml", recipe_yaml(recipe).encode())
        logger.info("DVC versioning skipped: %s", reason)
        return {"dvc": "skipped", "reason": reason}
    # The push too runs while params.yaml and dvc.lock are the run's: dvc.yaml's output paths come
    # from params.yaml (${run.workdir}), and with the checkout's own they name no output of this
    # lock, which DVC then skips without an error.
    with params_as(recipe, repo) as params_text:
        dvc("commit", "--force", "--no-relink", *STAGES, cwd=repo)
        lock = (repo / "dvc.lock").read_bytes()
        _write(out / "params.yaml", params_text.encode())
        _write(out / "dvc.lock", lock)
        revision = lock_revision(lock)
        logger.info("DVC: outputs of %s recorded in dvc.lock (sha %s)", ", ".join(STAGES), revision)
        remote = resolve_remote(repo)
        if remote is None:
            logger.warning("DVC push skipped: no DVC remote is configured, the outputs are in the local DVC cache only "
                           "(add one with `dvc remote add -d NAME s3://bucket/prefix`, or set MODELPRESS_DVC_REMOTE)")
            return {"dvc": "committed", "dvc_revision": revision, "remote": None}
        pushed = dvc("push", "--remote", remote, *STAGES, cwd=repo)
    logger.info("DVC: pushed to remote %r: %s", remote, (pushed.strip().splitlines() or ["done"])[-1])
    return {"dvc": "pushed", "dvc_revision": revision, "remote": remote, **{
        f"remote_{k}": v for k, v in remote_location(repo, remote).items()}}
