#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with torch==2.13.0 (CPU wheel; an open
# range would pull a multi-GB CUDA build), then vaelab itself in editable mode with its dev tools.
# Re-running is cheap: the install step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${VAELAB_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Fashion-MNIST comes from Debian (the default training data; no internet needed beyond the package mirror).
fashion=/usr/share/datasets/fashion-mnist
if [ ! -d "$fashion" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist into $fashion"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "[setup] warning: could not install dataset-fashion-mnist; Fashion-MNIST must then be found elsewhere"
fi

# Headless Chromium and its driver: the HTML report's test opens the report in a real browser.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's chromium and chromium-driver (for the report test)"
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
        || echo "[setup] warning: could not install chromium; the browser test will be skipped"
fi

stamp="$VENV/.vaelab-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing torch==2.13.0 and vaelab into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
