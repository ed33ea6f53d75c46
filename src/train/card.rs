//! The model card: the `README.md` that sentence-transformers writes beside a model (YAML front
//! matter for the Hub, then what the model is, what it was trained on and how, how it scored),
//! written into every model directory a run leaves. It is made from the saved directory's own
//! configs, the run's config and its `metrics.jsonl`, so `train` and the coordinator write the same
//! card. Paths are cut to their file names and the cluster token is never in it: a card is made to
//! be published.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::io::atomic;

/// Which of a run's model directories a card describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    /// `model/`: the model the run ends with (the best one under `eval.keep_best`).
    Final,
    /// `model-best/`: the best evaluation's.
    Best,
    /// `model-ema/`: the moving average of the weights.
    Ema,
}

impl Which {
    fn dir(self) -> &'static str {
        match self {
            Which::Final => "model",
            Which::Best => "model-best",
            Which::Ema => "model-ema",
        }
    }
}

/// What the run's `metrics.jsonl` says, as the card needs it.
#[derive(Debug, Default)]
struct Record {
    /// Per task: its name and its `data` event.
    tasks: Vec<(String, Value)>,
    /// Evaluations in order: step and metrics.
    evals: Vec<(u64, BTreeMap<String, f64>)>,
    /// The step of the last new best.
    best: Option<u64>,
    /// Per step: step, epoch (from 0), task and loss.
    steps: Vec<(u64, u64, String, f64)>,
}

impl Record {
    fn read(text: &str) -> Self {
        let mut r = Record::default();
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let step = v["step"].as_u64();
            match (v["event"].as_str(), step) {
                (Some("data"), _) => {
                    if let Some(task) = v["task"].as_str() {
                        // A resumed run logs its data again: the latest wins.
                        r.tasks.retain(|(t, _)| t != task);
                        r.tasks.push((task.to_string(), v.clone()));
                    }
                }
                (Some("eval"), Some(s)) => {
                    let m = serde_json::from_value(v["metrics"].clone()).unwrap_or_default();
                    r.evals.retain(|(e, _)| *e != s);
                    r.evals.push((s, m));
                }
                (Some("best"), Some(s)) => r.best = Some(s),
                (Some("step"), Some(s)) => {
                    if let (Some(loss), Some(task)) = (v["loss"].as_f64(), v["task"].as_str()) {
                        let epoch = v["epoch"].as_u64().unwrap_or(0);
                        r.steps.retain(|(e, ..)| *e != s);
                        r.steps.push((s, epoch, task.to_string(), loss));
                    }
                }
                _ => {}
            }
        }
        r
    }

    /// The evaluation that scored the model `which` holds, if one did.
    fn scored(&self, which: Which, keep_best: bool) -> Option<&(u64, BTreeMap<String, f64>)> {
        let at = |s: u64| self.evals.iter().find(|(e, _)| *e == s);
        match which {
            Which::Best => at(self.best?),
            Which::Final if keep_best => self.best.and_then(at).or(self.evals.last()),
            Which::Final => self.evals.last(),
            Which::Ema => None,
        }
    }
}

/// Writes `README.md` into each model directory the run left in `cfg.output.dir`; `command` is the
/// command line that ran it.
pub(crate) fn write_cards(cfg: &RunConfig, command: &[String]) -> Result<()> {
    let out = &cfg.output.dir;
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).map_err(Error::io("read", &metrics))?;
    let record = Record::read(&text);
    for which in [Which::Final, Which::Best, Which::Ema] {
        let dir = out.join(which.dir());
        if dir.join("modules.json").is_file() {
            let card = render(cfg, command, &record, which, &Model::read(&dir)?);
            atomic::write_file(&dir.join("README.md"), card.as_bytes())?;
        }
    }
    Ok(())
}

/// Writes the card of an averaged model (`multipos average`) into `dir`: the models it averages
/// with their weights, and for a greedy soup the metric it reached on the dev set.
pub fn write_average_card(
    dir: &Path,
    parts: &[(PathBuf, f64)],
    soup: Option<(&str, f64)>,
    command: &[String],
) -> Result<()> {
    let m = Model::read(dir)?;
    let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let name = |p: &PathBuf| file_name(&p.display().to_string());
    let base = parts.first().map(|(p, _)| name(p)).unwrap_or_default();
    let mut s = format!(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\nbase_model:\n{}tags:\n- sentence-transformers\n- sentence-similarity\n- feature-extraction\n- multipos\n- merge\n---\n",
        parts
            .iter()
            .map(|(p, _)| format!("- {}\n", q(&name(p))))
            .collect::<String>()
    );
    let _ = write!(
        s,
        "\n# SentenceTransformer averaging {} models\n\nThis is a [sentence-transformers](https://www.SBERT.net) model made by multipos {} as the weighted average of the \
         weights of {} models fine-tuned from one base. It maps sentences and paragraphs to a {}-dimensional dense vector space.\n\n| model | weight |\n|---|---|\n",
        parts.len(),
        env!("CARGO_PKG_VERSION"),
        parts.len(),
        m.dimension,
    );
    for (p, w) in parts {
        let _ = writeln!(s, "| `{}` | {w:.4} |", name(p));
    }
    if let Some((metric, score)) = soup {
        let _ = writeln!(
            s,
            "\nA greedy soup: the models were ranked by {metric} on the dev set and each was kept while the average improved; the soup scores {metric} = {score:.4}."
        );
    }
    details(&mut s, &base, &m);
    usage(&mut s);
    let _ = write!(
        s,
        "\n### Framework Versions\n\n- multipos: {}\n- libtorch: {}\n\n## Reproduce\n\n```bash\n{}\n```\n",
        env!("CARGO_PKG_VERSION"),
        crate::model::LIBTORCH_VERSION,
        shown_command(command),
    );
    atomic::write_file(&dir.join("README.md"), s.as_bytes())
}

/// What the saved directory says about the model.
struct Model {
    max_seq_length: u64,
    dimension: u64,
    pooling: String,
    normalize: bool,
    similarity: String,
    architecture: String,
}

impl Model {
    fn read(dir: &Path) -> Result<Self> {
        let json = |name: &str| -> Result<Value> { crate::io::json::read(&dir.join(name)) };
        let sbert = json("sentence_bert_config.json")?;
        let pooling = json("1_Pooling/config.json")?;
        let modules = json("modules.json")?;
        let usage = json("config_sentence_transformers.json")?;
        let config = json("config.json")?;
        let modes: Vec<&str> = pooling
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| k.starts_with("pooling_mode_") && v.as_bool() == Some(true))
            .map(|(k, _)| k.trim_start_matches("pooling_mode_"))
            .collect();
        Ok(Self {
            max_seq_length: sbert["max_seq_length"].as_u64().unwrap_or(0),
            dimension: pooling["word_embedding_dimension"].as_u64().unwrap_or(0),
            pooling: modes.join(", "),
            normalize: modules.as_array().is_some_and(|m| {
                m.iter()
                    .any(|e| e["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
            }),
            similarity: usage["similarity_fn_name"]
                .as_str()
                .unwrap_or("cosine")
                .to_string(),
            architecture: config["architectures"][0]
                .as_str()
                .unwrap_or("BertModel")
                .to_string(),
        })
    }
}

/// The file name of a path: what a card may show of a machine's paths.
fn file_name(s: &str) -> String {
    match s.contains('/') || s.contains('\\') {
        true => s
            .trim_end_matches(['/', '\\'])
            .rsplit(['/', '\\'])
            .next()
            .unwrap_or("")
            .to_string(),
        false => s.to_string(),
    }
}

/// The command line as a card shows it: paths cut to file names, a token's value withheld.
pub(crate) fn shown_command(args: &[String]) -> String {
    let mut out = Vec::with_capacity(args.len());
    let mut secret_next = false;
    for (i, a) in args.iter().enumerate() {
        let shown = if secret_next {
            "<withheld>".to_string()
        } else if a.contains("token") && a.contains('=') {
            format!("{}=<withheld>", a.split_once('=').map_or("", |(k, _)| k))
        } else if i == 0 {
            "multipos".to_string()
        } else {
            match a.split_once('=') {
                Some((k, v)) if !k.contains('/') => {
                    let bare = v.trim_matches('"');
                    match bare.len() == v.len() {
                        true => format!("{k}={}", file_name(bare)),
                        false => format!("{k}=\"{}\"", file_name(bare)),
                    }
                }
                _ => file_name(a),
            }
        };
        secret_next = a.starts_with("--") && a.contains("token") && !a.contains('=');
        out.push(shown);
    }
    out.join(" ")
}

/// The resolved config as a card shows it: no token, paths cut to file names.
fn shown_config(cfg: &RunConfig) -> String {
    let mut value = toml::Value::try_from(cfg.without_token())
        .unwrap_or(toml::Value::Table(Default::default()));
    fn cut(v: &mut toml::Value) {
        match v {
            toml::Value::String(s) => *s = file_name(s),
            toml::Value::Array(a) => a.iter_mut().for_each(cut),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| cut(v)),
            _ => {}
        }
    }
    cut(&mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

fn base_model(cfg: &RunConfig) -> String {
    let path = cfg.model.dir();
    file_name(&path.display().to_string())
}

fn render(cfg: &RunConfig, command: &[String], r: &Record, which: Which, m: &Model) -> String {
    let scored = r.scored(which, cfg.eval.as_ref().is_some_and(|e| e.keep_best));
    let mut s = front_matter(cfg, r, scored, m);
    let base = base_model(cfg);
    let _ = writeln!(
        s,
        "\n# SentenceTransformer based on {base}\n\nThis is a [sentence-transformers](https://www.SBERT.net) model fine-tuned from `{base}` with \
         multipos {}. It maps sentences and paragraphs to a {}-dimensional dense vector space and can be used for semantic \
         search, retrieval, clustering and paraphrase mining. {}",
        env!("CARGO_PKG_VERSION"),
        m.dimension,
        match which {
            Which::Final => "This directory holds the model the run ended with.".to_string(),
            Which::Best => format!(
                "This directory holds the model of the best evaluation (step {}).",
                r.best.map_or("?".into(), |b| b.to_string())
            ),
            Which::Ema =>
                "This directory holds the moving average of the weights (`train.ema_decay`).".into(),
        }
    );
    details(&mut s, &base, m);
    usage(&mut s);
    evaluation(&mut s, r, scored);
    training(&mut s, cfg, r);
    framework(&mut s, command, cfg);
    s
}

fn front_matter(
    cfg: &RunConfig,
    r: &Record,
    scored: Option<&(u64, BTreeMap<String, f64>)>,
    m: &Model,
) -> String {
    let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut s = String::from(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n",
    );
    let _ = writeln!(s, "base_model: {}", q(&base_model(cfg)));
    s.push_str(
        "tags:\n- sentence-transformers\n- sentence-similarity\n- feature-extraction\n- multipos\n",
    );
    let rows: u64 = r.tasks.iter().map(|(_, d)| size_of(d)).sum();
    let _ = writeln!(s, "- {}", q(&format!("dataset_size:{rows}")));
    for t in cfg.tasks() {
        let _ = writeln!(s, "- {}", q(&format!("loss:{}", t.loss.class_name())));
    }
    let datasets = known_datasets(cfg);
    if !datasets.is_empty() {
        s.push_str("datasets:\n");
        for d in datasets {
            let _ = writeln!(s, "- {}", q(&d));
        }
    }
    if let Some((step, metrics)) = scored {
        let prefix = format!("{}_", m.similarity);
        s.push_str("metrics:\n");
        for k in metrics.keys() {
            let _ = writeln!(s, "- {}", q(&format!("{prefix}{k}")));
        }
        let _ = write!(
            s,
            "model-index:\n- name: {}\n  results:\n  - task:\n      type: information-retrieval\n      name: Information Retrieval\n    dataset:\n      name: {}\n      type: {}\n    metrics:\n",
            q(&format!("SentenceTransformer based on {}", base_model(cfg))),
            q(&eval_name(cfg)),
            q(&eval_name(cfg)),
        );
        for (k, v) in metrics {
            let _ = write!(
                s,
                "    - type: {}\n      value: {}\n      name: {}\n",
                q(&format!("{prefix}{k}")),
                json!(v),
                q(&format!("{} {k} (step {step})", m.similarity)),
            );
        }
    }
    s.push_str("---\n");
    s
}

/// The evaluation set's name: its queries file's name.
fn eval_name(cfg: &RunConfig) -> String {
    cfg.eval.as_ref().map_or(String::new(), |e| {
        file_name(&e.queries.display().to_string())
    })
}

/// Hub dataset names the data says it came from: `dataset_info.json`'s `dataset_name` in a
/// `datasets` save_to_disk folder.
fn known_datasets(cfg: &RunConfig) -> Vec<String> {
    let mut out: Vec<String> = cfg
        .tasks()
        .iter()
        .flat_map(|t| t.train.to_vec())
        .filter_map(|p| {
            let info: Value = crate::io::json::read(&p.join("dataset_info.json")).ok()?;
            Some(info["dataset_name"].as_str()?.to_string()).filter(|n| !n.is_empty())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The rows a task trained on, as its `data` event counts them.
fn size_of(data: &Value) -> u64 {
    data["size"]["pairs"].as_u64().unwrap_or(0)
}

fn details(s: &mut String, base: &str, m: &Model) {
    let _ = write!(
        s,
        "\n## Model Details\n\n### Model Description\n- **Model Type:** Sentence Transformer\n- **Base model:** `{base}`\n\
         - **Maximum Sequence Length:** {} tokens\n- **Output Dimensionality:** {} dimensions\n- **Similarity Function:** {}\n\
         - **Trained with:** multipos {}\n\n### Full Model Architecture\n\n```\nSentenceTransformer(\n  (0): Transformer({{'max_seq_length': {}}}) with Transformer model: {}\n  (1): Pooling({{'word_embedding_dimension': {}, 'pooling_mode': '{}'}})\n{})\n```\n",
        m.max_seq_length,
        m.dimension,
        m.similarity,
        env!("CARGO_PKG_VERSION"),
        m.max_seq_length,
        m.architecture,
        m.dimension,
        m.pooling,
        if m.normalize {
            "  (2): Normalize()\n"
        } else {
            ""
        },
    );
}

fn usage(s: &mut String) {
    s.push_str(
        "\n## Usage\n\n### Direct Usage (Sentence Transformers)\n\n```bash\npip install -U sentence-transformers\n```\n\n```python\n\
         from sentence_transformers import SentenceTransformer\n\nmodel = SentenceTransformer(\"path/to/this/directory\")\n\
         embeddings = model.encode([\"The weather is lovely today.\", \"It's so sunny outside!\"])\n\
         print(model.similarity(embeddings, embeddings))\n```\n\n### With multipos\n\n```bash\n\
         multipos embed --model path/to/this/directory --input texts.jsonl --output embeddings.jsonl\n```\n",
    );
}

fn evaluation(s: &mut String, r: &Record, scored: Option<&(u64, BTreeMap<String, f64>)>) {
    s.push_str("\n## Evaluation\n\n");
    let Some(first) = r.evals.first() else {
        s.push_str("The run did not evaluate (no `[eval]` section).\n");
        return;
    };
    if let Some((step, _)) = scored {
        let _ = writeln!(
            s,
            "The front matter's metrics are those of step {step}. Every evaluation of the run (step 0: before training):\n"
        );
    }
    let _ = write!(s, "| metric |");
    for (step, _) in &r.evals {
        let _ = write!(s, " step {step} |");
    }
    let _ = write!(s, "\n|---|");
    s.push_str(&"---|".repeat(r.evals.len()));
    s.push('\n');
    for k in first.1.keys() {
        let _ = write!(s, "| {k} |");
        for (_, m) in &r.evals {
            let _ = write!(
                s,
                " {} |",
                m.get(k).map_or("–".into(), |v| format!("{v:.4}"))
            );
        }
        s.push('\n');
    }
}

fn training(s: &mut String, cfg: &RunConfig, r: &Record) {
    s.push_str("\n## Training Details\n\n### Training Data\n");
    for t in cfg.tasks() {
        let files: Vec<String> = t
            .train
            .to_vec()
            .iter()
            .map(|p| format!("`{}`", file_name(&p.display().to_string())))
            .collect();
        let data = r.tasks.iter().find(|(n, _)| *n == t.name).map(|(_, d)| d);
        let _ = write!(
            s,
            "\n#### Task `{}`\n\n- Files: {}\n",
            t.name,
            files.join(", ")
        );
        if let Some(d) = data {
            let _ = writeln!(s, "- Size: {}", d["description"].as_str().unwrap_or(""));
        }
        let columns = match &t.columns {
            Some(c) => serde_json::to_string(c).unwrap_or_default(),
            None => "as the files name them (tables: sentence-transformers' column order)".into(),
        };
        let loss = serde_json::to_string_pretty(&t.loss).unwrap_or_default();
        let _ = write!(
            s,
            "- Columns: {columns}\n- Rows: mode {}, {} hard negatives per row, batching {}\n- Loss: `{}` with these parameters:\n\n```json\n{loss}\n```\n",
            json!(t.mode),
            t.negatives_per_row,
            json!(t.batching),
            t.loss.class_name(),
        );
    }
    let train = toml::to_string_pretty(&cfg.train).unwrap_or_default();
    let _ = write!(
        s,
        "\n### Training Hyperparameters\n\n```toml\n[train]\n{train}```\n"
    );
    logs(s, r);
}

/// The training loss (mean of the steps since the row before) at every evaluation, or at ten
/// points of the run when it did not evaluate.
fn logs(s: &mut String, r: &Record) {
    let Some(last) = r.steps.last().map(|(step, ..)| *step) else {
        return;
    };
    let mut at: Vec<u64> = r.evals.iter().map(|(e, _)| *e).filter(|e| *e > 0).collect();
    if at.is_empty() {
        let every = (last / 10).max(1);
        at = (every..=last).step_by(every as usize).collect();
    }
    if at.last() != Some(&last) {
        at.push(last);
    }
    s.push_str("\n### Training Logs\n\n| epoch | step | training loss |\n|---|---|---|\n");
    let mut from = 0;
    for step in at {
        let window: Vec<&(u64, u64, String, f64)> = r
            .steps
            .iter()
            .filter(|(st, ..)| *st > from && *st <= step)
            .collect();
        from = step;
        if let Some((_, epoch, ..)) = window.last() {
            let mean = window.iter().map(|w| w.3).sum::<f64>() / window.len() as f64;
            let _ = writeln!(s, "| {} | {step} | {mean:.4} |", epoch + 1);
        }
    }
}

fn framework(s: &mut String, command: &[String], cfg: &RunConfig) {
    let _ = write!(
        s,
        "\n### Framework Versions\n\n- multipos: {}\n- libtorch: {}\n- tokenizers (Rust): {}\n- Saved in the layout sentence-transformers 5.x and 6.x load (checked with 6.2.0)\n\
         \n## Reproduce\n\n```bash\n{}\n```\n\nwith this configuration (resolved; paths cut to file names):\n\n```toml\n{}```\n",
        env!("CARGO_PKG_VERSION"),
        crate::model::LIBTORCH_VERSION,
        crate::model::TOKENIZERS_VERSION,
        shown_command(command),
        shown_config(cfg),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_show_file_names_and_withhold_tokens() {
        let args: Vec<String> = [
            "/usr/local/bin/multipos",
            "train",
            "--config",
            "/home/ann/cfg/run.toml",
            "--set",
            "data.train=\"/data/x/train.parquet\"",
            "--set",
            "cluster.token=s3cret",
            "--token",
            "s3cret",
        ]
        .map(String::from)
        .to_vec();
        let shown = shown_command(&args);
        assert_eq!(
            shown,
            "multipos train --config run.toml --set data.train=\"train.parquet\" --set cluster.token=<withheld> --token <withheld>"
        );
    }

    #[test]
    fn the_record_takes_the_latest_of_each_step_and_scores_each_directory() {
        let text = [
            r#"{"event": "data", "task": "train", "description": "d1", "size": {"pairs": 5}}"#,
            r#"{"event": "eval", "step": 0, "metrics": {"ndcg@10": 0.1}}"#,
            r#"{"event": "step", "step": 1, "epoch": 0, "task": "train", "loss": 2.0}"#,
            r#"{"event": "eval", "step": 1, "metrics": {"ndcg@10": 0.3}}"#,
            r#"{"event": "best", "step": 1}"#,
            r#"{"event": "step", "step": 2, "epoch": 0, "task": "train", "loss": 1.0}"#,
            r#"{"event": "eval", "step": 2, "metrics": {"ndcg@10": 0.2}}"#,
        ]
        .join("\n");
        let r = Record::read(&text);
        assert_eq!(r.scored(Which::Final, false).unwrap().0, 2);
        assert_eq!(r.scored(Which::Final, true).unwrap().0, 1);
        assert_eq!(r.scored(Which::Best, false).unwrap().0, 1);
        assert!(r.scored(Which::Ema, false).is_none());
        assert_eq!(size_of(&r.tasks[0].1), 5);
        let mut s = String::new();
        logs(&mut s, &r);
        assert!(s.contains("| 1 | 1 | 2.0000 |\n| 1 | 2 | 1.0000 |"), "{s}");
    }
}
