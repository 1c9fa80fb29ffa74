#!/usr/bin/env bash
# A Prefect worker for the GPU work pool (process type), one flow run at a time.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api infra/prefect-worker.sh [POOL]   (Ctrl-C stops it)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
POOL="${1:-${MODELPRESS_POOL:-gpu}}"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
cd "$ROOT"
"$ROOT/.venv/bin/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$ROOT/.venv/bin/prefect" work-pool create "$POOL" --type process
exec "$ROOT/.venv/bin/prefect" worker start --pool "$POOL" --limit 1
