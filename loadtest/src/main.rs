//! `loadtest` command: parses flags, runs, prints the table. Exit status 0
//! only for a run without errors; 1 if any reply or connection failed; 2 if
//! the run could not be done at all.

use clap::Parser;
use loadtest::Options;
use std::process::ExitCode;

fn main() -> ExitCode {
    let opts = Options::parse();
    match loadtest::run(&opts) {
        Ok(report) => {
            print!("{report}");
            if report.errors > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
