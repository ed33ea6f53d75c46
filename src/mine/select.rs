//! Which of a query's nearest candidates become its hard negatives: a pure function of the ranked
//! candidates, the query's weakest positive score and the options, as sentence-transformers'
//! `mine_hard_negatives` decides (docs/design.md §11).
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use super::{MineOptions, Sampling};

/// Why candidates were passed over, summed over queries.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// A positive of the query, or the query's own text.
    pub positive_or_query: u64,
    pub absolute_margin: u64,
    pub relative_margin: u64,
    pub max_score: u64,
    pub min_score: u64,
}

/// A candidate's verdict under the filters, in sentence-transformers' order.
fn passes(score: f32, weakest_positive: f32, o: &MineOptions, skipped: &mut Skipped) -> bool {
    if let Some(m) = o.absolute_margin
        && score + m > weakest_positive
    {
        skipped.absolute_margin += 1;
        return false;
    }
    if let Some(m) = o.relative_margin
        && score > weakest_positive - weakest_positive.abs() * m
    {
        skipped.relative_margin += 1;
        return false;
    }
    if let Some(m) = o.max_score
        && score > m
    {
        skipped.max_score += 1;
        return false;
    }
    if let Some(m) = o.min_score
        && score < m
    {
        skipped.min_score += 1;
        return false;
    }
    true
}

/// The negatives of one query from its `ranked` candidates (corpus index, score; best first):
/// `excluded` candidates (its positives and its own text) and those the filters reject are passed
/// over, the first `range_max` remaining are the pool, the first `range_min` of it are skipped, and
/// `num_negatives` are taken from the rest, the best (`top`) or drawn with `seed` (`random`), best
/// first. Fewer come back when fewer qualify.
pub(crate) fn select(
    ranked: &[(u32, f32)],
    excluded: impl Fn(u32) -> bool,
    weakest_positive: f32,
    opts: &MineOptions,
    range_max: usize,
    seed: u64,
    skipped: &mut Skipped,
) -> Vec<(u32, f32)> {
    let pool: Vec<(u32, f32)> = ranked
        .iter()
        .copied()
        .filter(|&(i, s)| {
            if excluded(i) {
                skipped.positive_or_query += 1;
                false
            } else {
                passes(s, weakest_positive, opts, skipped)
            }
        })
        .take(range_max)
        .skip(opts.range_min)
        .collect();
    if pool.len() <= opts.num_negatives || opts.sampling_strategy == Sampling::Top {
        return pool.into_iter().take(opts.num_negatives).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = sample(&mut rng, pool.len(), opts.num_negatives).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|k| pool[k]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MineOptions {
        MineOptions::default()
    }

    const RANKED: [(u32, f32); 6] = [(5, 0.9), (1, 0.8), (7, 0.7), (2, 0.6), (9, 0.5), (3, 0.1)];

    #[test]
    fn positives_are_passed_over_and_the_best_taken() {
        let mut sk = Skipped::default();
        let got = select(&RANKED, |i| i == 1, 0.95, &opts(), 10, 0, &mut sk);
        assert_eq!(got, vec![(5, 0.9), (7, 0.7), (2, 0.6)]);
        assert_eq!(sk.positive_or_query, 1);
    }

    #[test]
    fn margins_range_and_scores_follow_sentence_transformers() {
        let mut sk = Skipped::default();
        let o = MineOptions {
            absolute_margin: Some(0.15),
            ..opts()
        };
        // weakest positive 0.9: 0.9 + 0.15 > 0.9 and 0.8 + 0.15 > 0.9 are too close.
        assert_eq!(
            select(&RANKED, |_| false, 0.9, &o, 10, 0, &mut sk),
            vec![(7, 0.7), (2, 0.6), (9, 0.5)]
        );
        let o = MineOptions {
            relative_margin: Some(0.1),
            ..opts()
        };
        // threshold 0.9 - 0.09 = 0.81: 0.9 is above it.
        assert_eq!(
            select(&RANKED, |_| false, 0.9, &o, 10, 0, &mut sk)[0],
            (1, 0.8)
        );
        let o = MineOptions {
            max_score: Some(0.75),
            min_score: Some(0.55),
            ..opts()
        };
        assert_eq!(
            select(&RANKED, |_| false, 1.0, &o, 10, 0, &mut sk),
            vec![(7, 0.7), (2, 0.6)]
        );
        let o = MineOptions {
            range_min: 2,
            num_negatives: 2,
            ..opts()
        };
        assert_eq!(
            select(&RANKED, |_| false, 1.0, &o, 3, 0, &mut sk),
            vec![(7, 0.7)],
            "pool of 3, skip 2"
        );
        assert_eq!(
            (
                sk.absolute_margin,
                sk.relative_margin,
                sk.max_score,
                sk.min_score
            ),
            (2, 1, 2, 2)
        );
    }

    #[test]
    fn random_sampling_is_seeded_and_sorted() {
        let mut sk = Skipped::default();
        let o = MineOptions {
            sampling_strategy: Sampling::Random,
            num_negatives: 2,
            ..opts()
        };
        let a = select(&RANKED, |_| false, 1.0, &o, 6, 11, &mut sk);
        assert_eq!(a, select(&RANKED, |_| false, 1.0, &o, 6, 11, &mut sk));
        assert_eq!(a.len(), 2);
        assert!(a[0].1 > a[1].1);
        let draws: std::collections::HashSet<Vec<u32>> = (0..20)
            .map(|s| {
                select(&RANKED, |_| false, 1.0, &o, 6, s, &mut sk)
                    .iter()
                    .map(|c| c.0)
                    .collect()
            })
            .collect();
        assert!(draws.len() > 3, "different seeds draw differently");
    }
}
