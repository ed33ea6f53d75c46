//! The layer rules of `docs/design.md` §1, held against the code: every module of the library is in
//! the design's module table with a layer; a module names (in `use` lines and `crate::` paths) only
//! modules of lower layers, never one of its own layer or above; and no file's module names,
//! through any chain, a module that names it back. The rules live in the design's table, so
//! changing a layer is a reviewed change of the design; this test reads the source as text.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The module path of a library file: `src/train/step.rs` is `train::step`, `src/net/mod.rs` is
/// `net`, `src/lib.rs` the crate root (empty).
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The source without comments and string literals, which may hold `crate::` as text.
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r'
            && matches!(b.get(i + 1), Some(b'#' | b'"'))
            && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // A raw string: r"…" or r#"…"#, which may hold quotes.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal such as '"' (lifetimes have no closing quote).
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The paths a `use` tree names, braces expanded: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`,
/// `a::c::e`.
fn expand_use(tree: &str) -> Vec<String> {
    // Renames (`x as y`) name `x`: drop ` as y`, then the spaces.
    let mut kept = String::new();
    let mut words = tree.split_whitespace();
    while let Some(w) = words.next() {
        if w == "as" {
            let renamed = words.next().unwrap_or("");
            kept.extend(
                renamed
                    .chars()
                    .skip_while(|c| c.is_alphanumeric() || *c == '_'),
            );
        } else {
            kept.push_str(w);
        }
    }
    let tree = kept;
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand_use(p)
                .into_iter()
                .map(move |q| format!("{prefix}{q}"))
        })
        .collect()
}

/// The module paths `file` names: its `use` lines (crate-, super-, self- or child-relative) and
/// the `crate::` paths in its code, each as far as the known modules go.
fn named_modules(file: &Path, modules: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let here = module_of(file);
    let code = code_only(&std::fs::read_to_string(file).unwrap());
    let mut paths: Vec<String> = Vec::new();
    for (at, _) in code.match_indices("use ") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = code[at..].find(';') else {
            continue;
        };
        paths.extend(expand_use(&code[at + 4..at + end]));
    }
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let path: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        paths.push(path);
    }
    let mut named = BTreeSet::new();
    for path in paths {
        let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> = match segs.first().copied() {
            Some("crate") => {
                segs.remove(0);
                Vec::new()
            }
            Some("super") => {
                let mut b = here.clone();
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    b.pop();
                }
                b
            }
            Some("self") => {
                segs.remove(0);
                here.clone()
            }
            Some(first) => {
                let mut child = here.clone();
                child.push(first.to_string());
                if !modules.contains(&child) {
                    continue; // another crate
                }
                here.clone()
            }
            None => continue,
        };
        let mut longest = None;
        for s in segs {
            base.push(s.to_string());
            if modules.contains(&base) {
                longest = Some(base.clone());
            } else {
                break;
            }
        }
        if let Some(m) = longest {
            named.insert(m);
        }
    }
    named
}

/// The layers of `docs/design.md` §1: top-level module → (layer, what the row says it holds).
fn design_layers() -> BTreeMap<String, (u32, String)> {
    let design = std::fs::read_to_string(root().join("docs/design.md")).unwrap();
    let section = &design[design.find("## 1.").unwrap()..design.find("## 2.").unwrap()];
    let mut layers = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 {
            continue;
        }
        let Ok(layer) = cells[1].parse::<u32>() else {
            continue;
        };
        let module = cells[2]
            .trim_matches('`')
            .trim_end_matches('/')
            .trim_end_matches(".rs");
        let previous = layers.insert(module.to_string(), (layer, cells[3].to_string()));
        assert!(previous.is_none(), "design §1 lists `{module}` twice");
    }
    assert!(!layers.is_empty(), "design §1 has no layer table");
    layers
}

struct Graph {
    files: Vec<PathBuf>,
    modules: BTreeSet<Vec<String>>,
    /// module → the modules it names.
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn graph() -> Graph {
    // The library's files; `main.rs` is the binary, a thin edge over `cli`.
    let files: Vec<PathBuf> = rust_files(&root().join("src"))
        .into_iter()
        .filter(|f| !f.ends_with("src/main.rs"))
        .collect();
    let mut modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    // Modules declared inline in a file (`pub mod pb { … }` in lib.rs) are modules too.
    for f in &files {
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        for line in code.lines() {
            let line = line.trim();
            let decl = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("mod "));
            if let Some(name) = decl.and_then(|d| d.strip_suffix(" {")) {
                let mut m = module_of(f);
                m.push(name.to_string());
                modules.insert(m);
            }
        }
    }
    modules.remove(&Vec::new());
    let edges = files
        .iter()
        .map(|f| (module_of(f), named_modules(f, &modules)))
        .collect();
    Graph {
        files,
        modules,
        edges,
    }
}

fn show(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The library's forbidden edges: to a top-level module of the same or a higher layer.
fn layer_violations(g: &Graph, layers: &BTreeMap<String, (u32, String)>) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, named) in &g.edges {
        let Some(top) = from.first() else { continue };
        let Some(&(layer, _)) = layers.get(top) else {
            bad.push(format!("{} has no layer", show(from)));
            continue;
        };
        for to in named {
            let target = &to[0];
            if target == top {
                continue;
            }
            let Some(&(other, _)) = layers.get(target) else {
                bad.push(format!(
                    "{} names {}, which has no layer",
                    show(from),
                    show(to)
                ));
                continue;
            };
            if other >= layer {
                bad.push(format!(
                    "{} (layer {layer}) names {} (layer {other})",
                    show(from),
                    show(to)
                ));
            }
        }
    }
    bad
}

/// Groups of modules that name each other through some chain (a module naming its own enclosing
/// module is not counted: `mod.rs` is its children's home).
fn loops(g: &Graph) -> Vec<Vec<String>> {
    let nodes: Vec<&Vec<String>> = g.edges.keys().collect();
    let index: BTreeMap<&Vec<String>, usize> =
        nodes.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|from| {
            g.edges[*from]
                .iter()
                .filter(|to| !from.starts_with(to))
                .filter_map(|to| {
                    // A name inside a file (an inline module) stands for its file.
                    (1..=to.len())
                        .rev()
                        .find_map(|n| index.get(&to[..n].to_vec()).copied())
                })
                .collect()
        })
        .collect();
    // Tarjan's strongly connected components.
    struct Tarjan<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.adj[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut group = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack[w] = false;
                    group.push(w);
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    self.found.push(group);
                }
            }
        }
    }
    let n = nodes.len();
    let mut t = Tarjan {
        adj: &adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.found
        .into_iter()
        .map(|group| {
            let mut names: Vec<String> = group.into_iter().map(|i| show(nodes[i])).collect();
            names.sort();
            names
        })
        .collect()
}

#[test]
fn every_module_has_a_layer_and_its_row_names_every_file() {
    let g = graph();
    let layers = design_layers();
    let mut missing = Vec::new();
    for f in &g.files {
        let m = module_of(f);
        let Some(top) = m.first() else { continue };
        match layers.get(top) {
            None => missing.push(format!("`{top}` has no row in design §1")),
            Some((_, holds)) => {
                if let Some(leaf) = m.get(1..).and_then(|rest| rest.last())
                    && !holds.contains(&format!("`{leaf}`"))
                {
                    missing.push(format!(
                        "the row of `{top}` does not name `{leaf}` ({})",
                        f.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    for listed in layers.keys() {
        assert!(
            g.modules.iter().any(|m| m.first() == Some(listed)),
            "design §1 lists `{listed}`, which is no module"
        );
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn modules_name_only_lower_layers() {
    let bad = layer_violations(&graph(), &design_layers());
    assert!(
        bad.is_empty(),
        "imports against the layers of docs/design.md §1:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_module_names_one_that_names_it_back() {
    let found = loops(&graph());
    assert!(
        found.is_empty(),
        "import loops:\n{}",
        found
            .iter()
            .map(|l| l.join(" ↔ "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_checks_see_what_they_are_for() {
    // The checks themselves, on a made-up graph: a downward edge passes, an upward edge and a
    // loop are caught.
    let layers: BTreeMap<String, (u32, String)> = [("low", 0), ("high", 1)]
        .into_iter()
        .map(|(m, l)| (m.to_string(), (l, String::new())))
        .collect();
    let m = |p: &str| p.split("::").map(String::from).collect::<Vec<_>>();
    let mut g = Graph {
        files: Vec::new(),
        modules: [m("low"), m("low::a"), m("low::b"), m("high")]
            .into_iter()
            .collect(),
        edges: BTreeMap::new(),
    };
    g.edges
        .insert(m("high"), [m("low::a")].into_iter().collect());
    g.edges
        .insert(m("low::a"), [m("low::b")].into_iter().collect());
    g.edges.insert(m("low::b"), BTreeSet::new());
    assert!(layer_violations(&g, &layers).is_empty());
    assert!(loops(&g).is_empty());
    g.edges
        .insert(m("low::b"), [m("high"), m("low::a")].into_iter().collect());
    assert_eq!(
        layer_violations(&g, &layers),
        vec!["low::b (layer 0) names high (layer 1)".to_string()]
    );
    assert_eq!(loops(&g), vec![vec!["high", "low::a", "low::b"]]);
    // And the parser: braces, renames, `super`, comments and strings.
    assert_eq!(
        expand_use("crate::a::{b, c::{d as e, f}}"),
        vec!["crate::a::b", "crate::a::c::d", "crate::a::c::f"]
    );
    assert_eq!(
        code_only("let s = \"crate::x\"; // crate::y\nuse crate::z; r#\"\"crate\"\"#;"),
        "let s = \"\"; \nuse crate::z; \"\";"
    );
}
