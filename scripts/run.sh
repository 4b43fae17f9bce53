#!/usr/bin/env bash
# The main job: set-up (idempotent), then the ground-truth check of every log p(x) estimator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vaelab check "$@"
