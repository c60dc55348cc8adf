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
echo "== pytest"; "$bin/pytest" -q "$@"
