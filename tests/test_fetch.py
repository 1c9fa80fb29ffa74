"""fetch_files against real local directories, loopback HTTP servers and a moto S3 server."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from modelpress.data import DATASET_INFO, ChecksumMismatch, FetchError, SourceUnavailable, fetch_files, sha256_file
from modelpress.data import fetch as fetch_module

from fixtures_servers import set_aws_env  # the fixtures come from conftest.py's pytest_plugins

pytestmark = pytest.mark.unit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


class Log(list):
    """A ``log`` callback that records its messages."""

    def __call__(self, message: str) -> None:
        self.append(message)

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


DATA = b"modelpress test payload\n" * 100
OTHER = b"\x00\x01\x02" * 500


# --- local sources -------------------------------------------------------------------


def test_local_source_fetches_then_uses_cache(tmp_path, cache):
    source = tmp_path / "src"
    write(source, "a.bin", DATA)
    write(source, "b.bin", OTHER)
    files = {"a.bin": sha(DATA), "b.bin": sha(OTHER)}

    log = Log()
    paths = fetch_files([str(source)], files, cache, log=log)
    assert paths == {"a.bin": cache / "a.bin", "b.bin": cache / "b.bin"}
    assert paths["a.bin"].read_bytes() == DATA and paths["b.bin"].read_bytes() == OTHER
    assert "a.bin: fetched from" in log.text()
    assert sorted(os.listdir(cache)) == ["a.bin", "b.bin"]

    for path in source.iterdir():
        path.unlink()
    log = Log()
    assert fetch_files([str(source)], files, cache, log=log) == paths
    assert log == ["a.bin: cached", "b.bin: cached"]


def test_file_url_source(tmp_path, cache):
    source = tmp_path / "src"
    write(source, "a.bin", DATA)
    paths = fetch_files([source.as_uri()], {"a.bin": sha(DATA)}, cache, log=Log())
    assert paths["a.bin"].read_bytes() == DATA


def test_wrong_checksum_raises_and_leaves_cache_empty(tmp_path, cache):
    write(tmp_path / "src", "a.bin", DATA)
    with pytest.raises(ChecksumMismatch, match=r"cannot fetch a\.bin: .*sha256 mismatch") as info:
        fetch_files([str(tmp_path / "src")], {"a.bin": sha(OTHER)}, cache, log=Log())
    assert "\n" not in str(info.value)
    assert os.listdir(cache) == []


def test_missing_file_raises_source_unavailable(tmp_path, cache):
    with pytest.raises(SourceUnavailable, match=r"cannot fetch a\.bin: .*a\.bin: no such file"):
        fetch_files([str(tmp_path / "empty")], {"a.bin": sha(DATA)}, cache, log=Log())
    assert os.listdir(cache) == []


def test_stale_cached_file_is_replaced(tmp_path, cache):
    write(tmp_path / "src", "a.bin", DATA)
    write(cache, "a.bin", b"stale")
    log = Log()
    path = fetch_files([str(tmp_path / "src")], {"a.bin": sha(DATA)}, cache, log=log)["a.bin"]
    assert path.read_bytes() == DATA
    assert "wrong sha256, fetching again" in log.text()
    assert os.listdir(cache) == ["a.bin"]


def test_mixed_failures_raise_source_unavailable_listing_every_source(tmp_path, cache):
    write(tmp_path / "wrong", "a.bin", OTHER)
    sources = [str(tmp_path / "wrong"), str(tmp_path / "missing")]
    with pytest.raises(SourceUnavailable) as info:
        fetch_files(sources, {"a.bin": sha(DATA)}, cache, log=Log())
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path / 'wrong' / 'a.bin'}: sha256 mismatch" in message
    assert f"{tmp_path / 'missing' / 'a.bin'}: no such file" in message


def test_interrupt_mid_download_leaves_no_partial(tmp_path, cache, monkeypatch):
    write(tmp_path / "src", "a.bin", DATA)
    monkeypatch.setattr(fetch_module, "PROGRESS_MIN_BYTES", 0)

    def interrupting_log(message):
        if "bytes (" in message:  # a progress line: the partial file holds data now
            assert any(name.startswith(".partial-a.bin") for name in os.listdir(cache))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch_files([str(tmp_path / "src")], {"a.bin": sha(DATA)}, cache, log=interrupting_log)
    assert os.listdir(cache) == []


def test_progress_is_logged_every_quarter(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(fetch_module, "PROGRESS_MIN_BYTES", 1000)
    monkeypatch.setattr(fetch_module, "CHUNK_SIZE", 100)
    data = bytes(range(256)) * 8  # 2048 bytes in 21 chunks
    write(tmp_path / "src", "a.bin", data)
    log = Log()
    fetch_files([str(tmp_path / "src")], {"a.bin": sha(data)}, cache, log=log)
    assert [m for m in log if "bytes (" in m] == [
        "a.bin: 600/2048 bytes (29%)",
        "a.bin: 1100/2048 bytes (53%)",
        "a.bin: 1600/2048 bytes (78%)",
        "a.bin: 2048/2048 bytes (100%)",
    ]


@pytest.mark.parametrize(
    "sources, files, expected",
    [
        ([], {"a": "0" * 64}, "sources must be a non-empty list"),
        ("/some/dir", {"a": "0" * 64}, "'/some/dir'"),
        (["/d"], {}, "files must be a non-empty dict"),
        (["/d"], {"a": "abc"}, "invalid sha256 'abc' for a"),
        (["/d"], {"a": "g" * 64}, "invalid sha256"),
        (["/d"], {"../a": "0" * 64}, "invalid file name '../a'"),
        (["ftp://host/dir"], {"a": "0" * 64}, "unknown URL scheme 'ftp' in source 'ftp://host/dir'"),
        (["s3:///prefix"], {"a": "0" * 64}, "names no bucket"),
    ],
)
def test_invalid_arguments(tmp_path, sources, files, expected):
    with pytest.raises(FetchError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        fetch_files(sources, files, tmp_path / "cache", log=Log())


# --- HTTP ----------------------------------------------------------------------------


def test_http_source(http_root, cache):
    url, root = http_root
    write(root, "a.bin", DATA)
    assert fetch_files([url], {"a.bin": sha(DATA)}, cache, log=Log())["a.bin"].read_bytes() == DATA


def test_unreachable_http_fails_fast(closed_port, cache):
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=rf"cannot fetch a\.bin: http://127\.0\.0\.1:{closed_port}/a\.bin: connection refused"):
        fetch_files([f"http://127.0.0.1:{closed_port}"], {"a.bin": sha(DATA)}, cache, log=Log())
    assert time.monotonic() - start < 5
    assert os.listdir(cache) == []


def test_http_404(http_root, cache):
    url, _ = http_root
    with pytest.raises(SourceUnavailable, match=r"a\.bin: HTTP 404"):
        fetch_files([url], {"a.bin": sha(DATA)}, cache, log=Log())


def test_fallback_to_http_after_missing_and_wrong_sources(tmp_path, http_root, cache):
    url, root = http_root
    write(root, "a.bin", DATA)
    write(tmp_path / "wrong", "a.bin", OTHER)
    log = Log()
    sources = [str(tmp_path / "missing"), str(tmp_path / "wrong"), url]
    path = fetch_files(sources, {"a.bin": sha(DATA)}, cache, log=log)["a.bin"]
    assert path.read_bytes() == DATA
    assert "no such file" in log.text() and "sha256 mismatch" in log.text()
    assert f"a.bin: fetched from {url}/a.bin" in log
    assert os.listdir(cache) == ["a.bin"]


def test_truncated_http_download_leaves_no_partial(truncating_http_root, cache):
    url, root = truncating_http_root
    write(root, "a.bin", DATA)
    with pytest.raises(SourceUnavailable, match=rf"truncated download: got {len(DATA)} of {2 * len(DATA)} bytes"):
        fetch_files([url], {"a.bin": sha(DATA)}, cache, log=Log())
    assert os.listdir(cache) == []


# --- S3 (moto server on loopback) ----------------------------------------------------


def test_s3_source(s3_env, cache):
    s3_env.create_bucket(Bucket="models")
    s3_env.put_object(Bucket="models", Key="data/v1/a.bin", Body=DATA)
    log = Log()
    path = fetch_files(["s3://models/data/v1/"], {"a.bin": sha(DATA)}, cache, log=log)["a.bin"]
    assert path.read_bytes() == DATA
    assert "a.bin: fetched from s3://models/data/v1/a.bin" in log


def test_s3_missing_bucket(s3_env, cache):
    with pytest.raises(SourceUnavailable, match=r"s3://no-such-bucket/a\.bin: no such bucket 'no-such-bucket'"):
        fetch_files(["s3://no-such-bucket"], {"a.bin": sha(DATA)}, cache, log=Log())
    assert os.listdir(cache) == []


def test_s3_missing_key(s3_env, cache):
    s3_env.create_bucket(Bucket="empty")
    with pytest.raises(SourceUnavailable, match=r"no such key 'p/a\.bin' in bucket 'empty'"):
        fetch_files(["s3://empty/p"], {"a.bin": sha(DATA)}, cache, log=Log())


def test_s3_unreachable_endpoint_fails_fast(monkeypatch, tmp_path, closed_port, cache):
    set_aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port}")
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"s3://bucket/a\.bin: Could not connect"):
        fetch_files(["s3://bucket"], {"a.bin": sha(DATA)}, cache, log=Log())
    assert time.monotonic() - start < 10


# --- real data -----------------------------------------------------------------------


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fetch_real_fashion_mnist_labels(cache):
    name = "t10k-labels-idx1-ubyte.gz"
    expected = DATASET_INFO["fashion-mnist"]["files"][name]
    path = fetch_files([str(FASHION_DIR)], {name: expected}, cache, log=Log())[name]
    assert sha256_file(path) == expected
    assert path.stat().st_size == (FASHION_DIR / name).stat().st_size
