//! Pure ring arithmetic: who sends what to whom at each step of a ring all-gather or all-reduce.
use std::ops::Range;

/// The left-hand neighbour (receive from).
pub(crate) fn left(rank: usize, world: usize) -> usize {
    (rank + world - 1) % world
}

/// The right-hand neighbour (send to).
pub(crate) fn right(rank: usize, world: usize) -> usize {
    (rank + 1) % world
}

/// `len` elements split into `world` contiguous segments whose sizes differ by at most one.
pub(crate) fn segments(len: usize, world: usize) -> Vec<Range<usize>> {
    let base = len / world;
    let extra = len % world;
    let mut start = 0;
    (0..world)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// All-gather step `s` (0-based, W-1 steps): (block index sent, block index received).
pub(crate) fn gather_step(rank: usize, world: usize, s: usize) -> (usize, usize) {
    (
        (rank + world - s % world) % world,
        (rank + 2 * world - s % world - 1) % world,
    )
}

/// Reduce-scatter step `s` (W-1 steps): (segment sent, segment received and accumulated). After the
/// last step a rank holds the full sum of segment `(rank + 1) % world`.
pub(crate) fn reduce_scatter_step(rank: usize, world: usize, s: usize) -> (usize, usize) {
    gather_step(rank, world, s)
}

/// All-gather phase of an all-reduce, step `s`: (segment sent, segment received and stored).
pub(crate) fn reduce_gather_step(rank: usize, world: usize, s: usize) -> (usize, usize) {
    gather_step((rank + 1) % world, world, s)
}

/// Bytes each rank sends in a ring all-reduce of `bytes` (bandwidth-optimal 2(W-1)/W).
pub fn all_reduce_bytes_per_rank(bytes: usize, world: usize) -> f64 {
    2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the ring on plain vectors: every rank ends with the element-wise sum.
    #[test]
    fn simulated_all_reduce_sums_everything() {
        for world in 1..6 {
            let len = 11;
            let mut bufs: Vec<Vec<f64>> = (0..world)
                .map(|r| (0..len).map(|i| (r * 100 + i) as f64).collect())
                .collect();
            let segs = segments(len, world);
            for s in 0..world.saturating_sub(1) {
                let sent: Vec<Vec<f64>> = (0..world)
                    .map(|r| bufs[r][segs[reduce_scatter_step(r, world, s).0].clone()].to_vec())
                    .collect();
                for r in 0..world {
                    let (_, recv) = reduce_scatter_step(r, world, s);
                    assert_eq!(
                        reduce_scatter_step(left(r, world), world, s).0,
                        recv,
                        "left sends what I expect"
                    );
                    for (x, y) in bufs[r][segs[recv].clone()]
                        .iter_mut()
                        .zip(&sent[left(r, world)])
                    {
                        *x += y;
                    }
                }
            }
            for s in 0..world.saturating_sub(1) {
                let sent: Vec<Vec<f64>> = (0..world)
                    .map(|r| bufs[r][segs[reduce_gather_step(r, world, s).0].clone()].to_vec())
                    .collect();
                for r in 0..world {
                    let (_, recv) = reduce_gather_step(r, world, s);
                    assert_eq!(reduce_gather_step(left(r, world), world, s).0, recv);
                    bufs[r][segs[recv].clone()].copy_from_slice(&sent[left(r, world)]);
                }
            }
            let want: Vec<f64> = (0..len)
                .map(|i| (0..world).map(|r| (r * 100 + i) as f64).sum())
                .collect();
            for b in &bufs {
                assert_eq!(b, &want, "world {world}");
            }
        }
    }

    #[test]
    fn simulated_all_gather_collects_every_block() {
        for world in 1..6 {
            let mut have: Vec<Vec<Option<usize>>> = (0..world)
                .map(|r| (0..world).map(|b| (b == r).then_some(b)).collect())
                .collect();
            for s in 0..world - 1 {
                let sent: Vec<usize> = (0..world)
                    .map(|r| have[r][gather_step(r, world, s).0].expect("sending a block I have"))
                    .collect();
                for r in 0..world {
                    let (_, recv) = gather_step(r, world, s);
                    have[r][recv] = Some(sent[left(r, world)]);
                }
            }
            for blocks in &have {
                assert!(blocks.iter().enumerate().all(|(b, v)| *v == Some(b)));
            }
        }
    }

    #[test]
    fn segments_cover_evenly() {
        assert_eq!(segments(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(segments(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
    }
}
