//! `loadtest-cluster`: replication lag, replicated throughput and convergence time of a
//! MerkleKV cluster (see `loadtest::cluster`). Exit status 0 only without errors.

use clap::Parser;
use loadtest::cluster::{run, ClusterOptions};
use std::process::ExitCode;

fn main() -> ExitCode {
    let opts = ClusterOptions::parse();
    match run(&opts) {
        Ok(report) => {
            print!("{report}");
            if report.errors > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("loadtest-cluster: {e}");
            ExitCode::from(2)
        }
    }
}
