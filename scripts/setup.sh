#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install fotlab with its test extras.
# Idempotent: re-running after a pyproject change reinstalls; otherwise it returns in a second.
#   scripts/setup.sh            # CPU torch, everything the quickstart and the tests need
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
stamp="$VENV/.fotlab-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"fotlab needs Python >= 3.11 (found {sys.version.split()[0]}); set PYTHON=/path/to/python3.11")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv

# torch first, with pip: pip honours this machine's local wheel folder (a CPU build). A torch already present that
# satisfies the project's range is kept by the resolver below.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.4,<2.15"
fi

# Everything else with uv (seconds instead of minutes). Give uv pip's local wheel folders, if any, so it sees the
# same packages pip would.
links=()
for d in $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
  [ -d "$d" ] && links+=(--find-links "$d")
done
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${links[@]}" --compile-bytecode -e '.[dev]'

# Bytecode for everything installed and for fotlab itself, written once here: uv skips packages it did not install
# this time, and where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) nothing is ever cached, so every Ray
# worker process would compile transformers, MLflow & co. from source again (several seconds per process).
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  platform >/dev/null 2>&1 || true

echo "$want" > "$stamp"
echo "fotlab installed in $VENV"
