//! Measurements: per-thread counters and histograms on the hot path, merged
//! into the `Report` (final table and JSON) at the end.

use crate::options::Options;
use crate::protocol::{ErrorKind, Fault, Op};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// Highest latency the histograms hold (ns); larger values are clamped.
const LATENCY_NS_MAX: u64 = 3_600 * 1_000_000_000;
/// Error descriptions kept per thread, for the report.
const ERROR_SAMPLES_MAX: usize = 10;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("static histogram bounds are valid")
}

/// What one client thread measured in one phase.
pub struct ThreadStats {
    /// Latency in ns per operation type (indexed by `Op::index`), of the
    /// replies and of the open-loop requests never sent.
    pub latency: [Histogram<u64>; 3],
    /// Replies per operation type.
    pub ops: [u64; 3],
    /// Replies per operation type received by the deadline (all of them
    /// without a deadline): the measured phase's throughput.
    pub in_time: [u64; 3],
    pub op_errors: [u64; 3],
    /// Error counts indexed by `ErrorKind::index`.
    pub kinds: [u64; ErrorKind::ALL.len()],
    pub samples: Vec<String>,
    /// Replies received in each second since the phase start.
    pub per_second: Vec<u64>,
    /// Open loop: how late requests were sent relative to schedule (ns).
    pub lag: Histogram<u64>,
    /// Open loop: requests due before the deadline that were never sent.
    pub unsent: u64,
    /// End of the measured phase, ns since the phase start; `u64::MAX` for
    /// a request-bounded phase (measured until the last reply).
    pub deadline_ns: u64,
    /// When the thread finished (after draining replies), ns since the phase start.
    pub end_ns: u64,
}

impl Default for ThreadStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ThreadStats {
    pub fn new() -> Self {
        ThreadStats {
            latency: [histogram(), histogram(), histogram()],
            ops: [0; 3],
            in_time: [0; 3],
            op_errors: [0; 3],
            kinds: [0; ErrorKind::ALL.len()],
            samples: Vec::new(),
            per_second: Vec::with_capacity(64),
            lag: histogram(),
            unsent: 0,
            deadline_ns: u64::MAX,
            end_ns: 0,
        }
    }

    /// Records one reply (valid or not) received at `now_ns`.
    pub fn reply(&mut self, op: Op, now_ns: u64, latency_ns: u64) {
        self.ops[op.index()] += 1;
        if now_ns <= self.deadline_ns {
            self.in_time[op.index()] += 1;
        }
        self.latency[op.index()].saturating_record(latency_ns.max(1));
        let second = (now_ns / 1_000_000_000) as usize;
        if second >= self.per_second.len() {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
    }

    /// Records an error, attributed to `op` when it belongs to one request.
    pub fn error(&mut self, fault: Fault, op: Option<Op>, key: &[u8], addr: SocketAddr) {
        self.kinds[fault.kind.index()] += 1;
        if let Some(op) = op {
            self.op_errors[op.index()] += 1;
        }
        if self.samples.len() < ERROR_SAMPLES_MAX {
            let what = match op {
                Some(op) => format!("{} {}", op.name(), String::from_utf8_lossy(key)),
                None => "connection".to_string(),
            };
            self.samples.push(format!(
                "{}: {what} on {addr}: {}",
                fault.kind.name(),
                fault.what
            ));
        }
    }

    /// Records an open-loop request that was due but never sent.
    pub fn unsent(&mut self, op: Op, latency_ns: u64, addr: SocketAddr) {
        self.unsent += 1;
        self.latency[op.index()].saturating_record(latency_ns.max(1));
        self.op_errors[op.index()] += 1;
        self.kinds[ErrorKind::Unsent.index()] += 1;
        if self.unsent == 1 && self.samples.len() < ERROR_SAMPLES_MAX {
            self.samples.push(format!(
                "unsent: requests on {addr} were due before the deadline but never sent"
            ));
        }
    }

    pub fn error_kind_only(&mut self, kind: ErrorKind) {
        self.kinds[kind.index()] += 1;
    }

    pub fn schedule_lag(&mut self, lag_ns: u64) {
        self.lag.saturating_record(lag_ns.max(1));
    }

    pub fn ops_total(&self) -> u64 {
        self.ops.iter().sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.kinds.iter().sum()
    }

    /// Adds another thread's measurements to this one.
    pub fn merge(&mut self, other: &ThreadStats) {
        for i in 0..3 {
            self.latency[i]
                .add(&other.latency[i])
                .expect("histograms share bounds");
            self.ops[i] += other.ops[i];
            self.in_time[i] += other.in_time[i];
            self.op_errors[i] += other.op_errors[i];
        }
        for (a, b) in self.kinds.iter_mut().zip(other.kinds) {
            *a += b;
        }
        let room = (ERROR_SAMPLES_MAX * 2).saturating_sub(self.samples.len());
        self.samples
            .extend(other.samples.iter().take(room).cloned());
        if other.per_second.len() > self.per_second.len() {
            self.per_second.resize(other.per_second.len(), 0);
        }
        for (a, b) in self.per_second.iter_mut().zip(&other.per_second) {
            *a += b;
        }
        self.lag.add(&other.lag).expect("histograms share bounds");
        self.unsent += other.unsent;
        self.deadline_ns = self.deadline_ns.min(other.deadline_ns);
        self.end_ns = self.end_ns.max(other.end_ns);
    }

    pub fn merged(all: &[ThreadStats]) -> ThreadStats {
        let mut total = ThreadStats::new();
        for t in all {
            total.merge(t);
        }
        total
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Throughput and latency of a set of requests.
#[derive(Clone, Debug, Serialize)]
pub struct OpStats {
    /// Replies, drained ones included.
    pub ops: u64,
    /// Replies received by the deadline per second of the measured phase.
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
}

impl OpStats {
    fn new(h: &Histogram<u64>, ops: u64, in_time: u64, errors: u64, secs: f64) -> Self {
        let q = |p: f64| us(h.value_at_quantile(p));
        OpStats {
            ops,
            ops_per_sec: if secs > 0.0 {
                in_time as f64 / secs
            } else {
                0.0
            },
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: us(h.max()),
            errors,
        }
    }
}

/// Open-loop schedule keeping.
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    /// Requested total rate.
    pub rate: f64,
    /// Rate actually sent: requests sent / phase length.
    pub sent_per_sec: f64,
    /// How late requests were sent behind their intended time.
    pub lag_p50_us: f64,
    pub lag_p99_us: f64,
    pub lag_max_us: f64,
    /// Requests due before the end of the run that were never sent (also
    /// errors of kind `unsent`, in the latency histograms).
    pub unsent: u64,
}

/// The prefill phase.
#[derive(Clone, Debug, Serialize)]
pub struct Prefill {
    pub keys: u64,
    pub secs: f64,
    pub errors: u64,
}

/// The result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Replies received by the deadline per second of the measured phase.
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// All errors of the run, prefill included.
    pub errors: u64,
    /// Replies of the measured phase, drained ones included.
    pub ops: u64,
    /// Length of the measured phase (`--duration`, or until the last reply
    /// of a `--requests` run).
    pub elapsed_secs: f64,
    /// Time after the deadline spent waiting for replies still in flight.
    pub drain_secs: f64,
    /// `set`, `get`, `del`.
    pub per_op: BTreeMap<String, OpStats>,
    /// Count per error kind (every kind listed, zeros included).
    pub error_kinds: BTreeMap<String, u64>,
    /// The first few errors, described.
    pub error_samples: Vec<String>,
    /// Replies received in each complete second of the measured phase (the
    /// replies of a trailing partial second count in `ops` only).
    pub throughput: Vec<u64>,
    /// Latency percentile curve: (percentile, µs) pairs.
    pub percentiles: Vec<(f64, f64)>,
    pub schedule: Option<Schedule>,
    pub prefill: Option<Prefill>,
    pub connections_alive: usize,
    pub options: Options,
}

/// Percentiles of the curve: 0, then 9 points per decade of nines up to
/// 99.999 and the maximum.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let steps = 50;
    for i in 0..=steps {
        let nines = 5.0 * i as f64 / steps as f64;
        let p = 100.0 * (1.0 - 10f64.powf(-nines));
        out.push((p, us(h.value_at_quantile(p / 100.0))));
    }
    out.push((100.0, us(h.max())));
    out
}

impl Report {
    pub fn build(
        opts: &Options,
        measured: &ThreadStats,
        prefill: Option<(&ThreadStats, f64)>,
        connections_alive: usize,
    ) -> Report {
        let measured_ns = measured.deadline_ns.min(measured.end_ns);
        let secs = measured_ns as f64 / 1e9;
        let drain_secs = (measured.end_ns - measured_ns) as f64 / 1e9;
        let mut all = histogram();
        for h in &measured.latency {
            all.add(h).expect("histograms share bounds");
        }
        let mut totals = ThreadStats::new();
        totals.merge(measured);
        if let Some((p, _)) = prefill {
            totals.merge(p);
        }
        let errors = totals.errors_total();
        let sum = |a: &[u64; 3]| a.iter().sum::<u64>();
        let overall = OpStats::new(
            &all,
            sum(&measured.ops),
            sum(&measured.in_time),
            errors,
            secs,
        );
        let per_op = Op::ALL
            .iter()
            .map(|&op| {
                let i = op.index();
                let h = &measured.latency[i];
                let s = OpStats::new(
                    h,
                    measured.ops[i],
                    measured.in_time[i],
                    measured.op_errors[i],
                    secs,
                );
                (op.name().to_ascii_lowercase(), s)
            })
            .collect();
        let schedule = opts.rate.map(|rate| Schedule {
            rate,
            sent_per_sec: if secs > 0.0 {
                measured.lag.len() as f64 / secs
            } else {
                0.0
            },
            lag_p50_us: us(measured.lag.value_at_quantile(0.5)),
            lag_p99_us: us(measured.lag.value_at_quantile(0.99)),
            lag_max_us: us(measured.lag.max()),
            unsent: measured.unsent,
        });
        Report {
            ops_per_sec: overall.ops_per_sec,
            p50_us: overall.p50_us,
            p90_us: overall.p90_us,
            p99_us: overall.p99_us,
            p999_us: overall.p999_us,
            max_us: overall.max_us,
            errors,
            ops: overall.ops,
            elapsed_secs: secs,
            drain_secs,
            per_op,
            error_kinds: ErrorKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), totals.kinds[k.index()]))
                .collect(),
            error_samples: totals.samples.clone(),
            throughput: measured
                .per_second
                .iter()
                .take(secs as usize)
                .copied()
                .collect(),
            percentiles: curve(&all),
            schedule,
            prefill: prefill.map(|(p, secs)| Prefill {
                keys: opts.keys,
                secs,
                errors: p.errors_total(),
            }),
            connections_alive,
            options: opts.clone(),
        }
    }
}

/// The final table.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        // --pipeline does not apply in open loop.
        let pacing = match o.rate {
            Some(r) => format!("open loop {r} ops/s"),
            None => format!("pipeline {}", o.pipeline),
        };
        writeln!(
            f,
            "{} x{} conns, {pacing}, {:?} keys {}, ratio {}:{}:{}, {:.2} s (+{:.2} s drain)",
            format!("{:?}", o.protocol).to_lowercase(),
            o.connections,
            o.distribution,
            o.keys,
            o.ratio.set,
            o.ratio.get,
            o.ratio.del,
            self.elapsed_secs,
            self.drain_secs,
        )?;
        if let Some(p) = &self.prefill {
            writeln!(
                f,
                "prefill: {} keys in {:.2} s, {} errors",
                p.keys, p.secs, p.errors
            )?;
        }
        writeln!(
            f,
            "{:<4} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
            "op", "ops", "ops/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, s: &OpStats| {
            writeln!(
                f,
                "{:<4} {:>10} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>8}",
                name,
                s.ops,
                s.ops_per_sec,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.max_us,
                s.errors
            )
        };
        let all = OpStats {
            ops: self.ops,
            ops_per_sec: self.ops_per_sec,
            p50_us: self.p50_us,
            p90_us: self.p90_us,
            p99_us: self.p99_us,
            p999_us: self.p999_us,
            max_us: self.max_us,
            errors: self.errors,
        };
        row(f, "all", &all)?;
        for op in Op::ALL {
            let key = op.name().to_ascii_lowercase();
            if let Some(s) = self.per_op.get(&key).filter(|s| s.ops > 0 || s.errors > 0) {
                row(f, op.name(), s)?;
            }
        }
        if let Some(s) = &self.schedule {
            writeln!(
                f,
                "schedule: {:.0} ops/s asked, {:.0} sent/s; send lag p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {} requests never sent",
                s.rate, s.sent_per_sec, s.lag_p50_us, s.lag_p99_us, s.lag_max_us, s.unsent
            )?;
        }
        if self.errors > 0 {
            let kinds: Vec<String> = self
                .error_kinds
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "ERRORS: {} ({})", self.errors, kinds.join(", "))?;
            for s in &self.error_samples {
                writeln!(f, "  {s}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn merged_stats_add_up() {
        let mut a = ThreadStats::new();
        let mut b = ThreadStats::new();
        a.reply(Op::Get, 10, 1_000);
        a.reply(Op::Set, 1_500_000_000, 3_000);
        b.reply(Op::Get, 2_100_000_000, 2_000);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let f = Fault {
            kind: ErrorKind::WrongLength,
            what: "x",
        };
        b.error(f, Some(Op::Get), b"key:1", addr);
        b.end_ns = 2_000_000_000;
        let m = ThreadStats::merged(&[a, b]);
        assert_eq!(m.ops, [1, 2, 0]);
        assert_eq!(m.per_second, vec![1, 1, 1]);
        assert_eq!(m.errors_total(), 1);
        let r = Report::build(&Options::default(), &m, None, 1);
        assert_eq!(r.ops, 3);
        assert_eq!(r.errors, 1);
        assert_eq!(r.throughput, vec![1, 1]);
        assert_eq!(r.error_kinds["wrong_length"], 1);
        assert_eq!(r.per_op["get"].errors, 1);
        assert!((r.ops_per_sec - 1.5).abs() < 1e-9);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
        assert!(r.error_samples[0].contains("GET key:1"));
        let table = r.to_string();
        assert!(table.contains("ERRORS: 1 (wrong_length 1)"), "{table}");
    }

    #[test]
    fn throughput_is_over_the_measured_phase_and_unsent_are_errors() {
        let mut t = ThreadStats::new();
        t.deadline_ns = 1_000_000_000;
        t.reply(Op::Get, 500_000_000, 1_000);
        t.reply(Op::Get, 1_000_000_000, 1_000);
        t.reply(Op::Get, 1_200_000_000, 1_000); // drained after the deadline
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        t.unsent(Op::Set, 700_000_000, addr);
        t.end_ns = 1_250_000_000;
        let opts = Options::parse_from(["loadtest", "--rate", "10", "--duration", "1"]);
        let r = Report::build(&opts, &t, None, 1);
        assert_eq!(r.elapsed_secs, 1.0);
        assert!((r.drain_secs - 0.25).abs() < 1e-9);
        assert_eq!(r.ops, 3, "replies, drained ones included");
        assert!((r.ops_per_sec - 2.0).abs() < 1e-9, "by the deadline only");
        assert_eq!(r.errors, 1);
        assert_eq!(r.error_kinds["unsent"], 1);
        assert_eq!(r.per_op["set"].errors, 1);
        assert_eq!(r.per_op["set"].ops, 0);
        assert!(
            (r.max_us - 700_000.0).abs() < 1_000.0,
            "unsent latency recorded"
        );
        let table = r.to_string();
        assert!(
            table.contains("open loop 10 ops/s") && !table.contains("pipeline"),
            "{table}"
        );
    }
}
