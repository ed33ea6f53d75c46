//! Tokenization as sentence-transformers' `Transformer.tokenize` does it: strip, optional lower-casing,
//! truncation at `max_seq_length`, padding to the longest text of the batch.
use std::path::Path;

use tch::{Device, Tensor};
use tokenizers::{Encoding, Tokenizer, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// Token ids of one batch, ready for the encoder.
#[derive(Debug)]
pub struct TokenBatch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
}

impl TokenBatch {
    /// The batch on `device` (copied asynchronously from the host: nothing waits for the device).
    pub(crate) fn to(&self, device: Device) -> TokenBatch {
        let move_to = |t: &Tensor| crate::device::upload(t, device);
        TokenBatch {
            input_ids: move_to(&self.input_ids),
            token_type_ids: move_to(&self.token_type_ids),
            attention_mask: move_to(&self.attention_mask),
        }
    }
}

/// A Hugging Face `tokenizer.json` with multipos' truncation and padding.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    lower_case: bool,
    pad_id: i64,
    pad_type_id: i64,
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus the ASCII separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and overrides its truncation (to `max_seq_length`) and padding (to the
    /// longest text in each batch): the shipped files often pad every text to a fixed length.
    pub(crate) fn load(path: &Path, max_seq_length: usize, lower_case: bool) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(path, format!("cannot load tokenizer: {e}")))?;
        let truncation = TruncationParams {
            max_length: max_seq_length,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        };
        inner
            .with_truncation(Some(truncation))
            .map_err(|e| Error::invalid(path, format!("cannot set truncation: {e}")))?;
        // Padding happens in `pad`, per batch; keep only the pad ids the file declares.
        let (pad_id, pad_type_id) = match inner.get_padding() {
            Some(p) => (p.pad_id as i64, p.pad_type_id as i64),
            None => (inner.token_to_id("[PAD]").unwrap_or(0) as i64, 0),
        };
        inner.with_padding(None);
        Ok(Self {
            inner,
            lower_case,
            pad_id,
            pad_type_id,
        })
    }

    /// Changes the truncation length (special tokens included).
    pub(crate) fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        let truncation = TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        };
        self.inner
            .with_truncation(Some(truncation))
            .map_err(|e| Error::Tokenizer(format!("cannot set truncation: {e}")))?;
        Ok(())
    }

    fn prepare(&self, text: &str) -> String {
        let stripped = text.trim_matches(is_python_space);
        if self.lower_case {
            stripped.to_lowercase()
        } else {
            stripped.to_string()
        }
    }

    /// Tokenizes each text without padding (truncated at `max_seq_length`).
    pub(crate) fn encode_each(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        let inputs: Vec<String> = texts.iter().map(|t| self.prepare(t)).collect();
        self.inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of tokens (special tokens included, after truncation) of each text.
    pub fn lengths(&self, texts: &[&str]) -> Result<Vec<usize>> {
        Ok(self.encode_each(texts)?.iter().map(Encoding::len).collect())
    }

    /// Tokenizes a batch into padded (batch, longest) tensors on the CPU.
    pub fn encode(&self, texts: &[&str]) -> Result<TokenBatch> {
        let encodings = self.encode_each(texts)?;
        Ok(self.pad(&encodings.iter().collect::<Vec<_>>()))
    }

    /// Pads already tokenized texts to the longest of them.
    pub(crate) fn pad(&self, encodings: &[&Encoding]) -> TokenBatch {
        let rows = encodings.len();
        let cols = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; rows * cols];
        let mut types = vec![self.pad_type_id; rows * cols];
        let mut mask = vec![0i64; rows * cols];
        for (r, e) in encodings.iter().enumerate() {
            let at = r * cols;
            for (c, ((&id, &ty), &m)) in e
                .get_ids()
                .iter()
                .zip(e.get_type_ids())
                .zip(e.get_attention_mask())
                .enumerate()
            {
                ids[at + c] = id as i64;
                types[at + c] = ty as i64;
                mask[at + c] = m as i64;
            }
        }
        let shape = [rows as i64, cols as i64];
        TokenBatch {
            input_ids: Tensor::from_slice(&ids).view(shape),
            token_type_ids: Tensor::from_slice(&types).view(shape),
            attention_mask: Tensor::from_slice(&mask).view(shape),
        }
    }
}
