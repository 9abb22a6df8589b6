#!/usr/bin/env bash
# Builds the xlb of older commits for the upgrade test (tests/tests/upgrade.rs), from
# the repository's own history, into target/upgrade-base/bin/xlb-COMMIT, once each. A
# second run finds them built and does nothing.
#
# The commits, each the last before a change an upgrade has to carry flows across:
# - d5150e9: the kernel's LRU maps under conntrack and reverse NAT;
# - b589409: xlb's own flow table, bucketed by the earlier flow hash (ten murmur3
#   rounds; lb_common::FLOW_TABLE_FORMAT).
set -euo pipefail
cd "$(dirname "$0")/.."
BASES=${XLB_UPGRADE_BASES:-"d5150e9 b589409"}
root=target/upgrade-base
mkdir -p "$root/bin"
for base in $BASES; do
  bin="$root/bin/xlb-$base"
  if [ -x "$bin" ]; then
    continue
  fi
  echo "[upgrade-base] building xlb at $base into $bin (once)"
  if ! git cat-file -e "$base^{commit}" 2>/dev/null; then
    # A shallow clone lacks the history the test builds from.
    git fetch -q --unshallow 2>/dev/null || true
    git cat-file -e "$base^{commit}" 2>/dev/null \
      || { echo "[upgrade-base] commit $base is not in this clone's history (shallow?); the upgrade test needs it" >&2; exit 1; }
  fi
  src="$root/src-$base"
  rm -rf "$src"
  mkdir -p "$src"
  git archive "$base" | tar -x -C "$src"
  # One target directory for every base: their dependencies are built once. git
  # archive dates every file at its commit's time, and cargo keeps a workspace crate
  # built from another base (same relative path) if its sources are older than that
  # build: dated now, they are newer, and rebuilt.
  find "$src" -type f -exec touch {} +
  (cd "$src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --quiet --bin xlb -p lb-userspace)
  cp "$root/target/debug/xlb" "$bin.tmp"
  mv "$bin.tmp" "$bin"
  rm -rf "$src"
done
