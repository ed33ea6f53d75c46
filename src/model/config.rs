//! The JSON files of a sentence-transformers model directory, deserialised and validated.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::json;

/// `model_type`s whose checkpoints use BERT's module names and absolute position embeddings.
const BERT_FAMILY: &[&str] = &["bert"];

/// The Hugging Face `config.json` of a BERT encoder (only the fields the encoder uses).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub(crate) struct BertConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_positions() -> i64 {
    512
}
fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads `config.json` and rejects what the encoder cannot run.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let cfg: BertConfig = json::read(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |what, reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            what,
            reason,
        };
        if !BERT_FAMILY.contains(&self.model_type.as_str()) {
            return Err(unsupported(
                "model_type",
                format!(
                    "'{}' (multipos runs BERT-family encoders: {})",
                    self.model_type,
                    BERT_FAMILY.join(", ")
                ),
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(unsupported("hidden_act", format!("'{}'", self.hidden_act)));
        }
        if self.position_embedding_type != "absolute" {
            return Err(unsupported(
                "position_embedding_type",
                format!("'{}' (only 'absolute')", self.position_embedding_type),
            ));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return Err(Error::invalid(
                    path,
                    format!("{field} must be positive, got {value}"),
                ));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::invalid(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Ok(())
    }

    /// An estimate, on the high side, of the bytes one inference forward pass of `rows` texts of
    /// `tokens` tokens holds at its peak in f32: one layer's feed-forward activations (before and
    /// after the activation function) beside a few hidden-state copies. The fused attention kernel
    /// keeps no (tokens × tokens) scores, and under `no_grad` earlier layers' activations are freed.
    pub(crate) fn inference_bytes(&self, rows: usize, tokens: usize) -> u64 {
        let per_token = 2 * self.intermediate_size as u64 + 4 * self.hidden_size as u64;
        4 * rows as u64 * tokens as u64 * per_token
    }

    /// all-MiniLM-L6-v2's shape, the default model.
    pub(crate) fn all_mini_lm_l6_v2() -> Self {
        Self {
            model_type: "bert".into(),
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            hidden_act: default_hidden_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: default_position_type(),
        }
    }
}

/// `sentence_bert_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub(crate) struct SentenceBertConfig {
    pub max_seq_length: usize,
    #[serde(default)]
    pub do_lower_case: bool,
}

/// One entry of `modules.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub(crate) struct ModuleEntry {
    pub idx: usize,
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// How token states become one sentence vector; several modes concatenate in this order, as in
/// sentence-transformers' `Pooling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    Cls,
    Max,
    Mean,
    MeanSqrtLen,
}

/// How `config_sentence_transformers.json` says to use the model, kept from load to save: its
/// prompts by name, the default prompt's name and the similarity function.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    pub prompts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub default_prompt_name: Option<String>,
    #[serde(default)]
    pub similarity_fn_name: Option<String>,
}

impl Usage {
    /// Reads `config_sentence_transformers.json` in `dir`, if there is one. A default prompt name
    /// that names no prompt is refused, as sentence-transformers refuses it.
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config_sentence_transformers.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let usage: Self = json::read(&path)?;
        if let Some(name) = &usage.default_prompt_name
            && !usage.prompts.contains_key(name)
        {
            return Err(Error::invalid(
                &path,
                format!(
                    "field \"default_prompt_name\": {name:?} is not one of the prompts {:?}",
                    usage.prompts.keys().collect::<Vec<_>>()
                ),
            ));
        }
        Ok(usage)
    }

    /// The prompt a text in `role` gets, as sentence-transformers' `encode_query`,
    /// `encode_document` and `encode` choose it: the role's own prompt when the model names one
    /// (an empty one included, which stops the fallback), else the default prompt.
    pub(crate) fn prompt(&self, role: Role) -> Option<&str> {
        let own: &[&str] = match role {
            Role::Query => &["query"],
            Role::Document => &["document", "passage", "corpus"],
            Role::Plain => &[],
        };
        let name = own
            .iter()
            .find(|n| self.prompts.contains_key(**n))
            .map(|n| n.to_string())
            .or_else(|| self.default_prompt_name.clone())?;
        self.prompts
            .get(&name)
            .map(String::as_str)
            .filter(|p| !p.is_empty())
    }
}

/// What a text is to the model, for its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A query (`encode_query`): the `query` prompt.
    Query,
    /// A document (`encode_document`): the `document`, `passage` or `corpus` prompt.
    Document,
    /// Any text (`encode`): the default prompt, if the model names one.
    Plain,
}

/// `texts` with `prompt` in front of each, as sentence-transformers prepends it.
pub(crate) fn prompted<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    prompt: Option<&str>,
) -> Vec<String> {
    let p = prompt.unwrap_or("");
    texts.into_iter().map(|t| format!("{p}{t}")).collect()
}

/// `1_Pooling/config.json`, in the legacy (v5) boolean spelling or the newer `pooling_mode` string
/// (with 6.x's `embedding_dimension`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolingConfig {
    pub dimension: i64,
    pub modes: Vec<PoolingMode>,
    pub include_prompt: bool,
}

#[derive(Deserialize)]
struct RawPooling {
    // sentence-transformers 6.x writes `embedding_dimension`.
    #[serde(alias = "embedding_dimension")]
    word_embedding_dimension: i64,
    pooling_mode: Option<String>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default = "default_true")]
    include_prompt: bool,
}

fn default_true() -> bool {
    true
}

impl PoolingConfig {
    /// Reads a pooling config; unknown or unsupported modes are errors naming the file.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let raw: RawPooling = json::read(path)?;
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            what: "pooling mode",
            reason,
        };
        let modes = if let Some(mode) = &raw.pooling_mode {
            vec![match mode.as_str() {
                "cls" => PoolingMode::Cls,
                "max" => PoolingMode::Max,
                "mean" => PoolingMode::Mean,
                "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
                other => {
                    return Err(unsupported(format!(
                        "'{other}' (supported: cls, max, mean, mean_sqrt_len_tokens)"
                    )));
                }
            }]
        } else {
            if raw.pooling_mode_weightedmean_tokens || raw.pooling_mode_lasttoken {
                return Err(unsupported(
                    "weightedmean and lasttoken pooling are not supported".into(),
                ));
            }
            [
                (raw.pooling_mode_cls_token, PoolingMode::Cls),
                (raw.pooling_mode_max_tokens, PoolingMode::Max),
                (raw.pooling_mode_mean_tokens, PoolingMode::Mean),
                (
                    raw.pooling_mode_mean_sqrt_len_tokens,
                    PoolingMode::MeanSqrtLen,
                ),
            ]
            .into_iter()
            .filter_map(|(on, m)| on.then_some(m))
            .collect()
        };
        if modes.is_empty() {
            return Err(unsupported("no pooling mode is enabled".into()));
        }
        if !raw.include_prompt {
            return Err(unsupported(
                "include_prompt = false is not supported".into(),
            ));
        }
        Ok(Self {
            dimension: raw.word_embedding_dimension,
            modes,
            include_prompt: raw.include_prompt,
        })
    }

    /// The legacy (v5) JSON that sentence-transformers 5.x and 6.x both load.
    pub(crate) fn to_legacy_json(&self) -> serde_json::Value {
        let has = |m| self.modes.contains(&m);
        serde_json::json!({
            "word_embedding_dimension": self.dimension,
            "pooling_mode_cls_token": has(PoolingMode::Cls),
            "pooling_mode_mean_tokens": has(PoolingMode::Mean),
            "pooling_mode_max_tokens": has(PoolingMode::Max),
            "pooling_mode_mean_sqrt_len_tokens": has(PoolingMode::MeanSqrtLen),
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": self.include_prompt,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_role_takes_its_own_prompt_else_the_default_and_an_empty_one_stops_the_fallback() {
        let usage = |prompts: &[(&str, &str)], default: Option<&str>| Usage {
            prompts: prompts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            default_prompt_name: default.map(str::to_string),
            similarity_fn_name: None,
        };
        let u = usage(
            &[("query", "q: "), ("passage", "p: "), ("x", "x: ")],
            Some("x"),
        );
        assert_eq!(u.prompt(Role::Query), Some("q: "));
        assert_eq!(u.prompt(Role::Document), Some("p: "));
        assert_eq!(u.prompt(Role::Plain), Some("x: "));
        let u = usage(&[("query", ""), ("x", "x: ")], Some("x"));
        assert_eq!(
            u.prompt(Role::Query),
            None,
            "an empty query prompt is no prompt"
        );
        assert_eq!(
            u.prompt(Role::Document),
            Some("x: "),
            "no document prompt: the default"
        );
        assert_eq!(usage(&[], None).prompt(Role::Plain), None);
        assert_eq!(prompted(["a", "b"], Some("q: ")), ["q: a", "q: b"]);
    }

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn rejects_non_bert_model_type() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = serde_json::to_value(BertConfig::all_mini_lm_l6_v2()).unwrap();
        cfg["model_type"] = "gpt2".into();
        let p = write(dir.path(), "config.json", &cfg.to_string());
        let err = BertConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("'gpt2'"),
            "{err}"
        );
    }

    #[test]
    fn pooling_modes_legacy_and_string() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            r#"{"word_embedding_dimension": 8, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
        );
        let cfg = PoolingConfig::load(&p).unwrap();
        assert_eq!(cfg.modes, vec![PoolingMode::Cls, PoolingMode::Mean]);
        let p = write(
            dir.path(),
            "b.json",
            r#"{"word_embedding_dimension": 8, "pooling_mode": "max"}"#,
        );
        assert_eq!(
            PoolingConfig::load(&p).unwrap().modes,
            vec![PoolingMode::Max]
        );
        let p = write(
            dir.path(),
            "c.json",
            r#"{"word_embedding_dimension": 8, "pooling_mode": "median"}"#,
        );
        let err = PoolingConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("c.json") && err.contains("'median'"), "{err}");
    }
}
