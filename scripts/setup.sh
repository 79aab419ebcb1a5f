#!/usr/bin/env bash
# Create .venv and install searchsvc with its development tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch/torchvision pinned together: timm needs torchvision, and a torchvision that does not
# match torch fails to import.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "torch==2.14.1" "torchvision==0.29.1" -e '.[dev]'
