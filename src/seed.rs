//! Seeds derived from seeds: every random choice of a run (shuffles, dropout masks, mining samples)
//! draws from a seed mixed from the run's seed and what the choice is for, so that runs repeat
//! exactly whatever the number of workers or where a run resumed.

/// Mixes words into one 64-bit seed (SplitMix64 finaliser over a running state).
pub(crate) fn mix_seed(words: &[u64]) -> u64 {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for &w in words {
        state = state.wrapping_add(w).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        state = z ^ (z >> 31);
    }
    state
}
