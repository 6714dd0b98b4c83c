#!/usr/bin/env bash
# The main job: the emulated testbed end to end, with a report.
# Extra arguments go to 'qfl testbed', e.g. scripts/run-testbed.sh --devices 8 --rounds 20
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh" --extras dev
cd "$root"
exec "${QFL_VENV:-$root/.venv}/bin/qfl" testbed "$@"
