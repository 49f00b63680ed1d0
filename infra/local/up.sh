#!/usr/bin/env bash
# `make up`: run the whole system.
#
# With a Docker engine (and CAIRN_LOCAL unset or not 1): docker compose up -d --build.
# Otherwise, as local processes: make install; RabbitMQ + Redis via services.sh; nx-27017 as the
# MongoDB stand-in when MONGODB_URI is unset; then the four services in the background, with
# logs in .run/logs/<name>.log and pids in .run/pids/<name>.pid. Re-running it is harmless:
# anything still running from its pid file is left alone. Stop with `make down`.
#
#   CAIRN_LOCAL=1          force the local-process path even if Docker answers
#   CAIRN_UP_TIMEOUT       seconds to wait for the gateway's /healthz (default 60)
#   CAIRN_HTTP_PORT        gateway port (default 8000)
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

make --no-print-directory -C "$CAIRN_ROOT" install
"$CAIRN_ROOT/infra/local/services.sh"
mkdir -p "$PID_DIR" "$LOG_DIR"
VENV_BIN="$CAIRN_ROOT/.venv/bin"

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
fail() { # fail [--log NAME] MESSAGE: print the logs' tails and exit 1
    local name=
    if [[ "$1" == --log ]]; then
        name=$2
        shift 2
    fi
    tail_logs "$name"
    printf '\n' >&2
    die "$* (what is still running can be stopped with: make down)"
}

# start_bg NAME COMMAND...: start COMMAND in its own session (so `make down` can signal its
# whole process group), stdout+stderr appended to .run/logs/NAME.log, pid in .run/pids/NAME.pid.
start_bg() {
    local name=$1
    shift
    local log="$LOG_DIR/$name.log"
    [[ -s "$log" ]] && mv -f "$log" "$log.prev" # one previous run is kept, as NAME.log.prev
    printf '===== %s: started by infra/local/up.sh =====\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$log"
    CAIRN_LOCAL_PROCESS="$name" setsid "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$PID_DIR/$name.pid"
    say "$name: started (pid $!, log ${log#"$CAIRN_ROOT"/})"
}

# --- MongoDB: MONGODB_URI (environment or .env) wins; otherwise nx-27017 on 127.0.0.1:27017.
MONGO_DESC=
if [[ -n "${MONGODB_URI:-}" ]] ||
    { [[ -f .env ]] && grep -Eq '^[[:space:]]*(export[[:space:]]+)?(CAIRN_)?MONGODB_URI=' .env; }; then
    say "MongoDB: MONGODB_URI is set: using it (nx-27017 not started)"
    MONGO_DESC="MONGODB_URI from the environment/.env"
elif pid_alive nx-27017; then
    say "MongoDB: nx-27017 already running (pid $(<"$PID_DIR/nx-27017.pid"))"
    MONGO_DESC="nx-27017 (MongoDB stand-in) on $MONGO_HOST:$MONGO_PORT, data in .run/mongo"
elif port_open "$MONGO_HOST" "$MONGO_PORT"; then
    say "MongoDB: something already answers on $MONGO_HOST:$MONGO_PORT: using it (nx-27017 not started)"
    MONGO_DESC="the server already listening on $MONGO_HOST:$MONGO_PORT"
else
    [[ -x "$VENV_BIN/nx-27017" ]] || die "$VENV_BIN/nx-27017 is missing (it comes with the dev dependencies: make install)"
    mkdir -p "$RUN_DIR/mongo"
    start_bg nx-27017 "$VENV_BIN/nx-27017" --data-dir "$RUN_DIR/mongo" --host "$MONGO_HOST" -p "$MONGO_PORT" \
        --log-file "$RUN_DIR/mongo/nx.log" --pid-file "$RUN_DIR/mongo/nx.pid"
    wait_port "$MONGO_HOST" "$MONGO_PORT" 20 || fail --log nx-27017 "nx-27017 does not answer on $MONGO_HOST:$MONGO_PORT after 20s (see .run/mongo/nx.log)"
    MONGO_DESC="nx-27017 (MongoDB stand-in) on $MONGO_HOST:$MONGO_PORT, data in .run/mongo"
fi

# --- the four services
started_any=0
for name in "${CAIRN_SERVICES[@]}"; do
    if pid_alive "$name"; then
        say "$name: already running (pid $(<"$PID_DIR/$name.pid"))"
        continue
    fi
    [[ -x "$VENV_BIN/$name" ]] || die "$VENV_BIN/$name is missing: is the service installed (make install)?"
    if [[ "$name" == cairn-gateway ]]; then
        port="$HTTP_PORT"
        probe="$PROBE_HOST"
    else
        port="${CAIRN_METRICS_PORTS[$name]}"
        probe=127.0.0.1
    fi
    port_open "$probe" "$port" && die "$name: port $port is already in use by another process (not started by make up)"

    envs=(env -u PROMETHEUS_MULTIPROC_DIR -u CAIRN_METRICS_PORT)
    case "$name" in
        cairn-gateway)
            envs+=("CAIRN_HTTP_HOST=$HTTP_HOST" "CAIRN_HTTP_PORT=$HTTP_PORT")
            ;;
        cairn-ingest-worker)
            # prometheus_client multiprocess mode: one fresh, empty directory per worker start.
            rm -rf "$RUN_DIR/prom-worker"
            mkdir -p "$RUN_DIR/prom-worker"
            envs+=("PROMETHEUS_MULTIPROC_DIR=$RUN_DIR/prom-worker" "CAIRN_METRICS_PORT=$port")
            ;;
        *)
            envs+=("CAIRN_METRICS_PORT=$port")
            ;;
    esac
    start_bg "$name" "${envs[@]}" "$VENV_BIN/$name"
    started_any=1
done

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
    pid_alive cairn-gateway || fail --log cairn-gateway "cairn-gateway exited during start-up"
    ((SECONDS < deadline)) || fail --log cairn-gateway "$GATEWAY_URL/healthz did not answer 200 within ${UP_TIMEOUT}s"
    sleep 1
done
say "gateway healthy"

# The others have no HTTP health check: they must still be alive, and their metrics port answer.
for name in "${CAIRN_SERVICES[@]:1}"; do
    port="${CAIRN_METRICS_PORTS[$name]}"
    until port_open 127.0.0.1 "$port"; do
        pid_alive "$name" || fail --log "$name" "$name exited during start-up"
        ((SECONDS < deadline + 15)) || { warn "$name is running but its metrics port $port does not answer yet"; break; }
        sleep 0.5
    done
done
if ((started_any)); then
    sleep 1
    for name in "${CAIRN_SERVICES[@]}"; do
        pid_alive "$name" || fail --log "$name" "$name exited during start-up"
    done
fi

cat <<MSG

Cairn is up (local processes):
  gateway     $GATEWAY_URL   (API docs: $GATEWAY_URL/docs, metrics: $GATEWAY_URL/metrics)
  metrics     scheduler http://127.0.0.1:9102/metrics
              ingest-worker http://127.0.0.1:9103/metrics
              dlq-handler http://127.0.0.1:9104/metrics
  MongoDB     $MONGO_DESC
  RabbitMQ    127.0.0.1:5672   Redis 127.0.0.1:6379
  logs        ${LOG_DIR#"$CAIRN_ROOT"/}/  (make logs)   pids ${PID_DIR#"$CAIRN_ROOT"/}/
first API key (every call needs one; printed once):
  uv run --no-sync cairn-gateway-admin create-key --tenant default --scopes admin --name me
stop with: make down
MSG
