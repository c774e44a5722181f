#!/usr/bin/env bash
# The test command (README): unit, integration and end-to-end tests, as root. It installs what
# the tests need first (scripts/install-deps.sh: containerd 1.7, runc, the CNI plugins, etcd,
# WireGuard tools, ...; idempotent), so on a fresh machine this one command is enough.
# The e2e tests run the real binaries (fleet-nri, fleet-cni, fleet-hub, fleet-controller)
# against real containerd and etcd in network namespaces, so the binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the tests create network namespaces and run containerd: run as root (prefix sudo)" >&2
  exit 1
fi
bash scripts/install-deps.sh
if [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "scripts/test.sh: cargo not found on PATH (install Rust: rustup.rs)" >&2; exit 1; }

cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
