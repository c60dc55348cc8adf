#!/usr/bin/env bash
# Run the node on its embedded defaults: synthetic cameras, ONNX Runtime on CPU, local mosquitto.
# Extra arguments go to `edge-node demo` (e.g. --seconds 60 --summary-json out.json).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="$(bash tools/setup.sh)"
exec "$(dirname "$py")/edge-node" demo "$@"
