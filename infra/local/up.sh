#!/usr/bin/env bash
# `make up`: run the whole system.
#
# With a Docker engine (and CAIRN_LOCAL unset or not 1): docker compose up -d --build (every
# service has `restart: unless-stopped`).
# Otherwise, as local processes: make install; RabbitMQ + Redis via services.sh; then supervisord
# (configuration written to .run/supervisord.conf) runs nx-27017 as the MongoDB stand-in when
# MONGODB_URI is unset, and the four services, each restarted whenever it exits (see "back-off"
# below), logs in .run/logs/<name>.log, supervisord's own (starts, exits and why) in
# .run/logs/supervisord.log. Re-running it is harmless: the configuration is re-applied, what
# runs is left alone, what was given up is started again. `make status` lists the processes;
# stop with `make down`.
#
#   CAIRN_LOCAL=1          force the local-process path even if Docker answers
#   CAIRN_UP_TIMEOUT       seconds to wait for the gateway's /healthz (default 60)
#   CAIRN_HTTP_HOST/PORT   gateway address (default 127.0.0.1:8000)
#   CAIRN_SCHEDULER_METRICS_PORT, CAIRN_INGEST_WORKER_METRICS_PORT, CAIRN_DLQ_HANDLER_METRICS_PORT
#                          the other services' /metrics ports (default 9102, 9103, 9104)
#   CAIRN_RUN_DIR          state directory: configuration, socket, logs, nx-27017 data (default .run)
#   CAIRN_SUPERVISOR_STARTSECS / _STARTRETRIES   supervisord's startsecs (5) / startretries (100)
#   CAIRN_STOP_TIMEOUT     seconds a process gets to stop on SIGTERM before SIGKILL (default 15)
#   CAIRN_UP_SKIP_INSTALL=1  skip `make install` (the venv is already synced)
set -euo pipefail
SCRIPT_TAG=up
# shellcheck source=infra/local/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
cd "$CAIRN_ROOT"

HTTP_HOST="${CAIRN_HTTP_HOST:-127.0.0.1}"
HTTP_PORT="${CAIRN_HTTP_PORT:-8000}"
case "$HTTP_HOST" in 0.0.0.0 | "::" | "") PROBE_HOST=127.0.0.1 ;; *) PROBE_HOST="$HTTP_HOST" ;; esac
GATEWAY_URL="http://$PROBE_HOST:$HTTP_PORT"
UP_TIMEOUT="${CAIRN_UP_TIMEOUT:-60}"
MONGO_HOST=127.0.0.1
MONGO_PORT=27017

# ----------------------------------------------------------------------------- Docker path
if [[ "${CAIRN_LOCAL:-0}" != 1 ]] && docker_engine; then
    compose=$(compose_cmd) || die "a Docker engine answers but neither 'docker compose' nor 'docker-compose' is installed (or set CAIRN_LOCAL=1)"
    say "Docker engine found: $compose up -d --build (set CAIRN_LOCAL=1 to run local processes instead)"
    $compose -f docker-compose.yml up -d --build
    cat <<MSG

Cairn is up (docker compose):
  gateway     http://127.0.0.1:8000   (API docs: http://127.0.0.1:8000/docs, metrics: /metrics)
  RabbitMQ    http://127.0.0.1:15672  (guest/guest)
  Jaeger      http://127.0.0.1:16686
  Prometheus  http://127.0.0.1:9090
  Grafana     http://127.0.0.1:3000
  logs        $compose logs -f
first API key (every call needs one; printed once):
  $compose exec gateway cairn-gateway-admin create-key --tenant default --scopes admin --name me
stop with: make down
MSG
    exit 0
fi

# ----------------------------------------------------------------------------- local path
if [[ "${CAIRN_LOCAL:-0}" == 1 ]]; then
    say "CAIRN_LOCAL=1: running the services as local processes"
else
    say "no Docker engine answers: running the services as local processes"
fi

if [[ "${CAIRN_UP_SKIP_INSTALL:-0}" != 1 ]]; then
    make --no-print-directory -C "$CAIRN_ROOT" install
fi
"$CAIRN_ROOT/infra/local/services.sh"
mkdir -p "$LOG_DIR"
[[ -x "$VENV_BIN/supervisord" ]] || die "$VENV_BIN/supervisord is missing (it comes with the dev dependencies: make install)"

# An older `make up` started its processes without a supervisor and recorded them in .run/pids/.
for name in "${CAIRN_SERVICES[@]}" nx-27017; do
    pid_alive "$name" && die "$name runs from an older make up (pid file ${PID_DIR#"$CAIRN_ROOT"/}/$name.pid): stop it first with: make down"
done

# tail_logs [NAME]: the last lines of every log, NAME's last (next to the error message).
tail_logs() {
    local f first=() last=()
    for f in "$LOG_DIR"/*.log; do
        [[ -f "$f" ]] || continue
        if [[ -n "${1:-}" && "$f" == "$LOG_DIR/$1.log" ]]; then last+=("$f"); else first+=("$f"); fi
    done
    for f in ${first[@]+"${first[@]}"} ${last[@]+"${last[@]}"}; do
        printf '\n----- last 40 lines of %s -----\n' "${f#"$CAIRN_ROOT"/}" >&2
        tail -n 40 "$f" >&2 || true
    done
}
fail() { # fail [--log NAME] MESSAGE: print the logs' tails and the supervisor's view, exit 1
    local name=
    if [[ "$1" == --log ]]; then
        name=$2
        shift 2
    fi
    tail_logs "$name"
    printf '\n' >&2
    sctl status >&2 || true
    die "$* (supervisord keeps retrying; stop everything with: make down)"
}

# --- supervisord's configuration ------------------------------------------------------------
# Every process `make up` runs is a supervisord [program]: restarted whenever it exits, for any
# reason (autorestart=true), with a log line in .run/logs/supervisord.log saying why, e.g.
#   WARN exited: cairn-ingest-worker (terminated by SIGKILL; not expected)
#   INFO spawned: 'cairn-ingest-worker' with pid 4242
# Back-off (supervisord's own): a process that exits within START_SECS of its start goes to
# BACKOFF and is started again after 1 s, then 2 s, 3 s... (one second more per failed try) and
# is given up (FATAL) after START_RETRIES failed tries in a row; one that ran START_SECS or longer
# is restarted at once, so a process is never restarted more than once per START_SECS.
START_SECS="${CAIRN_SUPERVISOR_STARTSECS:-5}"
START_RETRIES="${CAIRN_SUPERVISOR_STARTRETRIES:-100}"
STOP_TIMEOUT="${CAIRN_STOP_TIMEOUT:-15}"

# ini VALUE: VALUE for supervisord's configuration ('%' is its interpolation character).
ini() { printf '%s' "${1//%/%%}"; }
# cmdline ARG...: a command= line (supervisord splits it like a POSIX shell).
cmdline() {
    local arg out=()
    for arg in "$@"; do out+=("$(printf '%q' "$arg")"); done
    ini "${out[*]}"
}
# program NAME PRIORITY "K=V ..." COMMAND...: one [program:NAME] section on stdout.
program() {
    local name=$1 priority=$2 envs=$3 kv environment="CAIRN_LOCAL_PROCESS=\"$1\""
    shift 3
    for kv in $envs; do environment+=",${kv%%=*}=\"${kv#*=}\""; done
    cat <<INI

[program:$name]
command=$(cmdline "$@")
directory=$(ini "$CAIRN_ROOT")
environment=$(ini "$environment")
priority=$priority
autostart=true
autorestart=true
startsecs=$START_SECS
startretries=$START_RETRIES
stopsignal=TERM
stopwaitsecs=$STOP_TIMEOUT
; the signal goes to the whole process group: Celery's prefork children stop with their parent
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=$(ini "$LOG_DIR/$name.log")
stdout_logfile_maxbytes=50MB
stdout_logfile_backups=2
INI
}

# --- MongoDB: MONGODB_URI (environment or .env) wins; otherwise nx-27017 on 127.0.0.1:27017,
# itself a supervised program.
supervisord_running=0
supervisord_pid >/dev/null && supervisord_running=1
MONGO_DESC=
run_nx=0
if [[ -n "${MONGODB_URI:-}" ]] ||
    { [[ -f .env ]] && grep -Eq '^[[:space:]]*(export[[:space:]]+)?(CAIRN_)?MONGODB_URI=' .env; }; then
    say "MongoDB: MONGODB_URI is set: using it (nx-27017 not started)"
    MONGO_DESC="MONGODB_URI from the environment/.env"
elif ((supervisord_running)) && sctl pid nx-27017 2>/dev/null | grep -qE '^[1-9][0-9]*$'; then
    run_nx=1
    MONGO_DESC="nx-27017 (MongoDB stand-in) on $MONGO_HOST:$MONGO_PORT, data in ${RUN_DIR#"$CAIRN_ROOT"/}/mongo"
elif port_open "$MONGO_HOST" "$MONGO_PORT"; then
    say "MongoDB: something already answers on $MONGO_HOST:$MONGO_PORT: using it (nx-27017 not started)"
    MONGO_DESC="the server already listening on $MONGO_HOST:$MONGO_PORT"
else
    [[ -x "$VENV_BIN/nx-27017" ]] || die "$VENV_BIN/nx-27017 is missing (it comes with the dev dependencies: make install)"
    run_nx=1
    MONGO_DESC="nx-27017 (MongoDB stand-in) on $MONGO_HOST:$MONGO_PORT, data in ${RUN_DIR#"$CAIRN_ROOT"/}/mongo"
fi

# Ports must be free, except for the programs this run directory's supervisord already runs.
if ((supervisord_running == 0)); then
    port_open "$PROBE_HOST" "$HTTP_PORT" && die "cairn-gateway: port $HTTP_PORT is already in use by another process (not started by make up)"
    for name in "${CAIRN_SERVICES[@]:1}"; do
        port="${CAIRN_METRICS_PORTS[$name]}"
        port_open 127.0.0.1 "$port" && die "$name: port $port is already in use by another process (not started by make up)"
    done
fi

{
    cat <<INI
; Written by infra/local/up.sh at every \`make up\`: edit up.sh, not this file.
[supervisord]
logfile=$(ini "$LOG_DIR/supervisord.log")
logfile_maxbytes=10MB
logfile_backups=2
loglevel=info
pidfile=$(ini "$SUPERVISOR_PIDFILE")
directory=$(ini "$CAIRN_ROOT")
childlogdir=$(ini "$LOG_DIR")
$( (($(id -u) == 0)) && echo "; as root: says so (silences supervisord's warning that privileges were not dropped)" && echo "user=root")

[unix_http_server]
file=$(ini "$RUN_DIR/supervisor.sock")
chmod=0700

[supervisorctl]
serverurl=unix://$(ini "$RUN_DIR/supervisor.sock")

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
INI
    if ((run_nx)); then
        mkdir -p "$RUN_DIR/mongo"
        program nx-27017 10 "" "$VENV_BIN/nx-27017" --data-dir "$RUN_DIR/mongo" --host "$MONGO_HOST" -p "$MONGO_PORT" \
            --log-file "$RUN_DIR/mongo/nx.log" --pid-file "$RUN_DIR/mongo/nx.pid"
    fi
    # supervisord stops in reverse priority order, one program after the other (and starts in
    # priority order, without waiting): the gateway, highest, stops taking requests first, the
    # store, lowest, goes last.
    priority=20
    for name in "${CAIRN_SERVICES[@]:1}" cairn-gateway; do
        [[ -x "$VENV_BIN/$name" ]] || die "$VENV_BIN/$name is missing: is the service installed (make install)?"
        case "$name" in
            cairn-gateway)
                program "$name" "$priority" "CAIRN_HTTP_HOST=$HTTP_HOST CAIRN_HTTP_PORT=$HTTP_PORT" "$VENV_BIN/$name"
                ;;
            cairn-ingest-worker)
                # prometheus_client multiprocess mode: one fresh, empty directory per worker
                # start (a restarted worker must not add the dead pool's samples to its own).
                prom="$RUN_DIR/prom-worker"
                program "$name" "$priority" "PROMETHEUS_MULTIPROC_DIR=$prom CAIRN_METRICS_PORT=${CAIRN_METRICS_PORTS[$name]}" \
                    bash -c 'rm -rf -- "$1" && mkdir -p -- "$1" && exec "$2"' cairn-ingest-worker "$prom" "$VENV_BIN/$name"
                ;;
            *)
                program "$name" "$priority" "CAIRN_METRICS_PORT=${CAIRN_METRICS_PORTS[$name]}" "$VENV_BIN/$name"
                ;;
        esac
        priority=$((priority + 1))
    done
} >"$SUPERVISOR_CONF.new"
mv -f "$SUPERVISOR_CONF.new" "$SUPERVISOR_CONF"

if ((supervisord_running)); then
    say "supervisord already running (pid $(supervisord_pid)): applying the configuration, starting what is stopped"
    sctl update
    # FATAL or stopped programs start again; running ones are left alone.
    sctl start all >/dev/null || true
else
    for name in "${CAIRN_SERVICES[@]}" nx-27017; do
        log="$LOG_DIR/$name.log"
        [[ -s "$log" ]] && mv -f "$log" "$log.prev" # one previous run is kept, as NAME.log.prev
    done
    # The services get the environment of this script (MONGODB_URI, CAIRN_*, .env is read by
    # each), minus the per-process settings their [program] sets; the marker lets `make down`
    # find everything supervisord started, even a process whose parent died.
    env -u PROMETHEUS_MULTIPROC_DIR -u CAIRN_METRICS_PORT CAIRN_SUPERVISOR="$RUN_DIR" \
        "$VENV_BIN/supervisord" -c "$SUPERVISOR_CONF" ||
        fail "supervisord did not start (see ${LOG_DIR#"$CAIRN_ROOT"/}/supervisord.log)"
    deadline=$((SECONDS + 10))
    until supervisord_pid >/dev/null && sctl pid >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "supervisord does not answer on ${RUN_DIR#"$CAIRN_ROOT"/}/supervisor.sock after 10s"
        sleep 0.3
    done
    say "supervisord started (pid $(supervisord_pid), config ${SUPERVISOR_CONF#"$CAIRN_ROOT"/}, log ${LOG_DIR#"$CAIRN_ROOT"/}/supervisord.log)"
fi

# state NAME: the program's supervisord state (RUNNING, STARTING, BACKOFF, FATAL...).
state() { sctl status "$1" 2>/dev/null | awk '{print $2}'; }

if ((run_nx)); then
    wait_port "$MONGO_HOST" "$MONGO_PORT" 20 || fail --log nx-27017 "nx-27017 does not answer on $MONGO_HOST:$MONGO_PORT after 20s (see ${RUN_DIR#"$CAIRN_ROOT"/}/mongo/nx.log)"
fi

# --- readiness: the gateway's /healthz answers 200 within UP_TIMEOUT seconds
healthy() {
    "$VENV_BIN/python" - "$GATEWAY_URL/healthz" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}
say "waiting up to ${UP_TIMEOUT}s for $GATEWAY_URL/healthz"
deadline=$((SECONDS + UP_TIMEOUT))
until healthy; do
    [[ "$(state cairn-gateway)" == FATAL ]] && fail --log cairn-gateway "cairn-gateway could not be started (FATAL)"
    ((SECONDS < deadline)) || fail --log cairn-gateway "$GATEWAY_URL/healthz did not answer 200 within ${UP_TIMEOUT}s"
    sleep 1
done
say "gateway healthy"

# The others have no HTTP health check: they must reach RUNNING (up START_SECS seconds), and
# their metrics port answer.
for name in "${CAIRN_SERVICES[@]:1}"; do
    port="${CAIRN_METRICS_PORTS[$name]}"
    until [[ "$(state "$name")" == RUNNING ]] && port_open 127.0.0.1 "$port"; do
        [[ "$(state "$name")" == FATAL ]] && fail --log "$name" "$name could not be started (FATAL)"
        ((SECONDS < deadline + 15)) || fail --log "$name" "$name is not RUNNING with its metrics port $port answering after $((UP_TIMEOUT + 15))s"
        sleep 0.5
    done
done
sctl status

cat <<MSG

Cairn is up (local processes under supervisord: each one is restarted if it exits):
  gateway     $GATEWAY_URL   (API docs: $GATEWAY_URL/docs, metrics: $GATEWAY_URL/metrics)
  metrics     scheduler http://127.0.0.1:${CAIRN_METRICS_PORTS[cairn-scheduler]}/metrics
              ingest-worker http://127.0.0.1:${CAIRN_METRICS_PORTS[cairn-ingest-worker]}/metrics
              dlq-handler http://127.0.0.1:${CAIRN_METRICS_PORTS[cairn-dlq-handler]}/metrics
  MongoDB     $MONGO_DESC
  RabbitMQ    127.0.0.1:5672   Redis 127.0.0.1:6379
  logs        ${LOG_DIR#"$CAIRN_ROOT"/}/  (make logs; restarts and why: supervisord.log)
  processes   make status
first API key (every call needs one; printed once):
  uv run --no-sync cairn-gateway-admin create-key --tenant default --scopes admin --name me
stop with: make down
MSG
