//! File-system helpers that never leave partial files behind.
pub mod atomic;
pub mod hash;
pub mod json;
pub mod output;
pub mod tree;
