//! A sentence-transformers model: encoder + pooling (+ normalisation), loaded from and saved to the
//! directory layout that Python `SentenceTransformer(path)` reads.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tch::{Device, Tensor, nn::VarStore};
use tokenizers::Encoding;

use super::bert::{BertModel, Init};
use super::config::{
    BertConfig, ModuleEntry, PoolingConfig, PoolingMode, Role, SentenceBertConfig, Usage,
};
use super::dropout::RowSeeds;
use super::layout;
use super::pooling::{normalize_l2, pool};
use super::tokenize::{TextTokenizer, TokenBatch};
use super::weights::{self, HostTensor};
use crate::error::{Error, Result};
use crate::io::{atomic, json};

/// Tokenizer files copied verbatim on save so Python sees exactly the tokenizer we trained with.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// The sentence-transformers modules multipos understands, read from `modules.json`.
struct Pipeline {
    transformer_dir: PathBuf,
    pooling_file: Option<PathBuf>,
    normalize: bool,
}

fn module_kind(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
}

fn read_pipeline(dir: &Path) -> Result<Pipeline> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        tracing::warn!(dir = %dir.display(), "no modules.json: treating it as a plain encoder with mean pooling");
        return Ok(Pipeline {
            transformer_dir: dir.to_path_buf(),
            pooling_file: None,
            normalize: false,
        });
    }
    let mut modules: Vec<ModuleEntry> = json::read(&modules_path)?;
    modules.sort_by_key(|m| m.idx);
    let mut pipeline = Pipeline {
        transformer_dir: dir.to_path_buf(),
        pooling_file: None,
        normalize: false,
    };
    for (pos, module) in modules.iter().enumerate() {
        match (pos, module_kind(&module.kind)) {
            (0, "Transformer") => pipeline.transformer_dir = dir.join(&module.path),
            (1, "Pooling") => {
                pipeline.pooling_file = Some(dir.join(&module.path).join("config.json"))
            }
            (2, "Normalize") => pipeline.normalize = true,
            (_, kind) => {
                return Err(Error::Unsupported {
                    path: modules_path,
                    what: "module",
                    reason: format!(
                        "'{kind}' at position {pos} (multipos runs Transformer, Pooling, then optional Normalize)"
                    ),
                });
            }
        }
    }
    if pipeline.pooling_file.is_none() {
        return Err(Error::invalid(
            &modules_path,
            "no Pooling module after the Transformer",
        ));
    }
    Ok(pipeline)
}

/// What turns token states into sentence vectors, and how the encoder runs.
struct Head<'a> {
    modes: &'a [PoolingMode],
    normalize: bool,
    compute: Option<tch::Kind>,
    device: Device,
}

impl Head<'_> {
    fn forward_t(&self, bert: &BertModel, batch: &TokenBatch, seeds: Option<&RowSeeds>) -> Tensor {
        let batch = batch.to(self.device);
        let states = bert.forward_t(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            seeds,
            self.compute,
        );
        let pooled = pool(&states, &batch.attention_mask, self.modes);
        if self.normalize {
            normalize_l2(&pooled)
        } else {
            pooled
        }
    }
}

/// An encoder with its tokenizer and pooling, on one device.
pub struct SentenceModel {
    vs: VarStore,
    bert: BertModel,
    config: BertConfig,
    tokenizer: TextTokenizer,
    pooling: PoolingConfig,
    normalize: bool,
    sbert: SentenceBertConfig,
    /// Prompts and similarity function, written back as they came.
    usage: Usage,
    config_json: serde_json::Value,
    tokenizer_files: BTreeMap<&'static str, Vec<u8>>,
    passthrough: BTreeMap<String, HostTensor>,
    compute: Option<tch::Kind>,
    /// Encoders for the extra inference streams, built once and kept for later `embed` calls.
    replicas: Mutex<Vec<Replica>>,
}

/// A second encoder whose parameters share a model's storage (no copy), for another thread:
/// tensors are `Send` but not `Sync`, so each thread needs tensor handles of its own.
struct Replica {
    vs: VarStore,
    bert: BertModel,
}

impl Replica {
    fn new(device: Device, config: &BertConfig) -> Self {
        let vs = VarStore::new(device);
        let bert = BertModel::load(vs.root(), config, Init::Zeros);
        Self { vs, bert }
    }

    /// Points every parameter at `source`'s storage as it is now: loading weights or healing may
    /// have given the model new tensors since the last call, and re-pointing costs no copy.
    fn share(&self, source: &std::collections::HashMap<String, Tensor>) {
        for (name, mut var) in self.vs.variables() {
            var.set_data(&source[&name]);
        }
    }
}

/// `sentence_bert_config.json` as both layouts write it: sentence-transformers 3.x–5.x name
/// `max_seq_length` there; 6.x leaves it out (its file holds the transformer's task and modality)
/// and takes the tokenizer's `model_max_length`.
#[derive(serde::Deserialize)]
struct SbertFile {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// `sentence_bert_config.json` of a transformer directory (defaults where it is missing): its
/// `max_seq_length`, else the tokenizer's `model_max_length` (`tokenizer_config.json`), else the
/// position table, clamped to the position table.
fn read_sbert(tdir: &Path, config: &BertConfig) -> Result<SentenceBertConfig> {
    let sbert_path = tdir.join("sentence_bert_config.json");
    let table = config.max_position_embeddings as usize;
    let file = if sbert_path.exists() {
        json::read::<SbertFile>(&sbert_path)?
    } else {
        SbertFile {
            max_seq_length: None,
            do_lower_case: false,
        }
    };
    let declared = file.max_seq_length;
    let max_seq_length = match declared {
        Some(n) => n,
        None => tokenizer_max_length(tdir)?.map_or(table, |n| n.min(table)),
    };
    let mut sbert = SentenceBertConfig {
        max_seq_length,
        do_lower_case: file.do_lower_case,
    };
    if sbert.max_seq_length == 0 {
        return Err(Error::invalid(
            &sbert_path,
            "max_seq_length must be positive",
        ));
    }
    if sbert.max_seq_length > table {
        tracing::warn!(
            max_seq_length = sbert.max_seq_length,
            max_position_embeddings = config.max_position_embeddings,
            "max_seq_length exceeds the position table; clamping"
        );
        sbert.max_seq_length = table;
    }
    Ok(sbert)
}

/// `model_max_length` of `tokenizer_config.json`, when the file names a usable one (tokenizers
/// without a limit write a huge sentinel, 1e30).
fn tokenizer_max_length(tdir: &Path) -> Result<Option<usize>> {
    let path = tdir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let config: serde_json::Value = json::read(&path)?;
    match config.get("model_max_length") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n >= 1.0 && n.fract() == 0.0 => Ok((n < 1e9).then_some(n as usize)),
            _ => Err(Error::invalid(
                &path,
                format!("model_max_length must be a positive whole number, got {v}"),
            )),
        },
    }
}

/// Refuses a `max_seq_length` override the position table cannot take.
fn check_max_seq_length(n: usize, config: &BertConfig) -> Result<()> {
    let most = config.max_position_embeddings as usize;
    if !(2..=most).contains(&n) {
        return Err(Error::Usage(format!(
            "max_seq_length must be within 2..={most} for this model ([CLS] and [SEP] take \
             two tokens; its position embeddings end at {most}), got {n}"
        )));
    }
    Ok(())
}

/// The `max_seq_length` the model in `dir` runs with — `configured` (an override) when given —
/// as `load` and `set_max_seq_length` would set it, without loading the weights.
pub(crate) fn max_seq_length_of(dir: &Path, configured: Option<usize>) -> Result<usize> {
    let tdir = read_pipeline(dir)?.transformer_dir;
    let config = BertConfig::load(&tdir.join("config.json"))?;
    match configured {
        Some(n) => check_max_seq_length(n, &config).map(|()| n),
        None => Ok(read_sbert(&tdir, &config)?.max_seq_length),
    }
}

/// The pooling of `pooling_file` (mean pooling without one), checked against the encoder's
/// `config` read from `config_path`.
fn read_pooling(
    pooling_file: Option<&Path>,
    config: &BertConfig,
    config_path: &Path,
) -> Result<PoolingConfig> {
    let Some(path) = pooling_file else {
        return Ok(PoolingConfig {
            dimension: config.hidden_size,
            modes: vec![PoolingMode::Mean],
            include_prompt: true,
        });
    };
    let p = PoolingConfig::load(path)?;
    if p.dimension != config.hidden_size {
        return Err(Error::invalid(
            path,
            format!(
                "word_embedding_dimension {} differs from hidden_size {} in {}",
                p.dimension,
                config.hidden_size,
                config_path.display()
            ),
        ));
    }
    Ok(p)
}

/// The tokenizer files of the transformer directory `tdir`, as they are, to save them unchanged.
fn read_tokenizer_files(tdir: &Path) -> Result<BTreeMap<&'static str, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for name in TOKENIZER_FILES {
        let path = tdir.join(name);
        if path.exists() {
            files.insert(*name, fs::read(&path).map_err(Error::io("read", &path))?);
        }
    }
    Ok(files)
}

impl SentenceModel {
    /// Loads a sentence-transformers directory onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(
                dir,
                "model directory does not exist or is not a directory",
            ));
        }
        let pipeline = read_pipeline(dir)?;
        let tdir = &pipeline.transformer_dir;
        let config_path = tdir.join("config.json");
        let config = BertConfig::load(&config_path)?;
        let config_json: serde_json::Value = json::read(&config_path)?;

        let sbert = read_sbert(tdir, &config)?;
        let usage = Usage::load(dir)?;

        let pooling = read_pooling(pipeline.pooling_file.as_deref(), &config, &config_path)?;
        let tokenizer_path = tdir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::invalid(
                &tokenizer_path,
                "missing (multipos needs a fast-tokenizer tokenizer.json)",
            ));
        }
        let tokenizer =
            TextTokenizer::load(&tokenizer_path, sbert.max_seq_length, sbert.do_lower_case)?;
        let tokenizer_files = read_tokenizer_files(tdir)?;

        let weights_path = tdir.join("model.safetensors");
        if !weights_path.exists() {
            let hint = if tdir.join("pytorch_model.bin").exists() {
                " (only pytorch_model.bin found: convert it to safetensors first)"
            } else {
                ""
            };
            return Err(Error::invalid(&weights_path, format!("missing{hint}")));
        }
        let mut vs = VarStore::new(device);
        let bert = BertModel::load(vs.root(), &config, Init::Zeros);
        let passthrough = weights::load_into(&mut vs, &weights_path)?;

        Ok(Self {
            vs,
            bert,
            config,
            tokenizer,
            pooling,
            normalize: pipeline.normalize,
            sbert,
            usage,
            config_json,
            tokenizer_files,
            passthrough,
            compute: None,
            replicas: Mutex::new(Vec::new()),
        })
    }

    /// The device the parameters live on.
    pub(crate) fn device(&self) -> Device {
        self.vs.device()
    }

    /// The parameters, by checkpoint name.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The tokenizer, configured with this model's truncation.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The prompt a text in `role` gets (see [`Role`]), `None` when it gets none.
    pub fn prompt(&self, role: Role) -> Option<&str> {
        self.usage.prompt(role)
    }

    /// Embeds `texts` in `role`: with the model's prompt for it in front, as sentence-transformers'
    /// `encode_query`, `encode_document` and `encode` do.
    pub fn embed_as(&self, texts: &[&str], role: Role, batch_size: usize) -> Result<Tensor> {
        self.embed_prompted(texts, self.prompt(role), batch_size)
    }

    /// Embeds `texts`, each with `prompt` in front when there is one.
    pub(crate) fn embed_prompted(
        &self,
        texts: &[&str],
        prompt: Option<&str>,
        batch_size: usize,
    ) -> Result<Tensor> {
        match prompt {
            None => self.embed(texts, batch_size),
            Some(p) => {
                let owned = super::config::prompted(texts.iter().copied(), Some(p));
                let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
                self.embed(&refs, batch_size)
            }
        }
    }

    /// Length of the sentence vector.
    pub fn dimension(&self) -> i64 {
        self.pooling.dimension * self.pooling.modes.len() as i64
    }

    /// Token cap per text, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.sbert.max_seq_length
    }

    /// Overrides `max_seq_length` (clamped to the position table), e.g. for faster training.
    pub(crate) fn set_max_seq_length(&mut self, n: usize) -> Result<()> {
        check_max_seq_length(n, &self.config)?;
        self.tokenizer.set_max_length(n)?;
        self.sbert.max_seq_length = n;
        Ok(())
    }

    /// Runs the encoder's matrix products in bf16 (`true`, mixed precision: weights, outputs and
    /// everything else stay f32) or in f32. Whether the device suits bf16 is the caller's call.
    pub fn set_bf16(&mut self, on: bool) {
        self.compute = on.then_some(tch::Kind::BFloat16);
    }

    /// Sentence vectors for an already tokenized batch (autograd on unless the caller disables it);
    /// `seeds`, one per row, turns dropout on (see [`super::dropout`]).
    pub fn forward_t(&self, batch: &TokenBatch, seeds: Option<&RowSeeds>) -> Tensor {
        self.head().forward_t(&self.bert, batch, seeds)
    }

    fn head(&self) -> Head<'_> {
        Head {
            modes: &self.pooling.modes,
            normalize: self.normalize,
            compute: self.compute,
            device: self.device(),
        }
    }

    /// Embeds `texts` in inference mode, `batch_size` at a time; returns (n, dimension) f32 on the
    /// CPU in input order. Texts are batched longest-first by token count (sentence-transformers
    /// sorts by character count, which pads about 9% more tokens on InsuranceQA answers).
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        let encodings = self.tokenizer.encode_each(texts)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let batches: Vec<&[usize]> = order.chunks(batch_size.max(1)).collect();
        let (head, tokenizer) = (self.head(), &self.tokenizer);
        let encode = |bert: &BertModel, b: usize| {
            let rows: Vec<&Encoding> = batches[b].iter().map(|&i| &encodings[i]).collect();
            head.forward_t(bert, &tokenizer.pad(&rows), None)
                .to_device(Device::Cpu)
        };
        let longest = order.first().map_or(0, |&i| encodings[i].len());
        let per_stream = self.config.inference_bytes(batch_size.max(1), longest);
        let vectors = self.in_streams(batches.len(), per_stream, encode);
        let mut out = Tensor::zeros(
            [texts.len() as i64, self.dimension()],
            (tch::Kind::Float, Device::Cpu),
        );
        for (batch, v) in batches.iter().zip(vectors) {
            let index = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let _ = out.index_copy_(0, &index, &v);
        }
        Ok(out)
    }

    /// Runs `encode` on batches `0..n` without autograd and returns the results in batch order: on
    /// the CPU with T libtorch threads in T single-threaded streams side by side, since an
    /// encoder's small operators split badly over threads (docs/design.md §10) — fewer streams,
    /// sharing the T threads, where memory does not hold T batches' activations at `per_stream`
    /// bytes each; one stream elsewhere.
    fn in_streams<F>(&self, n: usize, per_stream: u64, encode: F) -> Vec<Tensor>
    where
        F: Fn(&BertModel, usize) -> Tensor + Sync,
    {
        let threads = tch::get_num_threads().max(1) as usize;
        let streams = if self.device() == Device::Cpu {
            crate::device::inference_streams(threads, n, per_stream, crate::memory::available())
        } else {
            1
        };
        // Uncapped streams stay single-threaded, so every batch goes through the same kernels.
        let capped = streams < threads.min(n);
        if capped {
            tracing::debug!(
                streams,
                threads,
                per_stream,
                "inference streams capped by memory"
            );
        }
        let stream_threads = if capped {
            (threads / streams) as i32
        } else {
            1
        };
        if streams <= 1 {
            let _guard = tch::no_grad_guard();
            return (0..n).map(|b| encode(&self.bert, b)).collect();
        }
        let next = AtomicUsize::new(0);
        let work = |bert: &BertModel| {
            tch::set_num_threads(stream_threads);
            let _guard = tch::no_grad_guard();
            let mut done = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= n {
                    return done;
                }
                done.push((b, encode(bert, b)));
            }
        };
        let work = &work;
        let replicas = self.take_replicas(streams - 1);
        let (mut done, mut kept) = (Vec::new(), Vec::new());
        std::thread::scope(|scope| {
            let helpers: Vec<_> = replicas
                .into_iter()
                .map(|replica| {
                    scope.spawn(move || {
                        let done = work(&replica.bert);
                        (replica, done)
                    })
                })
                .collect();
            done = work(&self.bert);
            for helper in helpers {
                let (replica, part) = helper.join().expect("an embedding stream panicked");
                done.extend(part);
                kept.push(replica);
            }
        });
        self.keep_replicas(kept);
        tch::set_num_threads(threads as i32);
        done.sort_by_key(|(b, _)| *b);
        done.into_iter().map(|(_, t)| t).collect()
    }

    /// `n` encoders sharing the parameters as they are now: the kept ones first, new ones beyond.
    fn take_replicas(&self, n: usize) -> Vec<Replica> {
        let mut kept = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        let at = n.min(kept.len());
        let mut out: Vec<Replica> = kept.drain(..at).collect();
        drop(kept);
        out.extend((out.len()..n).map(|_| Replica::new(self.device(), &self.config)));
        let source = self.vs.variables();
        for replica in &out {
            replica.share(&source);
        }
        out
    }

    /// Keeps `replicas` for later calls.
    fn keep_replicas(&self, replicas: Vec<Replica>) {
        let mut kept = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        kept.extend(replicas);
    }

    /// Writes a complete sentence-transformers directory at `dir`, atomically (staged beside it and
    /// renamed into place).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let staged = atomic::StagedDir::create(dir)?;
        self.write_dir(staged.path())?;
        staged.commit()?;
        Ok(())
    }

    /// Writes the directory's files into `root` (created if missing), without staging: for callers
    /// that stage a larger directory themselves (checkpoints).
    pub(crate) fn write_dir(&self, root: &Path) -> Result<()> {
        fs::create_dir_all(root).map_err(Error::io("create directory", root))?;
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let path = root.join(name);
            fs::write(&path, bytes).map_err(Error::io("write", &path))
        };
        write(
            "model.safetensors",
            &weights::serialize(&self.vs, &self.passthrough)?,
        )?;
        write("config.json", &json::to_pretty(&self.config_json))?;
        for (name, bytes) in &self.tokenizer_files {
            write(name, bytes)?;
        }
        layout::write_metadata(
            root,
            &self.sbert,
            &self.pooling,
            self.normalize,
            &self.usage,
        )
    }

    /// Replaces the weights with those of a `model.safetensors` of the same architecture.
    pub(crate) fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.passthrough = weights::load_into(&mut self.vs, path)?;
        Ok(())
    }
}
