
"""A compression process killed in the middle of the layer loop resumes at the next layer, and
a fine-tuning killed after an epoch resumes at that epoch; each ends with exactly the weights of
an uninterrupted run."""

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


class Killed(Exception):
    pass


def test_fine_tuning_killed_after_an_epoch_resumes_there(trained_workdir, slow_reference, tmp_path, monkeypatch, caplog):
    """Fine-tuning is most of a run's time (8-16 epochs on CIFAR-10): a kill must not cost it all."""
    from torch.utils.data import Subset

    from modelpress.stages import pipeline

    real_train_set, real_distill = pipeline._train_set, pipeline.distill
    monkeypatch.setattr(pipeline, "_train_set", lambda r: Subset(real_train_set(r), range(512)))  # 4 batches an epoch
    ref, work = tmp_path / "ref", tmp_path / "work"
    for w in (ref, work):
        shutil.copytree(slow_reference, w)  # compressed already

    def recipe(w):
        return tiny_recipe(w, method=SLOW, finetune={"epochs": 3, "augment": True, "bn_batches": 2})

    stages.finetune_stage(recipe(ref))

    def killed_in_the_second_epoch(*args, **kw):
        def step(s, _total):
            if s == 6:
                raise Killed
        return real_distill(*args, on_step=step, **kw)

    monkeypatch.setattr(pipeline, "distill", killed_in_the_second_epoch)
    with pytest.raises(Killed):
        stages.finetune_stage(recipe(work))
    assert (work / "finetune" / "train-state.pt").is_file() and not (work / "finetune" / "finetuned.mpk").exists()
    monkeypatch.setattr(pipeline, "distill", real_distill)
    with caplog.at_level("INFO", logger="modelpress"):
        stages.finetune_stage(recipe(work))
    assert "finetune: resuming at step 4 of 12" in caplog.text
    assert not (work / "finetune" / "train-state.pt").exists()
    a, b = _state(ref / "finetune" / "finetuned.mpk"), _state(work / "finetune" / "finetuned.mpk")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
