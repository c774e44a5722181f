#!/usr/bin/env bash
# Installs everything fleetboard's tests and benchmarks need on a fresh Debian 12 machine.
# containerd comes from trixie (1.7.x, NRI v0.x) pinned at priority 100 so nothing else is
# upgraded from trixie; runc and the CNI plugins come from bookworm.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: must run as root (apt-get)" >&2
  exit 1
fi

if ! grep -rqs 'Suites: trixie' /etc/apt/sources.list.d/; then
  cat >/etc/apt/sources.list.d/fleetboard-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
cat >/etc/apt/preferences.d/fleetboard-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# chromium (bookworm's): the fleet board's real-browser test (hub/tests/board.rs).
apt-get install -y -qq --no-install-recommends \
  containerd/trixie runc containernetworking-plugins \
  iproute2 nftables busybox-static protobuf-compiler iperf3 socat procps gcc libc6-dev \
  etcd-server etcd-client wireguard-go wireguard-tools tcpdump libprotobuf-dev dnsutils \
  faketime umoci jq openssl chromium shellcheck ethtool \
  >/dev/null
# trixie's wireguard-go beside bookworm's (the interop tests and tunnel benchmarks run both).
"$(dirname "$0")"/install-wireguard-go-trixie.sh
echo "containerd from trixie (NRI needs >= 1.7; bookworm has 1.6): $(containerd --version)"
