//! The coordinator's Prometheus metrics (`cluster.metrics_bind`): what the run is doing, how fast,
//! where its time goes, and how the cluster holds up. Exposed in the text format on `/metrics`.
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Real = Gauge<f64, AtomicU64>;
type Labels = Vec<(&'static str, String)>;

/// Every metric of a run, updated by the coordinator as things happen.
pub(crate) struct Metrics {
    registry: Registry,
    step: Gauge,
    total_steps: Gauge,
    loss: Real,
    lr: Real,
    pairs_per_second: Real,
    step_seconds: Family<Labels, Real>,
    workers_alive: Gauge,
    workers_wanted: Gauge,
    generation: Gauge,
    rings_formed: Counter,
    heals: Counter,
    checkpoint_step: Gauge,
    checkpoint_age_seconds: Real,
    eval: Family<Labels, Real>,
}

/// Where the latest step's wall time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub compute: f64,
    pub all_gather: f64,
    pub all_reduce: f64,
    /// Neither computing nor in a collective: handing out the step, committing, stragglers.
    pub waiting: f64,
}

impl Metrics {
    /// A registry of the run's metrics, all at zero.
    pub(crate) fn new(workers_wanted: usize, total_steps: u64) -> Self {
        let mut m = Self {
            step: Gauge::default(),
            total_steps: Gauge::default(),
            loss: Real::default(),
            lr: Real::default(),
            pairs_per_second: Real::default(),
            step_seconds: Family::default(),
            workers_alive: Gauge::default(),
            workers_wanted: Gauge::default(),
            generation: Gauge::default(),
            rings_formed: Counter::default(),
            heals: Counter::default(),
            checkpoint_step: Gauge::default(),
            checkpoint_age_seconds: Real::default(),
            eval: Family::default(),
            registry: Registry::with_prefix("multipos"),
        };
        let r = &mut m.registry;
        r.register("step", "Global steps committed", m.step.clone());
        r.register(
            "total_steps",
            "The step the run ends at",
            m.total_steps.clone(),
        );
        r.register("loss", "Loss of the latest step", m.loss.clone());
        r.register(
            "learning_rate",
            "Learning rate of the latest step",
            m.lr.clone(),
        );
        r.register(
            "pairs_per_second",
            "Training pairs per second over the latest steps (wall clock)",
            m.pairs_per_second.clone(),
        );
        r.register(
            "step_seconds",
            "Wall time of the latest step by part: compute, all_gather, all_reduce, waiting",
            m.step_seconds.clone(),
        );
        r.register(
            "workers_alive",
            "Members of the live ring",
            m.workers_alive.clone(),
        );
        r.register(
            "workers_wanted",
            "cluster.workers",
            m.workers_wanted.clone(),
        );
        r.register("generation", "The ring's generation", m.generation.clone());
        r.register("rings_formed", "Rings formed; every one after the first is a restart after a failure, a stop or a grown cluster", m.rings_formed.clone());
        r.register(
            "heals",
            "Members that healed from a peer or a checkpoint before their ring's first step",
            m.heals.clone(),
        );
        r.register(
            "checkpoint_step",
            "Step of the newest checkpoint (0: none)",
            m.checkpoint_step.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Age of the newest checkpoint (-1: none)",
            m.checkpoint_age_seconds.clone(),
        );
        r.register(
            "eval",
            "Validation metrics of the latest evaluation",
            m.eval.clone(),
        );
        m.workers_wanted.set(workers_wanted as i64);
        m.total_steps.set(total_steps as i64);
        m.checkpoint_age_seconds.set(-1.0);
        m
    }

    /// Step `step` committed.
    pub(crate) fn step(
        &self,
        step: u64,
        loss: f64,
        lr: f64,
        pairs_per_second: f64,
        times: StepTimes,
    ) {
        self.step.set(step as i64);
        self.loss.set(loss);
        self.lr.set(lr);
        self.pairs_per_second.set(pairs_per_second);
        for (part, seconds) in [
            ("compute", times.compute),
            ("all_gather", times.all_gather),
            ("all_reduce", times.all_reduce),
            ("waiting", times.waiting),
        ] {
            self.step_seconds
                .get_or_create(&vec![("part", part.to_string())])
                .set(seconds);
        }
    }

    /// A ring formed: its generation, size, how many members heal, and where it starts.
    pub(crate) fn ring_formed(&self, generation: u64, workers: usize, healing: usize, start: u64) {
        self.generation.set(generation as i64);
        self.workers_alive.set(workers as i64);
        self.rings_formed.inc();
        self.heals.inc_by(healing as u64);
        self.step.set(start as i64);
    }

    /// The ring broke up: nobody trains until the next one forms.
    pub(crate) fn ring_ended(&self) {
        self.workers_alive.set(0);
    }

    /// The run now ends at `total` (early stopping).
    pub(crate) fn total_steps(&self, total: u64) {
        self.total_steps.set(total as i64);
    }

    /// An evaluation's metrics.
    pub(crate) fn eval(&self, metrics: &BTreeMap<String, f64>) {
        for (name, value) in metrics {
            self.eval
                .get_or_create(&vec![("metric", name.clone())])
                .set(*value);
        }
    }

    /// The text exposition, with the newest checkpoint as it is now.
    pub(crate) fn encode(&self, checkpoint: Option<(u64, f64)>) -> String {
        let (step, age) = checkpoint.unwrap_or((0, -1.0));
        self.checkpoint_step.set(step as i64);
        self.checkpoint_age_seconds.set(age);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_exposition_carries_every_metric_as_last_set() {
        let m = Metrics::new(4, 100);
        m.ring_formed(7, 4, 1, 0);
        m.step(
            12,
            0.5,
            2e-5,
            96.0,
            StepTimes {
                compute: 0.25,
                all_gather: 0.125,
                all_reduce: 0.5,
                waiting: 0.0625,
            },
        );
        m.eval(&BTreeMap::from([("ndcg@10".to_string(), 0.75)]));
        m.ring_formed(8, 3, 2, 10);
        m.step(11, 0.25, 2e-5, 90.0, StepTimes::default());
        let text = m.encode(Some((10, 4.5)));
        assert_eq!(value(&text, "multipos_step"), 11.0);
        assert_eq!(value(&text, "multipos_total_steps"), 100.0);
        assert_eq!(value(&text, "multipos_loss"), 0.25);
        assert_eq!(value(&text, "multipos_workers_alive"), 3.0);
        assert_eq!(value(&text, "multipos_workers_wanted"), 4.0);
        assert_eq!(value(&text, "multipos_generation"), 8.0);
        assert_eq!(value(&text, "multipos_rings_formed_total"), 2.0);
        assert_eq!(value(&text, "multipos_heals_total"), 3.0);
        assert_eq!(value(&text, "multipos_checkpoint_step"), 10.0);
        assert_eq!(value(&text, "multipos_checkpoint_age_seconds"), 4.5);
        assert_eq!(value(&text, "multipos_eval{metric=\"ndcg@10\"}"), 0.75);
        assert_eq!(value(&text, "multipos_step_seconds{part=\"compute\"}"), 0.0);
        assert!(text.ends_with("# EOF\n"), "{text}");
        let none = m.encode(None);
        assert_eq!(value(&none, "multipos_checkpoint_age_seconds"), -1.0);
    }
}
