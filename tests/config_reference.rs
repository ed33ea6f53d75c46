//! The README's configuration reference lists every key the configuration accepts, and nothing
//! else. The keys in the code are found by asking the configuration's own deserializer: a table with
//! an unknown key is refused with the list of the keys it expects, recursively, for every section,
//! task and loss type; so a key added to the code and not to the reference (or the other way round)
//! fails this test.
use std::collections::BTreeSet;
use std::path::Path;

use multipos::config::RunConfig;
use toml::{Table, Value};

const PROBE: &str = "__probe";

/// Where a probe goes: keys from the top, `[]` stepping into an array of tables.
fn document(path: &[String], leaf: Table) -> Value {
    let Some((first, rest)) = path.split_first() else {
        return Value::Table(leaf);
    };
    let mut t = Table::new();
    if let Some(key) = first.strip_suffix("[]") {
        t.insert(key.into(), Value::Array(vec![document(rest, leaf)]));
    } else {
        t.insert(first.clone(), document(rest, leaf));
    }
    Value::Table(t)
}

/// The deserializer's complaint about `leaf` at `path`.
fn complaint(path: &[String], leaf: Table) -> String {
    match document(path, leaf).try_into::<RunConfig>() {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The names in "expected one of `a`, `b`" (or "expected `a`").
fn expected(message: &str) -> Option<Vec<String>> {
    let first = message.lines().next()?;
    let list = first.split_once("expected ")?.1;
    let names: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    (!names.is_empty()).then_some(names)
}

fn probe_table() -> Table {
    Table::from_iter([(PROBE.to_string(), Value::Integer(1))])
}

/// The keys of the table at `path` (a struct), or `None` when it is not one.
fn struct_keys(path: &[String]) -> Option<Vec<String>> {
    let message = complaint(path, probe_table());
    if !message.contains(&format!("unknown field `{PROBE}`")) {
        return None;
    }
    expected(&message)
}

/// The variants of an internally tagged enum at `path` (tag `type`), when it is one.
fn variants(path: &[String]) -> Option<Vec<String>> {
    let leaf = Table::from_iter([("type".to_string(), Value::String(PROBE.into()))]);
    let message = complaint(path, leaf);
    if !message.contains(&format!("unknown variant `{PROBE}`")) {
        return None;
    }
    expected(&message)
}

/// Every key under `path`, as dotted names (`tasks[].loss.scale`); tagged variants' keys are
/// written `loss.<variant>.key`.
fn walk(path: &mut Vec<String>, keys: &mut BTreeSet<String>) {
    let Some(fields) = struct_keys(path) else {
        return;
    };
    for f in fields {
        path.push(f.clone());
        let here = path.join(".");
        if let Some(types) = variants(path) {
            // A loss: `type` and the keys of every type, merged (the reference says which type
            // takes which). Inside a task it is "a table like [loss]".
            if path.len() > 1 {
                keys.insert(here);
            } else {
                keys.insert(format!("{here}.type"));
                for t in types
                    .iter()
                    .filter(|t| t.chars().all(|c| c.is_lowercase() || c == '_'))
                {
                    let mut leaf = probe_table();
                    leaf.insert("type".into(), Value::String(t.clone()));
                    for k in expected(&complaint(path, leaf)).unwrap_or_default() {
                        keys.insert(format!("{here}.{k}"));
                    }
                }
            }
        } else if struct_keys(path).is_some() {
            walk(path, keys);
        } else {
            let last = path.pop().expect("pushed above");
            path.push(format!("{last}[]"));
            if struct_keys(path).is_some() {
                walk(path, keys);
            } else {
                keys.insert(here);
            }
            path.pop();
            path.push(last);
        }
        path.pop();
    }
}

fn code_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    walk(&mut Vec::new(), &mut keys);
    keys
}

/// The keys of the README's "Configuration reference" table.
fn reference_keys() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Configuration reference\n")
        .nth(1)
        .expect("README has a Configuration reference section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(key, _)| key.to_string())
        .collect()
}

#[test]
fn the_readme_reference_lists_every_configuration_key_and_no_other() {
    let code = code_keys();
    assert!(code.len() > 80, "the probe found too few keys: {code:?}");
    for key in [
        "train.lr",
        "loss.hardness_mode",
        "tasks[].loss",
        "cluster.tls.client_auth",
        "train.mine.relative_margin",
    ] {
        assert!(code.contains(key), "the probe missed {key}");
    }
    let reference = reference_keys();
    let undocumented: Vec<_> = code.difference(&reference).collect();
    let unknown: Vec<_> = reference.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "keys in the code but not in README's reference: {undocumented:?}; in the reference but not in the code: {unknown:?}"
    );
}
