#!/usr/bin/env bash
# Submit a defectflow command as a Ray job.  Example:
#   cluster/submit.sh train --config workflows/configs/gmbinet_sd900.yaml
# RAY_ADDRESS defaults to the local head (http://127.0.0.1:8265).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RAY="${RAY:-$(command -v ray || echo .venv/bin/ray)}"
exec "$RAY" job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m workflows.cli "$@"
