//! Command-line options (also the library's configuration) and their checks.

use crate::Error;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::str::FromStr;

/// Largest value the harness generates (bytes); replies are buffered whole.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Largest pipeline depth per connection.
pub const PIPELINE_MAX: usize = 4096;
/// Largest number of connections.
pub const CONNECTIONS_MAX: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MerkleKV text protocol: `SET k v`, `GET k`, `DEL k`.
    Native,
    /// memcached text protocol.
    Memcache,
    /// Redis RESP2.
    Resp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipfian,
}

/// Operation mix, `SET:GET[:DEL]` weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ratio {
    pub set: u32,
    pub get: u32,
    pub del: u32,
}

impl FromStr for Ratio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(format!("ratio {s:?} is not SET:GET or SET:GET:DEL"));
        }
        let num = |p: &str| {
            p.trim()
                .parse::<u32>()
                .map_err(|e| format!("ratio part {p:?}: {e}"))
        };
        let ratio = Ratio {
            set: num(parts[0])?,
            get: num(parts[1])?,
            del: parts.get(2).map_or(Ok(0), |p| num(p))?,
        };
        if ratio.set as u64 + ratio.get as u64 + ratio.del as u64 == 0 {
            return Err("ratio weights are all zero".into());
        }
        Ok(ratio)
    }
}

/// Value size in bytes: `N` or `MIN-MAX` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SizeRange {
    pub min: usize,
    pub max: usize,
}

impl FromStr for SizeRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |p: &str| {
            p.trim()
                .parse::<usize>()
                .map_err(|e| format!("size {p:?}: {e}"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min == 0 || min > max || max > VALUE_BYTES_MAX {
            return Err(format!(
                "value size {s:?} must be 1..={VALUE_BYTES_MAX} with MIN <= MAX"
            ));
        }
        Ok(SizeRange { min, max })
    }
}

/// Load generator for MerkleKV, memcached and Redis that validates every reply.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "loadtest", version, about)]
pub struct Options {
    /// Server address(es), comma-separated; connections are spread round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7878")]
    pub addr: Vec<String>,
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Native)]
    pub protocol: Protocol,
    /// Number of TCP connections.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Requests in flight per connection (closed loop: one batch, one write).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Length of the measured phase in seconds.
    #[arg(long, default_value_t = 10.0, conflicts_with = "requests")]
    pub duration: f64,
    /// Run this many requests instead of a fixed duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Operation mix as SET:GET or SET:GET:DEL weights.
    #[arg(long, default_value = "1:10")]
    pub ratio: Ratio,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Value size in bytes, N or MIN-MAX.
    #[arg(long, default_value = "32")]
    pub value_size: SizeRange,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Skew of the zipfian distribution, in (0, 1).
    #[arg(long, default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// Write every key once (pipelined, each through its owning connection) before the measured phase.
    #[arg(long)]
    pub prefill: bool,
    /// Client threads; each runs one event loop over its share of connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Open loop: total requests per second on a fixed schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write latency and throughput charts as SVG to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Text before the key number.
    #[arg(long, default_value = "key:")]
    pub key_prefix: String,
    /// Digits of the zero-padded key number [default: digits of KEYS-1].
    #[arg(long)]
    pub key_width: Option<usize>,
    /// Seconds to wait for a reply before the connection counts as failed.
    #[arg(long, default_value_t = 5.0)]
    pub reply_timeout: f64,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options::parse_from(["loadtest"])
    }
}

impl Options {
    /// Parses command-line style arguments (the first is the program name).
    pub fn from_args<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Options::try_parse_from(args)
    }

    /// Checks the limits clap cannot express.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidOption(msg));
        if self.addr.is_empty() || self.addr.iter().any(|a| a.trim().is_empty()) {
            return bad("--addr needs at least one HOST:PORT".into());
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return bad(format!("--connections must be 1..={CONNECTIONS_MAX}"));
        }
        if !(1..=PIPELINE_MAX).contains(&self.pipeline) {
            return bad(format!("--pipeline must be 1..={PIPELINE_MAX}"));
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1".into());
        }
        // Each connection owns the keys k with k % connections == its index.
        if self.keys < self.connections as u64 {
            return bad(
                "--keys must be at least --connections (each connection owns its keys)".into(),
            );
        }
        if self.requests.is_none() && !(self.duration > 0.0 && self.duration.is_finite()) {
            return bad("--duration must be a positive number of seconds".into());
        }
        if self.requests == Some(0) {
            return bad("--requests must be at least 1".into());
        }
        if !(self.zipf_theta > 0.0 && self.zipf_theta < 1.0) {
            return bad("--zipf-theta must be in (0, 1)".into());
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return bad("--rate must be a positive number".into());
        }
        if !(self.reply_timeout > 0.0 && self.reply_timeout.is_finite()) {
            return bad("--reply-timeout must be a positive number of seconds".into());
        }
        if self.key_prefix.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return bad("--key-prefix must not contain spaces or control characters".into());
        }
        let digits = digits(self.keys - 1);
        if self.key_width.is_some_and(|w| w < digits || w > 20) {
            return bad(format!(
                "--key-width must be {digits}..=20 to number {} keys",
                self.keys
            ));
        }
        Ok(())
    }

    /// Threads actually used: never more than connections.
    pub fn threads_used(&self) -> usize {
        self.threads.min(self.connections)
    }
}

/// Number of decimal digits of `n`.
pub fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let o = Options::default();
        assert_eq!(o.addr, vec!["127.0.0.1:7878"]);
        assert_eq!(o.protocol, Protocol::Native);
        assert_eq!((o.connections, o.pipeline, o.threads), (50, 1, 1));
        assert_eq!(o.duration, 10.0);
        assert_eq!(
            o.ratio,
            Ratio {
                set: 1,
                get: 10,
                del: 0
            }
        );
        assert_eq!(o.keys, 100_000);
        assert_eq!(o.value_size, SizeRange { min: 32, max: 32 });
        assert_eq!(o.distribution, Distribution::Uniform);
        o.check().unwrap();
    }

    #[test]
    fn flags_parse() {
        let o = Options::try_parse_from([
            "loadtest",
            "--addr",
            "a:1,b:2",
            "--ratio",
            "1:2:3",
            "--value-size",
            "10-20",
            "--requests",
            "5",
            "--protocol",
            "resp",
        ])
        .unwrap();
        assert_eq!(o.addr, vec!["a:1", "b:2"]);
        assert_eq!(
            o.ratio,
            Ratio {
                set: 1,
                get: 2,
                del: 3
            }
        );
        assert_eq!(o.value_size, SizeRange { min: 10, max: 20 });
        assert_eq!(o.requests, Some(5));
        assert!(
            Options::try_parse_from(["loadtest", "--requests", "5", "--duration", "1"]).is_err()
        );
        assert!("0:0".parse::<Ratio>().is_err());
        assert!("1".parse::<Ratio>().is_err());
        assert!("20-10".parse::<SizeRange>().is_err());
        assert!("0".parse::<SizeRange>().is_err());
    }

    #[test]
    fn limits_are_checked() {
        let with = |args: &[&str]| {
            let mut all = vec!["loadtest"];
            all.extend_from_slice(args);
            Options::try_parse_from(all).unwrap().check()
        };
        assert!(with(&["--pipeline", "0"]).is_err());
        assert!(with(&["--connections", "0"]).is_err());
        assert!(with(&["--connections", "10", "--keys", "9"]).is_err());
        assert!(with(&["--keys", "1000", "--key-width", "2"]).is_err());
        assert!(with(&["--keys", "1000", "--key-width", "9"]).is_ok());
        assert!(with(&["--zipf-theta", "1"]).is_err());
        assert!(with(&["--rate", "0"]).is_err());
        assert!(with(&["--key-prefix", "a b"]).is_err());
    }

    #[test]
    fn digits_counts_decimal_digits() {
        assert_eq!(digits(0), 1);
        assert_eq!(digits(9), 1);
        assert_eq!(digits(10), 2);
        assert_eq!(digits(99_999), 5);
        assert_eq!(digits(u64::MAX), 20);
    }
}
