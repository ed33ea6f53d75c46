//! Training objectives over sentence embeddings.
pub mod mnrl;

pub use mnrl::{MnrlConfig, mnrl_loss};
