//! The coordinator: membership, heartbeats, the plan of global batches, commits, and the final
//! model. It never touches tensors during a step: workers exchange those among themselves.
//!
//! One `State` behind a std mutex (never held across an await); every change bumps a `watch`
//! counter that blocked calls (join, next step) wait on with their deadline.
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

struct Member {
    worker_id: String,
    peer_address: String,
    last_seen: Instant,
}

#[derive(Default)]
struct State {
    members: Vec<Option<Member>>,
    committed: u64,
    commits: Vec<Option<CommitRequest>>,
    aborted: Option<String>,
    model_saved: bool,
    step_started: Option<Instant>,
}

impl State {
    fn joined(&self) -> usize {
        self.members.iter().filter(|m| m.is_some()).count()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished { steps: u64, model_dir: PathBuf },
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
    world: usize,
    fingerprint: String,
    model_dir: PathBuf,
    /// The checkpoint this run resumes from, if any.
    resume_from: Option<(PathBuf, CheckpointState)>,
    start_step: u64,
    data_fingerprint: String,
    log: Mutex<MetricsLog>,
    batches_log: Mutex<MetricsLog>,
    started: Instant,
    bar: ProgressBar,
}

type Shared = Arc<Coordinator>;

impl Coordinator {
    /// Loads data and model metadata and plans the run (no network yet).
    pub fn new(cfg: RunConfig, bar: ProgressBar) -> Result<Shared> {
        let out = &cfg.output.dir;
        let config_toml = prepare_output(&cfg)?;
        let metrics = out.join("metrics.jsonl");
        let mut log = if cfg.train.resume.is_some() {
            MetricsLog::append(&metrics)?
        } else {
            MetricsLog::create(&metrics)?
        };
        let data = load_training_data(&cfg, &mut log)?;
        let data_fingerprint = format!("{:016x}", data.fingerprint());
        let resume_from = match &cfg.train.resume {
            Some(which) => {
                let found = checkpoint::find(&out.join("checkpoints"), which)?;
                if let Some((path, state)) = &found {
                    checkpoint::check_compatible(path, state, &data_fingerprint, &cfg)?;
                    tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
                } else {
                    tracing::warn!("no checkpoint to resume from: starting from the beginning");
                }
                found
            }
            None => None,
        };
        let start_step = resume_from.as_ref().map_or(0, |(_, s)| s.step);
        if cfg.train.resume.is_some() {
            log.write(&json!({"event": "resume", "step": start_step}))?;
        }
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
        let world = cfg.cluster.workers;
        bar.set_length(plan.total_steps);
        bar.set_position(start_step);
        let state = State {
            members: (0..world).map(|_| None).collect(),
            commits: vec![None; world],
            committed: start_step,
            ..Default::default()
        };
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            config_toml,
            batches_log: Mutex::new(if cfg.train.resume.is_some() {
                MetricsLog::append(&out.join("batches.jsonl"))?
            } else {
                MetricsLog::create(&out.join("batches.jsonl"))?
            }),
            log: Mutex::new(log),
            data,
            plan,
            world,
            fingerprint,
            model_dir,
            resume_from,
            start_step,
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

    fn abort(&self, reason: String) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            tracing::error!(%reason, "aborting the run");
            st.aborted = Some(reason);
        }
        drop(st);
        self.notify();
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

    /// Declares workers dead when their heartbeats stop.
    async fn monitor(self: Shared) {
        let timeout = Duration::from_millis(self.cfg.cluster.heartbeat_timeout_ms);
        let step_timeout = Duration::from_millis(self.cfg.cluster.step_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.cfg.cluster.heartbeat_interval_ms,
        ));
        loop {
            tick.tick().await;
            let verdict = {
                let st = self.lock();
                if st.aborted.is_some() || st.model_saved {
                    return;
                }
                let now = Instant::now();
                let dead = st.members.iter().enumerate().find_map(|(rank, m)| {
                    let m = m.as_ref()?;
                    let silent = now.duration_since(m.last_seen);
                    (silent > timeout).then(|| {
                        format!(
                            "worker {rank} ({}) sent no heartbeat for {:.1} s: it died or stalled",
                            m.worker_id,
                            silent.as_secs_f64()
                        )
                    })
                });
                dead.or_else(|| {
                    st.step_started
                        .filter(|t| now.duration_since(*t) > step_timeout)
                        .map(|t| {
                            format!(
                                "step {} has run for {:.0} s, over cluster.step_timeout_ms",
                                st.committed + 1,
                                now.duration_since(t).as_secs_f64()
                            )
                        })
                })
            };
            if let Some(reason) = verdict {
                self.abort(reason);
                return;
            }
        }
    }

    /// Serves on `listener` until the run finishes (model saved) or aborts, or `shutdown` fires.
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
                    if st.aborted.is_some() || st.model_saved {
                        break;
                    }
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // Let workers read the final answer (DONE / ABORTED) before the server goes away.
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let stop = {
            let me = self.clone();
            async move {
                tokio::select! {
                    _ = ended => {}
                    _ = shutdown => me.abort("the coordinator was asked to stop".into()),
                }
            }
        };
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
                stop,
            )
            .await
            .map_err(|e| Error::Usage(format!("coordinator server failed: {e}")))?;
        self.bar.finish_and_clear();
        let st = self.lock();
        Ok(match &st.aborted {
            Some(reason) => Outcome::Aborted(reason.clone()),
            None => Outcome::Finished {
                steps: st.committed,
                model_dir: self.cfg.output.dir.join("model"),
            },
        })
    }

    fn shard(&self, rank: usize, step: u64) -> NextStepResponse {
        let (epoch, index) = self.plan.locate(step);
        let batch = self.plan.epoch(epoch).batch(index);
        let shard = batch
            .shard(rank, self.world)
            .expect("validated: batch_size divisible by workers");
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
            checkpoint: rank == 0 && self.checkpoint_due(step),
        }
    }

    /// Whether the state before `step` should be checkpointed (every N steps, not the resume point).
    fn checkpoint_due(&self, step: u64) -> bool {
        let every = self.cfg.output.checkpoint_every_steps;
        every > 0 && step > self.start_step && step.is_multiple_of(every)
    }

    fn record_batch(&self, step: u64) -> Result<()> {
        let (epoch, index) = self.plan.locate(step);
        let batch = self.plan.epoch(epoch).batch(index);
        let shards: Vec<Vec<Vec<String>>> = (0..self.world)
            .map(|r| {
                let s = batch.shard(r, self.world).expect("validated");
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
        let record = json!({
            "event": "step", "step": step + 1, "loss": loss, "lr": commits[0].lr, "grad_norm": commits[0].grad_norm,
            "pairs": pairs, "tokens": commits.iter().map(|c| c.tokens).sum::<u64>(), "seconds": seconds,
            "compute_seconds": compute, "comm_seconds": comm, "pairs_per_s": pairs as f64 / seconds.max(1e-9),
            "workers": self.world, "elapsed": self.started.elapsed().as_secs_f64(),
        });
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&record)
            .map_err(|e| e.to_string())?;
        self.record_batch(step).map_err(|e| e.to_string())?;
        self.bar.set_message(format!(
            "loss {loss:.4}  {:.1} pairs/s  comm {:.0}%",
            pairs as f64 / seconds.max(1e-9),
            100.0 * comm / seconds.max(1e-9)
        ));
        self.bar.inc(1);
        Ok(())
    }
}

struct Service(Shared);

fn rank_of(c: &Coordinator, rank: u32) -> std::result::Result<usize, Status> {
    let r = rank as usize;
    if r >= c.world {
        return Err(Status::invalid_argument(format!(
            "rank {rank} is outside a world of {}",
            c.world
        )));
    }
    Ok(r)
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinResponse>, Status> {
        let c = &self.0;
        let req = request.into_inner();
        if req.version != env!("CARGO_PKG_VERSION") {
            return Err(Status::failed_precondition(format!(
                "worker runs multipos {}, the coordinator {}",
                req.version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        if !req.model_fingerprint.is_empty() && req.model_fingerprint != c.fingerprint {
            return Err(Status::failed_precondition(format!(
                "the worker's model (fingerprint {}) differs from the coordinator's {} ({}): use the same model or let the worker fetch it",
                req.model_fingerprint,
                c.fingerprint,
                c.model_dir.display()
            )));
        }
        let rank = {
            let mut st = c.lock();
            if st.aborted.is_some() {
                return Err(Status::aborted(st.aborted.clone().unwrap_or_default()));
            }
            let wanted = if req.rank >= 0 {
                Some(req.rank as usize)
            } else {
                st.members.iter().position(Option::is_none)
            };
            let rank = match wanted {
                Some(r) if r < c.world && st.members[r].is_none() => r,
                Some(r) if r < c.world => {
                    return Err(Status::already_exists(format!(
                        "rank {r} has already joined"
                    )));
                }
                Some(r) => {
                    return Err(Status::invalid_argument(format!(
                        "rank {r} is outside a world of {}",
                        c.world
                    )));
                }
                None => {
                    return Err(Status::resource_exhausted(format!(
                        "the run already has its {} workers",
                        c.world
                    )));
                }
            };
            st.members[rank] = Some(Member {
                worker_id: req.worker_id.clone(),
                peer_address: req.peer_address.clone(),
                last_seen: Instant::now(),
            });
            rank
        };
        tracing::info!(rank, worker = %req.worker_id, peer = %req.peer_address, "worker joined");
        c.notify();
        let timeout = Duration::from_millis(c.cfg.cluster.join_timeout_ms);
        let peers = c
            .wait_for(timeout, "all workers to join", |st| {
                (st.joined() == c.world).then(|| {
                    st.members
                        .iter()
                        .map(|m| m.as_ref().expect("all joined").peer_address.clone())
                        .collect::<Vec<_>>()
                })
            })
            .await?;
        Ok(Response::new(JoinResponse {
            rank: rank as u32,
            world_size: c.world as u32,
            peers,
            config_toml: c.config_toml.clone(),
            model_fingerprint: c.fingerprint.clone(),
            total_steps: c.plan.total_steps,
            heartbeat_interval_ms: c.cfg.cluster.heartbeat_interval_ms,
            start_step: c.start_step,
            resume: c.resume_from.is_some(),
            data_fingerprint: c.data_fingerprint.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        let c = &self.0;
        let rank = rank_of(c, request.into_inner().rank)?;
        let mut st = c.lock();
        if let Some(m) = st.members[rank].as_mut() {
            m.last_seen = Instant::now();
        }
        Ok(Response::new(HeartbeatResponse {
            keep_going: st.aborted.is_none() && !st.model_saved,
            reason: st.aborted.clone().unwrap_or_default(),
        }))
    }

    async fn next_step(
        &self,
        request: Request<NextStepRequest>,
    ) -> std::result::Result<Response<NextStepResponse>, Status> {
        let c = self.0.clone();
        let req = request.into_inner();
        let rank = rank_of(&c, req.rank)?;
        let timeout = Duration::from_millis(c.cfg.cluster.step_timeout_ms);
        let ready = c
            .wait_for(timeout, "the previous step to be committed", |st| {
                (st.committed >= req.step).then_some(st.committed)
            })
            .await;
        let committed = match ready {
            Ok(v) => v,
            Err(status) if status.code() == tonic::Code::Aborted => {
                return Ok(Response::new(NextStepResponse {
                    status: StepStatus::Aborted as i32,
                    reason: status.message().into(),
                    ..Default::default()
                }));
            }
            Err(status) => return Err(status),
        };
        if committed != req.step {
            return Err(Status::failed_precondition(format!(
                "step {} was already committed (now at {committed})",
                req.step
            )));
        }
        if req.step >= c.plan.total_steps {
            return Ok(Response::new(NextStepResponse {
                status: StepStatus::Done as i32,
                step: req.step,
                ..Default::default()
            }));
        }
        c.lock().step_started.get_or_insert_with(Instant::now);
        Ok(Response::new(c.shard(rank, req.step)))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> std::result::Result<Response<CommitResponse>, Status> {
        let c = self.0.clone();
        let req = request.into_inner();
        let rank = rank_of(&c, req.rank)?;
        let step = req.step;
        let complete = {
            let mut st = c.lock();
            if let Some(reason) = &st.aborted {
                return Err(Status::aborted(reason.clone()));
            }
            if step != st.committed {
                return Err(Status::failed_precondition(format!(
                    "commit for step {step}, but step {} is open",
                    st.committed
                )));
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
                Some(commits)
            } else {
                None
            }
        };
        if let Some(commits) = complete {
            if let Err(reason) = c.finish_step(step, commits) {
                c.abort(reason.clone());
                return Err(Status::aborted(reason));
            }
            c.notify();
        }
        Ok(Response::new(CommitResponse {}))
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<UploadCheckpointResponse>, Status> {
        let c = self.0.clone();
        let dir = c.cfg.output.dir.join("checkpoints");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
        let incoming = dir.join(format!(".multipos-incoming-{}", std::process::id()));
        let start = Instant::now();
        receive_files(request.into_inner(), &incoming)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (path, state) = checkpoint::adopt(&dir, &incoming, c.cfg.output.keep_checkpoints)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), step = state.step, seconds = format!("{seconds:.2}"), "checkpoint written");
        c.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&json!({"event": "checkpoint", "step": state.step, "path": path, "seconds": seconds}))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(UploadCheckpointResponse {
            saved_to: path.display().to_string(),
        }))
    }

    type FetchCheckpointStream =
        Pin<Box<dyn Stream<Item = std::result::Result<FileChunk, Status>> + Send>>;

    async fn fetch_checkpoint(
        &self,
        _request: Request<FetchCheckpointRequest>,
    ) -> std::result::Result<Response<Self::FetchCheckpointStream>, Status> {
        let Some((path, _)) = &self.0.resume_from else {
            return Err(Status::failed_precondition(
                "this run does not resume from a checkpoint",
            ));
        };
        let chunks = file_chunks(path).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    type FetchModelStream =
        Pin<Box<dyn Stream<Item = std::result::Result<FileChunk, Status>> + Send>>;

    async fn fetch_model(
        &self,
        _request: Request<FetchModelRequest>,
    ) -> std::result::Result<Response<Self::FetchModelStream>, Status> {
        let chunks = file_chunks(&self.0.model_dir).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
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
        c.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&json!({"event": "done", "steps": c.plan.total_steps, "seconds": c.started.elapsed().as_secs_f64(), "model_dir": target}))
            .map_err(|e| Status::internal(e.to_string()))?;
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
