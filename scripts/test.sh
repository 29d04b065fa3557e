#!/usr/bin/env bash
# The whole test suite: lint, format check, type check, tests. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
python -m pytest -n 2 -q "$@"
