//! A worker's `Peer` server: it receives the ring streams of its left neighbour (handing them to
//! the collective's inbox) and serves its replica state to healing members.
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::state::StateSlot;
use crate::auth::{Check, Token};
use crate::collective::{Inbox, Incoming, Ring, RingKeys, inbox, peer_server_builder};
use crate::pb::peer_server::{Peer, PeerServer};
use crate::pb::{FetchStateRequest, FileChunk, RingAck, RingChunk};
use crate::tls::Tls;

/// The service behind a worker's peer address.
pub struct PeerService {
    inbox: Inbox,
    state: StateSlot,
}

/// How long a healing member waits for its donor to publish its state.
const STATE_WAIT: Duration = Duration::from_secs(120);

#[tonic::async_trait]
impl Peer for PeerService {
    type FetchStateStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<FileChunk, Status>> + Send>>;

    async fn fetch_state(
        &self,
        request: Request<FetchStateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        let generation = request.into_inner().generation;
        let mut rx = self.state.subscribe();
        let snapshot = tokio::time::timeout(
            STATE_WAIT,
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.generation == generation)),
        )
        .await
        .map_err(|_| {
            Status::deadline_exceeded("this worker published no state for that generation")
        })?
        .map_err(|_| Status::unavailable("this worker is shutting down"))?
        .clone()
        .expect("waited for Some");
        let chunks = snapshot.chunks.clone();
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn ring(
        &self,
        request: Request<Streaming<RingChunk>>,
    ) -> Result<Response<RingAck>, Status> {
        let presented = request
            .metadata()
            .get(crate::collective::RING_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.inbox
            .forward(presented.as_deref(), request.into_inner())
            .await?;
        Ok(Response::new(RingAck {}))
    }
}

/// Builds the `Peer` server (token-checked, chunk size bounded) and the receiver the ring reads;
/// the server streams whatever state `state` holds to healing members.
pub fn peer_service(
    token: &Token,
    chunk_bytes: usize,
    state: StateSlot,
) -> (InterceptedService<PeerServer<PeerService>, Check>, Incoming) {
    let (inbox, incoming) = inbox();
    let server =
        PeerServer::new(PeerService { inbox, state }).max_decoding_message_size(chunk_bytes + 4096);
    (InterceptedService::new(server, token.check()), incoming)
}

/// W ranks of a ring inside this process, each with its own `Peer` server on a loopback port: for
/// tests and benchmarks of the collectives without worker processes.
pub async fn loopback_rings(
    world: usize,
    server_token: &Token,
    client_token: &Token,
    tls: Option<&Tls>,
    chunk_bytes: usize,
    timeout: Duration,
) -> Vec<std::sync::Arc<Ring>> {
    let mut incomings = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..world {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        peers.push(listener.local_addr().expect("bound address").to_string());
        let (svc, rx) = peer_service(server_token, chunk_bytes, super::state::slot());
        incomings.push(rx);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            peer_server_builder(tls)
                .expect("TLS material loads")
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
    }
    let keys: Vec<String> = (0..world).map(|r| format!("loopback-key-{r}")).collect();
    let mut out = Vec::new();
    for (rank, rx) in incomings.into_iter().enumerate() {
        let ring = Ring::connect(
            rank,
            &peers,
            0,
            client_token,
            tls,
            &RingKeys {
                own: keys[rank].clone(),
                left: keys[crate::collective::ring::left(rank, world)].clone(),
            },
            rx,
            chunk_bytes,
            timeout,
            timeout,
        )
        .await
        .expect("loopback ring connects");
        out.push(std::sync::Arc::new(ring));
    }
    out
}
