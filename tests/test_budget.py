"""A byte budget for PQ: per-layer settings chosen from measured damage; the packed file's real
size respects it; an unreachable budget fails before any work, naming the smallest size."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from modelpress import stages
from modelpress.methods.pq import method as pq_method
from modelpress.methods.pq.budget import BudgetError, allocate
from modelpress.pack import load_packed, read_packed

from helpers import run_cli, tiny_recipe

# One worker runs this module under pytest-xdist (--dist loadgroup): its tests share one budget run.
pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("budget")]


def _table():
    # layer -> options (bytes, damage); damage falls with bytes, at different rates per layer.
    raw = {
        "a": [(100, 0.0), (40, 0.05), (20, 0.3), (10, 1.0)],
        "b": [(400, 0.0), (120, 0.02), (60, 0.04), (30, 0.5)],
        "c": [(50, 0.0), (25, 0.2), (12, 0.25)],
    }
    return {n: [{"spec": i, "bytes": b, "damage": d} for i, (b, d) in enumerate(rows)] for n, rows in raw.items()}


@pytest.mark.parametrize("budget", [52, 80, 120, 160, 250, 550])
def test_allocation_fits_and_is_optimal_on_a_small_table(budget):
    table = _table()
    choice = allocate(table, budget)
    assert sum(r["bytes"] for r in choice.values()) <= budget
    best = min(
        (sum(r["damage"] for r in combo), combo)
        for combo in itertools.product(*table.values()) if sum(r["bytes"] for r in combo) <= budget
    )[0]
    assert sum(r["damage"] for r in choice.values()) == pytest.approx(best)


def test_allocation_below_the_smallest_size():
    with pytest.raises(BudgetError):
        allocate(_table(), 51)


def _no_measuring(*a, **k):
    raise AssertionError("measured again")


BUDGET = 60_000


@pytest.fixture(scope="module")
def budget_run(trained_workdir, tmp_path_factory):
    """One PQ run under a byte budget (measuring every candidate's damage), shared by the tests
    below: each starts from a copy of its finished workdir."""
    work = tmp_path_factory.mktemp("budget") / "work"
    shutil.copytree(trained_workdir, work)
    recipe = tiny_recipe(work, method={"target_bytes": BUDGET, "budget_k": [16, 64, 256]})
    stages.preflight(recipe)
    stages.compress_stage(recipe)
    stages.finetune_stage(recipe)
    path = stages.pack_stage(recipe)
    plan = stages.read_json(work / "compress" / "allocation.json")["layers"]
    return work, recipe, path, plan


@pytest.fixture
def budget_copy(budget_run, tmp_path):
    """A copy of the budget run's workdir and its plan."""
    work = tmp_path / "work"
    shutil.copytree(budget_run[0], work)
    return work, budget_run[3]


def test_packed_file_respects_the_budget(budget_run):
    workdir, recipe, path, plan = budget_run
    size = os.path.getsize(path)
    assert 0.9 * BUDGET < size <= BUDGET  # fits, and uses the budget
    entries = {r["tensor"].removesuffix(".weight"): r for r in read_packed(path).summary()}
    for row in plan:  # the file holds what the plan chose
        e = entries[row["layer"]]
        if row["k"] is None:
            assert e["encoding"] == "dense"
        else:
            assert (e["encoding"], e["block"], e["k"]) == ("pq", row["block_size"], row["k"])
    assert len({(r["block_size"], r["k"]) for r in plan}) > 1  # layers got different settings
    result = stages.evaluate_file(path, recipe)
    teacher = stages.read_json(workdir / "teacher" / "teacher.json")["top1"]
    assert result["top1"] > teacher - 15  # briefly trained teacher, tiny fine-tuning


def test_another_budget_reuses_the_measured_damage(budget_copy, monkeypatch):
    """The damage of every candidate does not depend on the budget: a second budget in the same
    workdir (as the points of a sweep share one) plans from the saved table, measuring nothing."""
    workdir, plan = budget_copy
    assert len(list((workdir / "cache").glob("budget-damage-*.json"))) == 1

    monkeypatch.setattr(pq_method, "measure", _no_measuring)  # where the method measures damage
    budget = 45_000
    recipe = tiny_recipe(workdir, method={"target_bytes": budget, "budget_k": [16, 64, 256]})
    stages.compress_stage(recipe)
    stages.finetune_stage(recipe)
    size = os.path.getsize(stages.pack_stage(recipe))
    assert 0.85 * budget < size <= budget
    smaller = stages.read_json(workdir / "compress" / "allocation.json")["layers"]
    assert sum(r["bytes"] for r in smaller) < sum(r["bytes"] for r in plan)


def test_int8_codebooks_buy_more_centroids_within_the_same_budget(budget_copy, monkeypatch):
    """pack.codebook_dtype=i8: the same measured damages, costed at half the codebook bytes, buy
    more centroids; the file still fits, holds int8 codebooks, and loads as the tuned model."""
    workdir, f16_plan = budget_copy
    monkeypatch.setattr(pq_method, "measure", _no_measuring)  # where the method measures damage
    budget = BUDGET
    recipe = tiny_recipe(workdir, method={"target_bytes": budget, "budget_k": [16, 64, 256]}, pack={"codebook_dtype": "i8"})
    stages.preflight(recipe)
    stages.compress_stage(recipe)
    finetuned = stages.finetune_stage(recipe)
    path = stages.pack_stage(recipe)
    assert 0.9 * budget < os.path.getsize(path) <= budget
    plan = stages.read_json(workdir / "compress" / "allocation.json")["layers"]
    centroids = lambda rows: sum(r["k"] or 0 for r in rows)  # noqa: E731
    assert centroids(plan) > centroids(f16_plan), (plan, f16_plan)
    entries = [r for r in read_packed(path).summary() if r["encoding"] == "pq"]
    assert entries and all(r["codebook"] == "i8" for r in entries)
    tuned, _ = load_packed(finetuned, materialize=True)  # f32 file of the rounded model
    packed, _ = load_packed(path, materialize=True)
    for name, m in packed.named_modules():
        if name in {r["tensor"].removesuffix(".weight") for r in entries}:
            assert torch.equal(m.weight, tuned.get_submodule(name).weight), name


def test_unreachable_budget_fails_before_any_work(tmp_path):
    proc = run_cli("run", "-S", f"run.workdir={tmp_path / 'w'}", "-S", "method.target_bytes=20000")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "target_bytes=20000 cannot be met: the smallest reachable packed size is" in last
    assert not (tmp_path / "w").exists()
