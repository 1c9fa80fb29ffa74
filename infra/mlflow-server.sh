#!/usr/bin/env bash
# MLflow tracking server + model registry: a database backend (sqlite here; Postgres in
# production, see infra/README.md) and artifacts proxied to S3.
# Usage: infra/mlflow-server.sh [PORT]   (Ctrl-C stops it)
#   MLFLOW_BACKEND_STORE_URI  default sqlite:///<repo>/.state/mlflow/mlflow.db
#   MLFLOW_HOST               default 127.0.0.1 (0.0.0.0 in a container, see infra/docker/compose.prod.yaml)
#   MLFLOW_ARTIFACTS          default s3://modelpress/mlflow (needs MLFLOW_S3_ENDPOINT_URL + AWS keys
#                             for the server only); a local path also works
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false (MLflow's server-side jobs; modelpress uses none)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${1:-${MLFLOW_PORT:-5000}}"
mkdir -p "$ROOT/.state/mlflow"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$ROOT/.state/mlflow/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-s3://modelpress/mlflow}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
# MLflow 3 also starts a job runner and seven huey consumers (GenAI jobs, trace rollups), about
# 230 MB RSS each: 2.4 GB for a registry that never uses them. Off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# An S3 artifact store the server cannot reach (no endpoint, no credentials, no bucket) would fail
# the first registration, after a whole compression run: say so now, and do not start.
if [[ "$ARTIFACTS" == s3://* ]]; then
  "$ROOT/.venv/bin/python" - "$ARTIFACTS" <<'PY' || exit 2
import os, sys
import boto3
from botocore.config import Config
uri = sys.argv[1]
bucket = uri[len("s3://"):].split("/")[0]
endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
verify = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() not in ("1", "true")
try:
    s3 = boto3.client("s3", endpoint_url=endpoint, verify=verify,
                      config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    s3.head_bucket(Bucket=bucket)
except Exception as e:  # noqa: BLE001 - any failure: one line naming the store and what to set
    if getattr(e, "response", {}).get("Error", {}).get("Code") in ("403", "AccessDenied"):
        # Reached, but not allowed to list the bucket: a policy scoped to a prefix may still let MLflow write.
        print(f"mlflow-server.sh: warning: artifact store {uri}: no permission to list bucket {bucket!r}; "
              "starting anyway", file=sys.stderr)
        sys.exit(0)
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    sys.exit(f"mlflow-server.sh: artifact store {uri}: bucket {bucket!r} not reachable at {endpoint or 'AWS'} ({why}); "
             "set MLFLOW_S3_ENDPOINT_URL and AWS credentials, or MLFLOW_ARTIFACTS to a local folder")
PY
fi
echo "MLflow on http://$HOST:$PORT (clients: MLFLOW_TRACKING_URI=http://$HOST:$PORT), backend $BACKEND, artifacts $ARTIFACTS"
exec env --default-signal=INT "$ROOT/.venv/bin/mlflow" server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --workers 1
