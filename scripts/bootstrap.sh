#!/usr/bin/env bash
# Make this checkout runnable on a fresh Debian or Raspberry Pi OS machine:
# system packages that are missing (Mosquitto, python3-venv, optionally Chromium),
# then a virtualenv in .venv with the project and its extras installed.
# Usage: scripts/bootstrap.sh [--with-chromium] [--extras dev|basestation|edge]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QFL_VENV:-$root/.venv}
extras=dev
with_chromium=0
while (($#)); do
  case "$1" in
    --with-chromium) with_chromium=1 ;;
    --extras) extras=$2; shift ;;
    *) echo "bootstrap: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have mosquitto || missing+=(mosquitto)
have mosquitto_passwd || missing+=(mosquitto-clients)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((with_chromium)) && ! have chromium; then missing+=(chromium); fi

if ((${#missing[@]})); then
  echo "bootstrap: installing system packages: ${missing[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtualenv $venv" >&2
  python3 -m venv "$venv"
fi
stamp="$venv/.qfl-installed"
want="$extras $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing qfl-testbed[$extras] into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
