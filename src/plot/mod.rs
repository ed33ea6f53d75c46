//! `multipos plot`: a run's `metrics.jsonl` drawn as PNG and SVG — loss, learning rate, throughput,
//! where the step time goes, gradient norm and validation metrics — for one run or several side by
//! side. The font is compiled in (DejaVu Sans), so no system font is needed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::io::atomic;

const FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const SIZE: (u32, u32) = (1500, 1000);

/// The phases of a step as `metrics.jsonl` logs them (docs/design.md §14).
pub const PROFILE: [(&str, &str); 7] = [
    ("data", "data_seconds"),
    ("forward", "forward_seconds"),
    ("backward", "backward_seconds"),
    ("all-gather", "gather_seconds"),
    ("all-reduce", "reduce_seconds"),
    ("optimizer", "optimizer_seconds"),
    ("device wait", "sync_seconds"),
];

/// One curve: (step, value) points.
type Curve = Vec<(f64, f64)>;

/// What a run logged, by quantity.
#[derive(Debug, Default)]
pub(crate) struct RunCurves {
    /// Names the run in legends (its directory's name).
    pub label: String,
    pub loss: Curve,
    pub lr: Curve,
    pub pairs_per_s: Curve,
    pub grad_norm: Curve,
    /// Step time by phase (the step profile: data, forward, backward, all-gather, all-reduce,
    /// optimizer, device wait; logs from before the profile have compute instead of the first
    /// three device phases).
    pub times: BTreeMap<&'static str, Curve>,
    /// Validation metrics by name.
    pub eval: BTreeMap<String, Curve>,
}

impl RunCurves {
    /// Reads `dir/metrics.jsonl`; a bad line is an error naming it.
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(Error::io("read", &path))?;
        let mut run = RunCurves {
            label: dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            ..Default::default()
        };
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::BadLine {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            run.add(&v);
        }
        if run.loss.is_empty() {
            return Err(Error::invalid(&path, "no step was logged: nothing to plot"));
        }
        Ok(run)
    }

    fn add(&mut self, v: &serde_json::Value) {
        let Some(step) = v["step"].as_f64() else {
            return;
        };
        let put = |curve: &mut Curve, key: &str| {
            if let Some(x) = v[key].as_f64().filter(|x| x.is_finite()) {
                curve.push((step, x));
            }
        };
        match v["event"].as_str() {
            Some("step") => {
                put(&mut self.loss, "loss");
                put(&mut self.lr, "lr");
                put(&mut self.pairs_per_s, "pairs_per_s");
                put(&mut self.grad_norm, "grad_norm");
                let profiled = v.get("forward_seconds").is_some();
                for (part, key) in PROFILE {
                    if profiled || matches!(part, "all-gather" | "all-reduce") {
                        put(self.times.entry(part).or_default(), key);
                    }
                }
                if !profiled {
                    put(self.times.entry("compute").or_default(), "compute_seconds");
                }
            }
            Some("eval") => {
                if let Some(m) = v["metrics"].as_object() {
                    for (name, x) in m {
                        if let Some(x) = x.as_f64().filter(|x| x.is_finite()) {
                            self.eval.entry(name.clone()).or_default().push((step, x));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Draws `runs` into `out/training.png` and `out/training.svg` (written atomically); returns them.
pub(crate) fn plot(runs: &[RunCurves], out: &Path) -> Result<Vec<PathBuf>> {
    // Registering the same font again is harmless; it fails only on bytes that are not a font.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| Error::Usage("the compiled-in font is not readable".into()))?;
    std::fs::create_dir_all(out).map_err(Error::io("create directory", out))?;
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(),
        runs,
    )?;
    let image = image::RgbImage::from_raw(SIZE.0, SIZE.1, rgb).expect("buffer of the image's size");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Usage(format!("encoding the PNG: {e}")))?;
    let mut svg = String::new();
    draw(
        SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(),
        runs,
    )?;
    let (png_path, svg_path) = (out.join("training.png"), out.join("training.svg"));
    atomic::write_file(&png_path, &png)?;
    atomic::write_file(&svg_path, svg.as_bytes())?;
    Ok(vec![png_path, svg_path])
}

fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Usage(format!("drawing the plot: {e}"))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[RunCurves]) -> Result<()> {
    root.fill(&WHITE).map_err(drawing)?;
    let panels = root.split_evenly((2, 3));
    let per_run = |f: fn(&RunCurves) -> &Curve| -> Vec<(String, &Curve)> {
        runs.iter().map(|r| (r.label.clone(), f(r))).collect()
    };
    // Parts a run never spent time in (the collectives of a single process) are left out.
    let times = runs
        .iter()
        .flat_map(|r| {
            r.times
                .iter()
                .filter(|(_, c)| c.iter().any(|p| p.1 > 0.0))
                .map(|(part, c)| (format!("{} {part}", r.label), c))
        })
        .collect();
    let eval_keys = || runs.iter().flat_map(|r| r.eval.keys());
    let metric = eval_keys()
        .find(|k| *k == "ndcg@10")
        .or_else(|| eval_keys().next())
        .cloned();
    let eval = runs
        .iter()
        .filter_map(|r| Some((r.label.clone(), r.eval.get(metric.as_ref()?)?)))
        .collect();
    let charts: Vec<(String, Vec<(String, &Curve)>)> = vec![
        ("loss".into(), per_run(|r| &r.loss)),
        ("learning rate".into(), per_run(|r| &r.lr)),
        ("pairs / s".into(), per_run(|r| &r.pairs_per_s)),
        ("step time by phase (s)".into(), times),
        ("gradient norm".into(), per_run(|r| &r.grad_norm)),
        (
            format!("validation {}", metric.as_deref().unwrap_or("(none)")),
            eval,
        ),
    ];
    for (panel, (title, curves)) in panels.iter().zip(&charts) {
        chart(panel, title, curves)?;
    }
    root.present().map_err(drawing)
}

fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    curves: &[(String, &Curve)],
) -> Result<()> {
    let points = curves.iter().flat_map(|(_, c)| c.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(drawing)?;
    // Learning rates and the like are small: written in scientific notation, not as 0.00002.
    let small = y0.abs().max(y1.abs()) < 1e-2;
    let y_label = move |y: &f64| {
        if small {
            format!("{y:.1e}")
        } else {
            format!("{}", (y * 1000.0).round() / 1000.0)
        }
    };
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    for (i, (name, curve)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba().stroke_width(2);
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), color))
            .map_err(drawing)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
    }
    if !curves.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
    }
    Ok(())
}
