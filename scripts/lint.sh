#!/usr/bin/env bash
# Lint, format and type checks: the ones `make lint`, `make test` (so CI) and the pre-commit hook run.
#   scripts/lint.sh          # ruff check, ruff format --diff, mypy (config in pyproject.toml); exit 1 if any fails
#   scripts/lint.sh --fix    # first apply ruff's safe fixes and its formatting, then run the same checks
# Needs the dev tools in .venv (scripts/setup.sh installs them; VENV=... picks another environment).
# Every check runs even when an earlier one failed, so one run lists all that is wrong.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
esac

for tool in ruff mypy; do
  if [ ! -x "$VENV/bin/$tool" ]; then
    echo "scripts/lint.sh: $VENV/bin/$tool not found; run scripts/setup.sh (it installs the dev extra)" >&2
    exit 2
  fi
done

if [ "$fix" = 1 ]; then
  "$VENV/bin/ruff" check --fix --quiet . || true  # what it cannot fix is reported by the check below
  "$VENV/bin/ruff" format --quiet .
fi

failed=()
echo "ruff check"
"$VENV/bin/ruff" check . || failed+=("ruff check (lint)")
echo "ruff format --diff"
"$VENV/bin/ruff" format --diff . || failed+=("ruff format (the diff above; scripts/lint.sh --fix applies it)")
echo "mypy"
"$VENV/bin/mypy" || failed+=("mypy (types)")

if [ ${#failed[@]} -gt 0 ]; then
  printf 'lint FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "lint passed"
