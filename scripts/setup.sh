#!/usr/bin/env bash
# Create .venv (if missing) and install Climber with a CPU build of PyTorch.
#   scripts/setup.sh        a user's install: Climber with the serve, plot and export extras (what the
#                           README's examples use); no Triton, no test tools
#   scripts/setup.sh dev    the dev extra as well: pytest, ruff, Triton for the kernel tests (test.sh)
# torch==2.13.0 is installed first so that the package's torch range is already satisfied and
# pip never pulls a multi-GB CUDA build; an existing torch in range is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="serve,plot,export"
[ "${1:-}" = dev ] && extras="dev"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import climber, torch; print(f'climber {climber.__version__} with torch {torch.__version__} ready in .venv')"
