//! The run configuration: one typed tree, read from a TOML file, then `MULTIPOS__SECTION__KEY`
//! environment variables, then `--set section.key=value` overrides (later wins), and validated once
//! with messages that say what to change. Unknown keys are errors. Relative paths are relative to the
//! working directory.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{Batching, Columns, FillNegatives, Mode};
use crate::error::{Error, Result};
use crate::loss::{LossConfig, MnrlConfig};

/// The name of the one task a `[data]` section describes.
pub(crate) const DEFAULT_TASK: &str = "default";

/// Warmup when neither `warmup_steps` nor `warmup_ratio` is set (sentence-transformers' examples).
pub(crate) const DEFAULT_WARMUP_RATIO: f64 = 0.1;

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub model: ModelConfig,
    /// The data of a run with one task (or use `[[tasks]]`).
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// The loss of the `[data]` task (default: MNRL with `train.scale` and `train.symmetric`).
    #[serde(default)]
    pub loss: Option<LossConfig>,
    /// Several tasks in one run: every global batch comes from one of them (`train.sampler`).
    #[serde(default)]
    pub tasks: Vec<TaskConfig>,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: Option<EvalConfig>,
    pub output: OutputConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// How a cluster run is laid out and protected.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Workers: what `launch` starts and the ring size the coordinator forms (the world size).
    pub workers: usize,
    /// Address the coordinator listens on, and only there (port 0 = any free port, announced).
    pub bind: String,
    /// Host (interface) workers bind their peer server on and advertise to the other workers.
    pub peer_host: String,
    /// The cluster secret; prefer `token_file` or the MULTIPOS_CLUSTER_TOKEN variable.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long is declared dead or stalled: its ring breaks up and re-forms.
    pub heartbeat_timeout_ms: u64,
    /// How long the coordinator waits for a ring to form (at the start and after a failure)
    /// before it gives up the run.
    pub join_timeout_ms: u64,
    /// Upper bound on one step, collectives included.
    pub step_timeout_ms: u64,
    /// Chunk size of ring messages.
    pub chunk_kib: usize,
    /// CPU threads per worker process (0 = cores / workers).
    pub threads_per_worker: usize,
    /// `launch` restarts a dead local process this many times in all: a worker re-joins and heals
    /// from a live peer's state, the coordinator comes back with `--resume` on the same address.
    pub max_restarts: usize,
    /// Fewest workers the run goes on with after losing some (0 = all of `workers`): the ring
    /// re-forms with the live ones when no replacement joins within `rejoin_grace_ms`.
    pub min_workers: usize,
    /// How long a re-forming ring waits for missing workers before going on with fewer.
    pub rejoin_grace_ms: u64,
    /// How long a worker keeps re-joining (with backoff) while the coordinator is unreachable.
    pub rejoin_timeout_ms: u64,
    /// TLS for every connection of the run (coordinator and peer ring); plaintext without it.
    pub tls: Option<crate::net::tls::TlsConfig>,
    /// Address the coordinator serves Prometheus metrics on (`/metrics`); none when unset.
    pub metrics_bind: Option<String>,
    /// Who embeds the texts `train.mine` searches: the workers, in pages, or the coordinator alone.
    pub mine_on: MineOn,
    /// How gradients travel between workers: `f32`, or `bf16` (half the bytes; every worker still
    /// ends with the same values, each within half a bf16 step of the exact sum).
    pub grad_dtype: crate::collective::Wire,
    /// Gradient bucket size of the all-reduce: the ring sums one bucket while the next is copied
    /// out of the device.
    pub bucket_mib: usize,
    /// The data plane: the engine that all-gathers embeddings and sums gradients between workers.
    pub collective: DataPlane,
    /// Where the coordinator serves the Gloo rendezvous store (`host:port`; port 0 = any free
    /// one, told to the workers); unset: `bind`'s host, any free port.
    pub store_bind: Option<String>,
}

/// Which engine moves a step's embeddings and gradients between workers (docs/design.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPlane {
    /// multipos's own ring over gRPC: authenticated (ring keys, mTLS), any network.
    #[default]
    Grpc,
    /// c10d's Gloo (PyTorch's CPU engine): faster, unauthenticated; a trusted network only.
    Gloo,
    /// c10d's NCCL: not bound by this build (refused at start).
    Nccl,
}

/// Where a cluster embeds the texts of `train.mine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MineOn {
    /// The ring's workers, each a share of the pages, on their devices.
    #[default]
    Workers,
    /// The coordinator, alone, before any worker joins.
    Coordinator,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            bind: "127.0.0.1:0".into(),
            peer_host: "127.0.0.1".into(),
            token: None,
            token_file: None,
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 5000,
            join_timeout_ms: 120_000,
            step_timeout_ms: 600_000,
            chunk_kib: 4096,
            threads_per_worker: 0,
            max_restarts: 0,
            min_workers: 0,
            rejoin_grace_ms: 3000,
            rejoin_timeout_ms: 120_000,
            tls: None,
            metrics_bind: None,
            mine_on: MineOn::Workers,
            grad_dtype: crate::collective::Wire::F32,
            bucket_mib: 25,
            collective: DataPlane::Grpc,
            store_bind: None,
        }
    }
}

/// The environment variable that carries the cluster token (wins over the config).
pub(crate) const TOKEN_ENV: &str = "MULTIPOS_CLUSTER_TOKEN";

impl ClusterConfig {
    /// The token from MULTIPOS_CLUSTER_TOKEN, else `token_file`, else `token`.
    pub(crate) fn resolve_token(&self) -> Result<Option<String>> {
        if let Ok(t) = std::env::var(TOKEN_ENV)
            && !t.trim().is_empty()
        {
            return Ok(Some(t));
        }
        if let Some(path) = &self.token_file {
            let t = std::fs::read_to_string(path)
                .map_err(Error::io("read cluster.token_file", path))?;
            return Ok(Some(t.trim().to_string()));
        }
        Ok(self.token.clone())
    }

    /// The fewest workers a re-formed ring may have.
    pub(crate) fn min_workers(&self) -> usize {
        if self.min_workers == 0 {
            self.workers
        } else {
            self.min_workers
        }
    }
}

/// Numeric precision of the encoder's forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    Fp32,
    /// bf16 autocast on CUDA; weights, optimizer state and the loss stay f32.
    Bf16,
}

/// Which model, where, with what sequence length.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Sentence-transformers directory; default: all-MiniLM-L6-v2 installed by `deploy/setup.sh`.
    pub path: Option<PathBuf>,
    /// Overrides the model's `max_seq_length` (tokens, special tokens included).
    pub max_seq_length: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    pub device: Option<String>,
    /// libtorch CPU threads; 0 = one per core.
    pub threads: usize,
    /// fp32, or bf16 autocast (CUDA only).
    pub precision: Precision,
}

impl ModelConfig {
    /// The model directory: `path`, else the default model (`crate::model::default_dir`).
    pub(crate) fn dir(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(crate::model::default_dir)
    }
}

/// One path or several.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Paths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Paths {
    /// All paths as a list.
    pub(crate) fn to_vec(&self) -> Vec<PathBuf> {
        match self {
            Paths::One(p) => vec![p.clone()],
            Paths::Many(v) => v.clone(),
        }
    }
}

/// Training data and how rows are formed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Query-grouped or pair files (.jsonl, .csv, .tsv), tables (.parquet, .arrow) or folders of
    /// them (Parquet shards, a `datasets` save_to_disk folder).
    pub train: Paths,
    #[serde(default)]
    pub skip_invalid: bool,
    /// Which table columns hold what [default: sentence-transformers' order].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Columns>,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub negatives_per_row: usize,
    /// When a group lists fewer negatives: `error` (default) or `random` (fill from other groups).
    #[serde(default)]
    pub fill_negatives: FillNegatives,
    /// Which rows share a batch: `shuffled` (default) or `by_cluster` (the groups' `cluster` labels).
    #[serde(default)]
    pub batching: Batching,
}

fn default_mode() -> Mode {
    Mode::Sample
}

/// One task of a multi-task run: its data, how its rows are formed, and its loss.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Names the task in metrics, and its classifier file (`heads/<name>.*`) for SoftmaxLoss.
    pub name: String,
    /// Query-grouped, pair, or scored/labelled pair files (.jsonl, .csv, .tsv), tables (.parquet,
    /// .arrow) or folders of them.
    pub train: Paths,
    #[serde(default)]
    pub skip_invalid: bool,
    /// Which table columns hold what [default: sentence-transformers' order].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Columns>,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub negatives_per_row: usize,
    /// When a group lists fewer negatives: `error` (default) or `random` (fill from other groups).
    #[serde(default)]
    pub fill_negatives: FillNegatives,
    /// Which rows share a batch: `shuffled` (default) or `by_cluster` (the groups' `cluster` labels).
    #[serde(default)]
    pub batching: Batching,
    #[serde(default)]
    pub loss: LossConfig,
}

impl TaskConfig {
    /// Refuses a task whose loss, columns or row options cannot work together.
    fn validate(&self) -> std::result::Result<(), String> {
        self.loss
            .validate()
            .map_err(|e| format!("task {:?}: {e}", self.name))?;
        if let Some(c) = &self.columns {
            c.validate()
                .map_err(|e| format!("task {:?}: columns: {e}", self.name))?;
        }
        if !self.loss.in_batch_negatives() && self.negatives_per_row > 0 {
            return Err(format!(
                "task {:?}: negatives_per_row applies to MNRL only (pointwise losses score listed negatives 0)",
                self.name
            ));
        }
        if !self.loss.in_batch_negatives() && self.batching != Batching::Shuffled {
            return Err(format!(
                "task {:?}: batching = \"by_cluster\" applies to MNRL only (pointwise losses have no in-batch negatives)",
                self.name
            ));
        }
        Ok(())
    }
}

/// How a multi-task run picks the task of each global batch (sentence-transformers' samplers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Tasks in proportion to their batch counts, in a seeded order: every batch of every task.
    #[default]
    Proportional,
    /// One batch of each task in turn, until the task with the fewest batches runs out.
    RoundRobin,
}

/// Optimisation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Rows per global batch.
    pub batch_size: usize,
    pub epochs: u64,
    /// Stop after this many steps (0 = run `epochs` whole epochs).
    pub max_steps: u64,
    pub lr: f64,
    /// Warmup length in steps, or as a fraction of all steps (default: 10 %).
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    /// Clip the global gradient norm (0 = no clipping).
    pub max_grad_norm: f64,
    /// MNRL similarity scale (1 / temperature) of the `[data]` task when no `[loss]` is given.
    pub scale: f64,
    /// Symmetric MNRL for the `[data]` task when no `[loss]` is given.
    pub symmetric: bool,
    pub seed: u64,
    /// Dropout in the forward pass (off makes runs exactly repeatable across worker counts).
    pub dropout: bool,
    /// Rows per forward pass within a column, after sorting the column by length (0 = the whole
    /// column at once; unset: 8 on the CPU, 64 on a GPU). Smaller buckets pad less; the loss and
    /// gradients are the same.
    pub micro_batch: Option<usize>,
    /// Steps prepared (tokenized, padded, copied to the device) ahead of the one running, on a
    /// thread of their own (0 = each when it is due). One process only: a worker learns its step
    /// when the coordinator sends it.
    pub prefetch: usize,
    /// Continue from a checkpoint: "latest" (the newest valid one in output.dir/checkpoints) or a path.
    pub resume: Option<String>,
    /// Stop cleanly (with a checkpoint) after this many steps in this invocation, while the
    /// schedule still spans the whole run: for jobs with a time limit (0 = run to the end). One
    /// process or a cluster alike (`train::policy`).
    pub stop_after_steps: u64,
    /// GradCache: rows per forward pass *with* autograd (0 = off). The global batch is embedded
    /// without autograd first, the loss gives the gradient of every embedding, then each
    /// mini-batch is embedded again with autograd and backpropagated: activation memory follows
    /// this number, not the batch size, and the pool of in-batch negatives stays the whole batch.
    pub mini_batch_size: usize,
    /// Which task each global batch of a multi-task run comes from.
    pub sampler: Sampler,
    /// Keep an exponential moving average of the weights with this decay (in [0, 1)), saved as
    /// `model-ema/` beside `model/` (in one process and in the cluster).
    pub ema_decay: Option<f64>,
    /// A step whose loss or gradient is not finite: `abort` (stop with a clear error; the last
    /// checkpoint stays the last good one) or `skip` (discard it and go on; repeated skips abort).
    pub on_nonfinite: NonFinite,
    /// Mine hard negatives for every MNRL task with the base model before training
    /// (`multipos mine`'s options); the mined data is recorded in `output.dir/mined/` and a resumed
    /// run reads it back.
    pub mine: Option<crate::mine::MineOptions>,
    /// Mine again, with the model as trained so far, before every N-th epoch (`train.mine`'s
    /// options); each re-mined version is recorded in `output.dir/mined/` for exact resume.
    pub remine_every_epochs: Option<u64>,
}

/// What a run does with a step whose loss or gradient is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    #[default]
    Abort,
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            epochs: 1,
            max_steps: 0,
            lr: 2e-5,
            warmup_steps: None,
            warmup_ratio: None,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            scale: 20.0,
            symmetric: false,
            seed: 42,
            dropout: true,
            micro_batch: None,
            prefetch: 1,
            resume: None,
            stop_after_steps: 0,
            mini_batch_size: 0,
            sampler: Sampler::Proportional,
            ema_decay: None,
            on_nonfinite: NonFinite::Abort,
            mine: None,
            remine_every_epochs: None,
        }
    }
}

/// Retrieval evaluation during training.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub queries: PathBuf,
    pub corpus: PathBuf,
    pub qrels: PathBuf,
    /// Evaluate every N steps (0 = only before and after training).
    #[serde(default)]
    pub every_steps: u64,
    #[serde(default = "default_true")]
    pub at_start: bool,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// The metric that picks the best evaluation (any key the evaluator reports).
    #[serde(default = "default_metric")]
    pub metric: String,
    #[serde(default = "default_true")]
    pub greater_is_better: bool,
    /// Stop training after this many evaluations in a row without a new best (0 = never).
    #[serde(default)]
    pub patience: u64,
    /// Make `model/` the best evaluated model rather than the last (it is always in `model-best/`).
    #[serde(default)]
    pub keep_best: bool,
}

fn default_metric() -> String {
    "ndcg@10".into()
}

fn default_true() -> bool {
    true
}
fn default_eval_batch() -> usize {
    64
}

/// Where results go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Run directory: `model/`, `metrics.jsonl`, `config.toml`, `checkpoints/`.
    pub dir: PathBuf,
    /// Write a checkpoint every N steps (0 = only at the end and when stopped by a signal).
    #[serde(default)]
    pub checkpoint_every_steps: u64,
    /// How many checkpoints to keep (oldest removed first).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Start afresh in a `dir` that holds an earlier run (its `model/` or checkpoints), replacing
    /// it; without this a run refuses such a `dir` unless it resumes.
    #[serde(default)]
    pub overwrite: bool,
    /// Also write the metrics as TensorBoard event files under `dir/tensorboard/`.
    #[serde(default)]
    pub tensorboard: bool,
}

fn default_keep() -> usize {
    3
}

impl TrainConfig {
    /// Checks the training settings on their own.
    fn validate(&self) -> std::result::Result<(), String> {
        let t = self;
        if t.batch_size < 2 {
            return Err(format!(
                "train.batch_size must be at least 2, got {}",
                t.batch_size
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("train.lr must be a positive number, got {}", t.lr));
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return Err("set train.epochs or train.max_steps to at least 1".into());
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return Err("set either train.warmup_steps or train.warmup_ratio, not both".into());
        }
        if let Some(r) = t.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(format!("train.warmup_ratio must be within [0, 1], got {r}"));
        }
        if t.max_steps > 0
            && let Some(w) = t.warmup_steps
            && w > t.max_steps
        {
            return Err(format!(
                "train.warmup_steps = {w} exceeds train.max_steps = {}",
                t.max_steps
            ));
        }
        if t.scale.is_nan() || t.scale <= 0.0 {
            return Err(format!("train.scale must be positive, got {}", t.scale));
        }
        if let Some(d) = t.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return Err(format!("train.ema_decay must be within [0, 1), got {d}"));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            return Err("train.weight_decay and train.max_grad_norm must not be negative".into());
        }
        if t.prefetch > 64 {
            return Err(format!(
                "train.prefetch must be within 0..=64, got {}",
                t.prefetch
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Checks the cluster settings, for a global batch of `batch_size`.
    fn validate(&self, batch_size: usize) -> std::result::Result<(), String> {
        let c = self;
        if c.workers == 0 {
            return Err("cluster.workers must be at least 1".into());
        }
        if !batch_size.is_multiple_of(c.workers) {
            return Err(format!(
                "train.batch_size {} does not split into cluster.workers = {} equal shards: make it a multiple",
                batch_size, c.workers
            ));
        }
        if c.min_workers > c.workers {
            return Err(format!(
                "cluster.min_workers = {} exceeds cluster.workers = {}",
                c.min_workers, c.workers
            ));
        }
        if c.heartbeat_interval_ms == 0 || c.heartbeat_timeout_ms <= c.heartbeat_interval_ms {
            return Err(
                "cluster.heartbeat_timeout_ms must exceed cluster.heartbeat_interval_ms > 0".into(),
            );
        }
        if c.bucket_mib == 0 || c.bucket_mib > 4096 {
            return Err(format!(
                "cluster.bucket_mib must be within 1..=4096, got {}",
                c.bucket_mib
            ));
        }
        if c.collective == DataPlane::Nccl {
            return Err("cluster.collective = \"nccl\": this build does not bind c10d's NCCL process group yet; use \"gloo\" (c10d's CPU engine) or \"grpc\"".into());
        }
        if c.store_bind.is_some() && c.collective != DataPlane::Gloo {
            return Err("cluster.store_bind is the Gloo rendezvous store's address: it needs cluster.collective = \"gloo\"".into());
        }
        if c.chunk_kib == 0 || c.chunk_kib > 16 * 1024 {
            return Err(format!(
                "cluster.chunk_kib must be within 1..=16384, got {}",
                c.chunk_kib
            ));
        }
        Ok(())
    }
}

impl RunConfig {
    /// The config as it may be shown (the resolved `config.toml`, a model card): the cluster
    /// token left out.
    pub(crate) fn without_token(&self) -> RunConfig {
        let mut shown = self.clone();
        shown.cluster.token = None;
        shown
    }

    /// Reads `file`, then environment overrides, then `sets` (`section.key=value`), and validates.
    pub fn load(file: &Path, sets: &[String]) -> Result<Self> {
        if !file.is_file() {
            return Err(Error::invalid(file, "config file not found"));
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("MULTIPOS")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            );
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                Error::Usage(format!("--set expects section.key=value, got {set:?}"))
            })?;
            builder = builder
                .set_override(key.trim(), parse_override(value.trim()))
                .map_err(|e| Error::Usage(format!("--set {set}: {e}")))?;
        }
        let merged: toml::Value = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| Error::invalid(file, e.to_string()))?;
        // Deserialised from TOML values, a float never becomes an integer and a number never a
        // boolean (the config crate would round 8.6 to 9 and call 1.5 true).
        let cfg: RunConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            let why = e.inner().to_string();
            let why = why.lines().next().unwrap_or_default();
            Error::Usage(format!("{}: {key}: {why}", source_of(&key, file, sets)))
        })?;
        cfg.validate()
            .and_then(|()| cfg.validate_files())
            .map_err(|reason| Error::invalid(file, reason))?;
        Ok(cfg)
    }

    /// Checks values that are impossible on their own (data-dependent checks come at planning); what
    /// a worker checks of the config the coordinator sends.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.train.validate()?;
        self.cluster.validate(self.train.batch_size)?;
        if self.output.keep_checkpoints == 0 {
            return Err("output.keep_checkpoints must be at least 1".into());
        }
        if self.model.precision == Precision::Bf16 && self.model.device.as_deref() == Some("cpu") {
            return Err(
                "model.precision = \"bf16\" needs a CUDA device (CPU runs train in fp32)".into(),
            );
        }
        if self.model.max_seq_length == Some(0) {
            return Err("model.max_seq_length must be positive".into());
        }
        if let Some(e) = &self.eval
            && e.batch_size == 0
        {
            return Err("eval.batch_size must be positive".into());
        }
        if let Some(e) = &self.eval
            && e.patience > 0
            && e.every_steps == 0
        {
            return Err(
                "eval.patience needs evaluations during training: set eval.every_steps".into(),
            );
        }
        self.validate_tasks()
    }

    /// The run's tasks: the `[[tasks]]`, or the one task `[data]` (+ `[loss]`) describes.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        match &self.data {
            Some(d) => vec![TaskConfig {
                name: DEFAULT_TASK.into(),
                train: d.train.clone(),
                skip_invalid: d.skip_invalid,
                columns: d.columns.clone(),
                mode: d.mode,
                negatives_per_row: d.negatives_per_row,
                fill_negatives: d.fill_negatives,
                batching: d.batching,
                loss: self.loss.unwrap_or(LossConfig::Mnrl(MnrlConfig {
                    scale: self.train.scale,
                    symmetric: self.train.symmetric,
                    ..MnrlConfig::default()
                })),
            }],
            None => self.tasks.clone(),
        }
    }

    fn validate_tasks(&self) -> std::result::Result<(), String> {
        match (&self.data, self.tasks.is_empty()) {
            (None, true) => {
                return Err("give the training data: a [data] section or [[tasks]]".into());
            }
            (Some(_), false) => {
                return Err("give either a [data] section or [[tasks]], not both".into());
            }
            _ => {}
        }
        let defaults = TrainConfig::default();
        if (self.loss.is_some() || !self.tasks.is_empty())
            && (self.train.scale != defaults.scale || self.train.symmetric != defaults.symmetric)
        {
            return Err(
                "train.scale and train.symmetric apply to the default MNRL loss only: set them in the loss (scale, symmetric)".into(),
            );
        }
        if self.loss.is_some() && self.data.is_none() {
            return Err("[loss] belongs to [data]; with [[tasks]], give each task its loss".into());
        }
        let tasks = self.tasks();
        for (i, t) in tasks.iter().enumerate() {
            let valid_name = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(format!(
                    "task name {:?} must be 1-64 letters, digits, '_' or '-'",
                    t.name
                ));
            }
            if tasks[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("two tasks are named {:?}", t.name));
            }
            t.validate()?;
        }
        if self.train.mine.is_some()
            && !tasks
                .iter()
                .any(|t| t.loss.in_batch_negatives() && t.negatives_per_row > 0)
        {
            return Err(
                "train.mine mines negatives, but no MNRL task uses any: set negatives_per_row \
                 (data.negatives_per_row) to at least 1"
                    .into(),
            );
        }
        if let Some(m) = &self.train.mine {
            m.validate().map_err(|e| format!("train.mine: {e}"))?;
        }
        match self.train.remine_every_epochs {
            Some(0) => return Err("train.remine_every_epochs must be at least 1".into()),
            Some(_) if self.train.mine.is_none() => {
                return Err(
                    "train.remine_every_epochs re-mines with train.mine's options: add a [train.mine] table"
                        .into(),
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks that the files the run reads exist (on the coordinator, or the one process).
    pub(crate) fn validate_files(&self) -> std::result::Result<(), String> {
        for t in self.tasks() {
            for p in t.train.to_vec() {
                if let Some(why) = not_a_file(&p) {
                    return Err(format!("task {:?}: train file {}", t.name, why));
                }
            }
        }
        if let Some(p) = self.train.mine.as_ref().and_then(|m| m.corpus.as_ref())
            && let Some(why) = not_a_file(p)
        {
            return Err(format!("train.mine.corpus: {why}"));
        }
        if let Some(tls) = &self.cluster.tls {
            crate::net::tls::Tls::load(tls).map_err(|e| e.to_string())?;
        }
        if let Some(e) = &self.eval {
            for (key, p) in [
                ("eval.queries", &e.queries),
                ("eval.corpus", &e.corpus),
                ("eval.qrels", &e.qrels),
            ] {
                if let Some(why) = not_a_file(p) {
                    return Err(format!("{key}: {why}"));
                }
            }
        }
        Ok(())
    }

    /// Total warmup steps for a run of `total` steps.
    pub(crate) fn warmup_steps(&self, total: u64) -> u64 {
        match (self.train.warmup_steps, self.train.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total as f64).ceil() as u64,
            (None, None) => (DEFAULT_WARMUP_RATIO * total as f64).ceil() as u64,
        }
    }
}

/// `--set` values: TOML scalars and arrays when they parse as such, otherwise plain strings.
/// Why `p` cannot be read as a file, if it cannot.
/// Why `p` cannot be read as data: it is missing, or a folder that is not a table.
fn not_a_file(p: &Path) -> Option<String> {
    if p.is_dir() && !crate::data::table::is_table_dir(p) {
        Some(format!(
            "{} is a directory but not a table (Parquet shards, or a `datasets` save_to_disk folder); give a file",
            p.display()
        ))
    } else if !p.exists() {
        Some(format!("{} does not exist", p.display()))
    } else {
        None
    }
}

/// Where the value of `key` came from (a later source wins): a `--set`, an environment variable,
/// or the file.
fn source_of(key: &str, file: &Path, sets: &[String]) -> String {
    if let Some(set) = sets.iter().rev().find(|s| {
        s.split_once('=')
            .is_some_and(|(k, _)| key.starts_with(k.trim()))
    }) {
        return format!("--set {set}");
    }
    let var = format!("MULTIPOS__{}", key.to_uppercase().replace('.', "__"));
    if std::env::var_os(&var).is_some() {
        return format!("environment variable {var}");
    }
    file.display().to_string()
}

fn parse_override(value: &str) -> config::Value {
    let parsed: std::result::Result<toml::Value, _> = toml::from_str(&format!("v = {value}"))
        .map(|mut t: toml::Table| t.remove("v").expect("key v present"));
    match parsed {
        Ok(v) => toml_to_config(v),
        Err(_) => config::Value::from(value.to_string()),
    }
}

fn toml_to_config(v: toml::Value) -> config::Value {
    match v {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Array(a) => a.into_iter().map(toml_to_config).collect::<Vec<_>>().into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("train.jsonl"),
            "{\"query\": \"q\", \"positives\": [\"a\"]}\n",
        )
        .unwrap();
        let p = dir.path().join("run.toml");
        let text = text.replace(
            "TRAIN",
            &dir.path().join("train.jsonl").display().to_string(),
        );
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    const BASE: &str = "[data]\ntrain = \"TRAIN\"\n[output]\ndir = \"out\"\n";

    #[test]
    fn defaults_overrides_and_unknown_keys() {
        let (_d, p) = write(BASE);
        let cfg = RunConfig::load(&p, &[]).unwrap();
        assert_eq!(cfg.train.batch_size, 32);
        let cfg = RunConfig::load(
            &p,
            &[
                "train.lr=1e-4".into(),
                "data.mode=\"all\"".into(),
                "train.symmetric=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                cfg.train.lr,
                cfg.data.as_ref().unwrap().mode,
                cfg.train.symmetric
            ),
            (1e-4, Mode::All, true)
        );

        let (_d, p) = write(&format!("{BASE}[train]\nbatch_sise = 8\n"));
        let err = RunConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            err.contains("run.toml") && err.contains("batch_sise"),
            "{err}"
        );
    }

    #[test]
    fn impossible_values_are_explained() {
        let cases = [
            ("[train]\nbatch_size = 1\n", "batch_size must be at least 2"),
            (
                "[train]\nmax_steps = 5\nwarmup_ratio = 0.5\nwarmup_steps = 2\n",
                "not both",
            ),
            (
                "[train]\nmax_steps = 5\nwarmup_steps = 9\n",
                "warmup_steps = 9 exceeds train.max_steps = 5",
            ),
            ("[train]\nlr = -1.0\n", "train.lr must be a positive number"),
            (
                "[cluster]\ncollective = \"nccl\"\n",
                "does not bind c10d's NCCL process group",
            ),
            ("[cluster]\ncollective = \"mpi\"\n", "unknown variant `mpi`"),
            (
                "[cluster]\nstore_bind = \"127.0.0.1:29500\"\n",
                "needs cluster.collective = \"gloo\"",
            ),
        ];
        for (extra, needle) in cases {
            let (_d, p) = write(&format!("{BASE}{extra}"));
            let err = RunConfig::load(&p, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let (_d, p) = write(BASE);
        let err = RunConfig::load(
            &p,
            &[
                "train.max_steps=5".into(),
                "train.warmup_steps=9".into(),
                "train.warmup_ratio=0.0".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn tasks_are_one_data_section_or_named_tasks() {
        let (_d, p) = write(BASE);
        let tasks = RunConfig::load(&p, &["train.scale=10.0".into()])
            .unwrap()
            .tasks();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].name, DEFAULT_TASK);
        assert_eq!(
            tasks[0].loss,
            LossConfig::Mnrl(MnrlConfig {
                scale: 10.0,
                ..MnrlConfig::default()
            }),
            "the legacy keys still set the default MNRL"
        );
        let two = "[[tasks]]\nname = \"a\"\ntrain = \"TRAIN\"\n[[tasks]]\nname = \"b\"\ntrain = \"TRAIN\"\nloss = { type = \"CoSENTLoss\", scale = 5.0 }\n[output]\ndir = \"out\"\n";
        let (_d, p) = write(two);
        let tasks = RunConfig::load(&p, &[]).unwrap().tasks();
        assert_eq!(
            tasks[1].loss,
            LossConfig::Cosent(crate::loss::CoSentConfig { scale: 5.0 })
        );
        let cases = [
            (
                format!("{BASE}[[tasks]]\nname = \"a\"\ntrain = \"TRAIN\"\n"),
                "not both",
            ),
            (
                "[output]\ndir = \"out\"\n".to_string(),
                "a [data] section or [[tasks]]",
            ),
            (two.replace("\"b\"", "\"a\""), "two tasks are named \"a\""),
            (two.replace("\"b\"", "\"b/c\""), "must be 1-64 letters"),
            (
                format!("{BASE}[loss]\ntype = \"softmax\"\n[train]\nscale = 3.0\n"),
                "set them in the loss",
            ),
            (
                two.replace("scale = 5.0", "scale = -1.0"),
                "task \"b\": loss.scale must be positive",
            ),
            (two.replace("scale = 5.0", "scael = 5.0"), "scael"),
            (two.replace("CoSENTLoss", "TripletLoss"), "TripletLoss"),
            (
                format!("{BASE}[loss]\ntype = \"mnrl\"\nhardness_strength = -2.0\n"),
                "hardness_strength must be a non-negative",
            ),
            (
                format!("{BASE}[model]\nprecision = \"bf16\"\ndevice = \"cpu\"\n"),
                "needs a CUDA device",
            ),
        ];
        for (text, needle) in cases {
            let (_d, p) = write(&text);
            let err = RunConfig::load(&p, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
