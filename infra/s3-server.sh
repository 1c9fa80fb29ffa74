#!/usr/bin/env bash
# An S3-compatible server on loopback (moto), for development and tests; in-memory state.
# Usage: infra/s3-server.sh [PORT] [BUCKET]   (Ctrl-C stops it)
set -euo pipefail
PORT="${1:-${S3_PORT:-9000}}"
BUCKET="${2:-${S3_BUCKET:-modelpress}}"
VENV="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}" AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
"$VENV/moto_server" -H 127.0.0.1 -p "$PORT" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
# Ready when our server answers: one that exits (the port taken, by another S3 server too) or never
# answers fails here with one line, instead of a bucket made in someone else's server.
"$VENV/python" - "$PORT" "$BUCKET" "$server" <<'PY' || exit 1
import os, sys, time, urllib.request
import boto3
port, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = f"http://127.0.0.1:{port}"
for _ in range(100):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"s3-server.sh: moto_server exited before it answered: is port {port} in use?")
    try:
        urllib.request.urlopen(url + "/", timeout=1)
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit(f"s3-server.sh: no S3 server answered on {url} within 20 s")
time.sleep(0.3)
try:
    os.kill(pid, 0)  # answered, but is it ours? (another server on the port answers while ours exits)
except OSError:
    sys.exit(f"s3-server.sh: moto_server exited: is port {port} in use?")
try:
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
except Exception as e:  # noqa: BLE001 - e.g. an invalid bucket name: one line
    sys.exit(f"s3-server.sh: bucket {bucket!r}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
print(f"S3 endpoint {url}, bucket s3://{bucket} (AWS_ENDPOINT_URL={url})", flush=True)
PY
wait $server
