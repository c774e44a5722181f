#!/usr/bin/env bash
# The main job on a fresh machine: install the runtime pieces, build fleetboard, and run a local
# fleet (hub cc, member clusters aa and bb behind NAT, two containerd nodes each, pods talking
# across clusters over WireGuard) until Ctrl-C.
# Pass --once to tear down right after the demo, --pods N for more pods.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "local-fleet.sh: run as root (it installs packages, creates netns and runs containerd)" >&2
  exit 1
fi
# shellcheck disable=SC1091 # scripts/need-rust.sh is checked on its own
. scripts/need-rust.sh
need_rust local-fleet.sh
bash scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/fleet-sandbox "$@"
