"""One run at a time per work directory: the CLI refuses a second run with one line naming the
holder; the flow (a scheduled run) waits for the first to end."""

from __future__ import annotations

import threading
import time

import pytest

from modelpress.tasks.common import workdir_lock

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
