#!/usr/bin/env bash
# Installs what only the benchmarks need (never the tests): the DNS baselines of `dns-qps`
# (Knot DNS, BIND 9) and the load generator (dnsperf), from bookworm; and the tunnel
# benchmarks' baseline, trixie's wireguard-go 0.0.20231211 (TUN TSO/GRO, UDP GSO/GRO, batched
# I/O), unpacked from its .deb into $WG_GO_TRIXIE_DIR beside bookworm's /usr/bin/wireguard-go
# (0.0.20220316), which stays installed: never `-t trixie`, nothing of trixie is installed.
# It is a static Go binary, so it runs on bookworm as it is. The packages' own
# services are not started: a policy-rc.d that refuses (exit 101) is put in place for the
# install if none is there, and removed again; the benchmark runs its own instances on
# loopback high ports and stops them by PID.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-bench-deps.sh: must run as root (apt-get)" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends knot bind9 dnsperf >/dev/null
# trixie's wireguard-go, pinned by version; `apt-get download` needs the trixie source that
# scripts/install-deps.sh adds (pinned at priority 100) for containerd.
WG_GO_TRIXIE_VERSION=0.0.20231211-1+b9
WG_GO_TRIXIE_DIR=${WG_GO_TRIXIE_DIR:-/opt/fleetboard-bench/wireguard-go-trixie}
if [ ! -x "$WG_GO_TRIXIE_DIR/usr/bin/wireguard-go" ] ||
  [ "$(cat "$WG_GO_TRIXIE_DIR/VERSION" 2>/dev/null)" != "$WG_GO_TRIXIE_VERSION" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "wireguard-go=$WG_GO_TRIXIE_VERSION")
  rm -rf "$WG_GO_TRIXIE_DIR"
  mkdir -p "$WG_GO_TRIXIE_DIR"
  dpkg -x "$tmp"/wireguard-go_*.deb "$WG_GO_TRIXIE_DIR"
  echo "$WG_GO_TRIXIE_VERSION" >"$WG_GO_TRIXIE_DIR/VERSION"
  rm -rf "$tmp"
fi
echo "wireguard-go (trixie) $WG_GO_TRIXIE_VERSION: $WG_GO_TRIXIE_DIR/usr/bin/wireguard-go"
echo "wireguard-go (bookworm) $(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || echo missing): /usr/bin/wireguard-go"
knotd --version
named -v
dnsperf -h 2>&1 | head -1 || true
