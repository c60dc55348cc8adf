#!/usr/bin/env bash
# The acceptance checks at full size, outside CI (the suite runs them smaller to stay under
# 10 minutes on 2 cores): the 500-item tracking acceptance and the 200-item end-to-end run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="$(bash tools/setup.sh)"
CV_LONG_CHECKS=1 "$(dirname "$py")/pytest" -q \
  "tests/perception/test_tracking.py::test_acceptance_500_items_detected_tied_and_measured" \
  "tests/pipeline/test_node.py::test_every_announced_item_gets_exactly_one_actuation_verdict" \
  "$@"
