//! The `multipos` binary end to end: real process, real files, real exit codes.
mod common;

use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use multipos::model::tiny::TinySpec;

fn multipos(args: &[&str]) -> Output {
    Command::cargo_bin("multipos")
        .unwrap()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn embed(model: &Path, input: &Path, output: &Path) -> Output {
    multipos(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        // Asked to replace: what a failed run must still leave alone (`bad_input_fails_cleanly_...`).
        "--overwrite",
    ])
}

#[test]
fn embeds_txt_in_input_order() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.txt");
    let texts = [
        "the lord said",
        "a much longer text about home insurance policy claims",
        "faith",
        "peace",
    ];
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let out = embed(&model, &input, &output);
    assert!(out.status.success(), "{}", stderr(&out));

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), texts.len());
    let lib = multipos::SentenceModel::load(&model, tch::Device::Cpu).unwrap();
    let expected = common::rows(&lib.embed(&texts, 4).unwrap());
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["text"], texts[i]);
        let got: Vec<f32> = serde_json::from_value(line["embedding"].clone()).unwrap();
        assert_eq!(got.len(), 32);
        let diff = got
            .iter()
            .zip(&expected[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "line {i} differs by {diff}");
    }
}

#[test]
fn jsonl_ids_are_kept() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"q1\", \"text\": \"faith\"}\n\n{\"id\": 2, \"text\": \"peace\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let out = embed(&model, &input, &output);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&output).unwrap();
    let ids: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].clone())
        .collect();
    assert_eq!(ids, vec![serde_json::json!("q1"), serde_json::json!(2)]);
}

#[test]
fn bad_input_fails_cleanly_and_leaves_existing_output_alone() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let output = dir.path().join("out.jsonl");
    std::fs::write(&output, "previous results\n").unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.txt", b"", "empty"),
        ("bad.txt", b"fine\n\xc3\x28 broken\n", "bad.txt:2:"),
        (
            "bad.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": 5}\n",
            "bad.jsonl:2:",
        ),
        ("data.csv", b"text\nhello\n", "expected a .txt or .jsonl"),
    ];
    for (name, content, needle) in cases {
        let input = dir.path().join(name);
        std::fs::write(&input, content).unwrap();
        let out = embed(&model, &input, &output);
        let err = stderr(&out);
        assert!(!out.status.success(), "{name} should fail");
        assert!(err.contains(needle) && err.contains(name), "{name}: {err}");
        assert_eq!(
            std::fs::read_to_string(&output).unwrap(),
            "previous results\n"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".multipos"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

#[test]
fn missing_model_and_bad_device_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let out = embed(&dir.path().join("no-model"), &input, &output);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-model"), "{}", stderr(&out));
    assert!(!output.exists());

    let out = multipos(&[
        "embed", "--input", "x.txt", "--output", "y.jsonl", "--device", "tpu",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown device 'tpu'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_reads_like_a_real_tool() {
    let out = multipos(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for cmd in ["embed", "demo", "convert"] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = multipos(&["embed", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--model",
        "--input",
        "--output",
        "--batch-size",
        "--device",
        "--threads",
    ] {
        assert!(text.contains(opt), "{text}");
    }
}
