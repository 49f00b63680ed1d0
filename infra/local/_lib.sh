# shellcheck shell=bash
# Helpers shared by infra/local/*.sh (sourced, never executed). No business logic here.

CAIRN_ROOT="${CAIRN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
RUN_DIR="${CAIRN_RUN_DIR:-$CAIRN_ROOT/.run}"
PID_DIR="$RUN_DIR/pids"
# shellcheck disable=SC2034 # used by the scripts that source this file
LOG_DIR="$RUN_DIR/logs"

say() { printf '[%s] %s\n' "${SCRIPT_TAG:-cairn}" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "${SCRIPT_TAG:-cairn}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${SCRIPT_TAG:-cairn}" "$*" >&2; exit 1; }

# port_open HOST PORT: true when something accepts a TCP connection (bash /dev/tcp, 2 s max).
port_open() {
    # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# wait_port HOST PORT SECONDS: poll until the port answers; false on timeout.
wait_port() {
    local host=$1 port=$2 deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        port_open "$host" "$port" && return 0
        sleep 0.5
    done
    port_open "$host" "$port"
}

# docker_engine: true when a Docker engine answers (the client alone is not enough).
docker_engine() {
    command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

# compose_cmd: prints the compose command available ("docker compose" or "docker-compose").
compose_cmd() {
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    else
        return 1
    fi
}

# pid_alive NAME: true when .run/pids/NAME.pid names a live process that is still ours. up.sh
# starts every process with CAIRN_LOCAL_PROCESS=NAME in its environment (kept across exec, e.g.
# into `celery worker`), so a recycled pid is never taken for ours.
pid_alive() {
    local name=$1 pid
    [[ -f "$PID_DIR/$name.pid" ]] || return 1
    pid=$(<"$PID_DIR/$name.pid")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    proc_running "$pid" || return 1
    grep -qxzF -- "CAIRN_LOCAL_PROCESS=$name" "/proc/$pid/environ" 2>/dev/null
}

# ensure_uv: install uv from PyPI when it is missing (pip, then python3 -m pip; --user and
# PEP 668 fallbacks for a system Python). ~/.local/bin is added to PATH for --user installs.
ensure_uv() {
    export PATH="$HOME/.local/bin:$PATH"
    command -v uv >/dev/null 2>&1 && return 0
    say "uv not found: installing it from PyPI"
    local py
    py=$(command -v python3 || command -v python || true)
    { command -v pip >/dev/null 2>&1 && pip install --quiet uv; } ||
        { [[ -n "$py" ]] && "$py" -m pip install --quiet uv; } ||
        { [[ -n "$py" ]] && "$py" -m pip install --quiet --user --break-system-packages uv; } ||
        die "could not install uv (tried: pip install uv, python3 -m pip install uv). Install pip (apt-get install python3-pip) or uv, then retry."
    hash -r
    command -v uv >/dev/null 2>&1 || die "uv was installed but is not on PATH (looked in PATH and ~/.local/bin)"
    say "uv installed: $(uv --version)"
}

# proc_running PID: true when PID exists and is not a zombie.
proc_running() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null || echo "?")
    [[ "$state" != Z ]]
}

# proc_pgid PID: prints the process group id of PID.
proc_pgid() {
    sed -E 's/^[0-9]+ \(.*\) [A-Za-z] [0-9-]+ ([0-9-]+).*/\1/' "/proc/$1/stat" 2>/dev/null
}

# group_leftovers NAME PGID: pids of live processes in group PGID that carry up.sh's marker
# CAIRN_LOCAL_PROCESS=NAME (e.g. Celery pool children whose parent already died).
group_leftovers() {
    local name=$1 pgid=$2 stat pid
    for stat in /proc/[0-9]*/stat; do
        pid=${stat#/proc/}
        pid=${pid%/stat}
        [[ "$(proc_pgid "$pid")" == "$pgid" ]] || continue
        proc_running "$pid" || continue
        grep -qxzF -- "CAIRN_LOCAL_PROCESS=$name" "/proc/$pid/environ" 2>/dev/null && echo "$pid"
    done
    return 0
}

# The local processes, in start order: name, then the extra metrics port (gateway: none, its
# /metrics is on the HTTP port). Each port can be moved through the environment (tests run a
# second `make up` beside a developer's this way).
# shellcheck disable=SC2034 # used by the scripts that source this file
CAIRN_SERVICES=(cairn-gateway cairn-scheduler cairn-ingest-worker cairn-dlq-handler)
# shellcheck disable=SC2034
declare -A CAIRN_METRICS_PORTS=(
    [cairn-scheduler]="${CAIRN_SCHEDULER_METRICS_PORT:-9102}"
    [cairn-ingest-worker]="${CAIRN_INGEST_WORKER_METRICS_PORT:-9103}"
    [cairn-dlq-handler]="${CAIRN_DLQ_HANDLER_METRICS_PORT:-9104}"
)

# --- supervisord (the local path's process supervisor; up.sh writes its configuration)
VENV_BIN="$CAIRN_ROOT/.venv/bin"
SUPERVISOR_CONF="$RUN_DIR/supervisord.conf"
SUPERVISOR_PIDFILE="$RUN_DIR/supervisord.pid"

# sctl ARGS...: supervisorctl against this run directory's supervisord.
sctl() {
    "$VENV_BIN/supervisorctl" -c "$SUPERVISOR_CONF" "$@"
}

# supervisord_pid: prints the pid of this run directory's supervisord; false when none runs.
# The pid must also carry the marker up.sh starts it with (a recycled pid is never taken for it).
supervisord_pid() {
    local pid
    [[ -f "$SUPERVISOR_PIDFILE" ]] || return 1
    pid=$(<"$SUPERVISOR_PIDFILE")
    [[ "$pid" =~ ^[0-9]+$ ]] && proc_running "$pid" || return 1
    grep -qxzF -- "CAIRN_SUPERVISOR=$RUN_DIR" "/proc/$pid/environ" 2>/dev/null || return 1
    echo "$pid"
}

# supervised_leftovers: pids of live processes started under this run directory's supervisord
# (they inherit its marker CAIRN_SUPERVISOR=RUN_DIR), e.g. Celery pool children orphaned when
# their main process was killed; supervisord itself is not listed.
supervised_leftovers() {
    local environ pid self
    self=$(supervisord_pid || true)
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        [[ "$pid" == "$self" || "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        grep -qxzF -- "CAIRN_SUPERVISOR=$RUN_DIR" "$environ" 2>/dev/null || continue
        proc_running "$pid" && echo "$pid"
    done
    return 0
}
