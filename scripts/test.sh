#!/usr/bin/env bash
# Placeholder until the lead writes the real one: build the binaries the e2e tests run, then test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins && cargo test --workspace
