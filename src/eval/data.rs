//! An information-retrieval evaluation set in the BEIR layout: `queries.jsonl` and `corpus.jsonl`
//! (`{"id", "text"}` per line) and a `qrels.tsv` (`query-id<TAB>corpus-id<TAB>score`, header line
//! optional, score > 0 = relevant); or the same as tables (Parquet, Arrow: `id` or `_id` and `text`
//! columns; `query-id`, `corpus-id` and `score` columns), as BEIR's sets are on the Hub.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::data::load::{at_line, each_text_line};
use crate::data::table::{self, Id, Kind, Table};
use crate::error::{Error, Result};

/// Queries (only those with at least one relevant document, in file order), corpus, and relevance.
#[derive(Debug, Clone)]
pub struct IrDataset {
    pub query_ids: Vec<String>,
    pub queries: Vec<String>,
    pub corpus_ids: Vec<String>,
    pub corpus: Vec<String>,
    /// For each kept query, the indices into `corpus` of its relevant documents.
    pub relevant: Vec<BTreeSet<usize>>,
}

#[derive(Deserialize)]
struct Entry {
    id: serde_json::Value,
    text: String,
}

fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_entries(path: &Path) -> Result<Vec<(String, String)>> {
    if table::is_table(path) {
        return read_table_entries(path);
    }
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    each_text_line(path, |line_no, text| {
        let bad = at_line(path, line_no);
        let e: Entry = serde_json::from_str(text.map_err(&bad)?)
            .map_err(|e| bad(format!("expected {{\"id\", \"text\"}}: {e}")))?;
        let id = id_string(&e.id)
            .ok_or_else(|| bad("field \"id\" must be a string or a number".into()))?;
        if let Some(first) = seen.insert(id.clone(), line_no) {
            return Err(bad(format!("duplicate id {id:?} (first on line {first})")));
        }
        out.push((id, e.text));
        Ok(())
    })?;
    if out.is_empty() {
        return Err(Error::invalid(path, "no entries"));
    }
    Ok(out)
}

/// Calls `each(query-id, corpus-id, score)` for every judgement of a qrels file: a TSV or a table
/// with `query-id`, `corpus-id` and `score` columns. A reason `each` returns becomes an error
/// naming the line (or row).
fn each_qrel(
    path: &Path,
    mut each: impl FnMut(&str, &str, f64) -> std::result::Result<(), String>,
) -> Result<()> {
    if table::is_table(path) {
        let names = ["query-id", "corpus-id", "score"];
        let table = Table::open(path)?;
        let kinds = [Kind::Key, Kind::Key, Kind::Number];
        let scan: Vec<(&str, Kind)> = names.into_iter().zip(kinds).collect();
        return table.scan(&scan, |rows| {
            let (q, c, s) = (
                rows.column(names[0])?,
                rows.column(names[1])?,
                rows.column(names[2])?,
            );
            for i in 0..rows.len() {
                let null = |n: &str| rows.error(i, Some(n), "null in a required column");
                let qid = Id::from(q.key(i).ok_or_else(|| null(names[0]))?).to_string();
                let cid = Id::from(c.key(i).ok_or_else(|| null(names[1]))?).to_string();
                let score = s.number(i).ok_or_else(|| null(names[2]))?;
                each(&qid, &cid, score).map_err(|reason| rows.error(i, None, reason))?;
            }
            Ok(())
        });
    }
    let mut first = true;
    each_text_line(path, |line_no, text| {
        let bad = at_line(path, line_no);
        let fields: Vec<&str> = text.map_err(&bad)?.split('\t').map(str::trim).collect();
        let header = std::mem::take(&mut first) && fields.first() == Some(&"query-id");
        if header {
            return Ok(());
        }
        let [qid, cid, score] = fields[..] else {
            return Err(bad(format!(
                "expected 3 tab-separated fields (query-id, corpus-id, score), got {}",
                fields.len()
            )));
        };
        let score: f64 = score
            .parse()
            .map_err(|_| bad(format!("score {score:?} is not a number")))?;
        each(qid, cid, score).map_err(bad)
    })
}

/// Entries of a table with an `id` (or `_id`) and a `text` column (BEIR's layout on the Hub).
fn read_table_entries(path: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (row, (id, text)) in table::read_texts(path)?.into_iter().enumerate() {
        let Some(id) = id.map(|id| id.to_string()) else {
            return Err(Error::invalid(path, "has no \"id\" (or \"_id\") column"));
        };
        if let Some(first) = seen.insert(id.clone(), row) {
            return Err(Error::invalid(
                path,
                format!("duplicate id {id:?} in rows {first} and {row}"),
            ));
        }
        out.push((id, text));
    }
    if out.is_empty() {
        return Err(Error::invalid(path, "no entries"));
    }
    Ok(out)
}

impl IrDataset {
    /// The set with `query` in front of every query and `document` in front of every document,
    /// for a model whose prompts they are.
    pub(crate) fn prompted(mut self, query: Option<&str>, document: Option<&str>) -> Self {
        use crate::model::config::prompted;
        if query.is_some() {
            self.queries = prompted(self.queries.iter().map(String::as_str), query);
        }
        if document.is_some() {
            self.corpus = prompted(self.corpus.iter().map(String::as_str), document);
        }
        self
    }

    /// Loads and cross-checks the three files; unknown ids in the qrels are errors with file:line.
    pub fn load(queries: &Path, corpus: &Path, qrels: &Path) -> Result<Self> {
        let queries_all = read_entries(queries)?;
        let corpus_all = read_entries(corpus)?;
        let q_index: HashMap<&str, usize> = queries_all
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let c_index: HashMap<&str, usize> = corpus_all
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let mut relevant: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); queries_all.len()];
        each_qrel(qrels, |qid, cid, score| {
            let q = *q_index
                .get(qid)
                .ok_or_else(|| format!("query-id {qid:?} is not in {}", queries.display()))?;
            let c = *c_index
                .get(cid)
                .ok_or_else(|| format!("corpus-id {cid:?} is not in {}", corpus.display()))?;
            if score > 0.0 {
                relevant[q].insert(c);
            }
            Ok(())
        })?;
        let total_queries = queries_all.len();
        let mut set = IrDataset {
            query_ids: Vec::new(),
            queries: Vec::new(),
            corpus_ids: corpus_all.iter().map(|(id, _)| id.clone()).collect(),
            corpus: corpus_all.into_iter().map(|(_, t)| t).collect(),
            relevant: Vec::new(),
        };
        for ((id, text), rel) in queries_all.into_iter().zip(relevant) {
            if !rel.is_empty() {
                set.query_ids.push(id);
                set.queries.push(text);
                set.relevant.push(rel);
            }
        }
        if set.queries.is_empty() {
            return Err(Error::invalid(qrels, "no query has a relevant document"));
        }
        let dropped = total_queries - set.query_ids.len();
        if dropped > 0 {
            tracing::warn!(
                "{dropped} of {total_queries} queries of {} have no relevant document in {} and are not scored (as sentence-transformers does)",
                queries.display(),
                qrels.display()
            );
        }
        Ok(set)
    }
}
