//! The sentence-embedding model: BERT encoder, pooling, tokenizer, and the on-disk format.
pub mod bert;
pub mod config;
pub mod dropout;
pub mod layout;
pub mod pooling;
pub mod sentence;
pub mod tiny;
pub mod tokenize;
pub mod weights;

pub use sentence::SentenceModel;
