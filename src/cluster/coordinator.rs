//! The coordinator: membership in generations, heartbeats, the plan of global batches, the two-phase
//! commit of every step, checkpoints, and the final model. It never touches tensors during a step:
//! workers exchange those among themselves.
//!
//! One `State` behind a std mutex (never held across an await); every change bumps a `watch`
//! counter that blocked calls (join, next step, commit) wait on with their deadline.
//!
//! Fault model (DESIGN §6): a member that dies, stalls or leaves ends its generation. The open step
//! is applied by nobody (workers apply only after every member reported it), the live workers join
//! again, and the next generation re-runs the same global batch from the state every member holds:
//! the newest state a joining worker reports, or the newest checkpoint. Workers behind it heal from
//! a checkpoint a live member uploads first.
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Token;
use super::files::{file_chunks, model_fingerprint, receive_files};
use crate::config::RunConfig;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::pb::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::pb::next_step_response::Status as StepStatus;
use crate::pb::*;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::run::{
    MetricsLog, RunPlan, load_training_data, plan_spec, prepare_output, schedule_for,
};

/// A worker known to the coordinator: waiting to join a generation, or a member of one.
#[derive(Clone)]
struct Member {
    id: u64,
    worker_id: String,
    peer_address: String,
    last_seen: Instant,
    /// Rank it would like: its rank in the previous generation, else the one it asked for.
    preference: usize,
    /// Optimizer steps its replica has applied.
    state_step: u64,
}

/// How a generation starts: who is in it (by rank) and who must heal first.
struct Formation {
    generation: u64,
    start_step: u64,
    members: Vec<u64>,
    peers: Vec<String>,
    heal: Vec<bool>,
    donor: Option<usize>,
}

/// A graceful stop in progress.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Running,
    /// Asked to stop: finish the open step, checkpoint, and end.
    Requested,
    Done,
}

struct State {
    generation: u64,
    /// Members of the current generation, by rank (empty while a new one forms).
    ring: Vec<Member>,
    /// The previous generation's members, for rank preferences of re-joining workers.
    previous: Vec<Member>,
    /// Workers waiting in `Join` for the next generation.
    candidates: Vec<Member>,
    forming: bool,
    forming_since: Instant,
    formation: Option<Arc<Formation>>,
    ever_formed: bool,
    /// A worker waits to join a running ring that would grow: re-form at the next step boundary.
    grow: bool,
    next_member: u64,
    committed: u64,
    commits: Vec<Option<CommitRequest>>,
    /// The newest checkpoint on disk (the one healing workers fetch).
    latest: Option<(PathBuf, CheckpointState)>,
    aborted: Option<String>,
    model_saved: bool,
    stop: Stop,
    /// Ranks told to stop.
    stop_told: Vec<bool>,
    step_started: Option<Instant>,
    /// When the last generation ended, until the first step after it commits.
    broken_since: Option<Instant>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        steps: u64,
        model_dir: PathBuf,
    },
    /// Stopped as asked after `steps` steps, with the checkpoint to resume from.
    Stopped {
        steps: u64,
        checkpoint: Option<PathBuf>,
    },
    Aborted(String),
}

/// The coordinator service and everything it knows about the run.
pub struct Coordinator {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    cfg: RunConfig,
    config_toml: String,
    data: Dataset,
    plan: RunPlan,
    fingerprint: String,
    model_dir: PathBuf,
    data_fingerprint: String,
    /// Config and data fingerprints: the identity of the run a worker's state must belong to.
    run_fingerprint: String,
    log: Mutex<MetricsLog>,
    batches_log: Mutex<MetricsLog>,
    started: Instant,
    bar: ProgressBar,
}

type Shared = Arc<Coordinator>;

/// What a blocked `NextStep` learned.
enum Next {
    Ready(u64),
    Rejoin(String),
}

impl Coordinator {
    /// Loads data and model metadata and plans the run (no network yet).
    pub fn new(cfg: RunConfig, bar: ProgressBar) -> Result<Shared> {
        let out = &cfg.output.dir;
        let config_toml = prepare_output(&cfg)?;
        let resuming = cfg.train.resume.is_some();
        let open = |path: PathBuf| {
            if resuming {
                MetricsLog::append(&path)
            } else {
                MetricsLog::create(&path)
            }
        };
        let mut log = open(out.join("metrics.jsonl"))?;
        let data = load_training_data(&cfg, &mut log)?;
        let data_fingerprint = format!("{:016x}", data.fingerprint());
        let latest = match &cfg.train.resume {
            Some(which) => {
                let found = checkpoint::find(&out.join("checkpoints"), which)?;
                if let Some((path, state)) = &found {
                    checkpoint::check_compatible(path, state, &data_fingerprint, &cfg)?;
                    tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
                } else {
                    tracing::warn!(
                        "no checkpoint to resume from: continuing from what the workers hold, or the beginning"
                    );
                }
                found
            }
            None => None,
        };
        let plan = RunPlan::new(
            &data,
            plan_spec(&cfg),
            cfg.train.epochs,
            cfg.train.max_steps,
        )?;
        // Refuse an impossible schedule here, before any worker starts.
        schedule_for(&cfg, plan.total_steps)?;
        let model_dir = cfg
            .model
            .path
            .clone()
            .unwrap_or_else(crate::cli::default_model_dir);
        let fingerprint = model_fingerprint(&model_dir)?;
        let start_step = latest.as_ref().map_or(0, |(_, s)| s.step);
        if resuming {
            log.write(&json!({"event": "resume", "step": start_step}))?;
        }
        bar.set_length(plan.total_steps);
        bar.set_position(start_step);
        let state = State {
            generation: first_generation(),
            ring: Vec::new(),
            previous: Vec::new(),
            candidates: Vec::new(),
            forming: true,
            forming_since: Instant::now(),
            formation: None,
            ever_formed: false,
            grow: false,
            next_member: 1,
            committed: start_step,
            commits: Vec::new(),
            latest,
            aborted: None,
            model_saved: false,
            stop: Stop::Running,
            stop_told: Vec::new(),
            step_started: None,
            broken_since: None,
        };
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            config_toml,
            batches_log: Mutex::new(open(out.join("batches.jsonl"))?),
            log: Mutex::new(log),
            data,
            plan,
            fingerprint,
            model_dir,
            run_fingerprint: format!(
                "{}-{data_fingerprint}",
                checkpoint::config_fingerprint(&cfg)
            ),
            data_fingerprint,
            started: Instant::now(),
            bar,
            cfg,
        }))
    }

    /// Total steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.plan.total_steps
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_log(&self, record: serde_json::Value) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.write(&record) {
            tracing::error!(error = %e, "cannot write the metrics log");
        }
    }

    fn abort(&self, reason: String) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            tracing::error!(%reason, "aborting the run");
            st.aborted = Some(reason);
        }
        drop(st);
        self.notify();
    }

    /// Asks for a graceful stop: the open step finishes, rank 0 checkpoints, every worker exits.
    pub fn request_stop(&self) {
        let mut st = self.lock();
        if st.stop == Stop::Running {
            tracing::warn!(
                step = st.committed,
                "stopping: finishing the open step and writing a checkpoint"
            );
            st.stop = Stop::Requested;
            st.stop_told = vec![false; st.ring.len()];
            st.settle_stop();
        }
        drop(st);
        self.notify();
    }

    /// Ends the current generation: its open step is applied nowhere, and its live members join
    /// again.
    fn end_generation(&self, st: &mut State, reason: String) {
        if st.forming {
            return;
        }
        tracing::warn!(generation = st.generation, step = st.committed + 1, %reason, "the ring breaks up; it re-forms with the live workers");
        self.write_log(json!({"event": "generation_end", "generation": st.generation, "step": st.committed + 1, "reason": reason}));
        st.forming = true;
        st.forming_since = Instant::now();
        st.previous = std::mem::take(&mut st.ring);
        st.commits.clear();
        st.step_started = None;
        st.broken_since.get_or_insert_with(Instant::now);
        st.settle_stop();
    }

    /// The largest ring of at most `n` workers the run may use: no more than `cluster.workers`,
    /// no fewer than the minimum, and splitting the global batch evenly.
    fn ring_size(&self, n: usize) -> Option<usize> {
        let batch = self.cfg.train.batch_size;
        (self.cfg.cluster.min_workers()..=n.min(self.cfg.cluster.workers))
            .rev()
            .find(|k| *k > 0 && batch.is_multiple_of(*k))
    }

    /// Forms the next generation when enough workers wait: all of `cluster.workers` at once, or
    /// (after a failure, once `rejoin_grace_ms` passed) as many as the run can use.
    fn try_form(&self, st: &mut State) {
        if !st.forming || st.candidates.is_empty() || st.aborted.is_some() {
            return;
        }
        let n = st.candidates.len();
        let grace = Duration::from_millis(self.cfg.cluster.rejoin_grace_ms);
        let size = if n >= self.cfg.cluster.workers {
            Some(self.cfg.cluster.workers)
        } else if st.ever_formed && st.forming_since.elapsed() >= grace {
            self.ring_size(n)
        } else {
            None
        };
        let Some(size) = size else { return };
        let mut candidates = std::mem::take(&mut st.candidates);
        candidates.sort_by_key(|m| (m.preference, m.id));
        // Workers beyond a full ring are turned away; the others wait for a later generation.
        let rest = candidates.split_off(size);
        if size < self.cfg.cluster.workers {
            st.candidates = rest;
        }
        let mut ring = candidates;
        for m in &mut ring {
            // Heartbeats start once a member's Join returns; waiting to form is not silence.
            m.last_seen = Instant::now();
        }

        // Continue from the newest state anyone has: a member's replica or the newest checkpoint.
        let checkpoint_step = st.latest.as_ref().map_or(0, |(_, s)| s.step);
        let start = ring
            .iter()
            .map(|m| m.state_step)
            .max()
            .unwrap_or(0)
            .max(checkpoint_step);
        let heal: Vec<bool> = ring.iter().map(|m| m.state_step != start).collect();
        let donor = (heal.iter().any(|h| *h) && !st.latest_is(start))
            .then(|| ring.iter().position(|m| m.state_step == start))
            .flatten();
        if start != st.committed || !st.ever_formed {
            if start < st.committed {
                tracing::warn!(
                    from = st.committed,
                    to = start,
                    "no live worker holds the newest state: rolling back to the newest checkpoint"
                );
            }
            self.forget_steps_after(start);
        }
        st.committed = start;
        st.generation += 1;
        st.forming = false;
        st.grow = false;
        st.ever_formed = true;
        st.commits = vec![None; ring.len()];
        st.step_started = None;
        let healing = heal.iter().filter(|h| **h).count();
        tracing::info!(
            generation = st.generation,
            workers = ring.len(),
            start_step = start,
            healing,
            "ring formed"
        );
        self.write_log(json!({"event": "generation", "generation": st.generation, "workers": ring.len(), "start_step": start, "healing": healing}));
        st.formation = Some(Arc::new(Formation {
            generation: st.generation,
            start_step: start,
            members: ring.iter().map(|m| m.id).collect(),
            peers: ring.iter().map(|m| m.peer_address.clone()).collect(),
            heal,
            donor,
        }));
        st.ring = ring;
        self.bar.set_position(start);
    }

    /// Removes logged steps after `step`: they will run (again) in this generation, and the logs
    /// must show every global batch applied once.
    fn forget_steps_after(&self, step: u64) {
        let after = |v: &serde_json::Value| {
            v.get("step")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|s| s > step)
                && v.get("event").is_none_or(|e| e == "step")
        };
        for log in [&self.log, &self.batches_log] {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = log.remove(after) {
                tracing::error!(error = %e, "cannot rewrite a log");
            }
        }
    }

    /// Waits until `ready` yields a value, the run aborts, or `timeout` passes.
    async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> std::result::Result<T, Status> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let mut st = self.lock();
                if let Some(v) = ready(&mut st) {
                    return Ok(v);
                }
                if let Some(reason) = &st.aborted {
                    return Err(Status::aborted(reason.clone()));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("coordinator shutting down")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "timed out after {timeout:?} waiting for {what}"
                    )));
                }
            }
        }
    }

    /// Ends generations whose members stop sending heartbeats or whose step stalls; forms new
    /// ones; gives up when no ring can form within `join_timeout_ms`.
    async fn monitor(self: Shared) {
        let timeout = Duration::from_millis(self.cfg.cluster.heartbeat_timeout_ms);
        let step_timeout = Duration::from_millis(self.cfg.cluster.step_timeout_ms);
        let join_timeout = Duration::from_millis(self.cfg.cluster.join_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.cfg.cluster.heartbeat_interval_ms.min(250),
        ));
        loop {
            tick.tick().await;
            let mut st = self.lock();
            if st.aborted.is_some() || st.model_saved || st.stop == Stop::Done {
                return;
            }
            if st.forming {
                self.try_form(&mut st);
                if st.forming && st.forming_since.elapsed() > join_timeout {
                    let reason = format!(
                        "no ring of at least {} workers formed within cluster.join_timeout_ms ({} joined)",
                        self.cfg.cluster.min_workers(),
                        st.candidates.len()
                    );
                    drop(st);
                    self.abort(reason);
                    return;
                }
                drop(st);
                self.notify();
                continue;
            }
            let now = Instant::now();
            let dead = st.ring.iter().enumerate().find_map(|(rank, m)| {
                let silent = now.duration_since(m.last_seen);
                (silent > timeout).then(|| {
                    format!(
                        "worker {rank} ({}) sent no heartbeat for {:.1} s: it died or stalled",
                        m.worker_id,
                        silent.as_secs_f64()
                    )
                })
            });
            let verdict = dead.or_else(|| {
                st.step_started
                    .filter(|t| now.duration_since(*t) > step_timeout)
                    .map(|t| {
                        format!(
                            "step {} has run for {:.0} s, over cluster.step_timeout_ms",
                            st.committed + 1,
                            now.duration_since(t).as_secs_f64()
                        )
                    })
            });
            if let Some(reason) = verdict {
                self.end_generation(&mut st, reason);
                drop(st);
                self.notify();
            }
        }
    }

    /// Serves on `listener` until the run finishes (model saved), stops or aborts; `shutdown`
    /// firing asks for a graceful stop.
    pub async fn serve(
        self: Shared,
        listener: TcpListener,
        token: Token,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Outcome> {
        let server = CoordinatorServer::new(Service(self.clone()))
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(256 << 20);
        let service = tonic::service::interceptor::InterceptedService::new(server, token.check());
        let mut rx = self.changed.subscribe();
        let me = self.clone();
        let ended = async move {
            loop {
                {
                    let st = me.lock();
                    if st.aborted.is_some() || st.model_saved || st.stop == Stop::Done {
                        break;
                    }
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // Let workers read the final answer (DONE / STOP / ABORTED) before the server goes.
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        {
            let me = self.clone();
            tokio::spawn(async move {
                shutdown.await;
                me.request_stop();
                // A stop that cannot finish (a worker hangs) must not hang the coordinator.
                tokio::time::sleep(Duration::from_millis(me.cfg.cluster.step_timeout_ms)).await;
                me.abort("the graceful stop did not finish within cluster.step_timeout_ms".into());
            });
        }
        tokio::spawn(self.clone().monitor());
        tonic::transport::Server::builder()
            .timeout(
                Duration::from_millis(
                    self.cfg
                        .cluster
                        .join_timeout_ms
                        .max(self.cfg.cluster.step_timeout_ms),
                ) + Duration::from_secs(30),
            )
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                ended,
            )
            .await
            .map_err(|e| Error::Usage(format!("coordinator server failed: {e}")))?;
        self.bar.finish_and_clear();
        let st = self.lock();
        Ok(match (&st.aborted, st.model_saved) {
            (Some(reason), _) => Outcome::Aborted(reason.clone()),
            (None, true) => Outcome::Finished {
                steps: st.committed,
                model_dir: self.cfg.output.dir.join("model"),
            },
            (None, false) => Outcome::Stopped {
                steps: st.committed,
                checkpoint: st
                    .latest
                    .as_ref()
                    .filter(|(_, s)| s.step == st.committed)
                    .map(|(p, _)| p.clone()),
            },
        })
    }

    fn shard(&self, rank: usize, world: usize, step: u64, checkpoint: bool) -> NextStepResponse {
        let (epoch, index) = self.plan.locate(step);
        let batch = self.plan.epoch(epoch).batch(index);
        let shard = batch
            .shard(rank, world)
            .expect("ring sizes divide batch_size");
        let rows = (0..shard.rows.len())
            .map(|i| ShardRow {
                query: self.data.text(shard.rows[i].query).to_string(),
                positive: self.data.text(shard.rows[i].positive).to_string(),
                negatives: shard
                    .row_negatives(i)
                    .iter()
                    .map(|&n| self.data.text(n).to_string())
                    .collect(),
            })
            .collect();
        NextStepResponse {
            status: StepStatus::Step as i32,
            step,
            first_row: (rank * shard.rows.len()) as u64,
            rows,
            groups: batch.rows.iter().map(|r| r.group).collect(),
            reason: String::new(),
            checkpoint,
        }
    }

    fn record_batch(&self, step: u64, world: usize) -> Result<()> {
        let (epoch, index) = self.plan.locate(step);
        let batch = self.plan.epoch(epoch).batch(index);
        let shards: Vec<Vec<Vec<String>>> = (0..world)
            .map(|r| {
                let s = batch.shard(r, world).expect("ring sizes divide batch_size");
                (0..s.rows.len())
                    .map(|i| {
                        let row = s.rows[i];
                        std::iter::once(row.query)
                            .chain(std::iter::once(row.positive))
                            .chain(s.row_negatives(i).iter().copied())
                            .map(|t| format!("{:016x}", self.data.hash(t)))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let groups: Vec<u32> = batch.rows.iter().map(|r| r.group).collect();
        let mut log = self.batches_log.lock().unwrap_or_else(|e| e.into_inner());
        log.write(&json!({"step": step + 1, "epoch": epoch, "batch": index, "groups": groups, "shards": shards}))
    }

    fn finish_step(
        &self,
        step: u64,
        commits: Vec<CommitRequest>,
        generation: u64,
    ) -> std::result::Result<(), String> {
        let loss = commits[0].loss;
        for c in &commits {
            // Every worker computes the same global loss; disagreement means the replicas diverged.
            if (c.loss - loss).abs() > 1e-4 * loss.abs().max(1e-3) {
                return Err(format!(
                    "workers disagree on the loss of step {}: {} vs {}",
                    step + 1,
                    c.loss,
                    loss
                ));
            }
        }
        let compute = commits
            .iter()
            .map(|c| c.compute_seconds)
            .fold(0.0, f64::max);
        let comm = commits.iter().map(|c| c.comm_seconds).fold(0.0, f64::max);
        let seconds = compute + comm;
        let pairs = self.cfg.train.batch_size;
        self.write_log(json!({
            "event": "step", "step": step + 1, "loss": loss, "lr": commits[0].lr, "grad_norm": commits[0].grad_norm,
            "pairs": pairs, "tokens": commits.iter().map(|c| c.tokens).sum::<u64>(), "seconds": seconds,
            "compute_seconds": compute, "comm_seconds": comm, "pairs_per_s": pairs as f64 / seconds.max(1e-9),
            "workers": commits.len(), "generation": generation, "elapsed": self.started.elapsed().as_secs_f64(),
        }));
        self.record_batch(step, commits.len())
            .map_err(|e| e.to_string())?;
        self.bar.set_message(format!(
            "loss {loss:.4}  {:.1} pairs/s  comm {:.0}%",
            pairs as f64 / seconds.max(1e-9),
            100.0 * comm / seconds.max(1e-9)
        ));
        self.bar.set_position(step + 1);
        Ok(())
    }

    /// Checks a joining worker against the run; returns its usable state step.
    fn admit(&self, req: &JoinRequest) -> std::result::Result<u64, Status> {
        if req.version != env!("CARGO_PKG_VERSION") {
            return Err(Status::failed_precondition(format!(
                "worker runs multipos {}, the coordinator {}",
                req.version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        if !req.model_fingerprint.is_empty() && req.model_fingerprint != self.fingerprint {
            return Err(Status::failed_precondition(format!(
                "the worker's model (fingerprint {}) differs from the coordinator's {} ({}): use the same model or let the worker fetch it",
                req.model_fingerprint,
                self.fingerprint,
                self.model_dir.display()
            )));
        }
        if req.state_step > 0 && req.run_fingerprint != self.run_fingerprint {
            return Err(Status::failed_precondition(
                "the worker holds the state of another run (other data or settings): restart it",
            ));
        }
        if req.state_step > self.plan.total_steps {
            return Err(Status::failed_precondition(format!(
                "the worker reports {} steps applied, but the run has {}",
                req.state_step, self.plan.total_steps
            )));
        }
        Ok(req.state_step)
    }
}

/// Generation numbers start from the clock, so a restarted coordinator never reuses one its
/// predecessor handed out (a worker's ring then drops every chunk still in flight from before).
fn first_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// A requested stop is done once every member was told and the state is checkpointed (or no
    /// ring is left to tell).
    fn settle_stop(&mut self) {
        if self.stop == Stop::Requested
            && (self.forming
                || (self.stop_told.iter().all(|t| *t) && self.latest_is(self.committed)))
        {
            self.stop = Stop::Done;
        }
    }

    fn latest_is(&self, step: u64) -> bool {
        self.latest.as_ref().is_some_and(|(_, s)| s.step == step)
    }

    /// Whether `generation` is over (a new one forms or formed).
    fn ended(&self, generation: u64) -> bool {
        self.forming || self.generation != generation
    }
}

struct Service(Shared);

/// The rank `rank` of generation `generation`, checked against the current ring.
fn check_rank(st: &State, generation: u64, rank: u32) -> std::result::Result<usize, Status> {
    let r = rank as usize;
    if !st.ended(generation) && r >= st.ring.len() {
        return Err(Status::invalid_argument(format!(
            "rank {rank} is outside a ring of {}",
            st.ring.len()
        )));
    }
    Ok(r)
}

/// A stream of file chunks, as the transfer calls return it.
type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<FileChunk, Status>> + Send>>;

fn transfer_stream(dir: &std::path::Path) -> std::result::Result<ChunkStream, Status> {
    let chunks = file_chunks(dir).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok))))
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinResponse>, Status> {
        let c = self.0.clone();
        let req = request.into_inner();
        let state_step = c.admit(&req)?;
        let id = {
            let mut st = c.lock();
            if let Some(reason) = &st.aborted {
                return Err(Status::aborted(reason.clone()));
            }
            if st.stop != Stop::Running || st.model_saved {
                return Err(Status::aborted("the run is ending"));
            }
            // A member of the running ring joining again has left its step: the ring is broken.
            if let Some(rank) = st.ring.iter().position(|m| m.worker_id == req.worker_id) {
                let why = if req.reason.is_empty() {
                    "joined again"
                } else {
                    &req.reason
                };
                c.end_generation(&mut st, format!("worker {rank} left the ring: {why}"));
            }
            st.candidates.retain(|m| m.worker_id != req.worker_id);
            let preference = st
                .previous
                .iter()
                .position(|m| m.worker_id == req.worker_id)
                .or((req.rank >= 0).then_some(req.rank as usize))
                .unwrap_or(usize::MAX);
            let id = st.next_member;
            st.next_member += 1;
            st.candidates.push(Member {
                id,
                worker_id: req.worker_id.clone(),
                peer_address: req.peer_address.clone(),
                last_seen: Instant::now(),
                preference,
                state_step,
            });
            if !st.forming {
                let now = st.ring.len();
                if c.ring_size(now + st.candidates.len())
                    .is_some_and(|k| k > now)
                {
                    st.grow = true;
                }
            }
            c.try_form(&mut st);
            id
        };
        tracing::info!(worker = %req.worker_id, peer = %req.peer_address, state_step, reason = %req.reason, "worker joins");
        c.notify();
        let timeout = Duration::from_millis(c.cfg.cluster.join_timeout_ms);
        let formation = c
            .wait_for(timeout, "a ring to form", |st| {
                let f = st.formation.clone().filter(|f| f.members.contains(&id));
                match f {
                    Some(f) if !st.ended(f.generation) => Some(Ok(f)),
                    Some(_) => Some(Err(Status::unavailable(
                        "the ring broke up before this worker started: join again",
                    ))),
                    None if !st.candidates.iter().any(|m| m.id == id) => {
                        Some(Err(Status::resource_exhausted(format!(
                            "the run already has its {} workers",
                            c.cfg.cluster.workers
                        ))))
                    }
                    None => None,
                }
            })
            .await??;
        let rank = formation
            .members
            .iter()
            .position(|m| *m == id)
            .expect("member of the formation");
        Ok(Response::new(JoinResponse {
            rank: rank as u32,
            world_size: formation.members.len() as u32,
            peers: formation.peers.clone(),
            config_toml: c.config_toml.clone(),
            model_fingerprint: c.fingerprint.clone(),
            total_steps: c.plan.total_steps,
            heartbeat_interval_ms: c.cfg.cluster.heartbeat_interval_ms,
            start_step: formation.start_step,
            heal: formation.heal[rank],
            data_fingerprint: c.data_fingerprint.clone(),
            generation: formation.generation,
            member: id,
            upload_state: formation.donor == Some(rank),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        let c = &self.0;
        let id = request.into_inner().member;
        let mut st = c.lock();
        let in_ring = st
            .ring
            .iter_mut()
            .find(|m| m.id == id)
            .map(|m| m.last_seen = Instant::now())
            .is_some();
        Ok(Response::new(HeartbeatResponse {
            keep_going: st.aborted.is_none() && !st.model_saved && st.stop != Stop::Done,
            reason: st.aborted.clone().unwrap_or_default(),
            generation: st.generation,
            rejoin: !in_ring,
        }))
    }

    async fn next_step(
        &self,
        request: Request<NextStepRequest>,
    ) -> std::result::Result<Response<NextStepResponse>, Status> {
        let c = self.0.clone();
        let req = request.into_inner();
        let answer = |status: StepStatus, reason: String| NextStepResponse {
            status: status as i32,
            step: req.step,
            reason,
            ..Default::default()
        };
        let timeout = Duration::from_millis(c.cfg.cluster.step_timeout_ms);
        let next = c
            .wait_for(timeout, "the previous step to be committed", |st| {
                if st.ended(req.generation) {
                    Some(Next::Rejoin(format!("generation {} ended", req.generation)))
                } else {
                    (st.committed >= req.step).then_some(Next::Ready(st.committed))
                }
            })
            .await;
        let committed = match next {
            Ok(Next::Ready(v)) => v,
            Ok(Next::Rejoin(reason)) => {
                return Ok(Response::new(answer(StepStatus::Rejoin, reason)));
            }
            Err(status) if status.code() == tonic::Code::Aborted => {
                return Ok(Response::new(answer(
                    StepStatus::Aborted,
                    status.message().into(),
                )));
            }
            Err(status) => return Err(status),
        };
        let mut st = c.lock();
        if st.ended(req.generation) {
            return Ok(Response::new(answer(
                StepStatus::Rejoin,
                format!("generation {} ended", req.generation),
            )));
        }
        let rank = check_rank(&st, req.generation, req.rank)?;
        if committed != req.step {
            return Ok(Response::new(answer(
                StepStatus::Rejoin,
                format!(
                    "asked for step {}, but the run is at step {committed}",
                    req.step + 1
                ),
            )));
        }
        if req.step >= c.plan.total_steps {
            let mut reply = answer(StepStatus::Done, String::new());
            // The end of a checkpointed run gets a checkpoint too (as a single process does).
            reply.checkpoint =
                rank == 0 && c.cfg.output.checkpoint_every_steps > 0 && !st.latest_is(req.step);
            return Ok(Response::new(reply));
        }
        if st.stop != Stop::Running {
            let mut reply = answer(StepStatus::Stop, "the coordinator was asked to stop".into());
            reply.checkpoint = rank == 0 && !st.latest_is(req.step);
            if let Some(told) = st.stop_told.get_mut(rank) {
                *told = true;
            }
            st.settle_stop();
            drop(st);
            c.notify();
            return Ok(Response::new(reply));
        }
        if st.grow {
            c.end_generation(&mut st, "a worker waits to join: growing the ring".into());
            drop(st);
            c.notify();
            return Ok(Response::new(answer(
                StepStatus::Rejoin,
                "growing the ring".into(),
            )));
        }
        let every = c.cfg.output.checkpoint_every_steps;
        let start = st.formation.as_ref().map_or(0, |f| f.start_step);
        let checkpoint = rank == 0
            && every > 0
            && req.step > start
            && req.step.is_multiple_of(every)
            && !st.latest_is(req.step);
        st.step_started.get_or_insert_with(Instant::now);
        let world = st.ring.len();
        drop(st);
        Ok(Response::new(c.shard(rank, world, req.step, checkpoint)))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> std::result::Result<Response<CommitResponse>, Status> {
        let c = self.0.clone();
        let req = request.into_inner();
        let (step, generation) = (req.step, req.generation);
        let discard = |reason: String| {
            Ok(Response::new(CommitResponse {
                apply: false,
                reason,
            }))
        };
        let decided = {
            let mut st = c.lock();
            if let Some(reason) = &st.aborted {
                return Err(Status::aborted(reason.clone()));
            }
            if st.ended(generation) {
                return discard(format!("generation {generation} ended"));
            }
            let rank = check_rank(&st, generation, req.rank)?;
            if step != st.committed {
                return discard(format!(
                    "commit for step {}, but step {} is open",
                    step + 1,
                    st.committed + 1
                ));
            }
            st.commits[rank] = Some(req);
            if st.commits.iter().all(Option::is_some) {
                let commits: Vec<CommitRequest> = st
                    .commits
                    .iter_mut()
                    .map(|c| c.take().expect("all present"))
                    .collect();
                st.committed += 1;
                st.step_started = None;
                Some((commits, st.broken_since.take()))
            } else {
                None
            }
        };
        if let Some((commits, broken_since)) = decided {
            if let Err(reason) = c.finish_step(step, commits, generation) {
                c.abort(reason.clone());
                return Err(Status::aborted(reason));
            }
            if let Some(t) = broken_since {
                let seconds = t.elapsed().as_secs_f64();
                tracing::info!(
                    seconds = format!("{seconds:.2}"),
                    step = step + 1,
                    "recovered: first step after the ring broke up"
                );
                c.write_log(json!({"event": "recovered", "step": step + 1, "generation": generation, "seconds": seconds}));
            }
            c.notify();
        }
        let timeout = Duration::from_millis(c.cfg.cluster.step_timeout_ms);
        let apply = c
            .wait_for(timeout, "every worker to report the step", |st| {
                if st.committed > step {
                    Some(true)
                } else {
                    st.ended(generation).then_some(false)
                }
            })
            .await?;
        if apply {
            Ok(Response::new(CommitResponse {
                apply,
                reason: String::new(),
            }))
        } else {
            discard(format!(
                "generation {generation} ended before every worker reported step {}",
                step + 1
            ))
        }
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<UploadCheckpointResponse>, Status> {
        let c = self.0.clone();
        let dir = c.cfg.output.dir.join("checkpoints");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
        let incoming = tempfile::Builder::new()
            .prefix(".multipos-incoming-")
            .tempdir_in(&dir)
            .map_err(|e| {
                Status::internal(format!("create a directory in {}: {e}", dir.display()))
            })?;
        let received = incoming.path().join("checkpoint");
        let start = Instant::now();
        receive_files(request.into_inner(), &received)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let metrics = c
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contents()
            .map_err(|e| Status::internal(e.to_string()))?;
        checkpoint::annotate(
            &received,
            |state| (state.epoch, state.batch) = c.plan.cursor(state.step),
            &[("metrics.jsonl", &metrics)],
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (path, state) = checkpoint::adopt(&dir, &received, c.cfg.output.keep_checkpoints)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), step = state.step, seconds = format!("{seconds:.2}"), "checkpoint written");
        c.write_log(
            json!({"event": "checkpoint", "step": state.step, "path": path, "seconds": seconds}),
        );
        {
            let mut st = c.lock();
            st.latest = Some((path.clone(), state));
            st.settle_stop();
        }
        c.notify();
        Ok(Response::new(UploadCheckpointResponse {
            saved_to: path.display().to_string(),
        }))
    }

    type FetchCheckpointStream = ChunkStream;

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> std::result::Result<Response<Self::FetchCheckpointStream>, Status> {
        let c = self.0.clone();
        let step = request.into_inner().step;
        let timeout = Duration::from_millis(c.cfg.cluster.step_timeout_ms);
        let path = c
            .wait_for(timeout, "the checkpoint to heal from", |st| {
                if st.forming {
                    return Some(Err(Status::unavailable(
                        "the ring broke up while healing: join again",
                    )));
                }
                st.latest
                    .as_ref()
                    .filter(|(_, s)| s.step == step)
                    .map(|(p, _)| Ok(p.clone()))
            })
            .await??;
        Ok(Response::new(transfer_stream(&path)?))
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        _request: Request<FetchModelRequest>,
    ) -> std::result::Result<Response<Self::FetchModelStream>, Status> {
        Ok(Response::new(transfer_stream(&self.0.model_dir)?))
    }

    async fn upload_model(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<UploadModelResponse>, Status> {
        let c = self.0.clone();
        {
            let st = c.lock();
            if st.committed < c.plan.total_steps {
                return Err(Status::failed_precondition("the run is not finished"));
            }
            if st.model_saved {
                return Err(Status::already_exists("the model was already uploaded"));
            }
        }
        let target = c.cfg.output.dir.join("model");
        receive_files(request.into_inner(), &target)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(model = %target.display(), steps = c.plan.total_steps, "run finished; model saved");
        c.write_log(json!({"event": "done", "steps": c.plan.total_steps, "seconds": c.started.elapsed().as_secs_f64(), "model_dir": target}));
        c.lock().model_saved = true;
        c.notify();
        Ok(Response::new(UploadModelResponse {
            saved_to: target.display().to_string(),
        }))
    }
}

/// Binds the configured address (and nothing else).
pub async fn bind(cfg: &RunConfig) -> Result<TcpListener> {
    TcpListener::bind(&cfg.cluster.bind).await.map_err(|e| {
        Error::Usage(format!(
            "cannot listen on cluster.bind = {}: {e}",
            cfg.cluster.bind
        ))
    })
}
