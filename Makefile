# The two commands a new user needs (both set themselves up first):
#   make quickstart   # install into .venv, then train + evaluate the quickstart FoT model on local Ray, tracked in MLflow
#   make test         # install into .venv, then lint (seconds) and run the test suite (the same command CI runs)
# Also: make lint (ruff + mypy only), make test-fast (no slow/Ray tests, no lint); CONTRIBUTING.md has the details.
SHELL := /bin/bash
VENV ?= .venv
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# Tiny models on a 2-core box: one torch thread per process; two threads per process were up to 10x slower when several processes ran.
test test-fast: export OMP_NUM_THREADS ?= 1

.PHONY: setup quickstart lint test test-fast

setup:
	@scripts/setup.sh

quickstart: setup
	$(VENV)/bin/fotlab run experiments/quickstart.yaml

# ruff check, ruff format --diff, mypy (scripts/lint.sh --fix applies ruff's fixes and formatting first)
lint: setup
	@scripts/lint.sh

# Lint first: a style or type error fails in seconds instead of after the ~7-minute suite.
test: lint
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not ray"
