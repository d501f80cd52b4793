//! `glm_operator_*` Prometheus metrics.

use std::time::Instant;

use prometheus::{
    histogram_opts, opts, Encoder, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
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
    pub autoscaler_desired: IntGaugeVec,
    pub autoscaler_demand: GaugeVec,
    pub autoscaler_scrape_errors: IntCounterVec,
    pub autoscaler_gateways: IntGauge,
    pub autoscaler_scale_errors: IntCounter,
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
        let autoscaler_desired = IntGaugeVec::new(
            opts!(
                "glm_operator_autoscaler_desired_replicas",
                "Replicas the autoscaler wants for a GLMModel"
            ),
            &["namespace", "model"],
        )?;
        let autoscaler_demand = GaugeVec::new(
            opts!(
                "glm_operator_autoscaler_demand",
                "Requests in flight plus held at the gateways for a GLMModel, last scrape"
            ),
            &["namespace", "model"],
        )?;
        let autoscaler_scrape_errors = IntCounterVec::new(
            opts!(
                "glm_operator_autoscaler_scrape_errors_total",
                "Gateway scrapes that failed (the replica is skipped for that tick), by reason"
            ),
            &["reason"],
        )?;
        let autoscaler_gateways = IntGauge::new(
            "glm_operator_autoscaler_gateways",
            "Gateway replicas that answered the last scrape",
        )?;
        let autoscaler_scale_errors = IntCounter::new(
            "glm_operator_autoscaler_scale_errors_total",
            "Scale writes that failed (other than conflicts, which are decided again)",
        )?;
        registry.register(Box::new(autoscaler_desired.clone()))?;
        registry.register(Box::new(autoscaler_demand.clone()))?;
        registry.register(Box::new(autoscaler_scrape_errors.clone()))?;
        registry.register(Box::new(autoscaler_gateways.clone()))?;
        registry.register(Box::new(autoscaler_scale_errors.clone()))?;
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
            autoscaler_desired,
            autoscaler_demand,
            autoscaler_scrape_errors,
            autoscaler_gateways,
            autoscaler_scale_errors,
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
