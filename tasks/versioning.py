"""Version a run's outputs with DVC: record them in dvc.lock and push them to the DVC remote.

The flow computes the outputs with the same library functions the DVC stages call
(`modelpress stage NAME`), at the same paths (`dvc.yaml` uses `${run.workdir}`), so nothing is
recomputed here: `dvc commit` hashes what the flow wrote into the cache and `dvc.lock`, exactly
as if `dvc repro` had produced it, and `dvc push` uploads it. Afterwards `dvc status` is clean
and `dvc repro` has nothing to do.

Runs only when the working directory is a DVC repository and `run.workdir` is a relative path
inside it (otherwise it logs why and skips). Settings (environment, never params):

- ``MODELPRESS_DVC=off`` skips versioning entirely.
- ``MODELPRESS_DVC_REMOTE``: a remote name from ``.dvc/config`` or a URL (``s3://bucket/prefix``);
  a URL becomes the local remote ``modelpress`` (``.dvc/config.local``), with
  ``MODELPRESS_DVC_ENDPOINT_URL`` (else ``AWS_ENDPOINT_URL``) as its endpoint. Unset: the
  repository's default remote, if any; no remote: the push is skipped with a log line.
  Credentials are boto3's usual environment (``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import task
from prefect.logging import get_run_logger

from modelpress.recipe import Recipe

from .common import retry_transient

URL_REMOTE = "modelpress"
STAGES = ("fetch", "teacher", "compress", "finetune", "pack", "evaluate")


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def dvc(*args: str, cwd: Path = Path("."), timeout: float = 1800) -> str:
    """Run one DVC command. ``--wait-for-lock`` serialises it with any other DVC command on
    this repository (a concurrent `dvc repro`, another run's versioning) instead of failing."""
    proc = subprocess.run([_dvc(), "--wait-for-lock", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise RuntimeError(f"dvc {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}")
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


def sync_params(recipe: Recipe, repo: Path) -> bool:
    """Make params.yaml hold this run's parameters (what dvc.lock records for each stage), as
    `dvc exp run -S` would. Returns whether the file changed."""
    path = repo / "params.yaml"
    try:
        if Recipe.from_yaml(path) == recipe:
            return False
    except ValueError:
        pass
    header = "# Parameters of the last compression run (written by the flow's versioning task).\n" \
             "# The schema is modelpress/recipe.py (`modelpress schema`).\n"
    path.write_text(header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return True


def resolve_remote(repo: Path) -> str | None:
    """The DVC remote to push to (configuring a URL from the environment), or None."""
    wanted = os.environ.get("MODELPRESS_DVC_REMOTE", "").strip()
    if not wanted:
        default = dvc("remote", "default", cwd=repo).strip() if (repo / ".dvc" / "config").is_file() else ""
        return default or None
    if "://" not in wanted:
        return wanted
    dvc("remote", "add", "--local", "--force", URL_REMOTE, wanted, cwd=repo)
    endpoint = os.environ.get("MODELPRESS_DVC_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        dvc("remote", "modify", "--local", URL_REMOTE, "endpointurl", endpoint, cwd=repo)
    return URL_REMOTE


def dvc_lock_revision(repo: Path) -> str:
    lock = repo / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "none"


@task(name="version-outputs", timeout_seconds=3600, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_transient)
def version_outputs(recipe: Recipe, summary: dict) -> dict:
    """`dvc commit` the pipeline's stages (outputs into the cache, hashes into dvc.lock), then
    `dvc push` them to the remote. Returns what was done, for the summary."""
    logger = get_run_logger()
    repo = Path(".")
    reason = skip_reason(recipe, repo)
    if reason:
        logger.info("DVC versioning skipped: %s", reason)
        return {"dvc": "skipped", "reason": reason}
    if sync_params(recipe, repo):
        logger.info("params.yaml updated to this run's parameters")
    dvc("commit", "--force", "--no-relink", *STAGES, cwd=repo)
    revision = dvc_lock_revision(repo)
    logger.info("DVC: outputs of %s recorded in dvc.lock (sha %s)", ", ".join(STAGES), revision)
    remote = resolve_remote(repo)
    if remote is None:
        logger.info("DVC push skipped: no remote (set MODELPRESS_DVC_REMOTE or `dvc remote add -d`)")
        return {"dvc": "committed", "dvc_revision": revision, "remote": None}
    out = dvc("push", "--remote", remote, *STAGES, cwd=repo)
    logger.info("DVC: pushed to remote %r: %s", remote, (out.strip().splitlines() or ["done"])[-1])
    return {"dvc": "pushed", "dvc_revision": revision, "remote": remote}
