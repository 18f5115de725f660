#!/usr/bin/env bash
# The test command: set up .venv with the test extra and run the whole suite.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" test
# two workers (pytest-xdist): ~13 min on a 2-core box instead of ~22; the torchrun tests
# (xdist_group "torchrun") run one at a time on one worker, never two 2-rank jobs at once
python -m pytest -q -n 2 --dist loadgroup "$@"
