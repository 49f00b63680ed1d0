#!/usr/bin/env bash
# `make down`: stop what `make up` started.
#
# Docker path (a Docker engine answers and CAIRN_LOCAL is not 1): docker compose down.
# Local path: `supervisorctl shutdown` to the supervisord that up.sh started (it sends SIGTERM to
# each program's whole process group, gives it CAIRN_STOP_TIMEOUT (default 15) seconds, then
# SIGKILL, and exits); anything it started that is still alive after that (e.g. the pool
# children of a worker whose main process was killed) gets SIGKILL. Processes recorded in
# .run/pids/ by an older up.sh (no supervisor) are stopped too: SIGTERM, up to
# CAIRN_STOP_TIMEOUT seconds, then SIGKILL with their process group. The system RabbitMQ and
# Redis are never stopped.
set -euo pipefail
SCRIPT_TAG=down
# shellcheck source=infra/local/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
cd "$CAIRN_ROOT"
STOP_TIMEOUT="${CAIRN_STOP_TIMEOUT:-15}"

if [[ "${CAIRN_LOCAL:-0}" != 1 ]] && docker_engine; then
    if compose=$(compose_cmd); then
        say "Docker engine found: $compose down"
        $compose -f docker-compose.yml down || warn "$compose down failed"
    else
        warn "a Docker engine answers but no compose command is installed: skipping docker compose down"
    fi
fi

# stop NAME...: SIGTERM each live one, wait for all (bounded), SIGKILL the stragglers.
stop() {
    local name pid pgid leftovers
    local -a names=() pids=() groups=()
    for name in "$@"; do
        [[ -f "$PID_DIR/$name.pid" ]] || continue
        if ! pid_alive "$name"; then
            pid=$(<"$PID_DIR/$name.pid")
            if [[ "$pid" =~ ^[0-9]+$ ]] && leftovers=$(group_leftovers "$name" "$pid") && [[ -n "$leftovers" ]]; then
                warn "$name: not running, but processes of its group are: SIGKILL ${leftovers//$'\n'/ }"
                # shellcheck disable=SC2086
                kill -KILL $leftovers 2>/dev/null || true
            else
                say "$name: not running (removing stale pid file)"
            fi
            rm -f "$PID_DIR/$name.pid"
            continue
        fi
        pid=$(<"$PID_DIR/$name.pid")
        pgid=$(proc_pgid "$pid" || true)
        # up.sh starts each process as a session leader: only then is its group ours to kill.
        [[ "$pgid" == "$pid" ]] || pgid=
        say "$name: SIGTERM (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        names+=("$name")
        pids+=("$pid")
        groups+=("$pgid")
    done
    ((${#names[@]})) || return 0

    local deadline=$((SECONDS + STOP_TIMEOUT)) i alive
    while :; do
        alive=0
        for i in "${!pids[@]}"; do
            proc_running "${pids[$i]}" && alive=1
        done
        if ((alive == 0 || SECONDS >= deadline)); then break; fi
        sleep 0.5
    done

    for i in "${!names[@]}"; do
        name=${names[$i]}
        pid=${pids[$i]}
        pgid=${groups[$i]}
        if proc_running "$pid"; then
            warn "$name: still running after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        else
            say "$name: stopped"
        fi
        # Leftovers of its process group (pool children, helpers) go too.
        if [[ -n "$pgid" ]] && leftovers=$(group_leftovers "$name" "$pgid") && [[ -n "$leftovers" ]]; then
            warn "$name: SIGKILL to what is left of its process group: ${leftovers//$'\n'/ }"
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
        rm -f "$PID_DIR/$name.pid"
    done
}

# stop_supervisord: shut down this run directory's supervisord and everything it started.
stop_supervisord() {
    local pid leftovers deadline
    if pid=$(supervisord_pid); then
        say "supervisord (pid $pid): shutdown (each program: SIGTERM to its process group, SIGKILL after ${STOP_TIMEOUT}s)"
        sctl shutdown >/dev/null 2>&1 || { warn "supervisorctl shutdown failed: SIGTERM to supervisord"; kill -TERM "$pid" 2>/dev/null || true; }
        # supervisord exits once every program has stopped (its own SIGKILL comes at STOP_TIMEOUT).
        deadline=$((SECONDS + STOP_TIMEOUT + 10))
        while proc_running "$pid" && ((SECONDS < deadline)); do sleep 0.3; done
        if proc_running "$pid"; then
            warn "supervisord still running after $((STOP_TIMEOUT + 10))s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        else
            say "supervisord: stopped"
        fi
    fi
    leftovers=$(supervised_leftovers)
    if [[ -n "$leftovers" ]]; then
        warn "still alive from the supervised processes (e.g. pool children of a killed worker): SIGKILL ${leftovers//$'\n'/ }"
        # shellcheck disable=SC2086
        kill -KILL $leftovers 2>/dev/null || true
    fi
    rm -f "$SUPERVISOR_PIDFILE"
}
stop_supervisord

if [[ ! -d "$PID_DIR" ]] || [[ -z "$(ls -A "$PID_DIR" 2>/dev/null)" ]]; then
    say "done (system RabbitMQ and Redis left running)"
    exit 0
fi
say "stopping the processes recorded in ${PID_DIR#"$CAIRN_ROOT"/} by an older make up"

# Services first (the gateway stops taking requests first), then the store they write to.
stop "${CAIRN_SERVICES[@]}"
stop nx-27017
say "done (system RabbitMQ and Redis left running)"
