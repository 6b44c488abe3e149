#!/usr/bin/env bash
# Start, check or stop one local Ray head node, from the project's venv so job entrypoints find `python` and
# `defectflow`. Other Ray instances on the host are left alone (do not use `ray stop`: it stops all of them).
#
#   cluster/local-head.sh [start] [--num-cpus N] [--port P] [--dashboard-port P] [--dashboard-agent-listen-port P]
#                         [--dashboard-agent-grpc-port P] [--runtime-env-agent-port P] [--ray-client-server-port P]
#                         [--metrics-export-port P] [--temp-dir DIR] [--auth token|disabled] [-- RAY_START_ARGS]
#   cluster/local-head.sh status [--temp-dir DIR]
#   cluster/local-head.sh stop   [--temp-dir DIR]
#
# A port is a number or `auto` (a free one); unset, Ray's default is used when free and a free port otherwise.
# The temp dir (default /tmp/defectflow-head, or DEFECTFLOW_HEAD_DIR) holds the head's logs and its state, which
# cluster/submit.sh reads to find it. `start` runs a test job through the Jobs API before reporting success and prints
# the addresses to use. Details: cluster/local_head.py, cluster/README.md.
set -euo pipefail
export DEFECTFLOW_CALLER_CWD="$PWD"
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/ray" ] || { echo "error: no $VENV with Ray: run 'make install' first" >&2; exit 2; }
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export RAY="$VENV/bin/ray" RAY_USAGE_STATS_ENABLED=0
exec python cluster/local_head.py "$@"
