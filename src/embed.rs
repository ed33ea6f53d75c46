//! The `embed` job: read texts from a file, embed them, write one JSON line per text.
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::table::{self, Id};
use crate::error::{Error, Result};
use crate::io::atomic::AtomicFile;
use crate::model::SentenceModel;

/// One text to embed, with the optional id it had in a JSONL input.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub(crate) struct InputText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub text: String,
}

/// Reads `.txt` (one text per line, no blank lines), `.jsonl` (objects with a `"text"` string;
/// blank lines allowed), or a table (Parquet, Arrow, a folder of them: the `text` column or the only
/// string column, with `id` when there is one). Every problem names the file and line (or row); an
/// empty input is an error.
pub(crate) fn read_inputs(path: &Path) -> Result<Vec<InputText>> {
    if table::is_table(path) {
        let texts: Vec<InputText> = table::read_texts(path)?
            .into_iter()
            .map(|(id, text)| InputText {
                id: id.map(|id| match id {
                    Id::Int(i) => serde_json::Value::from(i),
                    Id::Text(t) => serde_json::Value::from(t),
                }),
                text,
            })
            .collect();
        if texts.is_empty() {
            return Err(Error::invalid(
                path,
                "no texts to embed: the table has no rows",
            ));
        }
        return Ok(texts);
    }
    let jsonl = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => true,
        Some("txt") => false,
        _ => {
            return Err(Error::invalid(
                path,
                "unknown input format: expected a .txt or .jsonl file, or a table (.parquet, .arrow, a folder of them)",
            ));
        }
    };
    let file = File::open(path).map_err(Error::io("open", path))?;
    let mut reader = BufReader::new(file);
    let mut texts = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let bad = |reason: String| Error::BadLine {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        };
        let line = std::str::from_utf8(&buf).map_err(|e| bad(format!("not valid UTF-8 ({e})")))?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = match line_no {
            1 => line.strip_prefix('\u{feff}').unwrap_or(line),
            _ => line,
        };
        if jsonl {
            if line.trim().is_empty() {
                continue;
            }
            let item: InputText = serde_json::from_str(line)
                .map_err(|e| bad(format!("expected an object with a \"text\" string: {e}")))?;
            texts.push(item);
        } else {
            if line.is_empty() {
                return Err(bad(
                    "empty line (use .jsonl with \"text\": \"\" to embed an empty text)".into(),
                ));
            }
            texts.push(InputText {
                id: None,
                text: line.to_string(),
            });
        }
    }
    if texts.is_empty() {
        return Err(Error::invalid(path, "no texts to embed: the file is empty"));
    }
    Ok(texts)
}

#[derive(Serialize)]
struct OutputLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a serde_json::Value>,
    text: &'a str,
    embedding: &'a [f32],
}

/// Embeds `inputs`, each with `prompt` in front, and writes `output` atomically: it appears whole
/// or not at all. The lines keep the texts as given.
pub(crate) fn embed_to_file(
    model: &SentenceModel,
    inputs: &[InputText],
    prompt: Option<&str>,
    output: &Path,
    batch_size: usize,
) -> Result<()> {
    let texts: Vec<&str> = inputs.iter().map(|t| t.text.as_str()).collect();
    let vectors = model.embed_prompted(&texts, prompt, batch_size)?;
    let dim = model.dimension() as usize;
    let mut flat = vec![0f32; inputs.len() * dim];
    let numel = flat.len();
    vectors.copy_data(&mut flat, numel);
    let mut out = AtomicFile::create(output)?;
    for (input, row) in inputs.iter().zip(flat.chunks_exact(dim)) {
        let line = OutputLine {
            id: input.id.as_ref(),
            text: &input.text,
            embedding: row,
        };
        serde_json::to_writer(out.writer(), &line)
            .map_err(|e| Error::io("write", output)(e.into()))?;
        out.writer()
            .write_all(b"\n")
            .map_err(Error::io("write", output))?;
    }
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_txt_and_jsonl() {
        let (_d, p) = file("a.txt", b"first\r\nsecond\n");
        let texts: Vec<String> = read_inputs(&p)
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(texts, ["first", "second"]);
        let (_d, p) = file(
            "a.jsonl",
            b"{\"id\": 7, \"text\": \"x\"}\n\n{\"text\": \"\"}\n",
        );
        let got = read_inputs(&p).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, Some(serde_json::json!(7)));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let (_d, p) = file("bad.txt", b"ok\n\xff\xfe\n");
        let err = read_inputs(&p).unwrap_err().to_string();
        assert!(err.contains("bad.txt:2:") && err.contains("UTF-8"), "{err}");
        let (_d, p) = file("bad.jsonl", b"{\"text\": \"a\"}\n{\"txt\": \"b\"}\n");
        let err = read_inputs(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl:2:") && err.contains("text"),
            "{err}"
        );
        let (_d, p) = file("empty.txt", b"");
        assert!(read_inputs(&p).unwrap_err().to_string().contains("empty"));
        let (_d, p) = file("blank.txt", b"a\n\nb\n");
        assert!(
            read_inputs(&p)
                .unwrap_err()
                .to_string()
                .contains("blank.txt:2:")
        );
    }
}
