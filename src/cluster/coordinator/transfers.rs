//! Files between the coordinator and its members: the checkpoints and the final model rank 0
//! uploads when asked, and the checkpoint and the model a joining worker fetches. Every upload is
//! capped and checked before it is put in place; nothing half-received is ever in place.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tonic::{Status, Streaming};

use super::callers::{Caller, check_member, upload_refused};
use super::phase::{Ending, Phase};
use super::{Coordinator, Shared};
use crate::cluster::files::receive_files;
use crate::error::Error;
use crate::pb::*;
use crate::train::checkpoint::{self, CheckpointState};

impl Coordinator {
    /// Receives the checkpoint rank 0 of the live ring was asked for, checks it and puts it in
    /// place: where it now lies.
    pub(super) async fn upload_checkpoint(
        self: &Shared,
        caller: &Caller,
        chunks: Streaming<FileChunk>,
    ) -> Result<PathBuf, Status> {
        let asked = self.checkpoint_wanted(caller)?;
        let dir = self.cfg.output.dir.join("checkpoints");
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
        receive_files(chunks, &received, self.upload_caps.checkpoint)
            .await
            .map_err(|e| upload_refused(caller, e))?;
        // Hashing and moving a checkpoint of hundreds of MB is blocking work: off the async threads.
        let me = self.clone();
        let (path, state) = tokio::task::spawn_blocking(move || me.adopt_upload(&received, asked))
            .await
            .map_err(|e| Status::internal(format!("adopting the checkpoint: {e}")))??;
        drop(incoming);
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %path.display(), step = state.step, seconds = format!("{seconds:.2}"), "checkpoint written");
        self.write_log(
            json!({"event": "checkpoint", "step": state.step, "path": path, "seconds": seconds}),
        );
        let mut st = self.lock();
        if st.checkpoint_asked == Some(state.step) {
            st.checkpoint_asked = None;
        }
        st.latest = Some((path.clone(), state));
        self.settle_stop(&mut st);
        drop(st);
        self.notify();
        Ok(path)
    }

    /// The step whose checkpoint the caller, rank 0 of the live ring, was asked for; nobody else
    /// uploads one, and nothing else is taken.
    fn checkpoint_wanted(&self, caller: &Caller) -> Result<u64, Status> {
        let st = self.lock();
        if st.phase.forming() {
            return Err(caller.refused(
                "not a member",
                "no live ring: checkpoints come from its rank 0".into(),
            ));
        }
        check_member(&st, st.generation, 0, caller)?;
        st.checkpoint_asked
            .ok_or_else(|| Status::failed_precondition("no checkpoint was asked for"))
    }

    /// Checks a received checkpoint (whole, of the asked step, of this run), adds the cursor and
    /// the metrics so far, moves it into place (pruning spares the best), and refreshes
    /// `model-best/` when it is the best step's. Blocking: file hashing and moves.
    fn adopt_upload(
        &self,
        received: &std::path::Path,
        asked: u64,
    ) -> Result<(PathBuf, CheckpointState), Status> {
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

    /// Receives the final model from rank 0 once every step ran, installs the models beside it
    /// (`model-ema`, the best model), and ends the run: where the model lies.
    pub(super) async fn upload_model(
        self: &Shared,
        caller: &Caller,
        chunks: Streaming<FileChunk>,
    ) -> Result<PathBuf, Status> {
        {
            let st = self.lock();
            check_member(&st, st.generation, 0, caller)?;
            if st.committed < st.end {
                return Err(Status::failed_precondition("the run is not finished"));
            }
            if st.phase == Phase::Done(Ending::Finished) {
                return Err(Status::already_exists("the model was already uploaded"));
            }
        }
        let target = self.cfg.output.dir.join("model");
        receive_files(chunks, &target, self.upload_caps.model)
            .await
            .map_err(|e| upload_refused(caller, e))?;
        let (ema, steps) = self.final_ema()?;
        // Copying model directories is blocking work: off the async threads.
        let me = self.clone();
        let model = target.clone();
        tokio::task::spawn_blocking(move || me.install_extra_models(ema, &model))
            .await
            .map_err(|e| Status::internal(format!("saving the model: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(model = %target.display(), steps, "run finished; model saved");
        self.write_log(json!({"event": "done", "steps": steps, "seconds": self.started.elapsed().as_secs_f64(), "model_dir": target}));
        if let Err(e) = self.journal.flushed().await {
            tracing::error!(error = %e, "the run's end is missing from the metrics log");
        }
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let command: Vec<String> = std::env::args().collect();
            crate::train::card::write_cards(&cfg, &command)
        })
        .await
        .map_err(|e| Status::internal(format!("writing the model cards: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        self.lock().phase.finished();
        self.notify();
        Ok(target)
    }

    /// The moving average's model of the final checkpoint, when the run keeps one, and the
    /// run's steps.
    fn final_ema(&self) -> Result<(Option<PathBuf>, u64), Status> {
        let st = self.lock();
        if !self.policy.final_outputs().ema {
            return Ok((None, st.committed));
        }
        let ema = st
            .latest
            .as_ref()
            .filter(|(_, s)| s.step == st.committed)
            .map(|(p, _)| p.join("model-ema"))
            .ok_or_else(|| {
                Status::failed_precondition("the final checkpoint (with model-ema/) is missing")
            })?;
        Ok((Some(ema), st.committed))
    }

    /// Beside the uploaded final model: `model-ema/` from the final checkpoint, and the best
    /// model in place of the final one when `eval.keep_best` asks for it.
    fn install_extra_models(&self, ema: Option<PathBuf>, model: &Path) -> crate::Result<()> {
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

    /// The checkpoint of `step` a healing member fetches, once it is in place; refused when the
    /// ring broke up meanwhile.
    pub(super) async fn checkpoint_to_fetch(&self, step: u64) -> Result<PathBuf, Status> {
        self.wait_for(self.step_timeout(), "the checkpoint to heal from", |st| {
            if st.phase.forming() {
                return Some(Err(Status::unavailable(
                    "the ring broke up while healing: join again",
                )));
            }
            st.latest
                .as_ref()
                .filter(|(_, s)| s.step == step)
                .map(|(p, _)| Ok(p.clone()))
        })
        .await?
    }
}
