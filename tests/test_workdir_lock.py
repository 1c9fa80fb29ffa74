"""One run at a time per work directory, and one run of a sweep at a time in its folder: the
commands refuse a second with one line naming the holder; the flows (a scheduled run) wait for
the first to end."""

from __future__ import annotations

import threading
import time

import pytest

from modelpress.atomic import workdir_lock
from modelpress.recipe import Recipe
from modelpress.sweep import SweepConfig, run_local

pytestmark = pytest.mark.unit


def test_second_run_is_refused_naming_the_holder(tmp_path):
    with workdir_lock(tmp_path):
        with pytest.raises(RuntimeError, match=f"run.workdir {tmp_path} is in use by another run \\(pid "):
            with workdir_lock(tmp_path, wait=False):
                pass
    with workdir_lock(tmp_path, wait=False):  # free again once the first ends
        pass


def test_a_waiting_run_starts_when_the_first_ends(tmp_path):
    order = []

    def second():
        with workdir_lock(tmp_path):
            order.append("second")

    with workdir_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second"]


def test_taking_the_lock_removes_partial_files_a_killed_run_left(tmp_path):
    (tmp_path / "compress").mkdir()
    stale = [tmp_path / ".partial-abc", tmp_path / "compress" / ".partial-model.mpk-x1"]
    for p in stale:
        p.write_bytes(b"half")
    kept = tmp_path / "compress" / "layers.json"
    kept.write_text("{}")
    with workdir_lock(tmp_path):
        assert not any(p.exists() for p in stale) and kept.exists()


def test_a_second_run_of_a_sweep_is_refused_before_it_writes_and_keeps_the_points_partials(tmp_path):
    """Two runs of one sweep would write its shared teacher and its front at once. The points'
    folders are under their own locks: a partial file there is a running point's, not stale."""
    sweep = SweepConfig(name="twice", workdir=str(tmp_path / "s"), base=Recipe(),
                        points=[{"name": "u", "set": {"method.name": "uniform"}}])
    point_partial = tmp_path / "s" / "points" / "u" / "compress" / ".partial-model.mpk-x1"
    stale = tmp_path / "s" / "teacher" / ".partial-teacher.mpk-x2"
    for p in (point_partial, stale):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"half")
    with sweep.lock():
        assert point_partial.exists() and not stale.exists()
        with pytest.raises(RuntimeError, match=f"sweep folder {tmp_path / 's'} is in use by another sweep \\(pid "):
            run_local(sweep, print_=lambda line: None)
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", "points", "teacher"]  # no dataset fetched
    with sweep.lock(wait=False):  # free again once the first ends
        pass


@pytest.mark.pipeline
def test_a_dvc_stage_beside_a_run_in_its_folder_stops_with_one_line(tmp_path):
    """`dvc repro` runs `modelpress stage NAME`: beside a run in the same folder it stops at once,
    writing nothing (waiting would hold DVC's lock on the stage's outputs, and the run's own `dvc
    commit` would then fail on it after all its work)."""
    import json
    import subprocess
    import sys

    from helpers import REPO, tiny_recipe

    work = tmp_path / "work"
    params = tmp_path / "params.json"
    params.write_text(json.dumps(tiny_recipe(work).model_dump(mode="json")))
    with workdir_lock(work):
        proc = subprocess.run([sys.executable, "-m", "modelpress", "stage", "fetch", "--params", str(params), "--whole"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"modelpress: error: run.workdir {work} is in use by another run (pid ")
    assert sorted(p.name for p in work.iterdir()) == [".lock"]


def test_a_runs_lock_leaves_the_partial_files_of_its_sweeps_to_them(tmp_path):
    """A sweep's default folder is <run.workdir>/sweeps/<name>: a run or DVC stage taking the work
    directory must not delete the partial file a running sweep is writing there."""
    live = tmp_path / "sweeps" / "s" / "teacher" / ".partial-teacher.mpk-x1"
    stale = tmp_path / "compress" / ".partial-model.mpk-x2"
    for p in (live, stale):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"half")
    with workdir_lock(tmp_path):
        assert live.exists() and not stale.exists()
