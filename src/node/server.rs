//! The node's threads: N shard threads (each pinned to a core, each the only owner of
//! its `Shard`, each serving connections) and the main thread that accepts connections,
//! watches for signals and runs the graceful shutdown.
//!
//! Each shard thread runs a single-threaded tokio runtime. Its inbox carries two kinds
//! of message: new connections (served as tasks on this thread, so ops for this shard
//! run inline) and op requests from connections on other threads.

use crate::config::Config;
use crate::node::connection::{self, LocalShard};
use crate::node::dispatch::serve_ops;
use crate::node::inbox::{RemoteChanges, ThreadMsg};
use crate::node::shared::{ship_changes, Readiness, Shared};
use crate::replication::inbound::apply_remote;
use crate::replication::peers::Peers;
use crate::replication::thread::Replication;
use crate::store::keyspace::shard_bits;
use crate::store::shard::{MemoryBudget, Shard};
use crate::store::version::{now_us, origin_of};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Messages queued per thread inbox before senders wait.
const INBOX_MESSAGES_MAX: usize = 4096;
/// Buckets the tombstone purge looks at per second and shard.
const PURGE_BUCKETS_PER_TICK: usize = 4096;
/// How long shutdown waits for connections to finish their in-flight replies.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Broker(#[from] crate::replication::broker::BrokerError),
    #[error(transparent)]
    Replication(#[from] crate::replication::mqtt::ReplError),
    #[error("cannot recover from disk: {0}")]
    Persist(String),
}

/// Run a node until SIGINT, SIGTERM or SHUTDOWN. Returns once its port is released.
pub fn run(config: Config) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    rt.block_on(run_main(config))
}

async fn run_main(config: Config) -> Result<(), ServerError> {
    let addr = format!(
        "{}:{}",
        config.network.bind_address, config.network.bind_port
    );
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;

    let shards = config.shard_count();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| mpsc::channel(INBOX_MESSAGES_MAX))
        .unzip();
    let peers = Arc::new(Peers::default());
    let replication = if config.mqtt.enabled {
        Some(start_replication(
            &config,
            local_addr,
            senders.clone(),
            peers.clone(),
        )?)
    } else {
        None
    };
    let outbound = replication.as_ref().map(|r| r.outbound.clone());
    let make = ShardMaker::new(&config, outbound.is_some());
    let persist = config.storage.persistence_enabled;
    // When the node persists these are placeholders until the recovered shards arrive.
    let stores: Vec<Shard> = (0..shards).map(|i| make.make(i)).collect();
    let shared = Arc::new(new_shared(config, local_addr, senders, outbound, peers));
    let (installs, installed): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| {
            let (tx, rx) = oneshot::channel();
            (tx, persist.then_some(rx))
        })
        .unzip();
    let threads = spawn_threads(&shared, receivers, stores, installed);
    let recovery = persist.then(|| tokio::spawn(recover(shared.clone(), make, installs)));
    tracing::info!(
        node_id = %shared.config.node_id,
        %local_addr,
        shards,
        "merkle-kv {} listening", crate::VERSION
    );
    start_background(&shared);
    accept_loop(&shared, listener).await;
    stop(&shared, replication, threads).await;
    if let Some(recovery) = recovery {
        let done = recovery
            .await
            .unwrap_or_else(|_| Err("recovery panicked".into()));
        done.map_err(ServerError::Persist)?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// What every thread of the node sees, before any of them runs.
fn new_shared(
    config: Config,
    local_addr: std::net::SocketAddr,
    inboxes: Vec<mpsc::Sender<ThreadMsg>>,
    outbound: Option<Arc<crate::replication::outbound::Outbound>>,
    peers: Arc<Peers>,
) -> Shared {
    Shared {
        shard_bits: shard_bits(config.shard_count()),
        local_addr,
        started: Instant::now(),
        inboxes,
        connections: AtomicUsize::new(0),
        connections_total: AtomicU64::new(0),
        connections_rejected: AtomicU64::new(0),
        protocol_errors: AtomicU64::new(0),
        outbound,
        peers,
        sync_log: Arc::default(),
        sync_bytes: AtomicUsize::new(0),
        shutdown: watch::Sender::new(false),
        disk: std::sync::OnceLock::new(),
        readiness: match (
            config.storage.persistence_enabled,
            crate::node::bootstrap::needed(&config),
        ) {
            (true, _) => Readiness::new(true, "recovering from disk", true),
            (false, true) => Readiness::new(true, "starting", false),
            (false, false) => Readiness::new(false, "not needed", false),
        },
        config,
    }
}

/// Start the embedded broker (when configured) and the replication thread, which gets
/// a core of its own when there is one to spare.
fn start_replication(
    config: &Config,
    local_addr: std::net::SocketAddr,
    shard_inboxes: Vec<mpsc::Sender<ThreadMsg>>,
    peers: Arc<Peers>,
) -> Result<Replication, ServerError> {
    let embedded = &config.mqtt.embedded_broker;
    if embedded.enabled {
        let listen = embedded.listen.parse().expect("validated by the config");
        let max = crate::replication::mqtt::payload_bytes_max(config.network.max_line_bytes);
        crate::replication::broker::start(listen, max)?;
    }
    let shards = shard_inboxes.len();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let core = (config.storage.pin_threads && cores.len() > shards).then(|| cores[shards]);
    let advertised = match &config.network.advertise_address {
        Some(a) => a.clone(),
        None => {
            if local_addr.ip().is_unspecified() {
                tracing::warn!(
                    %local_addr,
                    "bound to all interfaces: peers are told {local_addr}, which they \
                     cannot dial; set [network] advertise_address"
                );
            }
            local_addr.to_string()
        }
    };
    Ok(Replication::start(
        config,
        advertised,
        shard_inboxes,
        peers,
        core,
    )?)
}

/// The node's own tasks beside the connections: the bootstrap, periodic backups (when
/// persisting), and periodic anti-entropy when it is enabled.
fn start_background(shared: &Arc<Shared>) {
    tokio::spawn(crate::node::bootstrap::run(shared.clone()));
    tokio::spawn(crate::node::backup::run_periodic(shared.clone()));
    if shared.config.anti_entropy.enabled {
        let (peers, paused) = (shared.peers.clone(), shared.clone());
        tokio::spawn(crate::antientropy::periodic::run_periodic(
            crate::antientropy::periodic::Periodic {
                config: shared.config.clone(),
                me: crate::antientropy::client::self_address(shared.local_addr),
                shards: shared.inboxes.clone(),
                online: Box::new(move || peers.online_addrs()),
                // Recovering: the shards are not there yet, and whether the node must
                // rejoin (stale) is decided when they are.
                paused: Box::new(move || {
                    paused.readiness.is_recovering() || paused.readiness.is_stale()
                }),
                log: shared.sync_log.clone(),
                shutdown: shared.shutdown.subscribe(),
            },
        ));
    }
}

/// The graceful stop, once the listener is closed: let connections finish, get this
/// node's writes to the cluster, then stop the threads.
async fn stop(
    shared: &Arc<Shared>,
    replication: Option<Replication>,
    threads: Vec<std::thread::JoinHandle<()>>,
) {
    drop_connections(shared).await;
    // Shards still run: changes the broker has not confirmed can still be handed to a
    // peer by anti-entropy, which needs them.
    keep_writes_at_shutdown(shared, replication.as_ref()).await;
    if shared.disk.get().is_some() {
        // A snapshot of every shard, so the next start reads it instead of the log.
        let mut done = Vec::new();
        for inbox in &shared.inboxes {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if inbox.send(ThreadMsg::Snapshot { reply }).await.is_ok() {
                done.push(rx);
            }
        }
        for rx in done {
            let _ = rx.await;
        }
    }
    for inbox in &shared.inboxes {
        let _ = inbox.send(ThreadMsg::Stop).await;
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(disk) = shared.disk.get() {
        disk.stop();
    }
    if let Some(r) = replication {
        r.stop();
    }
}

/// What a new, empty shard of this node is made with.
#[derive(Clone)]
struct ShardMaker {
    bits: u32,
    budget: Arc<MemoryBudget>,
    line_bytes_max: usize,
    origin: u32,
    grace_seconds: u64,
    replicated: bool,
}

impl ShardMaker {
    fn new(config: &Config, replicated: bool) -> ShardMaker {
        let storage = &config.storage;
        ShardMaker {
            bits: shard_bits(config.shard_count()),
            budget: MemoryBudget::new(match storage.memory_limit_mb {
                0 => u64::MAX,
                mb => mb.saturating_mul(1 << 20),
            }),
            line_bytes_max: config.network.max_line_bytes,
            origin: origin_of(&config.node_id),
            grace_seconds: storage.tombstone_grace_seconds,
            replicated,
        }
    }

    fn make(&self, index: usize) -> Shard {
        let shard = Shard::new(index, self.bits, self.budget.clone(), self.line_bytes_max)
            .with_identity(self.origin, self.grace_seconds);
        if self.replicated {
            shard.with_journal()
        } else {
            shard
        }
    }
}

/// A recovered shard for its thread, and the thread's word that it holds it.
type Recovered = (Shard, oneshot::Sender<()>);
type Install = oneshot::Sender<Recovered>;

/// Recover every shard from disk (in parallel, off the runtime), then install each on
/// its thread, set the disk, and end the recovery. While it runs the node serves
/// connections as LOADING (docs/PERSISTENCE.md). A failure stops the node.
async fn recover(
    shared: Arc<Shared>,
    make: ShardMaker,
    installs: Vec<Install>,
) -> Result<(), String> {
    let started = Instant::now();
    let config = shared.config.clone();
    let shards = installs.len();
    let opened = tokio::task::spawn_blocking(move || {
        let rejoin_after_us = crate::node::bootstrap::rejoin_after_us(&config);
        crate::node::disk::open(&config, shards, rejoin_after_us, |i| make.make(i))
    })
    .await
    .unwrap_or_else(|_| Err("recovery panicked".into()));
    let (stores, disk) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            shared.shutdown.send_replace(true);
            return Err(e);
        }
    };
    let halted = disk.durable.unavailable.clone();
    // Set before any shard is installed: a shard's first change is shipped to it.
    let _ = shared.disk.set(Arc::new(disk));
    // Before anything is served from the recovered shards (node/bootstrap.rs).
    shared
        .readiness
        .set_stale(crate::node::bootstrap::must_rejoin(&shared));
    let mut installed = Vec::with_capacity(shards);
    for (install, shard) in installs.into_iter().zip(stores) {
        let (ack, done) = oneshot::channel();
        if install.send((shard.with_halt(halted.clone()), ack)).is_ok() {
            installed.push(done);
        }
    }
    for done in installed {
        let _ = done.await;
    }
    let ms = started.elapsed().as_millis();
    // A node with peers to learn from goes on LOADING through its bootstrap.
    let loading = crate::node::bootstrap::needed(&shared.config);
    let then = if loading { "; starting" } else { "" };
    let progress = format!("recovered from disk in {ms} ms{then}");
    shared.readiness.end_recovery(loading, progress);
    Ok(())
}

fn spawn_threads(
    shared: &Arc<Shared>,
    receivers: Vec<mpsc::Receiver<ThreadMsg>>,
    stores: Vec<Shard>,
    installed: Vec<Option<oneshot::Receiver<Recovered>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let shards = 1usize << shared.shard_bits;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let wanted = shared.config.storage.pin_threads;
    let pin = wanted && shards <= cores.len();
    if wanted && !pin {
        tracing::warn!(
            shards,
            cores = cores.len(),
            "more shards than cores (or core ids unavailable): shard threads run unpinned"
        );
    }
    receivers
        .into_iter()
        .zip(stores)
        .zip(installed)
        .enumerate()
        .map(|(i, ((inbox, shard), installed))| {
            let shared = shared.clone();
            let core = pin.then(|| cores[i]);
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            tracing::warn!(
                                thread = i,
                                "could not pin to core {}: running unpinned",
                                core.id
                            );
                        }
                    }
                    let local = LocalShard {
                        index: i,
                        shard: Rc::new(RefCell::new(shard)),
                    };
                    thread_main(shared, local, inbox, installed);
                })
                .expect("spawn thread")
        })
        .collect()
}

/// A shard thread: serve its inbox until `Stop`; when the node persists, first wait for
/// its recovered shard.
fn thread_main(
    shared: Arc<Shared>,
    local: LocalShard,
    mut inbox: mpsc::Receiver<ThreadMsg>,
    installed: Option<oneshot::Receiver<Recovered>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("thread runtime");
    let tasks = tokio::task::LocalSet::new();
    tasks.spawn_local(every_second(
        shared.clone(),
        local.index,
        local.shard.clone(),
    ));
    tasks.block_on(&rt, async move {
        if let Some(installed) = installed {
            if !wait_recovered(&shared, &local, &mut inbox, installed).await {
                return;
            }
        }
        while let Some(msg) = inbox.recv().await {
            if !handle(&shared, &local, msg) {
                break;
            }
        }
    });
}

/// Until the recovered shard arrives the thread holds a placeholder: it serves
/// connections (LOADING, node/dispatch.rs `Gate`) and the INFO and STATS fan-outs they
/// send, and holds every other message (remote changes, exchanges) to handle after.
/// Returns false when the thread is to stop instead.
async fn wait_recovered(
    shared: &Arc<Shared>,
    local: &LocalShard,
    inbox: &mut mpsc::Receiver<ThreadMsg>,
    mut installed: oneshot::Receiver<Recovered>,
) -> bool {
    let mut held = Vec::new();
    loop {
        tokio::select! {
            got = &mut installed => {
                // Dropped unsent: the recovery failed and the node is stopping.
                let Ok((shard, ack)) = got else { return false };
                *local.shard.borrow_mut() = shard;
                if let Some(disk) = shared.disk.get().cloned() {
                    let (index, shard) = (local.index, local.shard.clone());
                    tokio::task::spawn_local(async move { disk.ship_each_pass(index, &shard).await });
                }
                let _ = ack.send(());
                return held.into_iter().all(|msg| handle(shared, local, msg));
            }
            msg = inbox.recv(), if held.len() < INBOX_MESSAGES_MAX => match msg {
                Some(msg @ (ThreadMsg::Conn(_) | ThreadMsg::Ops(_))) => {
                    handle(shared, local, msg);
                }
                Some(ThreadMsg::Stop) | None => return false,
                Some(msg) => held.push(msg),
            },
        }
    }
}

/// Handle one inbox message; false on `Stop`.
fn handle(shared: &Arc<Shared>, local: &LocalShard, msg: ThreadMsg) -> bool {
    match msg {
        ThreadMsg::Conn(stream) => {
            tokio::task::spawn_local(connection::serve(stream, shared.clone(), local.clone()));
        }
        ThreadMsg::Ops(req) => {
            let mut shard = local.shard.borrow_mut();
            let mut reply = serve_ops(&mut shard, &req.ops, &req.data);
            reply.batch = ship_changes(&mut shard, local.index, shared);
            let _ = req.reply.send(reply); // the connection may have gone; fine
        }
        ThreadMsg::Sync { request, reply } => {
            let mut shard = local.shard.borrow_mut();
            let part = crate::antientropy::serve::answer_part(
                &mut shard,
                local.index,
                shared.shard_bits,
                &request,
                now_us(),
            );
            // An answer may store a peer's entries: they are logged like any change.
            ship_changes(&mut shard, local.index, shared);
            let _ = reply.send(part);
        }
        ThreadMsg::Apply(changes) => {
            let mut shard = local.shard.borrow_mut();
            apply_changes(shared, &mut shard, &changes);
            ship_changes(&mut shard, local.index, shared);
        }
        ThreadMsg::Forget { hlc, reply } => {
            let mut shard = local.shard.borrow_mut();
            let dropped = shard.forget_older_than(hlc);
            ship_changes(&mut shard, local.index, shared);
            // Handed over before the reply, so the rejoin can wait for it to be synced.
            if let Some(disk) = shared.disk.get() {
                disk.ship(local.index, &mut shard);
            }
            let _ = reply.send(dropped);
        }
        ThreadMsg::Snapshot { reply } => {
            let (shared, shard) = (shared.clone(), local.shard.clone());
            let index = local.index;
            tokio::task::spawn_local(async move {
                if let Some(disk) = shared.disk.get() {
                    disk.snapshot(index, 1 << shared.shard_bits, &shard).await;
                }
                let _ = reply.send(());
            });
        }
        ThreadMsg::Stop => {
            // What this pass recorded goes to the disk before the writer stops.
            if let Some(disk) = shared.disk.get() {
                disk.ship(local.index, &mut local.shard.borrow_mut());
            }
            return false;
        }
    }
    true
}

/// Apply changes made on another node to this thread's shard, and count them.
fn apply_changes(shared: &Shared, shard: &mut Shard, changes: &RemoteChanges) {
    let done = apply_remote(shard, changes, now_us());
    let Some(out) = &shared.outbound else { return };
    out.stats.applied_events.fetch_add(done.applied, Relaxed);
    if done.failed > 0 {
        let total = out.stats.apply_failed.fetch_add(done.failed, Relaxed);
        // Log the first failure and then every 1,000th, not each one.
        if total == 0 || total / 1000 != (total + done.failed) / 1000 {
            tracing::warn!(
                failed_total = total + done.failed,
                "remote changes dropped: memory limit reached \
                 (storage.memory_limit_mb); this replica now differs"
            );
        }
    }
}

/// The shard thread's log of remote versions refused for being in the future
/// ([`Shard::apply`]): one line per 10 s at most, as a writer with a wrong clock
/// repeats them with every write.
struct FutureLog {
    logged_total: u64,
    limit: crate::logging::LogLimit,
}

impl Default for FutureLog {
    fn default() -> FutureLog {
        FutureLog {
            logged_total: 0,
            limit: crate::logging::LogLimit::new(Duration::from_secs(10)),
        }
    }
}

impl FutureLog {
    fn check(&mut self, shard_index: usize, shard: &Shard) {
        let total = shard.stats.rejected_future;
        if total == self.logged_total || !self.limit.due() {
            return;
        }
        let refused = total - self.logged_total;
        self.logged_total = total;
        if let Some((v, ahead_us)) = shard.last_future {
            tracing::warn!(
                shard = shard_index,
                refused,
                origin = format_args!("{:08x}", v.origin),
                ahead_s = ahead_us / 1_000_000,
                "refused remote versions from the future (more than {} s ahead of this \
                 node's clock): the writer's clock is wrong, and its writes are not \
                 applied here (STATS repl_rejected_future)",
                crate::store::shard::CLOCK_SKEW_MAX_US / 1_000_000
            );
        }
    }
}

/// Walk the shard's buckets for expired tombstones, a slice at a time, so the purge
/// never holds the shard thread for long: a full pass over 2^16 buckets takes
/// `BUCKETS / PURGE_BUCKETS_PER_TICK` seconds.
///
/// Also looks, once a second, for remote versions the shard refused for being in the
/// future, whichever path brought them (replication, an exchange answered on this
/// thread or inline by a connection), and logs them ([`FutureLog`]).
///
/// And, when the node persists, takes a snapshot once the shard's log has grown past
/// `snapshot_log_mb` since the last one (docs/PERSISTENCE.md).
async fn every_second(shared: Arc<Shared>, index: usize, shard: Rc<RefCell<Shard>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut future_log = FutureLog::default();
    loop {
        tick.tick().await;
        if let Some(disk) = shared.disk.get().filter(|d| d.snapshot_due(index)) {
            disk.snapshot(index, 1 << shared.shard_bits, &shard).await;
        }
        let purged = shard
            .borrow_mut()
            .purge_tombstones(now_us(), PURGE_BUCKETS_PER_TICK);
        if purged > 0 {
            tracing::debug!(purged, "expired tombstones purged");
        }
        future_log.check(index, &shard.borrow());
    }
}

/// Accept until a signal or SHUTDOWN; hand connections round-robin to the shard threads.
async fn accept_loop(shared: &Arc<Shared>, listener: tokio::net::TcpListener) {
    let mut next = 0;
    // One line per second at most: a connection flood must not flood the log.
    let mut reject_log = crate::logging::LogLimit::new(Duration::from_secs(1));
    let mut shutdown = shared.shutdown.subscribe();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut signal => break,
            _ = shutdown.wait_for(|&s| s) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: say so, back off, go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let max = shared.config.network.max_connections;
        if shared.connections.load(Relaxed) >= max {
            let total = shared.connections_rejected.fetch_add(1, Relaxed) + 1;
            if reject_log.due() {
                tracing::warn!(%peer, max, total, "connection refused: too many connections");
            }
            reject(stream, max);
            continue;
        }
        shared.connections.fetch_add(1, Relaxed);
        shared.connections_total.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true); // replies must not wait for Nagle
        let target = next % shared.inboxes.len();
        next += 1;
        match stream.into_std() {
            Ok(std) => {
                if shared.inboxes[target]
                    .send(ThreadMsg::Conn(std))
                    .await
                    .is_err()
                {
                    shared.connections.fetch_sub(1, Relaxed);
                }
            }
            Err(e) => {
                shared.connections.fetch_sub(1, Relaxed);
                tracing::warn!(%peer, "cannot hand over connection: {e}");
            }
        }
    }
    let _ = shared.shutdown.send(true);
    drop(listener); // release the port before draining
}

/// Tell a client it is over the limit, without letting it hold up the accept loop.
fn reject(stream: tokio::net::TcpStream, max: usize) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut stream = stream;
        let msg = format!("ERROR: Too many connections (max {max})\r\n");
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(msg.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    });
}

/// At shutdown, with the shards still running: make sure the writes this node
/// acknowledged reach the cluster, within `[mqtt] shutdown_flush_ms`.
///
/// With MQTT: publish until the broker has confirmed every change (a broker that is
/// down is retried meanwhile). While the broker is unreachable, hand the changes to the
/// peers instead: one anti-entropy exchange with each peer it can reach (it carries
/// every difference, so those changes too). Without MQTT, anti-entropy is the only way
/// out: one exchange with each `peer_list` peer. Logs exactly what was left.
async fn keep_writes_at_shutdown(shared: &Arc<Shared>, repl: Option<&Replication>) {
    let budget = Duration::from_millis(shared.config.mqtt.shutdown_flush_ms);
    let deadline = Instant::now() + budget;
    let Some(r) = repl else {
        if shared.config.anti_entropy.peer_list.is_empty() {
            return;
        }
        let handed = hand_off(shared, deadline).await;
        match handed.as_slice() {
            [] => tracing::error!(
                "stopping without reaching any peer: writes since the last anti-entropy \
                 exchange exist only on this node and are lost unless it comes back with them"
            ),
            peers => tracing::info!(
                ?peers,
                "handed this node's writes to its peers by anti-entropy"
            ),
        }
        return;
    };
    r.flush();
    let mut handed = Vec::new();
    // Give a broker that is down a moment to come back before dialling peers.
    let dial_at = Instant::now() + Duration::from_millis(500).min(budget / 4);
    let left = loop {
        let left = r.unconfirmed();
        if left == 0 || Instant::now() >= deadline {
            break left;
        }
        if !r.connected() && Instant::now() >= dial_at {
            handed = hand_off(shared, deadline).await;
            break r.unconfirmed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // u64::MAX: the replication thread never got to count (a zero budget, say).
    let n = if left == u64::MAX {
        "an unknown number of".to_string()
    } else {
        left.to_string()
    };
    match (left, handed.as_slice()) {
        (0, _) => tracing::debug!("every change is confirmed by the broker"),
        (_, []) => tracing::error!(
            unconfirmed = %n,
            waited_ms = budget.as_millis() as u64,
            "stopping with {n} changes neither confirmed by the broker nor handed to a peer: \
             they exist only on this node and are lost unless it comes back with them"
        ),
        (_, peers) => tracing::warn!(
            unconfirmed = %n,
            ?peers,
            "the broker did not confirm {n} changes; anti-entropy exchanges handed them to \
             the peers listed (the other replicas get them from those by anti-entropy)"
        ),
    }
}

/// One exchange with every peer this node knows of, until `deadline`, against its
/// shards in-process (its client port is closed by now). Returns the peers that took it.
async fn hand_off(shared: &Arc<Shared>, deadline: Instant) -> Vec<String> {
    let mut handed = Vec::new();
    if shared.readiness.is_stale() || shared.readiness.is_recovering() {
        // Rejoining: its old entries must reach no peer; recovering: nothing to hand.
        return handed;
    }
    for peer in crate::node::bootstrap::every_known_peer(shared) {
        let (shards, target) = (shared.inboxes.clone(), peer.clone());
        let exchange = tokio::task::spawn_blocking(move || {
            crate::antientropy::client::run_exchange(shards, &target)
        });
        let at = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(at, exchange).await {
            Ok(Ok(Ok(_))) => handed.push(peer),
            Ok(Ok(Err(e))) => tracing::warn!(%peer, "could not hand changes to peer: {e}"),
            Ok(Err(e)) => tracing::warn!(%peer, "could not hand changes to peer: {e}"),
            Err(_) => break, // out of time
        }
    }
    handed
}

/// Wait (bounded) for connections to answer what they had read and close.
async fn drop_connections(shared: &Shared) {
    let deadline = Instant::now() + SHUTDOWN_DRAIN;
    while shared.connections.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = shared.connections.load(Relaxed);
    if left > 0 {
        tracing::warn!(left, "closing connections that did not finish in time");
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
