//! `cni-add`: fleet-cni ADD latency vs Debian's bridge + host-local ADD (see `cni_bench`).
//! DEL is measured in the same run and printed; `cni-del` reports it on its last line.

use clap::Parser;
use fleet_bench::cni_bench::{Flags, Op, run};

fn main() -> anyhow::Result<()> {
    run(Op::Add, &Flags::parse())
}
