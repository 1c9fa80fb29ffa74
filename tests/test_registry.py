"""The registry consumer's side: versions, aliases by the promotion rule, no duplicates, and a
consumer in a separate process (without Prefect or DVC) reproducing the evaluate step."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modelpress.data import load_dataset
from modelpress.pack import PackedFormatError, load_packed
from modelpress.tasks import registry

from helpers import CONSUMER_PREAMBLE, REPO, run_cli, tiny_recipe

# One worker runs this module under pytest-xdist (--dist loadgroup): its tests share the registered versions.
pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("registry")]

NAME = "fmnist-cnn-pq"  # the default name, as in the README's consumer example

# Runs in a fresh interpreter that cannot import Prefect or DVC (helpers.CONSUMER_PREAMBLE).
CONSUMER = CONSUMER_PREAMBLE + r"""import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def registered(prefect_server, trained_workdir, tmp_path_factory):
    """Two versions of the default-named model, the second smaller (k=32 on the big layer)."""
    from modelpress.flows.compress import compress_flow

    runs = []
    for k in (64, 32):
        work = tmp_path_factory.mktemp(f"reg{k}")
        shutil.copytree(trained_workdir, work, dirs_exist_ok=True)
        recipe = tiny_recipe(work, method={"linear": {"block_size": 8, "k": k}}, registry={"max_top1_drop": 100})
        runs.append((recipe, compress_flow(recipe)))
    return runs


def _batch(n: int = 64) -> np.ndarray:
    _, test = load_dataset("fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
    return test.tensors[0][:n].numpy()


def test_versions_aliases_and_no_duplicates(registered):
    (recipe1, s1), (recipe2, s2) = registered
    v1, v2 = s1["registered"], s2["registered"]
    assert (v1["model_name"], v2["model_name"]) == (NAME, NAME)
    assert int(v2["version"]) == int(v1["version"]) + 1
    assert s2["packed_bytes"] < s1["packed_bytes"]
    c = registry.client()
    assert c.get_model_version_by_alias(NAME, "candidate").version == v2["version"]
    # Both are within the (test's) tolerance: the smaller file is champion.
    assert c.get_model_version_by_alias(NAME, "champion").version == v2["version"]
    assert v2["promotion"].startswith("champion")
    mv = c.get_model_version(NAME, v2["version"])
    assert mv.tags["modelpress.packed_sha256"] == s2["packed_sha256"]
    assert mv.tags["modelpress.compressed_top1"] == f"{s2['compressed_top1']:.2f}"
    assert mv.tags["modelpress.prefect_flow_run_id"]
    assert "How to load" in mv.description and f"{s2['packed_bytes']:,} bytes" in mv.description
    # What a REST client needs to prepare its inputs and read the outputs, in the card itself.
    assert "mean [0.286] and std [0.353]" in mv.description and "classes in order: T-shirt/top, Trouser" in mv.description, mv.description

    # Re-running the same inputs registers nothing new.
    from modelpress.flows.compress import compress_flow

    again = compress_flow(recipe2)["registered"]
    assert again["duplicate"] and again["version"] == v2["version"]
    assert len(registry.versions(NAME)) == 2
    # The version says which flow run found it again (a deployment sweep's rerun reads it back so).
    tags = c.get_model_version(NAME, v2["version"]).tags
    assert tags["modelpress.last_prefect_flow_run_id"] not in ("", tags["modelpress.prefect_flow_run_id"])


def test_promotion_rule():
    def v(version, size, drop, top1):
        tags = {"modelpress.packed_bytes": str(size), "modelpress.top1_drop": str(drop), "modelpress.compressed_top1": str(top1)}
        return SimpleNamespace(version=str(version), tags=tags)

    versions = [v(1, 100_000, 0.2, 91.0), v(2, 60_000, 1.5, 89.7), v(3, 80_000, 0.9, 90.3), v(4, 80_000, 0.5, 90.7)]
    assert registry.choose_champion(versions, 1.0).version == "4"  # smallest eligible, ties -> higher top-1
    assert registry.choose_champion(versions, 2.0).version == "2"
    assert registry.choose_champion(versions, 0.1) is None
    assert registry.promotion(versions, "4", 1.0) == (True, "champion: top-1 drop 0.50 <= 1.0 and smallest eligible file (80,000 bytes)")
    assert registry.promotion(versions, "3", 1.0) == (False, "not promoted: version 4 is as small (80,000 bytes) and scores higher (90.70 vs 90.30)")
    assert registry.promotion(versions, "1", 1.0) == (False, "not promoted: version 4 is smaller (80,000 vs 100,000 bytes)")
    assert registry.promotion(versions, "2", 1.0) == (False, "not promoted: top-1 drop 1.50 > 1.0")
    # A version whose outputs were NaN (no top-1 drop to compare) when no version is eligible:
    # registered and reported, not a crash that a rerun meets again.
    nan = [v(5, 50_000, float("nan"), float("nan")), v(1, 100_000, 1.2, 90.0)]
    assert registry.promotion(nan, "5", 1.0) == (False, "not promoted: top-1 drop nan is not a number")



def _tagged(version, size, drop, top1, dataset="fashion-mnist", test_images=10_000):
    return SimpleNamespace(version=str(version), tags={
        "modelpress.packed_bytes": str(size), "modelpress.top1_drop": str(drop), "modelpress.compressed_top1": str(top1),
        "modelpress.dataset": dataset, "modelpress.test_images": str(test_images)})


def test_a_weaker_teachers_version_counts_its_loss_against_the_best_teacher():
    def v(version, size, teacher, top1):
        return SimpleNamespace(version=str(version), tags={
            "modelpress.packed_bytes": str(size), "modelpress.teacher_top1": f"{teacher:.2f}",
            "modelpress.compressed_top1": f"{top1:.2f}", "modelpress.top1_drop": f"{teacher - top1:.2f}"})

    good = v(1, 100_000, 91.0, 90.5)
    weak = v(2, 60_000, 85.0, 84.8)  # smaller, 0.2 under its own teacher, 6.2 under the best one
    assert registry.choose_champion([good, weak], 1.0).version == "1"
    assert registry.promotion([good, weak], "2", 1.0) == (
        False, "not promoted: top-1 drop 6.20 > 1.0 (against the best teacher among the versions, 91.00; its own 85.00)")
    assert registry.choose_champion([weak], 1.0).version == "2"  # alone, against its own teacher
    better = v(3, 120_000, 93.0, 92.6)  # a better teacher: version 1 is now 2.5 under the best teacher
    assert registry.choose_champion([good, weak, better], 1.0).version == "3"
    assert registry.choose_champion([good, weak, better], 3.0).version == "1"
    same = v(4, 90_000, 91.0, 90.0)  # the same teacher as version 1: its own drop, as before
    assert registry.choose_champion([good, same], 1.0).version == "4"
    edge = v(5, 50_000, 92.0, 91.9)  # 0.10 under its teacher, 0.90 under the best: 1.00 exactly, within 1.0
    assert registry.choose_champion([v(6, 90_000, 92.9, 92.5), edge], 1.0).version == "5"
    # A text encoder's figure is its cosine to its own teacher (100): not compared with top-1 figures.
    encoder = SimpleNamespace(version="7", tags={**v(7, 10_000, 100.0, 99.2).tags, "modelpress.metric": "embedding_cosine"})
    assert registry.comparable([good, encoder], good) == [good]


def test_promotion_compares_only_versions_of_one_data_set_measured_on_the_most_test_inputs():
    full = [_tagged(1, 100_000, 0.5, 90.0), _tagged(2, 90_000, 0.8, 89.7)]
    quick = _tagged(3, 40_000, 0.2, 91.0, test_images=2_000)  # smaller and better, on a fifth of the test set
    other = _tagged(4, 30_000, 0.1, 99.0, dataset="cifar10")
    every = [*full, quick, other]
    assert registry.promotion(every, "3", 1.0) == (
        False, "not promoted: measured on 2,000 test inputs, where other versions were on 10,000 (data.test_images)")
    assert registry.promotion(every, "2", 1.0)[0] is True
    assert registry.choose_champion(registry.comparable(every, full[0]), 1.0).version == "2"
    assert registry.promotion(every, "4", 1.0)[0] is True  # alone in its data set
    # Quick checks compare among themselves while nothing was measured on more.
    assert registry.promotion([quick, _tagged(5, 50_000, 0.3, 90.9, test_images=2_000)], "3", 1.0)[0] is True


@pytest.mark.usefixtures("own_store")
def test_champion_is_the_rules_choice_among_all_versions_and_candidate_the_newest(tmp_path):
    """A version made champion by a run with a loose max_top1_drop loses the alias to the rule's
    choice of the next run; a version promoted again later (a rerun that finds its packed file
    registered) does not take ``candidate`` back from newer versions."""
    c = registry.client()
    c.create_registered_model("m")

    def add(size, drop, top1):
        tags = {k: v for k, v in _tagged(0, size, drop, top1).tags.items()}
        return c.create_model_version("m", f"file://{tmp_path}", tags=tags).version

    v1 = add(100_000, 0.5, 90.0)
    assert registry.promote("m", v1, 1.0).startswith("champion")
    v2 = add(40_000, 30.0, 60.0)  # an on-demand run with max_top1_drop 100
    assert registry.promote("m", v2, 100.0).startswith("champion")
    assert c.get_model_version_by_alias("m", "champion").version == v2
    v3 = add(110_000, 0.4, 90.1)  # the nightly, default rule: version 1 is the smallest within it
    assert registry.promote("m", v3, 1.0) == "not promoted: version 1 is smaller (100,000 vs 110,000 bytes)"
    assert c.get_model_version_by_alias("m", "champion").version == v1
    assert c.get_model_version("m", v1).tags["modelpress.promotion"].startswith(f"champion again at version {v3}'s registration")
    assert c.get_model_version_by_alias("m", "candidate").version == v3
    registry.promote("m", v1, 1.0)  # found again by a rerun of its flow
    assert c.get_model_version_by_alias("m", "candidate").version == v3
    # A run of another data set under this name is refused before any work (it would take the champion).
    registry.check_name("m", "fashion-mnist")
    with pytest.raises(ValueError, match="m holds versions of data set fashion-mnist, and this run's is cifar10"):
        registry.check_name("m", "cifar10")
    registry.check_name("no-such-model", "cifar10")


def test_consumer_process_reproduces_evaluate_predictions(registered, tmp_path):
    (_, s2) = registered[1]
    batch = _batch()
    np.save(tmp_path / "x.npy", batch)
    proc = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{NAME}@champion", tmp_path / "x.npy", tmp_path / "y.npy"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    # The evaluate step: the packed file loaded with load_packed, run on the same batch.
    model, _ = load_packed(_packed_of(s2))
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert (got.argmax(1) == expected.argmax(1)).all()


def _packed_of(summary: dict) -> Path:
    """The packed file the champion version carries, found by its sha256 among the runs."""
    import mlflow

    version = registry.client().get_model_version(NAME, summary["registered"]["version"])
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))
    (packed,) = [p for p in local.rglob("*.mpk")]
    return packed


def test_module_access_and_tampered_artifact(registered):
    (_, s2) = registered[1]
    net = registry.load_module(f"models:/{NAME}@champion")
    assert isinstance(net, torch.nn.Module)
    packed = _packed_of(s2)
    with torch.no_grad():
        x = torch.from_numpy(_batch(8))
        assert torch.equal(net(x), load_packed(packed)[0](x))
    # More inputs than one batch of the pyfunc: run in batches, the same outputs; no input, no rows.
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    many = _batch(300)
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(many), net(torch.from_numpy(many)).numpy(), rtol=1e-5, atol=1e-5)
    assert model.predict(many[:0]).shape == (0, 10)
    # The registry's stored copy: tamper with it, and loading fails with the checksum error.
    version = registry.client().get_model_version(NAME, s2["registered"]["version"])
    stored = _stored_packed_file(version)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-20] + bytes(20))
        with pytest.raises(PackedFormatError, match="checksum mismatch"):  # (this process's modelpress: the same code)
            mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        # Another valid packed file in its place (version 1's): not the file the version's tags describe.
        stored.write_bytes(_packed_of(registered[0][1]).read_bytes())
        with pytest.raises(ValueError, match="not the one it was registered with"):
            mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        stored.unlink()
        with pytest.raises(Exception, match=r"(?i)no such|not found|does not exist"):
            mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        stored.write_bytes(original)


def _stored_packed_file(version) -> Path:
    """The packed file inside the local artifact store (sqlite store: beside the database)."""
    from modelpress.data import sha256_file

    db = registry.sqlite_db(registry.configure_mlflow())
    sha = version.tags["modelpress.packed_sha256"]
    (match,) = [p for p in (db.parent / "artifacts").rglob("*.mpk") if sha256_file(p) == sha]
    return match


# Loads two versions in one process, in the order given, and prints what each one's load_packed marked.
TWO_VERSIONS = CONSUMER_PREAMBLE + r"""import json, mlflow
models = [mlflow.pyfunc.load_model(uri) for uri in sys.argv[1:]]
copies = {n for n in sys.modules if n == "modelpress" or (n.startswith("_modelpress_") and "." not in n)}
print(json.dumps([[m.unwrap_python_model().meta.get("loaded_by") for m in models], len(copies)]))
"""


def test_one_process_runs_each_version_with_the_code_it_was_registered_with(registered, tmp_path):
    """A consumer comparing two versions in one process (champion and candidate side by side):
    each runs the library logged with it, not the one the first load imported. Version 1's logged
    copy is given a load_packed that marks what it loads."""
    versions = [registry.client().get_model_version(NAME, s["registered"]["version"]) for _, s in registered]
    stored = _stored_packed_file(versions[0])
    model_dir = next(p for p in stored.parents if (p / "MLmodel").is_file())
    pack_init = model_dir / "code" / "modelpress" / "pack" / "__init__.py"
    original = pack_init.read_text()
    pack_init.write_text(original + "\n_load = load_packed\n\n\ndef load_packed(*a, **k):\n"
                         "    model, meta = _load(*a, **k)\n    return model, {**meta, 'loaded_by': 'version 1 code'}\n")
    uris = [f"models:/{NAME}/{v.version}" for v in versions]
    try:
        # Each order, each version loaded twice: two copies of the library, each version's own.
        for order, expected in ((uris * 2, ["version 1 code", None] * 2), (uris[::-1] * 2, [None, "version 1 code"] * 2)):
            proc = subprocess.run([sys.executable, "-c", TWO_VERSIONS, *order], capture_output=True, text=True, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert json.loads(proc.stdout.strip().splitlines()[-1]) == [expected, 2], (order, proc.stdout[-500:])
    finally:
        pack_init.write_text(original)


def test_models_cli_lists_and_shows(registered):
    out = run_cli("models", "list")
    assert out.returncode == 0, out.stderr
    assert NAME in out.stdout and "champion" in out.stdout and "candidate" in out.stdout
    show = run_cli("models", "show", f"{NAME}@champion")
    assert show.returncode == 0, show.stderr
    assert "packed_sha256" in show.stdout and "How to load" in show.stdout
    missing = run_cli("models", "show", "no-such-model")
    assert missing.returncode == 1 and "no-such-model" in missing.stderr


def _readme_block(marker: str, lang: str) -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", readme, re.S)
    assert block, f"README lacks the {marker} block"
    return block.group(1)


def _sh(*cmd, cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_consumer_environment_from_the_registry_alone(registered, tmp_path):
    """A consumer's machine: a fresh virtual environment with only the README's consumer install
    and the requirements the model logged (no modelpress, Prefect or DVC), then the README's
    example and `mlflow models predict` on the registered version."""
    (_, s2) = registered[1]
    uri = f"models:/{NAME}/{s2['registered']['version']}"
    uv = Path(sys.executable).with_name("uv")
    venv = tmp_path / "consumer"
    _sh(uv, "venv", "-q", "-p", sys.version.split()[0], venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    install = _readme_block("consumer-install", "bash").strip().splitlines()
    for line in install:  # `pip install ...`, run by uv's pip for speed: the same requirement specs
        assert line.startswith("pip install "), line
        _sh(uv, "pip", "install", "-q", "--system-certs", "--python", py, *shlex.split(line)[2:], cwd=tmp_path, env=env)
    requirements = _sh(py, "-c", f"import mlflow; print(mlflow.pyfunc.get_model_dependencies({uri!r}))", cwd=tmp_path, env=env)
    _sh(uv, "pip", "install", "-q", "--system-certs", "--python", py, "-r", requirements.strip().splitlines()[-1], cwd=tmp_path, env=env)
    probe = subprocess.run([py, "-c", "import modelpress"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0, "modelpress must come with the model, not from the consumer's environment"

    # The README's example, as it stands.
    (tmp_path / "example.py").write_text(_readme_block("consumer-example", "python"))
    out = _sh(py, "example.py", cwd=tmp_path, env=env)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["batch"] == 16 and result["accuracy"] >= 0.5, result

    # The MLflow CLI's scoring path on the registered version.
    batch = _batch(8)
    (tmp_path / "in.json").write_text(json.dumps({"inputs": batch.tolist()}))
    _sh(py, "-m", "mlflow", "models", "predict", "-m", uri, "-i", "in.json", "-t", "json", "-o", "out.json",
        "--env-manager", "local", cwd=tmp_path, env=env)
    got = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    model, _ = load_packed(_packed_of(s2))
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
