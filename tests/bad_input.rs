//! Bad input from users, each case a test (README "Bad input" lists them): one clear line naming
//! the file or flag and the key, never a silently different meaning, a hang, a partial file or the
//! loss of what the user did not ask to replace.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn multipos(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.args(args)
        .current_dir(repo(""))
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN");
    c
}

/// Runs and expects failure; returns stderr.
fn refused(mut c: Command) -> String {
    let o: Output = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "accepted: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// `train --config configs/tiny.toml` with a tiny model, an output in `dir`, and `sets`.
fn train(dir: &Path, model: &Path, sets: &[&str]) -> Command {
    let mut c = multipos(&["train", "--config", "configs/tiny.toml"]);
    c.arg("--set")
        .arg(format!("model.path=\"{}\"", model.display()))
        .arg("--set")
        .arg(format!("output.dir=\"{}\"", dir.join("run").display()))
        .args(["--set", "train.max_steps=2", "--set", "eval.at_start=false"]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}

#[test]
fn a_float_for_an_integer_is_refused_not_rounded_and_the_set_is_named() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(dir.path(), &model, &["train.batch_size=8.6"]));
    assert!(
        err.contains(
            "--set train.batch_size=8.6: train.batch_size: invalid type: floating point `8.6`"
        ),
        "{err}"
    );
}

#[test]
fn a_float_in_the_file_is_refused_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    let text = std::fs::read_to_string(repo("configs/tiny.toml"))
        .unwrap()
        .replace("epochs = 1", "epochs = 1\nmax_steps = 2.4");
    std::fs::write(&cfg, text).unwrap();
    let err = refused(multipos(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(
        err.contains(&format!(
            "{}: train.max_steps: invalid type: floating point",
            cfg.display()
        )),
        "{err}"
    );
}

#[test]
fn a_number_for_a_boolean_is_refused() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(dir.path(), &model, &["train.dropout=1.5"]));
    assert!(
        err.contains("train.dropout: invalid type: floating point `1.5`, expected a boolean"),
        "{err}"
    );
}

#[test]
fn an_environment_value_is_blamed_on_its_variable() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let mut c = train(dir.path(), &model, &[]);
    c.env("MULTIPOS__TRAIN__MICRO_BATCH", "2.5");
    let err = refused(c);
    assert!(
        err.contains("environment variable MULTIPOS__TRAIN__MICRO_BATCH: train.micro_batch"),
        "{err}"
    );
}

#[test]
fn an_unknown_mode_lists_the_valid_ones() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(dir.path(), &model, &["data.mode=\"everything\""]));
    assert!(
        err.contains("expected one of `sample`, `all`, `pairs`"),
        "{err}"
    );
}

#[test]
fn a_max_seq_length_the_model_cannot_take_is_refused_in_train_and_eval() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    for n in ["0", "1", "100000"] {
        let err = refused(train(
            dir.path(),
            &model,
            &[&format!("model.max_seq_length={n}")],
        ));
        assert!(err.contains("max_seq_length must be"), "{n}: {err}");
        let mut eval = multipos(&["eval", "--device", "cpu", "--max-seq-length", n, "--model"]);
        eval.arg(&model).args([
            "--queries",
            "deploy/data/bible_paraphrase_tiny/dev_queries.jsonl",
            "--corpus",
            "deploy/data/bible_paraphrase_tiny/corpus.jsonl",
            "--qrels",
            "deploy/data/bible_paraphrase_tiny/dev_qrels.tsv",
        ]);
        let err = refused(eval);
        assert!(
            err.contains("max_seq_length must be within 2..="),
            "{n}: {err}"
        );
    }
}

#[test]
fn absurd_thread_counts_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\n").unwrap();
    let started = std::time::Instant::now();
    let mut c = multipos(&["embed", "--threads", "100000", "--input"]);
    c.arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.jsonl"));
    let err = refused(c);
    assert!(err.contains("--threads 100000 is more than 1024"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(!dir.path().join("out.jsonl").exists());
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_first_record() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "\u{feff}{\"text\": \"In the beginning\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = multipos(&["embed", "--device", "cpu", "--model"]);
    c.arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train_data = dir.path().join("train.jsonl");
    let original =
        std::fs::read_to_string(repo("deploy/data/bible_paraphrase_tiny/train.jsonl")).unwrap();
    std::fs::write(&train_data, format!("\u{feff}{original}")).unwrap();
    let o = train(
        dir.path(),
        &model,
        &[&format!("data.train=\"{}\"", train_data.display())],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_directory_given_as_data_is_called_a_directory() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let data = format!("data.train=\"{}\"", dir.path().display());
    let err = refused(train(dir.path(), &model, &[&data]));
    assert!(err.contains("is a directory but not a table"), "{err}");
}

#[test]
fn an_os_error_is_printed_once() {
    let err = refused(multipos(&[
        "embed",
        "--input",
        "/nonexistent/texts.txt",
        "--output",
        "/tmp/x.jsonl",
    ]));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn embed_refuses_to_write_over_its_input() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "keep me\n").unwrap();
    let mut c = multipos(&["embed", "--device", "cpu", "--model"]);
    c.arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&input);
    let err = refused(c);
    assert!(err.contains("is also an input"), "{err}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "keep me\n");
}

#[test]
fn mine_and_embed_replace_neither_their_inputs_nor_files_they_were_not_told_to() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let data = dir.path().join("train.jsonl");
    std::fs::copy(repo("deploy/data/bible_paraphrase_tiny/train.jsonl"), &data).unwrap();
    let original = std::fs::read(&data).unwrap();
    let kept = dir.path().join("kept.jsonl");
    std::fs::write(&kept, "mine\n").unwrap();
    let mine = |output: &Path, extra: &[&str]| {
        let mut c = multipos(&["mine", "--device", "cpu", "--no-cache", "--model"]);
        c.arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(output);
        c.args(extra);
        c
    };
    // Its own data as output: refused even with --overwrite, which asks to replace an output only.
    let err = refused(mine(&data, &["--overwrite"]));
    assert!(err.contains("is also an input"), "{err}");
    let err = refused(mine(&kept, &[]));
    assert!(err.contains("exists; pass --overwrite"), "{err}");
    let mut c = multipos(&["embed", "--device", "cpu", "--model"]);
    c.arg(&model)
        .arg("--input")
        .arg(&data)
        .arg("--output")
        .arg(&kept);
    let err = refused(c);
    assert!(err.contains("exists; pass --overwrite"), "{err}");
    assert_eq!(std::fs::read(&data).unwrap(), original);
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "mine\n");
    let o = mine(&kept, &["--overwrite"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read_to_string(&kept)
            .unwrap()
            .contains("\"negatives\"")
    );
}

#[test]
fn an_output_directory_that_does_not_exist_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo("deploy/data/bible_paraphrase_tiny/train.jsonl");
    let output = dir.path().join("no/such/dir/mined.jsonl");
    // The model does not exist either: the output is checked first, before minutes of work.
    let mut c = multipos(&["mine", "--device", "cpu", "--model"]);
    c.arg(dir.path().join("no-model"))
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&output);
    let err = refused(c);
    assert!(
        err.contains("its directory") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn mining_options_that_cannot_work_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo("deploy/data/bible_paraphrase_tiny/train.jsonl");
    // No model either: the options are refused before it or the data is loaded.
    let mut c = multipos(&[
        "mine",
        "--device",
        "cpu",
        "--range-min",
        "5",
        "--range-max",
        "5",
    ]);
    c.arg("--model")
        .arg(dir.path().join("no-model"))
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(dir.path().join("mined.jsonl"));
    let err = refused(c);
    assert!(
        err.contains("range_min 5 must be smaller than range_max 5"),
        "{err}"
    );

    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(
        dir.path(),
        &model,
        &[
            "data.negatives_per_row=1",
            "train.mine.range_min=2",
            "train.mine.range_max=4",
            "train.mine.num_negatives=3",
        ],
    ));
    assert!(
        err.contains("train.mine: cannot mine 3 negatives per query: only 2 candidates remain"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "refused at start");
}

#[test]
fn batching_by_cluster_on_unlabelled_data_is_refused_naming_a_group_without_a_label() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(dir.path(), &model, &["data.batching=\"by_cluster\""]));
    assert!(
        err.contains("batching = \"by_cluster\" needs a \"cluster\" label on every query group, but query group 0"),
        "{err}"
    );
    assert!(err.contains("multipos mine --clusters K"), "{err}");
    let err = refused(multipos(&[
        "mine",
        "--device",
        "cpu",
        "--clusters",
        "0",
        "--data",
        "deploy/data/bible_paraphrase_tiny/train.jsonl",
        "--output",
        &dir.path().join("mined.jsonl").display().to_string(),
    ]));
    assert!(err.contains("clusters must be at least 1"), "{err}");
}

#[test]
fn average_refuses_an_output_that_holds_one_of_its_models() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().to_path_buf();
    let mut c = multipos(&["average", "--overwrite", "--models"]);
    c.arg(&model).arg(&model).arg("--output").arg(&out);
    let err = refused(c);
    assert!(err.contains("holds the input"), "{err}");
    assert!(
        model.join("config.json").exists(),
        "the model is still there"
    );
}

#[test]
fn convert_never_replaces_a_directory_or_file_it_was_not_told_to() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "mine").unwrap();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "mine too").unwrap();
    for (target, why) in [(&notes, "exists; pass --overwrite"), (&file, "is a file")] {
        let mut c = multipos(&["convert", "--model"]);
        c.arg(&model).arg("--output").arg(target);
        let err = refused(c);
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(notes.join("todo.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine too");
    let mut c = multipos(&["convert", "--overwrite", "--model"]);
    c.arg(&model).arg("--output").arg(&notes);
    assert!(c.output().unwrap().status.success());
    assert!(notes.join("model.safetensors").exists());
}

#[test]
fn train_refuses_an_output_dir_holding_an_earlier_run_unless_resuming_or_told_to_replace_it() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let o = train(dir.path(), &model, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights = dir.path().join("run/model/model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let err = refused(train(dir.path(), &model, &["train.lr=0.5"]));
    assert!(
        err.contains("holds an earlier run") && err.contains("output.overwrite=true"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the earlier model is untouched"
    );
    let o = train(
        dir.path(),
        &model,
        &["train.lr=0.5", "output.overwrite=true"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(std::fs::read(&weights).unwrap(), before);
}

#[test]
fn outputs_are_written_as_the_umask_allows() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let script = format!(
        "umask 022; exec '{}' embed --device cpu --model '{}' --input '{}' --output '{}'",
        env!("CARGO_BIN_EXE_multipos"),
        model.display(),
        input.display(),
        out.display()
    );
    assert!(
        Command::new("sh")
            .args(["-c", &script])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn eval_says_which_queries_it_does_not_score() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let qrels = dir.path().join("qrels.tsv");
    let full =
        std::fs::read_to_string(repo("deploy/data/bible_paraphrase_tiny/dev_qrels.tsv")).unwrap();
    let first_query = full
        .lines()
        .nth(1)
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let kept: String = full
        .lines()
        .filter(|l| l.split('\t').next() != Some(first_query.as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&qrels, kept).unwrap();
    let mut c = multipos(&["eval", "--device", "cpu", "--model"]);
    c.arg(&model)
        .args([
            "--queries",
            "deploy/data/bible_paraphrase_tiny/dev_queries.jsonl",
        ])
        .args([
            "--corpus",
            "deploy/data/bible_paraphrase_tiny/corpus.jsonl",
            "--qrels",
        ])
        .arg(&qrels);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 of") && err.contains("have no relevant document"),
        "{err}"
    );
}

#[test]
fn a_worker_asking_for_a_rank_beyond_the_ring_is_refused_and_one_that_never_joined_says_so() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let token = "bad-input-test-token";
    let mut c = multipos(&["coordinator", "--config", "configs/local-2workers.toml"]);
    c.arg("--set")
        .arg(format!("model.path=\"{}\"", model.display()))
        .arg("--set")
        .arg(format!(
            "output.dir=\"{}\"",
            dir.path().join("out").display()
        ))
        .args(["--set", "cluster.workers=1"])
        .env("MULTIPOS_CLUSTER_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut coordinator = c.spawn().unwrap();
    let addr = common::announced_address(&mut coordinator);
    let mut w = multipos(&[
        "worker",
        "--device",
        "cpu",
        "--rank",
        "5",
        "--coordinator",
        &addr,
        "--model",
    ]);
    w.arg(&model).env("MULTIPOS_CLUSTER_TOKEN", token);
    let err = refused(w);
    assert!(
        err.contains("rank 5 asked for, but cluster.workers = 1"),
        "{err}"
    );
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();

    let mut w = multipos(&[
        "worker",
        "--device",
        "cpu",
        "--connect-timeout-s",
        "1",
        "--coordinator",
        "127.0.0.1:9",
    ]);
    w.env("MULTIPOS_CLUSTER_TOKEN", token);
    let err = refused(w);
    assert!(
        err.contains("not joined yet") && !err.contains("leaving the ring"),
        "{err}"
    );
}

/// Whether a `/proc/PID/status` text shows SIGINT caught (bit 2 of the `SigCgt` mask).
fn catches_sigint(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// `multipos ARGS` started the way a shell starts a background job (SIGINT ignored), interrupted
/// with SIGINT `after` it installed its handler; returns its exit code.
fn interrupted(args: &[String], after: std::time::Duration) -> Option<i32> {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "trap '' INT; exec '{}' {}",
        env!("CARGO_BIN_EXE_multipos"),
        quoted.join(" ")
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .current_dir(repo(""))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Counted from the handler's installation, not the spawn: on a loaded machine loading the
    // binary alone can outlast `after`, and a SIGINT before the handler is ignored as inherited.
    let status = format!("/proc/{}/status", child.id());
    let started = std::time::Instant::now();
    while !catches_sigint(&std::fs::read_to_string(&status).unwrap_or_default()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "multipos never installed its SIGINT handler"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(after);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    o.status.code()
}

#[test]
fn ctrl_c_stops_embed_with_no_output_even_when_sigint_was_ignored() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.txt");
    std::fs::write(
        &input,
        "a long enough line of text to embed\n".repeat(200_000),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let args: Vec<String> = [
        "embed",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--model",
        &model.display().to_string(),
        "--input",
        &input.display().to_string(),
        "--output",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let code = interrupted(&args, std::time::Duration::from_millis(1500));
    assert_eq!(code, Some(130));
    assert!(!out.exists(), "no output after Ctrl-C");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".multipos-"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn ctrl_c_during_train_start_up_stops_it_without_a_model() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let run = dir.path().join("run");
    let args: Vec<String> = [
        "train".to_string(),
        "--config".into(),
        "configs/tiny.toml".into(),
        "--set".into(),
        format!("model.path=\"{}\"", model.display()),
        "--set".into(),
        format!("output.dir=\"{}\"", run.display()),
        "--set".into(),
        "train.epochs=50".into(),
    ]
    .to_vec();
    let code = interrupted(&args, std::time::Duration::from_millis(300));
    assert_ne!(code, Some(0), "an interrupted run must not report success");
    assert!(!run.join("model").exists(), "no model after Ctrl-C");
}

#[test]
fn a_run_refused_before_its_first_step_leaves_no_output_dir_behind() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused(train(dir.path(), &model, &["train.batch_size=100"]));
    assert!(err.contains("larger than"), "{err}");
    assert!(
        !dir.path().join("run").exists(),
        "the refused run left its output dir"
    );
}

#[test]
fn a_coordinator_refused_at_start_up_leaves_no_output_dir_behind() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let run = dir.path().join("run");
    let coordinator = || {
        let mut c = multipos(&["coordinator", "--config", "configs/tiny.toml"]);
        c.arg("--set")
            .arg(format!("model.path=\"{}\"", model.display()))
            .arg("--set")
            .arg(format!("output.dir=\"{}\"", run.display()))
            .args(["--set", "train.batch_size=100"])
            .env("MULTIPOS_CLUSTER_TOKEN", "0123456789abcdef");
        c
    };
    let err = refused(coordinator());
    assert!(err.contains("larger than"), "{err}");
    assert!(!run.exists(), "the refused coordinator left its output dir");
    // An output dir that existed before is the user's: it stays.
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("notes.txt"), b"mine").unwrap();
    refused(coordinator());
    assert_eq!(std::fs::read(run.join("notes.txt")).unwrap(), b"mine");
}
