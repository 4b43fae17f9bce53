#!/usr/bin/env bash
# Idempotent set-up of the peers the benchmarks compare vaelab against (run by hand; never in CI):
# a virtual environment in benchmarks/.venv-peers with torch==2.13.0 (CPU wheel; installed FIRST, because an open
# range would pull a multi-GB CUDA build), then pythae and pyro-ppl, then vaelab itself in editable mode.
# Each peer is optional: if one fails to install, the benchmarks print a note and skip it.
#
#     bash benchmarks/setup_peers.sh
#     benchmarks/.venv-peers/bin/python benchmarks/throughput.py
#
# Re-running is cheap: each step is skipped once done (a stamp file per step, keyed by what it installs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=benchmarks/.venv-peers
PY="$VENV/bin/python"
TORCH="torch==2.13.0"
PEERS=("pythae" "pyro-ppl")

if [ ! -x "$PY" ]; then
    echo "[peers] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Nothing in this folder belongs in git (the repository's .gitignore is left alone).
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"

# step NAME KEY COMMAND...: run COMMAND unless NAME was already done with the same KEY.
step() {
    local name=$1 key=$2
    shift 2
    local stamp="$VENV/.done-$name"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        echo "[peers] $name: already done"
        return 0
    fi
    echo "[peers] $name: $*"
    # (pip's warnings about this machine's empty local index folders are dropped; everything else is shown)
    if "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); then
        echo "$key" > "$stamp"
    else
        echo "[peers] $name: FAILED (exit $?); the benchmarks will skip what it would have provided" >&2
        return 1
    fi
}

step pip "upgrade" "$PY" -m pip install -q --upgrade pip
step torch "$TORCH" "$PY" -m pip install -q "$TORCH"
# Peers one at a time, each with torch held at the pinned version (a peer that needs another torch fails here,
# loudly, instead of replacing it), so one failure does not stop the other.
constraint="$VENV/constraints.txt"
echo "$TORCH" > "$constraint"
for peer in "${PEERS[@]}"; do
    step "$peer" "$peer" "$PY" -m pip install -q -c "$constraint" "$peer" || true
done
step vaelab "$(sha256sum pyproject.toml | cut -d' ' -f1)" "$PY" -m pip install -q -c "$constraint" -e .

echo "[peers] versions:"
"$PY" - <<'PYEOF'
import importlib
import importlib.metadata

for name, dist in (("torch", "torch"), ("vaelab", "vaelab"), ("pythae", "pythae"), ("pyro", "pyro-ppl")):
    try:
        importlib.import_module(name)
        print(f"  {name:<7} {importlib.metadata.version(dist)}")
    except Exception as err:  # an installed peer that fails to import is skipped by the benchmarks too
        print(f"  {name:<7} not importable: {type(err).__name__}: {err}")
PYEOF
