//! `glm_operator_*` Prometheus metrics.

use std::time::Instant;

use prometheus::{
    histogram_opts, opts, Encoder, HistogramVec, IntCounterVec, IntGauge, Registry, TextEncoder,
};

use crate::error::Error;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub applies: IntCounterVec,
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new().unwrap_or_else(|e| unreachable!("static metric definitions are valid: {e}"))
    }
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            opts!(
                "glm_operator_reconciliations_total",
                "Reconciliations of GLMModels by result (ok, error)"
            ),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            opts!(
                "glm_operator_reconcile_errors_total",
                "Failed reconciliations by error kind"
            ),
            &["error"],
        )?;
        let duration = HistogramVec::new(
            histogram_opts!(
                "glm_operator_reconcile_duration_seconds",
                "Duration of one reconciliation",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
            ),
            &["result"],
        )?;
        let applies = IntCounterVec::new(
            opts!(
                "glm_operator_applies_total",
                "Server-side applies of child objects by kind"
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new(
            "glm_operator_leader",
            "1 while this replica holds the leader lease",
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(applies.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconciliations,
            failures,
            duration,
            applies,
            leader,
        })
    }

    /// Start timing a reconcile; call [`ReconcileTimer::finish`] with the outcome.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which ours are not.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl ReconcileTimer<'_> {
    pub fn finish<T>(self, result: &Result<T, Error>) {
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .duration
            .with_label_values(&[label])
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .reconciliations
            .with_label_values(&[label])
            .inc();
        if let Err(e) = result {
            self.metrics
                .failures
                .with_label_values(&[e.metric_label().as_str()])
                .inc();
        }
    }
}
