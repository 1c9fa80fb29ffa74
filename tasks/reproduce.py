"""Restore a registered version's packed file in a checkout from its lineage (MLflow + DVC).

    modelpress reproduce models:/NAME/VERSION      (or NAME/VERSION, NAME@ALIAS)

Every registered version carries what reproduces it: its run's ``lineage/params.yaml`` and
``lineage/dvc.lock`` (MLflow artifacts) and the DVC remote its outputs were pushed to (tags
``modelpress.dvc_remote_url`` and ``modelpress.dvc_remote_endpoint``). In a clone of the
repository this writes those two files into the checkout, points DVC at that remote (a local
remote ``modelpress`` in ``.dvc/config.local`` unless the repository already has one with that
URL) and runs ``dvc pull`` for the pack stage; the restored file must have the version's sha256.
Credentials for the remote come from the usual environment (``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from modelpress.data import sha256_file

from . import registry
from .versioning import add_url_remote, dvc, lock_revision, remote_urls

T = registry.TAG


class ReproduceError(RuntimeError):
    """The version cannot be restored; the message says why."""


def _version(given: str):
    ref = given.removeprefix("models:/")
    try:
        return registry.resolve(ref)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types
        raise ReproduceError(f"{given}: no such registered version ({str(e).splitlines()[0]})") from None


def _remote(repo: Path, url: str, endpoint: str | None) -> str:
    """A remote of the repository at ``url``, or the local one made for it."""
    same = [name for name, at in remote_urls(repo).items() if at == url]
    return same[0] if same else add_url_remote(repo, url, os.environ.get("MODELPRESS_DVC_ENDPOINT_URL") or endpoint)


def reproduce(ref: str, repo: Path = Path("."), log=print) -> Path:
    """Restore the packed file of version ``ref`` in the checkout ``repo``; returns its path."""
    import mlflow

    version = _version(ref)
    tags = version.tags
    where = f"{version.name} version {version.version}"
    if tags.get(T + "dvc") != "pushed" or not tags.get(T + "dvc_remote_url"):
        raise ReproduceError(f"{where}: its outputs were not pushed to a DVC remote (modelpress.dvc="
                             f"{tags.get(T + 'dvc', 'unknown')}), so no other machine can restore them")
    if not (repo / "dvc.yaml").is_file():
        raise ReproduceError(f"{repo.resolve()}: not a modelpress checkout (no dvc.yaml)")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    if head and head != tags.get(T + "git_commit"):
        log(f"note: this checkout is at {head[:12]}, the version was made at {tags.get(T + 'git_commit', '?')[:12]} "
            f"(dvc.yaml must declare the same outputs)")
    registry.configure_mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="lineage", dst_path=tmp))
        except Exception as e:  # noqa: BLE001
            raise ReproduceError(f"{where}: cannot download its lineage artifacts: {str(e).splitlines()[0]}") from None
        lock, params = local / "dvc.lock", local / "params.yaml"
        if not lock.is_file() or not params.is_file():
            raise ReproduceError(f"{where}: its run has no lineage/dvc.lock and lineage/params.yaml")
        if lock_revision(lock.read_bytes()) != tags.get(T + "dvc_revision"):
            raise ReproduceError(f"{where}: lineage/dvc.lock does not match the version's dvc_revision tag")
        shutil.copyfile(params, repo / "params.yaml")
        shutil.copyfile(lock, repo / "dvc.lock")
    log(f"params.yaml and dvc.lock of {where} written to {repo.resolve()}")
    remote = _remote(repo, tags[T + "dvc_remote_url"], tags.get(T + "dvc_remote_endpoint"))
    dvc("pull", "--remote", remote, "pack", cwd=repo)
    workdir = (yaml.safe_load((repo / "params.yaml").read_text()) or {}).get("run", {}).get("workdir", "data")
    packed = repo / workdir / "model.mpk"
    digest = sha256_file(packed) if packed.is_file() else "missing"
    if digest != tags.get(T + "packed_sha256"):
        raise ReproduceError(f"{packed}: sha256 {digest[:16]}... differs from {where}'s {tags.get(T + 'packed_sha256', '?')[:16]}...")
    log(f"restored {packed} ({packed.stat().st_size:,} bytes, sha256 {digest[:16]}... = {where})")
    return packed
