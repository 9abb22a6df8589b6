#!/usr/bin/env bash
# Builds the xlb of an older commit for the upgrade test (tests/tests/upgrade.rs): the
# last commit before the field issue's work, from the repository's own history, into
# target/upgrade-base/, once. A second run finds it built and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${XLB_UPGRADE_BASE:-d5150e9}
out=target/upgrade-base
if [ -x "$out/target/debug/xlb" ] && [ "$(cat "$out/commit" 2>/dev/null)" = "$BASE" ]; then
  exit 0
fi
echo "[upgrade-base] building xlb at $BASE into $out (once)"
if ! git cat-file -e "$BASE^{commit}" 2>/dev/null; then
  # A shallow clone lacks the history the test builds from.
  git fetch -q --unshallow 2>/dev/null || true
  git cat-file -e "$BASE^{commit}" 2>/dev/null \
    || { echo "[upgrade-base] commit $BASE is not in this clone's history (shallow?); the upgrade test needs it" >&2; exit 1; }
fi
rm -rf "$out/src"
mkdir -p "$out/src"
git archive "$BASE" | tar -x -C "$out/src"
(cd "$out/src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --quiet --bin xlb -p lb-userspace)
echo "$BASE" > "$out/commit"
