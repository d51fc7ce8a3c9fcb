#!/usr/bin/env bash
# Lint and run the whole test suite (real Redis server process, real HTTP, real notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
