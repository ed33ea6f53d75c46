//! The sentence-embedding model: BERT encoder, pooling, tokenizer, and the on-disk format.
pub mod bert;
pub mod config;
pub mod dropout;
pub mod layout;
pub mod masks;
pub mod pooling;
pub mod sentence;
pub mod tiny;
pub mod tokenize;
pub mod weights;

pub use config::Role;
pub use sentence::SentenceModel;

/// The libtorch this binary was built against, as its wheel (or archive) names its version.
pub(crate) const LIBTORCH_VERSION: &str = env!("MULTIPOS_LIBTORCH_VERSION");
/// The version of the tokenizers crate that tokenizes.
pub(crate) const TOKENIZERS_VERSION: &str = env!("MULTIPOS_TOKENIZERS_VERSION");

/// The model directory used when none is given: `$MULTIPOS_MODEL`, else the one `deploy/setup.sh`
/// installed when this binary was built, else the setup script's default place.
pub fn default_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("MULTIPOS_MODEL") {
        return dir.into();
    }
    if let Some(dir) = option_env!("MULTIPOS_DEFAULT_MODEL") {
        return dir.into();
    }
    let cache = std::env::var_os("MULTIPOS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/multipos")
        });
    cache.join("models/all-MiniLM-L6-v2")
}
