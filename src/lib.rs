//! multipos: fine-tuning of sentence-embedding models on multi-positive data.
//!
//! # Layout
//! - [`model`]: the BERT encoder in tch, pooling, tokenizer, and the sentence-transformers directory
//!   format (load and save).
//! - [`embed`]: the `embed` job (files in, JSON lines out).
//! - [`device`]: device selection, CPU threads and inference streams; [`memory`]: what memory
//!   this process may still use.
//! - [`io`]: atomic files and directories, JSON helpers.
//! - [`cli`]: the command line (the binary in `main.rs` only parses and dispatches).
//! - [`auth`], [`tls`], [`certs`]: the cluster token, TLS for its connections, and making
//!   certificates.
//! - [`pb`]: the gRPC protocol generated from `proto/multipos.proto`.
pub mod cli;
pub mod cluster;
pub mod collective;
pub mod config;
pub mod data;
pub mod device;
pub mod embed;
pub mod error;
pub mod eval;
pub mod fusion;
mod host;
pub mod io;
pub mod logging;
pub mod loss;
pub mod memory;
pub mod mine;
pub mod model;
pub mod net;
pub mod plot;
pub mod progress;
pub mod seed;
pub mod train;

pub use error::{Error, Result};
pub use model::SentenceModel;

/// Generated protocol types and services.
pub mod pb {
    tonic::include_proto!("multipos");
    /// TensorBoard's event records (`proto/tensorboard.proto`).
    pub mod tensorboard {
        tonic::include_proto!("tensorboard");
    }
}
