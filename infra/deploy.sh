#!/usr/bin/env bash
# Create or update the deployments (nightly on a cron schedule, on-demand) on the work pool.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api infra/deploy.sh [--pool gpu] [--cron "0 2 * * *"]
#        [--timezone UTC] [--source DIR|GIT-URL] [--params FILE]     (see flows/deploy.py)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
# From the caller's directory: a relative --params names a file there.
exec "$ROOT/.venv/bin/python" -m modelpress.flows.deploy "$@"
