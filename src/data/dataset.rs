//! Query-grouped training data: every distinct text stored once, every query with its positives and
//! optional hard negatives, in compact arrays that the planner reads by index.
use std::fmt;

use rustc_hash::FxHashMap;

use super::text::{hash_normalized, normalize};

/// Index of a distinct text in a [`Dataset`].
pub type TextId = u32;

/// A query group's cluster (topic) label, as the data names it: `data.batching = "by_cluster"`
/// fills batches cluster by cluster (docs/design.md §2). `multipos mine --clusters K` writes numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(
    untagged,
    expecting = "a cluster label: a non-negative integer or a string"
)]
pub enum Cluster {
    Id(u64),
    Name(String),
}

impl Cluster {
    /// The label of a delimited file's field: a number when it is one, else the text.
    pub(crate) fn parse(field: &str) -> Cluster {
        let field = field.trim();
        match field.parse() {
            Ok(id) if !field.starts_with('+') => Cluster::Id(id),
            _ => Cluster::Name(field.to_string()),
        }
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cluster::Id(id) => write!(f, "{id}"),
            Cluster::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// Counts reported after loading, so a user sees what was merged or removed and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadStats {
    pub records: u64,
    pub groups: u64,
    pub positives: u64,
    pub negatives: u64,
    pub distinct_texts: u64,
    /// Records whose query (after normalisation) had already been seen: merged into one group.
    pub duplicate_queries_merged: u64,
    /// Positives repeated within a group (after normalisation), kept once.
    pub duplicate_positives_merged: u64,
    /// Negatives repeated within a group, kept once.
    pub duplicate_negatives_merged: u64,
    /// Positives identical to their own query: a (x, x) pair teaches nothing and would conflict with
    /// itself in a batch, so it is removed.
    pub positives_equal_to_query_removed: u64,
    /// Groups left with no positive after that removal.
    pub groups_without_positives_removed: u64,
    /// Negatives identical to their query or to one of the group's positives: contradictory, removed.
    pub negatives_contradicting_removed: u64,
    /// Malformed records skipped because `skip_invalid` was set (each is also logged).
    pub invalid_skipped: u64,
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records -> {} query groups, {} positives, {} negatives, {} distinct texts; merged: {} duplicate queries, \
             {} duplicate positives, {} duplicate negatives; removed: {} positives equal to their query, \
             {} groups left without positives, {} contradicting negatives; skipped {} invalid records",
            self.records,
            self.groups,
            self.positives,
            self.negatives,
            self.distinct_texts,
            self.duplicate_queries_merged,
            self.duplicate_positives_merged,
            self.duplicate_negatives_merged,
            self.positives_equal_to_query_removed,
            self.groups_without_positives_removed,
            self.negatives_contradicting_removed,
            self.invalid_skipped
        )
    }
}

/// Query groups over a table of distinct texts.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    texts: Vec<String>,
    hashes: Vec<u64>,
    queries: Vec<TextId>,
    pos_offsets: Vec<u32>,
    positives: Vec<TextId>,
    neg_offsets: Vec<u32>,
    negatives: Vec<TextId>,
    /// Per group, an index into `cluster_labels`, when the data labels the group.
    clusters: Vec<Option<u32>>,
    cluster_labels: Vec<Cluster>,
    stats: LoadStats,
}

impl Dataset {
    /// Number of query groups.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// The query text of group `g`.
    pub fn query(&self, g: usize) -> TextId {
        self.queries[g]
    }

    /// The positives of group `g`.
    pub fn positives(&self, g: usize) -> &[TextId] {
        &self.positives[self.pos_offsets[g] as usize..self.pos_offsets[g + 1] as usize]
    }

    /// The hard negatives of group `g` (possibly none).
    pub fn negatives(&self, g: usize) -> &[TextId] {
        &self.negatives[self.neg_offsets[g] as usize..self.neg_offsets[g + 1] as usize]
    }

    /// The text itself (as first seen, not normalised).
    pub fn text(&self, id: TextId) -> &str {
        &self.texts[id as usize]
    }

    /// The cluster of group `g`, as an index below [`Dataset::cluster_count`], if labelled.
    pub fn cluster(&self, g: usize) -> Option<u32> {
        self.clusters[g]
    }

    /// The label of cluster index `c`.
    pub fn cluster_label(&self, c: u32) -> &Cluster {
        &self.cluster_labels[c as usize]
    }

    /// How many distinct cluster labels the groups carry.
    pub fn cluster_count(&self) -> usize {
        self.cluster_labels.len()
    }

    /// The identity hash of a text (see [`super::text`]).
    pub fn hash(&self, id: TextId) -> u64 {
        self.hashes[id as usize]
    }

    /// Total (query, positive) pairs.
    pub fn pair_count(&self) -> usize {
        self.positives.len()
    }

    /// What loading merged, removed and skipped.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// A 64-bit fingerprint of the content (groups in order, texts by identity): plans and
    /// checkpoints are tied to it.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for g in 0..self.len() {
            h.update(&self.hash(self.query(g)).to_le_bytes());
            for &p in self.positives(g) {
                h.update(&self.hash(p).to_le_bytes());
            }
            h.update(b"|");
            for &n in self.negatives(g) {
                h.update(&self.hash(n).to_le_bytes());
            }
            // Unlabelled data keeps the fingerprint it had before labels existed.
            if let Some(c) = self.cluster(g) {
                h.update(b"#");
                h.update(self.cluster_label(c).to_string().as_bytes());
            }
            h.update(b";");
        }
        h.digest()
    }
}

/// Accumulates records into a [`Dataset`], merging duplicates by text identity.
#[derive(Default)]
pub struct DatasetBuilder {
    data: Dataset,
    by_hash: FxHashMap<u64, TextId>,
    group_of_query: FxHashMap<TextId, usize>,
    pending_pos: Vec<Vec<TextId>>,
    pending_neg: Vec<Vec<TextId>>,
    pending_cluster: Vec<Option<u32>>,
    cluster_ids: FxHashMap<Cluster, u32>,
}

/// Why a record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    EmptyQuery,
    NoPositives,
    EmptyPositive(usize),
    EmptyNegative(usize),
    EmptyCluster,
    /// The query's group already has another cluster label: (that one, this one).
    ClusterConflict(Cluster, Cluster),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::EmptyQuery => write!(f, "field \"query\" is empty"),
            RecordError::NoPositives => write!(f, "the group has no positives"),
            RecordError::EmptyPositive(i) => write!(f, "positive #{} is empty", i + 1),
            RecordError::EmptyNegative(i) => write!(f, "negative #{} is empty", i + 1),
            RecordError::EmptyCluster => write!(f, "field \"cluster\" is empty"),
            RecordError::ClusterConflict(was, now) => write!(
                f,
                "field \"cluster\" is {now}, but an earlier record of this query put it in cluster {was}"
            ),
        }
    }
}

impl DatasetBuilder {
    /// A new, empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    fn intern(&mut self, text: &str, normalized: &str) -> TextId {
        let h = hash_normalized(normalized);
        if let Some(&id) = self.by_hash.get(&h) {
            return id;
        }
        let id = self.data.texts.len() as TextId;
        self.data.texts.push(text.to_string());
        self.data.hashes.push(h);
        self.by_hash.insert(h, id);
        id
    }

    /// Adds one record (a group or a pair), with its cluster label if it has one. Validates it
    /// completely before changing anything.
    pub fn add(
        &mut self,
        query: &str,
        positives: &[&str],
        negatives: &[&str],
        cluster: Option<&Cluster>,
    ) -> Result<(), RecordError> {
        let (q_norm, pos_norm, neg_norm) = self.checked(query, positives, negatives, cluster)?;
        self.data.stats.records += 1;
        let q = self.intern(query, &q_norm);
        let g = self.group_of(q);
        if let Some(label) = cluster {
            let next = self.cluster_ids.len() as u32;
            let c = *self.cluster_ids.entry(label.clone()).or_insert_with(|| {
                self.data.cluster_labels.push(label.clone());
                next
            });
            self.pending_cluster[g] = Some(c);
        }
        for (p, norm) in positives.iter().zip(&pos_norm) {
            let id = self.intern(p, norm);
            if id == q {
                self.data.stats.positives_equal_to_query_removed += 1;
            } else if self.pending_pos[g].contains(&id) {
                self.data.stats.duplicate_positives_merged += 1;
            } else {
                self.pending_pos[g].push(id);
            }
        }
        for (n, norm) in negatives.iter().zip(&neg_norm) {
            let id = self.intern(n, norm);
            if self.pending_neg[g].contains(&id) {
                self.data.stats.duplicate_negatives_merged += 1;
            } else {
                self.pending_neg[g].push(id);
            }
        }
        Ok(())
    }

    /// Checks a record before anything of it is kept: its normalized query, positives and
    /// negatives. A query seen before keeps its cluster.
    fn checked(
        &self,
        query: &str,
        positives: &[&str],
        negatives: &[&str],
        cluster: Option<&Cluster>,
    ) -> Result<(String, Vec<String>, Vec<String>), RecordError> {
        let q_norm = normalize(query);
        if q_norm.is_empty() {
            return Err(RecordError::EmptyQuery);
        }
        if positives.is_empty() {
            return Err(RecordError::NoPositives);
        }
        let pos_norm: Vec<String> = positives.iter().map(|p| normalize(p)).collect();
        if let Some(i) = pos_norm.iter().position(String::is_empty) {
            return Err(RecordError::EmptyPositive(i));
        }
        let neg_norm: Vec<String> = negatives.iter().map(|n| normalize(n)).collect();
        if let Some(i) = neg_norm.iter().position(String::is_empty) {
            return Err(RecordError::EmptyNegative(i));
        }
        if matches!(cluster, Some(Cluster::Name(n)) if n.trim().is_empty()) {
            return Err(RecordError::EmptyCluster);
        }
        let earlier = self
            .by_hash
            .get(&hash_normalized(&q_norm))
            .and_then(|q| self.group_of_query.get(q))
            .and_then(|&g| self.pending_cluster[g]);
        if let (Some(was), Some(now)) = (earlier, cluster) {
            let was = &self.data.cluster_labels[was as usize];
            if was != now {
                return Err(RecordError::ClusterConflict(was.clone(), now.clone()));
            }
        }
        Ok((q_norm, pos_norm, neg_norm))
    }

    /// The group of query text `q`: its group so far (a duplicate query merges into it), or a
    /// new one.
    fn group_of(&mut self, q: TextId) -> usize {
        if let Some(&g) = self.group_of_query.get(&q) {
            self.data.stats.duplicate_queries_merged += 1;
            return g;
        }
        let g = self.data.queries.len();
        self.data.queries.push(q);
        self.pending_pos.push(Vec::new());
        self.pending_neg.push(Vec::new());
        self.pending_cluster.push(None);
        self.group_of_query.insert(q, g);
        g
    }

    /// Counts a record skipped under `skip_invalid`.
    pub(crate) fn note_skipped(&mut self) {
        self.data.stats.invalid_skipped += 1;
    }

    /// Finishes: groups left without any positive (all equal to their query) are removed and counted.
    pub fn finish(mut self) -> Dataset {
        let mut d = std::mem::take(&mut self.data);
        let queries = std::mem::take(&mut d.queries);
        d.pos_offsets.push(0);
        d.neg_offsets.push(0);
        for (g, q) in queries.into_iter().enumerate() {
            let pos = &self.pending_pos[g];
            if pos.is_empty() {
                d.stats.groups_without_positives_removed += 1;
                continue;
            }
            let neg = &self.pending_neg[g];
            let before = neg.len();
            let neg: Vec<TextId> = neg
                .iter()
                .copied()
                .filter(|n| *n != q && !pos.contains(n))
                .collect();
            d.stats.negatives_contradicting_removed += (before - neg.len()) as u64;
            d.queries.push(q);
            d.clusters.push(self.pending_cluster[g]);
            d.positives.extend_from_slice(pos);
            d.negatives.extend_from_slice(&neg);
            d.pos_offsets.push(d.positives.len() as u32);
            d.neg_offsets.push(d.negatives.len() as u32);
        }
        d.stats.groups = d.queries.len() as u64;
        d.stats.positives = d.positives.len() as u64;
        d.stats.negatives = d.negatives.len() as u64;
        d.stats.distinct_texts = d.texts.len() as u64;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_duplicates_and_removes_contradictions() {
        let mut b = DatasetBuilder::new();
        b.add(
            "What is life insurance?",
            &["It pays out.", "It  pays out."],
            &["Cars.", "It pays out."],
            None,
        )
        .unwrap();
        b.add(" what is life insurance? ", &["A contract."], &[], None)
            .unwrap();
        b.add(
            "What is life insurance?",
            &["A contract.", "What is life insurance?"],
            &["Cars."],
            None,
        )
        .unwrap();
        b.add("echo", &["echo"], &[], None).unwrap();
        let d = b.finish();
        assert_eq!(
            d.len(),
            2,
            "a lower-case query is a different text; the echo group has no positive left"
        );
        assert_eq!(d.positives(0).len(), 2);
        assert_eq!(d.negatives(0).len(), 1);
        let s = d.stats();
        assert_eq!(s.duplicate_queries_merged, 1);
        assert_eq!(s.duplicate_positives_merged, 1);
        assert_eq!(s.duplicate_negatives_merged, 1);
        assert_eq!(s.positives_equal_to_query_removed, 2);
        assert_eq!(s.negatives_contradicting_removed, 1);
        assert_eq!(s.groups_without_positives_removed, 1);
    }

    #[test]
    fn rejects_bad_records_without_side_effects() {
        let mut b = DatasetBuilder::new();
        assert_eq!(b.add("  ", &["x"], &[], None), Err(RecordError::EmptyQuery));
        assert_eq!(b.add("q", &[], &[], None), Err(RecordError::NoPositives));
        assert_eq!(
            b.add("q", &["a", " "], &[], None),
            Err(RecordError::EmptyPositive(1))
        );
        assert_eq!(b.finish().stats().records, 0);
    }

    #[test]
    fn cluster_labels_merge_with_their_query_and_conflicts_are_refused() {
        let mut b = DatasetBuilder::new();
        let (seven, cars) = (Cluster::Id(7), Cluster::Name("cars".into()));
        b.add("q1", &["a"], &[], Some(&seven)).unwrap();
        b.add("q1", &["b"], &[], None).unwrap();
        b.add("q2", &["c"], &[], Some(&cars)).unwrap();
        b.add("q3", &["d"], &[], Some(&seven)).unwrap();
        assert_eq!(
            b.add(" q1", &["e"], &[], Some(&cars)),
            Err(RecordError::ClusterConflict(seven.clone(), cars.clone()))
        );
        assert_eq!(
            b.add("q4", &["e"], &[], Some(&Cluster::Name(" ".into()))),
            Err(RecordError::EmptyCluster)
        );
        let d = b.finish();
        assert_eq!(d.cluster_count(), 2);
        assert_eq!(
            (d.cluster(0), d.cluster(1), d.cluster(2)),
            (Some(0), Some(1), Some(0))
        );
        assert_eq!(d.cluster_label(1), &cars);
        assert_eq!(
            d.positives(0).len(),
            2,
            "the unlabelled record joined its group"
        );
        assert_eq!(Cluster::parse(" 12 "), Cluster::Id(12));
        assert_eq!(Cluster::parse("+12"), Cluster::Name("+12".into()));
    }
}
