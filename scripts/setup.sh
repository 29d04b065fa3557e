#!/usr/bin/env bash
# Create .venv (if absent) and install mammogmic with the train extra: what `mammogmic demo` needs (the plain
# `pip install mammogmic` predicts, evaluates and visualizes; see the README). scripts/test.sh adds the dev
# extra when it runs. torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build; on a GPU machine
# install the torch build you need before this script.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[train]"
