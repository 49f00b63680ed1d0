# Cairn: developer and CI entry points. `make` alone lists the targets.
# CI runs exactly `make test` (see .ci/run).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# `pip install --user uv` lands in ~/.local/bin.
export PATH := $(HOME)/.local/bin:$(PATH)

PYTEST := uv run --no-sync pytest
# Extra pytest arguments, e.g. make test-unit PYTEST_ARGS="-k lease -x"
PYTEST_ARGS ?=

.PHONY: help install local-services test-services up down status lint test test-unit test-e2e logs lock compose-config

help: ## List the targets
	@echo "Cairn make targets:"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: ## Install uv if missing, then sync the workspace venv (.venv, all packages + dev)
	@infra/local/ensure-uv.sh
	@if [ -f uv.lock ]; then \
		echo "uv sync --all-packages --frozen"; uv sync --all-packages --frozen; \
	else \
		echo "uv sync --all-packages (no uv.lock yet)"; uv sync --all-packages; \
	fi

local-services: ## Make sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer
	@infra/local/services.sh

test-services: ## local-services, plus the tools the tests call (rabbitmqctl, docker-compose, promtool)
	@infra/local/services.sh --test-tools

up: ## Run the system: docker compose if a Docker engine answers, else local processes (CAIRN_LOCAL=1 forces local)
	@infra/local/up.sh

down: ## Stop what `make up` started
	@infra/local/down.sh

status: ## State of the local processes `make up` runs under supervisord (pid, uptime, restarts in .run/logs/supervisord.log)
	@infra/local/status.sh

lint: install ## ruff (lint, import order) and mypy (libs/ and services/), configured in pyproject.toml
	uv run --no-sync ruff check .
	uv run --no-sync mypy

test: install lint test-services ## What CI runs: lint, then every test suite (libs, services, tests-e2e)
	$(PYTEST) libs services examples tests-e2e $(PYTEST_ARGS)

test-unit: install test-services ## Tests of libs/ and services/ only
	$(PYTEST) libs services $(PYTEST_ARGS)

test-e2e: install test-services ## Whole-system tests only (tests-e2e/)
	$(PYTEST) tests-e2e $(PYTEST_ARGS)

# Not part of `make test`. Needs the system `make up` runs; writes bench/results/<time>/REPORT.md.
# One scenario or other sizes: make bench BENCH_ARGS="ingest --records 1000000" (see bench/README.md)
BENCH_ARGS ?= all
.PHONY: bench
bench: ## Benchmarks against the `make up` system: table, JSON, REPORT.md with plots (bench/results/)
	uv run --no-sync python -m bench $(BENCH_ARGS)

# Flower (a dev dependency) against Cairn's broker: workers send heartbeats and answer remote
# control, so its dashboard and pool controls work (its task list: CAIRN_WORKER_TASK_EVENTS=true
# for the workers). Needs the workers of `make up`.
FLOWER_PORT ?= 5555
.PHONY: flower
flower: ## Flower (Celery's monitor) on http://127.0.0.1:5555 against Cairn's broker (CAIRN_AMQP_URL)
	uv run --no-sync celery --broker="$${CAIRN_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}" flower --address=127.0.0.1 --port=$(FLOWER_PORT)

logs: ## Follow the logs of the local processes and of their supervisor (.run/logs)
	@ls .run/logs/*.log >/dev/null 2>&1 || { echo "no logs in .run/logs (start with: make up; with Docker: docker compose logs -f)"; exit 1; }
	tail -n 50 -F .run/logs/*.log

lock: ## Update uv.lock
	@infra/local/ensure-uv.sh
	uv lock

compose-config: ## Validate docker-compose.yml
	@if command -v docker-compose >/dev/null 2>&1; then \
		docker-compose -f docker-compose.yml config -q; \
	else \
		docker compose -f docker-compose.yml config -q; \
	fi
	@echo "docker-compose.yml is valid"
