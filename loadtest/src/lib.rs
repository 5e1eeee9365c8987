//! Load generator for MerkleKV (and, for comparison, memcached and Redis)
//! that validates every reply.
//!
//! # Layout
//! - `options`: the flags (clap) and their limits; also the library's input.
//! - `keyspace`: key names, the deterministic value of each key, seeded
//!   choice of operation and key (uniform or zipfian).
//! - `protocol`: request encoding and reply framing/validation for the
//!   native, memcache and RESP protocols. Pure: bytes in, verdict out.
//! - `client`: connections and the per-thread mio event loop (closed or open
//!   loop). The only module doing network I/O.
//! - `cluster`: cluster mode (write on one node, read on others): replication lag,
//!   replicated throughput, convergence time.
//! - `stats`: histograms and counters, the `Report`, the final table.
//! - `chart`: the SVG.
//!
//! Invariant: every reply is checked against what its request expects; a
//! failure of any kind is counted in `Report::errors`, never dropped.

pub mod chart;
pub mod client;
pub mod cluster;
pub mod keyspace;
pub mod options;
pub mod protocol;
pub mod stats;

pub use options::Options;
/// For callers that read the `--json` result back.
pub use serde_json;
pub use stats::Report;

use client::{Conn, Pacing, Phase, Source, PREFILL_PIPELINE};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keyspace::{mix64, Chooser, Keyspace, Rng};
use stats::ThreadStats;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    Poll(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the JSON result: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot draw the chart: {0}")]
    Chart(String),
}

/// Runs the prefill (if asked) and the measured phase, writes `--json` and
/// `--svg`, and returns the report. Errors of the server (bad replies,
/// dropped connections) are in `Report::errors`; `Err` means the run could
/// not be done at all (bad options, no connection, an output file).
pub fn run(opts: &Options) -> Result<Report, Error> {
    opts.check()?;
    let addrs = client::resolve(&opts.addr)?;
    let keyspace = Keyspace::new(opts);
    let chooser = Chooser::new(opts);
    let threads = opts.threads_used();
    let mut groups: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..opts.connections {
        let conn = Conn::connect(i, addrs[i % addrs.len()], opts, &keyspace)?;
        groups[i % threads].push(conn);
    }
    let progress = Progress::new(opts.quiet);
    let conns = opts.connections as u64;

    let prefill = if opts.prefill {
        // Each key is written by the connection that owns it, so through
        // that connection's node only (see `keyspace::Owned`).
        for c in groups.iter_mut().flatten() {
            c.begin(Source::Prefill { next: 0 });
        }
        let start = Instant::now();
        let pacing = Pacing::Closed {
            pipeline: PREFILL_PIPELINE.max(opts.pipeline),
        };
        let stats = run_phase(
            &mut groups,
            opts,
            &keyspace,
            &chooser,
            pacing,
            None,
            start,
            &progress,
            "prefill",
        )?;
        Some((ThreadStats::merged(&stats), start.elapsed().as_secs_f64()))
    } else {
        None
    };

    for c in groups.iter_mut().flatten() {
        let i = c.index as u64;
        let left = opts.requests.map(|n| n / conns + u64::from(i < n % conns));
        c.begin(Source::Mixed {
            rng: Rng::new(opts.seed ^ mix64(i)),
            left,
        });
    }
    let pacing = match opts.rate {
        Some(rate) => Pacing::Open {
            rate,
            conns: opts.connections,
        },
        None => Pacing::Closed {
            pipeline: opts.pipeline,
        },
    };
    let start = Instant::now();
    let deadline = opts
        .requests
        .is_none()
        .then(|| start + Duration::from_secs_f64(opts.duration));
    let stats = run_phase(
        &mut groups,
        opts,
        &keyspace,
        &chooser,
        pacing,
        deadline,
        start,
        &progress,
        "run",
    )?;
    progress.bar.finish_and_clear();

    let alive = groups.iter().flatten().filter(|c| c.alive()).count();
    let measured = ThreadStats::merged(&stats);
    let report = Report::build(
        opts,
        &measured,
        prefill.as_ref().map(|(s, secs)| (s, *secs)),
        alive,
    );
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").map_err(|source| Error::Output {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &opts.svg {
        chart::write_svg(&report, path)?;
    }
    Ok(report)
}

/// The live progress line (hidden with `--quiet` or when stderr is not a TTY).
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("static template"));
        Progress { bar }
    }
}

/// Runs one phase on all threads and shows progress once a second.
#[allow(clippy::too_many_arguments)]
fn run_phase(
    groups: &mut [Vec<Conn>],
    opts: &Options,
    keyspace: &Keyspace,
    chooser: &Chooser,
    pacing: Pacing,
    deadline: Option<Instant>,
    start: Instant,
    progress: &Progress,
    label: &str,
) -> Result<Vec<ThreadStats>, Error> {
    let live_ops = AtomicU64::new(0);
    let live_errors = AtomicU64::new(0);
    let phase = Phase {
        protocol: opts.protocol,
        keyspace,
        chooser,
        pacing,
        deadline,
        start,
        reply_timeout: Duration::from_secs_f64(opts.reply_timeout),
        live_ops: &live_ops,
        live_errors: &live_errors,
    };
    std::thread::scope(|scope| {
        let phase = &phase;
        let handles: Vec<_> = groups
            .iter_mut()
            .map(|g| scope.spawn(move || client::run_thread(g, phase)))
            .collect();
        let (mut last_ops, mut last_tick) = (0, Instant::now());
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if last_tick.elapsed() >= Duration::from_secs(1) {
                let ops = live_ops.load(Ordering::Relaxed);
                let rate = (ops - last_ops) as f64 / last_tick.elapsed().as_secs_f64();
                progress.bar.set_message(format!(
                    "{label} {:>4.0}s  {rate:>10.0} ops/s  {ops} ops  {} errors",
                    start.elapsed().as_secs_f64(),
                    live_errors.load(Ordering::Relaxed)
                ));
                progress.bar.tick();
                (last_ops, last_tick) = (ops, Instant::now());
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    })
}
