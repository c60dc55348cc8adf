#!/usr/bin/env bash
# The test command: lint, type-check and the whole suite (real mosquitto, pyrealsense2, ONNX Runtime).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="$(bash tools/setup.sh)"
bin="$(dirname "$py")"
echo "== ruff"; "$bin/ruff" check edge calibration tools tests
echo "== mypy"; "$bin/mypy"
echo "== lint-imports"; "$bin/lint-imports"
# pytest-xdist, one worker per core up to 4 (CI: 2 cores, 2 workers); CV_TEST_WORKERS=0 runs
# the suite in this process, and arguments given here come last, so `-n 0` works too.
# loadgroup: tests sharing a module or package fixture run in one worker
# (tests/xdist_scheduling.py).
cores="$(nproc)"
workers="${CV_TEST_WORKERS:-$((cores < 4 ? cores : 4))}"
echo "== pytest"; "$bin/pytest" -q -n "$workers" --dist loadgroup "$@"
