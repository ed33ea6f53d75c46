//! A worker's `Peer` server: it receives the ring streams of its left neighbour (handing them to
//! the collective's inbox) and serves its replica state to healing members. It answers members of
//! the worker's current generation only: a ring stream presents the sender's ring key, a state
//! fetch the generation key; the cluster token and worker credentials count for nothing here.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::state::StateSlot;
use crate::cluster::ring::{
    Inbox, Incoming, RING_HEADER, Ring, RingKeys, inbox, peer_server_builder,
};
use crate::net::auth::{GENERATION_HEADER, generation_pass, log_refusal, same_bytes};
use crate::net::tls::Tls;
use crate::pb::peer_server::{Peer, PeerServer};
use crate::pb::{FetchStateRequest, FileChunk, RingAck, RingChunk};

/// The service behind a worker's peer address.
pub struct PeerService {
    inbox: Inbox,
    state: StateSlot,
    pass: PassSlot,
}

/// The generation this worker is a member of, and that generation's key (from its `Join`).
pub(crate) type PassSlot = Arc<watch::Sender<Option<(u64, String)>>>;

/// An empty pass: a member of no generation yet.
pub fn pass_slot() -> PassSlot {
    Arc::new(watch::channel(None).0)
}

/// Refuses at once a call that presents no membership at all (neither a ring key nor a generation
/// key); the handlers check the key itself before they read or wait for anything.
fn presents_membership(req: Request<()>) -> Result<Request<()>, Status> {
    let m = req.metadata();
    if m.get(RING_HEADER).is_some() || m.get(GENERATION_HEADER).is_some() {
        return Ok(req);
    }
    log_refusal(
        "a peer call without membership",
        req.remote_addr().map(|a| a.ip()),
        "",
    );
    Err(Status::unauthenticated(format!(
        "a peer call presents {RING_HEADER} or {GENERATION_HEADER}"
    )))
}

/// Whether the caller presents this worker's generation and its key. A generation this worker has
/// not reached yet is retryable (it may still be joining); anything else is refused.
fn check_pass(
    presented: Option<(u64, String)>,
    asked: u64,
    current: Option<&(u64, String)>,
) -> Result<(), Status> {
    match (presented, current) {
        (Some((g, key)), Some((now, own))) if g == asked && g == *now => {
            if same_bytes(key.as_bytes(), own.as_bytes()) {
                Ok(())
            } else {
                Err(Status::permission_denied(format!(
                    "not a member of generation {g}"
                )))
            }
        }
        (Some((g, _)), current) if g == asked && current.is_none_or(|(now, _)| *now < g) => Err(
            Status::unavailable(format!("this worker has not joined generation {g} yet")),
        ),
        _ => Err(Status::permission_denied(format!(
            "not a member of this worker's generation (asked for {asked})"
        ))),
    }
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
        let from = request.remote_addr().map(|a| a.ip());
        let presented = generation_pass(&request, GENERATION_HEADER);
        let generation = request.get_ref().generation;
        let current = self.pass.borrow().clone();
        if let Err(status) = check_pass(presented, generation, current.as_ref()) {
            if status.code() == tonic::Code::PermissionDenied {
                log_refusal("a state fetch by a non-member", from, status.message());
            }
            return Err(status);
        }
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
            .get(RING_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.inbox
            .forward(presented.as_deref(), request.into_inner())
            .await?;
        Ok(Response::new(RingAck {}))
    }
}

/// The interceptor of the `Peer` server.
type PeerCheck = fn(Request<()>) -> Result<Request<()>, Status>;

/// Builds the `Peer` server (membership-checked, chunk size bounded) and the receiver the ring
/// reads; the server streams whatever state `state` holds to the healing members of the generation
/// `pass` names.
pub fn peer_service(
    chunk_bytes: usize,
    state: StateSlot,
    pass: PassSlot,
) -> (
    InterceptedService<PeerServer<PeerService>, PeerCheck>,
    Incoming,
) {
    let (inbox, incoming) = inbox();
    let server = PeerServer::new(PeerService { inbox, state, pass })
        .max_decoding_message_size(chunk_bytes + 4096);
    (
        InterceptedService::new(server, presents_membership as PeerCheck),
        incoming,
    )
}

/// W ranks of a ring inside this process, each with its own `Peer` server on a loopback port: for
/// tests and benchmarks of the collectives without worker processes. Rank r's server expects the
/// ring key `{keys.0}-{r-1}` and rank r-1 presents `{keys.1}-{r-1}` (equal prefixes: a working ring).
pub async fn loopback_rings(
    world: usize,
    keys: (&str, &str),
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
        let (svc, rx) = peer_service(chunk_bytes, super::state::slot(), pass_slot());
        incomings.push(rx);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            peer_server_builder(tls)
                .expect("TLS material loads")
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
    }
    let (expected, presented) = keys;
    let mut out = Vec::new();
    for (rank, rx) in incomings.into_iter().enumerate() {
        let left = crate::cluster::ring::steps::left(rank, world);
        let ring = Ring::connect(
            rank,
            &peers,
            0,
            tls,
            &RingKeys {
                own: format!("{presented}-{rank}"),
                left: format!("{expected}-{left}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_fetch_needs_this_generations_key() {
        let own = (7u64, "key-of-7".to_string());
        let pass = |g: u64, k: &str| Some((g, k.to_string()));
        assert!(check_pass(pass(7, "key-of-7"), 7, Some(&own)).is_ok());
        let code = |r: Result<(), Status>| r.unwrap_err().code();
        use tonic::Code::*;
        assert_eq!(
            code(check_pass(pass(7, "guessed"), 7, Some(&own))),
            PermissionDenied
        );
        assert_eq!(code(check_pass(None, 7, Some(&own))), PermissionDenied);
        assert_eq!(
            code(check_pass(pass(6, "key-of-7"), 6, Some(&own))),
            PermissionDenied,
            "an ended generation"
        );
        assert_eq!(
            code(check_pass(pass(7, "key-of-7"), 6, Some(&own))),
            PermissionDenied,
            "a pass for another generation than asked"
        );
        assert_eq!(
            code(check_pass(pass(8, "any"), 8, Some(&own))),
            Unavailable,
            "not joined yet: retry"
        );
        assert_eq!(code(check_pass(pass(1, "any"), 1, None)), Unavailable);
    }
}
