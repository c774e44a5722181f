//! `cni-del`: fleet-cni DEL latency vs Debian's bridge + host-local DEL (see `cni_bench`).
//! ADD is measured in the same run and printed; `cni-add` reports it on its last line.

use clap::Parser;
use fleet_bench::cni_bench::{Flags, Op, run};

fn main() -> anyhow::Result<()> {
    run(Op::Del, &Flags::parse())
}
