#!/usr/bin/env bash
# Builds the release binaries and runs every benchmark under bench/, as root, tee-ing all
# output into bench/results/latest.txt. Each benchmark ends with one line
#   bench <name> ours=<x> baseline=<y> ratio=<r> target=<t>
# and the summary at the end repeats those lines. Benchmarks never fail on a missed target;
# a benchmark that cannot run fails this script.
#
#   scripts/bench.sh                 # all of them
#   scripts/bench.sh cni-add pod-start
#   BENCH_ARGS_cni_add="--iterations 50" scripts/bench.sh cni-add
#   BENCH_APPEND=1 scripts/bench.sh cross-cluster-latency   # append a dated section instead
#
# cross-cluster-latency and cross-cluster-throughput run fleet-e2e's sandbox fleet (hub,
# relay, two NATed members with real containerd nodes, fleet-controller): they also need the
# release fleet-hub, fleet-controller and fleetctl, and wireguard-go, wg and iperf3; they and
# tunnel-throughput compare against trixie's wireguard-go (scripts/install-bench-deps.sh).
# dns-qps needs knot, bind9 and dnsperf (scripts/install-bench-deps.sh, run here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/bench.sh: the benchmarks create network namespaces and run containerd: run as root" >&2
  exit 1
fi
for tool in containerd runc ctr nsenter ip /usr/lib/cni/bridge /usr/lib/cni/host-local; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || {
    echo "scripts/bench.sh: $tool is missing; run scripts/install-deps.sh first" >&2
    exit 1
  }
done

benches=("$@")
[ ${#benches[@]} -gt 0 ] ||
  benches=(cni-add cni-del pod-start nri-memory tunnel-throughput cross-cluster-latency
    cross-cluster-throughput hub-store hub-scale sd-convergence sd-withdrawal dns-qps)
# dns-qps's baselines and load generator are needed by no test: installed here when missing.
# The tunnel benchmarks' baseline (trixie's wireguard-go, unpacked beside bookworm's) likewise.
for b in "${benches[@]}"; do
  if [ "$b" = dns-qps ] && ! { command -v knotd && command -v named && command -v dnsperf; } >/dev/null; then
    scripts/install-bench-deps.sh
  fi
  case "$b" in tunnel-throughput | cross-cluster-*)
    [ -x "${FLEET_BENCH_WG_GO_TRIXIE:-/opt/fleetboard-bench/wireguard-go-trixie/usr/bin/wireguard-go}" ] ||
      scripts/install-bench-deps.sh
    ;;
  esac
done

cargo build --release -p fleet-cni -p fleet-nri -p fleet-bench \
  -p fleet-hub -p fleet-controller -p fleetctl -p fleet-dns

mkdir -p bench/results
out=bench/results/latest.txt
target_dir=${CARGO_TARGET_DIR:-target}
tee_first=()
first_line=1
if [ "${BENCH_APPEND:-0}" = 1 ]; then
  tee_first=(-a)
  [ -f "$out" ] && first_line=$(($(wc -l <"$out") + 1))
fi
{
  echo "# scripts/bench.sh $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# $(uname -sr), $(nproc) cpus, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "${tee_first[@]}" "$out"
for b in "${benches[@]}"; do
  var="BENCH_ARGS_${b//-/_}"
  echo "## $b ${!var:-}" | tee -a "$out"
  # shellcheck disable=SC2086 # the extra args are meant to split
  "$target_dir/release/$b" ${!var:-} 2>&1 | tee -a "$out"
done
{
  echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# summary"
  tail -n +"$first_line" "$out" | grep '^bench '
} | tee -a "$out.tmp"
cat "$out.tmp" >> "$out" && rm -f "$out.tmp"
