//! Exact nearest-neighbour search in bounded memory: queries and corpus are both taken in chunks,
//! so the score matrix in memory is one query chunk by one corpus chunk, never queries × corpus, and
//! each query keeps only its running best `k`.
use tch::{Kind, Tensor};

/// Queries per chunk.
pub(crate) const QUERY_CHUNK: i64 = 256;
/// Corpus rows per chunk.
pub(crate) const CORPUS_CHUNK: i64 = 16_384;

/// The `k` best corpus rows (index, score) of each query, best first: `queries` (n, d) and `corpus`
/// (m, d) hold unit vectors, so the score is the cosine. `tick(done)` reports query rows done.
pub fn top_k(
    queries: &Tensor,
    corpus: &Tensor,
    k: usize,
    mut tick: impl FnMut(u64),
) -> Vec<Vec<(u32, f32)>> {
    let (n, m) = (queries.size()[0], corpus.size()[0]);
    let k = (k as i64).min(m);
    let mut out = Vec::with_capacity(n as usize);
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let q = queries.narrow(0, start, QUERY_CHUNK.min(n - start));
            let rows = q.size()[0];
            let mut best_scores = Tensor::empty([rows, 0], (Kind::Float, q.device()));
            let mut best_index = Tensor::empty([rows, 0], (Kind::Int64, q.device()));
            let mut c0 = 0;
            while c0 < m {
                let c = corpus.narrow(0, c0, CORPUS_CHUNK.min(m - c0));
                let scores = q.matmul(&c.transpose(0, 1));
                let kk = k.min(scores.size()[1]);
                let (s, i) = scores.topk(kk, 1, true, true);
                let merged_scores = Tensor::cat(&[&best_scores, &s], 1);
                let merged_index = Tensor::cat(&[&best_index, &(i + c0)], 1);
                let keep = k.min(merged_scores.size()[1]);
                let (s, pos) = merged_scores.topk(keep, 1, true, true);
                best_index = merged_index.gather(1, &pos, false);
                best_scores = s;
                c0 += CORPUS_CHUNK;
            }
            let scores = Vec::<Vec<f32>>::try_from(best_scores.to_device(tch::Device::Cpu))
                .expect("f32 scores");
            let index = Vec::<Vec<i64>>::try_from(best_index.to_device(tch::Device::Cpu))
                .expect("i64 indices");
            for (s, i) in scores.into_iter().zip(index) {
                out.push(i.into_iter().map(|x| x as u32).zip(s).collect());
            }
            start += rows;
            tick(rows as u64);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_search_equals_the_full_matrix() {
        tch::manual_seed(3);
        let q = crate::model::pooling::normalize_l2(&Tensor::randn(
            [600, 8],
            (Kind::Float, tch::Device::Cpu),
        ));
        let c = crate::model::pooling::normalize_l2(&Tensor::randn(
            [40_000, 8],
            (Kind::Float, tch::Device::Cpu),
        ));
        let got = top_k(&q, &c, 7, |_| {});
        let (s, i) = q.matmul(&c.transpose(0, 1)).topk(7, 1, true, true);
        let (s, i) = (
            Vec::<Vec<f32>>::try_from(s).unwrap(),
            Vec::<Vec<i64>>::try_from(i).unwrap(),
        );
        assert_eq!(got.len(), 600);
        for r in 0..600 {
            let want: Vec<(u32, f32)> = i[r]
                .iter()
                .map(|&x| x as u32)
                .zip(s[r].iter().copied())
                .collect();
            assert_eq!(got[r], want, "query {r}");
        }
    }
}
