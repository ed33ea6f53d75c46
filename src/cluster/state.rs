//! A replica's state in memory: every trainable tensor (encoder and loss heads), AdamW moments and,
//! with `train.ema_decay`, the weights' moving average, as raw little-endian f32, one entry per
//! tensor, plus a `meta` entry (steps applied, optimizer steps). A live worker serves it from its
//! Peer server so that a replacement heals straight from it, with no checkpoint written or read.
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tokio::sync::watch;
use tonic::Streaming;

use super::files::push_chunks;
use crate::collective::{tensor_from_le_bytes, tensor_to_le_bytes};
use crate::error::{Error, Result};
use crate::model::masks::MaskGenerator;
use crate::pb::FileChunk;
use crate::train::Trainer;

/// A replica's state, ready to stream, for the healing members of one generation.
pub struct Snapshot {
    pub generation: u64,
    pub chunks: Vec<FileChunk>,
}

/// Where a worker's Peer server finds the state to serve (none most of the time).
pub(crate) type StateSlot = Arc<watch::Sender<Option<Arc<Snapshot>>>>;

/// An empty slot.
pub fn slot() -> StateSlot {
    Arc::new(watch::channel(None).0)
}

#[derive(Serialize, Deserialize)]
struct Meta {
    step: u64,
    optimizer_steps: u64,
    /// The run's dropout generator: a replacement continues with the donor's.
    dropout_masks: MaskGenerator,
}

/// The state of `trainer` after `step` steps, for generation `generation`.
pub(crate) fn snapshot(trainer: &Trainer, step: u64, generation: u64) -> Snapshot {
    let mut chunks = Vec::new();
    let meta = Meta {
        step,
        optimizer_steps: trainer.optim.steps_taken(),
        dropout_masks: trainer.opts.masks,
    };
    push_chunks(
        &mut chunks,
        "meta".into(),
        Bytes::from(serde_json::to_vec(&meta).expect("plain struct")),
    );
    for (name, t) in &trainer.state.parameters() {
        push_chunks(
            &mut chunks,
            format!("w/{name}"),
            Bytes::from(tensor_to_le_bytes(t)),
        );
    }
    for (name, t) in trainer.optim.state() {
        push_chunks(
            &mut chunks,
            format!("m/{name}"),
            Bytes::from(tensor_to_le_bytes(&t)),
        );
    }
    for (name, t) in trainer.state.ema.iter().flat_map(|e| e.tensors()) {
        push_chunks(
            &mut chunks,
            format!("e/{name}"),
            Bytes::from(tensor_to_le_bytes(&t)),
        );
    }
    Snapshot { generation, chunks }
}

/// A refusal of a state stream, saying what was wrong with it.
fn bad(what: String) -> Error {
    Error::Protocol(format!("state stream from the peer: {what}"))
}

/// Receives a state stream and loads it into `trainer`; returns the steps it had applied.
pub(crate) async fn restore(stream: Streaming<FileChunk>, trainer: &mut Trainer) -> Result<u64> {
    let entries = receive(stream, state_bytes(trainer)).await?;
    load(&entries, trainer)
}

/// What a donor sends for `trainer`: exactly this replica's tensors (weights, moments, average)
/// and a small meta entry. Anything beyond that is refused before it fills memory.
fn state_bytes(trainer: &Trainer) -> u64 {
    let bytes = |ts: &mut dyn Iterator<Item = i64>| ts.sum::<i64>() as u64 * 4;
    let weights = bytes(
        &mut trainer
            .state
            .parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64),
    );
    let moments = bytes(
        &mut trainer
            .optim
            .state()
            .into_iter()
            .map(|(_, t)| t.numel() as i64),
    );
    let averages = bytes(
        &mut trainer
            .state
            .ema
            .iter()
            .flat_map(|e| e.tensors())
            .map(|(_, t)| t.numel() as i64),
    );
    weights + moments + averages + (1 << 16)
}

/// The stream's entries by name, at most `limit` bytes in all.
async fn receive(mut stream: Streaming<FileChunk>, limit: u64) -> Result<HashMap<String, Vec<u8>>> {
    let mut total = 0u64;
    let mut entries: HashMap<String, Vec<u8>> = HashMap::new();
    let mut current: Option<String> = None;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| bad(format!("broke: {e}")))?
    {
        total += chunk.data.len() as u64;
        if total > limit {
            return Err(bad(format!(
                "more than the {limit} bytes this replica's state takes"
            )));
        }
        if !chunk.path.is_empty() {
            current = Some(chunk.path.clone());
        }
        let name = current
            .clone()
            .ok_or_else(|| bad("a chunk without an entry".into()))?;
        entries
            .entry(name)
            .or_default()
            .extend_from_slice(&chunk.data);
        if chunk.last {
            current = None;
        }
    }
    Ok(entries)
}

/// Loads received entries into `trainer`: the steps they had applied. Everything is checked
/// before anything is loaded, so a stream that broke, or a caller that gave up waiting, leaves
/// the replica as it was.
fn load(entries: &HashMap<String, Vec<u8>>, trainer: &mut Trainer) -> Result<u64> {
    let meta: Meta = serde_json::from_slice(
        entries
            .get("meta")
            .ok_or_else(|| bad("no meta entry".into()))?,
    )
    .map_err(|e| bad(format!("meta: {e}")))?;
    let shaped = |key: String, like: &Tensor| -> Result<Tensor> {
        let bytes = entries
            .get(&key)
            .ok_or_else(|| bad(format!("no entry {key}")))?;
        if bytes.len() != like.numel() * 4 {
            return Err(bad(format!(
                "{key}: {} bytes, expected {}",
                bytes.len(),
                like.numel() * 4
            )));
        }
        Ok(tensor_from_le_bytes(bytes, &like.size()).to_device(like.device()))
    };
    let weights: Vec<(Tensor, Tensor)> = trainer
        .state
        .parameters()
        .into_iter()
        .map(|(name, var)| {
            let t = shaped(format!("w/{name}"), &var)?;
            Ok((var, t))
        })
        .collect::<Result<_>>()?;
    let moments: HashMap<String, Tensor> = trainer
        .optim
        .state()
        .into_iter()
        .map(|(name, like)| {
            let t = shaped(format!("m/{name}"), &like)?;
            Ok((name, t))
        })
        .collect::<Result<_>>()?;
    let averages: Vec<(Tensor, Tensor)> = trainer
        .state
        .ema
        .iter()
        .flat_map(|e| e.tensors())
        .map(|(name, avg)| {
            let t = shaped(format!("e/{name}"), &avg)?;
            Ok((avg, t))
        })
        .collect::<Result<_>>()?;
    for (mut var, t) in weights.into_iter().chain(averages) {
        tch::no_grad(|| var.copy_(&t.to_kind(var.kind())));
    }
    trainer
        .optim
        .load_state(meta.optimizer_steps, |key| {
            moments.get(key).map(Tensor::shallow_clone)
        })
        .map_err(bad)?;
    trainer.opts.masks = meta.dropout_masks;
    Ok(meta.step)
}
