//! Which columns of a table (Parquet, Arrow) hold what. Named in `data.columns`, or found as
//! sentence-transformers finds them: `score` and `label` by name, then the first other column is the
//! query (anchor), the second the positive(s) and the rest negatives. multipos also takes `cluster`
//! by name, and ignores `id`, as its JSONL reader does.
use serde::{Deserialize, Serialize};

use super::table::{Kind, Table};
use crate::error::{Error, Result};

/// Names ignored by the default mapping: row ids that exports carry.
const IDS: [&str; 2] = ["id", "_id"];

/// `data.columns`: the columns to read, by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// The query (anchor); for pair losses, the first text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The positive, or a list of positives (one row, one query group); for pair losses, the second text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positives: Option<String>,
    /// Negative columns: a name or a list of names, each a string or a list of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negatives: Option<Names>,
    /// A gold similarity (CosineSimilarityLoss, CoSENT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
    /// A class, integer or name (SoftmaxLoss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The group's topic, for `batching = "by_cluster"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// One column name or several.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn to_vec(&self) -> Vec<String> {
        match self {
            Names::One(n) => vec![n.clone()],
            Names::Many(v) => v.clone(),
        }
    }
}

impl Columns {
    /// Refuses a mapping that cannot be read: no query or positives, a column named twice, both
    /// a score and a label.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.query.is_none() || self.positives.is_none() {
            return Err(
                "name both \"query\" and \"positives\" (the other fields are optional)".into(),
            );
        }
        if self.score.is_some() && self.label.is_some() {
            return Err("name \"score\" or \"label\", not both".into());
        }
        let mut all = self.named();
        if all.iter().any(|n| n.is_empty()) {
            return Err("a column name is empty".into());
        }
        all.sort_unstable();
        if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("column {:?} is named twice", w[0]));
        }
        Ok(())
    }

    fn named(&self) -> Vec<String> {
        let mut all: Vec<String> = [
            &self.query,
            &self.positives,
            &self.score,
            &self.label,
            &self.cluster,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        all.extend(self.negatives.iter().flat_map(Names::to_vec));
        all
    }

    /// True when a table read with this mapping (or the default one) holds scored or labelled pairs.
    pub(crate) fn is_pairs(mapping: Option<&Columns>, table: &Table) -> bool {
        match mapping {
            Some(m) => m.score.is_some() || m.label.is_some(),
            None => table.has("score") || table.has("label"),
        }
    }
}

/// The columns of a query-group table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupColumns {
    pub query: String,
    pub positives: String,
    pub negatives: Vec<String>,
    pub cluster: Option<String>,
}

impl GroupColumns {
    /// The mapping's columns, or the default ones of `table`.
    pub(crate) fn of(mapping: Option<&Columns>, table: &Table) -> Result<Self> {
        if let Some(m) = mapping {
            return Ok(Self {
                query: m.query.clone().unwrap_or_default(),
                positives: m.positives.clone().unwrap_or_default(),
                negatives: m.negatives.iter().flat_map(Names::to_vec).collect(),
                cluster: m.cluster.clone(),
            });
        }
        let cluster = table.has("cluster").then(|| "cluster".to_string());
        let texts: Vec<String> = table
            .names()
            .filter(|n| !IDS.contains(n) && *n != "cluster")
            .map(str::to_string)
            .collect();
        let [query, positives, negatives @ ..] = texts.as_slice() else {
            return Err(too_few(table, "a query and a positive column"));
        };
        Ok(Self {
            query: query.clone(),
            positives: positives.clone(),
            negatives: negatives.to_vec(),
            cluster,
        })
    }

    /// The columns to scan and what each must hold.
    pub(crate) fn scan(&self) -> Vec<(&str, Kind)> {
        let mut out = vec![
            (self.query.as_str(), Kind::Text),
            (self.positives.as_str(), Kind::Texts),
        ];
        out.extend(self.negatives.iter().map(|n| (n.as_str(), Kind::Texts)));
        out.extend(self.cluster.iter().map(|c| (c.as_str(), Kind::Key)));
        out
    }
}

/// Whether a pair's target is a score or a label, and its column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TargetColumn {
    Score(String),
    Label(String),
}

/// The columns of a scored or labelled pair table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PairColumns {
    pub first: String,
    pub second: String,
    pub target: TargetColumn,
}

impl PairColumns {
    /// The mapping's columns, or the default ones of `table`.
    pub(crate) fn of(mapping: Option<&Columns>, table: &Table) -> Result<Self> {
        let target_of = |score: Option<&String>, label: Option<&String>| match (score, label) {
            (Some(s), None) => Ok(TargetColumn::Score(s.clone())),
            (None, Some(l)) => Ok(TargetColumn::Label(l.clone())),
            (Some(_), Some(_)) => Err(Error::invalid(
                table.path(),
                "has both a \"score\" and a \"label\" column: name the one to train on in data.columns",
            )),
            (None, None) => Err(Error::invalid(
                table.path(),
                "has no \"score\" or \"label\" column",
            )),
        };
        if let Some(m) = mapping {
            return Ok(Self {
                first: m.query.clone().unwrap_or_default(),
                second: m.positives.clone().unwrap_or_default(),
                target: target_of(m.score.as_ref(), m.label.as_ref())?,
            });
        }
        let (score, label) = ("score".to_string(), "label".to_string());
        let target = target_of(
            table.has("score").then_some(&score),
            table.has("label").then_some(&label),
        )?;
        let texts: Vec<&str> = table
            .names()
            .filter(|n| !IDS.contains(n) && !["score", "label"].contains(n))
            .collect();
        match texts.as_slice() {
            [first, second] => Ok(Self {
                first: first.to_string(),
                second: second.to_string(),
                target,
            }),
            [_] | [] => Err(too_few(table, "two text columns and a score or label")),
            more => Err(Error::invalid(
                table.path(),
                format!(
                    "has {} text columns {more:?}; a pair table has two: name them in data.columns (query, positives)",
                    more.len()
                ),
            )),
        }
    }

    /// The columns to scan and what each must hold.
    pub(crate) fn scan(&self) -> Vec<(&str, Kind)> {
        let target = match &self.target {
            TargetColumn::Score(s) => (s.as_str(), Kind::Number),
            TargetColumn::Label(l) => (l.as_str(), Kind::Key),
        };
        vec![
            (self.first.as_str(), Kind::Text),
            (self.second.as_str(), Kind::Text),
            target,
        ]
    }
}

fn too_few(table: &Table, what: &str) -> Error {
    let names: Vec<&str> = table.names().collect();
    Error::invalid(
        table.path(),
        format!("needs {what}, found the columns {names:?} (name them in data.columns)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_needs_query_and_positives_and_names_each_column_once() {
        let named = |q: &str, p: &str| Columns {
            query: Some(q.into()),
            positives: Some(p.into()),
            ..Columns::default()
        };
        assert!(named("question", "answers").validate().is_ok());
        let cases = [
            (Columns::default(), "name both \"query\" and \"positives\""),
            (named("a", "a"), "column \"a\" is named twice"),
            (
                Columns {
                    negatives: Some(Names::Many(vec!["n".into(), "q".into()])),
                    ..named("q", "p")
                },
                "column \"q\" is named twice",
            ),
            (
                Columns {
                    score: Some("s".into()),
                    label: Some("l".into()),
                    ..named("q", "p")
                },
                "not both",
            ),
            (named("", "p"), "a column name is empty"),
        ];
        for (c, want) in cases {
            let got = c.validate().unwrap_err();
            assert!(got.contains(want), "{got}");
        }
    }

    #[test]
    fn negatives_are_one_name_or_a_list_in_toml() {
        let one: Columns =
            toml::from_str("query = \"q\"\npositives = \"p\"\nnegatives = \"n\"").unwrap();
        let many: Columns =
            toml::from_str("query = \"q\"\npositives = \"p\"\nnegatives = [\"n\", \"m\"]").unwrap();
        assert_eq!(one.named().len(), 3);
        assert_eq!(many.named().len(), 4);
        assert!(toml::from_str::<Columns>("query = \"q\"\nanchor = \"a\"").is_err());
    }
}
