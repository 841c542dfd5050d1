#!/usr/bin/env bash
# Set up, then prepare MovieLens-100K, train a small Climber on CPU and print the test table.
# Extra arguments go to `climber run` (e.g. --epochs 2, --source kuairand).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/climber run "$@"
