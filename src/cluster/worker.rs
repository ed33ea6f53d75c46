//! A worker: joins the coordinator, then per step embeds its shard, all-gathers embeddings, computes
//! the global loss (own slice live, others detached: DESIGN §3), backpropagates, all-reduces the
//! gradients with SUM, and applies the same AdamW update as every other replica.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::auth::{Attach, Token};
use super::files::{model_fingerprint, receive_files};
use crate::collective::{Ring, connect_with_retry, peer_service};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::SentenceModel;
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::next_step_response::Status as StepStatus;
use crate::pb::*;
use crate::train::Trainer;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::run::trainer_for;
use crate::train::trainer::ShardTexts;

/// How a worker starts.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// host:port of the coordinator.
    pub coordinator: String,
    /// Requested rank, or any free one.
    pub rank: Option<usize>,
    pub token: Token,
    /// A local copy of the model; without it the worker fetches the coordinator's.
    pub model: Option<PathBuf>,
    pub device: Device,
    pub threads: usize,
    /// Interface the peer server binds and advertises.
    pub peer_host: String,
    /// How long to keep trying to reach the coordinator and the neighbour.
    pub connect_timeout: Duration,
}

type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

fn rpc_err(what: &str) -> impl FnOnce(tonic::Status) -> Error + '_ {
    move |s| Error::Usage(format!("{what}: {} ({:?})", s.message(), s.code()))
}

fn with_deadline<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// Flattens embeddings (rows × dim, f32) into little-endian bytes.
fn to_bytes(t: &Tensor) -> Vec<u8> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    bytemuck::cast_slice(&v).to_vec()
}

fn from_bytes(bytes: &[u8], shape: &[i64], device: Device) -> Tensor {
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_slice(&v).view(shape).to_device(device)
}

/// Runs a worker until the run is done (Ok) or aborted / broken (Err).
pub async fn run(opts: WorkerOptions) -> Result<()> {
    let listener = TcpListener::bind((opts.peer_host.as_str(), 0))
        .await
        .map_err(|e| Error::Usage(format!("cannot listen on {}: {e}", opts.peer_host)))?;
    let peer_address = format!(
        "{}:{}",
        opts.peer_host,
        listener
            .local_addr()
            .map_err(Error::io("read address of", "peer listener"))?
            .port()
    );
    let chunk_guess = 16 << 20;
    let (peer_svc, incoming) = peer_service(&opts.token, chunk_guess);
    tokio::spawn(
        crate::collective::peer_server_builder()
            .add_service(peer_svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let channel = connect_with_retry(&opts.coordinator, opts.connect_timeout)
        .await
        .map_err(|e| {
            Error::Usage(format!(
                "cannot reach the coordinator at {}: {e}",
                opts.coordinator
            ))
        })?;
    let mut client: Client = CoordinatorClient::with_interceptor(channel, opts.token.attach())
        .max_decoding_message_size(256 << 20);

    let fingerprint = match &opts.model {
        Some(dir) => model_fingerprint(dir)?,
        None => String::new(),
    };
    let worker_id = format!("{}:{}", hostname(), std::process::id());
    let joined = client
        .join(with_deadline(
            JoinRequest {
                worker_id: worker_id.clone(),
                rank: opts.rank.map_or(-1, |r| r as i32),
                peer_address: peer_address.clone(),
                model_fingerprint: fingerprint,
                version: env!("CARGO_PKG_VERSION").into(),
            },
            TRANSFER_DEADLINE,
        ))
        .await
        .map_err(rpc_err("join refused"))?
        .into_inner();
    let rank = joined.rank as usize;
    let world = joined.world_size as usize;
    let cfg: RunConfig = toml::from_str(&joined.config_toml)
        .map_err(|e| Error::Usage(format!("the coordinator sent an unreadable config: {e}")))?;
    tracing::info!(rank, world, worker = %worker_id, "joined");

    let fetched;
    let model_dir = match &opts.model {
        Some(dir) => dir.clone(),
        None => {
            fetched = scratch_dir()?;
            let target = fetched.path().join("model");
            let stream = client
                .fetch_model(with_deadline(FetchModelRequest {}, TRANSFER_DEADLINE))
                .await
                .map_err(rpc_err("fetch model"))?
                .into_inner();
            receive_files(stream, &target).await?;
            if model_fingerprint(&target)? != joined.model_fingerprint {
                return Err(Error::Usage(
                    "the fetched model's fingerprint differs from the coordinator's".into(),
                ));
            }
            target
        }
    };
    crate::device::set_threads(opts.threads);
    let mut model = SentenceModel::load(&model_dir, opts.device)?;
    if let Some(n) = cfg.model.max_seq_length {
        model.set_max_seq_length(n)?;
    }

    let step_timeout = Duration::from_millis(cfg.cluster.step_timeout_ms);
    let ring = Ring::connect(
        rank,
        &joined.peers,
        &opts.token,
        incoming,
        cfg.cluster.chunk_kib * 1024,
        step_timeout,
        opts.connect_timeout,
    )
    .await
    .map_err(|e| Error::Usage(format!("ring: {e}")))?;

    let heartbeat = tokio::spawn(heartbeats(
        client.clone(),
        rank as u32,
        Duration::from_millis(joined.heartbeat_interval_ms),
    ));
    let mut trainer = trainer_for(&cfg, model, joined.total_steps)?;
    if joined.resume {
        let dir = scratch_dir()?;
        let target = dir.path().join("checkpoint");
        let stream = client
            .fetch_checkpoint(with_deadline(FetchCheckpointRequest {}, TRANSFER_DEADLINE))
            .await
            .map_err(rpc_err("fetch checkpoint"))?
            .into_inner();
        receive_files(stream, &target).await?;
        let state = checkpoint::verify(&target)?;
        checkpoint::restore(&target, &state, &mut trainer.model, &mut trainer.optim)?;
        tracing::info!(rank, step = state.step, "restored the checkpoint");
    }
    let ckpt_state = CheckpointState {
        step: 0,
        optimizer_steps: 0,
        seed: cfg.train.seed,
        data_fingerprint: joined.data_fingerprint.clone(),
        config_fingerprint: checkpoint::config_fingerprint(&cfg),
        multipos_version: env!("CARGO_PKG_VERSION").into(),
    };
    let result = train_loop(
        &mut client,
        &ring,
        &mut trainer,
        rank,
        world,
        step_timeout,
        joined.start_step,
        &ckpt_state,
    )
    .await;
    heartbeat.abort();
    result
}

async fn heartbeats(mut client: Client, rank: u32, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match client
            .heartbeat(with_deadline(HeartbeatRequest { rank }, every * 4))
            .await
        {
            Ok(r) if !r.get_ref().keep_going => return,
            Ok(_) => {}
            Err(status) => tracing::warn!(%status, "heartbeat failed"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn train_loop(
    client: &mut Client,
    ring: &Ring,
    trainer: &mut Trainer,
    rank: usize,
    world: usize,
    step_timeout: Duration,
    start_step: u64,
    ckpt_template: &CheckpointState,
) -> Result<()> {
    let mut step = start_step;
    loop {
        tracing::debug!(rank, step, "asking for the next step");
        let next = client
            .next_step(with_deadline(
                NextStepRequest {
                    rank: rank as u32,
                    step,
                },
                step_timeout,
            ))
            .await
            .map_err(rpc_err("next step"))?
            .into_inner();
        match StepStatus::try_from(next.status) {
            Ok(StepStatus::Step) => {}
            Ok(StepStatus::Done) => break,
            Ok(StepStatus::Aborted) => {
                return Err(Error::Usage(format!(
                    "the coordinator aborted the run: {}",
                    next.reason
                )));
            }
            Err(_) => return Err(Error::Usage(format!("unknown step status {}", next.status))),
        }
        tracing::debug!(
            rank,
            step,
            rows = next.rows.len(),
            checkpoint = next.checkpoint,
            "shard received"
        );
        if next.checkpoint {
            upload_checkpoint(client, trainer, step, ckpt_template).await?;
        }
        let commit = tokio::task::block_in_place(|| -> Result<_> {
            let start = Instant::now();
            let texts = ShardTexts {
                queries: next.rows.iter().map(|r| r.query.as_str()).collect(),
                positives: next.rows.iter().map(|r| r.positive.as_str()).collect(),
                negatives: (0..next.rows.first().map_or(0, |r| r.negatives.len()))
                    .map(|j| next.rows.iter().map(|r| r.negatives[j].as_str()).collect())
                    .collect(),
            };
            let emb = trainer.embed_shard(&texts, step, next.first_row)?;
            Ok((emb, start.elapsed().as_secs_f64()))
        })?;
        let (emb, mut compute) = commit;

        // All-gather: every rank's [queries; positives; negatives...] block, (1 + C)·n × d.
        let comm_start = Instant::now();
        let local: Vec<Tensor> = std::iter::once(&emb.queries)
            .chain(emb.docs.iter())
            .map(|t| t.shallow_clone())
            .collect();
        let cols = local.len() as i64;
        let (n, dim) = (emb.queries.size()[0], emb.queries.size()[1]);
        let blocks = ring
            .all_gather(step, to_bytes(&Tensor::cat(&local, 0)))
            .await
            .map_err(|e| Error::Usage(format!("step {}: all-gather: {e}", step + 1)))?;
        let mut comm = comm_start.elapsed().as_secs_f64();
        tracing::debug!(rank, step, "embeddings gathered");

        let (loss, lr, grad_norm) = {
            let device = trainer.model.device();
            // Rebuild the global columns in rank order, putting this rank's live tensors in its slot.
            let columns: Vec<Tensor> = (0..cols as usize)
                .map(|c| {
                    let parts: Vec<Tensor> = blocks
                        .iter()
                        .enumerate()
                        .map(|(r, bytes)| {
                            if r == rank {
                                local[c].shallow_clone()
                            } else {
                                from_bytes(bytes, &[cols, n, dim], device).get(c as i64)
                            }
                        })
                        .collect();
                    Tensor::cat(&parts, 0)
                })
                .collect();
            let start = Instant::now();
            let loss = tokio::task::block_in_place(|| {
                let loss = trainer.loss(&columns[0], &columns[1..], &next.groups);
                loss.backward();
                loss.to_kind(Kind::Double).double_value(&[])
            });
            compute += start.elapsed().as_secs_f64();
            let comm_start = Instant::now();
            let mut grads = trainer.optim.flat_grads();
            ring.all_reduce_sum(step, &mut grads)
                .await
                .map_err(|e| Error::Usage(format!("step {}: all-reduce: {e}", step + 1)))?;
            trainer.optim.set_flat_grads(&grads);
            tracing::debug!(rank, step, "gradients reduced");
            comm += comm_start.elapsed().as_secs_f64();
            let start = Instant::now();
            let (lr, norm) = tokio::task::block_in_place(|| trainer.apply(step));
            compute += start.elapsed().as_secs_f64();
            (loss, lr, norm)
        };
        client
            .commit(with_deadline(
                CommitRequest {
                    rank: rank as u32,
                    step,
                    loss,
                    grad_norm,
                    lr,
                    tokens: emb.tokens as u64,
                    compute_seconds: compute,
                    comm_seconds: comm,
                },
                step_timeout,
            ))
            .await
            .map_err(rpc_err("commit"))?;
        step += 1;
    }
    if rank == 0 {
        let dir = scratch_dir()?;
        let out = dir.path().join("model");
        trainer.model.save(&out)?;
        let chunks = super::files::file_chunks(&out)?;
        client
            .upload_model(with_deadline(tokio_stream::iter(chunks), TRANSFER_DEADLINE))
            .await
            .map_err(rpc_err("upload model"))?;
        tracing::info!(world, "uploaded the trained model");
    }
    Ok(())
}

/// Writes the current state (before `step`) as a checkpoint and streams it to the coordinator.
async fn upload_checkpoint(
    client: &mut Client,
    trainer: &Trainer,
    step: u64,
    template: &CheckpointState,
) -> Result<()> {
    let dir = scratch_dir()?;
    let state = CheckpointState {
        step,
        optimizer_steps: trainer.optim.steps_taken(),
        ..template.clone()
    };
    let path = tokio::task::block_in_place(|| {
        checkpoint::write(dir.path(), &state, &trainer.model, &trainer.optim, 1)
    })?;
    let chunks = super::files::file_chunks(&path)?;
    client
        .upload_checkpoint(with_deadline(tokio_stream::iter(chunks), TRANSFER_DEADLINE))
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
