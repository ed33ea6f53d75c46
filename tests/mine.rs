//! `multipos mine` on a tiny random BERT and the bundled tiny Bible data: each option of
//! sentence-transformers' `mine_hard_negatives` against a brute-force reference over the full score
//! matrix; no mined negative is a positive of its query or the query; margins and score bounds
//! hold for every negative; every query and positive is written; the cache is reused; `train`
//! reads the result.
mod common;

use std::path::{Path, PathBuf};

use multipos::data::text::{hash_normalized, normalize};
use multipos::data::{Dataset, LoadOptions, load_files};
use multipos::mine::{Corpus, MineOptions, Mined, Sampling, mine};
use multipos::model::SentenceModel;
use multipos::model::pooling::normalize_l2;
use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn corpus_texts() -> Vec<String> {
    std::fs::read_to_string(repo("deploy/data/bible_paraphrase_tiny/corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The negatives the options define, computed directly: every corpus text scored against the query,
/// ranked, the first `range_max + max_positives + 1` considered, own texts and filtered ones
/// removed, the first `range_max` kept, `range_min` skipped, `num_negatives` taken. Returns them
/// as scores (a tiny random model gives some texts identical vectors, so ties may swap texts), and
/// every text's score for each query.
fn brute_force(
    model: &SentenceModel,
    data: &Dataset,
    corpus: &Corpus<'_>,
    o: &MineOptions,
) -> (Vec<Vec<f32>>, Vec<std::collections::HashMap<String, f32>>) {
    let max_pos = (0..data.len())
        .map(|g| data.positives(g).len())
        .max()
        .unwrap();
    let range_max = o.range_max(max_pos);
    let c = normalize_l2(&model.embed(&corpus.texts, 16).unwrap());
    let queries: Vec<&str> = (0..data.len()).map(|g| data.text(data.query(g))).collect();
    let q = normalize_l2(&model.embed(&queries, 16).unwrap());
    let scores = Vec::<Vec<f32>>::try_from(q.matmul(&c.transpose(0, 1))).unwrap();
    let by_text = scores
        .iter()
        .map(|row| {
            corpus
                .texts
                .iter()
                .map(|t| t.to_string())
                .zip(row.iter().copied())
                .collect()
        })
        .collect();
    let picked = (0..data.len())
        .map(|g| {
            let own: Vec<u64> = std::iter::once(data.query(g))
                .chain(data.positives(g).iter().copied())
                .map(|t| data.hash(t))
                .collect();
            let weakest = data
                .positives(g)
                .iter()
                .map(|&p| {
                    scores[g][corpus
                        .hashes
                        .iter()
                        .position(|&h| h == data.hash(p))
                        .unwrap()]
                })
                .fold(f32::INFINITY, f32::min);
            let mut ranked: Vec<(usize, f32)> = scores[g].iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked
                .into_iter()
                .take(range_max + max_pos + 1)
                .filter(|&(i, s)| {
                    !own.contains(&corpus.hashes[i])
                        && o.absolute_margin.is_none_or(|m| s + m <= weakest)
                        && o.relative_margin
                            .is_none_or(|m| s <= weakest - weakest.abs() * m)
                        && o.max_score.is_none_or(|m| s <= m)
                        && o.min_score.is_none_or(|m| s >= m)
                })
                .take(range_max)
                .skip(o.range_min)
                .take(o.num_negatives)
                .map(|(_, s)| s)
                .collect()
        })
        .collect();
    (picked, by_text)
}

#[test]
fn every_option_matches_the_brute_force_reference_and_the_invariants_hold() {
    let (_dir, model_dir) = common::tiny_model(&TinySpec::default());
    let model = SentenceModel::load(&model_dir, tch::Device::Cpu).unwrap();
    let data = load_files(
        &[repo("deploy/data/bible_paraphrase_tiny/train.jsonl")],
        LoadOptions::default(),
    )
    .unwrap();
    let extra = corpus_texts();
    let corpus = Corpus::new(&data, &extra);
    let base = MineOptions {
        batch_size: 16,
        ..MineOptions::default()
    };
    let cases = [
        MineOptions { ..base.clone() },
        MineOptions {
            range_min: 2,
            num_negatives: 4,
            ..base.clone()
        },
        MineOptions {
            range_max: Some(6),
            num_negatives: 5,
            ..base.clone()
        },
        MineOptions {
            absolute_margin: Some(0.02),
            ..base.clone()
        },
        MineOptions {
            relative_margin: Some(0.05),
            ..base.clone()
        },
        MineOptions {
            max_score: Some(0.9),
            min_score: Some(0.2),
            ..base.clone()
        },
        MineOptions {
            sampling_strategy: Sampling::Random,
            num_negatives: 2,
            range_max: Some(8),
            ..base.clone()
        },
    ];
    let scores = |a: &str, b: &str| {
        let e = normalize_l2(&model.embed(&[a, b], 2).unwrap());
        (e.get(0) * e.get(1))
            .sum(tch::Kind::Float)
            .double_value(&[]) as f32
    };
    for o in &cases {
        let (
            Mined {
                negatives: mined,
                clusters,
            },
            report,
        ) = mine(&model, 1, &data, &corpus, o, None, false).unwrap();
        assert_eq!(clusters, None, "no clusters unless asked for");
        assert_eq!(mined.len(), data.len());
        if o.sampling_strategy == Sampling::Top {
            let (want, score_of) = brute_force(&model, &data, &corpus, o);
            for (g, negs) in mined.iter().enumerate() {
                let got: Vec<f32> = negs.iter().map(|t| score_of[g][t]).collect();
                assert_eq!(
                    got.len(),
                    want[g].len(),
                    "{o:?}: query {g}: {got:?} vs {:?}",
                    want[g]
                );
                for (a, b) in got.iter().zip(&want[g]) {
                    assert!(
                        (a - b).abs() <= 1e-6,
                        "{o:?}: query {g}: {got:?} vs {:?}",
                        want[g]
                    );
                }
            }
        }
        let mut found = 0;
        for (g, negs) in mined.iter().enumerate() {
            found += negs.len();
            let own: Vec<u64> = std::iter::once(data.query(g))
                .chain(data.positives(g).iter().copied())
                .map(|t| data.hash(t))
                .collect();
            let q = data.text(data.query(g));
            let weakest = data
                .positives(g)
                .iter()
                .map(|&p| scores(q, data.text(p)))
                .fold(f32::INFINITY, f32::min);
            for n in negs {
                assert!(
                    !own.contains(&hash_normalized(&normalize(n))),
                    "{o:?}: {n:?} is the query or a positive"
                );
                let s = scores(q, n);
                let tol = 1e-5;
                assert!(
                    o.absolute_margin.is_none_or(|m| s + m <= weakest + tol),
                    "{o:?}: absolute margin"
                );
                assert!(
                    o.relative_margin
                        .is_none_or(|m| s <= weakest - weakest.abs() * m + tol),
                    "{o:?}: relative margin"
                );
                assert!(
                    o.max_score.is_none_or(|m| s <= m + tol)
                        && o.min_score.is_none_or(|m| s >= m - tol),
                    "{o:?}: bounds"
                );
            }
        }
        assert_eq!(report.negatives_mined, found as u64);
        assert_eq!(
            report.queries_short,
            mined.iter().filter(|n| n.len() < o.num_negatives).count() as u64
        );
    }
}

#[test]
fn the_cli_writes_every_group_reuses_its_cache_and_train_reads_the_result() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("mined.jsonl");
    let cache = dir.path().join("cache");
    let mine = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
            .args([
                "mine",
                "--device",
                "cpu",
                "--num-negatives",
                "2",
                "--overwrite",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(repo("deploy/data/bible_paraphrase_tiny/train.jsonl"))
            .arg("--corpus")
            .arg(repo("deploy/data/bible_paraphrase_tiny/corpus.jsonl"))
            .arg("--output")
            .arg(&out)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap()
    };
    let mine_once = || {
        let o = mine();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str::<serde_json::Value>(
            String::from_utf8_lossy(&o.stdout).lines().last().unwrap(),
        )
        .unwrap()
    };
    let first = mine_once();
    let written = std::fs::read(&out).unwrap();
    let second = mine_once();
    assert_eq!(
        (
            first["corpus_cached"].as_bool(),
            second["corpus_cached"].as_bool()
        ),
        (Some(false), Some(true))
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        written,
        "the cached corpus mines the same negatives"
    );

    // A cache file of the right row count but another dimension is refused, not a panic, and the
    // output stays as it was.
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let rows = tch::Tensor::read_safetensors(&file).unwrap()[0].1.size()[0];
    let wrong = tch::Tensor::ones([rows, 7], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("embeddings", &wrong)], &file).unwrap();
    let o = mine();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("dimension"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), written);

    let input = load_files(
        &[repo("deploy/data/bible_paraphrase_tiny/train.jsonl")],
        LoadOptions::default(),
    )
    .unwrap();
    let mined = load_files(std::slice::from_ref(&out), LoadOptions::default()).unwrap();
    assert_eq!(
        (mined.len(), mined.pair_count()),
        (input.len(), input.pair_count()),
        "no query or positive lost"
    );
    assert_eq!(
        mined.stats().negatives,
        first["negatives_mined"].as_u64().unwrap()
    );

    let run = dir.path().join("run");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["train", "--config"])
        .arg(repo("configs/tiny.toml"))
        .args(["--set", &format!("model.path=\"{}\"", model.display())])
        .args(["--set", &format!("data.train=\"{}\"", out.display())])
        .args(["--set", &format!("output.dir=\"{}\"", run.display())])
        .args([
            "--set",
            "data.negatives_per_row=2",
            "--set",
            "train.max_steps=3",
            "--set",
            "eval.at_start=false",
        ])
        .current_dir(repo(""))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(common::step_losses(&run.join("metrics.jsonl")).len(), 3);
}

#[test]
fn queries_that_found_too_few_negatives_still_train_with_fill_negatives_random() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("mined.jsonl");
    // No cosine is below -2: no candidate qualifies, and every query comes out with none.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args([
            "mine",
            "--device",
            "cpu",
            "--num-negatives",
            "3",
            "--max-score=-2",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(repo("deploy/data/bible_paraphrase_tiny/train.jsonl"))
        .arg("--output")
        .arg(&out)
        .arg("--no-cache")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            report["queries_short"].as_u64(),
            report["queries_without"].as_u64()
        ),
        (Some(64), Some(64))
    );
    let train = |fill: &str| {
        let run = dir.path().join(format!("run-{fill}"));
        std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
            .args(["train", "--config"])
            .arg(repo("configs/tiny.toml"))
            .args(["--set", &format!("model.path=\"{}\"", model.display())])
            .args(["--set", &format!("data.train=\"{}\"", out.display())])
            .args(["--set", &format!("output.dir=\"{}\"", run.display())])
            .args(["--set", "data.negatives_per_row=3"])
            .args(["--set", &format!("data.fill_negatives=\"{fill}\"")])
            .args(["--set", "data.mode=\"all\"", "--set", "eval.at_start=false"])
            .current_dir(repo(""))
            .output()
            .unwrap()
    };
    let refused = train("error");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("64 of 64 query groups have fewer hard negatives")
            && why.contains("fill_negatives = \"random\""),
        "{why}"
    );
    let filled = train("random");
    let log = String::from_utf8_lossy(&filled.stderr);
    assert!(filled.status.success(), "{log}");
    assert!(
        log.contains("short=64"),
        "the short groups are reported: {log}"
    );
    // Every pair of the data trained (mode all: one row per pair), none lost to the missing negatives.
    let pairs = load_files(std::slice::from_ref(&out), LoadOptions::default())
        .unwrap()
        .pair_count();
    let trained: u64 = common::events(&dir.path().join("run-random"), "step")
        .iter()
        .map(|s| s["pairs"].as_u64().unwrap())
        .sum();
    let leftovers = pairs as u64 - trained;
    assert!(leftovers < 8, "{pairs} pairs, {trained} trained");
}

#[test]
fn train_mine_records_what_mine_writes_trains_on_it_resumes_from_the_record_and_the_cluster_agrees()
{
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let cache = dir.path().join("cache");
    let data = repo("deploy/data/bible_paraphrase_tiny/train.jsonl");
    let corpus = repo("deploy/data/bible_paraphrase_tiny/corpus.jsonl");
    let mined = dir.path().join("mined.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args([
            "mine",
            "--device",
            "cpu",
            "--num-negatives",
            "2",
            "--clusters",
            "3",
            "--no-cache",
            "--model",
        ])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--output")
        .arg(&mined)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(report["clusters"]["count"], 3, "{report}");
    let labels: Vec<u64> = std::fs::read_to_string(&mined)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["cluster"]
                .as_u64()
                .unwrap()
        })
        .collect();
    for c in 0..3u64 {
        let n = labels.iter().filter(|&&l| l == c).count() as u64;
        assert!(
            n > 0 && n <= report["clusters"]["largest"].as_u64().unwrap(),
            "cluster {c}: {labels:?}"
        );
    }
    assert_eq!(labels.len(), 64, "every group is labelled");
    let run = |cmd: &str, name: &str, train_file: &Path, extra: &[String]| {
        let out = dir.path().join(name);
        let mut c = tiny_run(cmd, &model, train_file, &out, &cache);
        c.args(["--set", "train.max_steps=6"]);
        for s in extra {
            c.arg("--set").arg(s);
        }
        let o = c.output().unwrap();
        (out, o)
    };
    // Batches are filled cluster by cluster, from the clusters mining labels the queries with.
    let by_cluster = "data.batching=\"by_cluster\"".to_string();
    let mine_sets = vec![
        "train.mine.num_negatives=2".to_string(),
        "train.mine.clusters=3".to_string(),
        format!("train.mine.corpus=\"{}\"", corpus.display()),
        by_cluster.clone(),
    ];
    let (inline, o) = run("train", "inline", &data, &mine_sets);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(inline.join("mined/default.jsonl")).unwrap(),
        std::fs::read(&mined).unwrap(),
        "train.mine records what multipos mine writes"
    );
    assert_eq!(common::events(&inline, "mine").len(), 1);
    let (from_file, o) = run(
        "train",
        "from-file",
        &mined,
        std::slice::from_ref(&by_cluster),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::assert_same_run(&from_file, &inline, "train.mine vs. mine then train", &[]);
    let (shuffled, o) = run("train", "shuffled", &mined, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(
        common::step_losses(&shuffled.join("metrics.jsonl")),
        common::step_losses(&inline.join("metrics.jsonl")),
        "by_cluster batches other rows together than the default shuffle"
    );

    // Interrupted after 3 steps and resumed: the record is read back, not mined again.
    let mut stop = mine_sets.clone();
    stop.push("train.stop_after_steps=3".into());
    let (resumed, _) = run("train", "resumed", &data, &stop);
    assert_eq!(common::step_losses(&resumed.join("metrics.jsonl")).len(), 3);
    let mut again = mine_sets.clone();
    again.push("train.resume=\"latest\"".into());
    let (_, o) = run("train", "resumed", &data, &again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events = common::events(&resumed, "mine");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[1]["recorded"].is_string(), "{events:?}");
    common::assert_same_run(&inline, &resumed, "resumed on the recorded mined data", &[]);

    // In a cluster the two workers embed the texts in pages (the default) or the coordinator
    // mines alone: either way the same rows are mined, and the workers train as one process does.
    for (name, on) in [
        ("cluster", "workers"),
        ("cluster-coordinator", "coordinator"),
    ] {
        let mut sets = mine_sets.clone();
        sets.push(format!("cluster.mine_on=\"{on}\""));
        let (cluster, o) = run("launch", name, &data, &sets);
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{log}");
        assert_eq!(
            std::fs::read(cluster.join("mined/default.jsonl")).unwrap(),
            std::fs::read(&mined).unwrap(),
            "mined on the {on}"
        );
        common::assert_same_run(&inline, &cluster, "train.mine in the cluster", &[]);
        // Mining on the workers takes a ring of its own; the run's ring forms on the mined data.
        let rings = common::events(&cluster, "generation").len();
        assert_eq!(rings, if on == "workers" { 2 } else { 1 }, "{log}");
        let mine = common::events(&cluster, "mine");
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert_eq!(mine[0]["report"]["corpus"], events_corpus(&inline));
        // The one-process run cached the corpus embeddings; neither side embeds them again.
        assert_eq!(mine[0]["report"]["corpus_cached"], true, "{mine:?}");
    }

    // With an empty cache the workers embed the corpus, and the coordinator stores what one
    // process stores, under the same key.
    let fresh = dir.path().join("fresh-cache");
    let out = dir.path().join("cluster-fresh");
    let mut c = tiny_run("launch", &model, &data, &out, &fresh);
    c.args(["--set", "train.max_steps=6"]);
    for s in &mine_sets {
        c.arg("--set").arg(s);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        common::events(&out, "mine")[0]["report"]["corpus_cached"],
        false
    );
    let (ours, theirs) = (
        common::dir_files(&fresh.join("embeddings")),
        common::dir_files(&cache.join("embeddings")),
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "the same cache key"
    );
    let read = |root: &Path| {
        let file = root.join("embeddings").join(ours.keys().next().unwrap());
        tch::Tensor::read_safetensors(file).unwrap().remove(0).1
    };
    let (ours, theirs) = (read(&fresh), read(&cache));
    assert_eq!(ours.size(), theirs.size());
    // Pages batch the texts differently from one process: the same vectors to rounding.
    let diff = (ours - theirs).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "cached corpus embeddings differ by {diff}");
}

/// The corpus size a run's `mine` event reports.
fn events_corpus(out: &Path) -> serde_json::Value {
    common::events(out, "mine")[0]["report"]["corpus"].clone()
}

#[test]
fn remining_every_epoch_is_recorded_resumes_exactly_and_the_cluster_agrees() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let data = repo("deploy/data/bible_paraphrase_tiny/train.jsonl");
    let run = |cmd: &str, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut c = tiny_run(cmd, &model, &data, &out, &dir.path().join("cache"));
        for s in [
            "train.max_steps=0",
            "train.epochs=3",
            "train.lr=2e-4",
            "train.mine.num_negatives=2",
            "train.remine_every_epochs=1",
        ]
        .iter()
        .chain(extra)
        {
            c.arg("--set").arg(s);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success() || extra.iter().any(|e| e.contains("stop_after")),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let whole = run("train", "whole", &[]);
    let mine = common::events(&whole, "mine");
    let epochs: Vec<_> = mine.iter().map(|e| e["epoch"].clone()).collect();
    assert_eq!(
        epochs,
        [serde_json::Value::Null, 2.into(), 3.into()],
        "{mine:?}"
    );
    let first = std::fs::read(whole.join("mined/default.jsonl")).unwrap();
    let second = std::fs::read(whole.join("mined/default.epoch-2.jsonl")).unwrap();
    assert_ne!(
        first, second,
        "the trained model mines other negatives than the base model"
    );
    assert!(whole.join("mined/default.epoch-3.jsonl").is_file());
    // Each re-mining comes right before the first step of its epoch.
    let log = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event"] == "step" || v["event"] == "mine")
        .collect();
    for (i, r) in records.iter().enumerate() {
        if r["event"] == "mine" && r["epoch"].is_u64() {
            let next = &records[i + 1];
            assert_eq!(
                next["epoch"].as_u64().unwrap() + 1,
                r["epoch"].as_u64().unwrap()
            );
            assert_eq!(next["batch"], 0, "{next}");
        }
    }
    let first_epoch = records
        .iter()
        .filter(|r| r["event"] == "step" && r["epoch"] == 0)
        .count();

    // Stopped in the second epoch (after its re-mining) and resumed: the versions are read back.
    let stop = format!("train.stop_after_steps={}", first_epoch + 3);
    let resumed = run("train", "resumed", &[stop.as_str()]);
    assert_eq!(
        common::step_losses(&resumed.join("metrics.jsonl")).len(),
        first_epoch + 3
    );
    run("train", "resumed", &["train.resume=\"latest\""]);
    // Mined: the base model's and epoch 2's before the stop, epoch 3's after; the resume read
    // the base model's record back.
    let epochs: Vec<_> = common::events(&resumed, "mine")
        .iter()
        .filter(|e| e["report"].is_object())
        .map(|e| e["epoch"].clone())
        .collect();
    assert_eq!(
        epochs,
        [serde_json::Value::Null, 2.into(), 3.into()],
        "epoch 2 not mined again"
    );
    common::assert_same_run(&whole, &resumed, "resumed across a re-mining", &[]);

    // Two workers embed each re-mining in pages; the coordinator records the same versions.
    let cluster = run("launch", "cluster", &[]);
    for name in [
        "default.jsonl",
        "default.epoch-2.jsonl",
        "default.epoch-3.jsonl",
    ] {
        assert_eq!(
            std::fs::read(cluster.join("mined").join(name)).unwrap(),
            std::fs::read(whole.join("mined").join(name)).unwrap(),
            "{name}"
        );
    }
    // A key bias shifts a whole attention row, which the softmax ignores: its gradient is
    // rounding noise, which AdamW scales up to steps of the learning rate's size.
    common::assert_same_run(
        &whole,
        &cluster,
        "re-mining in the cluster",
        &["attention.self.key.bias"],
    );
}

/// `multipos CMD` with the 2-worker config on the tiny model: `data` with two negatives per row
/// (filled at random where short), batches of 8, into `out`.
fn tiny_run(
    cmd: &str,
    model: &Path,
    data: &Path,
    out: &Path,
    cache: &Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.args([cmd, "--config"])
        .arg(repo("configs/local-2workers.toml"))
        .args(["--set", &format!("model.path=\"{}\"", model.display())])
        .args(["--set", &format!("data.train=\"{}\"", data.display())])
        .args(["--set", &format!("output.dir=\"{}\"", out.display())])
        .args([
            "--set",
            "data.negatives_per_row=2",
            "--set",
            "data.fill_negatives=\"random\"",
            "--set",
            "train.batch_size=8",
        ])
        .env("MULTIPOS_CACHE", cache)
        .env_remove("MULTIPOS_CLUSTER_TOKEN")
        .current_dir(repo(""));
    c
}
