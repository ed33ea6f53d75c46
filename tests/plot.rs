//! `multipos plot` draws real runs' metrics: the PNG has drawn pixels, two different runs give
//! different images, `--compare` puts both in one, and the SVG carries the panels' titles.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use multipos::model::tiny::TinySpec;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn multipos(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(args)
        .current_dir(repo(""))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn train(model: &Path, out: &Path, lr: &str) {
    multipos(&[
        "train",
        "--config",
        "configs/tiny.toml",
        "--set",
        &format!("model.path=\"{}\"", model.display()),
        "--set",
        &format!("output.dir=\"{}\"", out.display()),
        "--set",
        &format!("train.lr={lr}"),
        "--set",
        "train.max_steps=12",
        "--set",
        "eval.every_steps=4",
    ]);
}

fn pixels(png: &Path) -> image::RgbImage {
    image::open(png).unwrap().to_rgb8()
}

fn drawn(img: &image::RgbImage) -> usize {
    img.pixels().filter(|p| p.0 != [255, 255, 255]).count()
}

/// Drawn pixels of the loss panel (top left of the 3 × 2 grid): its curves, unlike the speed and
/// time panels', do not depend on how fast the machine ran.
fn drawn_loss_panel(img: &image::RgbImage) -> usize {
    let (w, h) = (img.width() / 3, img.height() / 2);
    img.enumerate_pixels()
        .filter(|(x, y, p)| *x < w && *y < h && p.0 != [255, 255, 255])
        .count()
}

#[test]
fn plots_show_the_runs_and_differ_between_them() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let (a, b) = (dir.path().join("slow"), dir.path().join("fast"));
    train(&model, &a, "1e-5");
    train(&model, &b, "5e-3");
    let out = multipos(&["plot", "--run", a.to_str().unwrap()]);
    assert!(
        out.contains("training.png") && out.contains("training.svg"),
        "{out}"
    );
    multipos(&["plot", "--run", b.to_str().unwrap()]);
    let (pa, pb) = (
        pixels(&a.join("plots/training.png")),
        pixels(&b.join("plots/training.png")),
    );
    assert_eq!(pa.dimensions(), (1500, 1000));
    let total = (1500 * 1000) as usize;
    assert!(
        drawn(&pa) > total / 100,
        "almost blank: {} drawn pixels",
        drawn(&pa)
    );
    assert!(drawn(&pa) < total / 2, "mostly not white: {}", drawn(&pa));
    let differing = pa.pixels().zip(pb.pixels()).filter(|(x, y)| x != y).count();
    assert!(
        differing > 1000,
        "two different runs, {differing} differing pixels"
    );

    let both = dir.path().join("both");
    multipos(&[
        "plot",
        "--run",
        a.to_str().unwrap(),
        "--compare",
        b.to_str().unwrap(),
        "--out",
        both.to_str().unwrap(),
    ]);
    let pboth = pixels(&both.join("training.png"));
    assert!(
        drawn_loss_panel(&pboth) > drawn_loss_panel(&pa),
        "two runs' losses draw more than one's"
    );
    let svg = std::fs::read_to_string(both.join("training.svg")).unwrap();
    for title in [
        "loss",
        "learning rate",
        "pairs / s",
        "gradient norm",
        "validation ndcg@10",
        "slow",
        "fast",
    ] {
        assert!(svg.contains(title), "{title} missing from the SVG");
    }
}

#[test]
fn a_run_without_steps_is_refused_naming_its_log() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), "{\"event\": \"data\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_multipos"))
        .args(["plot", "--run"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("metrics.jsonl: no step was logged"), "{err}");
    assert!(!dir.path().join("plots").exists(), "nothing written");
}
