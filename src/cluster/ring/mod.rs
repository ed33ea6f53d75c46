//! Ring collectives over gRPC (docs/design.md §8): all-gather for embeddings, all-reduce (reduce-scatter +
//! all-gather, SUM) for gradients. Each rank keeps one long-lived stream to its right neighbour and
//! receives from its left neighbour through its own `Peer` server; blocks travel as raw
//! little-endian bytes in chunks, every chunk tagged with (step, op, phase, offset) and checked.
pub mod steps;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::collective::{CollectiveError, HostRing, Wire};
use crate::net::tls::{self, Tls};
use crate::pb::RingChunk;
use crate::pb::peer_client::PeerClient;

/// A [`Ring`] driven from blocking code: every call blocks on the ring's future, which must be
/// made from inside `tokio::task::block_in_place` on a multi-threaded runtime. A call gives up
/// as soon as `abort` carries a reason (the caller's membership ended), instead of waiting for
/// its timeout.
pub struct BlockingRing<'a> {
    ring: &'a Ring,
    abort: tokio::sync::watch::Receiver<Option<String>>,
}

impl<'a> BlockingRing<'a> {
    /// Wraps `ring`; a reason published on `abort` abandons the collective in flight.
    pub fn new(ring: &'a Ring, abort: tokio::sync::watch::Receiver<Option<String>>) -> Self {
        Self { ring, abort }
    }

    fn run<T>(
        &mut self,
        fut: impl Future<Output = Result<T, CollectiveError>>,
    ) -> Result<T, CollectiveError> {
        let abort = &mut self.abort;
        tokio::runtime::Handle::current().block_on(async move {
            tokio::select! {
                r = fut => r,
                why = abort.wait_for(Option::is_some) => Err(CollectiveError::Aborted(match why {
                    Ok(w) => w.clone().unwrap_or_default(),
                    Err(_) => "the abort signal went away".into(),
                })),
            }
        })
    }
}

impl HostRing for BlockingRing<'_> {
    fn rank(&self) -> usize {
        self.ring.rank
    }
    fn world(&self) -> usize {
        self.ring.world
    }
    fn all_gather(&mut self, step: u64, local: Vec<u8>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let ring = self.ring;
        self.run(ring.all_gather(step, local))
    }
    fn all_reduce_sum(
        &mut self,
        step: u64,
        buf: &mut [f32],
        wire: Wire,
    ) -> Result<(), CollectiveError> {
        let ring = self.ring;
        self.run(ring.all_reduce_sum(step, buf, wire))
    }
}

/// Collective operations, used in chunk tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Op {
    /// Not a collective: the stream from this sender broke.
    Broken = 0,
    AllGather = 1,
    ReduceScatter = 2,
    ReduceGather = 3,
}

/// The metadata key of a ring stream: `<generation>:<the sender's ring key>`.
pub const RING_HEADER: &str = "x-multipos-ring";

/// The keys of one rank in one generation, handed out by the coordinator: the one this rank
/// presents on its stream to the right, and the one its left neighbour presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingKeys {
    pub own: String,
    pub left: String,
}

/// Whose stream a rank's inbox takes now: the left neighbour of its current ring.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    generation: u64,
    from_rank: u32,
    key: String,
}

/// A rank's inbox: its Peer server (in `cluster/`) forwards every ring stream it accepts here, and
/// the engine reads the chunks from the matching [`Incoming`].
#[derive(Clone)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<RingChunk>,
    expected: tokio::sync::watch::Receiver<Option<Expected>>,
}

/// What a rank's inbox received, shared by the rings of successive generations; each ring says
/// whose stream the inbox may take.
#[derive(Clone)]
pub struct Incoming {
    rx: Arc<Mutex<mpsc::Receiver<RingChunk>>>,
    expected: Arc<tokio::sync::watch::Sender<Option<Expected>>>,
}

/// A new inbox and the receiver the engine reads.
pub(crate) fn inbox() -> (Inbox, Incoming) {
    let (tx, rx) = mpsc::channel(64);
    let (expected_tx, expected) = tokio::sync::watch::channel(None);
    (
        Inbox { tx, expected },
        Incoming {
            rx: Arc::new(Mutex::new(rx)),
            expected: Arc::new(expected_tx),
        },
    )
}

/// How long a stream that names a generation this rank has not reached yet may wait for it (the
/// rank may still be loading or healing).
const ADMIT_WAIT: Duration = Duration::from_secs(120);

impl Inbox {
    /// Hands every chunk of one incoming ring stream to the engine until the stream ends. The
    /// stream must present (`presented`, the [`RING_HEADER`] value) the key of this rank's left
    /// neighbour in its current generation, and every chunk must name that sender and generation:
    /// a token holder outside the ring cannot feed it. A sender that dies mid-stream is reported to
    /// the engine at once (a `Broken` chunk) rather than left for it to time out.
    pub(crate) async fn forward(
        &self,
        presented: Option<&str>,
        mut stream: Streaming<RingChunk>,
    ) -> Result<(), Status> {
        let (generation, key) = presented
            .and_then(|p| p.split_once(':'))
            .and_then(|(g, k)| Some((g.parse::<u64>().ok()?, k.to_string())))
            .ok_or_else(|| Status::unauthenticated(format!("a ring stream needs {RING_HEADER}")))?;
        let mut expected = self.expected.clone();
        let reached = tokio::time::timeout(
            ADMIT_WAIT,
            expected.wait_for(|e| e.as_ref().is_some_and(|e| e.generation >= generation)),
        )
        .await
        .map_err(|_| Status::unavailable(format!("no ring of generation {generation} here")))?
        .map_err(|_| Status::unavailable("this worker is shutting down"))?
        .clone()
        .expect("waited for Some");
        if reached.generation != generation
            || !crate::net::auth::same_bytes(reached.key.as_bytes(), key.as_bytes())
        {
            return Err(Status::permission_denied(
                "not the left neighbour of this ring",
            ));
        }
        let mut last: Option<(u32, u64)> = None;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if (chunk.from_rank, chunk.generation) != (reached.from_rank, generation) {
                        return Err(Status::permission_denied(format!(
                            "a chunk claims rank {} of generation {} on the stream of rank {} of generation {generation}",
                            chunk.from_rank, chunk.generation, reached.from_rank
                        )));
                    }
                    last = Some((chunk.from_rank, chunk.generation));
                    if self.tx.send(chunk).await.is_err() {
                        return Err(Status::unavailable("this worker is shutting down"));
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) => {
                    if let Some((from_rank, generation)) = last {
                        let _ = self
                            .tx
                            .send(RingChunk {
                                from_rank,
                                generation,
                                op: Op::Broken as u32,
                                ..Default::default()
                            })
                            .await;
                    }
                    return Err(status);
                }
            }
        }
    }
}

/// HTTP/2 flow-control windows for the data plane. The defaults (64 KiB per stream) cap a ring
/// stream at a window per round trip, an order of magnitude below loopback or NIC bandwidth.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// How often a client pings an open connection, and how long it waits for the answer (as long as
/// the default heartbeat timeout: a busy peer on a loaded machine is not a dead one).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A server builder tuned for ring traffic (large flow-control windows, no Nagle), with TLS that
/// asks every client for a certificate of the run's CA when `tls` is given.
pub fn peer_server_builder(tls: Option<&Tls>) -> Result<tonic::transport::Server, String> {
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true);
    match tls {
        Some(tls) => builder
            .tls_config(tls.peer_server())
            .map_err(|e| format!("TLS of the peer server: {e}")),
        None => Ok(builder),
    }
}

/// One rank's view of the ring of one membership generation.
pub struct Ring {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
    outgoing: mpsc::Sender<RingChunk>,
    incoming: Incoming,
    chunk_bytes: usize,
    timeout: Duration,
}

impl Ring {
    /// Connects to the right neighbour (retrying while it starts, up to `connect_timeout`) and
    /// opens the long-lived stream, presenting `keys.own`; `incoming` is the receiver of this
    /// rank's [`Inbox`], which from now on takes only the stream that presents `keys.left`. Chunks
    /// of earlier generations still in flight are dropped.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        rank: usize,
        peers: &[String],
        generation: u64,
        tls: Option<&Tls>,
        keys: &RingKeys,
        incoming: Incoming,
        chunk_bytes: usize,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        incoming.expected.send_replace(Some(Expected {
            generation,
            from_rank: steps::left(rank, world) as u32,
            key: keys.left.clone(),
        }));
        let (tx, rx) = mpsc::channel::<RingChunk>(8);
        if world > 1 {
            let right = steps::right(rank, world);
            let address = peers[right].clone();
            let channel = connect_with_retry(&address, connect_timeout, tls)
                .await
                .map_err(|reason| CollectiveError::Connect {
                    rank: right,
                    address: address.clone(),
                    reason,
                })?;
            let mut client = PeerClient::new(channel).max_encoding_message_size(chunk_bytes + 4096);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            let presented = format!("{generation}:{}", keys.own);
            request.metadata_mut().insert(
                RING_HEADER,
                presented.parse().map_err(|_| CollectiveError::Connect {
                    rank: right,
                    address: address.clone(),
                    reason: "the ring key is not valid metadata".into(),
                })?,
            );
            tokio::spawn(async move {
                if let Err(status) = client.ring(request).await {
                    tracing::debug!(%status, "ring stream to the right neighbour ended");
                }
            });
        }
        Ok(Self {
            rank,
            world,
            generation,
            outgoing: tx,
            incoming,
            chunk_bytes,
            timeout,
        })
    }

    /// Sends one block to the right neighbour, copying it chunk by chunk as the stream takes them
    /// (no whole-block staging copy, and sending starts at once).
    async fn send_block(
        &self,
        step: u64,
        op: Op,
        phase: u32,
        data: &[u8],
    ) -> Result<(), CollectiveError> {
        let right = steps::right(self.rank, self.world);
        let mut offset = 0usize;
        loop {
            let end = (offset + self.chunk_bytes).min(data.len());
            let chunk = RingChunk {
                from_rank: self.rank as u32,
                generation: self.generation,
                step,
                op: op as u32,
                phase,
                offset: offset as u64,
                total: data.len() as u64,
                data: Bytes::copy_from_slice(&data[offset..end]),
            };
            tokio::time::timeout(self.timeout, self.outgoing.send(chunk))
                .await
                .map_err(|_| CollectiveError::Timeout(self.timeout, right))?
                .map_err(|_| CollectiveError::Closed(right))?;
            offset = end;
            if offset >= data.len() {
                return Ok(());
            }
        }
    }

    /// Receives one block from the left neighbour, handing each chunk to `sink(offset, bytes)` as it
    /// arrives (no reassembly copy).
    async fn recv_block(
        &self,
        step: u64,
        (op, phase): (Op, u32),
        expected: usize,
        value_bytes: usize,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> Result<(), CollectiveError> {
        let left = steps::left(self.rank, self.world);
        let mut incoming = self.incoming.rx.lock().await;
        let mut received = 0usize;
        while received < expected {
            let chunk = tokio::time::timeout(self.timeout, incoming.recv())
                .await
                .map_err(|_| CollectiveError::Timeout(self.timeout, left))?
                .ok_or(CollectiveError::Closed(left))?;
            let bad = |reason: String| CollectiveError::Protocol { from: left, reason };
            if chunk.generation < self.generation {
                continue;
            }
            if chunk.op == Op::Broken as u32 {
                return Err(CollectiveError::Closed(left));
            }
            if chunk.generation > self.generation {
                return Err(bad(format!(
                    "chunk of generation {}, this ring is generation {}",
                    chunk.generation, self.generation
                )));
            }
            if chunk.from_rank as usize != left {
                return Err(bad(format!(
                    "chunk from rank {}, expected my left neighbour {left}",
                    chunk.from_rank
                )));
            }
            if (chunk.step, chunk.op, chunk.phase) != (step, op as u32, phase) {
                return Err(bad(format!(
                    "chunk for (step {}, op {}, phase {}), expected (step {step}, op {}, phase {phase})",
                    chunk.step, chunk.op, chunk.phase, op as u32
                )));
            }
            // Sums read whole values; an empty chunk would let a sender stall the receiver.
            let whole_values = chunk.data.len().is_multiple_of(value_bytes);
            if chunk.total as usize != expected
                || chunk.offset as usize != received
                || received + chunk.data.len() > expected
                || chunk.data.is_empty()
                || !whole_values
            {
                return Err(bad(format!(
                    "chunk at {}/{} bytes, expected offset {received} of {expected}",
                    chunk.offset, chunk.total
                )));
            }
            sink(received, &chunk.data);
            received += chunk.data.len();
        }
        Ok(())
    }

    /// Sends one block right while receiving one from the left (both at once, so the ring never
    /// waits on itself).
    async fn exchange(
        &self,
        step: u64,
        (op, phase): (Op, u32),
        send: &[u8],
        (recv_len, value_bytes): (usize, usize),
        sink: impl FnMut(usize, &[u8]),
    ) -> Result<(), CollectiveError> {
        // Either side failing fails the exchange at once (the other would only wait to time out).
        tokio::try_join!(
            self.send_block(step, op, phase, send),
            self.recv_block(step, (op, phase), recv_len, value_bytes, sink)
        )
        .map(|_| ())
    }

    /// Every rank's `local` block (all the same length), in rank order.
    pub async fn all_gather(
        &self,
        step: u64,
        local: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let len = local.len();
        let mut blocks: Vec<Option<Bytes>> = vec![None; self.world];
        blocks[self.rank] = Some(Bytes::from(local));
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = steps::gather_step(self.rank, self.world, s);
            let send = blocks[send_idx]
                .clone()
                .expect("ring order guarantees the block");
            let mut got = vec![0u8; len];
            self.exchange(
                step,
                (Op::AllGather, s as u32),
                &send,
                (len, 1),
                |at, bytes| got[at..at + bytes.len()].copy_from_slice(bytes),
            )
            .await?;
            blocks[recv_idx] = Some(Bytes::from(got));
        }
        Ok(blocks
            .into_iter()
            .map(|b| b.expect("all blocks gathered").to_vec())
            .collect())
    }

    /// Replaces `buf` on every rank by the element-wise sum over all ranks, values travelling as
    /// `wire` says. Every rank ends with bit-identical values (each segment is summed once, by its
    /// owner, rounded to the wire's precision, then copied).
    pub async fn all_reduce_sum(
        &self,
        step: u64,
        buf: &mut [f32],
        wire: Wire,
    ) -> Result<(), CollectiveError> {
        let segs = steps::segments(buf.len(), self.world);
        let vb = wire.value_bytes();
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = steps::reduce_scatter_step(self.rank, self.world, s);
            let (send, target) = disjoint(buf, segs[send_idx].clone(), segs[recv_idx].clone());
            let len = target.len() * vb;
            // Chunks are multiples of 4 bytes (chunk sizes are KiB), so each starts on a value.
            self.exchange(
                step,
                (Op::ReduceScatter, s as u32),
                &wire.encode(send),
                (len, vb),
                |at, bytes| {
                    for (x, y) in target[at / vb..].iter_mut().zip(bytes.chunks_exact(vb)) {
                        *x += wire.decode(y);
                    }
                },
            )
            .await?;
        }
        if self.world > 1 {
            wire.round(&mut buf[segs[steps::right(self.rank, self.world)].clone()]);
        }
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = steps::reduce_gather_step(self.rank, self.world, s);
            let (send, target) = disjoint(buf, segs[send_idx].clone(), segs[recv_idx].clone());
            let len = target.len() * vb;
            self.exchange(
                step,
                (Op::ReduceGather, s as u32),
                &wire.encode(send),
                (len, vb),
                |at, bytes| {
                    for (x, y) in target[at / vb..].iter_mut().zip(bytes.chunks_exact(vb)) {
                        *x = wire.decode(y);
                    }
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// Two non-overlapping segments of `buf`: one to read (send), one to write (receive into).
fn disjoint(buf: &mut [f32], read: Range<usize>, write: Range<usize>) -> (&[f32], &mut [f32]) {
    if read.start < write.start {
        let (a, b) = buf.split_at_mut(write.start);
        (&a[read], &mut b[..write.end - write.start])
    } else {
        let (a, b) = buf.split_at_mut(read.start);
        (&b[..read.end - read.start], &mut a[write])
    }
}

/// Dials `address` (over TLS when `tls` is given) until it answers or `timeout` passes
/// (exponential backoff from 50 ms to 1 s).
pub async fn connect_with_retry(
    address: &str,
    timeout: Duration,
    tls: Option<&Tls>,
) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(format!("{}://{address}", tls::scheme(tls)))
        .map_err(|e| format!("bad address {address:?}: {e}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .map_err(|e| format!("TLS for {address}: {e}"))?;
    }
    // A connection whose peer stops answering pings is dropped and dialled afresh: after a
    // partition heals, a fresh connection gets through at once, while the old one would wait out
    // TCP's retransmission backoff (seconds).
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::debug!(address, error = %e, "not reachable yet, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("{e} (gave up after {timeout:?})")),
        }
    }
}
