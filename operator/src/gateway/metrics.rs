//! Prometheus metrics of the gateway (`glm_gateway_*`), in a registry of its own so the gateway can
//! be embedded or tested without touching the process-wide default registry.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    models: ModelMetrics,
}

/// Per-model series, labelled `namespace` and `model` (the GLMModel's `metadata.name`): the
/// operator's autoscaler sums them over gateway replicas, so their names and labels are a
/// contract (README, "Gateway metrics").
#[derive(Clone)]
struct ModelMetrics {
    in_flight: IntGaugeVec,
    held: IntGaugeVec,
    requests: IntCounterVec,
    upstream_duration: HistogramVec,
    retries: IntCounterVec,
    scale_ups: IntCounterVec,
    api_key_requests: IntCounterVec,
}

impl ModelMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let labels = &["namespace", "model"];
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "glm_gateway_model_in_flight",
                "Requests this gateway replica is proxying to the model's pods (streams included)",
            ),
            labels,
        )?;
        let held = IntGaugeVec::new(
            Opts::new(
                "glm_gateway_model_held",
                "Requests held waiting for a ready pod of the model (scale from zero, rollouts)",
            ),
            labels,
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "glm_gateway_model_requests_total",
                "Requests routed to the model, counted at arrival (held ones included)",
            ),
            labels,
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "glm_gateway_upstream_duration_seconds",
                "Time from sending a request to a pod to its response headers, per attempt",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            labels,
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "glm_gateway_retries_total",
                "Requests sent again to another pod after a failed connection or a 503/429",
            ),
            labels,
        )?;
        let scale_ups = IntCounterVec::new(
            Opts::new(
                "glm_gateway_scale_from_zero_total",
                "Scale-subresource patches 0 -> 1 made by this gateway, by outcome",
            ),
            &["namespace", "model", "outcome"],
        )?;
        let api_key_requests = IntCounterVec::new(
            Opts::new(
                "glm_gateway_api_key_requests_total",
                "Requests by API key name (the Secret's data key, never the key itself) and outcome",
            ),
            &["key", "outcome"],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(scale_ups.clone()))?;
        registry.register(Box::new(api_key_requests.clone()))?;
        Ok(Self {
            in_flight,
            held,
            requests,
            upstream_duration,
            retries,
            scale_ups,
            api_key_requests,
        })
    }
}

/// Identifies a GLMModel in the per-model series.
#[derive(Clone, Debug)]
pub struct ModelLabels {
    pub namespace: String,
    pub model: String,
}

impl ModelLabels {
    fn values(&self) -> [&str; 2] {
        [&self.namespace, &self.model]
    }
}

/// Raises a gauge for as long as it lives.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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
        let models = ModelMetrics::new(&registry)?;
        Ok(Self {
            models,
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

    pub fn model_request(&self, labels: &ModelLabels) {
        self.models
            .requests
            .with_label_values(&labels.values())
            .inc();
    }

    pub fn in_flight(&self, labels: &ModelLabels) -> GaugeGuard {
        GaugeGuard::new(self.models.in_flight.with_label_values(&labels.values()))
    }

    pub fn held(&self, labels: &ModelLabels) -> GaugeGuard {
        GaugeGuard::new(self.models.held.with_label_values(&labels.values()))
    }

    pub fn upstream_duration(&self, labels: &ModelLabels, seconds: f64) {
        self.models
            .upstream_duration
            .with_label_values(&labels.values())
            .observe(seconds);
    }

    pub fn retry(&self, labels: &ModelLabels) {
        self.models
            .retries
            .with_label_values(&labels.values())
            .inc();
    }

    pub fn scale_up(&self, labels: &ModelLabels, outcome: &str) {
        self.models
            .scale_ups
            .with_label_values(&[&labels.namespace, &labels.model, outcome])
            .inc();
    }

    pub fn api_key(&self, key_name: &str, outcome: &str) {
        self.models
            .api_key_requests
            .with_label_values(&[key_name, outcome])
            .inc();
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
