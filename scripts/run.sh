#!/usr/bin/env bash
# The main job, on a fresh machine: set-up (idempotent), then train a VAE on real images for a few minutes on CPU,
# evaluate its test log-likelihood (k = 5000 importance samples) and draw samples and reconstructions.
# Data: MNIST wherever a copy is found (here: ../shared/data), else Fashion-MNIST from Debian's package (no internet).
# Results land in runs/quickstart/ (override: RUN_DIR=... bash scripts/run.sh). Extra arguments go to `vaelab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${VAELAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export VAELAB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
RUN_DIR=${RUN_DIR:-runs/quickstart}
VAELAB=.venv/bin/vaelab

.venv/bin/vaelab check > /dev/null && echo "[run] vaelab check: every estimator agrees with exact ground truth"
if [ -f "$RUN_DIR/model.safetensors" ]; then
    echo "[run] $RUN_DIR already holds a finished run: evaluating it again (delete it to train anew)"
elif [ -d "$RUN_DIR/checkpoints" ]; then
    $VAELAB train --resume --out "$RUN_DIR"
else
    $VAELAB train --preset mlp --epochs 15 --out "$RUN_DIR" "$@"
fi
$VAELAB eval "$RUN_DIR" --k 5000 --examples 1000 --fast   # without --fast: the full diagnostics (slower)
$VAELAB sample "$RUN_DIR" --n 64
$VAELAB reconstruct "$RUN_DIR" --n 16
echo "[run] done: $RUN_DIR/{eval_test.json,samples.png,reconstructions.png,metrics.jsonl,tensorboard/}"
