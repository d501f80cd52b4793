//! Prometheus metrics of the gateway (`glm_gateway_*`), in a registry of its own so the gateway can
//! be embedded or tested without touching the process-wide default registry.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Label used for requests whose model is not routable: client-chosen strings must not become
/// label values, or any client could blow up the metric's cardinality.
pub const UNROUTED: &str = "_unrouted";

#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    ready_models: IntGauge,
    table_updates: IntCounterVec,
}

impl GatewayMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "glm_gateway_requests_total",
                "Requests handled by the gateway, by served model, route and HTTP status",
            ),
            &["model", "route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "glm_gateway_request_duration_seconds",
                "Time from request to the end of the response body (streams included)",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0,
            ]),
            &["model", "route"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "glm_gateway_upstream_errors_total",
                "Failures talking to a model's upstream, by kind (connect, timeout, body)",
            ),
            &["model", "kind"],
        )?;
        let ready_models = IntGauge::new(
            "glm_gateway_ready_models",
            "Names (served names and aliases) currently routable",
        )?;
        let table_updates = IntCounterVec::new(
            Opts::new(
                "glm_gateway_watch_events_total",
                "GLMModel watch events seen by the gateway, by outcome",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(ready_models.clone()))?;
        registry.register(Box::new(table_updates.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
            upstream_errors,
            ready_models,
            table_updates,
        })
    }

    pub fn record_status(&self, model: &str, route: &str, status: u16) {
        self.requests
            .with_label_values(&[model, route, &status.to_string()])
            .inc();
    }

    /// Starts timing a request; the time is recorded when the returned guard drops, which for a
    /// streamed response is when its body ends or the client goes away.
    pub fn timer(&self, model: &str, route: &str) -> RequestTimer {
        RequestTimer {
            histogram: self.duration.with_label_values(&[model, route]),
            start: Instant::now(),
        }
    }

    pub fn upstream_error(&self, model: &str, kind: &str) {
        self.upstream_errors.with_label_values(&[model, kind]).inc();
    }

    pub fn set_ready_models(&self, count: usize) {
        self.ready_models
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn watch_event(&self, outcome: &str) {
        self.table_updates.with_label_values(&[outcome]).inc();
    }

    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

pub struct RequestTimer {
    histogram: prometheus::Histogram,
    start: Instant,
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
