//! Text identity: when two texts count as "the same" for conflict-free batching.
//!
//! The rule: Unicode NFC, then every run of Unicode whitespace becomes one ASCII space, then leading
//! and trailing whitespace is removed. Case, punctuation and accents are kept: "Cat" and "cat" are
//! different texts (the tokenizer may or may not lower-case them; a false "different" only costs a
//! slightly weaker batch, a false "same" would drop real negatives). Identity is the 64-bit XXH3 of
//! the normalised UTF-8, computed once at load; a collision between two different texts (odds about
//! n²/2⁶⁵) would only make the planner keep them apart.
use unicode_normalization::UnicodeNormalization;

/// The normalised form of `text` under the rule above.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// The identity hash of an already normalised text.
pub fn hash_normalized(normalized: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(normalized.as_bytes())
}

#[cfg(test)]
/// Normalises and hashes in one call.
pub(crate) fn text_hash(text: &str) -> u64 {
    hash_normalized(&normalize(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_and_composition_do_not_change_identity() {
        assert_eq!(normalize("  a \t\n b  "), "a b");
        assert_eq!(
            text_hash("Café au lait"),
            text_hash("Cafe\u{301}  au\u{a0}lait ")
        );
        assert_ne!(text_hash("Cat"), text_hash("cat"));
        assert_eq!(normalize(" \n "), "");
    }
}
