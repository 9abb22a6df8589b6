#!/usr/bin/env bash
# The main command: set up, build, and run the demo on its built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --quiet
exec cargo xtask demo "$@"
