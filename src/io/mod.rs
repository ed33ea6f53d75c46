//! File-system helpers that never leave partial files behind.
pub mod atomic;
pub mod json;
