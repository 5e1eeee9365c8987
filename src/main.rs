//! The `merkle-kv` binary: parse flags, load and validate the configuration, set up
//! logging, run the node (or `watch`, `broker`, `restore`).

#![deny(unsafe_code)]

use clap::Parser;
use merkle_kv::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// MerkleKV node: a sharded key-value server with a Memcached-like text protocol.
///
/// With no --config it runs on defaults (127.0.0.1:7878). Every setting can also be
/// overridden by environment variables: MERKLE_KV_NODE_ID, MERKLE_KV_<SECTION>_<FIELD>
/// (e.g. MERKLE_KV_NETWORK_BIND_PORT=7879).
#[derive(Parser, Debug)]
#[command(name = "merkle-kv", version)]
struct Args {
    /// TOML configuration file (see configs/ and docs/CONFIGURATION.md).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (file + environment + defaults) and exit.
    #[arg(long)]
    print_config: bool,
    /// Validate the configuration and exit (0 when valid).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Print the cluster's live stream of changes and presence records, decoded.
    /// Connects to the broker of the configuration (--config), like a node would.
    Watch,
    /// Run only the embedded MQTT broker (rumqttd), e.g. for a cluster's nodes to share.
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: std::net::SocketAddr,
    },
    /// Check a backup against its MANIFEST and install it as the configuration's
    /// data_dir, which must be empty or absent (docs/PERSISTENCE.md, "Backups and
    /// restore"). Then start the node as usual.
    Restore {
        /// The backup: a directory under backup_dir, named by its UTC time.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Lossy, so a MERKLE_KV_* variable that is not UTF-8 is reported, not skipped.
    let env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
        .collect();
    let config = match Config::load(args.config.as_deref(), &env, cores) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("merkle-kv: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        // The password stays out of terminals and logs that capture this output.
        let mut shown = config.clone();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("<redacted>".into());
        }
        print!("{}", shown.to_toml());
        return ExitCode::SUCCESS;
    }
    if args.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = merkle_kv::logging::init(&config.logging) {
        eprintln!("merkle-kv: {e}");
        return ExitCode::from(2);
    }
    let result = match args.command {
        None => merkle_kv::node::server::run(config).map_err(|e| e.to_string()),
        Some(Sub::Watch) => {
            merkle_kv::replication::watch::run(&config, merkle_kv::node::server::shutdown_signal())
                .map_err(|e| e.to_string())
        }
        Some(Sub::Broker { listen }) => run_broker(&config, listen),
        Some(Sub::Restore { from }) => return restore(&config, &from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("merkle-kv: {e}");
            ExitCode::from(1)
        }
    }
}

/// `merkle-kv restore --from DIR`: the backup installed as this node's data_dir, or why
/// not (nothing installed then).
fn restore(config: &Config, from: &std::path::Path) -> ExitCode {
    let want = merkle_kv::persist::files::Identity {
        node_id: config.node_id.clone(),
        shards: config.shard_count(),
    };
    let data_dir = config.data_dir();
    match merkle_kv::persist::backup::restore(from, &data_dir, &config.backup_dir(), &want) {
        Ok(r) => {
            println!(
                "restored {} (taken {}, node {:?}, {} shards): {} files, {} bytes, into {}",
                from.display(),
                r.created,
                r.identity.node_id,
                r.identity.shards,
                r.files,
                r.bytes,
                data_dir.display()
            );
            if !config.storage.persistence_enabled {
                eprintln!(
                    "merkle-kv: note: this configuration has [storage] persistence_enabled = \
                     false: the node will not read what was restored"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("merkle-kv restore: {e}");
            ExitCode::from(1)
        }
    }
}

/// `merkle-kv broker`: the embedded broker alone, until SIGINT or SIGTERM.
fn run_broker(config: &Config, listen: std::net::SocketAddr) -> Result<(), String> {
    let max = merkle_kv::replication::mqtt::payload_bytes_max(config.network.max_line_bytes);
    merkle_kv::replication::broker::start(listen, max).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(merkle_kv::node::server::shutdown_signal());
    Ok(())
}
