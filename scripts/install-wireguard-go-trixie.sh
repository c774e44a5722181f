#!/usr/bin/env bash
# Unpacks Debian trixie's wireguard-go 0.0.20231211 (TUN TSO/GRO via IFF_VNET_HDR, UDP
# GSO/GRO, batched I/O; its binary prints v0.0.20230223) into $WG_GO_TRIXIE_DIR, beside
# bookworm's /usr/bin/wireguard-go 0.0.20220316, which stays installed: `apt-get download` +
# `dpkg -x`, never `-t trixie`, so nothing of trixie is installed. It is a static Go binary and
# runs on bookworm as it is. The interop test and the tunnel benchmarks run both builds.
# Needs the trixie source that scripts/install-deps.sh adds (pinned at priority 100) and a
# fresh `apt-get update`. Idempotent: does nothing when that version is already unpacked.
set -euo pipefail

WG_GO_TRIXIE_VERSION=0.0.20231211-1+b9
WG_GO_TRIXIE_DIR=${WG_GO_TRIXIE_DIR:-/opt/fleetboard-bench/wireguard-go-trixie}
if [ ! -x "$WG_GO_TRIXIE_DIR/usr/bin/wireguard-go" ] ||
  [ "$(cat "$WG_GO_TRIXIE_DIR/VERSION" 2>/dev/null)" != "$WG_GO_TRIXIE_VERSION" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq "wireguard-go=$WG_GO_TRIXIE_VERSION")
  rm -rf "$WG_GO_TRIXIE_DIR"
  mkdir -p "$WG_GO_TRIXIE_DIR"
  dpkg -x "$tmp"/wireguard-go_*.deb "$WG_GO_TRIXIE_DIR"
  echo "$WG_GO_TRIXIE_VERSION" >"$WG_GO_TRIXIE_DIR/VERSION"
fi
echo "wireguard-go (trixie) $WG_GO_TRIXIE_VERSION for the interop tests and benchmarks, beside bookworm's: $WG_GO_TRIXIE_DIR/usr/bin/wireguard-go"
