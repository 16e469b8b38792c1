#!/usr/bin/env bash
# Installs what building and testing Lumen needs, only where it is missing, so a second run is
# quick and needs no network: Debian packages (cmake/clang for Pingora's zlib-ng and llama.cpp,
# redis-server and redis-tools (redis-cli builds the test Redis Clusters), curl, openssl, nginx and strace for the benchmark, chromium and Node.js for the admin
# pages' browser test), promtool (taken out of Debian's `prometheus` package into .tools/, so no
# Prometheus server is installed or started), the admin pages' front-end packages (Swagger UI,
# ReDoc, uPlot; npm, pinned in src/admin/ui/package-lock.json), and the Python venv (.venv) with
# the openai SDK, the OpenAI Agents SDK, pytest and schemathesis pinned in tests/python/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake clang libclang-dev pkg-config redis-server redis-tools curl openssl nginx-light chromium strace)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # nginx is only a benchmark reference: never leave the distribution's instance running.
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
fi

scripts/ui-assets.sh

if [ ! -x .tools/promtool ]; then
  echo "== extracting promtool from Debian's prometheus package"
  work=$(mktemp -d)
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # apt-get download needs current package lists; refresh them only when it fails.
  if ! (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); then
    $SUDO apt-get update -qq
    (cd "$work" && apt-get download -qq prometheus >/dev/null)
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
  mkdir -p .tools
  install -m 0755 "$work/x/usr/bin/promtool" .tools/promtool
  rm -rf "$work"
fi

if [ ! -x .venv/bin/python ] || ! cmp -s tests/python/requirements.txt .venv/.requirements 2>/dev/null; then
  echo "== creating .venv (openai SDK, pytest)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt .venv/.requirements
fi
