"""The kill campaign: `modelpress run` SIGKILLed (its whole process group, as a crash or an OOM
kill would) once in each stage, the data set's download, teacher training, the PQ layer loop,
fine-tuning, packing and registration, the same command run again after each kill: the last run
finishes with a packed file byte-identical to an uninterrupted run's, the downloaded files
verified and no partial file left, and the registry holds exactly one version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import FMNIST, REPO, TINY, SlowFiles, layers_done

pytestmark = pytest.mark.pipeline

MODEL = "kill-campaign"


def _params(tmp_path: Path, work: Path, registry: dict, source: Path | str = FMNIST, tag: str = "") -> Path:
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["run"]["workdir"] = str(work)
    raw["data"]["sources"] = [str(source)]
    raw["finetune"]["epochs"] = 0.3  # a window of seconds to be killed in
    raw["registry"] = registry
    path = tmp_path / f"params-{work.name}{tag}.json"
    path.write_text(json.dumps(raw))
    return path


def _fresh(trained_workdir: Path, work: Path) -> Path:
    shutil.copytree(trained_workdir, work)
    shutil.rmtree(work / "datasets")  # downloaded by the run, so it can be killed there
    shutil.rmtree(work / "teacher")  # trained by the run, likewise
    return work


class Run:
    """`modelpress run` in its own process group, its terminal output collected line by line."""

    def __init__(self, params: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "modelpress", "run", "--params", str(params)], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "MODELPRESS_DVC": "off"})
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self.reader.start()

    def kill_when(self, ready, what: str, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while not ready(self):
            assert self.proc.poll() is None, f"the run ended before {what}:\n{''.join(self.lines)[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"no {what} after {timeout:.0f} s"
            time.sleep(0.05)
        assert self.proc.poll() is None, f"the run ended before it could be killed in {what}"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_killed_once_in_every_stage_then_byte_identical_and_registered_once(trained_workdir, tmp_path):
    from mlflow import MlflowClient

    # The uninterrupted reference keeps the session's teacher (trained by the same recipe): the
    # killed run's must come out the same, or the last file could not be byte-identical.
    ref = shutil.copytree(trained_workdir, tmp_path / "ref")
    done = subprocess.run([sys.executable, "-m", "modelpress", "run", "--params",
                           str(_params(tmp_path, ref, {"enabled": False}))], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MODELPRESS_DVC": "off"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    work = _fresh(trained_workdir, tmp_path / "work")
    params = _params(tmp_path, work, {"model_name": MODEL})
    out = {n: p for n, p in (("teacher", work / "teacher" / "teacher.mpk"), ("compressed", work / "compress" / "compressed.mpk"), ("finetuned", work / "finetune" / "finetuned.mpk"),
                             ("packed", work / "model.mpk"), ("metrics", work / "metrics.json"))}

    def downloading(run):
        return bool(list(work.rglob(".partial-*")))

    def training_teacher(run):
        return any("teacher: training" in line for line in run.lines)

    def in_layer_loop(run):
        return layers_done(work / "compress" / "checkpoint.mpk") >= 1

    def fine_tuning(run):
        if not out["compressed"].exists():
            return False
        time.sleep(1)  # into the fine-tuning task (0.3 epoch: several seconds)
        return not out["finetuned"].exists()

    def packing(run):
        return out["finetuned"].exists()

    def registering(run):
        if not out["metrics"].exists():
            return False
        time.sleep(0.5)  # into the registration task (it logs the run, then the model, for seconds)
        return True

    # The download comes from a slow HTTP server on loopback, then (as a team would point the
    # rerun at a mirror) from the local folder: the partial file of the killed download must go.
    slow = SlowFiles(FMNIST)
    try:
        run = Run(_params(tmp_path, work, {"model_name": MODEL}, source=slow.url, tag="-http"))
        run.kill_when(downloading, "a download")
    finally:
        slow.close()
    assert list(work.rglob(".partial-*")), "the killed download left no partial file"
    kills = [("fetch", sorted(n for n, p in out.items() if p.exists()))]
    for what, ready in (("teacher", training_teacher), ("compress", in_layer_loop), ("finetune", fine_tuning),
                        ("pack", packing), ("register", registering)):
        run = Run(params)
        run.kill_when(ready, what)
        kills.append((what, sorted(n for n, p in out.items() if p.exists())))
    print("outputs present at each kill:", kills)
    assert kills[0][1] == kills[1][1] == []  # killed in the download, then while training the teacher
    assert kills[2][1] == ["teacher"]  # in the layer loop
    assert "finetuned" not in kills[3][1]
    assert "metrics" not in kills[4][1]

    final = subprocess.run([sys.executable, "-m", "modelpress", "run", "--params", str(params)], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "MODELPRESS_DVC": "off"}, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    assert (work / "model.mpk").read_bytes() == (ref / "model.mpk").read_bytes()
    assert not list(work.rglob(".partial*"))
    cache = work / "datasets" / "fashion-mnist"
    assert all((cache / f.name).read_bytes() == f.read_bytes() for f in FMNIST.glob("*.gz"))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, [v.version for v in versions]
    # The killed registration's MLflow run is ended, whether it was killed before its version or after.
    from modelpress.tasks.registry import owner_tag

    exp = client.get_experiment_by_name("modelpress")
    owned = client.search_runs([exp.experiment_id], filter_string=f"tags.`modelpress.owner` = '{owner_tag(str(work))}'")
    assert owned and [r.info.run_id for r in owned if r.info.status == "RUNNING"] == []
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["packed_bytes"] == (work / "model.mpk").stat().st_size
