#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest.
# Extra arguments go to pytest, e.g. scripts/run-tests.sh -k wire -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh" --with-chromium
cd "$root"
exec "${QFL_VENV:-$root/.venv}/bin/python" -m pytest "$@"
