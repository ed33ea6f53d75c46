//! The coordinator: membership in generations, heartbeats, the plan of global batches, the two-phase
//! commit of every step, checkpoints, and the final model. It never touches tensors during a step:
//! workers exchange those among themselves.
//!
//! One `State` behind a std mutex (never held across an await); every change bumps a `watch`
//! counter that blocked calls (join, next step, commit) wait on with their deadline.
//!
//! Fault model (docs/design.md §9): a member that dies, stalls or leaves ends its generation. The open step
//! is applied by nobody (workers apply only after every member reported it), the live workers join
//! again, and the next generation re-runs the same global batch from the state every member holds:
//! the newest state a joining worker reports, or the newest checkpoint. Workers behind it heal from
//! a live member's Peer server (or, when the start is a checkpoint, from that checkpoint).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;

mod callers;
mod commits;
pub(crate) mod evaluation;
mod joins;
mod journal;
mod membership;
mod metrics;
mod mining;
mod pages;
mod phase;
mod service;
mod steps;
mod transfers;

use self::journal::{Journal, Log};
use super::files::model_fingerprint;
use crate::config::MineOn;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{IrConfig, IrDataset, ir_metrics};
use crate::model::Role;
use crate::net::auth::Token;
use crate::net::tls::Tls;
use crate::pb::coordinator_server::CoordinatorServer;
use crate::pb::*;
use crate::progress::{Progress, Show};
use crate::train::build::{data_events, prepare_output, schedule_for};
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::metrics::MetricsLog;
use crate::train::policy::RunPolicy;
use crate::train::task::load_tasks;
use crate::train::validation::{Tracker, Verdict};
use crate::train::versions::TrainingData;
use evaluation::Round;
use membership::{Formation, Member};
use metrics::Metrics;
use mining::{MineJob, placeholder};
use phase::{Ending, Phase, StopEnd};

/// Concurrent calls one connection may have open at the coordinator.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

struct State {
    /// What the run is doing; changed only by its transitions (`phase.rs`).
    phase: Phase,
    generation: u64,
    /// Members of the current generation, by rank: empty exactly while a new one forms (and
    /// still so when the run ends then).
    ring: Vec<Member>,
    /// The previous generation's members, for rank preferences of re-joining workers.
    previous: Vec<Member>,
    /// Workers waiting in `Join` for the next generation.
    candidates: Vec<Member>,
    formation: Option<Arc<Formation>>,
    ever_formed: bool,
    /// A worker waits to join a running ring that would grow: re-form at the next step boundary.
    grow: bool,
    next_member: u64,
    committed: u64,
    /// Steps whose records the logs hold; a commit is answered only once its step is logged.
    logged: u64,
    commits: Vec<Option<CommitRequest>>,
    /// The newest checkpoint on disk (the one healing workers fetch).
    latest: Option<(PathBuf, CheckpointState)>,
    step_started: Option<Instant>,
    /// A shard of the open step went out: a stop waits for the step to finish, so every member
    /// runs it (one already in its collectives would wait for the others forever otherwise).
    shards_out: bool,
    /// When the last generation ended, until the first step after it commits.
    broken_since: Option<Instant>,
    /// The evaluation being embedded by the workers (or scored).
    eval: Option<Round>,
    /// `train.mine` still to be done by the ring (before step 0), and the pages of the mining
    /// being embedded (or mined).
    mine_pending: bool,
    mine_round: Option<Round>,
    /// When the ring was handed the first mining page.
    mine_started: Option<Instant>,
    /// The run's evaluations so far (`eval.metric`, patience); `None` without an eval set.
    tracker: Option<Tracker>,
    /// The step the run ends at: the last, or where `eval.patience` stopped it.
    end: u64,
    /// The step whose checkpoint rank 0 of the live ring was asked to upload; nothing else is taken.
    checkpoint_asked: Option<u64>,
    /// Steps skipped in a row for a non-finite loss or gradient, and the latest such step.
    skipped_in_a_row: u64,
    last_skipped: Option<u64>,
}

/// Seconds since the checkpoint at `path` was written.
fn checkpoint_age(path: &Path) -> Option<f64> {
    let written = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some(written.elapsed().ok()?.as_secs_f64())
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Finished {
        steps: u64,
        model_dir: PathBuf,
    },
    /// Stopped after `steps` steps, with the checkpoint to resume from: by a signal, or as the
    /// config asked (`train.stop_after_steps`: `as_asked`).
    Stopped {
        steps: u64,
        checkpoint: Option<PathBuf>,
        as_asked: bool,
    },
    Aborted(String),
}

/// Caps on what rank 0 uploads, from the size of the model the run started from.
#[derive(Debug, Clone, Copy)]
struct UploadCaps {
    model: u64,
    checkpoint: u64,
}

impl UploadCaps {
    /// The caps for a run that starts from the model in `model_dir`.
    fn of(model_dir: &Path) -> Result<Self> {
        let bytes = crate::cluster::files::dir_bytes(model_dir)?;
        Ok(Self {
            model: crate::cluster::files::upload_cap(bytes, 1),
            checkpoint: crate::cluster::files::upload_cap(bytes, 5),
        })
    }
}

/// The checkpoint `train.resume` names, checked against the run, if one exists.
fn resume_from(
    cfg: &RunConfig,
    training: &TrainingData,
) -> Result<Option<(PathBuf, CheckpointState)>> {
    let Some(which) = &cfg.train.resume else {
        return Ok(None);
    };
    let found = checkpoint::find(&cfg.output.dir.join("checkpoints"), which)?;
    if let Some((path, state)) = &found {
        checkpoint::check_compatible(path, state, &training.fingerprint, cfg)?;
        tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
    } else {
        tracing::warn!(
            "no checkpoint to resume from: continuing from what the workers hold, or the beginning"
        );
    }
    Ok(found)
}

/// The coordinator service and everything it knows about the run.
pub(crate) struct Coordinator {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    cfg: RunConfig,
    config_toml: String,
    /// The data the run trains on and its plan; replaced once, when the workers' mining is done.
    data: RwLock<Arc<RunData>>,
    /// `train.mine` for the workers to embed before the first step, when its records are missing.
    mine_job: Option<MineJob>,
    fingerprint: String,
    model_dir: PathBuf,
    /// The most rank 0 may upload, by kind.
    upload_caps: UploadCaps,
    /// `metrics.jsonl` and `batches.jsonl`, written by their own thread.
    journal: Journal,
    started: Instant,
    progress: Progress,
    metrics: Metrics,
    eval_set: Option<IrDataset>,
    /// The step this invocation started at (where it resumed): `train.stop_after_steps` counts
    /// from here.
    start_step: u64,
    /// When the run evaluates, checkpoints and stops, read from `cfg` once.
    policy: RunPolicy,
    /// The Gloo rendezvous store (`cluster.collective = "gloo"`), once served.
    store: std::sync::OnceLock<crate::cluster::c10d::StoreServer>,
}

type Shared = Arc<Coordinator>;

/// What the run trains on.
struct RunData {
    training: TrainingData,
    /// Config and data fingerprints: the identity of the run a worker's state must belong to.
    run_fingerprint: String,
}

impl RunData {
    fn new(cfg: &RunConfig, training: TrainingData) -> Result<Self> {
        // Refuse an impossible schedule here, before any step runs.
        schedule_for(cfg, training.plan.total_steps)?;
        Ok(Self {
            run_fingerprint: checkpoint::run_fingerprint(cfg, &training.fingerprint),
            training,
        })
    }
}

impl Coordinator {
    /// Loads data and model metadata and plans the run (no network yet).
    pub(crate) fn new(cfg: RunConfig, show: Show) -> Result<Shared> {
        let out = &cfg.output.dir;
        let config_toml = prepare_output(&cfg)?;
        // Uploads a previous coordinator was receiving when it died: nothing refers to them.
        checkpoint::remove_incoming(&out.join("checkpoints"));
        let resuming = cfg.train.resume.is_some();
        let mut log = MetricsLog::for_run(&cfg)?;
        let (mut training, mine_job, mine_pending) = load_data(&cfg, &mut log)?;
        let latest = resume_from(&cfg, &training)?;
        let model_dir = cfg.model.dir();
        // The workers embed the pages as they come: the prompts go in front here, once.
        let usage = crate::model::config::Usage::load(&model_dir)?;
        let eval_set = match &cfg.eval {
            Some(e) => Some(
                IrDataset::load(&e.queries, &e.corpus, &e.qrels)?
                    .prompted(usage.prompt(Role::Query), usage.prompt(Role::Document)),
            ),
            None => None,
        };
        let resumed = latest.as_ref().map(|(_, s)| s.step);
        let tracker = Tracker::resumed(cfg.eval.as_ref(), resumed, &mut log)?;
        if let Some((_, state)) = &latest {
            // The data versions re-mined before the checkpoint, from their records.
            training.restore_versions(&cfg, state.step)?;
        }
        let data = RunData::new(&cfg, training)?;
        let total_steps = data.training.plan.total_steps;
        let fingerprint = model_fingerprint(&model_dir)?;
        let upload_caps = UploadCaps::of(&model_dir)?;
        let start_step = latest.as_ref().map_or(0, |(_, s)| s.step);
        let batches_path = out.join("batches.jsonl");
        let batches = if resuming {
            MetricsLog::append(&batches_path)?
        } else {
            MetricsLog::create(&batches_path)?
        };
        if resuming {
            log.write(&json!({"event": "resume", "step": start_step}))?;
        }
        let progress = Progress::new(show, total_steps, start_step, cfg.train.batch_size);
        let state = State::new(latest, mine_pending, tracker, total_steps);
        let metrics = Metrics::new(cfg.cluster.workers, total_steps);
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            config_toml,
            journal: Journal::start(log, batches)?,
            data: RwLock::new(Arc::new(data)),
            mine_job,
            fingerprint,
            model_dir,
            upload_caps,
            eval_set,
            started: Instant::now(),
            progress,
            metrics,
            start_step,
            policy: RunPolicy::new(&cfg),
            store: std::sync::OnceLock::new(),
            cfg,
        }))
    }

    /// Total steps of the run.
    pub(crate) fn total_steps(&self) -> u64 {
        self.data().training.plan.total_steps
    }

    /// What the run trains on now.
    fn data(&self) -> Arc<RunData> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The step timeout: how long a member's call waits on the others, and a step may run.
    fn step_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.cluster.step_timeout_ms)
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a record for `metrics.jsonl` (no I/O here: safe under the state lock).
    fn write_log(&self, record: serde_json::Value) {
        self.journal.write(Log::Metrics, record);
    }

    fn abort(&self, reason: String) {
        let mut st = self.lock();
        Self::abort_locked(&mut st, reason);
        drop(st);
        self.notify();
    }

    /// Aborts the run under the lock (once; a run that is over stays as it ended); the caller
    /// notifies.
    fn abort_locked(st: &mut State, reason: String) {
        if st.phase.abort(reason.clone()) {
            tracing::error!(%reason, "aborting the run");
        }
    }

    /// Asks for a graceful stop: the open step finishes, rank 0 checkpoints, every worker exits.
    pub(crate) fn request_stop(&self) {
        let mut st = self.lock();
        self.begin_stop(
            &mut st,
            false,
            "stopping: finishing the open step and writing a checkpoint",
        );
        drop(st);
        self.notify();
    }

    /// Starts a graceful stop (once; `as_asked`: by `train.stop_after_steps`), saying `why` in
    /// the log; the caller notifies.
    fn begin_stop(&self, st: &mut State, as_asked: bool, why: &str) {
        let members = st.ring.len();
        if st.phase.stop(Instant::now(), as_asked, members) {
            tracing::warn!(step = st.committed, "{why}");
            self.settle_stop(st);
        }
    }

    /// After step `committed` is committed: stops the run when `train.stop_after_steps` steps of
    /// this invocation are done and steps remain (the run policy decides).
    fn stop_if_budget_spent(&self, st: &mut State) {
        if st.committed < st.end && self.policy.budget_spent(self.start_step, st.committed) {
            self.begin_stop(
                st,
                true,
                "train.stop_after_steps reached: writing a checkpoint to resume from",
            );
        }
    }

    /// Ends the current generation: its open step is applied nowhere, and its live members join
    /// again.
    fn end_generation(&self, st: &mut State, reason: String) {
        if !st.phase.ring_ended(Instant::now()) {
            return;
        }
        tracing::warn!(generation = st.generation, step = st.committed + 1, %reason, "the ring breaks up; it re-forms with the live workers");
        self.write_log(json!({"event": "generation_end", "generation": st.generation, "step": st.committed + 1, "reason": reason}));
        st.previous = std::mem::take(&mut st.ring);
        st.commits.clear();
        // The next ring's rank 0 is asked again if the checkpoint is still missing.
        st.checkpoint_asked = None;
        st.step_started = None;
        st.shards_out = false;
        st.broken_since.get_or_insert_with(Instant::now);
        self.settle_stop(st);
        self.metrics.ring_ended();
    }

    /// Ends a requested stop when it is complete, saying so when it loses steps.
    fn settle_stop(&self, st: &mut State) {
        // Before `train.mine` is done no step ran: a resumed run mines again.
        let checkpointed = st.latest_is(st.committed) || st.mine_pending;
        let grace = Duration::from_millis(self.cfg.cluster.rejoin_grace_ms);
        if st.phase.settle(checkpointed, Instant::now(), grace) == Some(StopEnd::Lost) {
            let newest = st.latest.as_ref().map(|(_, s)| s.step);
            tracing::error!(
                step = st.committed,
                newest_checkpoint = ?newest,
                "stopping without a checkpoint of the last step: no ring formed within cluster.rejoin_grace_ms to write it"
            );
        }
    }

    /// Workers that may wait in `Join` at once: the ring and as many replacements again, plus a few
    /// for restarts in flight. Beyond, a join is refused as retryable, so a flood of joiners holds
    /// no unbounded list.
    fn max_candidates(&self) -> usize {
        2 * self.cfg.cluster.workers + 4
    }

    /// The largest ring of at most `n` workers the run may use.
    fn ring_size(&self, n: usize) -> Option<usize> {
        let c = &self.cfg.cluster;
        membership::ring_size(n, c.workers, c.min_workers(), self.cfg.train.batch_size)
    }

    /// Forms the next generation when enough workers wait: all of `cluster.workers` at once, or
    /// (after a failure, once `rejoin_grace_ms` passed) as many as the run can use.
    fn try_form(&self, st: &mut State) {
        let Some(since) = st.phase.forming_since() else {
            return;
        };
        if st.candidates.is_empty() {
            return;
        }
        let n = st.candidates.len();
        let grace = Duration::from_millis(self.cfg.cluster.rejoin_grace_ms);
        let size = if n >= self.cfg.cluster.workers {
            Some(self.cfg.cluster.workers)
        } else if st.ever_formed && since.elapsed() >= grace {
            self.ring_size(n)
        } else {
            None
        };
        let Some(size) = size else { return };
        let checkpoint_step = st.latest.as_ref().map(|(_, s)| s.step);
        let (mut ring, rest, mut formation) = membership::form(
            std::mem::take(&mut st.candidates),
            size,
            checkpoint_step,
            st.generation + 1,
        );
        // Workers beyond a full ring are turned away; the others wait for a later generation.
        if size < self.cfg.cluster.workers {
            st.candidates = rest;
        }
        for m in &mut ring {
            // Heartbeats start once a member's Join returns; waiting to form is not silence.
            m.last_seen = Instant::now();
        }
        let start = formation.start_step;
        if let Err(e) = self.restore_versions(st, start) {
            Self::abort_locked(st, e.to_string());
            return;
        }
        if start != st.committed || !st.ever_formed {
            if start < st.committed {
                tracing::warn!(
                    from = st.committed,
                    to = start,
                    "no live worker holds the newest state: rolling back to the newest checkpoint"
                );
            }
            // Removes logged steps after `start`: they run (again) in this generation, and the
            // logs must show every global batch applied once.
            self.journal.forget_steps_after(start);
        }
        st.committed = start;
        st.logged = start;
        st.generation += 1;
        st.phase.ring_formed(ring.len());
        st.grow = false;
        st.ever_formed = true;
        st.commits = vec![None; ring.len()];
        st.step_started = None;
        st.shards_out = false;
        let healing = formation.heal.iter().filter(|h| **h).count();
        tracing::info!(
            generation = st.generation,
            workers = ring.len(),
            start_step = start,
            healing,
            "ring formed"
        );
        self.write_log(json!({"event": "generation", "generation": st.generation, "workers": ring.len(), "start_step": start, "healing": healing, "collective": self.cfg.cluster.collective}));
        self.metrics
            .ring_formed(st.generation, ring.len(), healing, start);
        formation.keys = (0..ring.len())
            .map(|_| Token::random().expose().to_string())
            .collect();
        formation.generation_key = Token::random().expose().to_string();
        st.formation = Some(Arc::new(formation));
        st.ring = ring;
        self.progress.jump(start);
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
                if let Some(reason) = st.phase.aborted() {
                    return Err(Status::aborted(reason));
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
        let step_timeout = self.step_timeout();
        let join_timeout = Duration::from_millis(self.cfg.cluster.join_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.cfg.cluster.heartbeat_interval_ms.min(250),
        ));
        loop {
            tick.tick().await;
            let mut st = self.lock();
            if st.phase.over() {
                return;
            }
            if st.phase.forming() {
                self.try_form(&mut st);
                self.settle_stop(&mut st);
                if st.phase.over() {
                    drop(st);
                    self.notify();
                    return;
                }
                if st
                    .phase
                    .forming_since()
                    .is_some_and(|t| t.elapsed() > join_timeout)
                {
                    let reason = format!(
                        "no ring of at least {} workers formed within cluster.join_timeout_ms ({} joined)",
                        self.cfg.cluster.min_workers(),
                        st.candidates.len()
                    );
                    drop(st);
                    self.abort(reason);
                    return;
                }
                let formed = !st.phase.forming();
                drop(st);
                if formed {
                    self.notify();
                }
                continue;
            }
            let now = Instant::now();
            // Once every step is applied the others are done and may exit; only rank 0, which
            // still uploads the final checkpoint and model, must stay alive.
            let finished = st.committed >= st.end;
            let dead = st.ring.iter().enumerate().find_map(|(rank, m)| {
                let silent = now.duration_since(m.last_seen);
                (silent > timeout && (rank == 0 || !finished)).then(|| {
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
    pub(crate) async fn serve(
        self: Shared,
        listener: TcpListener,
        token: Token,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Outcome> {
        let server = CoordinatorServer::new(service::Service(self.clone()))
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(256 << 20);
        let service = crate::net::auth::Throttled::new(
            tonic::service::interceptor::InterceptedService::new(server, token.check()),
        );
        let ended = self.clone().over();
        tokio::spawn(self.clone().stop_on(shutdown));
        tokio::spawn(self.clone().monitor());
        let mut builder = tonic::transport::Server::builder();
        if let Some(files) = &self.cfg.cluster.tls {
            builder = builder
                .tls_config(Tls::load(files)?.coordinator_server())
                .map_err(|e| Error::Usage(format!("cluster.tls: {e}")))?;
        }
        builder
            // With the per-address connection cap, this bounds the failures one address can have
            // held at once (`auth::throttle`); a worker has a handful of calls open at a time.
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
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
                crate::net::listen::capped(
                    listener,
                    crate::net::listen::MAX_CONNECTIONS_PER_ADDRESS,
                ),
                ended,
            )
            .await
            .map_err(|e| Error::Network(format!("coordinator server failed: {e}")))?;
        self.progress.finish();
        if let Err(e) = self.journal.flushed().await {
            tracing::error!(error = %e, "the metrics log is incomplete");
        }
        Ok(self.outcome())
    }

    /// Resolves once the run is over, a moment after, so workers read the final answer (done,
    /// stop, aborted) before the server goes.
    async fn over(self: Shared) {
        let mut rx = self.changed.subscribe();
        while !self.lock().phase.over() {
            if rx.changed().await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Asks for a graceful stop when `shutdown` fires, and aborts the run when the stop cannot
    /// finish (a worker hangs) within the step timeout: the coordinator never hangs on it.
    async fn stop_on(self: Shared, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.request_stop();
        tokio::time::sleep(self.step_timeout()).await;
        self.abort("the graceful stop did not finish within cluster.step_timeout_ms".into());
    }

    /// How the run ended, once the server is done.
    fn outcome(&self) -> Outcome {
        let st = self.lock();
        match &st.phase {
            Phase::Aborted(reason) => Outcome::Aborted(reason.clone()),
            Phase::Done(Ending::Finished) => Outcome::Finished {
                steps: st.committed,
                model_dir: self.cfg.output.dir.join("model"),
            },
            // Stopped, or ended by the server failing to serve on.
            phase => Outcome::Stopped {
                as_asked: matches!(phase, Phase::Done(Ending::Stopped { as_asked: true })),
                steps: st.committed,
                checkpoint: st
                    .latest
                    .as_ref()
                    .filter(|(_, s)| s.step == st.committed)
                    .map(|(p, _)| p.clone()),
            },
        }
    }

    /// Mines from the ring's embeddings off the async threads, records the mined data, and puts
    /// it in place: from the start (the first mining) or from the epoch that begins at `step` (a
    /// re-mining). When the run's length changes the ring re-forms, so every worker learns it.
    async fn finish_mining(
        self: Shared,
        step: u64,
        values: Vec<f32>,
        dim: usize,
        started: Instant,
    ) {
        let me = self.clone();
        let mined = tokio::task::spawn_blocking(move || {
            let job = me
                .mine_job
                .as_ref()
                .ok_or_else(|| Error::Internal("no mining job".into()))?;
            let now = me.data();
            let training = &now.training;
            let first = me.lock().mine_pending;
            let took = started.elapsed();
            if first {
                let (tasks, events) =
                    job.finish(&me.cfg, training.tasks(), &values, dim, took, None)?;
                let source = training.source().map(<[_]>::to_vec);
                let fresh = TrainingData::new(&me.cfg, source, tasks)?;
                let mut events = events;
                events.extend(data_events(fresh.tasks()));
                Ok::<_, Error>((fresh, events))
            } else {
                let epoch = training.remine_due(&me.cfg, step).ok_or_else(|| {
                    Error::Internal(format!("no re-mining is due at step {step}"))
                })?;
                let source = training
                    .source()
                    .ok_or_else(|| Error::Internal("re-mining needs the data as loaded".into()))?;
                let (tasks, events) =
                    job.finish(&me.cfg, source, &values, dim, took, Some(epoch))?;
                let mut next = training.clone();
                next.remined(epoch, tasks)?;
                Ok((next, events))
            }
        })
        .await;
        let (training, events) = match mined {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return self.abort(format!("mining hard negatives failed: {e}")),
            Err(e) => return self.abort(format!("mining hard negatives failed: {e}")),
        };
        for event in events {
            self.write_log(event);
        }
        let mut st = self.lock();
        let first = std::mem::replace(&mut st.mine_pending, false);
        st.mine_round = None;
        st.phase.work_done();
        let changed = match self.install(&mut st, training) {
            Ok(changed) => changed,
            Err(e) => {
                drop(st);
                return self.abort(format!("planning the mined data failed: {e}"));
            }
        };
        if first || changed {
            self.end_generation(
                &mut st,
                "hard negatives mined: the ring re-forms to train on the mined data".into(),
            );
            // Not a failure: no recovery to time.
            st.broken_since = None;
        }
        drop(st);
        self.notify();
    }

    /// Puts in place the data versions re-mined before `start` (workers may hold a newer state
    /// than the checkpoint a restarted coordinator resumed from), from their records.
    fn restore_versions(&self, st: &mut State, start: u64) -> Result<()> {
        let now = self.data();
        if !now.training.lacks_versions(&self.cfg, start) {
            return Ok(());
        }
        let mut training = now.training.clone();
        training.restore_versions(&self.cfg, start)?;
        self.install(st, training).map(drop)
    }

    /// Makes `training` what the run trains on; whether the run's length changed (the end, the
    /// progress and the metrics follow it).
    fn install(&self, st: &mut State, training: TrainingData) -> Result<bool> {
        let data = RunData::new(&self.cfg, training)?;
        let total = data.training.plan.total_steps;
        let mut slot = self.data.write().unwrap_or_else(|e| e.into_inner());
        let before = slot.training.plan.total_steps;
        *slot = Arc::new(data);
        drop(slot);
        if total == before {
            return Ok(false);
        }
        // An early stop keeps its end.
        if st.end == before {
            st.end = total;
        }
        self.progress.set_total(total);
        self.metrics.total_steps(total);
        Ok(true)
    }

    /// Scores a complete evaluation off the async threads, then records it.
    async fn score(self: Shared, step: u64, values: Vec<f32>, dim: usize) {
        let start = Instant::now();
        let me = self.clone();
        let scored = tokio::task::spawn_blocking(move || {
            let set = me
                .eval_set
                .as_ref()
                .expect("rounds exist only with an eval set");
            let nq = set.queries.len() as i64;
            let all = tch::Tensor::from_slice(&values).view([-1, dim as i64]);
            let q = all.narrow(0, 0, nq);
            let c = all.narrow(0, nq, set.corpus.len() as i64);
            ir_metrics(&q, &c, &set.relevant, &set.corpus_ids, &IrConfig::default())
        })
        .await;
        match scored {
            Ok(m) => self.record_eval(step, m, start.elapsed().as_secs_f64()),
            Err(e) => self.abort(format!("scoring the validation of step {step} failed: {e}")),
        }
    }

    /// Logs an evaluation and what it means: a new best (whose checkpoint rank 0 then uploads), or
    /// patience running out (the run ends at this step).
    fn record_eval(&self, step: u64, metrics: BTreeMap<String, f64>, seconds: f64) {
        let mut st = self.lock();
        st.eval = None;
        st.phase.work_done();
        st.step_started = None;
        self.write_log(
            json!({"event": "eval", "step": step, "seconds": seconds, "metrics": metrics}),
        );
        self.metrics.eval(&metrics);
        let verdict = st
            .tracker
            .as_mut()
            .expect("evaluations exist only with a tracker")
            .observe(step, &metrics);
        let best = st.tracker.as_ref().and_then(|t| t.best);
        match verdict {
            Ok(Verdict::Improved) => {
                let metric = self.cfg.eval.as_ref().map(|e| e.metric.clone());
                self.write_log(json!({"event": "best", "step": step, "metric": metric, "value": best.map(|b| b.1)}));
            }
            Ok(Verdict::NotBetter { stop: true }) => {
                tracing::warn!(step, best_step = ?best.map(|b| b.0), "stopping early: eval.patience evaluations without a new best");
                self.write_log(
                    json!({"event": "early_stop", "step": step, "best_step": best.map(|b| b.0)}),
                );
                st.end = step;
                self.progress.set_total(step);
                self.metrics.total_steps(step);
            }
            Ok(Verdict::NotBetter { stop: false }) => {}
            Err(reason) => {
                drop(st);
                self.abort(reason);
                return;
            }
        }
        tracing::info!(step, metrics = ?metrics, "validation");
        drop(st);
        self.notify();
    }

    /// The step of the best evaluation so far.
    fn best_step(st: &State) -> Option<u64> {
        st.tracker.as_ref().and_then(|t| t.best).map(|b| b.0)
    }

    /// The Prometheus exposition of the run now.
    pub(crate) fn metrics_text(&self) -> String {
        self.metrics.encode(self.newest_checkpoint())
    }

    /// The newest checkpoint's step and age in seconds (-1 when unknown); the file system is read
    /// outside the state lock.
    fn newest_checkpoint(&self) -> Option<(u64, f64)> {
        let latest = self
            .lock()
            .latest
            .as_ref()
            .map(|(path, state)| (path.clone(), state.step));
        latest.map(|(path, step)| (step, checkpoint_age(&path).unwrap_or(-1.0)))
    }

    /// Serves `metrics_text` on `/metrics` over HTTP until the process ends.
    pub(crate) fn serve_metrics(self: &Shared, listener: TcpListener) {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let me = me.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        me.metrics_text(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics server failed");
            }
        });
    }

    /// The run as it stands, for the `Status` RPC.
    fn status(&self) -> StatusResponse {
        let (checkpoint_step, checkpoint_age_s) = self.newest_checkpoint().unwrap_or((0, -1.0));
        let p = self.progress.snapshot();
        let st = self.lock();
        let now = Instant::now();
        StatusResponse {
            phase: st.phase.name().into(),
            generation: st.generation,
            step: st.committed,
            total_steps: st.end,
            workers_wanted: self.cfg.cluster.workers as u32,
            members: st
                .ring
                .iter()
                .enumerate()
                .map(|(rank, m)| MemberStatus {
                    rank: rank as u32,
                    member: m.id,
                    worker_id: m.worker_id.clone(),
                    peer_address: m.peer_address.clone(),
                    state_step: m.state_step,
                    seconds_since_heard: now.duration_since(m.last_seen).as_secs_f64(),
                })
                .collect(),
            waiting: st.candidates.len() as u32,
            loss: p.loss,
            steps_per_s: p.steps_per_s,
            pairs_per_s: p.pairs_per_s,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            eta_s: p.eta.map_or(-1.0, |d| d.as_secs_f64()),
            checkpoint_step,
            checkpoint_age_s,
            aborted: st.phase.aborted().unwrap_or_default().into(),
        }
    }
}

/// Loads the tasks a config names, and what `train.mine` makes of them: mined by the coordinator
/// alone as one process mines, or (`cluster.mine_on = "workers"`) by the ring — then the job, and
/// whether the first mining is still to come (placeholder tasks until then). Recorded mined data
/// is used when resuming.
fn load_data(
    cfg: &RunConfig,
    log: &mut MetricsLog,
) -> Result<(TrainingData, Option<MineJob>, bool)> {
    let mut tasks = load_tasks(&cfg.tasks())?;
    let on_workers = cfg.train.mine.is_some() && cfg.cluster.mine_on == MineOn::Workers;
    // The tasks as loaded: what the workers' mining and re-mining start from.
    let source = on_workers.then(|| tasks.clone());
    if cfg.train.remine_every_epochs.is_some() && !on_workers {
        return Err(Error::Usage(
            "train.remine_every_epochs in a cluster needs cluster.mine_on = \"workers\": only the workers hold the weights trained so far".into(),
        ));
    }
    let pending = if on_workers {
        !crate::train::mining::use_records(cfg, &mut tasks, log)?.is_empty()
    } else {
        crate::train::mining::apply(cfg, &mut tasks, log)?;
        false
    };
    let job = match &source {
        Some(source) if pending || cfg.train.remine_every_epochs.is_some() => {
            Some(MineJob::new(cfg, source, pending)?)
        }
        _ => None,
    };
    let tasks = if pending {
        placeholder(&tasks)
    } else {
        // The data events of mined tasks are logged when the mining is done.
        for event in data_events(&tasks) {
            log.write(&event)?;
        }
        tasks
    };
    Ok((TrainingData::new(cfg, source, tasks)?, job, pending))
}

/// Generation numbers start from the clock, so a restarted coordinator never reuses one its
/// predecessor handed out (a worker's ring then drops every chunk still in flight from before).
fn first_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// A run's state before its first ring: at the step of `latest` (the checkpoint it resumes
    /// from), `train.mine` still to do when `mine_pending`, ending at step `end`.
    fn new(
        latest: Option<(PathBuf, CheckpointState)>,
        mine_pending: bool,
        tracker: Option<Tracker>,
        end: u64,
    ) -> Self {
        let start = latest.as_ref().map_or(0, |(_, s)| s.step);
        Self {
            phase: Phase::start(Instant::now()),
            generation: first_generation(),
            ring: Vec::new(),
            previous: Vec::new(),
            candidates: Vec::new(),
            formation: None,
            ever_formed: false,
            grow: false,
            next_member: 1,
            committed: start,
            logged: start,
            commits: Vec::new(),
            latest,
            step_started: None,
            shards_out: false,
            broken_since: None,
            eval: None,
            mine_pending,
            mine_round: None,
            mine_started: None,
            tracker,
            end,
            checkpoint_asked: None,
            skipped_in_a_row: 0,
            last_skipped: None,
        }
    }

    fn latest_is(&self, step: u64) -> bool {
        self.latest.as_ref().is_some_and(|(_, s)| s.step == step)
    }

    /// Whether `generation` is over (a new one forms or formed).
    fn ended(&self, generation: u64) -> bool {
        self.ring.is_empty() || self.generation != generation
    }
}

impl Coordinator {
    /// Serves the Gloo rendezvous store when the run's data plane is Gloo: on
    /// `cluster.store_bind`, or on the host of `bound` (the coordinator's own address) at any free
    /// port. Returns the address it listens on.
    pub(crate) fn serve_store(
        &self,
        bound: std::net::SocketAddr,
    ) -> Result<Option<std::net::SocketAddr>> {
        if self.cfg.cluster.collective != crate::config::DataPlane::Gloo {
            return Ok(None);
        }
        let addr = match &self.cfg.cluster.store_bind {
            Some(a) => a.clone(),
            None => std::net::SocketAddr::new(bound.ip(), 0).to_string(),
        };
        let store = crate::cluster::c10d::StoreServer::serve(&addr)?;
        let served = store.addr();
        if self.store.set(store).is_err() {
            return Err(Error::Internal("the Gloo store was served twice".into()));
        }
        Ok(Some(served))
    }

    /// The Gloo store's port, when it is served.
    pub(crate) fn store_port(&self) -> Option<u16> {
        self.store
            .get()
            .map(crate::cluster::c10d::StoreServer::port)
    }
}

/// The listener of `cluster.metrics_bind`, when set.
pub(crate) async fn bind_metrics(cfg: &RunConfig) -> Result<Option<TcpListener>> {
    let Some(addr) = &cfg.cluster.metrics_bind else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::Usage(format!(
            "cannot listen on cluster.metrics_bind = {addr}: {e}"
        ))
    })?;
    Ok(Some(listener))
}

/// Binds the configured address (and nothing else).
pub(crate) async fn bind(cfg: &RunConfig) -> Result<TcpListener> {
    TcpListener::bind(&cfg.cluster.bind).await.map_err(|e| {
        Error::Usage(format!(
            "cannot listen on cluster.bind = {}: {e}",
            cfg.cluster.bind
        ))
    })
}
