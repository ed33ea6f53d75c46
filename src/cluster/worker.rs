//! A worker: joins the coordinator, then per step runs the one step pipeline on its shard
//! ([`Trainer::forward_backward`] over the ring: embed, all-gather, global loss with its own slice
//! live, backward, gradient all-reduce with SUM; docs/design.md §5), reports the step, and applies
//! the same AdamW update as every other replica once the coordinator says every member reported it
//! (two-phase commit).
//!
//! When its ring breaks up (a peer dies, the coordinator ends the generation, or the coordinator
//! itself is gone), the worker drops the open step, keeps its replica, and joins again with
//! backoff for up to `cluster.rejoin_timeout_ms`; when it is behind, it heals from a live peer's
//! state (or from the checkpoint the run resumes from).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::c10d::{GlooGroup, Rendezvous};
use super::files::{MAX_FETCH_BYTES, model_fingerprint, receive_files};
use super::peer::{PassSlot, pass_slot, peer_service};
use super::ring::{BlockingRing, Incoming, Ring, RingKeys, connect_with_retry};
use super::state::StateSlot;
use crate::collective::Collective;
use crate::collective::tensor_to_le_bytes;
use crate::config::DataPlane;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::loss::{LossConfig, Targets};
use crate::model::SentenceModel;
use crate::net::auth::{Attach, GENERATION_HEADER, Secret};
use crate::net::tls::Tls;
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::peer_client::PeerClient;
use crate::pb::*;
use crate::train::build::trainer_for;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::exchange::OverHost;
use crate::train::load::configure_model;
use crate::train::task::TaskSpec;
use crate::train::{StepInput, StepStats, Trainer};

/// How a worker starts.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// host:port of the coordinator.
    pub coordinator: String,
    /// Requested rank, or any free one.
    pub rank: Option<usize>,
    /// The cluster token or this worker's own credential.
    pub secret: Secret,
    /// A local copy of the model; without it the worker fetches the coordinator's.
    pub model: Option<PathBuf>,
    pub device: Device,
    pub threads: usize,
    /// Interface the peer server binds.
    pub peer_host: String,
    /// The host other workers dial the peer server by (usually `peer_host`).
    pub peer_name: String,
    /// The network interface of Gloo's connections (`cluster.collective = "gloo"`); unset: the
    /// address of `peer_host` (of `peer_name` when `peer_host` is unspecified).
    pub gloo_interface: Option<String>,
    /// How long to keep trying to reach the coordinator before the first join.
    pub connect_timeout: Duration,
    /// TLS for the coordinator, the peer server and the ring.
    pub tls: Option<Tls>,
}

type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

/// Why a generation ended for this worker.
enum Interrupt {
    /// The ring broke up or the coordinator is unreachable: join again.
    Rejoin(String),
    /// The run cannot go on for this worker.
    Fatal(Error),
}

impl From<Error> for Interrupt {
    fn from(e: Error) -> Self {
        Interrupt::Fatal(e)
    }
}

/// Transport failures and deadlines mean "join again"; refusals end the worker.
fn rpc_err(what: &str) -> impl FnOnce(tonic::Status) -> Interrupt + '_ {
    move |s| {
        let text = format!("{what}: {} ({:?})", s.message(), s.code());
        use tonic::Code::*;
        match s.code() {
            // A rank still held by a member that has not been declared dead yet is free later.
            Unavailable | DeadlineExceeded | Cancelled | Unknown | Internal | ResourceExhausted => {
                Interrupt::Rejoin(text)
            }
            _ => Interrupt::Fatal(Error::Usage(text)),
        }
    }
}

/// A failed collective ends the generation (join again); any other failure of a step is fatal.
fn step_err(step: u64) -> impl FnOnce(Error) -> Interrupt {
    move |e| match e {
        Error::Collective(c) => Interrupt::Rejoin(format!("step {}: {c}", step + 1)),
        other => Interrupt::Fatal(other),
    }
}

fn with_deadline<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// This worker's model replica and what it has applied.
struct Replica {
    cfg: RunConfig,
    trainer: Trainer,
    /// Optimizer steps applied.
    applied: u64,
    tasks: Vec<TaskSpec>,
    data_fingerprint: String,
    /// The run's steps when this replica was built (its learning-rate schedule's length).
    total_steps: u64,
    /// Keeps a fetched model directory alive.
    _fetched: Option<tempfile::TempDir>,
}

/// The worker's fixed parts: identity, peer server, options.
struct Node {
    opts: WorkerOptions,
    worker_id: String,
    peer_address: String,
    incoming: Incoming,
    /// The state this worker serves to healing members, when it is their donor.
    state: StateSlot,
    /// The generation this worker is a member of, with its key, for the peer server's checks.
    pass: PassSlot,
    /// What this worker presents to the coordinator: its own credential, never the cluster token.
    credential: Secret,
    /// Fingerprint of the local model directory (empty when the model is fetched), hashed once.
    fingerprint: String,
}

/// Runs a worker until the run is done or stopped (Ok) or fails for good (Err).
pub async fn run(opts: WorkerOptions) -> Result<()> {
    let node = start(opts).await?;
    tokio::spawn(take_orders_from_the_coordinator()?);
    rejoin_until_done(&node).await
}

/// Starts the worker's `Peer` server (on an ephemeral port of `peer_host`) and learns who it is:
/// its name, credential and model fingerprint.
async fn start(opts: WorkerOptions) -> Result<Node> {
    let listener = TcpListener::bind((opts.peer_host.as_str(), 0))
        .await
        .map_err(|e| Error::Network(format!("cannot listen on {}: {e}", opts.peer_host)))?;
    let peer_address = format!(
        "{}:{}",
        opts.peer_name,
        listener
            .local_addr()
            .map_err(Error::io("read address of", "peer listener"))?
            .port()
    );
    let name = worker_name(&opts)?;
    let credential = opts.secret.worker_credential(&name).map_err(Error::Usage)?;
    let state = super::state::slot();
    let pass = pass_slot();
    let (peer_svc, incoming) = peer_service(16 << 20, state.clone(), pass.clone());
    tokio::spawn(
        crate::cluster::ring::peer_server_builder(opts.tls.as_ref())
            .map_err(Error::Usage)?
            .add_service(peer_svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let fingerprint = match &opts.model {
        Some(dir) => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || model_fingerprint(&dir))
                .await
                .map_err(|e| Error::Usage(format!("hashing the model: {e}")))??
        }
        None => String::new(),
    };
    Ok(Node {
        fingerprint,
        worker_id: format!("{name}:{}", std::process::id()),
        credential: Secret::Worker(credential),
        peer_address,
        incoming,
        state,
        pass,
        opts,
    })
}

/// Takes part in generation after generation until the run ends for this worker: joins again
/// after a ring breaks up (with backoff), and gives up once no ring worked for the rejoin window.
async fn rejoin_until_done(node: &Node) -> Result<()> {
    let mut replica: Option<Replica> = None;
    let mut reason = String::new();
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let applied_before = replica.as_ref().map(|r| r.applied);
        let outcome = generation(node, &mut replica, &reason).await;
        if replica.as_ref().map(|r| r.applied) != applied_before {
            // Steps were applied: the retry window and backoff start afresh.
            failing_since = None;
            backoff = Duration::from_millis(100);
        }
        match outcome {
            Ok(()) => return Ok(()),
            Err(Interrupt::Fatal(e)) => return Err(e),
            Err(Interrupt::Rejoin(why)) => {
                let window = replica.as_ref().map_or(node.opts.connect_timeout, |r| {
                    Duration::from_millis(r.cfg.cluster.rejoin_timeout_ms)
                });
                if failing_since.get_or_insert_with(Instant::now).elapsed() > window {
                    return Err(Error::Usage(format!(
                        "gave up after {window:?} without a working ring: {why}"
                    )));
                }
                if replica.is_some() {
                    tracing::warn!(reason = %why, "leaving the ring; joining again");
                } else {
                    let left = window
                        .saturating_sub(failing_since.map_or(Duration::ZERO, |t| t.elapsed()));
                    tracing::warn!(reason = %why, "not joined yet; retrying for {}s more", left.as_secs());
                }
                if let Some(r) = replica.as_mut() {
                    r.trainer.renew_gradients();
                }
                reason = why;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Schedulers (Slurm, Kubernetes) and terminals signal every process of a job at once. A worker
/// that died on the spot would take its replica with it before the coordinator, signalled too,
/// could checkpoint; so the first SIGINT/SIGTERM only logs (the coordinator's STOP ends the worker),
/// and a second one exits at once.
fn take_orders_from_the_coordinator() -> Result<impl Future<Output = ()> + Send + 'static> {
    let mut signals = super::signals::Signals::new()?;
    Ok(async move {
        signals.recv().await;
        tracing::warn!(
            "stop signal received: waiting for the coordinator to stop the run (a second signal exits now)"
        );
        signals.recv().await;
        tracing::error!("second stop signal: exiting without a checkpoint");
        std::process::exit(130);
    })
}

/// Connects this member's ring stream to its right neighbour, and takes its left one's.
async fn connect_ring(
    node: &Node,
    joined: &JoinResponse,
    cfg: &RunConfig,
) -> Result<Ring, Interrupt> {
    Ring::connect(
        joined.rank as usize,
        &joined.peers,
        joined.generation,
        node.opts.tls.as_ref(),
        &RingKeys {
            own: joined.ring_key.clone(),
            left: joined.left_key.clone(),
        },
        node.incoming.clone(),
        cfg.cluster.chunk_kib * 1024,
        Duration::from_millis(cfg.cluster.step_timeout_ms),
        Duration::from_millis(cfg.cluster.heartbeat_timeout_ms),
    )
    .await
    .map_err(|e| Interrupt::Rejoin(format!("ring: {e}")))
}

/// One generation: join, heal if behind, connect the ring, train until it ends.
async fn generation(
    node: &Node,
    replica: &mut Option<Replica>,
    reason: &str,
) -> Result<(), Interrupt> {
    let channel = connect_with_retry(
        &node.opts.coordinator,
        Duration::from_secs(2),
        node.opts.tls.as_ref(),
    )
    .await
    .map_err(|e| {
        Interrupt::Rejoin(format!(
            "cannot reach the coordinator at {}: {e}",
            node.opts.coordinator
        ))
    })?;
    let mut client: Client =
        CoordinatorClient::with_interceptor(channel.clone(), node.credential.attach())
            .max_decoding_message_size(256 << 20);
    let joined = join(node, replica.as_ref(), reason, &mut client).await?;
    // From now on every call proves this worker's membership with its ring key.
    let attach = node
        .credential
        .attach_member(joined.member, &joined.ring_key)
        .map_err(|e| Interrupt::Fatal(Error::Usage(e)))?;
    let mut client: Client =
        CoordinatorClient::with_interceptor(channel, attach).max_decoding_message_size(256 << 20);
    node.pass
        .send_replace(Some((joined.generation, joined.generation_key.clone())));
    let (rank, world) = (joined.rank, joined.world_size);
    tracing::info!(rank, world, generation = joined.generation, start_step = joined.start_step, heal = joined.heal, worker = %node.worker_id, "joined");

    // Heartbeats start at once: loading or healing must not look like silence.
    let (broken_tx, broken) = watch::channel(None::<String>);
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeats(
        client.clone(),
        joined.member,
        joined.generation,
        Duration::from_millis(joined.heartbeat_interval_ms),
        broken_tx,
    )));

    let replica = up_to_date(node, replica, &mut client, &joined, &broken).await?;
    // A donor publishes its state until the ring's first step commits (the healers have it then).
    node.state.send_replace(joined.serve_state.then(|| {
        Arc::new(super::state::snapshot(
            &replica.trainer,
            replica.applied,
            joined.generation,
        ))
    }));
    let step_timeout = Duration::from_millis(replica.cfg.cluster.step_timeout_ms);
    let me = Member {
        rank: rank as usize,
        world: world as usize,
        generation: joined.generation,
    };
    let plane = match replica.cfg.cluster.collective {
        DataPlane::Grpc => Plane::Grpc(connect_ring(node, &joined, &replica.cfg).await?),
        DataPlane::Gloo => Plane::Gloo(join_gloo(node, &joined, &replica.cfg, &broken).await?),
        DataPlane::Nccl => {
            return Err(Interrupt::Fatal(Error::Usage(
                "cluster.collective = \"nccl\" is not bound by this build".into(),
            )));
        }
    };
    let result = train_loop(
        &mut client,
        &me,
        &plane,
        replica,
        broken,
        step_timeout,
        &node.state,
    )
    .await;
    drop(heartbeat);
    result
}

/// Asks the coordinator to join (as the replica it holds, if any) and checks its answer.
async fn join(
    node: &Node,
    replica: Option<&Replica>,
    reason: &str,
    client: &mut Client,
) -> Result<JoinResponse, Interrupt> {
    let joined = client
        .join(with_deadline(
            JoinRequest {
                worker_id: node.worker_id.clone(),
                rank: node.opts.rank.map_or(-1, |r| r as i32),
                peer_address: node.peer_address.clone(),
                model_fingerprint: node.fingerprint.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                state_step: replica.map_or(0, |r| r.applied),
                run_fingerprint: replica
                    .map(|r| checkpoint::run_fingerprint(&r.cfg, &r.data_fingerprint))
                    .unwrap_or_default(),
                reason: reason.into(),
            },
            TRANSFER_DEADLINE,
        ))
        .await
        .map_err(rpc_err("join"))?
        .into_inner();
    check_join(&joined).map_err(Interrupt::Fatal)?;
    Ok(joined)
}

/// The replica brought to the generation's start: rebuilt when the run's data changed before
/// its first step, loaded when missing, healed when behind; refused when it still disagrees.
async fn up_to_date<'r>(
    node: &Node,
    replica: &'r mut Option<Replica>,
    client: &mut Client,
    joined: &JoinResponse,
    broken: &watch::Receiver<Option<String>>,
) -> Result<&'r mut Replica, Interrupt> {
    // The data changed before the first step (`train.mine` on the workers): build the replica
    // again for the run's real length and data.
    if replica.as_ref().is_some_and(|r| {
        r.applied == 0
            && (r.total_steps != joined.total_steps
                || r.data_fingerprint != joined.data_fingerprint)
    }) {
        *replica = None;
    }
    // Re-mined data planned anew (`train.remine_every_epochs`) can change the run's length: the
    // learning-rate schedule follows, as in one process.
    if let Some(r) = replica.as_mut()
        && r.total_steps != joined.total_steps
    {
        r.trainer.schedule.total = joined.total_steps;
        r.total_steps = joined.total_steps;
    }
    if replica.is_none() {
        *replica = Some(load_replica(node, client, joined).await?);
    }
    let replica = replica.as_mut().expect("loaded above");
    if joined.heal {
        // A donor that dies meanwhile ends the generation: stop waiting for it then.
        let mut waiting = broken.clone();
        if joined.heal_from.is_empty() {
            unless_broken(&mut waiting, heal(client, replica, joined.start_step)).await?;
        } else {
            unless_broken(&mut waiting, heal_from_peer(node, replica, joined)).await?;
        }
    }
    if replica.applied != joined.start_step {
        return Err(Interrupt::Fatal(Error::Protocol(format!(
            "the coordinator starts at step {} but this replica holds step {}",
            joined.start_step, replica.applied
        ))));
    }
    Ok(replica)
}

/// What a worker relies on in the coordinator's answer to `Join`, checked before any use.
fn check_join(j: &JoinResponse) -> Result<()> {
    let unusable = |what: String| {
        Error::Protocol(format!(
            "the coordinator's answer to join is unusable: {what}"
        ))
    };
    if j.world_size == 0 || j.rank >= j.world_size {
        return Err(unusable(format!(
            "rank {} in a ring of {}",
            j.rank, j.world_size
        )));
    }
    if j.peers.len() != j.world_size as usize {
        return Err(unusable(format!(
            "{} peer addresses for a ring of {}",
            j.peers.len(),
            j.world_size
        )));
    }
    if j.heartbeat_interval_ms == 0 {
        return Err(unusable("a heartbeat interval of 0 ms".into()));
    }
    if j.ring_key.is_empty() || j.left_key.is_empty() || j.generation_key.is_empty() {
        return Err(unusable("no ring keys".into()));
    }
    if j.start_step > j.total_steps {
        return Err(unusable(format!(
            "start step {} beyond the run's {} steps",
            j.start_step, j.total_steps
        )));
    }
    if j.heal && !j.heal_from.is_empty() && j.serve_state {
        return Err(unusable("told both to heal and to serve its state".into()));
    }
    Ok(())
}

/// Aborts a spawned task when dropped (on every way out of a generation).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the run's configuration, loads (or fetches) the model, builds the trainer.
async fn load_replica(
    node: &Node,
    client: &mut Client,
    joined: &JoinResponse,
) -> Result<Replica, Interrupt> {
    let cfg: RunConfig = toml::from_str(&joined.config_toml)
        .map_err(|e| Error::Protocol(format!("the coordinator sent an unreadable config: {e}")))?;
    // The same checks the coordinator made: a zero interval or chunk size would panic or spin here.
    cfg.validate()
        .map_err(|e| Error::Protocol(format!("the coordinator sent an invalid config: {e}")))?;
    let mut fetched = None;
    let model_dir = match &node.opts.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = scratch_dir()?;
            let target = dir.path().join("model");
            let stream = client
                .fetch_model(with_deadline(FetchModelRequest {}, TRANSFER_DEADLINE))
                .await
                .map_err(rpc_err("fetch model"))?
                .into_inner();
            receive_files(stream, &target, MAX_FETCH_BYTES).await?;
            if model_fingerprint(&target)? != joined.model_fingerprint {
                return Err(Interrupt::Fatal(Error::Protocol(
                    "the fetched model's fingerprint differs from the coordinator's".into(),
                )));
            }
            fetched = Some(dir);
            target
        }
    };
    crate::device::set_threads(node.opts.threads)?;
    let mut model = SentenceModel::load(&model_dir, node.opts.device)?;
    configure_model(&cfg, &mut model)?;
    let labels: Vec<(String, Vec<String>)> = joined
        .tasks
        .iter()
        .map(|t| (t.name.clone(), t.labels.clone()))
        .collect();
    let tasks = TaskSpec::from_config(&cfg.tasks(), &labels)?;
    let trainer = trainer_for(&cfg, model, &tasks, joined.total_steps)?;
    Ok(Replica {
        data_fingerprint: joined.data_fingerprint.clone(),
        total_steps: joined.total_steps,
        cfg,
        trainer,
        applied: 0,
        tasks,
        _fetched: fetched,
    })
}

/// Fetches the checkpoint of `step` (a live member's state, or the run's newest) and restores it.
async fn heal(client: &mut Client, replica: &mut Replica, step: u64) -> Result<(), Interrupt> {
    let started = Instant::now();
    let dir = scratch_dir()?;
    let target = dir.path().join("checkpoint");
    let stream = client
        .fetch_checkpoint(with_deadline(
            FetchCheckpointRequest { step },
            TRANSFER_DEADLINE,
        ))
        .await
        .map_err(rpc_err("fetch checkpoint"))?
        .into_inner();
    receive_files(stream, &target, MAX_FETCH_BYTES)
        .await
        .map_err(|e| Interrupt::Rejoin(format!("fetch checkpoint: {e}")))?;
    let state = checkpoint::verify(&target)?;
    checkpoint::restore(&target, &state, &mut replica.trainer)?;
    replica.applied = state.step;
    tracing::info!(
        step = state.step,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "healed from a checkpoint"
    );
    Ok(())
}

/// Fetches the donor's state straight from its Peer server and loads it.
async fn heal_from_peer(
    node: &Node,
    replica: &mut Replica,
    joined: &JoinResponse,
) -> Result<(), Interrupt> {
    let started = Instant::now();
    let timeout = Duration::from_millis(replica.cfg.cluster.heartbeat_timeout_ms);
    let channel = connect_with_retry(&joined.heal_from, timeout, node.opts.tls.as_ref())
        .await
        .map_err(|e| {
            Interrupt::Rejoin(format!("cannot reach the donor {}: {e}", joined.heal_from))
        })?;
    let pass = Attach::pass(GENERATION_HEADER, joined.generation, &joined.generation_key)
        .map_err(|e| Interrupt::Fatal(Error::Usage(e)))?;
    let mut peer = PeerClient::with_interceptor(channel, pass);
    // The donor joined the same generation at the same moment, but may learn it a little later:
    // "not joined yet" is retried while the donor can still be alive.
    let stream = loop {
        let fetched = peer
            .fetch_state(with_deadline(
                FetchStateRequest {
                    generation: joined.generation,
                },
                TRANSFER_DEADLINE,
            ))
            .await;
        match fetched {
            Err(s) if s.code() == tonic::Code::Unavailable && started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other.map_err(rpc_err("fetch state"))?.into_inner(),
        }
    };
    let step = super::state::restore(stream, &mut replica.trainer)
        .await
        .map_err(|e| Interrupt::Rejoin(e.to_string()))?;
    replica.applied = step;
    tracing::info!(
        step,
        donor = %joined.heal_from,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "healed from a live peer"
    );
    Ok(())
}

/// Heartbeats for one generation; publishes why the worker must leave its ring, if it must.
async fn heartbeats(
    mut client: Client,
    member: u64,
    generation: u64,
    every: Duration,
    broken: watch::Sender<Option<String>>,
) {
    let mut tick = tokio::time::interval(every);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        match client
            .heartbeat(with_deadline(HeartbeatRequest { member }, every * 4))
            .await
        {
            Ok(r) => {
                failures = 0;
                let r = r.into_inner();
                let why = if !r.keep_going {
                    Some(format!("the run is over: {}", r.reason))
                } else if r.rejoin || r.generation != generation {
                    Some(format!("generation {generation} ended"))
                } else {
                    None
                };
                if why.is_some() {
                    let _ = broken.send(why);
                    return;
                }
            }
            Err(status) => {
                failures += 1;
                tracing::warn!(%status, "heartbeat failed");
                if failures >= 8 {
                    let _ = broken.send(Some(format!("the coordinator is unreachable: {status}")));
                    return;
                }
            }
        }
    }
}

/// The step's input as the coordinator sent it, checked against this replica's tasks.
fn step_input<'a>(
    shard: &'a Shard,
    step: u64,
    tasks: &[TaskSpec],
    world: usize,
) -> Result<StepInput<'a>> {
    let bad = |what: String| {
        Error::Protocol(format!(
            "the coordinator sent a malformed step {}: {what}",
            step + 1
        ))
    };
    let task = tasks
        .get(shard.task as usize)
        .ok_or_else(|| bad(format!("task {} of {}", shard.task, tasks.len())))?;
    let n = shard.rows.len();
    let negatives = shard.rows.first().map_or(0, |r| r.negatives.len());
    if n == 0 || shard.rows.iter().any(|r| r.negatives.len() != negatives) {
        return Err(bad(
            "an empty shard or rows with unequal negative counts".into()
        ));
    }
    let global = n * world;
    let targets = match (&task.loss, &shard.targets) {
        (LossConfig::Mnrl(_), Some(shard::Targets::Groups(g))) => Targets::Groups(g.values.clone()),
        (
            LossConfig::CosineSimilarity(_) | LossConfig::Cosent(_),
            Some(shard::Targets::Scores(s)),
        ) => Targets::Scores(s.values.clone()),
        (LossConfig::Softmax(_), Some(shard::Targets::Labels(l))) => {
            Targets::Labels(l.values.clone())
        }
        _ => {
            return Err(bad(format!(
                "targets of another kind than task {:?} takes",
                task.name
            )));
        }
    };
    if targets.len() != global || shard.first_row as usize + n > global {
        return Err(bad(format!(
            "{} targets and first row {} for {n} rows x {world} ranks",
            targets.len(),
            shard.first_row
        )));
    }
    let mut columns = vec![
        shard.rows.iter().map(|r| r.query.as_str()).collect(),
        shard
            .rows
            .iter()
            .map(|r| r.positive.as_str())
            .collect::<Vec<_>>(),
    ];
    for j in 0..negatives {
        columns.push(shard.rows.iter().map(|r| r.negatives[j].as_str()).collect());
    }
    Ok(StepInput {
        task: shard.task as usize,
        columns,
        first_row: shard.first_row,
        targets,
    })
}

/// Who this worker is in its generation.
struct Member {
    rank: usize,
    world: usize,
    generation: u64,
}

/// What moves a generation's embeddings and gradients (`cluster.collective`).
enum Plane {
    Grpc(Ring),
    Gloo(GlooGroup),
}

impl Plane {
    /// The plane as a step's collective: a reason published on `broken` gives up the collective
    /// in flight.
    fn collective<'a>(
        &'a self,
        broken: &watch::Receiver<Option<String>>,
    ) -> Box<dyn Collective + 'a> {
        match self {
            Plane::Grpc(ring) => Box::new(OverHost(BlockingRing::new(ring, broken.clone()))),
            Plane::Gloo(group) => Box::new(group.collective(broken.clone())),
        }
    }
}

/// Joins this generation's Gloo group through the coordinator's store, on the host the worker
/// reached the coordinator by; gives up as soon as the generation ends.
async fn join_gloo(
    node: &Node,
    joined: &JoinResponse,
    cfg: &RunConfig,
    broken: &watch::Receiver<Option<String>>,
) -> Result<GlooGroup, Interrupt> {
    if joined.store_port == 0 || joined.store_prefix.is_empty() {
        return Err(Interrupt::Fatal(Error::Protocol(
            "the coordinator named no Gloo store for a Gloo run".into(),
        )));
    }
    let at = Rendezvous {
        store_host: host_of(&node.opts.coordinator).to_string(),
        store_port: joined.store_port as u16,
        prefix: joined.store_prefix.clone(),
        device_host: gloo_host(&node.opts).to_string(),
        interface: node.opts.gloo_interface.clone(),
    };
    let (rank, world) = (joined.rank as usize, joined.world_size as usize);
    let timeout = Duration::from_millis(cfg.cluster.step_timeout_ms);
    let joining = tokio::task::spawn_blocking(move || GlooGroup::join(&at, rank, world, timeout));
    let mut broken = broken.clone();
    unless_broken(&mut broken, async {
        joining
            .await
            .map_err(|e| Interrupt::Fatal(Error::Internal(format!("joining Gloo: {e}"))))?
            .map_err(|e| Interrupt::Rejoin(format!("gloo: {e}")))
    })
    .await
}

/// The host whose address Gloo's connections use: the one the peer server listens on, unless that
/// is every interface (0.0.0.0, ::), which is no address a peer can dial.
fn gloo_host(opts: &WorkerOptions) -> &str {
    match opts.peer_host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => &opts.peer_name,
        _ => &opts.peer_host,
    }
}

/// The host of a `host:port` address (an IPv6 host without its brackets).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Runs `fut` unless the ring breaks up first.
async fn unless_broken<T>(
    broken: &mut watch::Receiver<Option<String>>,
    fut: impl Future<Output = Result<T, Interrupt>>,
) -> Result<T, Interrupt> {
    tokio::select! {
        r = fut => r,
        why = broken.wait_for(Option::is_some) => Err(Interrupt::Rejoin(match why {
            Ok(w) => w.clone().unwrap_or_default(),
            Err(_) => "heartbeats stopped".into(),
        })),
    }
}

/// What the coordinator tells a member to do at a step, once the pages before it are embedded.
enum Told {
    Train(Shard),
    /// Every step ran.
    Done,
    /// A graceful stop.
    Stop,
}

/// Trains the ring's steps until the run is done (rank 0 then uploads the model) or stops.
async fn train_loop(
    client: &mut Client,
    me: &Member,
    plane: &Plane,
    replica: &mut Replica,
    broken: watch::Receiver<Option<String>>,
    step_timeout: Duration,
    node_state: &StateSlot,
) -> Result<(), Interrupt> {
    // Made after healing, which may have set the run's dropout generator.
    let preparer = replica.trainer.preparer();
    // The previous update's seconds, reported with the next commit (it runs after its own).
    let mut updated = 0.0;
    loop {
        let step = replica.applied;
        let shard = match told(client, replica, me, step, step_timeout).await? {
            Told::Train(shard) => shard,
            Told::Done => break,
            Told::Stop => return Ok(()),
        };
        let input = step_input(&shard, step, &replica.tasks, me.world)?;
        let trainer = &mut replica.trainer;
        let stats = tokio::task::block_in_place(|| {
            let prepared = preparer.prepare(&input, step)?;
            let mut stats = trainer.forward_backward(&prepared, &mut *plane.collective(&broken))?;
            stats.times.data = prepared.seconds;
            Ok::<_, Error>(stats)
        })
        .map_err(step_err(step))?;
        let decision = commit(client, me, step, &stats, updated, step_timeout).await?;
        if decision.skip {
            trainer.discard();
        } else if !decision.apply {
            return Err(Interrupt::Rejoin(decision.reason));
        } else {
            // Told to apply what this replica knows is not finite: the coordinator is wrong.
            if !(stats.loss.is_finite() && stats.grad_norm.is_finite()) {
                return Err(Interrupt::Fatal(Error::Protocol(format!(
                    "the coordinator said to apply step {} although its loss ({}) or gradient norm ({}) is not finite",
                    step + 1,
                    stats.loss,
                    stats.grad_norm
                ))));
            }
            updated = tokio::task::block_in_place(|| trainer.update(step, input.task))
                .map_err(step_err(step))?;
        }
        replica.applied = step + 1;
        node_state.send_replace(None);
    }
    if me.rank == 0 {
        upload_model(client, replica, me.world).await?;
    }
    Ok(())
}

/// Asks the coordinator for `step` until the answer is a shard, the end or a stop: pages due
/// before the step are embedded and reported on the way, and rank 0 uploads the checkpoint it is
/// asked for.
async fn told(
    client: &mut Client,
    replica: &Replica,
    me: &Member,
    step: u64,
    timeout: Duration,
) -> Result<Told, Interrupt> {
    use next_step_response::Answer;
    let (rank, generation) = (me.rank, me.generation);
    loop {
        let next = client
            .next_step(with_deadline(
                NextStepRequest {
                    rank: rank as u32,
                    step,
                    generation,
                },
                timeout,
            ))
            .await
            .map_err(rpc_err("next step"))?
            .into_inner();
        let protocol = |what: String| Interrupt::Fatal(Error::Protocol(what));
        if next.step != step {
            return Err(protocol(format!(
                "the coordinator answered for step {} when asked for step {}",
                next.step + 1,
                step + 1
            )));
        }
        let answer = next
            .answer
            .ok_or_else(|| protocol("the coordinator's answer to NextStep is empty".into()))?;
        match answer {
            Answer::Shard(shard) => {
                if shard.checkpoint {
                    upload_checkpoint(client, replica).await?;
                }
                return Ok(Told::Train(shard));
            }
            Answer::Page(page) => {
                report_eval(client, replica, &page, step, me, timeout).await?;
            }
            Answer::Done(f) => {
                if f.checkpoint {
                    upload_checkpoint(client, replica).await?;
                }
                return Ok(Told::Done);
            }
            Answer::Stop(f) => {
                if f.checkpoint {
                    upload_checkpoint(client, replica).await?;
                }
                tracing::info!(rank, step, "stopping as the coordinator asked");
                return Ok(Told::Stop);
            }
            Answer::Rejoin(reason) => return Err(Interrupt::Rejoin(reason)),
            Answer::Aborted(reason) => {
                return Err(Interrupt::Fatal(Error::Diverged(format!(
                    "the coordinator aborted the run: {reason}"
                ))));
            }
        }
    }
}

/// Reports the step's statistics to the coordinator (phase one of the commit) and waits for
/// its decision: apply, skip or discard.
async fn commit(
    client: &mut Client,
    me: &Member,
    step: u64,
    stats: &StepStats,
    updated: f64,
    timeout: Duration,
) -> Result<CommitResponse, Interrupt> {
    let t = &stats.times;
    let decision = client
        .commit(with_deadline(
            CommitRequest {
                rank: me.rank as u32,
                step,
                loss: stats.loss,
                grad_norm: stats.grad_norm,
                lr: stats.lr,
                tokens: stats.tokens as u64,
                compute_seconds: t.compute(),
                comm_seconds: t.comm(),
                generation: me.generation,
                gather_seconds: t.gather,
                reduce_seconds: t.reduce,
                data_seconds: t.data,
                forward_seconds: t.forward,
                backward_seconds: t.backward,
                optimizer_seconds: t.optimizer + updated,
                sync_seconds: t.sync,
            },
            timeout,
        ))
        .await
        .map_err(rpc_err("commit"))?
        .into_inner();
    Ok(decision)
}

/// Rank 0's last act: the trained model, saved and streamed to the coordinator.
async fn upload_model(
    client: &mut Client,
    replica: &Replica,
    world: usize,
) -> Result<(), Interrupt> {
    let dir = scratch_dir()?;
    let out = dir.path().join("model");
    replica.trainer.state.save(&out)?;
    let chunks = super::files::upload_stream(&out)?;
    client
        .upload_model(with_deadline(chunks, TRANSFER_DEADLINE))
        .await
        .map_err(rpc_err("upload model"))?;
    tracing::info!(world, "uploaded the trained model");
    Ok(())
}

/// Embeds a page of texts (validation or `train.mine`) with the replica's current weights and
/// sends it back.
async fn report_eval(
    client: &mut Client,
    replica: &Replica,
    page: &Page,
    step: u64,
    me: &Member,
    timeout: Duration,
) -> Result<(), Interrupt> {
    let n = page.texts.len();
    if n == 0 || n > super::coordinator::evaluation::MAX_PAGE {
        return Err(Interrupt::Fatal(Error::Protocol(format!(
            "the coordinator sent a validation page of {n} texts (1 to {} expected)",
            super::coordinator::evaluation::MAX_PAGE
        ))));
    }
    let batch_size = if page.mine {
        replica.cfg.train.mine.as_ref().map_or(32, |m| m.batch_size)
    } else {
        replica.cfg.eval.as_ref().map_or(64, |e| e.batch_size)
    };
    let texts: Vec<&str> = page.texts.iter().map(String::as_str).collect();
    let model = &replica.trainer.state.model;
    let embeddings =
        tokio::task::block_in_place(|| model.embed(&texts, batch_size)).map_err(step_err(step))?;
    client
        .report_eval(with_deadline(
            EvalReport {
                generation: me.generation,
                rank: me.rank as u32,
                step,
                offset: page.offset,
                count: n as u32,
                dim: embeddings.size()[1] as u32,
                embeddings: tensor_to_le_bytes(&embeddings).into(),
                mine: page.mine,
            },
            timeout,
        ))
        .await
        .map_err(rpc_err("report validation"))?;
    Ok(())
}

/// Writes the replica's state as a checkpoint and streams it to the coordinator.
async fn upload_checkpoint(client: &mut Client, replica: &Replica) -> Result<(), Interrupt> {
    let dir = scratch_dir()?;
    // The coordinator, which holds the plan, fills in the cursor.
    let state = CheckpointState::of(
        &replica.cfg,
        &replica.trainer,
        replica.applied,
        &replica.data_fingerprint,
        (0, 0),
    );
    let trainer = &replica.trainer;
    let path = tokio::task::block_in_place(|| {
        checkpoint::write(
            dir.path(),
            &state,
            &trainer.state,
            &trainer.optim,
            checkpoint::Keep {
                newest: 1,
                best: None,
            },
            &[],
        )
    })?;
    let chunks = super::files::upload_stream(&path)?;
    client
        .upload_checkpoint(with_deadline(chunks, TRANSFER_DEADLINE))
        .await
        .map_err(rpc_err("upload checkpoint"))?;
    Ok(())
}

/// Deadline of calls that move a whole model or checkpoint.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(600);

/// A private temporary directory, removed when dropped.
fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(Error::io(
        "create a temporary directory",
        std::env::temp_dir(),
    ))
}

/// The name this worker proves to the coordinator, which its id (`NAME:PID`) carries: its TLS
/// certificate's common name, else its credential's name, else (holding the cluster token) its
/// host name. A certificate and a credential that name different workers are refused here rather
/// than by the coordinator.
fn worker_name(opts: &WorkerOptions) -> Result<String> {
    let own = match &opts.secret {
        Secret::Worker(c) => Some(c.name().to_string()),
        Secret::Token(_) => None,
    };
    match (opts.tls.as_ref().map(|t| t.name().to_string()), own) {
        (Some(cert), Some(own)) if cert != own => Err(Error::Usage(format!(
            "the TLS certificate names worker {cert:?} but the credential {own:?}"
        ))),
        (Some(name), _) | (None, Some(name)) => Ok(name),
        (None, None) => Ok(crate::host::hostname()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-._".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gloo_meets_at_the_coordinators_host_and_connects_from_a_dialable_address() {
        assert_eq!(host_of("coordinator:29500"), "coordinator");
        assert_eq!(host_of("10.0.0.7:1"), "10.0.0.7");
        assert_eq!(host_of("[fe80::1]:29500"), "fe80::1");
        let opts = |peer_host: &str| WorkerOptions {
            coordinator: "c:1".into(),
            rank: None,
            secret: Secret::Token(crate::net::auth::Token::new("0123456789abcdef").unwrap()),
            model: None,
            device: Device::Cpu,
            threads: 1,
            peer_host: peer_host.into(),
            peer_name: "worker-3.multipos".into(),
            gloo_interface: None,
            connect_timeout: Duration::from_secs(1),
            tls: None,
        };
        assert_eq!(gloo_host(&opts("10.1.2.3")), "10.1.2.3");
        assert_eq!(gloo_host(&opts("0.0.0.0")), "worker-3.multipos");
        assert_eq!(gloo_host(&opts("::")), "worker-3.multipos");
    }

    #[test]
    fn an_unusable_join_answer_is_refused_before_use() {
        let good = JoinResponse {
            rank: 1,
            world_size: 2,
            peers: vec!["a:1".into(), "b:2".into()],
            heartbeat_interval_ms: 500,
            total_steps: 10,
            ring_key: "k1".into(),
            left_key: "k0".into(),
            generation_key: "g".into(),
            ..Default::default()
        };
        assert!(check_join(&good).is_ok());
        let bad = [
            JoinResponse {
                rank: 2,
                ..good.clone()
            },
            JoinResponse {
                world_size: 0,
                rank: 0,
                ..good.clone()
            },
            JoinResponse {
                peers: vec!["a:1".into()],
                ..good.clone()
            },
            JoinResponse {
                heartbeat_interval_ms: 0,
                ..good.clone()
            },
            JoinResponse {
                start_step: 11,
                ..good.clone()
            },
        ];
        for b in bad {
            assert!(check_join(&b).is_err(), "{b:?}");
        }
    }
}
