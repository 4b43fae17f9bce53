#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, then the test suite (slow benchmarks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check
exec .venv/bin/python -m pytest -m "not slow" "$@"
