//! Prometheus metrics, all named `glm_*`, in one registry rendered by `GET /metrics`.
//! Other parts (the chat engine) register their own collectors in [`Metrics::registry`].
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// HTTP requests by route template, model and status code.
    pub requests: IntCounterVec,
    /// HTTP request latency by route and model.
    pub request_duration: HistogramVec,
    /// Time an embedding input waited in its model's queue before its batch started.
    pub queue_duration: HistogramVec,
    /// Inputs per embedding forward pass.
    pub batch_size: HistogramVec,
    /// Padded tokens (batch size x longest input) per embedding forward pass.
    pub batch_tokens: HistogramVec,
    /// Time of one embedding forward pass.
    pub inference_duration: HistogramVec,
    /// Tokens embedded (unpadded), by model.
    pub embedded_tokens: IntCounterVec,
    /// Inputs waiting in each embedding model's queue.
    pub queue_depth: IntGaugeVec,
    /// Inputs dropped from a queue because their client went away.
    pub cancelled_inputs: IntCounterVec,
    /// 1 when every model is loaded and warmed up and the server is not shutting down.
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency = exponential_buckets(0.001, 2.0, 16)?; // 1 ms .. ~33 s
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "glm_requests_total",
                    "HTTP requests by route, model and status",
                ),
                &["route", "model", "status"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new("glm_request_duration_seconds", "HTTP request latency")
                    .buckets(latency.clone()),
                &["route", "model"],
            )?,
            queue_duration: HistogramVec::new(
                HistogramOpts::new(
                    "glm_queue_duration_seconds",
                    "Time an embedding input waited for its batch",
                )
                .buckets(latency.clone()),
                &["model"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("glm_batch_size", "Inputs per embedding forward pass")
                    .buckets(exponential_buckets(1.0, 2.0, 11)?),
                &["model"],
            )?,
            batch_tokens: HistogramVec::new(
                HistogramOpts::new(
                    "glm_batch_tokens",
                    "Padded tokens per embedding forward pass",
                )
                .buckets(exponential_buckets(16.0, 2.0, 14)?),
                &["model"],
            )?,
            inference_duration: HistogramVec::new(
                HistogramOpts::new(
                    "glm_inference_duration_seconds",
                    "Time of one embedding forward pass",
                )
                .buckets(latency),
                &["model"],
            )?,
            embedded_tokens: IntCounterVec::new(
                Opts::new(
                    "glm_embedded_tokens_total",
                    "Tokens embedded (without padding)",
                ),
                &["model"],
            )?,
            queue_depth: IntGaugeVec::new(
                Opts::new("glm_queue_depth", "Embedding inputs waiting in the queue"),
                &["model"],
            )?,
            cancelled_inputs: IntCounterVec::new(
                Opts::new(
                    "glm_cancelled_inputs_total",
                    "Queued inputs dropped because the client went away",
                ),
                &["model"],
            )?,
            ready: IntGauge::new("glm_ready", "1 when the server accepts traffic")?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.queue_duration.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.batch_tokens.clone()))?;
        m.registry
            .register(Box::new(m.inference_duration.clone()))?;
        m.registry.register(Box::new(m.embedded_tokens.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.cancelled_inputs.clone()))?;
        m.registry.register(Box::new(m.ready.clone()))?;
        Ok(m)
    }

    /// Prometheus text exposition of every registered collector.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_glm_series() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["/v1/embeddings", "minilm", "200"])
            .inc();
        m.batch_size.with_label_values(&["minilm"]).observe(3.0);
        let text = m.render().unwrap();
        assert!(
            text.contains(
                r#"glm_requests_total{model="minilm",route="/v1/embeddings",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("glm_batch_size_bucket"), "{text}");
    }
}
