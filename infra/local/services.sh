#!/usr/bin/env bash
# Make sure the local RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer.
#
# Idempotent: a service that already answers is left alone. An installed service that is down
# is started; a missing one is installed from Debian (only as root, `apt-get update` once).
# Only these two local servers are managed; it never stops anything.
#
#   --test-tools            also install what the test suites call: docker-compose (Debian's,
#                           to validate docker-compose.yml), rabbitmqctl (per-run vhosts),
#                           promtool (Debian's prometheus: checks infra/prometheus) and
#                           chromium (Debian's: tests-e2e/test_console.py drives it headless)
#   CAIRN_SERVICES_TIMEOUT  seconds to wait for each server to answer (default 60)
set -euo pipefail
SCRIPT_TAG=services
# shellcheck source=infra/local/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

HOST=127.0.0.1
AMQP_PORT=5672
REDIS_PORT=6379
TIMEOUT="${CAIRN_SERVICES_TIMEOUT:-60}"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

is_root() { [[ "$(id -u)" == 0 ]]; }
have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

APT_UPDATED=0
apt_install() { # apt_install PACKAGE
    local pkg=$1 guard=0
    is_root || die "$pkg is not installed and this is not root: install it (apt-get install $pkg) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "$pkg is not installed and apt-get is missing: install $pkg yourself"
    if ((APT_UPDATED == 0)); then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    # Without systemd, keep the package scripts from starting the daemon (container-style);
    # this script starts it itself below.
    if ! have_systemd && [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    say "installing Debian package $pkg"
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" || rc=$?
    ((guard)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install $pkg failed (exit $rc)"
}

ensure_redis() {
    if port_open "$HOST" "$REDIS_PORT"; then
        say "Redis: already answering on $HOST:$REDIS_PORT (nothing to do)"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
        hash -r
        if port_open "$HOST" "$REDIS_PORT"; then
            say "Redis: installed, and its package started it on $HOST:$REDIS_PORT"
            return 0
        fi
    fi
    local dir logfile
    if is_root; then
        dir=/var/lib/redis
        logfile=/var/log/redis/ci.log
    else
        dir="$RUN_DIR/redis"
        logfile="$RUN_DIR/redis/redis.log"
    fi
    mkdir -p "$dir" "$(dirname "$logfile")"
    say "Redis: starting redis-server on $HOST:$REDIS_PORT (log $logfile)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir "$dir" --logfile "$logfile" ||
        die "redis-server failed to start; see $logfile"
    wait_port "$HOST" "$REDIS_PORT" "$TIMEOUT" ||
        die "Redis does not answer on $HOST:$REDIS_PORT after ${TIMEOUT}s; see $logfile"
    say "Redis: up on $HOST:$REDIS_PORT"
}

ensure_rabbitmq() {
    if port_open "$HOST" "$AMQP_PORT"; then
        say "RabbitMQ: already answering on $HOST:$AMQP_PORT (nothing to do)"
        return 0
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        apt_install rabbitmq-server
        hash -r
        if wait_port "$HOST" "$AMQP_PORT" 2; then
            say "RabbitMQ: installed, and its package started it on $HOST:$AMQP_PORT"
            return 0
        fi
    fi
    if have_systemd && is_root; then
        say "RabbitMQ: systemctl start rabbitmq-server"
        systemctl start rabbitmq-server || warn "systemctl start rabbitmq-server failed; trying rabbitmq-server -detached"
    fi
    if ! port_open "$HOST" "$AMQP_PORT"; then
        is_root || warn "not root: rabbitmq-server usually has to be started as root or as the rabbitmq user"
        say "RabbitMQ: starting rabbitmq-server -detached"
        rabbitmq-server -detached || die "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
    fi
    say "RabbitMQ: waiting up to ${TIMEOUT}s for $HOST:$AMQP_PORT"
    wait_port "$HOST" "$AMQP_PORT" "$TIMEOUT" ||
        die "RabbitMQ does not answer on $HOST:$AMQP_PORT after ${TIMEOUT}s; see /var/log/rabbitmq/ (rabbitmqctl status)"
    # The listener opens late in boot; await_startup confirms the node finished booting.
    if command -v rabbitmqctl >/dev/null 2>&1; then
        timeout "$TIMEOUT" rabbitmqctl -q await_startup >/dev/null 2>&1 ||
            warn "rabbitmqctl await_startup did not confirm the boot (the AMQP port answers, continuing)"
    fi
    say "RabbitMQ: up on $HOST:$AMQP_PORT"
}

ensure_command() { # ensure_command COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install "$2"
    hash -r
}

ensure_redis
ensure_rabbitmq
if [[ "${1:-}" == "--test-tools" ]]; then
    ensure_command rabbitmqctl rabbitmq-server
    ensure_command docker-compose docker-compose
    ensure_command promtool prometheus
    ensure_command chromium chromium
    say "test tools ready: $(command -v rabbitmqctl) $(command -v docker-compose) $(command -v promtool) $(command -v chromium)"
fi
say "local services ready: amqp://$HOST:$AMQP_PORT redis://$HOST:$REDIS_PORT"
