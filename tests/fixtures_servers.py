"""Loopback servers: for fetch tests a static HTTP server, a truncating one, and moto S3; for the
operations tests one real Prefect server (infra/prefect-server.sh) that they share.

conftest.py registers this module as a plugin (``pytest_plugins``): a test asks for a fixture by
name; ``set_aws_env`` is a plain helper (``from fixtures_servers import set_aws_env``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services import Stack, need_binaries


class QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files from ``directory`` without logging each request to stderr."""

    def log_message(self, format, *args):
        pass


class TruncatingFileHandler(QuietFileHandler):
    """Announces twice the file's length, sends the file once, then closes the connection."""

    def do_GET(self):
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


@contextlib.contextmanager
def serve_http(directory: Path, handler_class=QuietFileHandler):
    """Serve ``directory`` on a random loopback port in a thread; yield the base URL."""
    handler = functools.partial(handler_class, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_root(tmp_path):
    """(base URL, directory): an HTTP server serving a fresh empty directory."""
    directory = tmp_path / "http-root"
    directory.mkdir()
    with serve_http(directory) as url:
        yield url, directory


@pytest.fixture
def truncating_http_root(tmp_path):
    """(base URL, directory): like ``http_root`` but every response is cut short."""
    directory = tmp_path / "truncating-root"
    directory.mkdir()
    with serve_http(directory, TruncatingFileHandler) as url:
        yield url, directory


@pytest.fixture
def closed_port() -> int:
    """A loopback TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """URL of a moto S3 server on loopback, shared by the tests of one module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    """Point the standard AWS environment at the moto server; return a boto3 S3 client."""
    import boto3

    set_aws_env(monkeypatch, tmp_path, moto_endpoint)
    return boto3.client("s3")


def set_aws_env(monkeypatch, tmp_path: Path, endpoint: str) -> None:
    """Isolate boto3 from the user's AWS config and send it to ``endpoint`` with test credentials."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    """(API URL, Stack): one real Prefect server for the tests that neither stop nor kill it
    (tests/test_orchestration.py, tests/test_operations.py). Each such test carries
    ``xdist_group("prefect-server")``, so that one pytest-xdist worker runs them all, one after the
    other, and the server starts once: about 15 CPU-seconds, and 1 per 15 s idle, for each server
    saved. A test that starts workers asks for ``on_prefect_stack`` instead."""
    need_binaries()
    stack = Stack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        yield stack.prefect(), stack
    finally:
        left = stack.close()
    assert left == [], f"processes left after stopping the services: {left}"


@pytest.fixture
def on_prefect_stack(prefect_stack, request):
    """(API URL, Stack, work pool): the shared server with a work pool of this test's own, so that
    no run, worker or crashed-run rescheduling of one test meets another's; the services the test
    starts (workers) are stopped after it, and each must stop on one SIGTERM leaving no process."""
    api, stack = prefect_stack
    first, logs = len(stack.services), stack.logs
    pool = "gpu-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    stack.logs = logs / pool  # the test's own service logs (a worker's log is searched for messages)
    try:
        yield api, stack, pool
    finally:
        left = stack.close(since=first)
        del stack.services[first:]
        stack.logs = logs
    assert left == [], f"stopping this test's services: {left}"
