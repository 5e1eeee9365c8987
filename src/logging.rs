//! Logging set-up: `tracing` to stderr or a file, as text or JSON, from `[logging]`.

use crate::config::{LogFormat, LoggingConfig};
use std::sync::Mutex;
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
