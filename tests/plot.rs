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

/// Pixels of the loss panel (top left of the 3 × 2 grid) in the colour of the `series`-th curve
/// (its curves, unlike the speed and time panels', do not depend on how fast the machine ran).
fn loss_panel_pixels_of_series(img: &image::RgbImage, series: usize) -> usize {
    use plotters::style::{Color, Palette, Palette99};
    let (w, h) = (img.width() / 3, img.height() / 2);
    let c = Palette99::pick(series).to_rgba();
    let want = [c.0, c.1, c.2];
    img.enumerate_pixels()
        .filter(|(x, y, p)| {
            *x < w && *y < h && p.0.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 24)
        })
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
    // The compared run's loss curve is drawn in the second colour, which one run alone never uses.
    assert!(
        loss_panel_pixels_of_series(&pboth, 1) > 200,
        "the compared run's loss curve is missing"
    );
    assert!(
        loss_panel_pixels_of_series(&pa, 1) < 20,
        "one run drew a second curve"
    );
    assert!(loss_panel_pixels_of_series(&pboth, 0) > 200);
    let svg = std::fs::read_to_string(both.join("training.svg")).unwrap();
    for title in [
        "loss",
        "learning rate",
        "pairs / s",
        "gradient norm",
        "validation ndcg@10",
        "slow",
        "fast",
        "step time by phase",
        "slow forward",
        "slow backward",
        "slow optimizer",
        "slow device wait",
    ] {
        assert!(svg.contains(title), "{title} missing from the SVG");
    }
}

/// Every step of a run carries its time profile, and the phases add up to the step's time.
#[test]
fn steps_log_where_their_time_went() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let out = dir.path().join("profiled");
    train(&model, &out, "1e-4");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .collect();
    assert_eq!(steps.len(), 12);
    for v in &steps {
        let parts: Vec<f64> = multipos::plot::PROFILE
            .iter()
            .map(|(_, key)| {
                v[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key} missing: {v}"))
            })
            .collect();
        assert!(parts.iter().all(|&p| p >= 0.0), "{v}");
        let sum: f64 = parts.iter().sum();
        let seconds = v["seconds"].as_f64().unwrap();
        assert!(
            (sum - seconds).abs() <= 1e-9 * seconds.max(1.0),
            "{sum} vs {seconds}"
        );
        assert!(
            v["forward_seconds"].as_f64().unwrap() > 0.0
                && v["backward_seconds"].as_f64().unwrap() > 0.0
        );
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
