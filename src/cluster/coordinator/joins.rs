//! `Join` and `Heartbeat`: a worker asks to be a member, waits for a ring that takes it, and keeps
//! its membership alive. Who forms the ring from the workers waiting is `membership`'s decision.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::callers::{Caller, caller_refused_busy, check_identity, check_member};
use super::membership::{Formation, Member};
use super::{Coordinator, Shared};
use crate::pb::*;

impl Coordinator {
    /// Answers `Join`: checks the worker, enlists it, and waits until a ring takes it.
    pub(super) async fn join(
        self: &Shared,
        caller: &Caller,
        certificate: Option<&str>,
        req: &JoinRequest,
    ) -> Result<JoinResponse, Status> {
        check_identity(caller, certificate, &req.worker_id)?;
        let state_step = self.admit(req)?;
        let id = self.enlist(caller, req, state_step)?;
        tracing::info!(worker = %req.worker_id, peer = %req.peer_address, state_step, reason = %req.reason, "worker joins");
        self.notify();
        // A caller that gives up (deadline, crash) while waiting must not stay a candidate: a
        // ghost would take a rank in the next ring and never send a heartbeat.
        let _ghost = Candidacy {
            coordinator: self.clone(),
            id,
        };
        let formation = self.await_formation(id).await?;
        Ok(self.joined(&formation, id))
    }

    /// Checks a joining worker against the run; returns its usable state step.
    fn admit(&self, req: &JoinRequest) -> Result<u64, Status> {
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

    /// Makes the worker a candidate for the next ring (ending the live one when the worker is its
    /// member, re-joining): its member id.
    fn enlist(&self, caller: &Caller, req: &JoinRequest, state_step: u64) -> Result<u64, Status> {
        let mut st = self.lock();
        if let Some(reason) = st.phase.aborted() {
            return Err(Status::aborted(reason));
        }
        // While a stop waits for a ring to write its checkpoint, workers may still join it.
        if !st.phase.admits_joins() {
            return Err(Status::aborted("the run is ending"));
        }
        // A member of the running ring joining again has left its step: the ring is broken.
        if let Some(rank) = st.ring.iter().position(|m| m.worker_id == req.worker_id) {
            let why = if req.reason.is_empty() {
                "joined again"
            } else {
                &req.reason
            };
            self.end_generation(&mut st, format!("worker {rank} left the ring: {why}"));
        }
        st.candidates.retain(|m| m.worker_id != req.worker_id);
        if st.candidates.len() >= self.max_candidates() {
            return Err(caller_refused_busy(caller, st.candidates.len()));
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
        if !st.phase.forming() {
            let now = st.ring.len();
            if self
                .ring_size(now + st.candidates.len())
                .is_some_and(|k| k > now)
            {
                st.grow = true;
            }
        }
        self.try_form(&mut st);
        Ok(id)
    }

    /// Waits until a ring takes candidate `id`: its formation.
    async fn await_formation(&self, id: u64) -> Result<Arc<Formation>, Status> {
        let timeout = Duration::from_millis(self.cfg.cluster.join_timeout_ms);
        self.wait_for(timeout, "a ring to form", |st| {
            let f = st.formation.clone().filter(|f| f.members.contains(&id));
            match f {
                Some(f) if !st.ended(f.generation) => Some(Ok(f)),
                Some(_) => Some(Err(Status::unavailable(
                    "the ring broke up before this worker started: join again",
                ))),
                None if !st.candidates.iter().any(|m| m.id == id) => {
                    Some(Err(Status::resource_exhausted(format!(
                        "the run already has its {} workers",
                        self.cfg.cluster.workers
                    ))))
                }
                None => None,
            }
        })
        .await?
    }

    /// What member `id` of `formation` learns: its rank, peers, keys, and the run.
    fn joined(&self, formation: &Formation, id: u64) -> JoinResponse {
        let rank = formation
            .members
            .iter()
            .position(|m| *m == id)
            .expect("member of the formation");
        let data = self.data();
        JoinResponse {
            rank: rank as u32,
            world_size: formation.members.len() as u32,
            peers: formation.peers.clone(),
            config_toml: self.config_toml.clone(),
            model_fingerprint: self.fingerprint.clone(),
            total_steps: data.training.plan.total_steps,
            heartbeat_interval_ms: self.cfg.cluster.heartbeat_interval_ms,
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
            store_port: self.store_port().map_or(0, u32::from),
            store_prefix: self.store_port().map_or(String::new(), |_| {
                format!("multipos/{}/", formation.generation)
            }),
        }
    }

    /// Answers `Heartbeat` from member `id`: only the member itself keeps itself alive, so a
    /// forged heartbeat cannot hide a dead one.
    pub(super) fn heartbeat(&self, caller: &Caller, id: u64) -> Result<HeartbeatResponse, Status> {
        let mut st = self.lock();
        let rank = st.ring.iter().position(|m| m.id == id);
        let in_ring = match rank {
            Some(r) if !st.phase.forming() => {
                let generation = st.generation;
                check_member(&st, generation, r as u32, caller)?;
                st.ring[r].last_seen = Instant::now();
                true
            }
            _ => false,
        };
        Ok(HeartbeatResponse {
            keep_going: !st.phase.over(),
            reason: st.phase.aborted().unwrap_or_default().into(),
            generation: st.generation,
            rejoin: !in_ring,
        })
    }
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
