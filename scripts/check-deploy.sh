#!/usr/bin/env bash
# Checks deploy/ offline: every kustomization renders (`kubectl kustomize`), every rendered
# object validates against the Kubernetes 1.32 schema (`kubernetes-validate --strict`, PyPI),
# the examples validate against our CRDs' openAPI schemas, and every flag a container passes
# to one of our binaries is one that binary's --help lists (binaries from --bin-dir).
set -euo pipefail

here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
bin_dir=$here/target/debug
kube_version=1.32.0

usage() {
	cat <<EOF
Usage: scripts/check-deploy.sh [--bin-dir DIR]

  --bin-dir DIR  built fleetboard binaries whose --help the manifests' flags are checked
                 against (default: $bin_dir)
EOF
}

while [ "$#" -gt 0 ]; do
	case "$1" in
	--bin-dir)
		[ "$#" -ge 2 ] || { echo "check-deploy.sh: --bin-dir needs a value" >&2; exit 1; }
		bin_dir=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "check-deploy.sh: unknown argument '$1' (see --help)" >&2; exit 1 ;;
	esac
done

for tool in kubectl kubernetes-validate python3; do
	command -v "$tool" >/dev/null || {
		echo "check-deploy.sh: $tool not found (kubectl: apt-get install kubectl/trixie; kubernetes-validate: pip install kubernetes-validate)" >&2
		exit 1
	}
done

out=$(mktemp -d "${TMPDIR:-/tmp}/fleet-deploy.XXXXXX")
trap 'rm -rf -- "$out"' EXIT

kustomizations=(crds member hub coredns overlays/member overlays/hub)
for k in "${kustomizations[@]}"; do
	rendered="$out/${k//\//-}.yaml"
	kubectl kustomize "$here/deploy/$k" >"$rendered"
	kubernetes-validate --kubernetes-version "$kube_version" --strict --quiet "$rendered"
	echo "deploy/$k: rendered $(grep -c '^kind:' "$rendered") objects, valid against Kubernetes $kube_version"
done

python3 - "$out" "$here" "$bin_dir" <<'PY'
import glob, os, re, subprocess, sys
import jsonschema, yaml

out, here, bin_dir = sys.argv[1:]

# Examples of CRD-typed objects against the CRDs' schemas, for every served version.
crds = {}
for doc in yaml.safe_load_all(open(os.path.join(out, "crds.yaml"))):
    for v in doc["spec"]["versions"]:
        crds[(doc["spec"]["group"], v["name"], doc["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
for path in sorted(glob.glob(os.path.join(here, "deploy/examples/*.yaml"))):
    for obj in yaml.safe_load_all(open(path)):
        group, version = obj["apiVersion"].split("/")
        for (g, v, kind), schema in crds.items():
            if g == group and kind == obj["kind"]:
                # Served versions share one schema: the object must fit every one.
                jsonschema.validate(dict(obj, apiVersion=f"{g}/{v}"), schema)
        print(f"{os.path.relpath(path, here)}: {obj['kind']} {obj['metadata']['name']} valid against the CRD's schemas")

# Flags our containers pass must exist in the binary's --help (of the subcommand used).
helps = {}
def help_text(binary, *sub):
    if (binary, sub) not in helps:
        exe = os.path.join(bin_dir, binary)
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not built: cargo build -p {binary} (or pass --bin-dir)")
        helps[(binary, sub)] = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, check=True).stdout
    return helps[(binary, sub)]

checked = 0
def check(args, text, where, who):
    global checked
    for a in args:
        flag = a.split("=")[0]
        if flag.startswith("--"):
            if not re.search(re.escape(flag) + r"\b", text):
                sys.exit(f"{who}: {flag} is not in `{where} --help`")
            checked += 1

for path in sorted(glob.glob(os.path.join(out, "*.yaml"))):
    for obj in yaml.safe_load_all(open(path)):
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            m = re.match(r"fleetboard\.local/([a-z-]+):", c["image"])
            if not m:
                continue
            who = f"{obj['metadata']['name']}/{c['name']}"
            cmd = c.get("command") or []
            if cmd[:2] == ["/bin/sh", "/opt/fleetboard/install.sh"]:
                text = subprocess.run(["sh", os.path.join(here, "install.sh"), "--help"],
                                      capture_output=True, text=True, check=True).stdout
                check(cmd[2:], text, "install.sh", who)
                continue
            binary, args = m.group(1), c.get("args", [])
            # Global flags come before the subcommand (fleet-hub --data-dir=... serve ...);
            # the manifests write every flag as --flag=value, so a bare word is a subcommand.
            sub = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
            if sub is None:
                check(args, help_text(binary), binary, who)
            else:
                check(args[:sub], help_text(binary), binary, who)
                check(args[sub + 1:], help_text(binary, args[sub]), f"{binary} {args[sub]}", who)
print(f"{checked} container flags exist in the binaries' --help")
PY
