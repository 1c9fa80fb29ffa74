"""The core library never imports the orchestration: with prefect, mlflow and dvc made
unimportable (and the optional Hugging Face packages, imported only for hf: models), every core
module imports and the core commands (stage, inspect, evaluate, schema) work. The orchestration is installed as modelpress.flows / modelpress.tasks, not as
generic top-level packages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import FMNIST, REPO

pytestmark = pytest.mark.pipeline

BLOCKED = ("prefect", "mlflow", "dvc", "transformers", "safetensors")

# The start of a script run in a fresh interpreter: importing a package of BLOCKED fails there.
BLOCKER = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    BLOCKED = set({blocked!r})

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"not importable here: {{name}}")

    sys.meta_path.insert(0, Block())
""")

SCRIPT = BLOCKER + textwrap.dedent("""
    import torch
    import modelpress
    from modelpress import cli
    from modelpress.models import build_model
    from modelpress.pack import arch_spec, pack_model

    core = [m.name for m in pkgutil.walk_packages(modelpress.__path__, "modelpress.")
            if not m.name.startswith(("modelpress.flows", "modelpress.tasks", "modelpress.__main__"))]
    for name in core:
        importlib.import_module(name)
    torch.manual_seed(0)
    pack_model(build_model("fmnist_cnn"), "m.mpk", arch_spec("fmnist_cnn"))
    params = {{"data": {{"sources": [{fmnist!r}]}}, "run": {{"workdir": "work"}}}}
    json.dump(params, open("p.json", "w"))
    codes = [cli.main(["schema"]), cli.main(["inspect", "m.mpk"]),
             cli.main(["stage", "fetch", "--params", "p.json"]),
             cli.main(["evaluate", "m.mpk", "--params", "p.json", "--limit", "200", "--json"])]
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)
    print("RESULT", json.dumps({{"codes": codes, "core": core, "loaded": loaded}}))
""")


def test_core_works_with_orchestration_unimportable(tmp_path):
    script = SCRIPT.format(blocked=BLOCKED, fmnist=str(FMNIST))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["codes"] == [0, 0, 0, 0], proc.stderr[-3000:]
    assert result["loaded"] == []
    # the walk really covered the core: the library's main parts are in it
    for name in ("modelpress.stages", "modelpress.pack", "modelpress.methods.pq", "modelpress.recipe", "modelpress.cli",
                 "modelpress.models.hf"):
        assert name in result["core"]
    assert '"top1"' in proc.stdout and "(empty)" not in proc.stdout


def test_orchestration_is_not_installed_as_generic_packages(tmp_path):
    """Outside the checkout, ``tasks`` and ``flows`` are not importable; ``modelpress.tasks`` is."""
    code = ("import importlib.util as u, json; print(json.dumps([u.find_spec(n) is not None for n in "
            "('tasks', 'flows', 'modelpress.tasks', 'modelpress.flows')]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, False, True, True]
    assert (REPO / "flows" / "cli.py").is_file()


def test_worker_setup_starts_without_torch(tmp_path):
    """infra/prefect-worker.sh runs `python -m modelpress.flows.deploy worker-setup` before every
    worker start: that module (and `import modelpress`) leave torch unimported, seconds of each
    start; every name of __all__ still comes on first use."""
    code = ("import sys, json, modelpress.flows.deploy; before = 'torch' in sys.modules; "
            "import modelpress; names = [getattr(modelpress, n) for n in modelpress.__all__]; "
            "print(json.dumps([before, 'torch' in sys.modules, all(map(callable, names)), "
            "sorted(modelpress.__all__) == sorted(modelpress._EXPORTS)]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, True, True, True]


LOAD_SCRIPT = BLOCKER + textwrap.dedent("""
    from modelpress.pack import load_packed

    print("RESULT", json.dumps([type(load_packed(f)[0]).__name__ for f in {files!r}]))
""")


def test_every_architecture_loads_with_the_requirements_its_registered_model_logs(tmp_path):
    """A registry consumer's environment holds the model's logged requirements and nothing else:
    a packed file of every family the registry can name (each registry builder, a torchvision
    builder) loads with only those importable."""
    from modelpress.models import _REGISTRY, build_model, needs_torchvision
    from modelpress.pack import arch_spec, pack_model
    from tasks.register import runtime_requirements

    small = {"cifar_vit": {"num_layers": 1, "hidden_dim": 32, "mlp_dim": 32, "num_heads": 2}}
    archs = {name: small.get(name, {}) for name in _REGISTRY} | {"torchvision:mobilenet_v2": {"num_classes": 10}}
    optional = {"torchvision", "transformers", "tokenizers", "safetensors"}  # pillow comes with torchvision
    groups: dict[tuple, list[str]] = {}
    for arch, kwargs in archs.items():
        path = tmp_path / f"{arch.replace(':', '-')}.mpk"
        pack_model(build_model(arch, **kwargs), path, arch_spec(arch, **kwargs))
        required = {r.split("==")[0] for r in runtime_requirements(arch)}
        groups.setdefault(tuple(sorted(optional - required)), []).append(str(path))
    assert len(groups) == 2, groups  # with torchvision among the requirements and without
    for blocked, files in groups.items():
        script = LOAD_SCRIPT.format(blocked=blocked, files=files)
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"blocked {blocked}:\n{proc.stderr[-3000:]}"
        assert len(json.loads(proc.stdout.split("RESULT ", 1)[1])) == len(files)
    assert needs_torchvision("torchvision:resnet18") and not needs_torchvision("cifar_resnet20")


@pytest.mark.unit
def test_the_library_imports_itself_relatively():
    """A registered model version loads the library logged with it under a name of its own
    (tasks/pyfunc_model.py), so that one process can hold several versions' code: a module of the
    library that imported ``modelpress`` by name would pull in another copy."""
    import ast

    found = []
    for path in sorted((REPO / "modelpress").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                   for n in ast.walk(node)}  # `python -m` entry points may name themselves
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if id(node) not in guarded and any(n == "modelpress" or n.startswith("modelpress.") for n in names):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == [], f"absolute imports of modelpress inside the library: {found}"
