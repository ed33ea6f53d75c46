//! Validation in the cluster (docs/design.md §12): the coordinator hands the validation texts (the
//! queries, then the corpus) out in pages to the ring's workers, which embed them with the weights
//! every replica holds after `step` steps; once every page is back, the coordinator scores once.
//! A pure record, unit-tested without a network: the handlers only lock, call and reply.

/// The most texts a page holds: small enough for one message either way.
pub(crate) const MAX_PAGE: usize = 256;

/// Texts per page for `texts` texts over `world` workers: about four pages each, so a worker that
/// finishes early takes another, and no page is so small that batching suffers.
pub(crate) fn page_size(texts: usize, world: usize) -> usize {
    texts.div_ceil(4 * world.max(1)).clamp(16, MAX_PAGE)
}

#[derive(Debug, Clone, PartialEq)]
enum Page {
    Open,
    /// Handed to `rank` of `generation`; open again once that generation ends.
    Assigned {
        rank: usize,
        generation: u64,
    },
    Done(Vec<f32>),
}

/// One evaluation in progress: which pages are out, which are back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Round {
    pub step: u64,
    texts: usize,
    page: usize,
    dim: Option<usize>,
    pages: Vec<Page>,
    /// The embeddings went to be scored or mined (once, whatever generations come).
    taken: bool,
}

impl Round {
    /// A round over `texts` texts after `step` steps, in pages of `page` texts.
    pub(crate) fn new(step: u64, texts: usize, page: usize) -> Self {
        let page = page.max(1);
        Self {
            step,
            texts,
            page,
            dim: None,
            pages: vec![Page::Open; texts.div_ceil(page)],
            taken: false,
        }
    }

    /// Hands the next open page (or one left by an ended generation) to `rank`: its text range.
    pub(crate) fn assign(
        &mut self,
        rank: usize,
        generation: u64,
    ) -> Option<std::ops::Range<usize>> {
        let i = self.pages.iter().position(|p| match p {
            Page::Open => true,
            Page::Assigned { generation: g, .. } => *g != generation,
            Page::Done(_) => false,
        })?;
        self.pages[i] = Page::Assigned { rank, generation };
        Some(self.range(i))
    }

    fn range(&self, page: usize) -> std::ops::Range<usize> {
        page * self.page..((page + 1) * self.page).min(self.texts)
    }

    /// Takes a page of embeddings back; everything about it is checked against what was handed out.
    pub(crate) fn deliver(
        &mut self,
        rank: usize,
        generation: u64,
        offset: u64,
        count: usize,
        dim: usize,
        values: Vec<f32>,
    ) -> Result<(), String> {
        let i = (offset as usize) / self.page;
        if !(offset as usize).is_multiple_of(self.page) || i >= self.pages.len() {
            return Err(format!("offset {offset} is not the start of a page"));
        }
        if self.pages[i] != (Page::Assigned { rank, generation }) {
            return Err(format!("page at {offset} was not handed to rank {rank}"));
        }
        if count != self.range(i).len() {
            return Err(format!(
                "page at {offset} has {} texts, not {count}",
                self.range(i).len()
            ));
        }
        if dim == 0 || self.dim.is_some_and(|d| d != dim) {
            return Err(format!("dimension {dim} differs from the other pages'"));
        }
        if values.len() != count * dim || values.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "page at {offset}: {} values, expected {count} × {dim} finite ones",
                values.len()
            ));
        }
        self.dim = Some(dim);
        self.pages[i] = Page::Done(values);
        Ok(())
    }

    /// Whether every page is back.
    pub(crate) fn complete(&self) -> bool {
        self.pages.iter().all(|p| matches!(p, Page::Done(_)))
    }

    /// Whether some page is still to be handed out (in `generation`).
    pub(crate) fn has_open(&self, generation: u64) -> bool {
        self.pages.iter().any(|p| match p {
            Page::Open => true,
            Page::Assigned { generation: g, .. } => *g != generation,
            Page::Done(_) => false,
        })
    }

    /// Every embedding in text order, with the dimension, once every page is back; only the
    /// first time, so a round is scored or mined once.
    pub(crate) fn take(&mut self) -> Option<(Vec<f32>, usize)> {
        if !self.complete() || self.taken {
            return None;
        }
        self.taken = true;
        let dim = self.dim.unwrap_or(0);
        let mut out = Vec::with_capacity(self.texts * dim);
        for p in &self.pages {
            if let Page::Done(v) = p {
                out.extend_from_slice(v);
            }
        }
        Some((out, dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_a_few_per_worker_within_bounds() {
        assert_eq!(page_size(236, 2), 30);
        assert_eq!(page_size(10, 4), 16);
        assert_eq!(page_size(1_000_000, 2), MAX_PAGE);
    }

    const PAGE: usize = 20;

    #[test]
    fn pages_go_out_once_and_come_back_whole() {
        let mut r = Round::new(3, PAGE + 10, PAGE);
        let a = r.assign(0, 7).unwrap();
        let b = r.assign(1, 7).unwrap();
        assert_eq!((a.clone(), b.clone()), (0..PAGE, PAGE..PAGE + 10));
        assert!(r.assign(0, 7).is_none());
        assert!(!r.has_open(7));
        // Checked: the wrong rank, a short page, a non-finite value, a foreign offset.
        assert!(r.deliver(1, 7, 0, PAGE, 2, vec![0.0; PAGE * 2]).is_err());
        assert!(r.deliver(1, 7, PAGE as u64, 10, 2, vec![0.0; 19]).is_err());
        let mut nan = vec![0.0; 20];
        nan[3] = f32::NAN;
        assert!(r.deliver(1, 7, PAGE as u64, 10, 2, nan).is_err());
        assert!(r.deliver(1, 7, 5, 10, 2, vec![0.0; 20]).is_err());
        r.deliver(1, 7, PAGE as u64, 10, 2, vec![2.0; 20]).unwrap();
        assert!(!r.complete() && r.take().is_none());
        // Another dimension than the first page's is refused.
        assert!(r.deliver(0, 7, 0, PAGE, 3, vec![0.0; PAGE * 3]).is_err());
        r.deliver(0, 7, 0, PAGE, 2, vec![1.0; PAGE * 2]).unwrap();
        let (all, dim) = r.take().unwrap();
        assert_eq!((all.len(), dim), ((PAGE + 10) * 2, 2));
        assert_eq!((all[0], all[PAGE * 2]), (1.0, 2.0));
        assert!(r.take().is_none(), "a round is taken once");
    }

    #[test]
    fn pages_of_an_ended_generation_are_handed_out_again() {
        let mut r = Round::new(0, 2 * PAGE, PAGE);
        r.assign(0, 1).unwrap();
        r.assign(1, 1).unwrap();
        r.deliver(1, 1, PAGE as u64, PAGE, 1, vec![0.0; PAGE])
            .unwrap();
        // Generation 1 ends before rank 0 reports: its page goes to generation 2; the done one stays.
        assert!(r.has_open(2));
        assert_eq!(r.assign(0, 2), Some(0..PAGE));
        assert!(r.assign(1, 2).is_none());
        assert!(r.deliver(0, 1, 0, PAGE, 1, vec![0.0; PAGE]).is_err());
        r.deliver(0, 2, 0, PAGE, 1, vec![0.0; PAGE]).unwrap();
        assert!(r.complete());
    }
}
