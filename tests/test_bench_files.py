"""The parameter and sweep files shipped in bench/ stay valid as the schema moves: bench/RESULTS.md
tells users to run them, so each must load as the command loads it (``modelpress run --params``
merges a parameter file onto params.yaml; ``modelpress sweep FILE --params P`` reads the sweep
onto P, the one its header names) and every sweep point must expand to a valid recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelpress.recipe import Recipe
from modelpress.sweep import SweepConfig

from helpers import REPO

pytestmark = pytest.mark.unit

PARAMS = sorted((REPO / "bench" / "params").glob("*.yaml"))
SWEEPS = sorted((REPO / "bench" / "sweeps").glob("*.yaml"))


def test_there_are_files_to_check():
    assert len(PARAMS) >= 5 and len(SWEEPS) >= 3


@pytest.mark.parametrize("path", PARAMS, ids=[p.name for p in PARAMS])
def test_bench_params_file_loads_as_the_command_loads_it(path: Path):
    recipe = Recipe.from_yaml(path, [], base=REPO / "params.yaml")
    assert recipe.run.name == path.stem  # the header's commands and RESULTS.md name runs after their file
    assert f"--params bench/params/{path.name}" in path.read_text(), "the header shows the command that runs it"


def _params_of(sweep: Path) -> Path:
    found = re.search(r"--params (\S+\.yaml)", sweep.read_text())
    return REPO / found.group(1) if found else REPO / "params.yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_bench_sweep_file_expands_on_its_params(path: Path):
    params = _params_of(path)
    assert params.is_file(), f"{path.name} names {params}, which is not in the checkout"
    sweep = SweepConfig.from_yaml(path, Recipe.from_yaml(params))
    points = sweep.expand()
    assert points and len({name for name, _ in points}) == len(points)
    for _name, recipe in points:
        assert recipe.teacher.arch == sweep.base.teacher.arch


def test_lc_bench_points_are_valid_and_the_ones_results_md_runs():
    """bench/lc_cifar.py's points build valid LC settings, and every point a command in
    bench/RESULTS.md names exists."""
    import importlib.util

    from modelpress.methods.lc import LCConfig

    spec = importlib.util.spec_from_file_location("lc_cifar", REPO / "bench" / "lc_cifar.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for raw in bench.POINTS.values():
        LCConfig(**raw)
    named = {p for arg in re.findall(r"lc_cifar\.py[^`]*?--points (\S+)", (REPO / "bench" / "RESULTS.md").read_text(), re.S)
             for p in arg.split(",")}
    assert named and named <= set(bench.POINTS), named - set(bench.POINTS)
