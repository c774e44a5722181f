#!/usr/bin/env bash
# Installs what only the benchmarks need (never the tests): the DNS baselines of `dns-qps`
# (Knot DNS, BIND 9) and the load generator (dnsperf), from bookworm; and (again, in case
# install-deps.sh is older) the tunnel benchmarks' baseline, trixie's wireguard-go 0.0.20231211
# unpacked beside bookworm's (scripts/install-wireguard-go-trixie.sh). The packages' own
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
"$(dirname "$0")"/install-wireguard-go-trixie.sh
echo "wireguard-go (bookworm) $(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || echo missing): /usr/bin/wireguard-go"
knotd --version
named -v
dnsperf -h 2>&1 | head -1 || true
