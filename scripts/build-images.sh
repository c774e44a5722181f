#!/usr/bin/env bash
# Builds OCI image archives of fleetboard's binaries without a Docker engine: one OCI layout
# per image, kept by umoci (Debian's `umoci`: the OCI project's own layout tool), tarred
# into <out>/<image>.tar. `ctr -n k8s.io images import <image>.tar` and
# `kind load image-archive <image>.tar` (which runs that same `ctr images import` on the node)
# accept it; the image is named by the index's `io.containerd.image.name` annotation.
#
# Each image is one layer: the binary in /usr/local/bin plus every library `ldd` lists (the
# binaries link glibc dynamically), so no base image and no registry is needed. fleet-nri's
# image also carries what its pod needs besides the daemon: `nft` (the VIP table is applied
# through `nft -j`), Debian's static busybox (a shell for the init container) and, in
# /opt/fleetboard, fleet-cni with install.sh (the init container installs it on the host).
set -euo pipefail

here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
profile=release
target_dir=${CARGO_TARGET_DIR:-$here/target}
out=
registry=fleetboard.local
tag=
build=true
images=()
all_images=(fleet-nri fleet-controller fleet-dns fleet-hub fleetctl)

usage() {
	cat <<EOF
Usage: scripts/build-images.sh [--profile release|debug] [--target-dir DIR] [--out DIR]
                               [--registry NAME] [--tag TAG] [--no-build] [IMAGE...]

  IMAGE            one of: ${all_images[*]} (default: all)
  --profile P      cargo profile whose binaries go into the images (default: $profile)
  --target-dir D   cargo target dir (default: \$CARGO_TARGET_DIR or ./target)
  --out DIR        where <image>.tar is written (default: <target-dir>/images)
  --registry NAME  image name prefix (default: $registry; deploy/ uses it)
  --tag TAG        image tag (default: the workspace version)
  --no-build       use the binaries already built, do not run cargo
EOF
}

die() {
	echo "build-images.sh: $*" >&2
	exit 1
}

need_value() {
	if [ "$#" -lt 2 ] || [ -z "$2" ]; then
		die "$1 needs a value (see --help)"
	fi
}

while [ "$#" -gt 0 ]; do
	case "$1" in
	--profile) need_value "$@"; profile=$2; shift 2 ;;
	--target-dir) need_value "$@"; target_dir=$2; shift 2 ;;
	--out) need_value "$@"; out=$2; shift 2 ;;
	--registry) need_value "$@"; registry=$2; shift 2 ;;
	--tag) need_value "$@"; tag=$2; shift 2 ;;
	--no-build) build=false; shift ;;
	-h | --help) usage; exit 0 ;;
	-*) die "unknown option '$1' (see --help)" ;;
	*) images+=("$1"); shift ;;
	esac
done

[ "${#images[@]}" -gt 0 ] || images=("${all_images[@]}")
for image in "${images[@]}"; do
	case " ${all_images[*]} " in
	*" $image "*) ;;
	*) die "unknown image '$image'; one of: ${all_images[*]}" ;;
	esac
done
case "$profile" in
release | debug) ;;
*) die "--profile is release or debug, not '$profile'" ;;
esac
for tool in umoci jq ldd tar sha256sum; do
	command -v "$tool" >/dev/null || die "$tool not found (apt-get install umoci jq; scripts/install-deps.sh installs them)"
done
if [ -z "$tag" ]; then
	tag=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$here/Cargo.toml")
	[ -n "$tag" ] || die "no version in $here/Cargo.toml's [workspace.package]; pass --tag"
fi
bin_dir=$target_dir/$profile
out=${out:-$target_dir/images}
mkdir -p -- "$out"

if [ "$build" = true ]; then
	# Each binary's crate has the binary's name; fleet-cni rides in fleet-nri's image.
	packages=()
	for image in "${images[@]}"; do
		packages+=(-p "$image")
		[ "$image" = fleet-nri ] && packages+=(-p fleet-cni)
	done
	cargo_profile=()
	[ "$profile" = release ] && cargo_profile=(--release)
	(cd "$here" && cargo build "${cargo_profile[@]}" --target-dir "$target_dir" "${packages[@]}")
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fleet-images.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

# Copies an executable and every library ldd resolves for it into the rootfs, at the same
# paths (the dynamic loader's included), so it runs in an otherwise empty image.
add_executable() {
	local rootfs=$1 src=$2 dst=$3 lib
	install -D -m 0755 -- "$src" "$rootfs$dst"
	# `ldd` prints "name => /path (addr)" or "/path (addr)"; a static binary prints neither.
	while read -r lib; do
		# Keep the mode: the dynamic loader must stay executable (the kernel execs it).
		[ -e "$rootfs$lib" ] || install -D -m "$(stat -L -c %a -- "$lib")" -- "$lib" "$rootfs$lib"
	done < <(ldd "$src" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p')
}

build_image() {
	local name=$1 ref="$registry/$1:$tag" rootfs="$work/$1/rootfs" layout="$work/$1/layout"
	local bin="$bin_dir/$name"
	[ -x "$bin" ] || die "$bin not built (drop --no-build, or cargo build -p $name)"
	mkdir -p -- "$rootfs/tmp" "$rootfs/etc"
	chmod 1777 "$rootfs/tmp"
	printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
	add_executable "$rootfs" "$bin" "/usr/local/bin/$name"
	if [ "$name" = fleet-nri ]; then
		local nft busybox=/bin/busybox applet
		nft=$(command -v nft) || die "nft not found (apt-get install nftables): fleet-nri's VIP table needs it"
		add_executable "$rootfs" "$nft" /usr/sbin/nft
		if ! "$busybox" --list >/dev/null 2>&1; then
			die "$busybox is not Debian's busybox-static (apt-get install busybox-static)"
		fi
		add_executable "$rootfs" "$busybox" /bin/busybox
		for applet in $("$busybox" --list); do
			[ "$applet" = busybox ] || [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
		done
		[ -x "$bin_dir/fleet-cni" ] || die "$bin_dir/fleet-cni not built"
		install -D -m 0755 -- "$bin_dir/fleet-cni" "$rootfs/opt/fleetboard/fleet-cni"
		install -D -m 0755 -- "$here/install.sh" "$rootfs/opt/fleetboard/install.sh"
	fi

	umoci init --layout "$layout"
	umoci new --image "$layout:$tag"
	# The layer tar is GNU tar's (umoci 0.4.7's own `insert` drops the tar's end: the last
	# file came out truncated); umoci compresses it and adds it to the image.
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
		-C "$rootfs" -cf "$work/$name/layer.tar" .
	umoci raw add-layer --image "$layout:$tag" \
		--history.created_by "scripts/build-images.sh $name" "$work/$name/layer.tar"
	umoci config --image "$layout:$tag" \
		--config.entrypoint "/usr/local/bin/$name" \
		--config.env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.workingdir / \
		--config.label "org.opencontainers.image.title=$name" \
		--config.label "org.opencontainers.image.version=$tag" \
		--history.created_by "scripts/build-images.sh $name config"
	umoci gc --layout "$layout"
	# Self-check: the blobs match their digests and the binary in the layer is the one built.
	local manifest layer
	manifest=$(jq -r '.manifests[0].digest' "$layout/index.json")
	layer=$(jq -r '.layers[-1].digest' "$layout/blobs/sha256/${manifest#sha256:}")
	for blob in "$manifest" "$layer"; do
		echo "${blob#sha256:}  $layout/blobs/sha256/${blob#sha256:}" | sha256sum --quiet -c - ||
			die "$name: blob $blob does not match its digest"
	done
	gzip -dc "$layout/blobs/sha256/${layer#sha256:}" | tar -xOf - "./usr/local/bin/$name" | cmp -s - "$bin" ||
		die "$name: the layer's /usr/local/bin/$name differs from $bin"
	# The OCI ref name is only the tag; containerd names the image after this annotation.
	jq --arg ref "$ref" '.manifests[0].annotations["io.containerd.image.name"] = $ref' \
		"$layout/index.json" >"$layout/index.json.new"
	mv -- "$layout/index.json.new" "$layout/index.json"
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
		-C "$layout" -cf "$out/$name.tar.tmp" oci-layout index.json blobs
	mv -- "$out/$name.tar.tmp" "$out/$name.tar"
	echo "$out/$name.tar $ref sha256:$(sha256sum "$out/$name.tar" | cut -d' ' -f1)"
}

for image in "${images[@]}"; do
	build_image "$image"
done
