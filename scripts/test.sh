#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, lint, type-check, test.
# Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
MYPYPATH=benchmarks .venv/bin/mypy benchmarks/*.py
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
