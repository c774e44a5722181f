#!/usr/bin/env bash
# The test command (README): unit, integration and end-to-end tests, as root.
# The e2e tests run the real binaries (fleet-nri, fleet-cni) against real containerd in
# network namespaces, so the binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the tests create network namespaces and run containerd: run as root" >&2
  exit 1
fi
for tool in containerd runc ctr nsenter ip /usr/lib/cni/bridge; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || {
    echo "scripts/test.sh: $tool is missing; run scripts/install-deps.sh first" >&2
    exit 1
  }
done

cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
