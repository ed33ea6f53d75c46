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

pub(crate) mod evaluation;
mod journal;
mod membership;
mod metrics;
mod mining;
mod service;

use self::journal::{Journal, Log};
use super::files::model_fingerprint;
use crate::config::MineOn;
use crate::config::RunConfig;
use crate::data::text::{hash_normalized, normalize};
use crate::error::{Error, Result};
use crate::eval::{IrConfig, IrDataset, ir_metrics};
use crate::loss::Targets;
use crate::net::auth::Token;
use crate::net::tls::Tls;
use crate::pb::coordinator_server::CoordinatorServer;
use crate::pb::next_step_response::Status as StepStatus;
use crate::pb::*;
use crate::progress::{Progress, Show};
use crate::train::build::{data_events, prepare_output, schedule_for};
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::metrics::MetricsLog;
use crate::train::nonfinite::Fate;
use crate::train::policy::RunPolicy;
use crate::train::task::load_tasks;
use crate::train::validation::{Tracker, Verdict};
use crate::train::versions::TrainingData;
use evaluation::Round;
use membership::{Formation, Member};
use metrics::{Metrics, StepTimes};
use mining::{MineJob, placeholder};

/// Concurrent calls one connection may have open at the coordinator.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

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
    /// Steps whose records the logs hold; a commit is answered only once its step is logged.
    logged: u64,
    commits: Vec<Option<CommitRequest>>,
    /// The newest checkpoint on disk (the one healing workers fetch).
    latest: Option<(PathBuf, CheckpointState)>,
    aborted: Option<String>,
    model_saved: bool,
    stop: Stop,
    /// The stop is the one `train.stop_after_steps` asked for, not a signal's.
    stop_as_asked: bool,
    /// Ranks told to stop.
    stop_told: Vec<bool>,
    /// When the stop was asked for.
    stop_asked: Option<Instant>,
    step_started: Option<Instant>,
    /// A shard of the open step went out: a stop waits for the step to finish, so every member
    /// runs it (one already in its collectives would wait for the others forever otherwise).
    shards_out: bool,
    /// When the last generation ended, until the first step after it commits.
    broken_since: Option<Instant>,
    /// The evaluation being embedded by the workers, and whether its scores are being computed.
    eval: Option<Round>,
    scoring: bool,
    /// `train.mine` still to be done by the ring (before step 0), its pages, and whether the
    /// coordinator is mining from them.
    mine_pending: bool,
    mine_round: Option<Round>,
    mining: bool,
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

/// What the run is doing, in one word.
fn phase(st: &State) -> &'static str {
    if st.aborted.is_some() {
        "aborted"
    } else if st.model_saved || st.stop == Stop::Done {
        "finished"
    } else if st.stop == Stop::Requested {
        "stopping"
    } else if st.forming {
        "forming"
    } else if st.mine_pending {
        "mining"
    } else {
        "training"
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
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

/// The coordinator service and everything it knows about the run.
pub struct Coordinator {
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

/// What a blocked `NextStep` learned.
enum Next {
    Ready(u64),
    Rejoin(String),
}

/// What validation asks of a worker before its step.
enum EvalWork {
    /// Embed the texts of this range.
    Page(std::ops::Range<usize>),
    /// Embed this range of the `train.mine` texts.
    MinePage(std::ops::Range<usize>),
    /// Wait: the other workers' pages, or the scores, are still to come.
    Wait,
    /// Wait: the other workers' mining pages, or the mining itself, are still to come.
    MineWait,
}

impl Coordinator {
    /// Loads data and model metadata and plans the run (no network yet).
    pub fn new(cfg: RunConfig, show: Show) -> Result<Shared> {
        let out = &cfg.output.dir;
        let config_toml = prepare_output(&cfg)?;
        // Uploads a previous coordinator was receiving when it died: nothing refers to them.
        checkpoint::remove_incoming(&out.join("checkpoints"));
        let resuming = cfg.train.resume.is_some();
        let open = |path: PathBuf| {
            if resuming {
                MetricsLog::append(&path)
            } else {
                MetricsLog::create(&path)
            }
        };
        let mut log = open(out.join("metrics.jsonl"))?;
        let (mut training, mine_job, mine_pending) = load_data(&cfg, &mut log)?;
        let latest = match &cfg.train.resume {
            Some(which) => {
                let found = checkpoint::find(&out.join("checkpoints"), which)?;
                if let Some((path, state)) = &found {
                    checkpoint::check_compatible(path, state, &training.fingerprint, &cfg)?;
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
        let eval_set = match &cfg.eval {
            Some(e) => Some(IrDataset::load(&e.queries, &e.corpus, &e.qrels)?),
            None => None,
        };
        let mut tracker = cfg.eval.as_ref().map(Tracker::new);
        if let Some(t) = tracker.as_mut()
            && let Some((_, s)) = &latest
        {
            let text = String::from_utf8_lossy(&log.contents()?).into_owned();
            t.replay(&text, s.step).map_err(Error::Usage)?;
        }
        if let Some((_, state)) = &latest {
            // The data versions re-mined before the checkpoint, from their records.
            training.restore_versions(&cfg, state.step)?;
        }
        let data = RunData::new(&cfg, training)?;
        let total_steps = data.training.plan.total_steps;
        let model_dir = cfg
            .model
            .path
            .clone()
            .unwrap_or_else(crate::model::default_dir);
        let fingerprint = model_fingerprint(&model_dir)?;
        let model_bytes = crate::cluster::files::dir_bytes(&model_dir)?;
        let upload_caps = UploadCaps {
            model: crate::cluster::files::upload_cap(model_bytes, 1),
            checkpoint: crate::cluster::files::upload_cap(model_bytes, 5),
        };
        let start_step = latest.as_ref().map_or(0, |(_, s)| s.step);
        if resuming {
            log.write(&json!({"event": "resume", "step": start_step}))?;
        }
        let progress = Progress::new(show, total_steps, start_step, cfg.train.batch_size);
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
            logged: start_step,
            commits: Vec::new(),
            latest,
            aborted: None,
            model_saved: false,
            stop: Stop::Running,
            stop_as_asked: false,
            stop_told: Vec::new(),
            stop_asked: None,
            step_started: None,
            shards_out: false,
            broken_since: None,
            eval: None,
            scoring: false,
            mine_pending,
            mine_round: None,
            mining: false,
            mine_started: None,
            tracker,
            end: total_steps,
            checkpoint_asked: None,
            skipped_in_a_row: 0,
            last_skipped: None,
        };
        let metrics = Metrics::new(cfg.cluster.workers, total_steps);
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            config_toml,
            journal: Journal::start(log, open(out.join("batches.jsonl"))?)?,
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
            cfg,
        }))
    }

    /// Total steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.data().training.plan.total_steps
    }

    /// What the run trains on now.
    fn data(&self) -> Arc<RunData> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
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
        self.begin_stop(
            &mut st,
            "stopping: finishing the open step and writing a checkpoint",
        );
        drop(st);
        self.notify();
    }

    /// Starts a graceful stop (once), saying `why` in the log; the caller notifies.
    fn begin_stop(&self, st: &mut State, why: &str) {
        if st.stop == Stop::Running {
            tracing::warn!(step = st.committed, "{why}");
            st.stop = Stop::Requested;
            st.stop_told = vec![false; st.ring.len()];
            st.stop_asked = Some(Instant::now());
            self.settle_stop(st);
        }
    }

    /// After step `committed` is committed: stops the run when `train.stop_after_steps` steps of
    /// this invocation are done and steps remain (the run policy decides).
    fn stop_if_budget_spent(&self, st: &mut State) {
        if st.committed < st.end
            && self.policy.budget_spent(self.start_step, st.committed)
            && st.stop == Stop::Running
        {
            st.stop_as_asked = true;
            self.begin_stop(
                st,
                "train.stop_after_steps reached: writing a checkpoint to resume from",
            );
        }
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
        // The next ring's rank 0 is asked again if the checkpoint is still missing.
        st.checkpoint_asked = None;
        st.step_started = None;
        st.shards_out = false;
        st.broken_since.get_or_insert_with(Instant::now);
        self.settle_stop(st);
        self.metrics.ring_ended();
    }

    /// Ends a requested stop when it is complete (`stop_end`), saying so when it loses steps.
    fn settle_stop(&self, st: &mut State) {
        if st.stop != Stop::Requested {
            return;
        }
        let waited = st
            .stop_asked
            .map_or(Duration::ZERO, |t| t.elapsed())
            .min(st.forming_since.elapsed());
        let end = stop_end(
            st.forming,
            st.stop_told.iter().all(|t| *t),
            // Before `train.mine` is done no step ran: a resumed run mines again.
            st.latest_is(st.committed) || st.mine_pending,
            waited,
            Duration::from_millis(self.cfg.cluster.rejoin_grace_ms),
        );
        match end {
            None => {}
            Some(StopEnd::Checkpointed) => st.stop = Stop::Done,
            Some(StopEnd::Lost) => {
                let newest = st.latest.as_ref().map(|(_, s)| s.step);
                tracing::error!(
                    step = st.committed,
                    newest_checkpoint = ?newest,
                    "stopping without a checkpoint of the last step: no ring formed within cluster.rejoin_grace_ms to write it"
                );
                st.stop = Stop::Done;
            }
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
            tracing::error!(error = %e, "aborting the run");
            st.aborted = Some(e.to_string());
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
        st.forming = false;
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
        self.write_log(json!({"event": "generation", "generation": st.generation, "workers": ring.len(), "start_step": start, "healing": healing}));
        self.metrics
            .ring_formed(st.generation, ring.len(), healing, start);
        formation.keys = (0..ring.len())
            .map(|_| Token::random().expose().to_string())
            .collect();
        formation.generation_key = Token::random().expose().to_string();
        st.formation = Some(Arc::new(formation));
        if st.stop == Stop::Requested {
            // This ring's only work is the stop's checkpoint.
            st.stop_told = vec![false; ring.len()];
        }
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
                self.settle_stop(&mut st);
                if st.stop == Stop::Done {
                    drop(st);
                    self.notify();
                    return;
                }
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
                let formed = !st.forming;
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
    pub async fn serve(
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
            .map_err(|e| Error::Usage(format!("coordinator server failed: {e}")))?;
        self.progress.finish();
        if let Err(e) = self.journal.flushed().await {
            tracing::error!(error = %e, "the metrics log is incomplete");
        }
        let st = self.lock();
        Ok(match (&st.aborted, st.model_saved) {
            (Some(reason), _) => Outcome::Aborted(reason.clone()),
            (None, true) => Outcome::Finished {
                steps: st.committed,
                model_dir: self.cfg.output.dir.join("model"),
            },
            (None, false) => Outcome::Stopped {
                as_asked: st.stop_as_asked,
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
        let data = self.data();
        let batch = data.training.batch(step);
        let (columns, first_row) = batch.shard(rank, world);
        let rows = (0..columns[0].len())
            .map(|i| ShardRow {
                query: columns[0][i].to_string(),
                positive: columns[1][i].to_string(),
                negatives: columns[2..].iter().map(|c| c[i].to_string()).collect(),
            })
            .collect();
        let (mut groups, mut scores, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        match batch.targets {
            Targets::Groups(g) => groups = g,
            Targets::Scores(s) => scores = s,
            Targets::Labels(l) => labels = l,
        }
        NextStepResponse {
            status: StepStatus::Step as i32,
            step,
            first_row: first_row as u64,
            rows,
            groups,
            reason: String::new(),
            checkpoint,
            task: batch.task as u32,
            scores,
            labels,
            eval_offset: 0,
            eval_texts: Vec::new(),
            mine: false,
        }
    }

    fn record_batch(&self, step: u64, world: usize) {
        let data = self.data();
        let batch = data.training.batch(step);
        let hash = |t: &str| format!("{:016x}", hash_normalized(&normalize(t)));
        let shards: Vec<Vec<Vec<String>>> = (0..world)
            .map(|r| {
                let (columns, _) = batch.shard(r, world);
                (0..columns[0].len())
                    .map(|i| columns.iter().map(|c| hash(c[i])).collect())
                    .collect()
            })
            .collect();
        self.journal.write(Log::Batches, json!({"step": step + 1, "epoch": batch.epoch, "task": data.training.tasks()[batch.task].name, "batch": batch.index, "rows": batch.rows, "shards": shards}));
    }

    /// Validation work for `rank` before step `step`, when an evaluation is due there and not yet
    /// scored.
    fn eval_work(
        &self,
        st: &mut State,
        rank: usize,
        generation: u64,
        step: u64,
    ) -> Option<EvalWork> {
        let set = self.eval_set.as_ref()?;
        let last = st.tracker.as_ref().and_then(|t| t.last);
        if last.is_some_and(|l| l >= step) || !self.policy.eval_due(step, st.end) {
            return None;
        }
        let texts = set.queries.len() + set.corpus.len();
        let page = evaluation::page_size(texts, st.ring.len());
        let round = match &mut st.eval {
            Some(r) if r.step == step => r,
            slot => slot.insert(Round::new(step, texts, page)),
        };
        Some(
            match hand_out(round, &mut st.step_started, rank, generation) {
                Some(range) => EvalWork::Page(range),
                None => EvalWork::Wait,
            },
        )
    }

    /// The `train.mine` work for `rank` before step `step`: the first mining (before step 0) or
    /// a re-mining (before an epoch `train.remine_every_epochs` names), while the ring embeds.
    fn mine_work(
        &self,
        st: &mut State,
        rank: usize,
        generation: u64,
        step: u64,
    ) -> Option<EvalWork> {
        let job = self.mine_job.as_ref()?;
        let due = if st.mine_pending {
            step == 0
        } else {
            self.data().training.remine_due(&self.cfg, step).is_some()
        };
        if !due {
            return None;
        }
        let texts = job.texts(st.mine_pending).len();
        let page = evaluation::page_size(texts, st.ring.len());
        if st.mine_round.as_ref().is_none_or(|r| r.step != step) {
            st.mine_round = Some(Round::new(step, texts, page));
            st.mine_started = Some(Instant::now());
        }
        let round = st.mine_round.as_mut()?;
        Some(
            match hand_out(round, &mut st.step_started, rank, generation) {
                Some(range) => EvalWork::MinePage(range),
                None => EvalWork::MineWait,
            },
        )
    }

    /// The reply that hands out a page of the `train.mine` texts (`first`: of the first mining).
    fn mine_page(&self, step: u64, range: std::ops::Range<usize>, first: bool) -> NextStepResponse {
        let texts = self.mine_job.as_ref().map_or(&[][..], |j| j.texts(first));
        NextStepResponse {
            status: StepStatus::Eval as i32,
            step,
            eval_offset: range.start as u64,
            eval_texts: texts[range].to_vec(),
            mine: true,
            ..Default::default()
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
                .ok_or_else(|| Error::Usage("no mining job".into()))?;
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
                let epoch = training
                    .remine_due(&me.cfg, step)
                    .ok_or_else(|| Error::Usage(format!("no re-mining is due at step {step}")))?;
                let source = training
                    .source()
                    .ok_or_else(|| Error::Usage("re-mining needs the data as loaded".into()))?;
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
        st.mining = false;
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

    /// The reply that hands out a page of validation texts.
    fn eval_page(&self, step: u64, range: std::ops::Range<usize>) -> NextStepResponse {
        let set = self
            .eval_set
            .as_ref()
            .expect("pages exist only with an eval set");
        let nq = set.queries.len();
        let text = |i: usize| {
            if i < nq {
                set.queries[i].clone()
            } else {
                set.corpus[i - nq].clone()
            }
        };
        NextStepResponse {
            status: StepStatus::Eval as i32,
            step,
            eval_offset: range.start as u64,
            eval_texts: range.map(text).collect(),
            ..Default::default()
        }
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
        st.scoring = false;
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

    /// Checks a received checkpoint (whole, of the asked step, of this run), adds the cursor and
    /// the metrics so far, moves it into place (pruning spares the best), and refreshes
    /// `model-best/` when it is the best step's. Blocking: file hashing and moves.
    fn adopt_upload(
        &self,
        received: &std::path::Path,
        asked: u64,
    ) -> std::result::Result<(PathBuf, CheckpointState), Status> {
        let uploaded =
            checkpoint::verify(received).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let data = self.data();
        if uploaded.step != asked
            || uploaded.data_fingerprint != data.training.fingerprint
            || uploaded.config_fingerprint != checkpoint::config_fingerprint(&self.cfg)
        {
            return Err(Status::failed_precondition(format!(
                "the upload is a checkpoint of step {} of {} data and config; step {asked} of this run was asked for",
                uploaded.step,
                if uploaded.data_fingerprint == data.training.fingerprint {
                    "this run's"
                } else {
                    "other"
                }
            )));
        }
        let internal = |e: Error| Status::internal(e.to_string());
        let metrics = self.journal.metrics_contents().map_err(internal)?;
        let state = checkpoint::annotate(
            received,
            uploaded,
            |state| (state.epoch, state.batch) = data.training.plan.cursor(state.step),
            &[("metrics.jsonl", &metrics)],
        )
        .map_err(internal)?;
        let keep = checkpoint::Keep {
            newest: self.cfg.output.keep_checkpoints,
            best: Self::best_step(&self.lock()),
        };
        let dir = self.cfg.output.dir.join("checkpoints");
        let (path, state) = checkpoint::adopt(&dir, received, state, keep).map_err(internal)?;
        if keep.best == Some(state.step) {
            let best = self.cfg.output.dir.join("model-best");
            crate::io::atomic::copy_dir(&path.join("model"), &best).map_err(internal)?;
            tracing::info!(step = state.step, model = %best.display(), "best model so far saved");
        }
        Ok((path, state))
    }

    /// Beside the uploaded final model: `model-ema/` from the final checkpoint, and the best
    /// model in place of the final one when `eval.keep_best` asks for it.
    fn install_extra_models(&self, ema: Option<PathBuf>, model: &Path) -> Result<()> {
        let out = &self.cfg.output.dir;
        if let Some(ema) = ema {
            crate::io::atomic::copy_dir(&ema, &out.join("model-ema"))?;
        }
        let best = out.join("model-best");
        if self.policy.final_outputs().model_from_best && best.is_dir() {
            crate::io::atomic::copy_dir(&best, model)?;
        }
        Ok(())
    }

    /// The step of the best evaluation so far.
    fn best_step(st: &State) -> Option<u64> {
        st.tracker.as_ref().and_then(|t| t.best).map(|b| b.0)
    }

    /// Logs a step every worker committed, waits until its records are written, and only then
    /// lets the workers apply it: a coordinator killed now never leaves an applied step unlogged.
    async fn log_step(
        self: Shared,
        step: u64,
        generation: u64,
        commits: Vec<CommitRequest>,
        broken_since: Option<Instant>,
        fate: Fate,
    ) {
        if let Fate::Skip(reason) = &fate {
            tracing::warn!(%reason, "skipping the step on every worker");
            self.write_log(json!({"event": "skip", "step": step + 1, "reason": reason}));
        } else if let Err(reason) = self.finish_step(step, commits, generation) {
            return self.abort(reason);
        }
        if let Some(t) = broken_since {
            let seconds = t.elapsed().as_secs_f64();
            tracing::info!(
                seconds = format!("{seconds:.2}"),
                step = step + 1,
                "recovered: first step after the ring broke up"
            );
            self.write_log(json!({"event": "recovered", "step": step + 1, "generation": generation, "seconds": seconds}));
        }
        if let Err(e) = self.journal.flushed().await {
            return self.abort(format!("step {}: {e}", step + 1));
        }
        let mut st = self.lock();
        // A rollback in the meantime (a new ring from an older state) re-runs the step instead.
        if st.committed > step {
            st.logged = st.logged.max(step + 1);
        }
        drop(st);
        self.notify();
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
        // The slowest rank's time in each phase: the step waits for it.
        let slowest = |f: fn(&CommitRequest) -> f64| commits.iter().map(f).fold(0.0, f64::max);
        let compute = slowest(|c| c.compute_seconds);
        let comm = slowest(|c| c.comm_seconds);
        let gather = slowest(|c| c.gather_seconds);
        let reduce = slowest(|c| c.reduce_seconds);
        let (data_s, sync) = (slowest(|c| c.data_seconds), slowest(|c| c.sync_seconds));
        let seconds = data_s + compute + comm + sync;
        let pairs = self.cfg.train.batch_size;
        let data = self.data();
        let (task, epoch, batch) = data.training.plan.position(step);
        self.write_log(json!({
            "event": "step", "step": step + 1, "epoch": epoch, "task": data.training.tasks()[task].name, "batch": batch, "loss": loss, "lr": commits[0].lr, "grad_norm": commits[0].grad_norm,
            "pairs": pairs, "tokens": commits.iter().map(|c| c.tokens).sum::<u64>(), "seconds": seconds,
            "compute_seconds": compute, "comm_seconds": comm, "gather_seconds": gather, "reduce_seconds": reduce, "pairs_per_s": pairs as f64 / seconds.max(1e-9),
            "data_seconds": data_s, "forward_seconds": slowest(|c| c.forward_seconds), "backward_seconds": slowest(|c| c.backward_seconds),
            "optimizer_seconds": slowest(|c| c.optimizer_seconds), "sync_seconds": sync,
            "workers": commits.len(), "generation": generation, "elapsed": self.started.elapsed().as_secs_f64(),
        }));
        self.record_batch(step, commits.len());
        let interval = self.progress.step(step + 1, loss);
        self.metrics.step(
            step + 1,
            loss,
            commits[0].lr,
            self.progress.snapshot().pairs_per_s,
            StepTimes {
                compute,
                all_gather: gather,
                all_reduce: reduce,
                waiting: interval.map_or(0.0, |d| (d.as_secs_f64() - seconds).max(0.0)),
            },
        );
        Ok(())
    }

    /// The Prometheus exposition of the run now.
    pub fn metrics_text(&self) -> String {
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
    pub fn serve_metrics(self: &Shared, listener: TcpListener) {
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
        let members = if st.forming { &[][..] } else { &st.ring[..] };
        StatusResponse {
            phase: phase(&st).into(),
            generation: st.generation,
            step: st.committed,
            total_steps: st.end,
            workers_wanted: self.cfg.cluster.workers as u32,
            members: members
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
            aborted: st.aborted.clone().unwrap_or_default(),
        }
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
        if req.rank >= 0 && req.rank as usize >= self.cfg.cluster.workers {
            return Err(Status::failed_precondition(format!(
                "rank {} asked for, but cluster.workers = {}: ranks are 0..{}",
                req.rank, self.cfg.cluster.workers, self.cfg.cluster.workers
            )));
        }
        let data = self.data();
        if req.state_step > 0 && req.run_fingerprint != data.run_fingerprint {
            return Err(Status::failed_precondition(
                "the worker holds the state of another run (other data or settings): restart it",
            ));
        }
        if req.state_step > data.training.plan.total_steps {
            return Err(Status::failed_precondition(format!(
                "the worker reports {} steps applied, but the run has {}",
                req.state_step, data.training.plan.total_steps
            )));
        }
        Ok(req.state_step)
    }
}

/// Hands `rank` the next open page of `round`, if any. The step clock covers embedding too: a
/// worker stuck on a page ends its ring.
fn hand_out(
    round: &mut Round,
    step_started: &mut Option<Instant>,
    rank: usize,
    generation: u64,
) -> Option<std::ops::Range<usize>> {
    let range = round.assign(rank, generation)?;
    step_started.get_or_insert_with(Instant::now);
    Some(range)
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

/// How a requested stop ends.
#[derive(Debug, PartialEq)]
enum StopEnd {
    /// The committed state is in the newest checkpoint.
    Checkpointed,
    /// No ring formed to write it: the steps since the newest checkpoint are lost.
    Lost,
}

/// Whether a requested stop is over (docs/design.md §9): once every member of the live ring was
/// told and the committed state is checkpointed. While a ring forms, the stop waits for it (its
/// rank 0 writes the checkpoint), unless that state is checkpointed already, or `grace` passed
/// since the stop or the ring's end without a ring forming.
fn stop_end(
    forming: bool,
    told_all: bool,
    checkpointed: bool,
    waited: Duration,
    grace: Duration,
) -> Option<StopEnd> {
    if checkpointed && (forming || told_all) {
        Some(StopEnd::Checkpointed)
    } else if forming && waited >= grace {
        Some(StopEnd::Lost)
    } else {
        None
    }
}

impl State {
    fn latest_is(&self, step: u64) -> bool {
        self.latest.as_ref().is_some_and(|(_, s)| s.step == step)
    }

    /// Whether `generation` is over (a new one forms or formed).
    fn ended(&self, generation: u64) -> bool {
        self.forming || self.generation != generation
    }
}

/// The listener of `cluster.metrics_bind`, when set.
pub async fn bind_metrics(cfg: &RunConfig) -> Result<Option<TcpListener>> {
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
pub async fn bind(cfg: &RunConfig) -> Result<TcpListener> {
    TcpListener::bind(&cfg.cluster.bind).await.map_err(|e| {
        Error::Usage(format!(
            "cannot listen on cluster.bind = {}: {e}",
            cfg.cluster.bind
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3);

    #[test]
    fn a_stop_on_a_live_ring_waits_for_every_member_and_the_checkpoint() {
        let early = Duration::ZERO;
        assert_eq!(stop_end(false, false, true, early, GRACE), None);
        assert_eq!(stop_end(false, true, false, early, GRACE), None);
        // However long it takes: the step timeout, not the stop, ends a stalled ring.
        assert_eq!(stop_end(false, true, false, GRACE * 10, GRACE), None);
        assert_eq!(
            stop_end(false, true, true, early, GRACE),
            Some(StopEnd::Checkpointed)
        );
    }

    #[test]
    fn a_stop_while_the_ring_forms_waits_for_the_ring_within_the_grace() {
        let early = GRACE / 2;
        // Steps since the newest checkpoint: wait for a ring to write them.
        assert_eq!(stop_end(true, false, false, early, GRACE), None);
        assert_eq!(stop_end(true, true, false, early, GRACE), None);
        assert_eq!(
            stop_end(true, false, false, GRACE, GRACE),
            Some(StopEnd::Lost)
        );
        // Nothing to lose: end at once.
        assert_eq!(
            stop_end(true, false, true, early, GRACE),
            Some(StopEnd::Checkpointed)
        );
    }
}
