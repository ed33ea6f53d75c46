//! Ring collectives over gRPC (DESIGN §5): all-gather for embeddings, all-reduce (reduce-scatter +
//! all-gather, SUM) for gradients. Each rank keeps one long-lived stream to its right neighbour and
//! receives from its left neighbour through its own `Peer` server; blocks travel as raw
//! little-endian bytes in chunks, every chunk tagged with (step, op, phase, offset) and checked.
pub mod ring;

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::auth::{Check, Token};
use crate::pb::peer_client::PeerClient;
use crate::pb::peer_server::{Peer, PeerServer};
use crate::pb::{RingAck, RingChunk};
use tonic::service::interceptor::InterceptedService;

#[cfg(target_endian = "big")]
compile_error!("the wire format is little-endian f32; big-endian hosts are not supported");

/// Why a collective failed; the step is then aborted, never half-applied.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("timed out after {0:?} waiting for rank {1}")]
    Timeout(Duration, usize),
    #[error("the stream from rank {0} closed")]
    Closed(usize),
    #[error("protocol error from rank {from}: {reason}")]
    Protocol { from: usize, reason: String },
    #[error("cannot reach rank {rank} at {address}: {reason}")]
    Connect {
        rank: usize,
        address: String,
        reason: String,
    },
}

/// Collective operations, used in chunk tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    AllGather = 1,
    ReduceScatter = 2,
    ReduceGather = 3,
}

/// The receiving half: the `Peer` service hands incoming chunks to the engine.
pub struct PeerService {
    incoming: mpsc::Sender<RingChunk>,
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ring(
        &self,
        request: Request<Streaming<RingChunk>>,
    ) -> Result<Response<RingAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(chunk) = stream.message().await? {
            if self.incoming.send(chunk).await.is_err() {
                return Err(Status::unavailable("this worker is shutting down"));
            }
        }
        Ok(Response::new(RingAck {}))
    }
}

/// Builds the `Peer` server (token-checked, chunk size bounded) and the receiver the engine reads.
pub fn peer_service(
    token: &Token,
    chunk_bytes: usize,
) -> (
    InterceptedService<PeerServer<PeerService>, Check>,
    mpsc::Receiver<RingChunk>,
) {
    let (tx, rx) = mpsc::channel(64);
    let server =
        PeerServer::new(PeerService { incoming: tx }).max_decoding_message_size(chunk_bytes + 4096);
    (InterceptedService::new(server, token.check()), rx)
}

/// One rank's view of the ring.
pub struct Ring {
    pub rank: usize,
    pub world: usize,
    outgoing: mpsc::Sender<RingChunk>,
    incoming: Mutex<mpsc::Receiver<RingChunk>>,
    chunk_bytes: usize,
    timeout: Duration,
}

impl Ring {
    /// Connects to the right neighbour (retrying while it starts, up to `connect_timeout`) and
    /// opens the long-lived stream; `incoming` is the receiver from [`peer_service`].
    pub async fn connect(
        rank: usize,
        peers: &[String],
        token: &Token,
        incoming: mpsc::Receiver<RingChunk>,
        chunk_bytes: usize,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        let (tx, rx) = mpsc::channel::<RingChunk>(8);
        if world > 1 {
            let right = ring::right(rank, world);
            let address = peers[right].clone();
            let channel = connect_with_retry(&address, connect_timeout)
                .await
                .map_err(|reason| CollectiveError::Connect {
                    rank: right,
                    address: address.clone(),
                    reason,
                })?;
            let mut client = PeerClient::with_interceptor(channel, token.attach())
                .max_encoding_message_size(chunk_bytes + 4096);
            tokio::spawn(async move {
                if let Err(status) = client.ring(ReceiverStream::new(rx)).await {
                    tracing::debug!(%status, "ring stream to the right neighbour ended");
                }
            });
        }
        Ok(Self {
            rank,
            world,
            outgoing: tx,
            incoming: Mutex::new(incoming),
            chunk_bytes,
            timeout,
        })
    }

    async fn send_block(
        &self,
        step: u64,
        op: Op,
        phase: u32,
        data: Bytes,
    ) -> Result<(), CollectiveError> {
        let total = data.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + self.chunk_bytes).min(data.len());
            let chunk = RingChunk {
                from_rank: self.rank as u32,
                step,
                op: op as u32,
                phase,
                offset: offset as u64,
                total,
                data: data.slice(offset..end),
            };
            let right = ring::right(self.rank, self.world);
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

    async fn recv_block(
        &self,
        step: u64,
        op: Op,
        phase: u32,
        expected: usize,
    ) -> Result<Vec<u8>, CollectiveError> {
        let left = ring::left(self.rank, self.world);
        let mut incoming = self.incoming.lock().await;
        let mut out = Vec::with_capacity(expected);
        loop {
            let chunk = tokio::time::timeout(self.timeout, incoming.recv())
                .await
                .map_err(|_| CollectiveError::Timeout(self.timeout, left))?
                .ok_or(CollectiveError::Closed(left))?;
            let bad = |reason: String| CollectiveError::Protocol { from: left, reason };
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
            if chunk.total as usize != expected || chunk.offset as usize != out.len() {
                return Err(bad(format!(
                    "chunk at {}/{} bytes, expected offset {} of {expected}",
                    chunk.offset,
                    chunk.total,
                    out.len()
                )));
            }
            out.extend_from_slice(&chunk.data);
            if out.len() >= expected {
                return Ok(out);
            }
        }
    }

    /// Sends one block right while receiving one from the left (both at once, so the ring never
    /// waits on itself).
    async fn exchange(
        &self,
        step: u64,
        op: Op,
        phase: u32,
        send: Bytes,
        recv_len: usize,
    ) -> Result<Vec<u8>, CollectiveError> {
        let (sent, received) = tokio::join!(
            self.send_block(step, op, phase, send),
            self.recv_block(step, op, phase, recv_len)
        );
        sent?;
        received
    }

    /// Every rank's `local` block (all the same length), in rank order.
    pub async fn all_gather(
        &self,
        step: u64,
        local: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let len = local.len();
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; self.world];
        blocks[self.rank] = Some(local);
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = ring::gather_step(self.rank, self.world, s);
            let send = Bytes::from(
                blocks[send_idx]
                    .clone()
                    .expect("ring order guarantees the block"),
            );
            blocks[recv_idx] = Some(
                self.exchange(step, Op::AllGather, s as u32, send, len)
                    .await?,
            );
        }
        Ok(blocks
            .into_iter()
            .map(|b| b.expect("all blocks gathered"))
            .collect())
    }

    /// Replaces `buf` on every rank by the element-wise sum over all ranks. Every rank ends with
    /// bit-identical values (each segment is summed once, by its owner, then copied).
    pub async fn all_reduce_sum(&self, step: u64, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let segs = ring::segments(buf.len(), self.world);
        let bytes_of = |xs: &[f32]| Bytes::copy_from_slice(bytemuck::cast_slice(xs));
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = ring::reduce_scatter_step(self.rank, self.world, s);
            let send = bytes_of(&buf[segs[send_idx].clone()]);
            let got = self
                .exchange(
                    step,
                    Op::ReduceScatter,
                    s as u32,
                    send,
                    segs[recv_idx].len() * 4,
                )
                .await?;
            for (x, y) in buf[segs[recv_idx].clone()]
                .iter_mut()
                .zip(got.chunks_exact(4))
            {
                *x += f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
            }
        }
        for s in 0..self.world.saturating_sub(1) {
            let (send_idx, recv_idx) = ring::reduce_gather_step(self.rank, self.world, s);
            let send = bytes_of(&buf[segs[send_idx].clone()]);
            let got = self
                .exchange(
                    step,
                    Op::ReduceGather,
                    s as u32,
                    send,
                    segs[recv_idx].len() * 4,
                )
                .await?;
            buf[segs[recv_idx].clone()].copy_from_slice(bytemuck::cast_slice(&got));
        }
        Ok(())
    }
}

/// Dials `address` until it answers or `timeout` passes (exponential backoff from 50 ms to 1 s).
pub async fn connect_with_retry(address: &str, timeout: Duration) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
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
