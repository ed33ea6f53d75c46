//! Which evaluation was the best so far, and when to stop early (`eval.metric`,
//! `eval.greater_is_better`, `eval.patience`): a pure record of the evaluations a run has made, so
//! a resumed run rebuilds it from its log (docs/design.md §12).
use std::collections::BTreeMap;

use crate::config::EvalConfig;
use crate::train::metrics::MetricsLog;

/// What an evaluation means for the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// A new best (the first evaluation always is).
    Improved,
    /// Not better than the best; `stop` once `patience` evaluations in a row were not.
    NotBetter { stop: bool },
}

/// The best evaluation so far and how many evaluations came after it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tracker {
    metric: String,
    greater_is_better: bool,
    patience: u64,
    /// (step, value) of the best evaluation.
    pub best: Option<(u64, f64)>,
    /// Evaluations since the best.
    pub since_best: u64,
    /// The step of the latest evaluation.
    pub last: Option<u64>,
}

impl Tracker {
    /// A tracker for the config's metric and patience.
    pub(crate) fn new(cfg: &EvalConfig) -> Self {
        Self {
            metric: cfg.metric.clone(),
            greater_is_better: cfg.greater_is_better,
            patience: cfg.patience,
            best: None,
            since_best: 0,
            last: None,
        }
    }

    /// Records the evaluation of `step`; an unknown metric is an error naming the known ones.
    pub(crate) fn observe(
        &mut self,
        step: u64,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<Verdict, String> {
        let value = *metrics.get(&self.metric).ok_or_else(|| {
            format!(
                "eval.metric = {:?} is not a metric the evaluator reports; known: {}",
                self.metric,
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        self.last = Some(step);
        let better = match self.best {
            None => true,
            Some((_, b)) if self.greater_is_better => value > b,
            Some((_, b)) => value < b,
        };
        if better {
            self.best = Some((step, value));
            self.since_best = 0;
            return Ok(Verdict::Improved);
        }
        self.since_best += 1;
        Ok(Verdict::NotBetter {
            stop: self.patience > 0 && self.since_best >= self.patience,
        })
    }

    /// The tracker of a run with an eval set (`cfg`), with the evaluations its log holds up to
    /// `resumed` (the step a resumed run starts from) replayed.
    pub(crate) fn resumed(
        cfg: Option<&EvalConfig>,
        resumed: Option<u64>,
        log: &mut MetricsLog,
    ) -> crate::Result<Option<Self>> {
        let mut tracker = cfg.map(Self::new);
        if let Some(t) = tracker.as_mut()
            && let Some(step) = resumed
        {
            let text = String::from_utf8_lossy(&log.contents()?).into_owned();
            t.replay(&text, step).map_err(crate::Error::Usage)?;
        }
        Ok(tracker)
    }

    /// Rebuilds the record from a run's logged `eval` events up to `step` (inclusive).
    pub(crate) fn replay(&mut self, log: &str, step: u64) -> Result<(), String> {
        for v in log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let at = v["step"].as_u64();
            if v["event"] == "eval" && at.is_some_and(|s| s <= step) {
                let metrics: BTreeMap<String, f64> = serde_json::from_value(v["metrics"].clone())
                    .map_err(|e| format!("a logged eval: {e}"))?;
                self.observe(at.expect("checked"), &metrics)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(greater: bool, patience: u64) -> EvalConfig {
        EvalConfig {
            queries: "q".into(),
            corpus: "c".into(),
            qrels: "r".into(),
            every_steps: 1,
            at_start: true,
            batch_size: 8,
            metric: "ndcg@10".into(),
            greater_is_better: greater,
            patience,
            keep_best: true,
        }
    }

    fn m(v: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("ndcg@10".to_string(), v)])
    }

    #[test]
    fn patience_counts_evaluations_without_a_new_best() {
        let mut t = Tracker::new(&cfg(true, 2));
        assert_eq!(t.observe(0, &m(0.5)), Ok(Verdict::Improved));
        assert_eq!(t.observe(2, &m(0.6)), Ok(Verdict::Improved));
        assert_eq!(
            t.observe(4, &m(0.6)),
            Ok(Verdict::NotBetter { stop: false }),
            "equal is not better"
        );
        assert_eq!(
            t.observe(6, &m(0.55)),
            Ok(Verdict::NotBetter { stop: true })
        );
        assert_eq!(t.best, Some((2, 0.6)));
        let mut lower = Tracker::new(&cfg(false, 0));
        lower.observe(0, &m(0.5)).unwrap();
        assert_eq!(lower.observe(1, &m(0.4)), Ok(Verdict::Improved));
        assert_eq!(
            lower.observe(2, &m(0.9)),
            Ok(Verdict::NotBetter { stop: false }),
            "no patience, no stop"
        );
        let err = lower
            .observe(3, &BTreeMap::from([("mrr@10".to_string(), 1.0)]))
            .unwrap_err();
        assert!(err.contains("known: mrr@10"), "{err}");
    }

    #[test]
    fn a_resumed_run_rebuilds_the_record_from_its_log() {
        let log = "{\"event\":\"step\",\"step\":1}\n\
                   {\"event\":\"eval\",\"step\":0,\"metrics\":{\"ndcg@10\":0.5}}\n\
                   {\"event\":\"eval\",\"step\":2,\"metrics\":{\"ndcg@10\":0.7}}\n\
                   {\"event\":\"eval\",\"step\":4,\"metrics\":{\"ndcg@10\":0.6}}\n\
                   {\"event\":\"eval\",\"step\":6,\"metrics\":{\"ndcg@10\":0.9}}\n";
        let mut t = Tracker::new(&cfg(true, 3));
        t.replay(log, 4).unwrap();
        assert_eq!((t.best, t.since_best), (Some((2, 0.7)), 1));
    }
}
