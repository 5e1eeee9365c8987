//! Cluster mode: write on one MerkleKV node, read on the others, and measure
//! replication: lag (write acknowledged on the writer → visible on a reader),
//! replicated throughput, and time to convergence (all Merkle roots equal).
//!
//! Writers: `connections` blocking connections to the write node, each sending
//! pipelined batches of `SET` with keys never written before (`{prefix}{conn}:{seq}`),
//! as fast as acknowledged or at `rate` writes/s in total. Probes: one connection per
//! reader node that repeatedly takes the newest acknowledged key and polls `GET` until
//! it is there; the time from its acknowledgement to its first sighting is one lag
//! sample (resolution: one `PROBE_POLL` plus a round trip). After the writers stop, `HASH` is polled on every node until all are equal.
//! Every reply is checked; anything unexpected counts as an error.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a single key may take to show up on a reader before it counts as an error.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two GETs of a key not there yet: the lag's resolution.
const PROBE_POLL: Duration = Duration::from_micros(100);

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "loadtest-cluster",
    version,
    about = "Replication lag and throughput of a MerkleKV cluster"
)]
pub struct ClusterOptions {
    /// The node written to, HOST:PORT.
    #[arg(long)]
    pub write: String,
    /// Nodes read from (repeat for several), HOST:PORT.
    #[arg(long, required = true)]
    pub read: Vec<String>,
    /// Writer connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// SETs per batch per connection.
    #[arg(long, default_value_t = 64)]
    pub pipeline: usize,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Open loop: total writes per second (default: as fast as acknowledged).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Value size in bytes.
    #[arg(long, default_value_t = 32)]
    pub value_size: usize,
    /// Key prefix; keys are `{prefix}{connection}:{sequence}`.
    #[arg(long, default_value = "lag:")]
    pub key_prefix: String,
    /// Seconds to wait for convergence after writing stops.
    #[arg(long, default_value_t = 120.0)]
    pub settle_timeout: f64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub writes: u64,
    pub write_secs: f64,
    /// Writes acknowledged per second by the write node.
    pub writes_per_sec: f64,
    /// Writes per second until every reader had them all (writing + convergence).
    pub replicated_per_sec: f64,
    /// From the end of writing to all Merkle roots equal.
    pub convergence_ms: f64,
    pub lag_samples: u64,
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    pub lag_max_us: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl std::fmt::Display for ClusterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "writes             {} in {:.2} s",
            self.writes, self.write_secs
        )?;
        writeln!(
            f,
            "write rate         {:.0} /s (acknowledged by the write node)",
            self.writes_per_sec
        )?;
        writeln!(
            f,
            "replicated rate    {:.0} /s (until every reader had every write)",
            self.replicated_per_sec
        )?;
        writeln!(
            f,
            "convergence        {:.1} ms after writing stopped",
            self.convergence_ms
        )?;
        writeln!(
            f,
            "lag (ack → read)   p50 {} µs  p99 {} µs  max {} µs  ({} samples)",
            self.lag_p50_us, self.lag_p99_us, self.lag_max_us, self.lag_samples
        )?;
        writeln!(f, "errors             {}", self.errors)?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error        {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("roots did not converge within {0} s")]
    NoConvergence(f64),
    #[error("cannot write the JSON result: {0}")]
    Output(String),
}

/// The newest acknowledged write of one writer connection.
type Latest = Mutex<Option<(String, Instant)>>;

struct Shared {
    latest: Vec<Latest>,
    done: AtomicBool,
    writes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        self.first_error.lock().unwrap().get_or_insert(what);
    }
}

struct Line {
    addr: String,
    reader: BufReader<TcpStream>,
}

impl Line {
    fn connect(addr: &str) -> Result<Line, ClusterError> {
        let io = |source| ClusterError::Io {
            addr: addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(addr).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        Ok(Line {
            addr: addr.to_string(),
            reader: BufReader::with_capacity(256 * 1024, stream),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.reader
            .get_mut()
            .write_all(bytes)
            .map_err(|e| format!("{}: {e}", self.addr))
    }

    fn line(&mut self, buf: &mut String) -> Result<(), String> {
        buf.clear();
        match self.reader.read_line(buf) {
            Ok(0) => Err(format!("{}: connection closed", self.addr)),
            Ok(_) if buf.ends_with("\r\n") => {
                buf.truncate(buf.len() - 2);
                Ok(())
            }
            Ok(_) => Err(format!("{}: reply without CRLF: {buf:?}", self.addr)),
            Err(e) => Err(format!("{}: {e}", self.addr)),
        }
    }

    fn one(&mut self, cmd: &str) -> Result<String, String> {
        self.send(format!("{cmd}\r\n").as_bytes())?;
        let mut buf = String::new();
        self.line(&mut buf)?;
        Ok(buf)
    }
}

pub fn check(o: &ClusterOptions) -> Result<(), ClusterError> {
    let bad = |m: &str| Err(ClusterError::Invalid(m.into()));
    if !(1..=1024).contains(&o.connections) {
        return bad("--connections must be 1..=1024");
    }
    if !(1..=4096).contains(&o.pipeline) {
        return bad("--pipeline must be 1..=4096");
    }
    if !(o.duration > 0.0 && o.duration.is_finite()) {
        return bad("--duration must be a positive number of seconds");
    }
    if o.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return bad("--rate must be a positive number");
    }
    if !(1..=1 << 20).contains(&o.value_size) {
        return bad("--value-size must be 1..=1048576");
    }
    if o.key_prefix.is_empty() || o.key_prefix.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return bad("--key-prefix must be non-empty, without spaces or control characters");
    }
    if !(o.settle_timeout > 0.0 && o.settle_timeout.is_finite()) {
        return bad("--settle-timeout must be a positive number of seconds");
    }
    Ok(())
}

pub fn run(o: &ClusterOptions) -> Result<ClusterReport, ClusterError> {
    check(o)?;
    let mut nodes = vec![Line::connect(&o.write)?];
    for r in &o.read {
        nodes.push(Line::connect(r)?);
    }
    let shared = Arc::new(Shared {
        latest: (0..o.connections).map(|_| Mutex::new(None)).collect(),
        done: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let mut writers = Vec::new();
    for c in 0..o.connections {
        let line = Line::connect(&o.write)?;
        let (o, shared) = (o.clone(), shared.clone());
        writers.push(std::thread::spawn(move || write_loop(line, c, &o, &shared)));
    }
    let mut probes = Vec::new();
    for r in &o.read {
        let line = Line::connect(r)?;
        let shared = shared.clone();
        probes.push(std::thread::spawn(move || probe_loop(line, &shared)));
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(o.duration));
    shared.done.store(true, Relaxed);
    for w in writers {
        let _ = w.join();
    }
    let write_end = Instant::now();
    let write_secs = (write_end - start).as_secs_f64();
    let mut lags = Histogram::<u64>::new(3).expect("histogram");
    for p in probes {
        if let Ok(h) = p.join() {
            lags.add(h).expect("same bounds");
        }
    }
    // Convergence: every node's root equal to the writer's.
    let deadline = write_end + Duration::from_secs_f64(o.settle_timeout);
    let converged = loop {
        let roots: Result<Vec<String>, String> = nodes.iter_mut().map(|n| n.one("HASH")).collect();
        match roots {
            Ok(r) if r.iter().all(|x| *x == r[0]) => break Instant::now(),
            Ok(_) => {}
            Err(e) => shared.error(e),
        }
        if Instant::now() > deadline {
            return Err(ClusterError::NoConvergence(o.settle_timeout));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let writes = shared.writes.load(Relaxed);
    let report = ClusterReport {
        writes,
        write_secs,
        writes_per_sec: writes as f64 / write_secs,
        replicated_per_sec: writes as f64 / (converged - start).as_secs_f64(),
        convergence_ms: (converged - write_end).as_secs_f64() * 1e3,
        lag_samples: lags.len(),
        lag_p50_us: lags.value_at_quantile(0.5),
        lag_p99_us: lags.value_at_quantile(0.99),
        lag_max_us: lags.max(),
        errors: shared.errors.load(Relaxed),
        first_error: shared.first_error.lock().unwrap().clone(),
    };
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| ClusterError::Output(e.to_string()))?;
        std::fs::write(path, text)
            .map_err(|e| ClusterError::Output(format!("{}: {e}", path.display())))?;
    }
    Ok(report)
}

fn write_loop(mut line: Line, c: usize, o: &ClusterOptions, shared: &Shared) {
    let value = "x".repeat(o.value_size);
    let per_conn_rate = o.rate.map(|r| r / o.connections as f64);
    let (mut batch, mut reply) = (Vec::new(), String::new());
    let start = Instant::now();
    let mut seq = 0u64;
    let mut batches = 0u64;
    while !shared.done.load(Relaxed) {
        if let Some(rate) = per_conn_rate {
            // Open loop: batch n is due at n × pipeline / rate.
            let due = start + Duration::from_secs_f64(batches as f64 * o.pipeline as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
                continue;
            }
        }
        batch.clear();
        for i in 0..o.pipeline as u64 {
            let _ = write!(batch, "SET {}{c}:{} {value}\r\n", o.key_prefix, seq + i);
        }
        if let Err(e) = line.send(&batch) {
            return shared.error(e);
        }
        for _ in 0..o.pipeline {
            if let Err(e) = line.line(&mut reply) {
                return shared.error(e);
            }
            if reply != "OK" {
                shared.error(format!("SET replied {reply:?}"));
            }
        }
        seq += o.pipeline as u64;
        batches += 1;
        shared.writes.fetch_add(o.pipeline as u64, Relaxed);
        let newest = format!("{}{c}:{}", o.key_prefix, seq - 1);
        *shared.latest[c].lock().unwrap() = Some((newest, Instant::now()));
    }
}

/// Sample lag on one reader until writing stops; returns the histogram in µs.
fn probe_loop(mut line: Line, shared: &Shared) -> Histogram<u64> {
    let mut lags = Histogram::<u64>::new(3).expect("histogram");
    let mut reply = String::new();
    let mut next = 0;
    let mut last_key = String::new();
    while !shared.done.load(Relaxed) {
        next = (next + 1) % shared.latest.len();
        let Some((key, acked)) = shared.latest[next].lock().unwrap().clone() else {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        };
        if key == last_key {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let get = format!("GET {key}\r\n");
        loop {
            if let Err(e) = line
                .send(get.as_bytes())
                .and_then(|_| line.line(&mut reply))
            {
                shared.error(e);
                return lags;
            }
            if reply != "(null)" {
                let lag = acked.elapsed();
                lags.record(lag.as_micros() as u64)
                    .expect("auto-resizing histogram");
                break;
            }
            if acked.elapsed() > PROBE_TIMEOUT {
                shared.error(format!(
                    "{key} not on {} after {PROBE_TIMEOUT:?}",
                    line.addr
                ));
                break;
            }
            // Poll, but do not hammer the reader: it is on the same cores as everything.
            std::thread::sleep(PROBE_POLL);
        }
        last_key = key;
    }
    lags
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn options_are_checked() {
        let parse = |args: &[&str]| ClusterOptions::try_parse_from(args).unwrap();
        let ok = parse(&["x", "--write", "a:1", "--read", "b:2"]);
        assert!(check(&ok).is_ok());
        for bad in [
            &["x", "--write", "a:1", "--read", "b:2", "--connections", "0"][..],
            &["x", "--write", "a:1", "--read", "b:2", "--pipeline", "0"],
            &["x", "--write", "a:1", "--read", "b:2", "--rate=-1"],
            &[
                "x",
                "--write",
                "a:1",
                "--read",
                "b:2",
                "--key-prefix",
                "a b",
            ],
            &["x", "--write", "a:1", "--read", "b:2", "--duration", "0"],
        ] {
            assert!(check(&parse(bad)).is_err(), "{bad:?}");
        }
        assert!(
            ClusterOptions::try_parse_from(["x", "--write", "a:1"]).is_err(),
            "--read is required"
        );
    }
}
