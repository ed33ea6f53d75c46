//! Reading small JSON files with errors that name the file.
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses a JSON file into `T`.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("invalid JSON: {e}")))
}

/// Serialises `value` as pretty JSON with a trailing newline.
pub(crate) fn to_pretty(value: &impl serde::Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).expect("serialising plain data cannot fail");
    out.push(b'\n');
    out
}
