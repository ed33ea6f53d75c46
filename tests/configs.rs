//! Every shipped config in `configs/` loads, validates, and plans its run on the bundled data (those
//! that name the research-only InsuranceQA files, which a fresh clone lacks, or train on data that a
//! step in their comments writes under runs/ first, are only parsed).
use std::path::Path;

use multipos::config::RunConfig;
use multipos::train::build::plan_for;
use multipos::train::task::load_tasks;

#[test]
fn shipped_configs_load_and_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    let mut planned = Vec::new();
    for entry in std::fs::read_dir(root.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Research-only data a fresh clone lacks, or data a documented step writes under runs/
        // (a mining step, a split script).
        let table: toml::Table = toml::from_str(&text).unwrap();
        let produced = table
            .get("data")
            .and_then(|d| d.get("train"))
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.starts_with("runs/"));
        if (text.contains("../shared/") && !root.join("../shared/data").exists()) || produced {
            continue;
        }
        let cfg = RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tasks = load_tasks(&cfg.tasks()).unwrap();
        let plan = plan_for(&cfg, &tasks).unwrap();
        assert!(plan.total_steps > 0, "{}", path.display());
        planned.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            tasks.len(),
        ));
    }
    assert!(
        planned.contains(&("multi-task.toml".to_string(), 2)),
        "the multi-task example plans both tasks: {planned:?}"
    );
}
