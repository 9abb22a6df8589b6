#!/usr/bin/env bash
# Installs what xlb's build and tests need on a fresh Debian machine. Idempotent: each
# step checks first and does nothing when it is already satisfied.
set -euo pipefail

step() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] FAILED at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "root" "run as root (apt, BPF and network namespaces need it)"

# 1. Debian packages the tests and demo use.
# bird2: the routing daemon of the announcement tests (each test starts its own, in its
# namespaces; the package's own service must not start on the host). buildah builds the
# image offline (cargo xtask image); podman with crun or runc runs it in the tests.
# prometheus ships promtool, which lints the agent's text exposition (its server is
# not started: the policy below).
PKGS=(iproute2 ethtool nftables iptables haproxy fonts-dejavu-core python3 bird2
      buildah podman crun runc binutils prometheus iputils-ping frr)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || fail "apt-get update" "cannot reach the Debian mirror"
  # No service may start on the host from these packages (bird2 ships one): a
  # policy-rc.d that refuses, only for this install, unless one is already there.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get install -y -q "${missing[@]}" >/dev/null || { [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d; fail "apt-get install" "could not install ${missing[*]}"; }
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
fi


# 1b. Prometheus' reference OpenMetrics parser (PyPI prometheus-client), for the
# metrics test, in the python3 the tests run.
if ! python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
  step "installing prometheus-client (PyPI) for python3"
  python3 -m pip install -q prometheus-client >/dev/null || fail "prometheus-client" "pip install prometheus-client failed"
fi

# kubernetes-validate (PyPI) validates the rendered kustomize base and overlays.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  step "installing kubernetes-validate (PyPI)"
  python3 -m pip install -q kubernetes-validate >/dev/null || fail "kubernetes-validate" "pip install kubernetes-validate failed"
fi
command -v kubectl >/dev/null 2>&1 || step "warning: no kubectl on PATH; the kustomize tests need one (this machine kind ships it)"

# 2. Rust: nightly with rust-src (the eBPF target is built with -Z build-std=core).
command -v rustup >/dev/null || fail "rustup" "rustup not found; this machine kind ships it"
if ! rustup toolchain list | grep -q '^nightly'; then
  step "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal || fail "nightly" "rustup could not install nightly"
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  step "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || fail "rust-src" "rustup component add failed"
fi

# 3. bpf-linker, linked against nightly's own libLLVM (plain cargo install fails here).
if ! bpf-linker --version >/dev/null 2>&1; then
  step "building bpf-linker against nightly's libLLVM (about 1-2 minutes)"
  sysroot=$(rustc +nightly --print sysroot)
  llvm_dir="$HOME/.cargo/bpf-linker-llvm22"
  mkdir -p "$llvm_dir/lib"
  lib=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -n1) || true
  [ -n "$lib" ] || fail "bpf-linker" "no libLLVM.so.* in $sysroot/lib"
  cp -f "$sysroot"/lib/libLLVM* "$llvm_dir/lib/"
  ln -sf "$(basename "$lib")" "$llvm_dir/lib/libLLVM.so"
  LLVM_PREFIX="$llvm_dir" cargo install bpf-linker --locked --no-default-features --features llvm-22 \
    || fail "bpf-linker" "cargo install bpf-linker failed (see above)"
fi

# 4. cargo-nextest, the test runner (preinstalled on this machine kind).
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked || fail "cargo-nextest" "cargo install failed"
fi

step "ok: packages, nightly+rust-src, bpf-linker $(bpf-linker --version | awk '{print $2}'), nextest"
