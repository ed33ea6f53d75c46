//! The sentence-transformers metadata files around an encoder (docs/design.md §10), in the legacy (v5)
//! spellings that sentence-transformers 5.x and 6.x both load.
use std::fs;
use std::path::Path;

use super::config::{ModuleEntry, PoolingConfig, SentenceBertConfig, Usage};
use crate::error::{Error, Result};
use crate::io::json;

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

fn write(root: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = root.join(name);
    fs::write(&path, bytes).map_err(Error::io("write", &path))
}

fn module(idx: usize, path: &str, kind: &str) -> ModuleEntry {
    ModuleEntry {
        idx,
        name: idx.to_string(),
        path: path.into(),
        kind: kind.into(),
    }
}

/// Writes `modules.json`, `config_sentence_transformers.json` (with the model's prompts and
/// similarity function from `usage`), `sentence_bert_config.json`, `1_Pooling/config.json` and
/// (when normalising) `2_Normalize/` into `root`.
pub(crate) fn write_metadata(
    root: &Path,
    sbert: &SentenceBertConfig,
    pooling: &PoolingConfig,
    normalize: bool,
    usage: &Usage,
) -> Result<()> {
    let mut modules = vec![module(0, "", TRANSFORMER), module(1, "1_Pooling", POOLING)];
    if normalize {
        modules.push(module(2, "2_Normalize", NORMALIZE));
        let dir = root.join("2_Normalize");
        fs::create_dir_all(&dir).map_err(Error::io("create directory", &dir))?;
    }
    write(root, "modules.json", &json::to_pretty(&modules))?;
    write(root, "sentence_bert_config.json", &json::to_pretty(sbert))?;
    // The versions that really made the files. No "sentence_transformers": it did not write them,
    // and sentence-transformers warns when that version is newer than its own.
    let st_config = serde_json::json!({
        "__version__": {
            "multipos": env!("CARGO_PKG_VERSION"),
            "pytorch": super::LIBTORCH_VERSION,
            "tokenizers": super::TOKENIZERS_VERSION,
        },
        "model_type": "SentenceTransformer",
        "prompts": usage.prompts,
        "default_prompt_name": usage.default_prompt_name,
        "similarity_fn_name": usage.similarity_fn_name.as_deref().unwrap_or("cosine"),
    });
    write(
        root,
        "config_sentence_transformers.json",
        &json::to_pretty(&st_config),
    )?;
    let pooling_dir = root.join("1_Pooling");
    fs::create_dir_all(&pooling_dir).map_err(Error::io("create directory", &pooling_dir))?;
    write(
        root,
        "1_Pooling/config.json",
        &json::to_pretty(&pooling.to_legacy_json()),
    )
}
