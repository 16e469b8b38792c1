#!/usr/bin/env bash
# Installs the admin pages' front-end packages (Swagger UI, ReDoc, uPlot, and playwright-core
# for their browser test) into src/admin/ui/node_modules, exactly as package-lock.json pins
# them, from the npm registry; Node.js and npm from Debian when missing. A no-op when they are
# already there. The gateway reads them from disk at run time and never from a CDN; without
# them it still runs, and /docs and /ui say how to install them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v npm >/dev/null 2>&1; then
  echo "== installing Node.js and npm"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# src/admin/ui/.npmrc turns install scripts off.
if ! cmp -s src/admin/ui/package-lock.json src/admin/ui/node_modules/.lumen-lock 2>/dev/null; then
  echo "== installing the admin pages' front-end packages (npm ci in src/admin/ui)"
  (cd src/admin/ui && npm ci --no-audit --no-fund >/dev/null)
  cp src/admin/ui/package-lock.json src/admin/ui/node_modules/.lumen-lock
fi
