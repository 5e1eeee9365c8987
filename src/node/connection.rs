//! One client connection: the socket side of a [`Session`]. It reads, lets the session
//! plan, runs the ops on the shards, writes the replies, and does what the session leaves
//! to it: read a `SYNC.MSG` body within its time bound, serve it, run a `SYNC` or a
//! `BACKUP`, stop the node, close.
//!
//! Runs as a task on a shard thread: ops for that thread's shard execute inline, ops for
//! other shards go out as one message per shard per segment. All complete lines of one
//! read are answered with one write, in order.

use crate::node::dispatch::Gate;
use crate::node::inbox::{ShardRequest, ThreadMsg};
use crate::node::info::NodeInfo;
use crate::node::ops::ShardOp;
use crate::node::session::{Next, Session, Then};
use crate::node::shared::Shared;
use crate::protocol::native::Framer;
use crate::store::shard::Shard;
use bytes::{Buf, BytesMut};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Replies are written once this many bytes are pending, even mid-read.
const OUT_FLUSH_BYTES: usize = 256 * 1024;
/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// The answer to an exchange, served or asked for, while this node rejoins and holds
/// entries it cannot trust (node/bootstrap.rs `rejoin`).
const REJOINING: &[u8] = b"ERROR: LOADING this node is rejoining after a long absence and \
    takes part in no exchange until it has dropped the entries it cannot trust\r\n";

/// The shard the serving thread owns, and its index.
#[derive(Clone)]
pub struct LocalShard {
    pub index: usize,
    pub shard: Rc<RefCell<Shard>>,
}

/// Ops bound for one other shard in the current segment.
#[derive(Default)]
struct Outgoing {
    ops: Vec<ShardOp>,
    indices: Vec<u32>,
}

/// Decrements the connection count however the task ends.
struct Registered(Arc<Shared>);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

pub async fn serve(stream: std::net::TcpStream, shared: Arc<Shared>, local: LocalShard) {
    let _registered = Registered(shared.clone());
    let peer = stream.peer_addr().ok();
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(?peer, "cannot register connection: {e}"),
    };
    let mut conn = Connection {
        session: Session::new(shared.shard_bits),
        outgoing: (0..1 << shared.shard_bits)
            .map(|_| Outgoing::default())
            .collect(),
        out: Vec::new(),
        framer: Framer::new(shared.config.network.max_line_bytes),
        shared,
        local,
    };
    match conn.run(stream).await {
        Ok(()) => tracing::debug!(?peer, "connection closed"),
        Err(e) => tracing::debug!(?peer, "connection ended: {e}"),
    }
}

struct Connection {
    shared: Arc<Shared>,
    local: LocalShard,
    session: Session,
    outgoing: Vec<Outgoing>,
    out: Vec<u8>,
    framer: Framer,
}

impl Connection {
    async fn run(&mut self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut inbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        let mut shutdown = self.shared.shutdown.subscribe();
        let idle = self.shared.config.network.connection_timeout;
        loop {
            if inbuf.capacity() - inbuf.len() < READ_CHUNK_BYTES / 4 {
                inbuf.reserve(READ_CHUNK_BYTES);
            }
            // Nothing read is unanswered here, so stopping now loses no reply.
            let read = tokio::select! {
                biased;
                _ = shutdown.wait_for(|&stop| stop) => {
                    close_gracefully(&mut stream).await;
                    return Ok(());
                }
                r = read_with_timeout(&mut stream, &mut inbuf, idle) => r,
            };
            let n = match read {
                Some(r) => r?,
                None => {
                    // Say why, as Redis-era clients otherwise see only a reset or EOF and
                    // retry blindly. Bounded: a client that does not read gets no more time.
                    tracing::debug!("closing idle connection after {idle} s");
                    let _ = tokio::time::timeout(LINGER, stream.write_all(IDLE_TIMEOUT)).await;
                    close_gracefully(&mut stream).await;
                    return Ok(());
                }
            };
            let stop = self.process(&mut inbuf, &mut stream).await?;
            if n == 0 || stop {
                // Half-close or QUIT/SHUTDOWN: every reply is written; now close.
                close_gracefully(&mut stream).await;
                return Ok(());
            }
        }
    }

    /// Answer every complete line in `inbuf`. Returns true when the client asked to stop.
    async fn process(
        &mut self,
        inbuf: &mut BytesMut,
        stream: &mut TcpStream,
    ) -> std::io::Result<bool> {
        loop {
            let readiness = &self.shared.readiness;
            let gate = match (readiness.is_recovering(), readiness.is_loading()) {
                (true, _) => Gate::Recovering,
                (false, true) => Gate::Loading,
                (false, false) => Gate::Open,
            };
            match self
                .session
                .next(&mut self.framer, inbuf, gate, &mut self.out)
            {
                Next::Read(n) => {
                    inbuf.advance(n);
                    break;
                }
                Next::Answered(n) => inbuf.advance(n),
                Next::Segment(n) => {
                    let chunk = inbuf.split_to(n).freeze();
                    if self.segment(&chunk, stream).await? {
                        self.write_out(stream).await?;
                        return Ok(true);
                    }
                }
                Next::SyncMsg { line, len } => {
                    inbuf.advance(line);
                    self.sync_msg(len, inbuf, stream).await?;
                }
                Next::Sync { line, peer } => {
                    inbuf.advance(line);
                    let reply = run_sync(&self.shared, peer).await;
                    crate::node::ops::line(&mut self.out, &reply);
                }
                Next::Backup { line } => {
                    inbuf.advance(line);
                    let reply = crate::node::backup::reply(&self.shared).await;
                    crate::node::ops::line(&mut self.out, &reply);
                }
            }
            if self.out.len() >= OUT_FLUSH_BYTES {
                self.write_out(stream).await?;
            }
        }
        self.write_out(stream).await?;
        Ok(false)
    }

    /// Run and answer one segment, `chunk`, and the runs of a command that goes on
    /// past it. Returns true when the client asked to stop.
    async fn segment(
        &mut self,
        chunk: &bytes::Bytes,
        stream: &mut TcpStream,
    ) -> std::io::Result<bool> {
        loop {
            // Replication backpressure, per segment: a segment adds at most
            // SEGMENT_OPS_MAX changes (or one multi-key command's) past the check.
            if let Some(out) = &self.shared.outbound {
                out.admit().await;
            }
            self.execute(chunk).await?;
            let shared = &self.shared;
            let answer = self
                .session
                .answer(chunk, &|| NodeInfo::of(shared), &mut self.out);
            shared
                .protocol_errors
                .fetch_add(u64::from(answer.protocol_errors), Relaxed);
            match answer.then {
                Then::Again => {}
                Then::Done => return Ok(false),
                Then::Close { shutdown } => {
                    if shutdown {
                        tracing::info!("SHUTDOWN requested by a client");
                        let _ = self.shared.shutdown.send(true);
                    }
                    return Ok(true);
                }
            }
            if self.out.len() >= OUT_FLUSH_BYTES {
                self.write_out(stream).await?;
            }
        }
    }

    /// Read and serve an anti-entropy message of `len` bytes, whose body follows in
    /// `inbuf` (read more if needed), if the session admits it.
    async fn sync_msg(
        &mut self,
        len: usize,
        inbuf: &mut BytesMut,
        stream: &mut TcpStream,
    ) -> std::io::Result<()> {
        let shared = self.shared.clone();
        let admitted = crate::antientropy::client::admit_incoming(stream.peer_addr().ok());
        let _share = match self
            .session
            .admit_body(admitted, &shared.sync_bytes, &mut self.out)
        {
            Ok(share) => share,
            Err(refused) => {
                self.write_out(stream).await?;
                return Err(std::io::Error::other(refused));
            }
        };
        let idle = self.shared.config.network.connection_timeout;
        let started = tokio::time::Instant::now();
        while inbuf.len() < len {
            inbuf.reserve(len - inbuf.len());
            let wait = crate::antientropy::client::body_wait(inbuf.len(), started.elapsed(), idle);
            let read = match wait {
                Some(wait) => tokio::time::timeout(wait, stream.read_buf(inbuf))
                    .await
                    .ok(),
                None => None,
            };
            match read {
                None => return self.too_slow(stream, started.elapsed()).await,
                Some(Ok(0)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection ended inside a SYNC.MSG body",
                    ))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            }
        }
        let body = inbuf.split_to(len);
        // The shards are not there to answer until they are recovered from disk.
        shared.readiness.recovered().await;
        if self.shared.readiness.is_stale() {
            self.out.extend_from_slice(REJOINING);
            return Ok(());
        }
        let reply = match crate::antientropy::messages::parse(&body) {
            Ok(request) => Ok(self.serve_sync(request).await?),
            Err(e) => Err(e),
        };
        crate::antientropy::messages::write_reply(&mut self.out, reply);
        Ok(())
    }

    /// Cut a sender whose `SYNC.MSG` body trickles or stalls ([`crate::antientropy::client::body_wait`]):
    /// say why, close, and end the connection.
    async fn too_slow(&mut self, stream: &mut TcpStream, took: Duration) -> std::io::Result<()> {
        let rate_kib = crate::antientropy::client::BODY_BYTES_PER_S_MIN >> 10;
        tracing::warn!(peer = ?stream.peer_addr().ok(), s = took.as_secs(), "cutting a SYNC.MSG sender that is too slow");
        self.out.extend_from_slice(
            format!("ERROR: SYNC.MSG body arrived too slowly (under {rate_kib} KiB/s)\r\n")
                .as_bytes(),
        );
        self.write_out(stream).await?;
        close_gracefully(stream).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "SYNC.MSG body too slow",
        ))
    }

    /// Every shard answers its share of an anti-entropy request; join them. The other
    /// shards get the request first, so they work while this thread answers its own.
    async fn serve_sync(
        &mut self,
        request: crate::antientropy::messages::Request,
    ) -> std::io::Result<Vec<u8>> {
        let request = Arc::new(request);
        let shards = 1usize << self.shared.shard_bits;
        let own = self.local.index;
        let mut parts: Vec<Option<crate::antientropy::serve::Part>> =
            (0..shards).map(|_| None).collect();
        let mut waiting = Vec::new();
        for i in (0..shards).filter(|&i| i != own) {
            let (reply, rx) = oneshot::channel();
            let msg = ThreadMsg::Sync {
                request: request.clone(),
                reply,
            };
            self.shared.inboxes[i]
                .send(msg)
                .await
                .map_err(|_| stopping())?;
            waiting.push((i, rx));
        }
        parts[own] = Some(crate::antientropy::serve::answer_part(
            &mut self.local.shard.borrow_mut(),
            own,
            self.shared.shard_bits,
            &request,
            crate::store::version::now_us(),
        ));
        for (i, rx) in waiting {
            parts[i] = Some(rx.await.map_err(|_| stopping())?);
        }
        let parts: Vec<crate::antientropy::serve::Part> = parts
            .into_iter()
            .map(|p| p.expect("every shard answered"))
            .collect();
        Ok(crate::antientropy::serve::assemble(&request, parts))
    }

    /// Write the pending replies. A client that stops reading is dropped after the idle
    /// timeout rather than holding its slot (and our buffer) forever.
    async fn write_out(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let idle = self.shared.config.network.connection_timeout;
        let write = stream.write_all(&self.out);
        if idle == 0 {
            write.await?;
        } else {
            tokio::time::timeout(Duration::from_secs(idle), write)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client stopped reading replies",
                    )
                })??;
        }
        self.out.clear();
        Ok(())
    }

    /// Run the batch's ops: this thread's own inline, the rest as one request per shard.
    async fn execute(&mut self, data: &bytes::Bytes) -> std::io::Result<()> {
        let (ops, results) = self.session.work();
        results.reset(ops.len());
        let own = self.local.index;
        for (i, (s, op)) in ops.iter().enumerate() {
            if *s != own {
                let out = &mut self.outgoing[*s];
                out.ops.push(*op);
                out.indices.push(i as u32);
            }
        }
        // Other shards' ops leave first, so those threads work (and wake) while this one
        // runs its own shard's share: a hop's latency overlaps the local work instead of
        // adding to it. Large multi-key commands are runs of such segments.
        let mut waiting = Vec::new();
        for (s, out) in self.outgoing.iter_mut().enumerate() {
            if out.ops.is_empty() {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let request = ShardRequest {
                data: data.clone(),
                ops: std::mem::take(&mut out.ops),
                reply,
            };
            self.shared.inboxes[s]
                .send(ThreadMsg::Ops(request))
                .await
                .map_err(|_| stopping())?;
            waiting.push((s, rx));
        }
        let mut batches = Vec::new();
        {
            // Not held across the awaits below: this thread's other tasks use the shard.
            let mut shard = self.local.shard.borrow_mut();
            let (ops, results) = self.session.work();
            for (i, (s, op)) in ops.iter().enumerate() {
                if *s == own {
                    results.run_inline(i, &mut shard, op, data);
                }
            }
            let batch = crate::node::shared::ship_changes(&mut shard, own, &self.shared);
            batches.extend(batch.map(|b| (own, b)));
        }

        for (s, rx) in waiting {
            let reply = rx.await.map_err(|_| stopping())?;
            batches.extend(reply.batch.map(|b| (s, b)));
            let out = &mut self.outgoing[s];
            self.session.work().1.add_remote(&out.indices, reply);
            out.indices.clear();
        }
        self.wait_durable(&batches).await
    }

    /// Under `fsync = always`, hold the replies until every change they acknowledge is
    /// on disk. If the disk fails instead, close without replying: the client must not
    /// take a write for stored when it was not logged.
    async fn wait_durable(&self, batches: &[(usize, u64)]) -> std::io::Result<()> {
        let Some(disk) = self.shared.disk.get() else {
            return Ok(());
        };
        if disk.fsync != crate::config::Fsync::Always {
            return Ok(());
        }
        for &(shard, batch) in batches {
            if !disk.wait(shard, batch).await {
                return Err(std::io::Error::other(
                    "storage unavailable: the changes of this batch may not be on disk",
                ));
            }
        }
        Ok(())
    }
}

/// How long a closing connection keeps reading (and dropping) what the client still sends.
const LINGER: Duration = Duration::from_millis(500);

const IDLE_TIMEOUT: &[u8] = b"ERROR: Idle timeout\r\n";

/// Close without destroying replies in flight: send FIN, then read and drop whatever
/// the client is still sending, briefly. Closing a socket with unread input makes the
/// kernel send a reset, and a reset can discard replies the client has not read yet.
async fn close_gracefully(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut scratch = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

fn stopping() -> std::io::Error {
    std::io::Error::other("node is shutting down")
}

/// Read more bytes; `None` when the connection stayed idle for `idle_s` seconds (0 = never).
async fn read_with_timeout(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    idle_s: u64,
) -> Option<std::io::Result<usize>> {
    if idle_s == 0 {
        return Some(stream.read_buf(buf).await);
    }
    tokio::time::timeout(Duration::from_secs(idle_s), stream.read_buf(buf))
        .await
        .ok()
}

/// Run one exchange with `peer` on a thread of its own; the `SYNC` reply line.
pub async fn run_sync(shared: &Arc<Shared>, peer: String) -> String {
    if let Err(why) = crate::antientropy::client::admit_peer(&peer) {
        return format!("ERROR: {why}");
    }
    // The shards are not there to exchange until they are recovered from disk, and
    // whether they may be exchanged (stale) is decided then.
    shared.readiness.recovered().await;
    if shared.readiness.is_stale() {
        return String::from_utf8_lossy(REJOINING).trim_end().to_string();
    }
    let Some(slot) = shared.sync_log.start() else {
        return "ERROR: too many SYNC commands running; try again".into();
    };
    let shards = shared.inboxes.clone();
    let (tx, rx) = oneshot::channel();
    let target = peer.clone();
    let spawned = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            let _ = tx.send(crate::antientropy::client::run_exchange(shards, &target));
            drop(slot);
        });
    if let Err(e) = spawned {
        return format!("ERROR: cannot start the exchange: {e}");
    }
    let result = rx
        .await
        .unwrap_or_else(|_| {
            Err(crate::antientropy::messages::SyncError::Transport(
                "the exchange thread died".into(),
            ))
        })
        .map_err(|e| e.to_string());
    let line = match &result {
        Ok((report, took)) => crate::antientropy::log::report_line(report, *took),
        Err(e) => format!("ERROR: {e}"),
    };
    let ended = std::time::Instant::now();
    let started = crate::antientropy::log::Started::OneOff;
    shared.sync_log.record(&peer, result, started, ended);
    line
}
