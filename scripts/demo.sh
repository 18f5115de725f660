#!/usr/bin/env bash
# The demo: set up, train a teacher on the bundled digits, dump it once, distil students
# from the cache, and compare with labels alone and online distillation (5 seeds).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python scripts/demo.py "$@"
