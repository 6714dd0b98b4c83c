#!/usr/bin/env bash
# The edge tests on Raspberry Pi OS Bookworm's Python stack: Python 3.11, numpy 1.24.4 (what apt's
# python3-numpy is), tflite-runtime 2.14 (its last release, built for numpy 1), in a second virtualenv
# .venv-pi. Runs the fixed-point engine, wire format and inference tests there (see docs/export.md).
# Usage: scripts/run-edge-tests-pi-stack.sh [pytest args...]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QFL_PI_VENV:-$root/.venv-pi}
python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    python=$candidate; break
  fi
done
if [ -z "$python" ]; then
  echo "run-edge-tests-pi-stack: no Python 3.11 found (Raspberry Pi OS Bookworm's version); install python3.11" >&2
  exit 1
fi

# cryptography 38.0.4 is Bookworm's python3-cryptography (Ed25519 model signatures).
pins=(numpy==1.24.4 tflite-runtime==2.14.0 tflite==2.18.0 "flatbuffers>=23.1" "pyserial>=3.5" "paho-mqtt>=2.0"
      cryptography==38.0.4 "pytest>=7.4" "hypothesis>=6.80")
want="sklearn-nodeps $(printf '%s ' "${pins[@]}") $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
stamp="$venv/.qfl-pi-installed"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "run-edge-tests-pi-stack: installing ${pins[*]} into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
  # The digits' CSV ships inside scikit-learn; the data loader reads the file and never imports sklearn,
  # so the wheel goes in without its dependencies (no scipy on this leg).
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps scikit-learn==1.3.2
  # The project itself without its dependency resolution, so nothing upgrades numpy past 1.24.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import numpy, tflite_runtime, sys; print(f"pi stack: Python {sys.version.split()[0]}, numpy {numpy.__version__}, tflite-runtime {tflite_runtime.__version__}")'

cd "$root"
exec "$venv/bin/python" -m pytest -p no:cacheprovider \
  tests/test_infer.py tests/test_fixedpoint.py tests/test_layers.py tests/test_lowbit.py tests/test_gemm.py \
  tests/test_wire_bits.py tests/test_wire_message.py tests/test_wire_vectors.py "$@"
