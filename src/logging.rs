//! Logging set-up: `tracing` to stderr or a file, as text or JSON, from `[logging]`;
//! and [`LogLimit`], which keeps repeatable warnings from flooding the log.

use crate::config::{LogFormat, LoggingConfig};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per period, for what a peer, a client or bad input can repeat
/// at will (a counter beside it counts every case).
#[derive(Debug, Clone, Copy)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
}

impl LogLimit {
    pub const fn new(every: Duration) -> LogLimit {
        LogLimit { every, last: None }
    }

    /// Whether a line may be logged now (and, if so, the period starts again).
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self.last.is_none_or(|t| now - t >= self.every);
        if due {
            self.last = Some(now);
        }
        due
    }
}
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `RUST_LOG`, when set, refines the configured level.
pub fn init(cfg: &LoggingConfig) -> Result<(), String> {
    // The MQTT client logs every connection at info: keep it to warnings. The embedded
    // broker (rumqttd) logs the end of every client link at ERROR, clean disconnects
    // included (a peer restarting, this node stopping — twice when the client says
    // goodbye first): noise an operator cannot act on. Its start-up failures reach us as
    // errors (broker.rs) and every client logs its own connection trouble, so its log is
    // off unless RUST_LOG asks for it (`RUST_LOG=info,rumqttd=info`).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rumqttd=off,rumqttc=warn", cfg.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let json = cfg.format == LogFormat::Json;
    let result = match &cfg.file_path {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {path}: {e}"))?;
            let builder = builder.with_ansi(false).with_writer(Mutex::new(file));
            if json {
                builder.json().try_init()
            } else {
                builder.try_init()
            }
        }
        None => {
            use std::io::IsTerminal;
            let builder = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            if json {
                builder.json().try_init()
            } else {
                builder.try_init()
            }
        }
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_lets_the_first_line_through_then_waits_its_period() {
        let mut hourly = LogLimit::new(Duration::from_secs(3600));
        assert!(hourly.due());
        assert!(!hourly.due());
        let mut always = LogLimit::new(Duration::ZERO);
        assert!(always.due() && always.due());
    }
}
