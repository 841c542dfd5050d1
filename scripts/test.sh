#!/usr/bin/env bash
# Set up, then lint and run the test suite (CPU; GPU tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check climber tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
