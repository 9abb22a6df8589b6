#!/usr/bin/env bash
# The test command: set up, lint, build, run every test (privileged ones included),
# and report how many privileged tests ran. With CI=true a privileged test that cannot
# run is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all --check
echo "[test] cargo clippy -D warnings (userspace crates)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] building binaries"
# Default members only: lb-ebpf's host build is an empty binary also named xlb.
cargo build --bins --quiet
echo "[test] building the container image (cargo xtask image: offline, FROM scratch)"
# The container tests run this image; building it is part of what is tested.
cargo xtask image
echo "[test] building the older xlb the upgrade test starts from (once; target/upgrade-base)"
bash scripts/upgrade_base.sh
echo "[test] running tests"
status=0
# Reliability tests append their counts here (packets fuzzed, flows churned, failures).
rm -f target/reliability.jsonl
cargo nextest run --workspace --profile ci --no-fail-fast || status=$?
if [ -s target/reliability.jsonl ]; then
  echo "[test] reliability:"
  sed 's/^/[test]   /' target/reliability.jsonl
fi
echo "[test] benchmark smoke run (cargo xtask bench --quick; reports, asserts no time)"
cargo xtask bench --quick || status=1
python3 scripts/junit_summary.py target/nextest/ci/junit.xml || status=1
exit $status
