#!/usr/bin/env bash
# fleetboard on three kind clusters: the hub `cc`, members `aa` and `bb` (two nodes each, the
# same pod CIDR), images from scripts/build-images.sh loaded with `kind load image-archive`,
# fleetboard installed from deploy/, a Service exported in `aa` with a ServiceExport and
# fetched from a pod in `bb` by its clusterset name.
#
# Needs a container engine for kind (Docker or Podman), kind, kubectl, a Rust toolchain and
# umoci (scripts/build-images.sh). The sandbox machines have no container engine, so this
# script is not run in CI: it is checked by shellcheck (scripts/test.sh) and every step names
# the sandbox e2e test (e2e/tests/, controller/tests/) that proves the same logic on real
# containerd nodes in network namespaces.
#
# Usage: e2e/kind.sh [--keep] [--no-build]
#   --keep      leave the clusters running (delete: kind delete cluster --name cc|aa|bb)
#   --no-build  use the image archives already in target/images
set -euo pipefail

here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
keep=0
build=1
while [ "$#" -gt 0 ]; do
	case "$1" in
	--keep) keep=1; shift ;;
	--no-build) build=0; shift ;;
	-h | --help) sed -n '2,17p' "$0"; exit 0 ;;
	*) echo "kind.sh: unknown argument '$1' (see --help)" >&2; exit 1 ;;
	esac
done

for tool in kind kubectl cargo; do
	command -v "$tool" >/dev/null || { echo "kind.sh: $tool not found" >&2; exit 1; }
done

members=(aa bb)
pod_cidr=10.244.0.0/16   # the same in both members: the fleet network does not care
images=$here/target/images
work=$(mktemp -d "${TMPDIR:-/tmp}/fleet-kind.XXXXXX")
web_image=registry.k8s.io/e2e-test-images/agnhost:2.53
client_image=busybox:1.36   # nslookup, wget

cleanup() {
	rm -rf -- "$work"
	if [ "$keep" -eq 0 ]; then
		for c in cc "${members[@]}"; do
			kind delete cluster --name "$c" >/dev/null 2>&1 || true
		done
	fi
}
trap cleanup EXIT

log() { printf '\n== %s\n' "$*"; }
k() { local c=$1; shift; kubectl --context "kind-$c" "$@"; }

# Polls `cmd...` every 2 s until it succeeds or `secs` pass.
wait_for() {
	local what=$1 secs=$2; shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			echo "kind.sh: timed out after ${secs}s waiting for $what" >&2
			return 1
		fi
		sleep 2
	done
}

# 1. Images: OCI archives without a Docker engine, one per binary.
#    Proven by e2e/tests/images.rs `every_image_imports_and_its_binary_runs` (each archive
#    imports with `ctr images import`, what `kind load image-archive` runs on the node).
if [ "$build" -eq 1 ]; then
	log "building the images"
	"$here/scripts/build-images.sh" --profile release --out "$images"
fi
for img in fleet-hub fleet-nri fleet-controller fleet-dns; do
	[ -f "$images/$img.tar" ] || { echo "kind.sh: $images/$img.tar missing (run without --no-build)" >&2; exit 1; }
done

# 2. Clusters. containerd 1.7 in kindest/node needs NRI switched on (fleet-nri is an NRI
#    plugin); the members get the same pod CIDR and a worker each.
#    Proven by e2e/tests/fleet.rs `cross_cluster_pods_talk_through_the_relay_and_the_internet_sees_only_wireguard`
#    (two members with the same pod CIDR, two containerd nodes each) and
#    e2e/tests/node_datapath.rs `fleet_nri_registers_again_within_2s_of_a_containerd_restart`
#    (fleet-nri over containerd 1.7's NRI).
cluster_config() {
	local workers=$1
	cat <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  podSubnet: $pod_cidr
containerdConfigPatches:
  - |-
    [plugins."io.containerd.nri.v1.nri"]
      disable = false
      socket_path = "/var/run/nri/nri.sock"
nodes:
  - role: control-plane
EOF
	local i
	for ((i = 0; i < workers; i++)); do
		echo "  - role: worker"
	done
}
log "creating the clusters cc, ${members[*]}"
cluster_config 0 >"$work/cc.yaml"
cluster_config 1 >"$work/member.yaml"
kind create cluster --name cc --config "$work/cc.yaml" --wait 120s
for m in "${members[@]}"; do
	kind create cluster --name "$m" --config "$work/member.yaml" --wait 120s
done

# 3. Images onto the nodes.
#    Proven by e2e/tests/images.rs `the_fleet_nri_image_runs_as_the_daemonset_pod_and_serves_the_node`
#    (the imported fleet-nri image run through CRI as the DaemonSet's pod).
log "loading the images"
kind load image-archive "$images/fleet-hub.tar" --name cc
for m in "${members[@]}"; do
	for img in fleet-nri fleet-controller fleet-dns; do
		kind load image-archive "$images/$img.tar" --name "$m"
	done
done

# 4. The hub in cc: API on NodePort 30443, relay on 31820/UDP of cc's node (all kind nodes
#    share the `kind` network, so the members reach it there).
#    Proven by e2e/tests/fleet.rs `members_reach_the_hub_only_through_their_nat` (members
#    join and follow the hub from behind NAT) and controller/tests/controller.rs.
hub_ip=$(k cc get node cc-control-plane -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
log "installing the hub on cc ($hub_ip)"
cp -r "$here/deploy" "$work/deploy"
sed -i "s/relay-endpoint=.*/relay-endpoint=$hub_ip:31820/" "$work/deploy/overlays/hub/kustomization.yaml"
kubectl kustomize "$work/deploy/overlays/hub" | k cc apply -f -
k cc -n fleetboard-hub rollout status statefulset/fleet-hub --timeout=180s

# 5. Each member: a join token, the node-API CA and certificates, the Secrets, deploy/.
#    The controller runs on any node, learns the nodes from Node objects and drives every
#    fleet-nri over TCP with mutual TLS: controller/tests/node_api_tls.rs
#    `a_controller_on_another_node_drives_fleet_nri_over_tcp` and
#    `the_node_api_over_tcp_serves_only_clients_of_the_node_api_ca_and_the_client_only_its_daemons`;
#    it writes its credential to the Secret at the first join: controller/tests/kube_mcs.rs
#    `the_credential_secret_is_created_once_read_back_and_waited_for`; both with the
#    Kubernetes API (Node objects, the Secret) and a real hub and fleet-nri:
#    controller/tests/node_api_tls.rs
#    `with_the_kubernetes_api_nodes_come_from_node_objects_and_the_credential_from_a_secret`;
#    nodes planned and
#    peered over the overlay: e2e/tests/multi_node.rs
#    `pods_on_two_nodes_reach_each_other_over_the_overlay_the_controller_programs`.
controller_bin=$here/target/release/fleet-controller
[ -x "$controller_bin" ] || cargo build --release -p fleet-controller --manifest-path "$here/Cargo.toml"
for m in "${members[@]}"; do
	log "installing fleetboard on $m"
	join=$(k cc -n fleetboard-hub exec fleet-hub-0 -- \
		fleet-hub --hub 127.0.0.1:7443 --data-dir=/var/lib/fleetboard/hub token create --ttl 1h)
	"$controller_bin" node-api-certs --out "$work/certs-$m"
	k "$m" apply -f "$here/deploy/member/namespace.yaml"
	k "$m" -n fleetboard-system create secret generic fleet-join --from-literal=join="$join"
	k "$m" -n fleetboard-system create secret generic fleet-node-api-tls \
		--from-file="$work/certs-$m/node"
	k "$m" -n fleetboard-system create secret generic fleet-controller-node-api-tls \
		--from-file="$work/certs-$m/controller"
	overlay=$work/deploy/overlays/member-$m
	cp -r "$work/deploy/overlays/member" "$overlay"
	sed -i -e "s/cluster=aa/cluster=$m/" \
		-e "s/hub=.*/hub=$hub_ip:30443/" \
		-e "s/gateway-node=.*/gateway-node=$m-control-plane/" "$overlay/kustomization.yaml"
	sed -i "s/aa-control-plane/$m-control-plane/" "$overlay/fleet-dns-on-gateway-node.yaml"
	kubectl kustomize "$overlay" | k "$m" apply -f -
	# kind's CoreDNS with the clusterset.local forward to fleet-dns.
	k "$m" apply -k "$here/deploy/coredns"
	k "$m" -n kube-system rollout restart deployment/coredns
done

# 6. Everything up: every node's fleet-nri, the active controller (its Secret written at the
#    join), both fleet-dns.
#    Proven by e2e/tests/fleet.rs `fault_controller_kill9_standby_resumes_within_5s`
#    (two replicas, one active) and e2e/tests/services.rs (fleet-dns following the hub).
for m in "${members[@]}"; do
	log "waiting for fleetboard on $m"
	k "$m" -n fleetboard-system rollout status daemonset/fleet-nri --timeout=180s
	k "$m" -n fleetboard-system rollout status deployment/fleet-controller --timeout=180s
	wait_for "the credential Secret in $m" 180 k "$m" -n fleetboard-system get secret fleet-credential
	k "$m" -n fleetboard-system rollout status deployment/fleet-dns --timeout=180s
	k "$m" -n fleetboard-system rollout status deployment/fleet-dns-gateway --timeout=180s
done

# 7. A web Service in aa, exported with a ServiceExport; the namespace exists in bb too
#    (imports are made only where their namespace exists).
#    Proven by e2e/tests/services.rs `a_service_exported_in_aa_is_fetched_by_name_from_bb_and_follows_its_endpoints`
#    (the export, its VIP, the endpoints at fleet addresses) and controller/tests/kube_mcs.rs
#    `service_exports_are_read_their_status_written_and_imports_mirrored_as_mcs_objects`
#    (ServiceExport → export, its conditions, ServiceImport + MCS EndpointSlices).
log "exporting demo/web from aa"
for m in "${members[@]}"; do
	k "$m" create namespace demo
done
k aa -n demo create deployment web --image="$web_image" --replicas=2 -- /agnhost netexec --http-port=8080
k aa -n demo expose deployment web --port=80 --target-port=8080
k aa -n demo rollout status deployment/web --timeout=180s
sed 's/namespace: default/namespace: demo/' "$here/deploy/examples/serviceexport.yaml" | k aa apply -f -
wait_for "ServiceExport demo/web to be Valid" 120 \
	k aa -n demo wait --for=condition=Valid serviceexport.multicluster.x-k8s.io/web --timeout=5s
wait_for "ServiceImport demo/web in bb" 120 \
	k bb -n demo get serviceimport.multicluster.x-k8s.io web

# 8. From a pod in bb: web.demo.svc.clusterset.local through CoreDNS (→ fleet-dns) and
#    straight from the DNS VIP (→ fleet-dns in the gateway node's CNF netns), then HTTP to the
#    ClusterSetIP VIP over eth-fleet, across the tunnel to aa's pods.
#    Proven by e2e/tests/services.rs `a_service_exported_in_aa_is_fetched_by_name_from_bb_and_follows_its_endpoints`
#    (the name through the DNS VIP, HTTP to the VIP) and e2e/tests/fleet.rs
#    `cross_cluster_pods_talk_through_the_relay_and_the_internet_sees_only_wireguard`.
log "fetching web.demo.svc.clusterset.local from bb"
k bb -n demo run client --image="$client_image" --restart=Never -- sleep 3600
k bb -n demo wait --for=condition=Ready pod/client --timeout=180s
vip=$(k bb -n demo get serviceimport.multicluster.x-k8s.io web -o jsonpath='{.spec.ips[0]}')
dns_vip=100.112.0.1   # the first address of --vip-range (default 100.112.0.0/16)
wait_for "the name at the DNS VIP" 60 \
	k bb -n demo exec client -- nslookup web.demo.svc.clusterset.local "$dns_vip"
wait_for "the name through CoreDNS" 60 \
	k bb -n demo exec client -- nslookup web.demo.svc.clusterset.local
hostname=$(k bb -n demo exec client -- wget -qO- -T 5 http://web.demo.svc.clusterset.local/hostname)
case "$hostname" in
web-*) ;;
*)
	echo "kind.sh: expected a web pod's hostname from aa, got '$hostname'" >&2
	exit 1
	;;
esac
echo "bb → web.demo.svc.clusterset.local ($vip) answered by $hostname in aa"
echo "kind.sh: ok"
