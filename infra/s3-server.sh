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
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.2; done
"$VENV/python" - "$PORT" "$BUCKET" <<'PY'
import sys, boto3
port, bucket = sys.argv[1:]
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=bucket)
print(f"S3 endpoint http://127.0.0.1:{port}, bucket s3://{bucket} (AWS_ENDPOINT_URL=http://127.0.0.1:{port})", flush=True)
PY
wait $server
