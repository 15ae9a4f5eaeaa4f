#!/usr/bin/env bash
# Install the Debian packages a purpose needs, only those that are missing.
#   scripts/system-deps.sh demo   -> what `make demo` needs (python3-venv, mosquitto)
#   scripts/system-deps.sh test   -> what `make test` needs (+ postgresql, mbpoll)
set -euo pipefail
purpose="${1:-demo}"

need=()
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_mosquitto || need+=(mosquitto)
if [ "$purpose" = "test" ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
  # an independent Modbus master for the interoperability tests
  command -v mbpoll >/dev/null 2>&1 || need+=(mbpoll)
  # the browser the dashboard tests drive through Playwright (no browser downloads)
  [ -x /usr/bin/chromium ] || need+=(chromium)
fi

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "missing Debian packages: ${need[*]}" >&2
  echo "install them as root: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts a system-wide broker on 1883 where systemd runs; the demo starts its own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi
