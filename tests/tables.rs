//! Parquet and Arrow input: tables written by Python `datasets` 5.2.0 (tests/fixtures/tables, made by
//! tests/reference/make_table_fixtures.py) load to the same data, plan and trained model as the JSONL
//! holding the same records: a Parquet file with list columns under the user's names
//! (`data.columns`), a `save_to_disk` folder, Parquet shards read by column order alone, scored and
//! labelled pairs. Each bad table is refused naming the file, row (and row group) and column.
mod common;

use std::path::{Path, PathBuf};

use multipos::data::{
    Batching, Columns, Dataset, FillNegatives, LoadOptions, Mode, Names, PlanSpec, load_files,
    plan_epoch,
};
use multipos::model::tiny::TinySpec;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tables")
        .join(name)
}

fn load(path: &Path, columns: Option<&Columns>) -> multipos::error::Result<Dataset> {
    load_files(
        &[path.to_path_buf()],
        LoadOptions {
            skip_invalid: false,
            columns,
        },
    )
}

/// The tiny config's settings for a run of `model` into `out` on `data`.
fn sets_on(model: &Path, out: &Path, data: &Path) -> Vec<String> {
    let mut sets = common::tiny_config_sets(model, out);
    sets.retain(|s| !s.starts_with("data.train"));
    sets.push(format!("data.train=\"{}\"", data.display()));
    sets
}

fn user_columns() -> Columns {
    Columns {
        query: Some("question".into()),
        positives: Some("answers".into()),
        negatives: Some(Names::One("hard_negs".into())),
        cluster: Some("topic".into()),
        ..Columns::default()
    }
}

/// Every group's texts, in order, and the counts.
fn content(d: &Dataset) -> Vec<String> {
    let mut out = vec![format!("{:?}", d.stats())];
    for g in 0..d.len() {
        let texts = |ids: &[multipos::data::TextId]| {
            ids.iter()
                .map(|&t| d.text(t).to_string())
                .collect::<Vec<_>>()
        };
        out.push(format!(
            "{} | {:?} | {:?} | {:?}",
            d.text(d.query(g)),
            texts(d.positives(g)),
            texts(d.negatives(g)),
            d.cluster(g).map(|c| d.cluster_label(c).to_string())
        ));
    }
    out
}

fn assert_same_data_and_plan(jsonl: &Dataset, table: &Dataset, what: &str) {
    assert_eq!(content(jsonl), content(table), "{what}: the groups");
    for batching in [Batching::Shuffled, Batching::ByCluster] {
        if batching == Batching::ByCluster && jsonl.cluster_count() == 0 {
            continue;
        }
        let spec = PlanSpec {
            batch_size: 8,
            mode: Mode::Sample,
            negatives_per_row: 1,
            fill_negatives: FillNegatives::Error,
            batching,
            seed: 7,
        };
        for epoch in 0..2 {
            assert_eq!(
                plan_epoch(jsonl, &spec, epoch),
                plan_epoch(table, &spec, epoch),
                "{what}: the plan of epoch {epoch} ({batching:?})"
            );
        }
    }
}

#[test]
fn parquet_arrow_and_shards_load_to_the_data_and_plan_of_the_same_jsonl() {
    let groups = load(&fixture("groups.jsonl"), None).unwrap();
    assert_eq!((groups.len(), groups.stats().records), (64, 64));
    let cols = user_columns();
    let parquet = load(&fixture("groups.parquet"), Some(&cols)).unwrap();
    assert_same_data_and_plan(&groups, &parquet, "Parquet, list columns, data.columns");
    let disk = load(&fixture("groups_disk"), Some(&cols)).unwrap();
    assert_same_data_and_plan(&groups, &disk, "save_to_disk folder of two Arrow shards");

    // sentence-transformers' triplets by column order: one row per positive, merged by query.
    let triplets = load(&fixture("triplets.jsonl"), None).unwrap();
    let shards = load(&fixture("triplets_shards"), None).unwrap();
    assert_same_data_and_plan(&triplets, &shards, "a folder of Parquet shards");
    let dictionary = load(&fixture("triplets_dictionary.parquet"), None).unwrap();
    assert_same_data_and_plan(
        &triplets,
        &dictionary,
        "dictionary-encoded (categorical) columns",
    );
    let one_shard = load(
        &fixture("triplets_shards/train-00000-of-00002.parquet"),
        None,
    )
    .unwrap();
    assert!(one_shard.stats().records < shards.stats().records);
    assert_eq!(shards.stats().records, triplets.stats().records);
}

#[test]
fn a_run_on_a_table_trains_the_same_model_as_on_the_jsonl() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let train = |name: &str, data: &Path, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut sets = sets_on(&model, &out, data);
        sets.extend(extra.iter().map(|s| s.to_string()));
        sets.push("data.negatives_per_row=1".into());
        common::run_tiny(&["train"], &sets);
        let batches = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let steps = batches
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count();
        (
            std::fs::read(out.join("model/model.safetensors")).unwrap(),
            steps,
        )
    };
    let (jsonl, steps) = train("jsonl", &fixture("groups.jsonl"), &[]);
    assert!(steps > 0);
    let mapped = [
        "data.columns.query=\"question\"",
        "data.columns.positives=\"answers\"",
        "data.columns.negatives=\"hard_negs\"",
        "data.columns.cluster=\"topic\"",
    ];
    let (parquet, parquet_steps) = train("parquet", &fixture("groups.parquet"), &mapped);
    assert_eq!(parquet_steps, steps);
    assert!(parquet == jsonl, "the model trained on Parquet differs");
    let (disk, _) = train("disk", &fixture("groups_disk"), &mapped);
    assert!(
        disk == jsonl,
        "the model trained on the save_to_disk folder differs"
    );
}

#[test]
fn scored_and_labelled_pair_tables_train_as_their_jsonl() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let train = |name: &str, data: &Path, loss: &str| {
        let out = dir.path().join(name);
        let mut sets = sets_on(&model, &out, data);
        sets.push(format!("loss.type={loss}"));
        common::run_tiny(&["train"], &sets);
        std::fs::read(out.join("model/model.safetensors")).unwrap()
    };
    let cosent = "\"cosent\"";
    assert!(
        train("scored-jsonl", &fixture("scored.jsonl"), cosent)
            == train("scored-parquet", &fixture("scored.parquet"), cosent),
        "CoSENT on scored.parquet differs from scored.jsonl"
    );
    let softmax = "\"softmax\"";
    assert!(
        train("labelled-jsonl", &fixture("labelled.jsonl"), softmax)
            == train("labelled-disk", &fixture("labelled_disk"), softmax),
        "SoftmaxLoss on the save_to_disk folder differs from labelled.jsonl"
    );
}

#[test]
fn a_bad_table_is_refused_naming_file_row_group_row_and_column() {
    let err =
        |path: &str, cols: Option<&Columns>| load(&fixture(path), cols).unwrap_err().to_string();
    let cases = [
        (
            err("bad_null_query.parquet", None),
            "bad_null_query.parquet: row 3 (row group 1), column \"query\": null in a required column",
        ),
        (
            err("bad_null_in_list.parquet", None),
            "bad_null_in_list.parquet: row 2 (row group 1), column \"positives\": item 1 of the list is null",
        ),
        (
            err("bad_int_positive.parquet", None),
            "bad_int_positive.parquet: column \"positive\" holds Int64, expected a string or a list of strings",
        ),
        (
            err(
                "groups.parquet",
                Some(&Columns {
                    positives: Some("answer".into()),
                    ..user_columns()
                }),
            ),
            "groups.parquet: no column \"answer\" (the columns are [\"question\", \"answers\"",
        ),
        (
            err("two_splits", None),
            "two_splits: holds the shards of several splits [\"test\", \"train\"]",
        ),
        (
            err("dict_disk", None),
            "dict_disk: is a DatasetDict (splits [\"train\"]): name one split's folder",
        ),
        (
            err("groups.jsonl", Some(&user_columns())),
            "groups.jsonl: data.columns maps the columns of Parquet and Arrow tables",
        ),
    ];
    for (got, want) in cases {
        assert!(got.contains(want), "{got}\n  should contain\n{want}");
    }
    // Nothing is dropped silently: with skip_invalid the bad row is counted.
    let skipped = load_files(
        &[fixture("bad_null_query.parquet")],
        LoadOptions {
            skip_invalid: true,
            columns: None,
        },
    )
    .unwrap();
    assert_eq!(
        (skipped.stats().records, skipped.stats().invalid_skipped),
        (3, 1)
    );
}

#[test]
fn a_bad_pair_table_and_a_bad_mapping_are_refused_by_the_command() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let run = |data: &Path, extra: &[String]| {
        let mut sets = sets_on(&model, &dir.path().join("out"), data);
        sets.extend(extra.iter().cloned());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"));
        cmd.args(["train", "--config"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml"));
        for s in &sets {
            cmd.args(["--set", s]);
        }
        let o = cmd.env("RUST_LOG", "warn").output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let stderr = run(
        &fixture("bad_null_score.parquet"),
        &["loss.type=\"cosent\"".into()],
    );
    assert!(
        stderr.contains("bad_null_score.parquet: row 2 (row group 1), column \"score\": null in a required column"),
        "{stderr}"
    );
    let stderr = run(
        &fixture("groups.parquet"),
        &["data.columns.query=\"question\"".into()],
    );
    assert!(
        stderr.contains("columns: name both \"query\" and \"positives\""),
        "{stderr}"
    );
}

fn multipos(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn eval_and_embed_read_beir_tables_as_their_jsonl() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/data/bible_paraphrase_tiny");
    let eval = |queries: PathBuf, corpus: PathBuf, qrels: PathBuf| {
        let o = multipos(&[
            "eval".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--queries".as_ref(),
            queries.as_os_str(),
            "--corpus".as_ref(),
            corpus.as_os_str(),
            "--qrels".as_ref(),
            qrels.as_os_str(),
        ]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let jsonl = eval(
        tiny.join("dev_queries.jsonl"),
        tiny.join("corpus.jsonl"),
        tiny.join("dev_qrels.tsv"),
    );
    let parquet = eval(
        fixture("beir/queries.parquet"),
        fixture("beir/corpus.parquet"),
        fixture("beir/qrels.parquet"),
    );
    assert!(jsonl.contains("ndcg@10"), "{jsonl}");
    assert_eq!(jsonl, parquet, "the metrics of the BEIR tables");

    let embed = |input: PathBuf, name: &str| {
        let out = dir.path().join(name);
        multipos(&[
            "embed".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
        ]);
        std::fs::read_to_string(out).unwrap()
    };
    let from_jsonl = embed(tiny.join("corpus.jsonl"), "j.jsonl");
    let from_parquet = embed(fixture("beir/corpus.parquet"), "p.jsonl");
    assert_eq!(from_jsonl.lines().count(), 220);
    assert!(
        from_jsonl == from_parquet,
        "ids, texts and embeddings of the corpus table"
    );
}

#[test]
fn mine_reads_a_table_with_its_columns_named_on_the_command_line() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let mine = |data: PathBuf, columns: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "mine".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--num-negatives".as_ref(),
            "2".as_ref(),
            "--no-cache".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
        ];
        for c in columns {
            args.extend::<[&std::ffi::OsStr; 2]>(["--column".as_ref(), c.as_ref()]);
        }
        multipos(&args);
        std::fs::read_to_string(out).unwrap()
    };
    let jsonl = mine(fixture("groups.jsonl"), &[], "j.jsonl");
    let table = mine(
        fixture("groups.parquet"),
        &[
            "query=question",
            "positives=answers",
            "negatives=hard_negs",
            "cluster=topic",
        ],
        "p.jsonl",
    );
    assert_eq!(jsonl.lines().count(), 64);
    assert!(
        jsonl == table,
        "mining the table differs from mining its JSONL"
    );
}
