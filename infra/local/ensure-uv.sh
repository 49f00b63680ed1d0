#!/usr/bin/env bash
# Make sure `uv` is available (installs it from PyPI when missing). Used by `make` and .ci/run.
set -euo pipefail
SCRIPT_TAG=ensure-uv
# shellcheck source=infra/local/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
ensure_uv
