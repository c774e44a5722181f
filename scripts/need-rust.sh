# shellcheck shell=bash
# Sourced by local-fleet.sh and test.sh before anything is installed: fleetboard builds with
# Rust >= 1.95 (edition 2024). Debian's own rustc is far older, so Rust comes from rustup.
# Fails early, with what to do, instead of after the package installs.
if [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
need_rust() {
  local who=$1 version
  if ! command -v cargo >/dev/null; then
    echo "$who: cargo not found. fleetboard needs Rust 1.95 or newer (Debian's rustc is too old):" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" >&2
    echo "then run $who again." >&2
    exit 1
  fi
  version=$(cargo --version | awk '{print $2}')
  if [ "$(printf '%s\n1.95.0\n' "$version" | sort -V | head -n1)" != 1.95.0 ]; then
    echo "$who: cargo $version is older than 1.95 (edition 2024): run \`rustup update stable\`, then $who again." >&2
    exit 1
  fi
}
