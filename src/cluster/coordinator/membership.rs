//! Who forms the next ring and where it starts. Pure decisions, kept apart from the coordinator's
//! locking and RPCs so that they can be tested one case at a time.
use std::time::Instant;

/// A worker known to the coordinator: waiting to join a generation, or a member of one.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// Unique per join (a worker joining again gets a new one).
    pub id: u64,
    pub worker_id: String,
    pub peer_address: String,
    pub last_seen: Instant,
    /// Rank it would like: its rank in the previous generation, else the one it asked for.
    pub preference: usize,
    /// Optimizer steps its replica has applied.
    pub state_step: u64,
}

/// How a generation starts: who is in it (by rank) and who must heal first.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Formation {
    pub generation: u64,
    /// Every member holds (or heals to) the state after this many steps.
    pub start_step: u64,
    /// Member ids by rank.
    pub members: Vec<u64>,
    pub peers: Vec<String>,
    pub heal: Vec<bool>,
    /// The rank that uploads its state for the others to heal from (none when a checkpoint of
    /// `start_step` exists already or nobody heals).
    pub donor: Option<usize>,
    /// Each rank's ring key, handed out with the ring (random, chosen by the coordinator).
    pub keys: Vec<String>,
    /// The key every member of this generation receives, and presents to fetch a donor's state.
    pub generation_key: String,
}

/// The largest ring of at most `n` workers a run may use: no more than `workers`, no fewer than
/// `min_workers`, and splitting the global batch of `batch` rows evenly.
pub(crate) fn ring_size(
    n: usize,
    workers: usize,
    min_workers: usize,
    batch: usize,
) -> Option<usize> {
    (min_workers..=n.min(workers))
        .rev()
        .find(|k| *k > 0 && batch.is_multiple_of(*k))
}

/// Forms generation `generation` from the first `size` candidates in rank-preference order;
/// returns the ring, the candidates left over, and the formation. The ring continues from the
/// newest state anyone has: a member's replica or the newest checkpoint (`checkpoint_step`).
pub(crate) fn form(
    mut candidates: Vec<Member>,
    size: usize,
    checkpoint_step: Option<u64>,
    generation: u64,
) -> (Vec<Member>, Vec<Member>, Formation) {
    candidates.sort_by_key(|m| (m.preference, m.id));
    let rest = candidates.split_off(size.min(candidates.len()));
    let ring = candidates;
    let start = ring
        .iter()
        .map(|m| m.state_step)
        .max()
        .unwrap_or(0)
        .max(checkpoint_step.unwrap_or(0));
    let heal: Vec<bool> = ring.iter().map(|m| m.state_step != start).collect();
    let donor = (heal.iter().any(|h| *h) && checkpoint_step != Some(start))
        .then(|| ring.iter().position(|m| m.state_step == start))
        .flatten();
    let formation = Formation {
        generation,
        start_step: start,
        members: ring.iter().map(|m| m.id).collect(),
        peers: ring.iter().map(|m| m.peer_address.clone()).collect(),
        heal,
        donor,
        keys: Vec::new(),
        generation_key: String::new(),
    };
    (ring, rest, formation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, preference: usize, state_step: u64) -> Member {
        Member {
            id,
            worker_id: format!("host:{id}"),
            peer_address: format!("127.0.0.1:{}", 9000 + id),
            last_seen: Instant::now(),
            preference,
            state_step,
        }
    }

    #[test]
    fn ring_size_is_the_largest_count_that_splits_the_batch() {
        assert_eq!(ring_size(3, 3, 3, 12), Some(3));
        assert_eq!(ring_size(2, 3, 2, 12), Some(2));
        // Three live workers, but 3 does not divide 8: go on with 2.
        assert_eq!(ring_size(3, 4, 2, 8), Some(2));
        assert_eq!(ring_size(1, 3, 2, 12), None, "below the minimum");
        assert_eq!(
            ring_size(5, 3, 1, 12),
            Some(3),
            "never above the configured size"
        );
        assert_eq!(ring_size(0, 3, 0, 12), None);
    }

    #[test]
    fn a_replacement_heals_from_the_lowest_ranked_survivor() {
        // Survivors at step 7 (ranks 0 and 2 before), a fresh replacement asking for rank 1.
        let (ring, rest, f) = form(
            vec![member(10, 2, 7), member(11, 0, 7), member(12, 1, 0)],
            3,
            Some(5),
            42,
        );
        assert!(rest.is_empty());
        assert_eq!(f.members, vec![11, 12, 10], "ranks follow preferences");
        assert_eq!(ring.iter().map(|m| m.id).collect::<Vec<_>>(), f.members);
        assert_eq!(
            f.start_step, 7,
            "the newest live state wins over an older checkpoint"
        );
        assert_eq!(f.heal, vec![false, true, false]);
        assert_eq!(f.donor, Some(0));
        assert_eq!(f.generation, 42);
    }

    #[test]
    fn fresh_workers_heal_from_the_checkpoint_without_a_donor() {
        let (_, _, f) = form(vec![member(1, 0, 0), member(2, 1, 0)], 2, Some(6), 1);
        assert_eq!(f.start_step, 6);
        assert_eq!(f.heal, vec![true, true]);
        assert_eq!(f.donor, None, "the checkpoint of step 6 is there already");
    }

    #[test]
    fn a_fresh_run_starts_at_zero_and_nobody_heals() {
        let (_, _, f) = form(vec![member(1, usize::MAX, 0), member(2, 0, 0)], 2, None, 1);
        assert_eq!(f.start_step, 0);
        assert_eq!(f.members, vec![2, 1]);
        assert_eq!(f.heal, vec![false, false]);
        assert_eq!(f.donor, None);
    }

    #[test]
    fn extra_candidates_are_left_over() {
        let (ring, rest, f) = form(
            vec![member(1, 0, 3), member(2, 1, 3), member(3, 2, 3)],
            2,
            None,
            1,
        );
        assert_eq!(ring.len(), 2);
        assert_eq!(rest.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3]);
        assert_eq!(f.start_step, 3);
    }
}
