//! The coordinator's RPCs: thin handlers over the state and decisions in the parent module.
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use std::net::IpAddr;

use super::{Coordinator, EvalWork, Member, Next, Shared, State, Stop};
use crate::cluster::files::{file_stream, receive_files};
use crate::net::auth::{Identity, MEMBER_HEADER, MemberClaim, log_refusal, name_allows};
use crate::pb::coordinator_server::Coordinator as CoordinatorRpc;
use crate::pb::next_step_response::Status as StepStatus;
use crate::pb::*;
use crate::train::checkpoint;
use crate::train::nonfinite::{Fate, verdict};
use crate::train::policy::RunPolicy;

/// The gRPC face of the coordinator.
pub(super) struct Service(pub(super) Shared);

/// Who is calling: the address it calls from, the identity its secret proved, and its claim to be
/// a ring member, if it makes one.
struct Caller {
    from: Option<IpAddr>,
    identity: Option<Identity>,
    claim: Option<MemberClaim>,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Self {
        Self {
            from: request.remote_addr().map(|a| a.ip()),
            identity: Identity::of(request).cloned(),
            claim: MemberClaim::of(request),
        }
    }

    /// A refusal, logged once a window per cause and address: a caller with a secret that speaks
    /// for someone else is hostile or lost.
    fn refused(&self, cause: &'static str, detail: String) -> Status {
        log_refusal(cause, self.from, &detail);
        Status::permission_denied(detail)
    }
}

/// The rank `rank` of the live generation `generation`, which the caller must prove to hold: its
/// claim names the member at that rank and presents that member's ring key. A secret alone lets a
/// worker join; only a member speaks for a rank.
fn check_member(
    st: &State,
    generation: u64,
    rank: u32,
    caller: &Caller,
) -> std::result::Result<usize, Status> {
    let r = rank as usize;
    let key = st
        .formation
        .as_ref()
        .filter(|f| f.generation == generation)
        .and_then(|f| f.keys.get(r));
    match (&caller.claim, st.ring.get(r), key) {
        (Some(claim), Some(member), Some(key)) if claim.proves(member.id, key) => Ok(r),
        (None, _, _) => Err(caller.refused(
            "not a member",
            format!("{MEMBER_HEADER} is missing: not a member of the ring"),
        )),
        _ => Err(caller.refused(
            "not the rank it speaks for",
            format!("the caller is not rank {rank} of generation {generation}"),
        )),
    }
}

/// Some member of the ring being formed or live, as its claim proves (fetches of the model and of
/// checkpoints come between `Join` and the first step).
fn check_any_member(st: &State, caller: &Caller) -> std::result::Result<(), Status> {
    let claim = caller.claim.as_ref().ok_or_else(|| {
        caller.refused(
            "not a member",
            format!("{MEMBER_HEADER} is missing: not a member"),
        )
    })?;
    let proven = st.formation.as_ref().is_some_and(|f| {
        st.ring
            .iter()
            .zip(&f.keys)
            .any(|(m, key)| claim.proves(m.id, key))
    });
    if proven {
        Ok(())
    } else {
        Err(caller.refused(
            "not a member",
            format!("member {} is not in the ring", claim.id),
        ))
    }
}

/// The worker name the caller proved (its TLS client certificate's, or its credential's), which
/// the worker id it joins with must carry: a worker can join only as itself, so no one ends the
/// ring by joining under a live member's id.
fn check_identity(
    caller: &Caller,
    certificate: Option<&str>,
    worker_id: &str,
) -> std::result::Result<(), Status> {
    let names: Vec<&str> = certificate
        .into_iter()
        .chain(match &caller.identity {
            Some(Identity::Worker(name)) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(caller.refused(
            "join without a worker identity",
            "a worker joins with its own credential (`multipos credential NAME`, or the cluster \
             token on the worker) or a client certificate"
                .into(),
        ));
    }
    match names.iter().find(|n| !name_allows(n, worker_id)) {
        Some(name) => Err(caller.refused(
            "join under another worker's id",
            format!("worker {name:?} cannot join as {worker_id:?} (ids of {name:?} read {name} or {name}:...)"),
        )),
        None => Ok(()),
    }
}

/// An upload that could not be taken; one past its cap is logged as a refusal.
fn upload_refused(caller: &Caller, e: crate::Error) -> Status {
    match e {
        crate::Error::TooLarge(why) => {
            log_refusal("an upload past its cap", caller.from, &why);
            Status::resource_exhausted(why)
        }
        crate::Error::Protocol(why) => {
            log_refusal("a malformed upload", caller.from, &why);
            Status::invalid_argument(why)
        }
        other => Status::invalid_argument(other.to_string()),
    }
}

/// Joins waiting beyond the cap: retryable (a worker backs off and tries again).
fn caller_refused_busy(caller: &Caller, waiting: usize) -> Status {
    log_refusal("too many joins waiting", caller.from, &waiting.to_string());
    Status::resource_exhausted(format!(
        "{waiting} workers already wait to join: try again later"
    ))
}

/// A worker waiting in `Join`; when the call ends without a ring (dropped, timed out), the
/// candidate is withdrawn. Once a ring took it, it is no longer a candidate and nothing changes.
struct Candidacy {
    coordinator: Shared,
    id: u64,
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        let mut st = self.coordinator.lock();
        let before = st.candidates.len();
        st.candidates.retain(|m| m.id != self.id);
        let withdrawn = st.candidates.len() < before;
        drop(st);
        if withdrawn {
            tracing::info!(
                member = self.id,
                "a joining worker gave up waiting; withdrawn"
            );
            self.coordinator.notify();
        }
    }
}

/// A stream of file chunks, as the transfer calls return it.
type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<FileChunk, Status>> + Send>>;

fn transfer_stream(dir: &std::path::Path) -> std::result::Result<ChunkStream, Status> {
    use tokio_stream::StreamExt;
    let chunks = file_stream(dir).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Box::pin(
        chunks.map(|c| c.map_err(|e| Status::internal(e.to_string()))),
    ))
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinResponse>, Status> {
        let c = self.0.clone();
        let caller = Caller::of(&request);
        let certificate = crate::net::tls::peer_name(&request);
        let req = request.into_inner();
        check_identity(&caller, certificate.as_deref(), &req.worker_id)?;
        let state_step = c.admit(&req)?;
        let id = {
            let mut st = c.lock();
            if let Some(reason) = &st.aborted {
                return Err(Status::aborted(reason.clone()));
            }
            // While a stop waits for a ring to write its checkpoint, workers may still join it.
            if st.stop == Stop::Done
                || (st.stop == Stop::Requested && !st.forming)
                || st.model_saved
            {
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
            if st.candidates.len() >= c.max_candidates() {
                return Err(caller_refused_busy(&caller, st.candidates.len()));
            }
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
        // A caller that gives up (deadline, crash) while waiting must not stay a candidate: a
        // ghost would take a rank in the next ring and never send a heartbeat.
        let _ghost = Candidacy {
            coordinator: c.clone(),
            id,
        };
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
        let data = c.data();
        Ok(Response::new(JoinResponse {
            rank: rank as u32,
            world_size: formation.members.len() as u32,
            peers: formation.peers.clone(),
            config_toml: c.config_toml.clone(),
            model_fingerprint: c.fingerprint.clone(),
            total_steps: data.training.plan.total_steps,
            heartbeat_interval_ms: c.cfg.cluster.heartbeat_interval_ms,
            start_step: formation.start_step,
            heal: formation.heal[rank],
            data_fingerprint: data.training.fingerprint.clone(),
            generation: formation.generation,
            member: id,
            serve_state: formation.donor == Some(rank),
            heal_from: match formation.donor {
                Some(donor) if formation.heal[rank] => formation.peers[donor].clone(),
                _ => String::new(),
            },
            tasks: data
                .training
                .tasks()
                .iter()
                .map(|t| TaskInfo {
                    name: t.name.clone(),
                    labels: t.spec().labels,
                })
                .collect(),
            ring_key: formation.keys[rank].clone(),
            left_key: formation.keys[crate::cluster::ring::steps::left(rank, formation.keys.len())]
                .clone(),
            generation_key: formation.generation_key.clone(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> std::result::Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        let c = &self.0;
        let caller = Caller::of(&request);
        let id = request.into_inner().member;
        let mut st = c.lock();
        // Only the member itself keeps itself alive: a forged heartbeat must not hide a dead one.
        let rank = st.ring.iter().position(|m| m.id == id);
        let in_ring = match rank {
            Some(r) if !st.forming => {
                let generation = st.generation;
                check_member(&st, generation, r as u32, &caller)?;
                st.ring[r].last_seen = Instant::now();
                true
            }
            _ => false,
        };
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
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let answer = |status: StepStatus, reason: String| NextStepResponse {
            status: status as i32,
            step: req.step,
            reason,
            ..Default::default()
        };
        // Membership first: a caller that is not this rank waits for nothing.
        {
            let st = c.lock();
            if !st.ended(req.generation) {
                check_member(&st, req.generation, req.rank, &caller)?;
            }
        }
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
        // Validation due before this step comes first: a page to embed, or a wait for the others.
        loop {
            let wait = {
                let mut st = c.lock();
                if st.ended(req.generation) {
                    break;
                }
                let rank = check_member(&st, req.generation, req.rank, &caller)?;
                // A stop skips validation (a resumed run makes it up); a wrong step is answered below.
                if (st.stop != Stop::Running && req.step < st.end) || committed != req.step {
                    break;
                }
                let work = c
                    .mine_work(&mut st, rank, req.generation, req.step)
                    .or_else(|| c.eval_work(&mut st, rank, req.generation, req.step));
                match work {
                    None => break,
                    Some(EvalWork::Page(range)) => {
                        return Ok(Response::new(c.eval_page(req.step, range)));
                    }
                    Some(EvalWork::MinePage(range)) => {
                        return Ok(Response::new(c.mine_page(req.step, range, st.mine_pending)));
                    }
                    Some(EvalWork::Wait) => (req.step, req.generation, false),
                    Some(EvalWork::MineWait) => (req.step, req.generation, true),
                }
            };
            let (step, generation, mining) = wait;
            let what = if mining {
                "the hard-negative mining to finish"
            } else {
                "the validation to finish"
            };
            c.wait_for(timeout, what, |st| {
                let done = if mining {
                    st.mine_round
                        .as_ref()
                        .is_none_or(|r| r.step != step || r.has_open(generation))
                } else {
                    st.eval.as_ref().is_some_and(|r| r.has_open(generation))
                        || st.tracker.as_ref().and_then(|t| t.last) >= Some(step)
                };
                (st.ended(generation) || done).then_some(())
            })
            .await?;
        }
        // Rank 0 checkpoints a stop before the others are told: a member told to stop leaves, and
        // a rank 0 of a new ring still connecting to it would fail.
        let wait_for_rank_0 = {
            let st = c.lock();
            st.stop != Stop::Running
                && !st.shards_out
                && committed == req.step
                && !st.ended(req.generation)
                && !st.latest_is(req.step)
                && !st.mine_pending
                && check_member(&st, req.generation, req.rank, &caller).is_ok_and(|rank| rank != 0)
        };
        if wait_for_rank_0 {
            let (step, generation) = (req.step, req.generation);
            c.wait_for(timeout, "rank 0 to checkpoint the stop", |st| {
                (st.latest_is(step) || st.ended(generation) || st.stop == Stop::Done).then_some(())
            })
            .await?;
        }
        let mut st = c.lock();
        if st.ended(req.generation) {
            return Ok(Response::new(answer(
                StepStatus::Rejoin,
                format!("generation {} ended", req.generation),
            )));
        }
        let rank = check_member(&st, req.generation, req.rank, &caller)?;
        let facts = StepFacts {
            step: req.step,
            committed,
            end: st.end,
            rank,
            start: st.formation.as_ref().map_or(0, |f| f.start_step),
            stopping: st.stop != Stop::Running,
            shards_out: st.shards_out,
            grow: st.grow,
            checkpointed: st.latest_is(req.step),
            mine_pending: st.mine_pending,
            best_here: Coordinator::best_step(&st) == Some(req.step),
        };
        let decided = step_answer(&facts, &c.policy);
        if let StepAnswer::Done { checkpoint: true }
        | StepAnswer::Stop { checkpoint: true }
        | StepAnswer::Shard { checkpoint: true } = decided
        {
            st.checkpoint_asked = Some(req.step);
        }
        let reply = match decided {
            StepAnswer::Behind => answer(
                StepStatus::Rejoin,
                format!(
                    "asked for step {}, but the run is at step {committed}",
                    req.step + 1
                ),
            ),
            StepAnswer::Done { checkpoint } => NextStepResponse {
                checkpoint,
                ..answer(StepStatus::Done, String::new())
            },
            StepAnswer::Stop { checkpoint } => {
                if let Some(told) = st.stop_told.get_mut(rank) {
                    *told = true;
                }
                c.settle_stop(&mut st);
                drop(st);
                c.notify();
                NextStepResponse {
                    checkpoint,
                    ..answer(StepStatus::Stop, "the coordinator was asked to stop".into())
                }
            }
            StepAnswer::Grow => {
                c.end_generation(&mut st, "a worker waits to join: growing the ring".into());
                drop(st);
                c.notify();
                answer(StepStatus::Rejoin, "growing the ring".into())
            }
            StepAnswer::Shard { checkpoint } => {
                st.step_started.get_or_insert_with(Instant::now);
                st.shards_out = true;
                let world = st.ring.len();
                drop(st);
                c.shard(rank, world, req.step, checkpoint)
            }
        };
        Ok(Response::new(reply))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> std::result::Result<Response<CommitResponse>, Status> {
        let c = self.0.clone();
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let (step, generation) = (req.step, req.generation);
        let discard = |reason: String| {
            Ok(Response::new(CommitResponse {
                apply: false,
                reason,
                skip: false,
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
            let rank = check_member(&st, generation, req.rank, &caller)?;
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
                let losses: Vec<f64> = commits.iter().map(|c| c.loss).collect();
                let norms: Vec<f64> = commits.iter().map(|c| c.grad_norm).collect();
                let fate = verdict(
                    c.cfg.train.on_nonfinite,
                    st.skipped_in_a_row,
                    step,
                    &losses,
                    &norms,
                );
                if let Fate::Abort(reason) = fate {
                    drop(st);
                    c.abort(reason.clone());
                    return Err(Status::aborted(reason));
                }
                st.committed += 1;
                st.step_started = None;
                st.shards_out = false;
                c.stop_if_budget_spent(&mut st);
                if let Fate::Skip(_) = fate {
                    st.skipped_in_a_row += 1;
                    st.last_skipped = Some(step);
                } else {
                    st.skipped_in_a_row = 0;
                }
                Some((commits, st.broken_since.take(), fate))
            } else {
                None
            }
        };
        if let Some((commits, broken_since, fate)) = decided {
            // Its own task: a cancelled call must not leave the step committed but never logged.
            tokio::spawn(
                c.clone()
                    .log_step(step, generation, commits, broken_since, fate),
            );
        }
        let timeout = Duration::from_millis(c.cfg.cluster.step_timeout_ms);
        let decided = c
            .wait_for(timeout, "every worker to report the step", |st| {
                if st.logged > step {
                    Some(Some(st.last_skipped == Some(step)))
                } else {
                    (st.committed <= step && st.ended(generation)).then_some(None)
                }
            })
            .await?;
        if let Some(skip) = decided {
            Ok(Response::new(CommitResponse {
                apply: !skip,
                reason: String::new(),
                skip,
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
        // Only rank 0 of the live ring, and only the checkpoint it was asked for.
        let caller = Caller::of(&request);
        let asked = {
            let st = c.lock();
            if st.forming {
                return Err(caller.refused(
                    "not a member",
                    "no live ring: checkpoints come from its rank 0".into(),
                ));
            }
            check_member(&st, st.generation, 0, &caller)?;
            st.checkpoint_asked
                .ok_or_else(|| Status::failed_precondition("no checkpoint was asked for"))?
        };
        let dir = c.cfg.output.dir.join("checkpoints");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
        let incoming = tempfile::Builder::new()
            .prefix(checkpoint::INCOMING)
            .tempdir_in(&dir)
            .map_err(|e| {
                Status::internal(format!("create a directory in {}: {e}", dir.display()))
            })?;
        let received = incoming.path().join("checkpoint");
        let start = Instant::now();
        receive_files(request.into_inner(), &received, c.upload_caps.checkpoint)
            .await
            .map_err(|e| upload_refused(&caller, e))?;
        // Hashing and moving a checkpoint of hundreds of MB is blocking work: off the async threads.
        let me = c.clone();
        let (path, state) = tokio::task::spawn_blocking(move || me.adopt_upload(&received, asked))
            .await
            .map_err(|e| Status::internal(format!("adopting the checkpoint: {e}")))??;
        drop(incoming);
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), step = state.step, seconds = format!("{seconds:.2}"), "checkpoint written");
        c.write_log(
            json!({"event": "checkpoint", "step": state.step, "path": path, "seconds": seconds}),
        );
        {
            let mut st = c.lock();
            if st.checkpoint_asked == Some(state.step) {
                st.checkpoint_asked = None;
            }
            st.latest = Some((path.clone(), state));
            c.settle_stop(&mut st);
        }
        c.notify();
        Ok(Response::new(UploadCheckpointResponse {
            saved_to: path.display().to_string(),
        }))
    }

    async fn report_eval(
        &self,
        request: Request<EvalReport>,
    ) -> std::result::Result<Response<EvalReportResponse>, Status> {
        let c = self.0.clone();
        let caller = Caller::of(&request);
        let req = request.into_inner();
        if !req.embeddings.len().is_multiple_of(4) {
            return Err(Status::invalid_argument(
                "embeddings must be whole little-endian f32 values",
            ));
        }
        let values: Vec<f32> = req
            .embeddings
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let complete = {
            let mut st = c.lock();
            if st.ended(req.generation) {
                // The page goes out again in the next generation; this worker learns to re-join.
                return Ok(Response::new(EvalReportResponse {}));
            }
            let rank = check_member(&st, req.generation, req.rank, &caller)?;
            let round = if req.mine {
                st.mine_round.as_mut().filter(|r| r.step == req.step)
            } else {
                st.eval.as_mut().filter(|r| r.step == req.step)
            };
            let round = round.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no {} is open before step {}",
                    if req.mine { "mining" } else { "validation" },
                    req.step + 1
                ))
            })?;
            round
                .deliver(
                    rank,
                    req.generation,
                    req.offset,
                    req.count as usize,
                    req.dim as usize,
                    values,
                )
                .map_err(Status::invalid_argument)?;
            let all = round.embeddings();
            let started = st.mine_started.unwrap_or_else(Instant::now);
            let busy = if req.mine {
                &mut st.mining
            } else {
                &mut st.scoring
            };
            if all.is_some() && !*busy {
                *busy = true;
                // Scoring or mining is the coordinator's work, not a stalled worker's.
                st.step_started = None;
                all.map(|(values, dim)| (values, dim, started))
            } else {
                None
            }
        };
        if let Some((values, dim, started)) = complete {
            if req.mine {
                tokio::spawn(c.clone().finish_mining(req.step, values, dim, started));
            } else {
                tokio::spawn(c.clone().score(req.step, values, dim));
            }
        }
        c.notify();
        Ok(Response::new(EvalReportResponse {}))
    }

    type FetchCheckpointStream = ChunkStream;

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> std::result::Result<Response<Self::FetchCheckpointStream>, Status> {
        let c = self.0.clone();
        check_any_member(&c.lock(), &Caller::of(&request))?;
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
        request: Request<FetchModelRequest>,
    ) -> std::result::Result<Response<Self::FetchModelStream>, Status> {
        check_any_member(&self.0.lock(), &Caller::of(&request))?;
        Ok(Response::new(transfer_stream(&self.0.model_dir)?))
    }

    async fn upload_model(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<UploadModelResponse>, Status> {
        let c = self.0.clone();
        let caller = Caller::of(&request);
        {
            let st = c.lock();
            check_member(&st, st.generation, 0, &caller)?;
            if st.committed < st.end {
                return Err(Status::failed_precondition("the run is not finished"));
            }
            if st.model_saved {
                return Err(Status::already_exists("the model was already uploaded"));
            }
        }
        let target = c.cfg.output.dir.join("model");
        receive_files(request.into_inner(), &target, c.upload_caps.model)
            .await
            .map_err(|e| upload_refused(&caller, e))?;
        let (latest, steps) = {
            let st = c.lock();
            (st.latest.clone(), st.committed)
        };
        let ema = if c.policy.final_outputs().ema {
            let ema = latest
                .filter(|(_, s)| s.step == steps)
                .map(|(p, _)| p.join("model-ema"))
                .ok_or_else(|| {
                    Status::failed_precondition("the final checkpoint (with model-ema/) is missing")
                })?;
            Some(ema)
        } else {
            None
        };
        // Copying model directories is blocking work: off the async threads.
        let me = c.clone();
        let model = target.clone();
        tokio::task::spawn_blocking(move || me.install_extra_models(ema, &model))
            .await
            .map_err(|e| Status::internal(format!("saving the model: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(model = %target.display(), steps, "run finished; model saved");
        c.write_log(json!({"event": "done", "steps": steps, "seconds": c.started.elapsed().as_secs_f64(), "model_dir": target}));
        if let Err(e) = c.journal.flushed().await {
            tracing::error!(error = %e, "the run's end is missing from the metrics log");
        }
        c.lock().model_saved = true;
        c.notify();
        Ok(Response::new(UploadModelResponse {
            saved_to: target.display().to_string(),
        }))
    }
}

/// What `NextStep` knows once the step before is committed and any validation is done: the
/// facts its answer depends on, read from the state under its lock.
#[derive(Debug, Clone, Copy)]
struct StepFacts {
    /// The step asked for (steps done before it).
    step: u64,
    /// Steps the run has committed.
    committed: u64,
    /// The step the run ends at.
    end: u64,
    /// The caller's rank in the live ring.
    rank: usize,
    /// The step the live ring started at.
    start: u64,
    /// A stop was asked for.
    stopping: bool,
    /// Some member was already handed this step's shard.
    shards_out: bool,
    /// A worker waits to join: the ring should grow.
    grow: bool,
    /// A checkpoint of this step exists.
    checkpointed: bool,
    /// `train.mine` has not finished: no step ran on the run's data yet.
    mine_pending: bool,
    /// This step is the best evaluation's.
    best_here: bool,
}

/// `NextStep`'s answer; `checkpoint` asks rank 0 to checkpoint the state before the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepAnswer {
    /// The caller asked for another step than the run is at.
    Behind,
    /// The run is over.
    Done { checkpoint: bool },
    /// A stop takes effect here.
    Stop { checkpoint: bool },
    /// End the generation so the waiting worker joins.
    Grow,
    /// Train the step: the caller's shard.
    Shard { checkpoint: bool },
}

/// The pure decision of `NextStep`. Rank 0 checkpoints the state before a step when one is due
/// (the policy's period, the end of a checkpointed or averaged run, a stop) or the step is the
/// best evaluation's, unless one exists already or no step has run on the run's data yet. A
/// stop takes effect at the first step no member was handed yet, so a step handed out is
/// finished by every member first.
fn step_answer(f: &StepFacts, policy: &RunPolicy) -> StepAnswer {
    let checkpoint =
        |due: bool| f.rank == 0 && (due || f.best_here) && !f.checkpointed && !f.mine_pending;
    if f.committed != f.step {
        StepAnswer::Behind
    } else if f.step >= f.end {
        StepAnswer::Done {
            checkpoint: checkpoint(policy.checkpoint_at_end()),
        }
    } else if f.stopping && !f.shards_out {
        StepAnswer::Stop {
            checkpoint: checkpoint(true),
        }
    } else if f.grow {
        StepAnswer::Grow
    } else {
        StepAnswer::Shard {
            checkpoint: checkpoint(f.step > f.start && policy.checkpoint_due(f.step)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy checkpointing every `every` steps (with a moving average when `ema`).
    fn policy(every: u64, ema: bool) -> RunPolicy {
        let mut text = format!("[output]\ndir = \"out\"\ncheckpoint_every_steps = {every}\n");
        if ema {
            text.push_str("[train]\nema_decay = 0.999\n");
        }
        RunPolicy::new(&toml::from_str(&text).unwrap())
    }

    /// Rank 0 asking for step 4 of a 10-step run on a ring started at step 0, nothing pending.
    fn at(step: u64) -> StepFacts {
        StepFacts {
            step,
            committed: step,
            end: 10,
            rank: 0,
            start: 0,
            stopping: false,
            shards_out: false,
            grow: false,
            checkpointed: false,
            mine_pending: false,
            best_here: false,
        }
    }

    #[test]
    fn next_step_answers_every_case() {
        use StepAnswer::*;
        let p = policy(2, false);
        let table: Vec<(&str, StepFacts, RunPolicy, StepAnswer)> = vec![
            (
                "a step off the period",
                at(3),
                p,
                Shard { checkpoint: false },
            ),
            ("a step on the period", at(4), p, Shard { checkpoint: true }),
            (
                "only rank 0 checkpoints",
                StepFacts { rank: 1, ..at(4) },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not twice",
                StepFacts {
                    checkpointed: true,
                    ..at(4)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not the ring's first step",
                StepFacts { start: 4, ..at(4) },
                p,
                Shard { checkpoint: false },
            ),
            (
                "not before train.mine is done",
                StepFacts {
                    mine_pending: true,
                    ..at(4)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "the best evaluation's step",
                StepFacts {
                    best_here: true,
                    ..at(3)
                },
                p,
                Shard { checkpoint: true },
            ),
            (
                "a caller behind the run",
                StepFacts {
                    committed: 5,
                    ..at(4)
                },
                p,
                Behind,
            ),
            (
                "the end of a checkpointed run",
                at(10),
                p,
                Done { checkpoint: true },
            ),
            (
                "the end without checkpoints",
                at(10),
                policy(0, false),
                Done { checkpoint: false },
            ),
            (
                "the end of an averaged run",
                at(10),
                policy(0, true),
                Done { checkpoint: true },
            ),
            (
                "a stop before any shard",
                StepFacts {
                    stopping: true,
                    ..at(3)
                },
                policy(0, false),
                Stop { checkpoint: true },
            ),
            // The race already found: a stop after the step was handed out lets it finish first.
            (
                "a stop after a shard went out",
                StepFacts {
                    stopping: true,
                    shards_out: true,
                    ..at(3)
                },
                p,
                Shard { checkpoint: false },
            ),
            (
                "a stop at the end is the end",
                StepFacts {
                    stopping: true,
                    ..at(10)
                },
                p,
                Done { checkpoint: true },
            ),
            (
                "a joiner waiting",
                StepFacts {
                    grow: true,
                    ..at(3)
                },
                p,
                Grow,
            ),
            (
                "a stop wins over growing",
                StepFacts {
                    grow: true,
                    stopping: true,
                    ..at(3)
                },
                p,
                Stop { checkpoint: true },
            ),
            (
                "a joiner waiting, a shard out",
                StepFacts {
                    grow: true,
                    shards_out: true,
                    ..at(3)
                },
                p,
                Grow,
            ),
        ];
        for (case, facts, policy, want) in table {
            assert_eq!(step_answer(&facts, &policy), want, "{case}");
        }
    }
}
