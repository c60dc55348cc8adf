#!/usr/bin/env bash
# Idempotent set-up of a development / CI machine: Debian packages and a venv in .venv.
# Usage: tools/setup.sh [--no-apt]   (prints the venv's python path last)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || need_apt+=(libusb-1.0-0)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "${1:-}" != "--no-apt" ] && [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >&2
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv >&2
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project and its dev extras into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  # torch only serves the tools/ and the ONNX-vs-torch agreement test; the node never imports it.
  .venv/bin/python -m pip install -q -e ".[dev,realsense,train]" >&2
  # tensorrt-stubs declares TensorRT itself as a dependency, which cannot be fetched here:
  # install the stubs alone for mypy.
  .venv/bin/python -m pip install -q --no-deps "tensorrt-stubs>=10.0" >&2
  # pysparkplug (Sparkplug B payloads and topics) pins paho-mqtt<2 for a client the node does not
  # use: installed alone, beside paho-mqtt 2.
  .venv/bin/python -m pip install -q --no-deps "pysparkplug==0.6.*" >&2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# node-opcua, the independent OPC UA client of the interop tests (skipped without Node.js):
# about 15 s and 33 MB; again only when its lock file changes.
js=tests/interop/opcua
js_stamp=$js/node_modules/.installed-$(sha256sum "$js/package-lock.json" | cut -c1-16)
if command -v npm >/dev/null 2>&1 && [ ! -f "$js_stamp" ]; then
  echo "setup: installing node-opcua for the OPC UA interop tests" >&2
  (cd "$js" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
  touch "$js_stamp"
fi
echo "$here/.venv/bin/python"
