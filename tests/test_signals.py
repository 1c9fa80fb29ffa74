"""SIGTERM (a supervisor, `timeout`, `docker stop`) and Ctrl-C stop `modelpress run` within
seconds, leave no process behind, and the same command then resumes to the result an
uninterrupted run gives."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from modelpress.pack import read_packed
from modelpress.pack.format import build_from_packed

from helpers import REPO, SLOW, layers_done, tiny_recipe

pytestmark = pytest.mark.pipeline


def _start(params: Path, server: bool = False) -> subprocess.Popen:
    """``modelpress run``; without ``server`` it has no PREFECT_API_URL, so it starts Prefect's
    temporary server, which the signal must stop too."""
    env = {k: v for k, v in os.environ.items() if server or k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-m", "modelpress", "run", "--params", str(params)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**env, "MODELPRESS_DVC": "off"})


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_run_within_seconds_and_rerun_resumes(sig, trained_workdir, tmp_path, request):
    work = tmp_path / "work"
    shutil.copytree(trained_workdir, work)
    recipe = tiny_recipe(work, method=SLOW, registry={"enabled": False})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))

    proc = _start(params)
    ckpt = work / "compress" / "checkpoint.mpk"
    t0 = time.monotonic()
    while layers_done(ckpt) < 1:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() - t0 < 300, "no layer finished"
        time.sleep(0.1)
    tree = _tree(proc.pid)
    assert len(tree) >= 3  # the command, the flow's process, the temporary Prefect server
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal reaches the whole foreground group
    else:
        proc.send_signal(sig)  # a supervisor signals the command's process
    t_sig = time.monotonic()
    out = proc.communicate(timeout=30)[0]
    stopped_s = time.monotonic() - t_sig
    assert stopped_s < 10, f"took {stopped_s:.1f} s"
    assert proc.returncode == 128 + sig, (proc.returncode, out[-2000:])
    assert "run the same command again to resume" in out
    assert "Traceback" not in out.split("stopping")[-1]
    time.sleep(0.5)
    left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [" ".join(p.cmdline()[:4]) for p in left]
    assert not (work / "compress" / "compressed.mpk").exists(), "stopped after the layer loop"

    if sig == signal.SIGINT:
        return  # resuming after a stop is the same for both signals; checked once, below
    # The same command again finishes (here on the session's Prefect server: where the run's
    # state lives does not change what it resumes from, its workdir); the compressed weights are
    # an uninterrupted run's.
    rerun = _start(params, server=True)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming after" in out
    ref = request.getfixturevalue("slow_reference")  # asked for here: the SIGINT case never needs it
    a = build_from_packed(read_packed(ref / "compress" / "compressed.mpk"), materialize=False).state_dict()
    b = build_from_packed(read_packed(work / "compress" / "compressed.mpk"), materialize=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
