#!/usr/bin/env bash
# `make status`: the state of every process `make up` runs locally (supervisorctl status: RUNNING,
# STARTING, BACKOFF while it is being restarted, FATAL once given up, with pid and uptime).
# Exits 3 when some program is not running (supervisorctl's code), 1 when no supervisord runs.
set -euo pipefail
SCRIPT_TAG=status
# shellcheck source=infra/local/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

if ! pid=$(supervisord_pid); then
    say "no supervisord runs for ${RUN_DIR#"$CAIRN_ROOT"/} (start with: make up; with Docker: docker compose ps)"
    exit 1
fi
say "supervisord pid $pid; restarts and why: ${LOG_DIR#"$CAIRN_ROOT"/}/supervisord.log"
exec "$VENV_BIN/supervisorctl" -c "$SUPERVISOR_CONF" status
