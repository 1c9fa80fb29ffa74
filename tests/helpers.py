"""Helpers and constants that test modules import (``from helpers import ...``); the fixtures
stay in conftest.py, which pytest loads on its own and no module imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
# The shared evaluation data beside the checkout (../shared/data, as bench/params use it);
# never copied into the repository.
SHARED_DATA = REPO.parent / "shared" / "data"


def layers_done(ckpt: Path) -> int:
    """How many layers a compression checkpoint holds (0 before the first one is written): what
    the tests that stop a run in the PQ layer loop wait for."""
    from modelpress.pack import read_packed

    try:
        return len(read_packed(ckpt).meta["layers"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


class SlowFiles:
    """An HTTP server on loopback serving a folder slowly (64 KiB every 50 ms): a download that
    lasts long enough to be killed."""

    def __init__(self, root: Path):
        import functools
        import http.server
        import threading
        import time

        class Handler(http.server.SimpleHTTPRequestHandler):
            def copyfile(self, source, outputfile):
                while chunk := source.read(65536):
                    outputfile.write(chunk)
                    time.sleep(0.05)

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data. Missing: the test is skipped on a developer's machine, but
    fails under CI (CI=true), where the data is expected, so a clean clone never quietly tests less."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{path} is missing: CI expects ../shared/data beside the checkout")
        pytest.skip(f"{path} not present (../shared/data beside the checkout)")
    return path


# Fast settings for the pipeline on real data: small enough for a 2-core CI machine. Every top-1
# is measured on the first 2,000 test images (data.test_images), a fifth of the evaluation time.
TEST_IMAGES = 2000
TINY = {
    "run": {"name": "test"},
    "data": {"sources": [str(FMNIST)], "test_images": TEST_IMAGES},
    "teacher": {"epochs": 0.15},
    "method": {"calibration_images": 256, "kmeans_iters": 5, "layer_finetune_epochs": 0.01, "linear": {"block_size": 8, "k": 64}},
    "finetune": {"epochs": 0.02, "bn_batches": 5},
}
# PQ settings slow enough per layer (a little distillation each) for a test to stop a run in the
# middle of the layer loop.
SLOW = {"layer_finetune_epochs": 0.04}


# A registry consumer's script starts with this: in the fresh interpreter it runs in, importing
# Prefect, DVC or the flows fails, so passing proves the consumer path needs none of them.
CONSUMER_PREAMBLE = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("prefect", "dvc", "flows"):
            raise ImportError(f"consumer must not need {name}")
sys.meta_path.insert(0, Block())
"""


def tiny_recipe(workdir: Path, **sections):
    from modelpress.recipe import Recipe

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["run"]["workdir"] = str(workdir)
    for section, values in sections.items():
        if section == "method" and values.get("name", "pq") != "pq":
            raw["method"] = {}  # another method: the PQ settings above do not apply
        raw.setdefault(section, {}).update(values)
    return Recipe.parse(raw)


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``modelpress`` command in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "modelpress", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
