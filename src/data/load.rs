//! Reading training files: query-grouped JSONL, pair JSONL, CSV/TSV pair files with a header, and
//! tables (Parquet, Arrow, `datasets` folders; see `table` and `columns`). Every malformed record is
//! an error naming file, line (or row) and reason, unless `skip_invalid` is set, in which case each
//! one is still logged and counted.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::columns::{Columns, GroupColumns};
use super::dataset::{Cluster, Dataset, DatasetBuilder};
use super::table::{self, Key, Table};
use crate::error::{Error, Result};

/// How to read the files: what to do with malformed records, and which table columns hold what.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions<'a> {
    pub skip_invalid: bool,
    /// `data.columns`: for tables only; `None` reads them as sentence-transformers does.
    pub columns: Option<&'a Columns>,
}

/// One JSONL record: a group (`positives`) or a pair (`positive`), `anchor` accepted for `query`,
/// optionally with a `cluster` label.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    #[serde(alias = "anchor")]
    query: String,
    #[serde(default)]
    positives: Option<Vec<String>>,
    #[serde(default)]
    positive: Option<String>,
    #[serde(default)]
    negatives: Option<Vec<String>>,
    #[serde(default)]
    negative: Option<String>,
    /// A number or a name: the group's topic for `data.batching = "by_cluster"`.
    #[serde(default)]
    cluster: Option<Cluster>,
    /// Tolerated and ignored: many exports carry an id.
    #[serde(default, rename = "id")]
    _id: Option<serde_json::Value>,
}

/// One record's content, from any file format.
struct Parts {
    query: String,
    positives: Vec<String>,
    negatives: Vec<String>,
    cluster: Option<Cluster>,
}

impl JsonRecord {
    fn into_parts(self) -> std::result::Result<Parts, String> {
        let positives = match (self.positives, self.positive) {
            (Some(p), None) => p,
            (None, Some(p)) => vec![p],
            (Some(_), Some(_)) => return Err("has both \"positives\" and \"positive\"".into()),
            (None, None) => return Err("missing field \"positives\" (or \"positive\")".into()),
        };
        let negatives = match (self.negatives, self.negative) {
            (Some(n), None) => n,
            (None, Some(n)) => vec![n],
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => return Err("has both \"negatives\" and \"negative\"".into()),
        };
        Ok(Parts {
            query: self.query,
            positives,
            negatives,
            cluster: self.cluster,
        })
    }
}

/// Loads and merges all `paths` into one dataset.
pub fn load_files(paths: &[PathBuf], opts: LoadOptions<'_>) -> Result<Dataset> {
    let mut builder = DatasetBuilder::new();
    for path in paths {
        load_file(path, opts, &mut builder)?;
    }
    let data = builder.finish();
    if data.is_empty() {
        return Err(nothing_usable("query groups", paths));
    }
    Ok(data)
}

/// The error for files that held nothing usable (every record malformed, skipped or empty).
pub(crate) fn nothing_usable(what: &str, paths: &[PathBuf]) -> Error {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    Error::Usage(format!("no usable {what} in {}", names.join(", ")))
}

/// One bad line: an error naming file, line and reason, or with `skip_invalid` a logged warning.
pub(crate) fn reject_or_skip(
    path: &Path,
    line: usize,
    reason: String,
    opts: LoadOptions<'_>,
) -> Result<()> {
    refuse_or_skip(at_line(path, line)(reason), opts)
}

/// The error for line `line` of `path`, made from its reason.
pub(crate) fn at_line(path: &Path, line: usize) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::BadLine {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

/// Refuses `data.columns` for a file that is not a table: JSONL and CSV name their fields.
pub(crate) fn refuse_columns_for_text(path: &Path, opts: LoadOptions<'_>) -> Result<()> {
    match opts.columns {
        Some(_) => Err(Error::invalid(
            path,
            "data.columns maps the columns of Parquet and Arrow tables; this file names its fields itself",
        )),
        None => Ok(()),
    }
}

/// One bad record: the error, or with `skip_invalid` a logged warning.
pub(crate) fn refuse_or_skip(error: Error, opts: LoadOptions<'_>) -> Result<()> {
    if opts.skip_invalid {
        tracing::warn!(%error, "skipping invalid record");
        Ok(())
    } else {
        Err(error)
    }
}

/// The message for a file of a format multipos does not read.
pub(crate) const FORMATS: &str = "unknown data format: expected .jsonl, .csv, .tsv, .parquet or .arrow, or a folder of Parquet shards or a `datasets` save_to_disk folder";

struct Sink<'a> {
    path: &'a Path,
    opts: LoadOptions<'a>,
    builder: &'a mut DatasetBuilder,
}

impl Sink<'_> {
    /// Records one bad record: an error, or with `skip_invalid` a warning and a count.
    fn refuse(&mut self, error: Error) -> Result<()> {
        refuse_or_skip(error, self.opts)?;
        self.builder.note_skipped();
        Ok(())
    }

    /// Records one bad line.
    fn reject(&mut self, line: usize, reason: String) -> Result<()> {
        self.refuse(at_line(self.path, line)(reason))
    }

    /// Adds a record; one the builder refuses is an error made by `at` from the reason.
    fn add(
        &mut self,
        (query, positives, negatives): (&str, &[&str], &[&str]),
        cluster: Option<&Cluster>,
        at: impl FnOnce(String) -> Error,
    ) -> Result<()> {
        match self.builder.add(query, positives, negatives, cluster) {
            Ok(()) => Ok(()),
            Err(e) => self.refuse(at(e.to_string())),
        }
    }

    fn add_line(&mut self, line: usize, record: &Parts) -> Result<()> {
        let p: Vec<&str> = record.positives.iter().map(String::as_str).collect();
        let n: Vec<&str> = record.negatives.iter().map(String::as_str).collect();
        let path = self.path;
        self.add(
            (&record.query, &p, &n),
            record.cluster.as_ref(),
            at_line(path, line),
        )
    }
}

fn load_file(path: &Path, opts: LoadOptions<'_>, builder: &mut DatasetBuilder) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut sink = Sink {
        path,
        opts,
        builder,
    };
    if table::is_table(path) {
        return load_table(&Table::open(path)?, &mut sink);
    }
    refuse_columns_for_text(path, opts)?;
    match ext {
        "jsonl" | "json" => load_jsonl(path, &mut sink),
        "csv" => load_delimited(path, b',', &mut sink),
        "tsv" => load_delimited(path, b'\t', &mut sink),
        _ => Err(Error::invalid(path, FORMATS)),
    }
}

/// Reads a table's query groups, a record batch at a time.
fn load_table(table: &Table, sink: &mut Sink<'_>) -> Result<()> {
    let cols = GroupColumns::of(sink.opts.columns, table)?;
    table.scan(&cols.scan(), |rows| {
        let query = rows.column(&cols.query)?;
        let positives = rows.column(&cols.positives)?;
        let negatives = cols
            .negatives
            .iter()
            .map(|n| rows.column(n))
            .collect::<Result<Vec<_>>>()?;
        let cluster = cols.cluster.as_ref().map(|c| rows.column(c)).transpose()?;
        for i in 0..rows.len() {
            let required = |name: &str| rows.error(i, Some(name), "null in a required column");
            let Some(q) = query.text(i) else {
                sink.refuse(required(&cols.query))?;
                continue;
            };
            let p = match positives.texts(i) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    sink.refuse(required(&cols.positives))?;
                    continue;
                }
                Err(reason) => {
                    sink.refuse(rows.error(i, Some(&cols.positives), reason))?;
                    continue;
                }
            };
            let mut n = Vec::new();
            let mut bad = None;
            for (column, name) in negatives.iter().zip(&cols.negatives) {
                match column.texts(i) {
                    Ok(texts) => n.extend(texts.unwrap_or_default()),
                    Err(reason) => bad = Some(rows.error(i, Some(name), reason)),
                }
            }
            let label = match cluster.as_ref().and_then(|c| c.key(i)) {
                None => None,
                Some(Key::Text(t)) => Some(Cluster::Name(t.to_string())),
                Some(Key::Int(id)) if id >= 0 => Some(Cluster::Id(id as u64)),
                Some(Key::Int(id)) => {
                    let column = cols.cluster.as_deref();
                    bad = Some(rows.error(
                        i,
                        column,
                        format!("a cluster label is a non-negative integer or a string, not {id}"),
                    ));
                    None
                }
            };
            match bad {
                Some(error) => sink.refuse(error)?,
                None => sink.add((q, &p, &n), label.as_ref(), |reason| {
                    rows.error(i, None, reason)
                })?,
            }
        }
        Ok(())
    })
}

/// Calls `each(line number, text)` for every non-blank line of a text file (JSONL, TSV), a leading
/// byte-order mark left out; `each` gets the text as `Ok`, or `Err(reason)` for a line that is not
/// UTF-8.
pub(crate) fn each_text_line(
    path: &Path,
    mut each: impl FnMut(usize, std::result::Result<&str, String>) -> Result<()>,
) -> Result<()> {
    let reader = BufReader::new(File::open(path).map_err(Error::io("open", path))?);
    for (i, line) in reader.split(b'\n').enumerate() {
        let bytes = line.map_err(Error::io("read", path))?;
        // A byte-order mark (editors on Windows write one) is not part of the first record.
        let bytes = match i {
            0 => bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes),
            _ => &bytes,
        };
        match std::str::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => each(i + 1, Ok(text))?,
            Err(_) => each(i + 1, Err("not valid UTF-8".into()))?,
        }
    }
    Ok(())
}

fn load_jsonl(path: &Path, sink: &mut Sink<'_>) -> Result<()> {
    each_text_line(path, |line_no, text| {
        let parts = text.and_then(|text| {
            serde_json::from_str::<JsonRecord>(text)
                .map_err(|e| format!("invalid record: {e}"))
                .and_then(JsonRecord::into_parts)
        });
        match parts {
            Ok(record) => sink.add_line(line_no, &record),
            Err(reason) => sink.reject(line_no, reason),
        }
    })
}

/// Opens a CSV/TSV file (rows of unequal length are errors) and reads its header.
pub(crate) fn open_delimited(
    path: &Path,
    delimiter: u8,
) -> Result<(csv::Reader<File>, csv::StringRecord)> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_path(path)
        .map_err(|e| Error::invalid(path, e.to_string()))?;
    let headers = reader
        .headers()
        .map_err(|e| Error::invalid(path, format!("cannot read the header: {e}")))?
        .clone();
    Ok((reader, headers))
}

fn load_delimited(path: &Path, delimiter: u8, sink: &mut Sink<'_>) -> Result<()> {
    let (mut reader, headers) = open_delimited(path, delimiter)?;
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
    let query = find(&["query", "anchor"]);
    let positive = find(&["positive"]);
    let (Some(query), Some(positive)) = (query, positive) else {
        return Err(Error::BadLine {
            path: path.to_path_buf(),
            line: 1,
            reason: format!(
                "the header must name a \"query\" (or \"anchor\") and a \"positive\" column, found {:?}",
                headers.iter().collect::<Vec<_>>()
            ),
        });
    };
    let cluster = find(&["cluster"]);
    let negatives: Vec<usize> = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.trim().starts_with("negative"))
        .map(|(i, _)| i)
        .collect();
    let mut record = csv::StringRecord::new();
    loop {
        let line_no = reader.position().line() as usize;
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line_no = record.position().map_or(line_no, |p| p.line() as usize);
                let field = |i: usize| record.get(i).unwrap_or("").to_string();
                let negs: Vec<String> = negatives
                    .iter()
                    .map(|&i| field(i))
                    .filter(|n| !n.trim().is_empty())
                    .collect();
                let record = Parts {
                    query: field(query),
                    positives: vec![field(positive)],
                    negatives: negs,
                    cluster: cluster
                        .map(field)
                        .filter(|c| !c.trim().is_empty())
                        .map(|c| Cluster::parse(&c)),
                };
                sink.add_line(line_no, &record)?;
            }
            Err(e) => {
                let line = e.position().map_or(line_no, |p| p.line() as usize);
                sink.reject(line, format!("malformed row: {e}"))?;
                if !matches!(
                    e.kind(),
                    csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                ) {
                    return Err(Error::BadLine {
                        path: path.to_path_buf(),
                        line,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    fn load(p: &Path, skip_invalid: bool) -> Result<Dataset> {
        load_files(
            &[p.to_path_buf()],
            LoadOptions {
                skip_invalid,
                columns: None,
            },
        )
    }

    #[test]
    fn groups_pairs_and_csv_load_to_the_same_groups() {
        let (_a, grouped) = write("g.jsonl", b"{\"query\": \"q1\", \"positives\": [\"a\", \"b\"]}\n\n{\"query\": \"q2\", \"positives\": [\"c\"], \"negatives\": [\"d\"]}\n");
        let (_b, pairs) = write("p.jsonl", b"{\"query\": \"q1\", \"positive\": \"a\"}\n{\"anchor\": \"q1\", \"positive\": \"b\"}\n{\"query\": \"q2\", \"positive\": \"c\", \"negative\": \"d\"}\n");
        let (_c, csv) = write(
            "p.csv",
            b"query,positive,negative\nq1,a,\nq1,b,\n\"q2\",\"c\",d\n",
        );
        let (_d, tsv) = write("p.tsv", b"anchor\tpositive\nq1\ta\nq1\tb\nq2\tc\n");
        let fp = load(&grouped, false).unwrap().fingerprint();
        assert_eq!(load(&pairs, false).unwrap().fingerprint(), fp);
        assert_eq!(load(&csv, false).unwrap().fingerprint(), fp);
        let tsv = load(&tsv, false).unwrap();
        assert_eq!((tsv.len(), tsv.pair_count()), (2, 3));
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let cases: [(&str, &[u8], &str); 9] = [
            ("a.jsonl", b"{\"query\": \"q\", \"positives\": [\"a\"]}\n{\"query\": \"q\", \"positives\": [\"a\"\n", "a.jsonl:2: invalid record"),
            ("b.jsonl", b"{\"query\": \"q\", \"positives\": []}\n", "b.jsonl:1: the group has no positives"),
            ("c.jsonl", b"\n{\"query\": \"  \", \"positives\": [\"a\"]}\n", "c.jsonl:2: field \"query\" is empty"),
            ("d.jsonl", b"{\"query\": \"q\"}\n", "d.jsonl:1: missing field \"positives\""),
            ("e.jsonl", b"{\"query\": \"q\", \"positives\": [\"a\"], \"score\": 1}\n", "e.jsonl:1: invalid record: unknown field `score`"),
            ("f.csv", b"question,answer\nq,a\n", "f.csv:1: the header must name"),
            ("g.csv", b"query,positive\nq,a\nq,a,extra\n", "g.csv:3: malformed row"),
            ("h.jsonl", b"{\"query\": \"q\", \"positives\": [\"a\"], \"cluster\": 1.5}\n", "h.jsonl:1: invalid record: a cluster label: a non-negative integer or a string"),
            ("i.jsonl", b"{\"query\": \"q\", \"positive\": \"a\", \"cluster\": 1}\n{\"query\": \"q\", \"positive\": \"b\", \"cluster\": \"1\"}\n", "i.jsonl:2: field \"cluster\" is \"1\", but an earlier record of this query put it in cluster 1"),
        ];
        for (name, text, needle) in cases {
            let (_d, p) = write(name, text);
            let err = load(&p, false).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn skip_invalid_counts_each_skipped_record() {
        let (_d, p) = write("s.jsonl", b"{\"query\": \"q\", \"positives\": [\"a\"]}\nnot json\n{\"query\": \"\", \"positives\": [\"b\"]}\n");
        let d = load(&p, true).unwrap();
        assert_eq!((d.len(), d.stats().invalid_skipped), (1, 2));
        let (_d, p) = write("t.jsonl", b"nope\n");
        assert!(
            load(&p, true)
                .unwrap_err()
                .to_string()
                .contains("no usable query groups")
        );
    }

    #[test]
    fn cluster_labels_load_from_json_and_csv_alike() {
        let (_a, grouped) = write("g.jsonl", b"{\"query\": \"q1\", \"positives\": [\"a\"], \"cluster\": 3}\n{\"query\": \"q2\", \"positives\": [\"b\"], \"cluster\": \"cars\"}\n");
        let (_b, csv) = write("p.csv", b"query,positive,cluster\nq1,a,3\nq2,b,cars\n");
        let (_c, plain) = write("n.jsonl", b"{\"query\": \"q1\", \"positives\": [\"a\"]}\n{\"query\": \"q2\", \"positives\": [\"b\"]}\n");
        let (g, c, p) = (
            load(&grouped, false).unwrap(),
            load(&csv, false).unwrap(),
            load(&plain, false).unwrap(),
        );
        assert_eq!(g.fingerprint(), c.fingerprint());
        assert_ne!(
            g.fingerprint(),
            p.fingerprint(),
            "labels are part of the content"
        );
        assert_eq!(g.cluster_label(g.cluster(0).unwrap()), &Cluster::Id(3));
        assert_eq!(
            g.cluster_label(g.cluster(1).unwrap()),
            &Cluster::Name("cars".into())
        );
        assert_eq!((p.cluster(0), p.cluster_count()), (None, 0));
    }
}
