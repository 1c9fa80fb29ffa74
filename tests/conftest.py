"""Shared fixtures: real Fashion-MNIST, a quickly trained real teacher, one Prefect server and
one MLflow store per test session (the server only when pipeline tests run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import FMNIST, SLOW, tiny_recipe

# Server fixtures (loopback HTTP, moto S3) for every module that asks for them by name.
pytest_plugins = ["fixtures_servers"]

# Under pytest-xdist (`-n N`, as .ci/run runs the slow tiers) the workers share the machine's
# cores: one intra-op thread each, inherited by every command a test starts. Torch reads these
# when it is first imported, which no module does before this file.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


# Test tiers: every test module (or test) is marked with one of these. `make test-fast` runs
# the unit tier (no server, no subprocess, seconds in all); `make test` runs every tier, unit first.
TIERS = ("unit", "pipeline", "services")
# Started first under -n (see pytest_collection_modifyitems): the three longest tests (about 5 min
# each on 2 cores), then the services tier, then the pipeline modules whose tests take minutes each.
LONGEST = {"test_end_to_end_deployment_run_on_worker_registers_in_mlflow_and_pushes_dvc", "test_readme_run_on_clean_clone",
           "test_killed_once_in_every_stage_then_byte_identical_and_registered_once"}
LONG_MODULES = {"test_kill_campaign.py", "test_sweep.py", "test_signals.py", "test_prune_pipeline.py", "test_registry.py"}


def pytest_addoption(parser):
    parser.addoption("--tier", action="append", choices=TIERS, default=[],
                     help="run only the tests of these tiers (repeatable); default: all")


def pytest_collection_modifyitems(config, items):
    unmarked, keep, drop = [], [], []
    wanted = set(config.getoption("--tier"))
    for item in items:
        marks = [m.name for m in item.iter_markers() if m.name in TIERS]
        if not marks:
            unmarked.append(item.nodeid)
            continue
        tier = marks[0]  # the closest: a test's own mark before its module's
        (keep if not wanted or tier in wanted else drop).append(item)
    if unmarked:
        raise pytest.UsageError("tests without a tier mark (unit, pipeline or services): " + ", ".join(unmarked[:10]))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # Longest first, so that under pytest-xdist no worker starts a five-minute test near the end:
    # the services tier, then the modules of the pipeline tier that kill and resume whole runs.
    def rank(item) -> int:
        if item.originalname in LONGEST:
            return 0
        tier = next(m.name for m in item.iter_markers() if m.name in TIERS)
        if tier == "services":
            return 1
        return 2 if item.path.name in LONG_MODULES else 3 + TIERS.index(tier)

    items.sort(key=rank)  # stable: the order within a rank is the collection order


@pytest.fixture(scope="session", autouse=True)
def _isolated_stores(tmp_path_factory):
    """Keep MLflow and Prefect state of the test session out of the user's home and repo."""
    root = tmp_path_factory.mktemp("stores")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield


@pytest.fixture
def own_store(tmp_path):
    """A tracking store of this test's own. MLflow's set_tracking_uri/set_registry_uri (which the
    product calls) also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into os.environ: both the
    process-wide URIs and those variables are put back after the test, or every later test and
    the subprocesses it starts would talk to this test's store."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {n: os.environ.get(n) for n in names}
    uris = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    yield uri
    mlflow.set_tracking_uri(uris[0])
    mlflow.set_registry_uri(uris[1])
    for n, v in env.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


SHARED_API = "MODELPRESS_TEST_PREFECT_API"  # the controller's server, for every xdist worker


def _wants_pipeline(tiers) -> bool:
    return not tiers or "pipeline" in tiers


def pytest_configure(config):
    """Under pytest-xdist the controller starts the session's one Prefect server before the
    workers exist (they inherit its address), rather than one server per worker."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        return
    if not _wants_pipeline(config.getoption("--tier")) or config.getoption("collectonly"):
        return
    import tempfile

    from services import Stack

    stack = Stack(Path(tempfile.mkdtemp(prefix="modelpress-test-prefect-")))
    os.environ[SHARED_API] = stack.prefect()
    config._modelpress_stack = stack


def pytest_unconfigure(config):
    stack = getattr(config, "_modelpress_stack", None)
    if stack is not None:
        os.environ.pop(SHARED_API, None)
        left = stack.close()
        shutil.rmtree(stack.root, ignore_errors=True)
        assert not left, f"stopping the session's Prefect server: {left}"


@pytest.fixture(scope="session", autouse=True)
def _prefect_server(request, _isolated_stores, tmp_path_factory):
    """One real Prefect server (infra/prefect-server.sh) for the session's pipeline tier, as a
    team runs one: every `modelpress run` and `sweep` a test starts connects to it
    (PREFECT_API_URL) instead of starting Prefect's temporary server, about 25 s each. Under
    pytest-xdist it is the controller's (pytest_configure above), shared by every worker. The
    tests of the command on a machine with no server (the clean clone, the signal tests) remove
    the variable; the services tests start servers of their own."""
    wanted = {m.name for item in request.session.items for m in item.iter_markers() if m.name in TIERS}
    if "pipeline" not in wanted:  # (the services tests start servers of their own)
        yield None
        return
    shared = os.environ.get(SHARED_API)
    stack = None
    if shared:
        api = shared
    else:
        from services import Stack

        stack = Stack(tmp_path_factory.mktemp("session-prefect"))
        api = stack.prefect()
    os.environ["PREFECT_API_URL"] = api
    yield api
    import sys

    if "prefect" in sys.modules:  # this process's logs and events reach the server before it stops
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    os.environ.pop("PREFECT_API_URL", None)
    if stack is not None:
        left = stack.close()
        assert not left, f"stopping the session's Prefect server: {left}"


@pytest.fixture(autouse=True)
def _session_store_kept():
    """A test that points MLflow elsewhere in this process must put it back (mlflow.set_tracking_uri
    also writes os.environ, which every later subprocess inherits): checked after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "the test left MLFLOW_TRACKING_URI changed"
    assert os.environ.get("MLFLOW_REGISTRY_URI") in (None, before), "the test left MLFLOW_REGISTRY_URI changed"


@pytest.fixture(scope="session")
def fmnist_available():
    if not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test session, shared by every pytest-xdist
    worker (the first one to ask builds it under a file lock; the others wait, then read it).
    Tests must treat it as read-only: copy it before changing anything."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a worker that failed half way
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, fmnist_available) -> Path:
    """A workdir holding the fetched data set and a (briefly) trained real teacher; read-only."""
    from modelpress import stages

    def build(work: Path) -> None:
        recipe = tiny_recipe(work)
        stages.fetch(recipe)
        stages.teacher(recipe)

    return built_once(tmp_path_factory, "trained", build)


@pytest.fixture(scope="session")
def slow_reference(tmp_path_factory, trained_workdir) -> Path:
    """The trained workdir after an uninterrupted PQ compression with the SLOW settings: what a
    run stopped in the layer loop must end with once resumed; read-only."""
    from modelpress import stages

    def build(work: Path) -> None:
        shutil.copytree(trained_workdir, work, dirs_exist_ok=True)
        stages.compress_stage(tiny_recipe(work, method=SLOW))

    return built_once(tmp_path_factory, "slow-reference", build)


@pytest.fixture
def workdir(trained_workdir, tmp_path) -> Path:
    """A fresh copy of the trained workdir for one test."""
    dst = tmp_path / "work"
    shutil.copytree(trained_workdir, dst)
    return dst


@pytest.fixture(scope="session")
def prefect_server(_prefect_server):
    """The session's Prefect server for flows run in this process (tests/conftest.py
    _prefect_server): PREFECT_API_URL may have been read before it was set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: _prefect_server}):
        yield _prefect_server


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two threads make small
    ops 10-100x slower (spinning workers). Modules opt in with usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data(fmnist_available):
    """Real Fashion-MNIST (train, test), normalised."""
    from modelpress.data import load_fashion_mnist

    return load_fashion_mnist(FMNIST)


@pytest.fixture(scope="session")
def trained(data):
    """fmnist_cnn after one pass over 6,000 real training images (0.1 epoch of the full set).
    Shared: tests must copy it before changing it."""
    import torch

    from modelpress.models import build_model
    from modelpress.train import loader, train_classifier

    train, _ = data
    torch.manual_seed(0)
    model = build_model("fmnist_cnn")
    subset = torch.utils.data.Subset(train, range(6000))
    train_classifier(model, loader(subset, 128, True), epochs=1.0, lr=0.05, optimizer="sgd")
    return model.eval()
