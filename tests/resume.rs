//! Checkpoints and exact resume with real processes: a run stopped (or SIGKILLed) and resumed ends
//! bit-identical to one that never stopped; damaged checkpoints are detected and skipped.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use multipos::model::tiny::TinySpec;
use multipos::train::checkpoint;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn command(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_multipos"));
    c.arg("train")
        .arg("--config")
        .arg(repo("configs/tiny.toml"))
        .env("RUST_LOG", "warn");
    let mut sets = common::tiny_config_sets(model, out);
    sets.push("output.checkpoint_every_steps=4".into());
    sets.extend(extra.iter().map(|s| s.to_string()));
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}

fn run(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let out = command(model, out, extra).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Trains 4 steps of one epoch into `dir/run`, then resumes with `changed`; expects a refusal and
/// returns its stderr.
fn refused_resume(dir: &Path, model: &Path, changed: &[&str]) -> String {
    let out = dir.join("run");
    run(model, &out, &["train.epochs=1", "train.stop_after_steps=4"]);
    let resumed = command(model, &out, changed)
        .arg("--resume")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&resumed.stderr).into_owned();
    assert!(!resumed.status.success(), "resumed: {err}");
    err
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model/model.safetensors")).unwrap()
}

#[test]
fn stop_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let full = dir.path().join("full");
    run(&model, &full, &["train.epochs=2"]);
    assert_eq!(common::losses_by_step(&full).len(), 16);

    let parted = dir.path().join("parted");
    let first = run(
        &model,
        &parted,
        &["train.epochs=2", "train.stop_after_steps=8"],
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("stopped after 8 of 16 steps"));
    assert!(
        !parted.join("model").exists(),
        "a stopped run has no final model yet"
    );
    let resumed = command(&model, &parted, &["train.epochs=2"])
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        common::resumed_from(&parted),
        [8],
        "the second invocation continued from step 8"
    );
    assert_eq!(
        common::losses_by_step(&full),
        common::losses_by_step(&parted),
        "per-step losses must be identical"
    );
    assert_eq!(
        weights(&full),
        weights(&parted),
        "final weights must be bit-identical"
    );
}

#[test]
fn sigkill_then_resume_ends_where_the_uninterrupted_run_ends() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let full = dir.path().join("full");
    let extra = ["train.epochs=12", "output.checkpoint_every_steps=2"];
    run(&model, &full, &extra);

    let killed = dir.path().join("killed");
    let mut child = command(&model, &killed, &extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_checkpoint(&killed, Duration::from_secs(120));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let resumed = command(&model, &killed, &extra)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let from = common::resumed_from(&killed);
    assert!(
        from.len() == 1 && from[0] >= 2 && from[0].is_multiple_of(2),
        "resumed from a checkpoint: {from:?}"
    );
    assert_eq!(
        weights(&full),
        weights(&killed),
        "final weights must be bit-identical"
    );
    assert_eq!(
        common::losses_by_step(&full),
        common::losses_by_step(&killed)
    );
}

#[test]
fn damaged_newest_checkpoint_is_reported_and_the_previous_one_used() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("run");
    run(
        &model,
        &out,
        &["train.epochs=2", "train.stop_after_steps=12"],
    );
    let ckpts = out.join("checkpoints");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&ckpts),
        ["step-00000004", "step-00000008", "step-00000012"],
        "the last 3 are kept"
    );

    // Flip one bit in the newest optimizer state: detected, the previous checkpoint is used.
    let victim = ckpts.join("step-00000012/optimizer.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    let (path, state) = checkpoint::latest_valid(&ckpts).unwrap().unwrap();
    assert_eq!(
        (
            path.file_name().unwrap().to_string_lossy().into_owned(),
            state.step
        ),
        ("step-00000008".into(), 8)
    );
    // Truncate the next one too: back to step 4.
    let victim = ckpts.join("step-00000008/model/model.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_eq!(checkpoint::latest_valid(&ckpts).unwrap().unwrap().1.step, 4);

    let resumed = command(&model, &out, &["train.epochs=2"])
        .env("RUST_LOG", "warn")
        .arg("--resume")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert_eq!(common::resumed_from(&out), [4]);
    assert!(
        err.contains("skipping a damaged checkpoint")
            && err.contains("checksum mismatch")
            && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn resuming_on_changed_data_is_refused() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let other = dir.path().join("other.jsonl");
    let text =
        std::fs::read_to_string(repo("deploy/data/bible_paraphrase_tiny/train.jsonl")).unwrap();
    std::fs::write(&other, text.lines().skip(1).collect::<Vec<_>>().join("\n")).unwrap();
    let err = refused_resume(
        dir.path(),
        &model,
        &[
            "train.epochs=1",
            &format!("data.train=\"{}\"", other.display()),
        ],
    );
    assert!(err.contains("was made on other data"), "{err}");
}

#[test]
fn a_resume_refused_for_changed_settings_names_them() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let err = refused_resume(
        dir.path(),
        &model,
        &["train.epochs=1", "train.lr=0.5", "data.mode=\"all\""],
    );
    assert!(
        err.contains("train.lr: 0.001 → 0.5")
            && err.contains("tasks[0].mode: \"sample\" → \"all\""),
        "{err}"
    );
}

#[test]
fn resuming_a_finished_run_reports_its_last_loss_not_nan() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("run");
    run(&model, &out, &["train.max_steps=4"]);
    let again = command(&model, &out, &["train.max_steps=4"])
        .arg("--resume")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout).into_owned()
        + &String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{text}");
    assert!(
        !text.contains("final loss NaN") && text.contains("final loss "),
        "{text}"
    );
}
