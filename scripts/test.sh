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
# shellcheck disable=SC1091 # scripts/need-rust.sh is checked on its own
. scripts/need-rust.sh
need_rust scripts/test.sh
bash scripts/install-deps.sh

cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
