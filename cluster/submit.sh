#!/usr/bin/env bash
# Submit a defectflow command as a Ray job, and follow its logs:
#   cluster/submit.sh [RAY_JOB_SUBMIT_OPTIONS --] <command> [args...]
#   cluster/submit.sh train --config workflows/configs/gmbinet_sd900.yaml --set optim.epochs=5
#   cluster/submit.sh --no-wait --submission-id sd900-1 -- train --config workflows/configs/gmbinet_sd900.yaml
#
# The job runs `python -m workflows.cli <command> ...` with this checkout as its working dir (so --config paths are
# relative to the repository root) and cluster/runtime_env.yaml. Relative local paths in the command and in configs
# (storage.root, data.manifest, --out, ...) mean the directory you run this from: it reaches the job as
# DEFECTFLOW_WORKDIR. That is right for a local head or a filesystem shared by every node; on a remote cluster give
# s3:// URIs or absolute paths every node can reach.
#
# Environment:
#   RAY_ADDRESS             Jobs API of the cluster. Default: the head cluster/local-head.sh started (its state in
#                           DEFECTFLOW_HEAD_DIR, default /tmp/defectflow-head), else http://127.0.0.1:8265.
#   RAY_AUTH_MODE           token | disabled. Default: that local head's mode; otherwise token when a token exists
#                           (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else disabled.
#   DEFECTFLOW_WORKDIR      directory relative paths resolve against (default: $PWD).
#   DEFECTFLOW_RUNTIME_ENV  runtime_env YAML (default: cluster/runtime_env.yaml).
set -euo pipefail
usage() { sed -n '2,4p' "$0" | sed 's/^# //' >&2; exit 2; }
[ $# -gt 0 ] || usage

WORKDIR="${DEFECTFLOW_WORKDIR:-$PWD}"
case "$WORKDIR" in /*) ;; *) WORKDIR="$PWD/$WORKDIR" ;; esac
RUNTIME_ENV="${DEFECTFLOW_RUNTIME_ENV:-}"
if [ -n "$RUNTIME_ENV" ]; then
  case "$RUNTIME_ENV" in /*) ;; *) RUNTIME_ENV="$PWD/$RUNTIME_ENV" ;; esac
fi
cd "$(dirname "$0")/.."
RUNTIME_ENV="${RUNTIME_ENV:-$PWD/cluster/runtime_env.yaml}"
if [ -z "${RAY:-}" ]; then
  if [ -x .venv/bin/ray ]; then RAY=.venv/bin/ray; else RAY="$(command -v ray || true)"; fi
fi
[ -n "$RAY" ] || { echo "error: no ray CLI: run 'make install' or set RAY" >&2; exit 2; }
PY="${PYTHON:-$(dirname "$RAY")/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

# Options for `ray job submit` come before a `--`.
SUBMIT_OPTS=()
for arg in "$@"; do
  if [ "$arg" = "--" ]; then
    while [ "$1" != "--" ]; do SUBMIT_OPTS+=("$1"); shift; done
    shift
    break
  fi
done
[ $# -gt 0 ] || usage

# Which cluster, and whether it wants a token.
HEAD_STATE="${DEFECTFLOW_HEAD_DIR:-/tmp/defectflow-head}/defectflow-head.env"
head_value() {  # the value of one key of the head's state file, parsed (never sourced: it may sit in /tmp)
  "$PY" -c 'import shlex, sys
for line in open(sys.argv[1]):
    key, sep, value = line.strip().partition("=")
    if sep and key == sys.argv[2]:
        print(shlex.split(value)[0] if value else "")' "$HEAD_STATE" "$1"
}
if [ -z "${RAY_ADDRESS:-}" ] && [ -f "$HEAD_STATE" ]; then
  if [ -O "$HEAD_STATE" ]; then
    export RAY_ADDRESS="$(head_value RAY_ADDRESS)"
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-$(head_value RAY_AUTH_MODE)}"
  else
    echo "warning: ignoring $HEAD_STATE: another user owns it (set RAY_ADDRESS)" >&2
  fi
fi
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [ -z "${RAY_AUTH_MODE:-}" ]; then
  # Ray 2.60 clients send no token unless RAY_AUTH_MODE=token, and a cluster started where a token exists wants one.
  if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    export RAY_AUTH_MODE=token
  fi
fi

# cluster/runtime_env.yaml plus DEFECTFLOW_WORKDIR (`ray job submit` takes one runtime env only).
RUNTIME_ENV_JSON="$("$PY" - "$RUNTIME_ENV" "$WORKDIR" <<'EOF'
import json, sys, yaml
path, workdir = sys.argv[1], sys.argv[2]
with open(path) as f:
    env = yaml.safe_load(f) or {}
env["env_vars"] = {**(env.get("env_vars") or {}), "DEFECTFLOW_WORKDIR": workdir}
print(json.dumps(env))
EOF
)"

echo "submitting to $RAY_ADDRESS (auth: ${RAY_AUTH_MODE:-disabled}; relative paths from $WORKDIR)" >&2
exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV_JSON" \
  ${SUBMIT_OPTS[@]+"${SUBMIT_OPTS[@]}"} -- python -m workflows.cli "$@"
