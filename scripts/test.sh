#!/usr/bin/env bash
# The test command: set up .venv with the test extra and run the whole suite.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" test
python -m pytest -q "$@"
