#!/bin/sh
# Installs fleet-cni on this node: copies the binary into the CNI bin dir and chains it after
# the primary CNI in the runtime's active config. Idempotent; `--uninstall` undoes both.
# The JSON editing is done by fleet-cni itself, so nothing but a POSIX shell is needed.
set -eu

bin_dir=/opt/cni/bin
conf_dir=/etc/cni/net.d
socket=/run/fleetboard/node.sock
binary=
uninstall=false

usage() {
	cat <<EOF
Usage: install.sh [--bin-dir DIR] [--conf-dir DIR] [--socket PATH] [--binary PATH] [--uninstall]

  --bin-dir DIR    CNI plugin dir to install fleet-cni into (default: $bin_dir)
  --conf-dir DIR   CNI config dir; fleet-cni is appended to the active (lexically first)
                   config there, a single-plugin .conf is converted to a .conflist
                   (default: $conf_dir)
  --socket PATH    fleet-nri's node API socket (default: $socket)
  --binary PATH    fleet-cni binary to install (default: ./fleet-cni beside this script,
                   else target/release/fleet-cni, else target/debug/fleet-cni)
  --uninstall      remove fleet-cni from every config in the conf dir, then the binary
EOF
}

die() {
	echo "install.sh: $*" >&2
	exit 1
}

need_value() {
	if [ "$#" -lt 2 ] || [ -z "$2" ]; then
		die "$1 needs a value (see --help)"
	fi
}

while [ "$#" -gt 0 ]; do
	case "$1" in
	--bin-dir) need_value "$@"; bin_dir=$2; shift 2 ;;
	--conf-dir) need_value "$@"; conf_dir=$2; shift 2 ;;
	--socket) need_value "$@"; socket=$2; shift 2 ;;
	--binary) need_value "$@"; binary=$2; shift 2 ;;
	--uninstall) uninstall=true; shift ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
done

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
find_binary() {
	if [ -n "$binary" ]; then
		echo "$binary"
		return
	fi
	for candidate in "$here/fleet-cni" "$here/target/release/fleet-cni" "$here/target/debug/fleet-cni"; do
		if [ -x "$candidate" ]; then
			echo "$candidate"
			return
		fi
	done
}

installed="$bin_dir/fleet-cni"

if [ "$uninstall" = true ]; then
	# Remove the config entry first: a conflist naming a missing plugin fails every pod.
	tool=$installed
	[ -x "$tool" ] || tool=$(find_binary)
	if [ -n "$tool" ] && [ -x "$tool" ]; then
		if [ -d "$conf_dir" ]; then
			"$tool" conflist remove --conf-dir "$conf_dir"
		fi
	else
		echo "install.sh: no fleet-cni binary to edit $conf_dir with; remove the fleet-cni entry by hand" >&2
	fi
	if [ -e "$installed" ]; then
		rm -f -- "$installed"
		echo "removed $installed"
	fi
	exit 0
fi

src=$(find_binary)
[ -n "$src" ] || die "no fleet-cni binary found; build it (cargo build --release -p fleet-cni) or pass --binary"
if [ ! -f "$src" ] || [ ! -x "$src" ]; then
	die "$src is not an executable file; pass --binary PATH"
fi
[ -d "$conf_dir" ] || die "CNI conf dir $conf_dir does not exist; install the primary CNI first or pass --conf-dir"

mkdir -p -- "$bin_dir"
if [ -e "$installed" ] && cmp -s -- "$src" "$installed"; then
	echo "$installed is up to date"
else
	# Copy then rename: replacing a binary in place fails while a runtime is executing it.
	tmp="$bin_dir/.fleet-cni.install.$$"
	trap 'rm -f -- "$tmp"' EXIT
	cp -- "$src" "$tmp"
	chmod 0755 -- "$tmp"
	mv -f -- "$tmp" "$installed"
	trap - EXIT
	echo "installed $installed"
fi

"$installed" conflist add --conf-dir "$conf_dir" --socket "$socket"
