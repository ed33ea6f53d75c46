//! Pair data for the pointwise losses (CosineSimilarityLoss, CoSENT, SoftmaxLoss): each row is two
//! texts and a target, a gold score or a class label. Read from JSONL (`sentence1`/`sentence2`,
//! `premise`/`hypothesis`, `query`/`positive`, `anchor`/`positive` with `score` or `label`) or from
//! CSV/TSV with such a header; or derived from query groups, as the multi-positive playbook uses
//! them (positives scored 1 and listed negatives 0; or one class per query).
//!
//! Pointwise losses have no in-batch negatives, so their batches need no conflict check: an epoch
//! is a seeded shuffle of the pairs cut into whole batches, the remainder reported as leftovers
//! (another shuffle next epoch uses them).
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::columns::{Columns, PairColumns, TargetColumn};
use super::dataset::Dataset;
use super::load::{
    FORMATS, LoadOptions, at_line, each_text_line, nothing_usable, open_delimited,
    refuse_columns_for_text, refuse_or_skip, reject_or_skip,
};
use super::table::{self, Key, Table};
use super::text::{hash_normalized, normalize};
use crate::error::{Error, Result};

/// What a pair is trained towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A gold similarity; `unit` demands it within [0, 1] (CosineSimilarityLoss).
    Score { unit: bool },
    /// A class: an integer id, or a name (names get ids in sorted order).
    Label,
}

/// The targets of a pair set.
#[derive(Debug, Clone, PartialEq)]
pub enum PairTargets {
    Scores(Vec<f32>),
    Labels { ids: Vec<i64>, names: Vec<String> },
}

/// Scored or labelled pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSet {
    pub first: Vec<String>,
    pub second: Vec<String>,
    pub targets: PairTargets,
}

impl PairSet {
    /// Number of pairs.
    pub(crate) fn len(&self) -> usize {
        self.first.len()
    }

    /// True when there are no pairs.
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// Class names by id (empty for scores).
    pub(crate) fn label_names(&self) -> &[String] {
        match &self.targets {
            PairTargets::Labels { names, .. } => names,
            PairTargets::Scores(_) => &[],
        }
    }

    /// A 64-bit fingerprint of the content (texts by identity, targets bit for bit).
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for i in 0..self.len() {
            h.update(&hash_normalized(&normalize(&self.first[i])).to_le_bytes());
            h.update(&hash_normalized(&normalize(&self.second[i])).to_le_bytes());
            match &self.targets {
                PairTargets::Scores(s) => h.update(&s[i].to_le_bytes()),
                PairTargets::Labels { ids, .. } => h.update(&ids[i].to_le_bytes()),
            }
        }
        if let PairTargets::Labels { names, .. } = &self.targets {
            for n in names {
                h.update(n.as_bytes());
                h.update(b"\0");
            }
        }
        h.digest()
    }

    /// Pairs from query groups: every (query, positive) scored 1 and every (query, listed negative)
    /// scored 0; or, for labels, every (query, positive) labelled with its query (one class per
    /// query, named by the query text).
    pub(crate) fn from_groups(data: &Dataset, kind: TargetKind) -> Self {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let mut scores = Vec::new();
        let mut ids = Vec::new();
        for g in 0..data.len() {
            let q = data.text(data.query(g));
            for &p in data.positives(g) {
                first.push(q.to_string());
                second.push(data.text(p).to_string());
                scores.push(1.0);
                ids.push(g as i64);
            }
            if matches!(kind, TargetKind::Score { .. }) {
                for &n in data.negatives(g) {
                    first.push(q.to_string());
                    second.push(data.text(n).to_string());
                    scores.push(0.0);
                }
            }
        }
        let targets = match kind {
            TargetKind::Score { .. } => PairTargets::Scores(scores),
            TargetKind::Label => PairTargets::Labels {
                ids,
                names: (0..data.len())
                    .map(|g| data.text(data.query(g)).to_string())
                    .collect(),
            },
        };
        Self {
            first,
            second,
            targets,
        }
    }
}

/// A target as read, before label names get ids.
enum RawTarget {
    Score(f32),
    Label(RawLabel),
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RawLabel {
    Id(i64),
    Name(String),
}

/// Accumulates pairs, then assigns label ids.
struct PairBuilder {
    kind: TargetKind,
    first: Vec<String>,
    second: Vec<String>,
    raw: Vec<RawTarget>,
}

const FIRST: [&str; 6] = [
    "query",
    "anchor",
    "sentence1",
    "premise",
    "text1",
    "sentence_a",
];
const SECOND: [&str; 6] = [
    "positive",
    "sentence2",
    "hypothesis",
    "text2",
    "sentence_b",
    "answer",
];

impl PairBuilder {
    fn check(&self, a: &str, b: &str, target: &RawTarget) -> std::result::Result<(), String> {
        if normalize(a).is_empty() || normalize(b).is_empty() {
            return Err("a text of the pair is empty".into());
        }
        match (self.kind, target) {
            (TargetKind::Score { unit }, RawTarget::Score(s)) => {
                if !s.is_finite() {
                    Err(format!("field \"score\" is not a finite number: {s}"))
                } else if unit && !(0.0..=1.0).contains(s) {
                    Err(format!(
                        "field \"score\" = {s} is outside [0, 1] (CosineSimilarityLoss compares it with a cosine)"
                    ))
                } else {
                    Ok(())
                }
            }
            (TargetKind::Label, RawTarget::Label(RawLabel::Id(i))) if *i < 0 => {
                Err(format!("field \"label\" = {i} is negative"))
            }
            (TargetKind::Label, RawTarget::Label(_)) => Ok(()),
            (TargetKind::Score { .. }, RawTarget::Label(_)) => {
                Err("this task's loss needs a \"score\", the record has a \"label\"".into())
            }
            (TargetKind::Label, RawTarget::Score(_)) => {
                Err("this task's loss needs a \"label\", the record has a \"score\"".into())
            }
        }
    }

    fn finish(self) -> PairSet {
        let targets = match self.kind {
            TargetKind::Score { .. } => PairTargets::Scores(
                self.raw
                    .iter()
                    .map(|t| match t {
                        RawTarget::Score(s) => *s,
                        RawTarget::Label(_) => unreachable!("checked on add"),
                    })
                    .collect(),
            ),
            TargetKind::Label => {
                let labels: Vec<&RawLabel> = self
                    .raw
                    .iter()
                    .map(|t| match t {
                        RawTarget::Label(l) => l,
                        RawTarget::Score(_) => unreachable!("checked on add"),
                    })
                    .collect();
                label_ids(&labels)
            }
        };
        PairSet {
            first: self.first,
            second: self.second,
            targets,
        }
    }
}

/// Integer labels keep their value (names "0".."max"); named labels get ids in sorted name order.
fn label_ids(labels: &[&RawLabel]) -> PairTargets {
    let named: BTreeMap<&str, i64> = {
        let mut names: Vec<&str> = labels
            .iter()
            .filter_map(|l| match l {
                RawLabel::Name(n) => Some(n.as_str()),
                RawLabel::Id(_) => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().zip(0..).collect()
    };
    if named.is_empty() {
        let ids: Vec<i64> = labels
            .iter()
            .map(|l| match l {
                RawLabel::Id(i) => *i,
                RawLabel::Name(_) => unreachable!("no names"),
            })
            .collect();
        let n = ids.iter().copied().max().map_or(0, |m| m + 1);
        return PairTargets::Labels {
            ids,
            names: (0..n).map(|i| i.to_string()).collect(),
        };
    }
    let ids = labels
        .iter()
        .map(|l| match l {
            RawLabel::Name(n) => named[n.as_str()],
            RawLabel::Id(i) => *i,
        })
        .collect();
    PairTargets::Labels {
        ids,
        names: named.keys().map(|s| s.to_string()).collect(),
    }
}

/// Whether a file holds scored or labelled pairs (rather than query groups): its first record has
/// a `score` or `label` field (JSONL) or column (CSV/TSV); a table has such a column, or
/// `data.columns` names one.
pub(crate) fn is_pair_file(path: &Path, columns: Option<&Columns>) -> Result<bool> {
    if table::is_table(path) {
        return Ok(Columns::is_pairs(columns, &Table::open(path)?));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let reader = BufReader::new(File::open(path).map_err(Error::io("open", path))?);
    let Some(first) = reader
        .lines()
        .map_while(std::result::Result::ok)
        .find(|l| !l.trim().is_empty())
    else {
        return Ok(false);
    };
    Ok(match ext {
        "csv" | "tsv" => {
            let sep = if ext == "csv" { ',' } else { '\t' };
            first
                .split(sep)
                .any(|h| matches!(h.trim().trim_matches('"'), "score" | "label"))
        }
        _ => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&first)
            .is_ok_and(|m| m.contains_key("score") || m.contains_key("label")),
    })
}

/// Loads scored or labelled pair files; every bad record names file, line and field.
pub(crate) fn load_pair_files(
    paths: &[std::path::PathBuf],
    kind: TargetKind,
    opts: LoadOptions<'_>,
) -> Result<PairSet> {
    let mut builder = PairBuilder {
        kind,
        first: Vec::new(),
        second: Vec::new(),
        raw: Vec::new(),
    };
    for path in paths {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let mut add =
            |at: &dyn Fn(String) -> Error, a: String, b: String, t: RawTarget| match builder
                .check(&a, &b, &t)
            {
                Ok(()) => {
                    builder.first.push(a);
                    builder.second.push(b);
                    builder.raw.push(t);
                    Ok(())
                }
                Err(reason) => refuse_or_skip(at(reason), opts),
            };
        if table::is_table(path) {
            read_table(&Table::open(path)?, opts, &mut add)?;
            continue;
        }
        refuse_columns_for_text(path, opts)?;
        match ext {
            "jsonl" | "json" => read_jsonl(path, opts, &mut add)?,
            "csv" => read_delimited(path, b',', opts, &mut add)?,
            "tsv" => read_delimited(path, b'\t', opts, &mut add)?,
            _ => return Err(Error::invalid(path, FORMATS)),
        }
    }
    let set = builder.finish();
    if set.is_empty() {
        return Err(nothing_usable("pairs", paths));
    }
    Ok(set)
}

/// Takes one pair; a refused one becomes the error `at` makes from the reason.
type AddFn<'a> = dyn FnMut(&dyn Fn(String) -> Error, String, String, RawTarget) -> Result<()> + 'a;

/// Reads a table's pairs, a record batch at a time.
fn read_table(table: &Table, opts: LoadOptions<'_>, add: &mut AddFn<'_>) -> Result<()> {
    let cols = PairColumns::of(opts.columns, table)?;
    table.scan(&cols.scan(), |rows| {
        let (first, second) = (rows.column(&cols.first)?, rows.column(&cols.second)?);
        let (target_name, target) = match &cols.target {
            TargetColumn::Score(n) | TargetColumn::Label(n) => (n.as_str(), rows.column(n)?),
        };
        for i in 0..rows.len() {
            let null = |name: &str| rows.error(i, Some(name), "null in a required column");
            let (Some(a), Some(b)) = (first.text(i), second.text(i)) else {
                let name = if first.text(i).is_none() {
                    &cols.first
                } else {
                    &cols.second
                };
                refuse_or_skip(null(name), opts)?;
                continue;
            };
            let t = match &cols.target {
                TargetColumn::Score(_) => target.number(i).map(|s| RawTarget::Score(s as f32)),
                TargetColumn::Label(_) => target.key(i).map(|k| match k {
                    Key::Int(id) => RawTarget::Label(RawLabel::Id(id)),
                    Key::Text(name) => RawTarget::Label(RawLabel::Name(name.trim().to_string())),
                }),
            };
            let Some(t) = t else {
                refuse_or_skip(null(target_name), opts)?;
                continue;
            };
            add(
                &|reason| rows.error(i, None, reason),
                a.to_string(),
                b.to_string(),
                t,
            )?;
        }
        Ok(())
    })
}

fn take_text(
    m: &mut serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> std::result::Result<String, String> {
    let found: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| m.contains_key(*n))
        .collect();
    match found.as_slice() {
        [one] => match m.remove(*one) {
            Some(serde_json::Value::String(s)) => Ok(s),
            _ => Err(format!("field \"{one}\" is not a string")),
        },
        [] => Err(format!("missing the text field (one of {names:?})")),
        many => Err(format!("several text fields for one side: {many:?}")),
    }
}

fn json_target(
    m: &mut serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<RawTarget, String> {
    match (m.remove("score"), m.remove("label")) {
        (Some(_), Some(_)) => Err("has both \"score\" and \"label\"".into()),
        (Some(v), None) => v
            .as_f64()
            .map(|s| RawTarget::Score(s as f32))
            .ok_or_else(|| format!("field \"score\" is not a number: {v}")),
        (None, Some(serde_json::Value::String(s))) if !s.trim().is_empty() => {
            Ok(RawTarget::Label(RawLabel::Name(s.trim().to_string())))
        }
        (None, Some(v)) => v
            .as_i64()
            .map(|i| RawTarget::Label(RawLabel::Id(i)))
            .ok_or_else(|| format!("field \"label\" is neither an integer nor a name: {v}")),
        (None, None) => Err("missing field \"score\" (or \"label\")".into()),
    }
}

fn read_jsonl(path: &Path, opts: LoadOptions, add: &mut AddFn<'_>) -> Result<()> {
    each_text_line(path, |line_no, text| {
        let parsed = text.and_then(|text| {
            let mut m = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                .map_err(|e| format!("invalid record: {e}"))?;
            let a = take_text(&mut m, &FIRST)?;
            let b = take_text(&mut m, &SECOND)?;
            let t = json_target(&mut m)?;
            m.remove("id");
            match m.keys().next() {
                Some(k) => Err(format!("unknown field \"{k}\"")),
                None => Ok((a, b, t)),
            }
        });
        match parsed {
            Ok((a, b, t)) => add(&at_line(path, line_no), a, b, t),
            Err(reason) => reject_or_skip(path, line_no, reason, opts),
        }
    })
}

fn read_delimited(
    path: &Path,
    delimiter: u8,
    opts: LoadOptions,
    add: &mut AddFn<'_>,
) -> Result<()> {
    let (mut reader, headers) = open_delimited(path, delimiter)?;
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
    let (Some(a), Some(b)) = (find(&FIRST), find(&SECOND)) else {
        return Err(Error::BadLine {
            path: path.to_path_buf(),
            line: 1,
            reason: format!(
                "the header must name two text columns (e.g. \"sentence1\" and \"sentence2\"), found {:?}",
                headers.iter().collect::<Vec<_>>()
            ),
        });
    };
    let (score, label) = (find(&["score"]), find(&["label"]));
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                let field = |i: usize| record.get(i).unwrap_or("").trim().to_string();
                let target = match (score, label) {
                    (Some(s), _) => field(s)
                        .parse::<f32>()
                        .map(RawTarget::Score)
                        .map_err(|_| format!("column \"score\" is not a number: {:?}", field(s))),
                    (None, Some(l)) => {
                        let v = field(l);
                        if v.is_empty() {
                            Err("column \"label\" is empty".into())
                        } else {
                            Ok(RawTarget::Label(match v.parse::<i64>() {
                                Ok(i) => RawLabel::Id(i),
                                Err(_) => RawLabel::Name(v),
                            }))
                        }
                    }
                    (None, None) => Err("the header has no \"score\" or \"label\" column".into()),
                };
                match target {
                    Ok(t) => add(&at_line(path, line), field(a), field(b), t)?,
                    Err(reason) => reject_or_skip(path, line, reason, opts)?,
                }
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                reject_or_skip(path, line, format!("malformed row: {e}"), opts)?;
            }
        }
    }
    Ok(())
}

/// One epoch of a pointwise task: a seeded shuffle cut into whole batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairEpoch {
    pub batch_size: usize,
    order: Vec<u32>,
    /// Pairs left over after the last whole batch (used by other epochs' shuffles).
    pub leftovers: usize,
}

impl PairEpoch {
    /// Plans epoch `epoch` of `n` pairs.
    pub(crate) fn plan(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Self {
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::mix_seed(&[seed, epoch, 0x7061_6972]));
        order.shuffle(&mut rng);
        let whole = n / batch_size * batch_size;
        order.truncate(whole);
        Self {
            batch_size,
            order,
            leftovers: n - whole,
        }
    }

    /// Number of whole batches.
    pub(crate) fn num_batches(&self) -> usize {
        self.order.len() / self.batch_size
    }

    /// The pair indices of batch `k`.
    pub(crate) fn batch(&self, k: usize) -> &[u32] {
        &self.order[k * self.batch_size..(k + 1) * self.batch_size]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    const SCORE: TargetKind = TargetKind::Score { unit: true };

    #[test]
    fn jsonl_csv_and_tsv_pairs_load_alike() {
        let (_a, j) = write(
            "s.jsonl",
            "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 0.5}\n\n{\"query\": \"c\", \"positive\": \"d\", \"score\": 1}\n",
        );
        let (_b, c) = write("s.csv", "sentence1,sentence2,score\na,b,0.5\n\"c\",d,1\n");
        let (_c, t) = write("s.tsv", "anchor\tpositive\tscore\na\tb\t0.5\nc\td\t1.0\n");
        let j = load_pair_files(&[j], SCORE, LoadOptions::default()).unwrap();
        assert_eq!(j.targets, PairTargets::Scores(vec![0.5, 1.0]));
        for p in [c, t] {
            assert!(is_pair_file(&p, None).unwrap());
            assert_eq!(
                load_pair_files(&[p], SCORE, LoadOptions::default())
                    .unwrap()
                    .fingerprint(),
                j.fingerprint()
            );
        }
    }

    #[test]
    fn named_labels_get_sorted_ids() {
        let (_a, p) = write(
            "n.jsonl",
            "{\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": \"neutral\"}\n{\"premise\": \"c\", \"hypothesis\": \"d\", \"label\": \"entailment\"}\n",
        );
        let set = load_pair_files(&[p], TargetKind::Label, LoadOptions::default()).unwrap();
        assert_eq!(
            set.targets,
            PairTargets::Labels {
                ids: vec![1, 0],
                names: vec!["entailment".into(), "neutral".into()]
            }
        );
    }

    #[test]
    fn bad_targets_name_file_line_and_field() {
        let cases: [(&str, &str, TargetKind, &str); 7] = [
            (
                "a.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\"}\n",
                SCORE,
                "a.jsonl:1: missing field \"score\"",
            ),
            (
                "b.jsonl",
                "\n{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": \"high\"}\n",
                SCORE,
                "b.jsonl:2: field \"score\" is not a number",
            ),
            (
                "c.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 1.5}\n",
                SCORE,
                "c.jsonl:1: field \"score\" = 1.5 is outside [0, 1]",
            ),
            (
                "d.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": -1}\n",
                TargetKind::Label,
                "d.jsonl:1: field \"label\" = -1 is negative",
            ),
            (
                "e.csv",
                "sentence1,sentence2,score\na,b,x\n",
                SCORE,
                "e.csv:2: column \"score\" is not a number",
            ),
            (
                "f.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": 1.5}\n",
                TargetKind::Label,
                "f.jsonl:1: field \"label\" is neither an integer nor a name",
            ),
            (
                "g.jsonl",
                "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 1, \"extra\": 2}\n",
                SCORE,
                "g.jsonl:1: unknown field \"extra\"",
            ),
        ];
        for (name, text, kind, needle) in cases {
            let (_d, p) = write(name, text);
            let err = load_pair_files(&[p], kind, LoadOptions::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
        let (_d, p) = write(
            "h.jsonl",
            "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 9}\n{\"sentence1\": \"a\", \"sentence2\": \"b\", \"score\": 0.1}\n",
        );
        let set = load_pair_files(
            &[p],
            SCORE,
            LoadOptions {
                skip_invalid: true,
                columns: None,
            },
        )
        .unwrap();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn epochs_use_whole_batches_and_reshuffle() {
        let a = PairEpoch::plan(10, 4, 1, 0);
        let b = PairEpoch::plan(10, 4, 1, 1);
        assert_eq!((a.num_batches(), a.leftovers), (2, 2));
        assert_ne!(a.batch(0), b.batch(0));
        assert_eq!(a, PairEpoch::plan(10, 4, 1, 0));
    }
}
