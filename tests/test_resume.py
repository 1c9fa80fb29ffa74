
"""A compression process killed in the middle of the layer loop resumes at the next layer
and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from modelpress import stages
from modelpress.pack import read_packed
from modelpress.pack.format import build_from_packed

from helpers import REPO, SLOW, layers_done, run_cli, tiny_recipe

pytestmark = pytest.mark.pipeline


def _state(path):
    return build_from_packed(read_packed(path), materialize=False).state_dict()


def test_kill_during_layer_loop_then_resume(trained_workdir, slow_reference, tmp_path):
    ref, work = slow_reference, tmp_path / "killed"  # ref: the same compression, uninterrupted
    shutil.copytree(trained_workdir, work)

    params = tmp_path / "params.json"
    params.write_text(tiny_recipe(work, method=SLOW).model_dump_json())
    args = ["stage", "compress", "--params", str(params)]
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    ckpt = work / "compress" / "checkpoint.mpk"
    deadline = time.monotonic() + 300
    while layers_done(ckpt) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = layers_done(ckpt)
    n_layers = len(stages.read_json(ref / "compress" / "layers.json")["layers"])
    assert 1 <= done_at_kill < n_layers
    assert not (work / "compress" / "compressed.mpk").exists()

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {done_at_kill} finished layers" in resumed.stderr
    assert not ckpt.exists()

    a, b = _state(ref / "compress" / "compressed.mpk"), _state(work / "compress" / "compressed.mpk")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
