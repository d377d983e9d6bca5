#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need on a fresh Debian 12 machine:
# Debian's Rust 1.96 with a prebuilt `core` for BPF, LLVM 22, bpf-linker built against it,
# nginx and the networking tools the namespace tests drive. Safe to run again: every step
# checks whether its result is already there.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: must run as root (apt-get, BPF and network namespaces need it)" >&2
    exit 1
fi

packages=(
    rustc-web libstd-rust-web-dev-bpf llvm-22-dev
    libzstd-dev zlib1g-dev
    nginx-light curl iproute2 procps ethtool
    # cargo xtask bench: load generator, the balancers it compares against, the chart's font
    wrk haproxy nftables fonts-dejavu-core
)

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The Debian nginx package starts a system-wide nginx on port 80; the demo and tests run their
# own instances inside namespaces and never need that one.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [[ ! -x "$HOME/.cargo/bin/bpf-linker" ]]; then
    echo "install-deps: building bpf-linker against LLVM 22 (about a minute)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version '^0.13' \
        --no-default-features --features llvm-22
fi

echo "install-deps: done"
