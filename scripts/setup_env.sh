# Sourced by demo.sh and test.sh: create/use .venv and install kdcache into it.
# Usage: source scripts/setup_env.sh [EXTRA]   (EXTRA: "test" installs the test extra)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# a bare torch requirement would pull a multi-GB CUDA build: take the pinned CPU build first
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
    python -m pip install -q -e ".[test]"
else  # the demo draws its figures with matplotlib
    python -m pip install -q -e ".[plot]"
fi
