#!/usr/bin/env bash
# Start a local Ray head node from the project's venv so job entrypoints find `python` and `defectflow`.
# Usage: cluster/local-head.sh [num_cpus]        Stop it with: .venv/bin/ray stop
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/ray" ] || { echo "no $VENV: run 'make install' first" >&2; exit 2; }
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_V2_ENABLED=1
ray start --head --num-cpus="${1:-$(nproc)}" --dashboard-host=127.0.0.1 --disable-usage-stats
echo "Jobs API: http://127.0.0.1:8265   (clients: export RAY_ADDRESS=http://127.0.0.1:8265)"
echo "If token auth is on (Ray 2.60 default once ~/.ray/auth_token exists), clients need RAY_AUTH_MODE=token."
