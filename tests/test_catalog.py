"""The bad-input catalog: what a hostile or careless user gives the ``modelpress`` command, case by
case, across parameters, data, weights, packed files, sweeps, environment and registry.

Each case runs the command's own entry point (``modelpress.cli.main``, what the console script
calls) in this process, from the checkout's root, and must: exit non-zero, print exactly one
line on stderr that names the cause (``modelpress: error: ...``), no traceback, within 10 s,
and leave nothing behind (no work directory, no partial file, params.yaml untouched). The
pipeline's commands are stopped if they get past their checks (``_supervised`` replaced by a
tripwire), so an input accepted silently fails here at once instead of starting a run.
tests/test_cli_errors.py runs a few of the same through a real process, and the failures that
need one (unreachable servers, a failing task, signals).
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from modelpress.models import build_model
from modelpress.pack import pack_model

from helpers import FMNIST, REPO

pytestmark = pytest.mark.pipeline

FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
ARCH = {"name": "fmnist_cnn", "kwargs": {}}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# progress logged (ours, Prefect's, MLflow's creating a new store), not an error
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d |\d\d:\d\d:\d\d\.\d+ \| |\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO )")


class Tripwire(Exception):
    pass


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """cli(*argv) -> the one error line; asserts the whole contract of a catalog case."""
    import modelpress.flows.cli as flows_cli
    from modelpress import cli as core_cli

    def tripwire(*_args, **_kw):
        raise Tripwire("the command got past its checks and would have started the work")

    monkeypatch.setattr(flows_cli, "_supervised", tripwire)
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MODELPRESS_DEBUG", raising=False)
    params_before = (REPO / "params.yaml").read_bytes()

    def run(*argv: str, needle: str | tuple[str, ...], fetching: bool = False) -> str:
        """``fetching``: the fetch stage may have made its (empty) cache folders, no file."""
        capsys.readouterr()
        t0 = time.monotonic()
        try:
            code = core_cli.main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
        seconds = time.monotonic() - t0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
        if code == 2:  # argparse: the usage (its lines indented after the first), then the error
            lines = [line for line in lines if not line.startswith(("usage: ", " "))]
        assert code not in (0, None), f"accepted: {argv}\n{err}"
        assert "Traceback" not in err, err
        assert len(lines) == 1, err
        assert re.match(r"^modelpress( [a-z-]+)?: error: ", lines[0]), lines[0]  # (argparse names the subcommand)
        assert "Tripwire" not in lines[0] and "got past its checks" not in lines[0], lines[0]
        for n in (needle,) if isinstance(needle, str) else needle:
            assert n in lines[0], lines[0]
        assert seconds < 10, f"{seconds:.1f} s: {argv}"
        assert (REPO / "params.yaml").read_bytes() == params_before
        if fetching:  # only complete, verified files may stay in the cache (a retry reuses them), and the
            # work directory's (empty) lock file, which a run leaves as well
            left = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.relative_to(tmp_path / "work") != Path(".lock")]
            assert all(p.name in FILES and p.read_bytes() == (FMNIST / p.name).read_bytes() for p in left), left
        else:
            assert not (tmp_path / "work").exists(), "a work directory was created"
        assert not [p for p in tmp_path.rglob(".partial*")], "a partial file was left"
        return lines[0]

    return run


def _work(tmp_path: Path) -> str:
    return f"run.workdir={tmp_path / 'work'}"


# ---- parameters: every field of the one schema, through -S --------------------------------------

BAD_SETTINGS = [
    ("run.name=../../x y/z", "run.name"), ("run.name=''", "run.name"), ("run.workdir=''", "run.workdir"),
    ("run.device=tpu", "run.device"), ("run.seed=zero", "run.seed"), ("run.seed=[1]", "run.seed"),
    ("registry.model_name=my model v1", "registry.model_name"), ("registry.model_name=team/model", "registry.model_name"),
    ("registry.experiment=../../evil-exp", "registry.experiment"), ("registry.experiment=a/../b", "registry.experiment"),
    ("registry.max_top1_drop=-1", "registry.max_top1_drop"), ("registry.enabled=maybe", "registry.enabled"),
    ("method.budget_k=[]", "method.budget_k"), ("method.budget_k=[0]", "method.budget_k"),
    ("method.budget_k=[70000]", "method.budget_k"), ("method.target_bytes=0", "method.target_bytes"),
    ("method.name=nope", "method"), ("method.linear.k=1", "method.linear.k"), ("method.lnear.k=8", "method.lnear"),
    ("method.conv.block_size=0", "method.conv.block_size"), ("method.kmeans_iters=0", "method.kmeans_iters"),
    ("method.calibration_images=-5", "method.calibration_images"), ("method.kmeans_init=magic", "method.kmeans_init"),
    ("data.files={}", "data.files"), ("data.files={a.gz: xyz}", "data.files"), ("data.sources=[]", "data.sources"),
    ("data.name=imagenet", "data.name"), ("data.batch_size=0", "data.batch_size"),
    ("teacher.arch=resnet9000", "resnet9000"), ("teacher.epochs=0", "teacher.epochs"),
    ("teacher.arch=torchvision:mobilenet_v2", "does not take fashion-mnist's inputs (1x28x28)"),
    ("teacher.snapshots=[1.5]", "teacher.snapshots"), ("teacher.lr=-1", "teacher.lr"),
    ("teacher.batch_size=0", "teacher.batch_size"), ("teacher.weights_sha256=xyz", "teacher.weights_sha256"),
    ("finetune.epochs=-1", "finetune.epochs"), ("finetune.lr=0", "finetune.lr"), ("finetune.temperature=0", "finetune.temperature"),
    ("pack.codebook_dtype=i3", "pack.codebook_dtype"), ("pack.float_dtype=f8", "pack.float_dtype"),
    ("unknown_section={}", "unknown_section"), ("run.unknown=1", "run.unknown"),
]

BAD_METHODS = [
    (["method={name: prune, target_sparsity: 1.0}"], "method.target_sparsity"),
    (["method={name: kmeans, bits: 9}"], "method.bits"),
    (["method={name: uniform, bits: 0}"], "method.bits"),
    (["method.exclude=[no_such_layer]"], "'no_such_layer' matches no Conv2d/Linear layer"),
    (["method.overrides={features.0.0: {block_size: 7, k: 16}}"], "block size 7"),
    (["method={name: wfn, fractions: [0.5, 0.4, 1.0]}"], "strictly increasing"),
    (["method={name: wfn, fractions: [0.5, 0.9]}"], "end at 1.0"),
    (["method={name: wfn}", "pack.codebook_dtype=i8"], "codebook_dtype i8"),
    (["method={name: lc, mu0: 0}"], "mu0"),
    (["method={name: lc, mu_growth: 1.0}"], "mu_growth"),
    (["method={name: lc, tasks: [{layers: [nope*], scheme: binary}]}"], "'nope*' matches no Conv2d/Linear layer"),
    (["method={name: lc, tasks: [{scheme: binary}, {layers: [classifier.5], scheme: ternary}]}"], "claimed by task 1"),
    (["method={name: lc, tasks: [{layers: [classifier.5], scheme: lowrank, rank: 10}]}"], "not below its full rank 10"),
    (["method={name: lc, tasks: [{scheme: lowrank}]}"], "exactly one of rank"),
    (["method={name: prune_pq, prune: {target_sparsity: 0.9}, quantize: {block_size: 1, k: 1}}"], "method.quantize.k"),
]


@pytest.mark.parametrize(("setting", "needle"), BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting(cli, tmp_path, setting, needle):
    cli("run", "-S", _work(tmp_path), "-S", setting, needle=needle)


@pytest.mark.parametrize(("settings", "needle"), BAD_METHODS, ids=[s[0][:60] for s, _ in BAD_METHODS])
def test_bad_method_settings_fail_before_any_work(cli, tmp_path, settings, needle):
    argv = ["run", "-S", _work(tmp_path)]
    for s in settings:
        argv += ["-S", s]
    cli(*argv, needle=needle)


def test_cuda_on_a_machine_without_it(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli("run", "-S", _work(tmp_path), "-S", "run.device=cuda", needle="no CUDA device")


# ---- parameter files ----------------------------------------------------------------------------

BAD_FILES = [
    ("empty.yaml", b"", "empty"),
    ("twice.yaml", b"run:\n  name: a\nrun:\n  seed: 1\n", "given twice"),
    ("twice-inner.yaml", b"method:\n  kmeans_iters: 3\n  kmeans_iters: 4\n", "given twice"),
    ("list.yaml", b"- a\n- b\n", "expected a mapping"),
    ("broken.yaml", b"run: [unclosed\n", "not valid YAML"),
    ("binary.yaml", bytes(range(256)) * 4, "not a text file"),
    ("bad.json", b'{"run": {"seed": 1}', "not valid"),
    ("scalar.yaml", b"42\n", "expected a mapping"),
]


@pytest.mark.parametrize(("name", "content", "needle"), BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_bad_params_file(cli, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    cli("run", "--params", str(path), "-S", _work(tmp_path), needle=(needle, str(path)))


def test_params_file_missing(cli, tmp_path):
    cli("run", "--params", str(tmp_path / "nope.yaml"), needle=("nope.yaml",))


def test_params_file_is_a_directory(cli, tmp_path):
    cli("run", "--params", str(tmp_path), needle=(str(tmp_path),))


@pytest.mark.parametrize(("override", "needle"), [
    ("noequals", "noequals"), ("=1", "'=1'"), ("method.budget_k=[16, 32", "method.budget_k=[16"),
    ("run..name=x", "run..name"),
])
def test_bad_override_syntax(cli, tmp_path, override, needle):
    cli("run", "-S", _work(tmp_path), "-S", override, needle=needle)


# ---- data -----------------------------------------------------------------------------------------

def _source(tmp_path: Path, name: str = "src") -> Path:
    src = tmp_path / name
    src.mkdir()
    for f in FILES:
        shutil.copy(FMNIST / f, src / f)
    return src


def _fetch(cli, tmp_path, src, needle, *extra):
    return cli("stage", "fetch", "-S", _work(tmp_path), "-S", f"data.sources=[{src}]", *extra, needle=needle, fetching=True)


def test_data_wrong_checksum(cli, tmp_path, fmnist_available):
    src = _source(tmp_path)
    with gzip.open(src / FILES[3], "wb") as f:
        f.write(b"\x00" * 100)
    _fetch(cli, tmp_path, src, (FILES[3], "sha256"))


def test_data_file_missing(cli, tmp_path, fmnist_available):
    src = _source(tmp_path)
    (src / FILES[1]).unlink()
    _fetch(cli, tmp_path, src, FILES[1])


def test_data_source_directory_missing(cli, tmp_path):
    _fetch(cli, tmp_path, tmp_path / "nowhere", "nowhere")


def test_data_source_unreachable_url(cli, tmp_path):
    _fetch(cli, tmp_path, f"http://127.0.0.1:{_closed_port()}/data", "127.0.0.1")


def test_data_source_unknown_scheme(cli, tmp_path):
    _fetch(cli, tmp_path, "ftp://example.org/data", "ftp://")


def test_data_file_name_escapes_the_cache(cli, tmp_path):
    cli("stage", "fetch", "-S", _work(tmp_path), "-S", "data.files={../evil.gz: " + "0" * 64 + "}", needle="evil.gz",
        fetching=True)


def test_data_file_is_a_directory(cli, tmp_path, fmnist_available):
    src = _source(tmp_path)
    (src / FILES[0]).unlink()
    (src / FILES[0]).mkdir()
    _fetch(cli, tmp_path, src, FILES[0])


def test_data_files_of_another_dataset(cli, tmp_path, fmnist_available):
    src = _source(tmp_path)
    cli("stage", "fetch", "-S", _work(tmp_path), "-S", f"data.sources=[{src}]", "-S", "data.name=cifar10",
        needle=("data", "cifar10-train.npz"), fetching=True)


# ---- teacher weights ------------------------------------------------------------------------------

def _weights_case(cli, tmp_path, path, needle, *extra):
    return cli("run", "-S", _work(tmp_path), "-S", f"teacher.weights={path}", *extra, needle=needle)


def test_weights_missing(cli, tmp_path):
    _weights_case(cli, tmp_path, tmp_path / "nope.pt", ("teacher weights", "no such file"))


def test_weights_zero_bytes(cli, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    _weights_case(cli, tmp_path, tmp_path / "empty.pt", ("teacher weights", "empty.pt"))


def test_weights_random_bytes(cli, tmp_path):
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 40)
    _weights_case(cli, tmp_path, tmp_path / "noise.pt", ("teacher weights", "noise.pt"))


def test_weights_pickle_with_code_is_refused_and_not_run(cli, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    _weights_case(cli, tmp_path, tmp_path / "evil.pt", ("weights_only=True",))
    assert not marker.exists()


def test_weights_of_another_architecture(cli, tmp_path):
    torch.save(build_model("cifar_resnet20").state_dict(), tmp_path / "resnet.pt")
    _weights_case(cli, tmp_path, tmp_path / "resnet.pt", ("teacher weights", "do not fit"))


def test_weights_checksum_mismatch(cli, tmp_path):
    torch.save(build_model("fmnist_cnn").state_dict(), tmp_path / "w.pt")
    _weights_case(cli, tmp_path, tmp_path / "w.pt", ("sha256",), "-S", "teacher.weights_sha256=" + "0" * 64)


def test_weights_not_a_state_dict(cli, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _weights_case(cli, tmp_path, tmp_path / "list.pt", ("state dict",))


def test_weights_a_directory(cli, tmp_path):
    (tmp_path / "dir.pt").mkdir()
    _weights_case(cli, tmp_path, tmp_path / "dir.pt", ("teacher weights", "dir.pt"))


def test_weights_unknown_uri_scheme(cli, tmp_path):
    _weights_case(cli, tmp_path, "gopher://x/weights", ("gopher",))


def test_distill_from_weights_missing(cli, tmp_path):
    cli("run", "-S", _work(tmp_path), "-S", f"finetune.distill_from={{arch: fmnist_cnn, weights: {tmp_path / 'no.pt'}}}",
        needle="finetune.distill_from.weights")


# ---- packed files: inspect and evaluate -------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("packed") / "m.mpk"
    pack_model(build_model("fmnist_cnn"), path, ARCH, {})
    return path.read_bytes()


def _pickled() -> bytes:
    return pickle.dumps({"weights": [1, 2, 3]})


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", _pickled())
    return buf.getvalue()


BAD_PACKED = {
    "empty": lambda good: b"",
    "noise": lambda good: bytes(range(256)) * 16,
    "truncated-header": lambda good: good[:20],
    "truncated-payload": lambda good: good[:-100],
    "bad-magic": lambda good: b"NOTMPRES" + good[8:],
    "payload-flipped": lambda good: good[:-50] + bytes([good[-50] ^ 0xFF]) + good[-49:],
    "extra-bytes": lambda good: good + b"\x00" * 10,
    "a-pickle": lambda good: _pickled(),
    "a-torch-zip": lambda good: _zip(),
}


@pytest.mark.parametrize("command", ["inspect", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD_PACKED))
def test_bad_packed_file(cli, tmp_path, packed, command, case):
    path = tmp_path / f"{case}.mpk"
    path.write_bytes(BAD_PACKED[case](packed))
    cli(command, str(path), needle=(str(path),))


@pytest.mark.parametrize("command", ["inspect", "evaluate"])
def test_packed_file_missing_or_a_directory(cli, tmp_path, command):
    cli(command, str(tmp_path / "nope.mpk"), needle=("nope.mpk",))
    (tmp_path / "dir.mpk").mkdir()
    cli(command, str(tmp_path / "dir.mpk"), needle=("dir.mpk",))


# ---- sweeps -----------------------------------------------------------------------------------------

def _sweep(tmp_path: Path, content) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _root(tmp_path: Path) -> str:
    return str(tmp_path / "work")


BAD_SWEEPS = [
    ("empty", "", "empty"),
    ("no-points", {"name": "x"}, "at least one point"),
    ("duplicate", {"points": [{"name": "a"}, {"name": "a"}]}, "unique: a"),
    ("teacher-field", {"points": [{"name": "a", "set": {"teacher.epochs": 1}}]}, "teacher.epochs"),
    ("bad-field", {"points": [{"name": "bad", "set": {"method.name": "uniform", "method.bits": 9}}]}, "point bad: method.bits"),
    ("bad-layer", {"points": [{"name": "typo", "set": {"method.name": "kmeans", "method.exclude": ["no_such_layer"]}}]},
     "sweep point typo"),
    ("concurrency", {"budgets": [50000], "concurrency": 0}, "concurrency"),
    ("unknown-key", {"points": [{"name": "a"}], "colour": "red"}, "colour"),
    ("not-a-mapping", "- a\n- b\n", "mapping"),
]


@pytest.mark.parametrize(("case", "content", "needle"), BAD_SWEEPS, ids=[c for c, _, _ in BAD_SWEEPS])
def test_bad_sweep_file(cli, tmp_path, case, content, needle):
    if isinstance(content, dict):
        content = {"workdir": _root(tmp_path), **content}
    cli("sweep", str(_sweep(tmp_path, content)), needle=needle)


def test_sweep_file_missing(cli, tmp_path):
    cli("sweep", str(tmp_path / "nope.yaml"), needle="nope.yaml")


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_sweep_concurrency_argument(cli, tmp_path, value):
    sweep = _sweep(tmp_path, {"workdir": _root(tmp_path), "points": [{"name": "a", "set": {"method.name": "uniform"}}]})
    cli("sweep", str(sweep), "--concurrency", value, needle="--concurrency")


def test_sweep_in_use_by_another_run_of_it(cli, tmp_path):
    from modelpress.recipe import Recipe
    from modelpress.sweep import SweepConfig

    path = _sweep(tmp_path, {"name": "busy", "workdir": str(tmp_path / "busy"), "points": [{"name": "a", "set": {"method.name": "uniform"}}]})
    with SweepConfig.from_yaml(path, Recipe()).lock(wait=False):
        cli("sweep", str(path), needle=("sweep folder", "busy", "in use by another sweep (pid"))


# ---- environment: work directory ---------------------------------------------------------------------

def test_workdir_is_a_file(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    cli("run", "-S", f"run.workdir={tmp_path / 'afile'}", needle="afile")


def test_workdir_not_writable(cli, tmp_path):
    import os

    if os.geteuid() == 0:
        ro = Path("/proc/modelpress-not-writable")  # root may write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
    cli("run", "-S", f"run.workdir={ro / 'w'}", needle=str(ro))


def test_workdir_in_use_by_another_run(cli, tmp_path):
    from modelpress.atomic import workdir_lock

    busy = tmp_path / "busy"
    with workdir_lock(str(busy), wait=False):
        cli("run", "-S", f"run.workdir={busy}", needle="busy")


def test_tracking_store_that_cannot_be_written(cli, tmp_path, own_store):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = "sqlite:////proc/modelpress-nowhere/mlflow.db"  # own_store puts it back
    cli("run", "-S", _work(tmp_path), needle="MLFLOW_TRACKING_URI sqlite:////proc/modelpress-nowhere/mlflow.db")


# ---- registry --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "needle"), [
    (["models", "show"], "models show needs"),
    (["models", "show", "no-such-model"], "no-such-model"),
    (["models", "show", "no-such-model@champion"], "no-such-model"),
    (["models", "show", "no-such-model/notanumber"], "notanumber"),
    (["reproduce", "models:/"], "models:/"),
    (["reproduce", "no-such-model/1"], "no-such-model"),
])
def test_bad_registry_reference(cli, own_store, argv, needle):
    cli(*argv, needle=needle)


def test_catalog_size():
    """The catalog holds at least 120 cases (counted as pytest collects them)."""
    n = (len(BAD_SETTINGS) + len(BAD_METHODS) + 1 + len(BAD_FILES) + 2 + 4 + 8 + 10 + 2 * len(BAD_PACKED) + 2 * 2
         + len(BAD_SWEEPS) + 1 + 3 + 3 + 1 + 6)
    assert n >= 120, n
