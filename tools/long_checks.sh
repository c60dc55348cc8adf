#!/usr/bin/env bash
# The acceptance checks at full size, outside CI (the suite runs them smaller to stay under
# 10 minutes on 2 cores): the 500-item tracking acceptance, the 200-item end-to-end run, replay
# of a 200-item demo run and the full-size benchmark splits (train 3000 + val 1500 + test 2000
# items in under 12 minutes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="$(bash tools/setup.sh)"
CV_LONG_CHECKS=1 "$(dirname "$py")/pytest" -q \
  "tests/perception/test_tracking.py::test_acceptance_500_items_detected_tied_and_measured" \
  "tests/pipeline/test_node.py::test_every_announced_item_gets_exactly_one_actuation_verdict" \
  "tests/commands/test_replay.py" \
  "tests/sim/test_splits.py::test_full_size_splits_generate_in_time" \
  "$@"
# Site learning at full size (the suite runs it small: tests/training/test_site_learning.py):
# a synthetic site's labels -> edge-node train -> shadow -> bundle -> shadow gate -> fresh run.
mkdir -p test-output
"$py" tools/site_learning_e2e.py --json test-output/site_learning_e2e.json > /dev/null
