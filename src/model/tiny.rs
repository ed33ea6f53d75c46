//! A randomly initialised tiny BERT in the real on-disk format, with a real WordPiece tokenizer:
//! fast tests and benchmarks exercise the same loader as production models.
use std::fs;
use std::path::Path;

use tch::{Device, nn::VarStore};
use tokenizers::Tokenizer;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;

use super::bert::{BertModel, Init};
use super::config::{BertConfig, PoolingConfig, PoolingMode, SentenceBertConfig};
use super::{layout, weights};
use crate::error::{Error, Result};
use crate::io::json;

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden_size: i64,
    pub layers: i64,
    pub heads: i64,
    pub max_seq_length: usize,
    pub pooling: Vec<PoolingMode>,
    pub normalize: bool,
    pub dropout: f64,
    pub seed: i64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden_size: 32,
            layers: 2,
            heads: 4,
            max_seq_length: 64,
            pooling: vec![PoolingMode::Mean],
            normalize: true,
            dropout: 0.1,
            seed: 0,
        }
    }
}

const SPECIALS: &[&str] = &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const WORDS: &[&str] = &[
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "he",
    "for",
    "it",
    "with",
    "as",
    "his",
    "on",
    "be",
    "at",
    "by",
    "god",
    "lord",
    "man",
    "said",
    "unto",
    "them",
    "shall",
    "water",
    "insurance",
    "policy",
    "car",
    "home",
    "life",
    "claim",
    "cover",
    "does",
    "what",
    "how",
    "who",
    "free",
    "peace",
    "faith",
];

fn vocabulary() -> Vec<String> {
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    for c in ('a'..='z').chain('0'..='9') {
        // "a" is already a word; a repeated entry would leave a hole in the id range.
        if !vocab.contains(&c.to_string()) {
            vocab.push(c.to_string());
        }
        vocab.push(format!("##{c}"));
    }
    vocab.extend(".,;:!?'\"-()".chars().map(|c| c.to_string()));
    vocab
}

fn tokenizer(vocab_txt: &Path) -> Result<Tokenizer> {
    let fail = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let model = WordPiece::builder()
        .files(vocab_txt.to_string_lossy().into_owned())
        .unk_token("[UNK]".into())
        .build()
        .map_err(fail)?;
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(post));
    Ok(tok)
}

/// Writes a complete sentence-transformers directory with random weights drawn from `spec.seed`.
pub fn write_random_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
    let vocab = vocabulary();
    let config = BertConfig {
        vocab_size: vocab.len() as i64,
        hidden_size: spec.hidden_size,
        num_hidden_layers: spec.layers,
        num_attention_heads: spec.heads,
        intermediate_size: spec.hidden_size * 2,
        hidden_dropout_prob: spec.dropout,
        attention_probs_dropout_prob: spec.dropout,
        max_position_embeddings: 128,
        ..BertConfig::all_mini_lm_l6_v2()
    };
    let mut config_json = serde_json::to_value(&config).expect("plain data");
    config_json["architectures"] = serde_json::json!(["BertModel"]);
    config_json["pad_token_id"] = 0.into();
    fs::write(dir.join("config.json"), json::to_pretty(&config_json))
        .map_err(Error::io("write", dir.join("config.json")))?;

    tch::manual_seed(spec.seed);
    let vs = VarStore::new(Device::Cpu);
    let _model = BertModel::load(vs.root(), &config, Init::Random);
    let bytes = weights::serialize(&vs, &Default::default())?;
    fs::write(dir.join("model.safetensors"), bytes)
        .map_err(Error::io("write", dir.join("model.safetensors")))?;

    let vocab_txt = dir.join("vocab.txt");
    fs::write(&vocab_txt, vocab.join("\n") + "\n").map_err(Error::io("write", &vocab_txt))?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer(&vocab_txt)?
        .save(&tok_path, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let sbert = SentenceBertConfig {
        max_seq_length: spec.max_seq_length,
        do_lower_case: false,
    };
    let pooling = PoolingConfig {
        dimension: spec.hidden_size,
        modes: spec.pooling.clone(),
        include_prompt: true,
    };
    layout::write_metadata(dir, &sbert, &pooling, spec.normalize, &Default::default())
}
