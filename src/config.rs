//! Node configuration: defaults, the optional TOML file, `MERKLE_KV_*`
//! environment overrides, and validation.
//!
//! Every key is described once, in `SCHEMA`. Unknown-key detection, type
//! checking, range checking and environment variable names are all derived
//! from that table, so they cannot drift apart. Problems are collected rather
//! than returned on first sight: an operator fixing a config file should see
//! everything that is wrong in one run.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::{Table, Value};

use crate::limits::SHARDS_MAX;

const MIB: u64 = 1024 * 1024;
const ENV_PREFIX: &str = "MERKLE_KV";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub node_id: String,
    pub description: Option<String>,
    pub network: NetworkConfig,
    pub mqtt: MqttConfig,
    pub anti_entropy: AntiEntropyConfig,
    pub storage: StorageConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    pub bind_address: String,
    pub bind_port: u16,
    pub max_connections: usize,
    /// Idle seconds before a client connection is closed; 0 = never.
    pub connection_timeout: u64,
    pub max_line_bytes: usize,
    /// `host:port` peers and clients reach this node on (presence records, anti-entropy);
    /// `None` = the bound address.
    pub advertise_address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MqttConfig {
    pub enabled: bool,
    pub broker_address: String,
    pub topic_prefix: String,
    /// Empty in the file means "use node_id"; resolved by [`Config::load`].
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u64,
    pub clean_session: bool,
    pub batch_max_events: usize,
    pub batch_max_delay_us: u64,
    pub backpressure_max_ms: u64,
    pub offline_buffer_events: usize,
    /// At shutdown, how long to keep publishing (or hand changes to a peer) before exiting.
    pub shutdown_flush_ms: u64,
    pub offline_buffer_bytes: usize,
    /// A peer whose clock is further than this from ours is logged and counted.
    pub max_clock_skew_ms: u64,
    pub embedded_broker: EmbeddedBrokerConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmbeddedBrokerConfig {
    pub enabled: bool,
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AntiEntropyConfig {
    pub enabled: bool,
    pub interval_seconds: u64,
    pub peer_discovery_interval: u64,
    pub max_concurrent_syncs: usize,
    pub peer_list: Vec<String>,
    /// Longest a starting node stays LOADING while no exchange with a peer completes.
    pub bootstrap_timeout_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StorageConfig {
    /// 0 = auto; after [`Config::load`] always the resolved power of two.
    pub shards: usize,
    /// 0 = unlimited.
    pub memory_limit_mb: u64,
    pub persistence_enabled: bool,
    /// Where the shards' logs and snapshots live; `None`: `data/<node_id>`.
    pub data_dir: Option<String>,
    pub fsync: Fsync,
    /// A shard's log this large (MiB) since its last snapshot starts a new snapshot.
    pub snapshot_log_mb: u64,
    /// Hours between backups; 0 = none but those the `BACKUP` command asks for.
    pub backup_interval_hours: u64,
    /// Where backups go; `None`: `<data_dir>/backups`.
    pub backup_dir: Option<String>,
    /// Complete backups kept in `backup_dir`; older ones are removed after each backup.
    pub backup_retain: usize,
    pub tombstone_grace_seconds: u64,
    /// Pin each shard thread to its own core (when there are enough cores).
    pub pin_threads: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggingConfig {
    /// One of trace, debug, info, warn, error; stored lower-case.
    pub level: String,
    pub format: LogFormat,
    pub file_path: Option<String>,
}

/// When persisted changes reach the disk (`[storage] fsync`; docs/PERSISTENCE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// A write is acknowledged only once its record is synced (group commit).
    Always,
    /// Records are written to the OS as they come and synced once a second.
    EverySec,
    /// Records are written to the OS as they come; the OS decides when they reach disk.
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// One human-readable message per problem.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// What a key accepts. Ranges live here so the file and the environment are
/// checked by the same code and produce the same wording.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    /// A string with something other than whitespace in it.
    NonEmpty,
    /// Optional string; empty means unset.
    OptStr,
    Bool,
    Int {
        min: u64,
        max: u64,
    },
    List,
    /// Case-insensitive choice, stored lower-case.
    Choice(&'static [&'static str]),
}

// Converted values are carried as `toml::Value`s already checked against their
// `Kind`. The accessors never panic: a mismatch (impossible after conversion)
// would only yield an empty value.
fn text(v: Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}
fn opt_text(v: Value) -> Option<String> {
    Some(text(v)).filter(|s| !s.is_empty())
}
fn int(v: &Value) -> u64 {
    v.as_integer()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0)
}
fn size(v: &Value) -> usize {
    usize::try_from(int(v)).unwrap_or(usize::MAX)
}
fn list(v: &Value) -> Vec<String> {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

struct Field {
    /// Dotted section path; "" for top-level keys.
    section: &'static str,
    name: &'static str,
    kind: Kind,
    set: fn(&mut Config, Value),
}

impl Field {
    fn key(&self) -> String {
        join(self.section, self.name)
    }
    fn env_var(&self) -> String {
        env_var_of(&self.key())
    }
}

fn env_var_of(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.replace('.', "_")).to_uppercase()
}

/// Keys that were settings once, and why they went. In the file or the environment they
/// are refused with that reason: "unknown" would send an operator looking for a typo.
static REMOVED: &[(&str, &str)] = &[(
    "network.io_threads",
    "removed in 0.1 \u{2014} connections are served on the shard threads (see ARCHITECTURE.md)",
)];

const fn range(min: u64, max: u64) -> Kind {
    Kind::Int { min, max }
}
const ANY: Kind = range(0, i64::MAX as u64);
const PORT: Kind = range(1, 65535);
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];
const FORMATS: &[&str] = &["text", "json"];
const FSYNCS: &[&str] = &["always", "everysec", "no"];

macro_rules! f {
    ($sec:literal, $name:literal, $kind:expr, |$c:ident, $v:ident| $body:expr) => {
        Field {
            section: $sec,
            name: $name,
            kind: $kind,
            set: |$c, $v| $body,
        }
    };
}

/// The single source of truth for every configuration key.
#[rustfmt::skip]
static SCHEMA: &[Field] = &[
    f!("", "node_id", Kind::NonEmpty, |c, v| c.node_id = text(v)),
    f!("", "description", Kind::OptStr, |c, v| c.description = opt_text(v)),
    f!("network", "bind_address", Kind::Str, |c, v| c.network.bind_address = text(v)),
    f!("network", "bind_port", PORT, |c, v| c.network.bind_port = u16::try_from(int(&v)).unwrap_or(0)),
    f!("network", "max_connections", range(1, 1_000_000), |c, v| c.network.max_connections = size(&v)),
    f!("network", "connection_timeout", ANY, |c, v| c.network.connection_timeout = int(&v)),
    f!("network", "max_line_bytes", range(1024, 64 * MIB), |c, v| c.network.max_line_bytes = size(&v)),
    f!("network", "advertise_address", Kind::OptStr, |c, v| c.network.advertise_address = opt_text(v)),
    f!("mqtt", "enabled", Kind::Bool, |c, v| c.mqtt.enabled = v.as_bool() == Some(true)),
    f!("mqtt", "broker_address", Kind::Str, |c, v| c.mqtt.broker_address = text(v)),
    f!("mqtt", "topic_prefix", Kind::Str, |c, v| c.mqtt.topic_prefix = text(v)),
    f!("mqtt", "client_id", Kind::Str, |c, v| c.mqtt.client_id = text(v)),
    f!("mqtt", "username", Kind::OptStr, |c, v| c.mqtt.username = opt_text(v)),
    f!("mqtt", "password", Kind::OptStr, |c, v| c.mqtt.password = opt_text(v)),
    // MQTT carries keep-alive in a u16.
    f!("mqtt", "keep_alive", PORT, |c, v| c.mqtt.keep_alive = int(&v)),
    f!("mqtt", "clean_session", Kind::Bool, |c, v| c.mqtt.clean_session = v.as_bool() == Some(true)),
    f!("mqtt", "batch_max_events", range(1, 65536), |c, v| c.mqtt.batch_max_events = size(&v)),
    f!("mqtt", "batch_max_delay_us", ANY, |c, v| c.mqtt.batch_max_delay_us = int(&v)),
    f!("mqtt", "backpressure_max_ms", ANY, |c, v| c.mqtt.backpressure_max_ms = int(&v)),
    f!("mqtt", "offline_buffer_events", range(1, i64::MAX as u64), |c, v| c.mqtt.offline_buffer_events = size(&v)),
    f!("mqtt", "shutdown_flush_ms", range(0, 600_000), |c, v| c.mqtt.shutdown_flush_ms = int(&v)),
    // Below 1 MiB, a single change of a default-sized value could never be kept.
    f!("mqtt", "offline_buffer_bytes", range(MIB, i64::MAX as u64), |c, v| c.mqtt.offline_buffer_bytes = size(&v)),
    f!("mqtt", "max_clock_skew_ms", range(1, i64::MAX as u64), |c, v| c.mqtt.max_clock_skew_ms = int(&v)),
    f!("mqtt.embedded_broker", "enabled", Kind::Bool, |c, v| c.mqtt.embedded_broker.enabled = v.as_bool() == Some(true)),
    f!("mqtt.embedded_broker", "listen", Kind::Str, |c, v| c.mqtt.embedded_broker.listen = text(v)),
    f!("anti_entropy", "enabled", Kind::Bool, |c, v| c.anti_entropy.enabled = v.as_bool() == Some(true)),
    f!("anti_entropy", "interval_seconds", range(1, i64::MAX as u64), |c, v| c.anti_entropy.interval_seconds = int(&v)),
    f!("anti_entropy", "peer_discovery_interval", ANY, |c, v| c.anti_entropy.peer_discovery_interval = int(&v)),
    f!("anti_entropy", "max_concurrent_syncs", range(1, 1024), |c, v| c.anti_entropy.max_concurrent_syncs = size(&v)),
    f!("anti_entropy", "peer_list", Kind::List, |c, v| c.anti_entropy.peer_list = list(&v)),
    f!("anti_entropy", "bootstrap_timeout_seconds", range(1, 86_400), |c, v| c.anti_entropy.bootstrap_timeout_seconds = int(&v)),
    f!("storage", "shards", range(0, SHARDS_MAX as u64), |c, v| c.storage.shards = size(&v)),
    f!("storage", "memory_limit_mb", ANY, |c, v| c.storage.memory_limit_mb = int(&v)),
    f!("storage", "persistence_enabled", Kind::Bool, |c, v| c.storage.persistence_enabled = v.as_bool() == Some(true)),
    f!("storage", "data_dir", Kind::OptStr, |c, v| c.storage.data_dir = opt_text(v)),
    f!("storage", "fsync", Kind::Choice(FSYNCS), |c, v| c.storage.fsync = match text(v).as_str() { "always" => Fsync::Always, "no" => Fsync::No, _ => Fsync::EverySec }),
    f!("storage", "snapshot_log_mb", range(1, 1 << 20), |c, v| c.storage.snapshot_log_mb = int(&v)),
    // At most a year: a larger interval is a typo, and a year of hours fits any timer.
    f!("storage", "backup_interval_hours", range(0, 8_760), |c, v| c.storage.backup_interval_hours = int(&v)),
    f!("storage", "backup_dir", Kind::OptStr, |c, v| c.storage.backup_dir = opt_text(v)),
    f!("storage", "backup_retain", range(1, 10_000), |c, v| c.storage.backup_retain = size(&v)),
    f!("storage", "tombstone_grace_seconds", range(60, i64::MAX as u64), |c, v| c.storage.tombstone_grace_seconds = int(&v)),
    f!("storage", "pin_threads", Kind::Bool, |c, v| c.storage.pin_threads = v.as_bool() == Some(true)),
    f!("logging", "level", Kind::Choice(LEVELS), |c, v| c.logging.level = text(v)),
    f!("logging", "format", Kind::Choice(FORMATS), |c, v| c.logging.format = if text(v) == "json" { LogFormat::Json } else { LogFormat::Text }),
    f!("logging", "file_path", Kind::OptStr, |c, v| c.logging.file_path = opt_text(v)),
];

impl Kind {
    fn expected(self) -> String {
        match self {
            Kind::Str | Kind::OptStr => "expected a string".into(),
            Kind::NonEmpty => "expected a non-empty string".into(),
            Kind::Bool => "expected true or false".into(),
            Kind::Int { min, max } if max >= i64::MAX as u64 => {
                format!("expected an integer >= {min}")
            }
            Kind::Int { min, max } => format!("expected an integer from {min} to {max}"),
            Kind::List => "expected a list of strings".into(),
            Kind::Choice(opts) => format!("expected one of {}", opts.join(", ")),
        }
    }

    fn parse_toml(self, v: &Value) -> Option<Value> {
        match (self, v) {
            (Kind::Str | Kind::OptStr, Value::String(_)) => Some(v.clone()),
            (Kind::NonEmpty, Value::String(s)) => self.parse_env(s),
            (Kind::Bool, Value::Boolean(_)) => Some(v.clone()),
            (Kind::Int { .. }, Value::Integer(n)) => self.int_in_range(u64::try_from(*n).ok()?),
            (Kind::List, Value::Array(items)) if items.iter().all(Value::is_str) => Some(v.clone()),
            (Kind::Choice(_), Value::String(s)) => self.choice(s),
            _ => None,
        }
    }

    fn parse_env(self, raw: &str) -> Option<Value> {
        let t = raw.trim();
        match self {
            // Strings are taken verbatim: "8080" stays a string.
            Kind::Str | Kind::OptStr => Some(raw.into()),
            Kind::NonEmpty => Some(raw.into()).filter(|_| !t.is_empty()),
            Kind::Bool => match t.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true.into()),
                "false" | "0" | "no" | "off" => Some(false.into()),
                _ => None,
            },
            Kind::Int { .. } => self.int_in_range(t.parse().ok()?),
            Kind::List if t.starts_with('[') => {
                let table: Table = format!("v = {t}").parse().ok()?;
                self.parse_toml(table.get("v")?)
            }
            Kind::List => Some(Value::Array(
                t.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Value::from)
                    .collect(),
            )),
            Kind::Choice(_) => self.choice(t),
        }
    }

    fn int_in_range(self, n: u64) -> Option<Value> {
        match self {
            Kind::Int { min, max } if (min..=max).contains(&n) => {
                i64::try_from(n).ok().map(Value::from)
            }
            _ => None,
        }
    }

    fn choice(self, s: &str) -> Option<Value> {
        let lower = s.to_ascii_lowercase();
        match self {
            Kind::Choice(opts) if opts.contains(&lower.as_str()) => Some(lower.into()),
            _ => None,
        }
    }
}

impl Config {
    /// Built-in defaults. `node_id` and `mqtt.client_id` are left empty
    /// ("unset"); [`Config::load`] resolves them. The embedded broker is on
    /// only without a file, so `merkle-kv` with no arguments just works.
    pub fn defaults(file_given: bool) -> Config {
        Config {
            node_id: String::new(),
            description: None,
            network: NetworkConfig {
                bind_address: "127.0.0.1".into(),
                bind_port: 7878,
                max_connections: 1000,
                connection_timeout: 30,
                max_line_bytes: MIB as usize,
                advertise_address: None,
            },
            mqtt: MqttConfig {
                enabled: true,
                broker_address: String::new(),
                topic_prefix: "merkle-kv".into(),
                client_id: String::new(),
                username: None,
                password: None,
                keep_alive: 60,
                clean_session: true,
                batch_max_events: 512,
                batch_max_delay_us: 1000,
                backpressure_max_ms: 500,
                offline_buffer_events: 100_000,
                shutdown_flush_ms: 5000,
                offline_buffer_bytes: 256 * MIB as usize,
                max_clock_skew_ms: 1000,
                embedded_broker: EmbeddedBrokerConfig {
                    enabled: !file_given,
                    listen: "127.0.0.1:1883".into(),
                },
            },
            anti_entropy: AntiEntropyConfig {
                enabled: true,
                interval_seconds: 300,
                peer_discovery_interval: 600,
                max_concurrent_syncs: 3,
                peer_list: Vec::new(),
                bootstrap_timeout_seconds: 30,
            },
            storage: StorageConfig {
                shards: 0,
                memory_limit_mb: 1024,
                persistence_enabled: false,
                data_dir: None,
                fsync: Fsync::EverySec,
                snapshot_log_mb: 256,
                backup_interval_hours: 24,
                backup_dir: None,
                backup_retain: 7,
                tombstone_grace_seconds: 86_400,
                pin_threads: true,
            },
            logging: LoggingConfig {
                level: "info".into(),
                format: LogFormat::Text,
                file_path: None,
            },
        }
    }

    /// `path = None` means "no file": defaults, and the embedded broker on.
    /// `env` looks up an environment variable; `cores` resolves `shards = 0`.
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
        cores: usize,
    ) -> Result<Config, ConfigError> {
        match path {
            None => Config::from_toml_str("", false, env, cores),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
                Config::from_toml_str(&text, true, env, cores)
            }
        }
    }

    /// Parses `text` (file contents; ignored when `file_given` is false),
    /// applies environment overrides, resolves derived values and validates.
    pub fn from_toml_str(
        text: &str,
        file_given: bool,
        env: &[(String, String)],
        cores: usize,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::defaults(file_given);
        let mut problems = Vec::new();
        let mut node_id_set = false;

        if file_given {
            let table: Table = text
                .parse()
                .map_err(|e| ConfigError::Invalid(vec![syntax_message(text, &e)]))?;
            walk_table(&table, "", &mut cfg, &mut problems, &mut node_id_set);
        }

        // Env after the file: env wins. A bad file value is still reported,
        // because the file should be valid on its own.
        let mut from_env = Vec::new();
        let known: Vec<String> = SCHEMA.iter().map(Field::env_var).collect();
        // A mistyped variable would otherwise be ignored in silence, like a mistyped key.
        for (var, _) in env {
            if let Some((key, why)) = REMOVED.iter().find(|(key, _)| env_var_of(key) == *var) {
                problems.push(format!("{key}: {why} (set by {var})"));
            } else if var.starts_with(&format!("{ENV_PREFIX}_")) && !known.contains(var) {
                let hint = nearest(var, var.len() / 2, known.iter())
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                problems.push(format!("unknown environment variable `{var}`{hint}"));
            }
        }
        for (field, var) in SCHEMA.iter().zip(known) {
            let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) else {
                continue;
            };
            match field.kind.parse_env(raw) {
                Some(v) => {
                    node_id_set |= field.name == "node_id" && field.section.is_empty();
                    (field.set)(&mut cfg, v);
                    from_env.push((field.key(), var));
                }
                None => problems.push(format!("{var}: {}, found {:?}", field.kind.expected(), raw)),
            }
        }

        if !node_id_set {
            if file_given {
                problems.push(
                    "node_id: required when a config file is given \
                     (add `node_id = \"...\"` at the top of the file or set MERKLE_KV_NODE_ID)"
                        .into(),
                );
            } else {
                cfg.node_id = format!("{}-{}", hostname(), cfg.network.bind_port);
            }
        }
        if cfg.mqtt.client_id.is_empty() {
            cfg.mqtt.client_id = cfg.node_id.clone();
        }
        let checked = problems.len();
        cfg.validate(&mut problems);
        // A rule broken by an environment value names the variable, not just the key.
        for problem in &mut problems[checked..] {
            if let Some((_, var)) = from_env
                .iter()
                .find(|(key, _)| problem.starts_with(&format!("{key}:")))
            {
                problem.push_str(&format!(" (set by {var})"));
            }
        }
        cfg.storage.shards = resolve_shards(cfg.storage.shards, cores);

        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective configuration as TOML (for `--print-config`). Feeding
    /// it back through [`Config::from_toml_str`] yields the same `Config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Where this node's data lives: `storage.data_dir`, or `data/<node_id>`.
    pub fn data_dir(&self) -> std::path::PathBuf {
        match &self.storage.data_dir {
            Some(dir) => dir.into(),
            None => std::path::Path::new("data").join(&self.node_id),
        }
    }

    /// Where this node's backups go: `storage.backup_dir`, or `<data_dir>/backups`.
    pub fn backup_dir(&self) -> std::path::PathBuf {
        match &self.storage.backup_dir {
            Some(dir) => dir.into(),
            None => self.data_dir().join("backups"),
        }
    }

    /// Number of shards to run: never 0, always a power of two.
    pub fn shard_count(&self) -> usize {
        // Re-derived rather than trusted, in case the struct was built by hand.
        resolve_shards(self.storage.shards, 1)
    }

    /// Rules that span more than one key or need parsing beyond the kind.
    fn validate(&self, problems: &mut Vec<String>) {
        let addr = &self.network.bind_address;
        if addr.parse::<IpAddr>().is_err() {
            let hint = if addr.chars().any(|c| c.is_ascii_alphabetic()) && !addr.contains(':') {
                " (hostnames are not resolved; use an IP address such as 127.0.0.1, 0.0.0.0 or ::1)"
            } else {
                ""
            };
            problems.push(format!(
                "network.bind_address: expected an IPv4 or IPv6 address, found {addr:?}{hint}"
            ));
        }

        if self.node_id.len() > crate::limits::NODE_ID_BYTES_MAX
            || self.node_id.contains(['/', '+', '#'])
        {
            problems.push(format!(
                "node_id: at most {} bytes, without `/`, `+` or `#` (it names the node's \
                 MQTT presence topic), found {:?}",
                crate::limits::NODE_ID_BYTES_MAX,
                self.node_id
            ));
        }
        // A node that has not exchanged for a grace period treats itself as isolated and
        // rejoins (node/bootstrap.rs): several rounds must fit in that time.
        let grace = self.storage.tombstone_grace_seconds;
        if self.anti_entropy.interval_seconds >= grace / 4 {
            problems.push(format!(
                "anti_entropy.interval_seconds: must be below storage.tombstone_grace_seconds \
                 / 4 ({}), found {}",
                grace / 4,
                self.anti_entropy.interval_seconds
            ));
        }
        let mqtt = &self.mqtt;
        if mqtt.offline_buffer_events < mqtt.batch_max_events {
            problems.push(format!(
                "mqtt.offline_buffer_events: must be at least mqtt.batch_max_events ({}), \
                 or no batch could ever fill, found {}",
                mqtt.batch_max_events, mqtt.offline_buffer_events
            ));
        }
        if mqtt.broker_address.is_empty() {
            if mqtt.enabled && !mqtt.embedded_broker.enabled {
                problems.push(
                    "mqtt.broker_address: required when MQTT replication is enabled and the \
                     embedded broker is off (set `[mqtt] enabled = false` for a standalone node, \
                     or `[mqtt.embedded_broker] enabled = true`)"
                        .into(),
                );
            }
        } else if let Err(why) = check_broker_address(&mqtt.broker_address) {
            problems.push(format!(
                "mqtt.broker_address: {why}, found {:?} (expected tcp://host:port or mqtts://host:port)",
                mqtt.broker_address
            ));
        }
        if mqtt.topic_prefix.is_empty() {
            problems.push("mqtt.topic_prefix: must not be empty".into());
        } else if mqtt.topic_prefix.contains(['+', '#']) {
            problems.push(format!(
                "mqtt.topic_prefix: must not contain the MQTT wildcards `+` or `#`, found {:?}",
                mqtt.topic_prefix
            ));
        }
        let listen = &mqtt.embedded_broker.listen;
        if mqtt.embedded_broker.enabled && listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "mqtt.embedded_broker.listen: expected an IP socket address such as \
                 127.0.0.1:1883, found {listen:?}"
            ));
        }

        if let Some(a) = &self.network.advertise_address {
            if let Err(why) = host_port(a) {
                problems.push(format!(
                    "network.advertise_address: {why}, found {a:?} (expected host:port)"
                ));
            }
        }
        for (i, peer) in self.anti_entropy.peer_list.iter().enumerate() {
            if let Err(why) = host_port(peer) {
                problems.push(format!(
                    "anti_entropy.peer_list[{i}]: {why}, found {peer:?} (expected host:port)"
                ));
            }
        }

        if let Some(dir) = &self.storage.backup_dir {
            // Backups in the data directory's own top level would sit among its files:
            // a restore needs that directory empty.
            if dir.trim().is_empty() || Path::new(dir) == self.data_dir() {
                problems.push(format!(
                    "storage.backup_dir: must name a directory other than storage.data_dir \
                     ({}), found {dir:?}",
                    self.data_dir().display()
                ));
            }
        }

        let shards = self.storage.shards;
        if shards != 0 && !shards.is_power_of_two() {
            problems.push(format!(
                "storage.shards: expected 0 (auto) or a power of two from 1 to {SHARDS_MAX}, found {shards}"
            ));
        }
    }
}

/// Walks a parsed table by the schema, applying good values and recording
/// every unknown or removed key and type error.
fn walk_table(
    table: &Table,
    section: &str,
    cfg: &mut Config,
    problems: &mut Vec<String>,
    node_id_set: &mut bool,
) {
    // toml::Table is sorted by name; report in schema order instead, which
    // follows the layout of a normal file. Unknown keys go last.
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(name, _)| {
        let key = join(section, name);
        SCHEMA
            .iter()
            .position(|f| f.key() == key || is_within(f.section, &key))
            .unwrap_or(usize::MAX)
    });
    for (name, value) in entries {
        let key = join(section, name);
        if let Some(field) = SCHEMA
            .iter()
            .find(|f| f.section == section && f.name == name)
        {
            // Present counts as set even if mistyped: one message, not two.
            *node_id_set |= key == "node_id";
            match field.kind.parse_toml(value) {
                Some(v) => (field.set)(cfg, v),
                None => problems.push(format!(
                    "{key}: {}, found {}",
                    field.kind.expected(),
                    describe(value)
                )),
            }
        } else if let Some((_, why)) = REMOVED.iter().find(|(k, _)| *k == key) {
            problems.push(format!("{key}: {why}"));
        } else if is_section(&key) {
            match value {
                Value::Table(sub) => walk_table(sub, &key, cfg, problems, node_id_set),
                other => problems.push(format!(
                    "{key}: expected a table ([{key}]), found {}",
                    describe(other)
                )),
            }
        } else {
            let what = if value.is_table() { "section" } else { "key" };
            let hint = suggest(&key, name)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            problems.push(format!("unknown {what} `{key}`{hint}"));
        }
    }
}

fn join(section: &str, name: &str) -> String {
    if section.is_empty() {
        name.to_string()
    } else {
        format!("{section}.{name}")
    }
}

fn is_section(key: &str) -> bool {
    SCHEMA.iter().any(|f| is_within(f.section, key))
}

/// Whether `section` is `key` or nested below it.
fn is_within(section: &str, key: &str) -> bool {
    section
        .strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Nearest known key or section: by edit distance on the full dotted name,
/// else the same bare name in another section (a key put in the wrong table).
fn suggest(key: &str, name: &str) -> Option<String> {
    let mut candidates: Vec<String> = SCHEMA.iter().map(Field::key).collect();
    candidates.extend(SCHEMA.iter().map(|f| f.section.to_string()));
    candidates.retain(|c| !c.is_empty());
    nearest(key, name.len(), candidates.iter())
        .or_else(|| SCHEMA.iter().find(|f| f.name == name).map(Field::key))
}

/// The candidate nearest to `word` by edit distance, if any is near enough to be a typo
/// of a name `name_len` long (the part after the section).
fn nearest<'a>(
    word: &str,
    name_len: usize,
    candidates: impl Iterator<Item = &'a String>,
) -> Option<String> {
    let limit = (name_len / 3).max(2);
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

/// Optimal-string-alignment distance, so a swapped pair counts as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// A short rendering of a found value for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Table(_) => "a table".into(),
        Value::Array(_) if v.to_string().len() > 60 => "an array".into(),
        _ => v.to_string(),
    }
}

/// One line: the toml crate's message plus the line/column of its span.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML syntax error at line {line}, column {column}: {msg}")
        }
        None => format!("TOML syntax error: {msg}"),
    }
}

fn check_broker_address(addr: &str) -> Result<(), String> {
    let rest = addr
        .strip_prefix("tcp://")
        .or_else(|| addr.strip_prefix("mqtts://"))
        .ok_or_else(|| "unsupported scheme".to_string())?;
    host_port(rest).map(|_| ())
}

/// Split `host:port` (an IPv6 host in brackets, which are removed). The one parser for
/// every address: settings, the broker URL, `SYNC host:port`.
pub fn host_port(s: &str) -> Result<(&str, u16), String> {
    let (host, port) = s.rsplit_once(':').ok_or("missing `:port`")?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("empty host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p >= 1 => Ok((host, p)),
        _ => Err("port must be from 1 to 65535".into()),
    }
}

/// 0 = auto: the core count rounded down to a power of two. Always within
/// 1..=SHARDS_MAX and a power of two.
fn resolve_shards(shards: usize, cores: usize) -> usize {
    let want = if shards == 0 { cores } else { shards };
    let want = want.clamp(1, SHARDS_MAX);
    1 << want.ilog2()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "merkle-kv".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const SPEC_SAMPLE: &str = r#"node_id = "node-alpha"
description = "Primary MerkleKV node in us-east datacenter"
[network]
bind_address = "127.0.0.1"
bind_port = 7878
max_connections = 1000
[mqtt]
broker_address = "tcp://test.mosquitto.org:1883"
topic_prefix = "merkle-kv"
client_id = "merkle-node-alpha"
keep_alive = 60
clean_session = true
[anti_entropy]
enabled = true
interval_seconds = 300  # 5 minutes
peer_discovery_interval = 600  # 10 minutes
max_concurrent_syncs = 3
[storage]
memory_limit_mb = 1024  # 1GB memory limit
persistence_enabled = false
backup_interval_hours = 24
[logging]
level = "info"  # trace, debug, info, warn, error
format = "json"  # json, text
file_path = "/var/log/merkle-kv/node-alpha.log"
"#;

    fn env_of(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, true, &env_of(vars), 8)
    }

    fn problems(text: &str) -> Vec<String> {
        match parse_env(text, &[]) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => vec![e.to_string()],
        }
    }

    /// Flattens a TOML document to dotted leaf keys.
    fn leaves(table: &Table, prefix: &str, out: &mut BTreeMap<String, Value>) {
        for (k, v) in table {
            match v {
                Value::Table(t) => leaves(t, &join(prefix, k), out),
                _ => drop(out.insert(join(prefix, k), v.clone())),
            }
        }
    }

    fn toml_leaves(cfg: &Config) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        leaves(
            &cfg.to_toml().parse().expect("to_toml parses"),
            "",
            &mut out,
        );
        out
    }

    #[test]
    fn defaults_without_file() {
        let cfg = Config::load(None, &env_of(&[]), 8).unwrap();
        let mut want = Config::defaults(false);
        want.node_id = format!("{}-7878", hostname());
        want.mqtt.client_id = want.node_id.clone();
        want.storage.shards = 8;
        assert_eq!(cfg, want);
        assert!(cfg.mqtt.embedded_broker.enabled);
        assert_eq!(cfg.network.max_line_bytes, 1_048_576);
        assert!(!Config::defaults(true).mqtt.embedded_broker.enabled);
    }

    #[test]
    fn spec_sample_parses() {
        let cfg = parse_env(SPEC_SAMPLE, &[]).unwrap();
        assert_eq!(cfg.node_id, "node-alpha");
        assert_eq!(
            cfg.description.as_deref(),
            Some("Primary MerkleKV node in us-east datacenter")
        );
        assert_eq!(cfg.mqtt.broker_address, "tcp://test.mosquitto.org:1883");
        assert_eq!(cfg.mqtt.client_id, "merkle-node-alpha");
        assert_eq!(cfg.logging.format, LogFormat::Json);
        assert_eq!(
            cfg.logging.file_path.as_deref(),
            Some("/var/log/merkle-kv/node-alpha.log")
        );
        assert!(!cfg.mqtt.embedded_broker.enabled);
        assert_eq!(cfg.anti_entropy.interval_seconds, 300);
    }

    #[test]
    fn each_validation_rule_reports_one_message() {
        // Each line: a TOML line => the one message it must produce.
        let cases = r#"
node_id = " " => node_id: expected a non-empty string, found " "
node_id = 5 => node_id: expected a non-empty string, found 5
network.bind_port = 0 => network.bind_port: expected an integer from 1 to 65535, found 0
network.bind_port = "abc" => network.bind_port: expected an integer from 1 to 65535, found "abc"
network.bind_address = "localhost" => hostnames are not resolved
network.bind_address = "1.2.3" => network.bind_address: expected an IPv4 or IPv6 address
network.max_connections = 0 => network.max_connections: expected an integer from 1 to 1000000
network.max_connections = 1000001 => network.max_connections
network.connection_timeout = -1 => network.connection_timeout: expected an integer >= 0, found -1
network.max_line_bytes = 1023 => network.max_line_bytes: expected an integer from 1024 to 67108864
network.max_line_bytes = 67108865 => network.max_line_bytes
network = 5 => network: expected a table ([network]), found 5
mqtt.topic_prefix = "x" => `[mqtt] enabled = false`
mqtt.broker_address = "http://h:1883" => mqtt.broker_address: unsupported scheme
mqtt.broker_address = "tcp://:1883" => mqtt.broker_address: empty host
mqtt.broker_address = "mqtts://h:0" => mqtt.broker_address: port must be from 1 to 65535
mqtt.broker_address = "tcp://h" => mqtt.broker_address: missing `:port`
mqtt = { enabled = false, topic_prefix = "" } => mqtt.topic_prefix: must not be empty
mqtt = { enabled = false, topic_prefix = "a/#" } => MQTT wildcards
mqtt = { enabled = false, topic_prefix = "a/+/b" } => MQTT wildcards
mqtt = { enabled = false, keep_alive = 0 } => mqtt.keep_alive: expected an integer from 1 to 65535
mqtt = { enabled = false, keep_alive = 65536 } => mqtt.keep_alive
mqtt = { enabled = false, batch_max_events = 0 } => mqtt.batch_max_events: expected an integer from 1 to 65536
mqtt = { enabled = false, batch_max_events = 65537 } => mqtt.batch_max_events
mqtt = { enabled = "yes", broker_address = "tcp://h:1" } => mqtt.enabled: expected true or false, found "yes"
mqtt.embedded_broker = { enabled = true, listen = "nope" } => mqtt.embedded_broker.listen: expected an IP socket address
anti_entropy.interval_seconds = 21600 => anti_entropy.interval_seconds: must be below storage.tombstone_grace_seconds / 4 (21600), found 21600
anti_entropy.interval_seconds = 0 => anti_entropy.interval_seconds: expected an integer >= 1
anti_entropy.max_concurrent_syncs = 0 => anti_entropy.max_concurrent_syncs
anti_entropy.peer_list = ["h:1", "nohost"] => anti_entropy.peer_list[1]: missing `:port`
anti_entropy.peer_list = ["h:99999"] => anti_entropy.peer_list[0]: port must be from 1 to 65535
anti_entropy.peer_list = [1] => anti_entropy.peer_list: expected a list of strings, found [1]
storage.shards = 3 => storage.shards: expected 0 (auto) or a power of two
storage.shards = 512 => storage.shards: expected an integer from 0 to 256
storage.backup_interval_hours = 8761 => storage.backup_interval_hours: expected an integer from 0 to 8760
storage.backup_retain = 0 => storage.backup_retain: expected an integer from 1 to 10000
storage.backup_dir = " " => storage.backup_dir: must name a directory other than storage.data_dir
storage = { data_dir = "d", backup_dir = "d" } => storage.backup_dir: must name a directory other than storage.data_dir (d)
logging.level = "verbose" => logging.level: expected one of trace, debug, info, warn, error, found "verbose"
logging.format = "xml" => logging.format: expected one of text, json
"#;
        for (line, want) in cases.lines().filter_map(|l| l.split_once(" => ")) {
            let mut text = String::new();
            if !line.starts_with("node_id") {
                text.push_str("node_id = \"n\"\n");
            }
            if !line.starts_with("mqtt") {
                text.push_str("mqtt.enabled = false\n");
            }
            text.push_str(line);
            let got = problems(&text);
            assert_eq!(got.len(), 1, "{line}: {got:?}");
            assert!(
                got[0].contains(want),
                "{line}: got {:?}, want {want:?}",
                got[0]
            );
        }
        // The valid edges of the same ranges pass.
        let ok = "node_id = \"n\"\nmqtt = { broker_address = \"mqtts://[::1]:8883\", keep_alive = 65535 }\n\
                  network = { bind_address = \"::\", max_line_bytes = 1024 }\n\
                  storage = { shards = 256, backup_interval_hours = 8760, backup_retain = 10000 }\n\
                  logging.level = \"WARN\"\n";
        let cfg = parse_env(ok, &[]).unwrap();
        assert_eq!(
            (cfg.logging.level.as_str(), cfg.shard_count()),
            ("warn", 256)
        );
    }

    #[test]
    fn missing_node_id_with_file_is_an_error() {
        assert!(problems("")[0].starts_with("node_id: required"));
    }

    #[test]
    fn several_problems_reported_together() {
        let text = "node_id = \"n\"\n[network]\nbind_port = \"abc\"\nio_threads = 100\n\
                    [mqtt]\ntopic_prefix = \"#\"\n[logging]\nlevel = \"loud\"\nformat = 1\n";
        let p = problems(text);
        assert_eq!(p.len(), 6, "{p:?}"); // 5 above + broker_address required
        let shown = ConfigError::Invalid(p.clone()).to_string();
        assert_eq!(shown.lines().collect::<Vec<_>>(), p);
    }

    #[test]
    fn unknown_keys_and_sections_suggest_nearest() {
        let p = problems("node_id = \"n\"\nmqtt.enabled = false\n[network]\nbind_prot = 1\nbroker_address = \"x\"\n[netwrk]\n[zzz]\nqqqqqq = 1\n");
        let want = [
            "unknown key `network.bind_prot` (did you mean `network.bind_port`?)",
            "unknown key `network.broker_address` (did you mean `mqtt.broker_address`?)",
            "unknown section `netwrk` (did you mean `network`?)",
            "unknown section `zzz`",
        ];
        assert_eq!(p, want);
    }

    #[test]
    fn syntax_error_is_one_message_with_position() {
        let p = problems("node_id = \"n\"\n[network\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("TOML syntax error at line 2, column"),
            "{p:?}"
        );
    }

    #[test]
    fn removed_settings_are_refused_as_removed_not_unknown() {
        let why = "network.io_threads: removed in 0.1 \u{2014} connections are served on the \
                   shard threads (see ARCHITECTURE.md)";
        for value in ["0", "2", "\"two\""] {
            let text =
                format!("node_id = \"n\"\nmqtt.enabled = false\n[network]\nio_threads = {value}\n");
            assert_eq!(problems(&text), [why], "io_threads = {value}");
        }
        let env = env_of(&[("MERKLE_KV_NETWORK_IO_THREADS", "0")]);
        let Err(ConfigError::Invalid(p)) = Config::from_toml_str("", false, &env, 4) else {
            panic!("MERKLE_KV_NETWORK_IO_THREADS accepted")
        };
        assert_eq!(p, [format!("{why} (set by MERKLE_KV_NETWORK_IO_THREADS)")]);
    }

    #[test]
    fn env_overrides_each_kind() {
        let env = [
            ("MERKLE_KV_NODE_ID", "8080"), // a string field stays a string
            ("MERKLE_KV_DESCRIPTION", "from env"),
            ("MERKLE_KV_NETWORK_BIND_PORT", " 8080 "),
            ("MERKLE_KV_MQTT_BROKER_ADDRESS", "tcp://h:1883"),
            ("MERKLE_KV_MQTT_EMBEDDED_BROKER_ENABLED", "true"),
            ("MERKLE_KV_ANTI_ENTROPY_INTERVAL_SECONDS", "5"),
            (
                "MERKLE_KV_ANTI_ENTROPY_PEER_LIST",
                "127.0.0.1:7879, 127.0.0.1:7880",
            ),
            ("MERKLE_KV_LOGGING_LEVEL", "DEBUG"),
            ("MERKLE_KV_STORAGE_PERSISTENCE_ENABLED", "yes"),
            ("MERKLE_KV_STORAGE_BACKUP_DIR", "/srv/backups"),
            ("MERKLE_KV_STORAGE_BACKUP_RETAIN", "3"),
        ];
        let cfg = Config::load(None, &env_of(&env), 4).unwrap();
        assert_eq!(cfg.node_id, "8080");
        assert_eq!(cfg.mqtt.client_id, "8080");
        assert_eq!(cfg.description.as_deref(), Some("from env"));
        assert_eq!(cfg.network.bind_port, 8080);
        assert_eq!(cfg.mqtt.broker_address, "tcp://h:1883");
        assert!(cfg.mqtt.embedded_broker.enabled && cfg.storage.persistence_enabled);
        assert_eq!(cfg.anti_entropy.interval_seconds, 5);
        assert_eq!(
            cfg.anti_entropy.peer_list,
            ["127.0.0.1:7879", "127.0.0.1:7880"]
        );
        assert_eq!(cfg.logging.level, "debug");
        assert_eq!(
            (cfg.backup_dir(), cfg.storage.backup_retain),
            ("/srv/backups".into(), 3)
        );
        // Unset, backups go under the data directory.
        let cfg = Config::load(None, &env_of(&[("MERKLE_KV_NODE_ID", "n")]), 4).unwrap();
        assert_eq!(cfg.backup_dir(), std::path::Path::new("data/n/backups"));

        let list = [("MERKLE_KV_ANTI_ENTROPY_PEER_LIST", r#"["a:1", "b:2"]"#)];
        let cfg = Config::load(None, &env_of(&list), 4).unwrap();
        assert_eq!(cfg.anti_entropy.peer_list, ["a:1", "b:2"]);
        // No file and no MERKLE_KV_NODE_ID: the default follows the final port.
        let port = [("MERKLE_KV_NETWORK_BIND_PORT", "9000")];
        let cfg = Config::load(None, &env_of(&port), 4).unwrap();
        assert_eq!(cfg.node_id, format!("{}-9000", hostname()));
    }

    #[test]
    fn rules_broken_by_env_values_name_the_variable() {
        let env = env_of(&[("MERKLE_KV_STORAGE_SHARDS", "6")]);
        let Err(ConfigError::Invalid(problems)) = Config::from_toml_str("", false, &env, 4) else {
            panic!("shards = 6 accepted")
        };
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("storage.shards:"),
            "{}",
            problems[0]
        );
        assert!(
            problems[0].ends_with("(set by MERKLE_KV_STORAGE_SHARDS)"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn mistyped_env_variables_are_reported_like_mistyped_keys() {
        let env = [
            ("MERKLE_KV_NETWORK_BIND_PROT", "9999"),
            ("MERKLE_KV_NOTHING_LIKE_IT", "1"),
            ("MERKLEKV_OTHER_TOOL", "x"),
            ("PATH", "/bin"),
        ];
        let Err(ConfigError::Invalid(p)) = parse_env(SPEC_SAMPLE, &env) else {
            panic!("a mistyped variable was accepted")
        };
        assert_eq!(
            p,
            [
                "unknown environment variable `MERKLE_KV_NETWORK_BIND_PROT` \
                 (did you mean `MERKLE_KV_NETWORK_BIND_PORT`?)",
                "unknown environment variable `MERKLE_KV_NOTHING_LIKE_IT`",
            ]
        );
    }

    #[test]
    fn env_beats_file() {
        let env = [
            ("MERKLE_KV_NETWORK_BIND_PORT", "9999"),
            ("MERKLE_KV_LOGGING_FORMAT", "text"),
        ];
        let cfg = parse_env(SPEC_SAMPLE, &env).unwrap();
        assert_eq!(cfg.network.bind_port, 9999);
        assert_eq!(cfg.logging.format, LogFormat::Text);
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let env = [
            ("MERKLE_KV_NETWORK_BIND_PORT", "abc"),
            ("MERKLE_KV_MQTT_ENABLED", "maybe"),
            ("MERKLE_KV_ANTI_ENTROPY_PEER_LIST", "[1, 2]"),
        ];
        let Err(ConfigError::Invalid(p)) = parse_env(SPEC_SAMPLE, &env) else {
            panic!("expected errors")
        };
        assert_eq!(
            p,
            [
                "MERKLE_KV_NETWORK_BIND_PORT: expected an integer from 1 to 65535, found \"abc\"",
                "MERKLE_KV_MQTT_ENABLED: expected true or false, found \"maybe\"",
                "MERKLE_KV_ANTI_ENTROPY_PEER_LIST: expected a list of strings, found \"[1, 2]\"",
            ]
        );
    }

    #[test]
    fn shards_auto_resolution() {
        for (cores, want) in [(0, 1), (1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (1000, 256)] {
            let cfg = Config::load(None, &env_of(&[]), cores).unwrap();
            assert_eq!(
                (cfg.storage.shards, cfg.shard_count()),
                (want, want),
                "cores {cores}"
            );
        }
        let fixed = Config::load(None, &env_of(&[("MERKLE_KV_STORAGE_SHARDS", "16")]), 2).unwrap();
        assert_eq!(fixed.shard_count(), 16);
    }

    #[test]
    fn to_toml_round_trips() {
        let mut env = vec![
            ("MERKLE_KV_MQTT_USERNAME", "u"),
            ("MERKLE_KV_MQTT_PASSWORD", "p"),
        ];
        env.push(("MERKLE_KV_ANTI_ENTROPY_PEER_LIST", "a:1,b:2"));
        let original = parse_env(SPEC_SAMPLE, &env).unwrap();
        let again = parse_env(&original.to_toml(), &[]).unwrap();
        assert_eq!(again, original);
        let defaults = Config::load(None, &env_of(&[]), 3).unwrap();
        assert_eq!(parse_env(&defaults.to_toml(), &[]).unwrap(), defaults);
    }

    #[test]
    fn schema_and_to_toml_name_the_same_keys() {
        let from_toml: BTreeSet<String> =
            toml_leaves(&Config::defaults(true)).into_keys().collect();
        let from_schema: BTreeSet<String> = SCHEMA.iter().map(Field::key).collect();
        assert!(
            from_toml.is_subset(&from_schema),
            "{:?}",
            from_toml.difference(&from_schema)
        );
        for missing in from_schema.difference(&from_toml) {
            let f = SCHEMA.iter().find(|f| &f.key() == missing).unwrap();
            assert!(
                matches!(f.kind, Kind::OptStr),
                "{missing} absent from to_toml()"
            );
        }
        let unique: BTreeSet<String> = SCHEMA.iter().map(Field::env_var).collect();
        assert_eq!(unique.len(), SCHEMA.len(), "env var names collide");
    }

    #[test]
    fn each_schema_setter_writes_its_own_key() {
        for f in SCHEMA {
            let mut cfg = Config::defaults(true);
            let before = toml_leaves(&cfg).remove(&f.key());
            let val: Value = match (f.kind, &before) {
                (Kind::Bool, Some(Value::Boolean(b))) => (!b).into(),
                (Kind::Int { min, .. }, Some(Value::Integer(n))) if *n == min as i64 + 1 => {
                    (min as i64).into()
                }
                (Kind::Int { min, .. }, _) => (min as i64 + 1).into(),
                (Kind::List, _) => vec!["x:1"].into(),
                (Kind::Choice(opts), _) => opts
                    .iter()
                    .find(|o| before != Some(Value::from(**o)))
                    .unwrap()
                    .to_string()
                    .into(),
                _ => "changed".into(),
            };
            let want = val.clone();
            (f.set)(&mut cfg, val);
            assert_eq!(toml_leaves(&cfg).get(&f.key()), Some(&want), "{}", f.key());
        }
    }

    #[test]
    fn load_reads_file_and_reports_io_errors() {
        let dir = std::env::temp_dir().join(format!("merkle-kv-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(&path, SPEC_SAMPLE).unwrap();
        assert_eq!(
            Config::load(Some(&path), &env_of(&[]), 2).unwrap().node_id,
            "node-alpha"
        );
        let missing = dir.join("absent.toml");
        let err = Config::load(Some(&missing), &env_of(&[]), 2).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }) && err.to_string().contains("absent.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
