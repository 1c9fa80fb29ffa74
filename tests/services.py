"""Start the real services (infra/*.sh) as subprocesses on free loopback ports, each in its own
process group, and stop them so that no process is left (checked with psutil)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STOP_GRACE_S = 20.0  # how long a service may take to stop after one SIGTERM (infra/README.md)


def need_binaries() -> None:
    """Skip the test when the services' executables are not installed."""
    import shutil
    import sys

    for exe in ("prefect", "mlflow", "moto_server", "dvc"):
        if not (Path(sys.executable).parent / exe).is_file():
            pytest.skip(f"{exe} is not installed in the virtual environment")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


class Service:
    """One infra command running in its own session (process group), output to a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path = REPO,
                 background: bool = False):
        """``background``: start it as a non-interactive shell starts ``cmd &`` (SIGINT ignored),
        the way a script or supervisor without job control does."""
        self.name, self.cmd = name, cmd
        self.log = log_dir / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ignore_sigint)
        self.pgid = self.proc.pid
        self.seen: set[int] = {self.proc.pid}
        self.problems: list[str] = []   # what went wrong when stopping it (see stop)
        self.stop_s: float | None = None  # seconds from SIGTERM until all its processes were gone

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._track()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def _track(self) -> None:
        """Remember every descendant (some start their own session, e.g. flow-run processes)."""
        try:
            self.seen.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def processes(self) -> list[psutil.Process]:
        """Live processes of this service: its process group and every descendant seen."""
        self._track()
        alive = []
        for pid in set(self.seen) | {p.pid for p in psutil.process_iter() if _pgid(p.pid) == self.pgid}:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole tree at once (a machine loss when SIGKILL)."""
        for p in self.processes():
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)

    def stop(self, grace: float = STOP_GRACE_S) -> list[str]:
        """One SIGTERM to the service's main process (what `docker stop`, systemd or `kill PID`
        send); every process of the service must be gone within ``grace`` seconds. A service that
        ignores it, or leaves processes behind, is recorded in ``problems`` (and so reported by
        ``Stack.close``) before the rest is SIGKILLed: a silent SIGKILL would hide the fault."""
        procs = self.processes()
        t0 = time.monotonic()
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, left = psutil.wait_procs(procs, timeout=grace)
        if not left:
            self.stop_s = time.monotonic() - t0
        elif self.proc.poll() is None:
            self.problems.append(f"{self.name}: ignored SIGTERM for {grace:.0f} s (pid {self.proc.pid}), SIGKILLed")
        else:
            self.problems.append(f"{self.name}: processes left {grace:.0f} s after SIGTERM, SIGKILLed: "
                                 + ", ".join(_describe(p) for p in left))
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.problems


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} {' '.join(p.cmdline()[:4])}"
    except psutil.Error:
        return f"pid {p.pid}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Stack:
    """The services of one test; ``close()`` stops them all and reports any process left."""

    def __init__(self, root: Path, background: bool = False):
        """``background``: start every service as ``cmd &`` would (see Service)."""
        self.root, self.background = root, background
        self.logs = root / "logs"
        self.services: list[Service] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
        self.env.update(AWS, PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def start(self, name: str, cmd: list[str], env: dict | None = None, cwd: Path = REPO,
              background: bool | None = None) -> Service:
        """``background``: this service only (default: the stack's)."""
        background = self.background if background is None else background
        svc = Service(name, cmd, {**self.env, **(env or {})}, self.logs, cwd, background=background)
        self.services.append(svc)
        return svc

    def s3(self, bucket: str = "modelpress") -> str:
        port = free_port()
        svc = self.start("s3", [str(INFRA / "s3-server.sh"), str(port), bucket])
        svc.wait_ready(lambda: "S3 endpoint" in svc.tail(), 60)
        return f"http://127.0.0.1:{port}"

    def mlflow(self, s3_endpoint: str, artifacts: str) -> str:
        port = free_port()
        env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_ARTIFACTS": artifacts,
               "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{self.root}/mlflow.db"}
        svc = self.start("mlflow", [str(INFRA / "mlflow-server.sh"), str(port)], env)
        url = f"http://127.0.0.1:{port}"
        svc.wait_ready(lambda: http_ok(url + "/health"), 120)
        return url

    def prefect(self, port: int | None = None, name: str = "prefect-server") -> str:
        """A Prefect server (database and leases in this stack's PREFECT_HOME); ``port``: restart
        one on the port of a stopped one."""
        port = port or free_port()
        svc = self.start(name, [str(INFRA / "prefect-server.sh"), str(port)])
        url = f"http://127.0.0.1:{port}/api"
        svc.wait_ready(lambda: http_ok(url + "/health"), 150)
        return url

    def worker(self, api_url: str, pool: str, env: dict | None = None, name: str = "prefect-worker",
               background: bool | None = None) -> Service:
        svc = self.start(name, [str(INFRA / "prefect-worker.sh"), pool], {"PREFECT_API_URL": api_url, **(env or {})},
                         background=background)
        svc.wait_ready(lambda: "started!" in svc.tail(20000), 90)
        return svc

    def leftovers(self, since: int = 0) -> list[str]:
        return [f"{s.name}: pid {p.pid} {' '.join(p.cmdline()[:4])}" for s in self.services[since:] for p in _safe(s.processes)]

    def close(self, since: int = 0) -> list[str]:
        """Stop every service (last started first), or those started after the first ``since``;
        returns what went wrong: services that ignored SIGTERM or left processes behind, and any
        process of theirs still alive. Empty: all clean."""
        problems = []
        for svc in reversed(self.services[since:]):
            if svc.proc.poll() is None or svc.processes():
                problems += svc.stop()
        return problems + self.leftovers(since)


def _safe(fn):
    try:
        return fn()
    except psutil.Error:
        return []
