//! Progress of a long run: a bar on a terminal, a log line every few seconds otherwise (no escape
//! codes, so files and log shippers read it), and the rates `multipos status` reports.
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Display {
    /// A bar when stderr is a terminal, lines otherwise.
    Auto,
    /// A bar on stderr.
    Bar,
    /// A log line every `--progress-every-s` seconds.
    Lines,
    /// Nothing (someone else shows it, e.g. `launch` from the coordinator's status).
    Off,
}

/// How and how often progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Show {
    pub display: Display,
    /// Between lines, when shown as lines.
    pub every: Duration,
}

impl Show {
    /// Nothing shown.
    pub const OFF: Show = Show {
        display: Display::Off,
        every: Duration::from_secs(10),
    };

    /// `Auto` made definite: a bar when stderr is a terminal, lines otherwise.
    pub(crate) fn resolved(self) -> Display {
        match self.display {
            Display::Auto if std::io::stderr().is_terminal() => Display::Bar,
            Display::Auto => Display::Lines,
            d => d,
        }
    }
}

/// Steps the rates are measured over.
const WINDOW: usize = 20;

/// A run's progress: where it is, how fast it goes, how it is shown.
pub(crate) struct Progress {
    bar: ProgressBar,
    /// Lines every this often, when shown as lines.
    every: Option<Duration>,
    pairs_per_step: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    total: u64,
    step: u64,
    loss: f64,
    /// (when, step) of the latest steps, oldest first.
    recent: VecDeque<(Instant, u64)>,
    last_line: Instant,
}

/// What a run has done and how fast, at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub steps_per_s: f64,
    pub pairs_per_s: f64,
    pub eta: Option<Duration>,
}

impl Progress {
    /// Progress of a run of `total` steps starting at `start`, each of `pairs_per_step` pairs.
    pub(crate) fn new(show: Show, total: u64, start: u64, pairs_per_step: usize) -> Self {
        let display = show.resolved();
        let every = show.every;
        let bar = if display == Display::Bar {
            bar(total)
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(start);
        Self {
            bar,
            every: (display == Display::Lines).then_some(every),
            pairs_per_step,
            inner: Mutex::new(Inner {
                total,
                step: start,
                loss: f64::NAN,
                recent: VecDeque::new(),
                last_line: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run continues from `step` (a resume, or a rollback to a checkpoint): rates start over.
    pub(crate) fn jump(&self, step: u64) {
        let mut p = self.lock();
        p.step = step;
        p.recent.clear();
        self.bar.set_position(step);
    }

    /// The run now ends at `total` (early stopping).
    pub(crate) fn set_total(&self, total: u64) {
        self.lock().total = total;
        self.bar.set_length(total);
    }

    /// Step `step` finished with `loss`; returns the time since the step before it, when known.
    pub(crate) fn step(&self, step: u64, loss: f64) -> Option<Duration> {
        self.step_at(step, loss, Instant::now())
    }

    fn step_at(&self, step: u64, loss: f64, now: Instant) -> Option<Duration> {
        let mut p = self.lock();
        let interval = p.recent.back().map(|(t, _)| now.duration_since(*t));
        p.step = step;
        p.loss = loss;
        p.recent.push_back((now, step));
        if p.recent.len() > WINDOW {
            p.recent.pop_front();
        }
        let snap = snapshot(&p, self.pairs_per_step);
        self.bar
            .set_message(format!("loss {loss:.4}  {:.1} pairs/s", snap.pairs_per_s));
        self.bar.set_position(step);
        if let Some(every) = self.every
            && (now.duration_since(p.last_line) >= every || step >= p.total)
        {
            p.last_line = now;
            tracing::info!(
                step = format_args!("{step}/{}", p.total),
                loss = format_args!("{loss:.4}"),
                pairs_per_s = format_args!("{:.1}", snap.pairs_per_s),
                eta = %snap.eta.map_or("?".into(), format_duration),
                "progress"
            );
        }
        interval
    }

    /// Where the run is and how fast it goes.
    pub(crate) fn snapshot(&self) -> Snapshot {
        snapshot(&self.lock(), self.pairs_per_step)
    }

    /// Runs `f` (which may log) with the bar out of the way.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A bar of `total` steps on stderr, in multipos's style.
pub(crate) fn bar(total: u64) -> ProgressBar {
    ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
        )
        .expect("valid template"),
    )
}

fn snapshot(p: &Inner, pairs_per_step: usize) -> Snapshot {
    let steps_per_s = match (p.recent.front(), p.recent.back()) {
        (Some((t0, s0)), Some((t1, s1))) if s1 > s0 => {
            (s1 - s0) as f64 / t1.duration_since(*t0).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    };
    let left = p.total.saturating_sub(p.step);
    Snapshot {
        step: p.step,
        total: p.total,
        loss: p.loss,
        steps_per_s,
        pairs_per_s: steps_per_s * pairs_per_step as f64,
        eta: (steps_per_s > 0.0 || left == 0)
            .then(|| Duration::from_secs_f64(left as f64 / steps_per_s.max(1e-9))),
    }
}

/// `1h02m03s`, `2m05s`, `7s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, sec) => format!("{h}h{min:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_eta_come_from_the_recent_steps_and_start_over_after_a_jump() {
        let p = Progress::new(Show::OFF, 100, 0, 32);
        let t0 = Instant::now();
        assert_eq!(p.snapshot().eta, None, "no rate before two steps");
        // A slow start, then 2 steps a second: the window forgets the start.
        p.step_at(1, 3.0, t0);
        for s in 2..=40u64 {
            p.step_at(
                s,
                1.0,
                t0 + Duration::from_secs(10) + Duration::from_millis(500 * s),
            );
        }
        let snap = p.snapshot();
        assert!((snap.steps_per_s - 2.0).abs() < 1e-9, "{snap:?}");
        assert!((snap.pairs_per_s - 64.0).abs() < 1e-9);
        assert_eq!(snap.eta, Some(Duration::from_secs(30)));
        assert_eq!((snap.step, snap.total, snap.loss), (40, 100, 1.0));
        p.jump(30);
        assert_eq!(p.snapshot().steps_per_s, 0.0);
        p.set_total(30);
        assert_eq!(p.snapshot().eta, Some(Duration::ZERO), "at the end");
    }

    #[test]
    fn durations_read_as_a_person_writes_them() {
        assert_eq!(format_duration(Duration::from_secs(7)), "7s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
