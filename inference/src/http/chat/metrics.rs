//! Per-request chat metrics: prompt tokens, outcomes, time to first token and queueing.
use std::sync::Arc;

use crate::engine::Event;
use crate::metrics::Metrics;

/// Per-request chat metrics. A request dropped before its final event (client gone) counts as
/// `cancelled`.
pub struct Recorder {
    metrics: Arc<Metrics>,
    model: String,
    ended: bool,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>, model: &str) -> Self {
        Recorder {
            metrics,
            model: model.to_owned(),
            ended: false,
        }
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.metrics
            .chat_prompt_tokens
            .with_label_values(&[self.model.as_str()])
            .inc_by(n as u64);
    }

    pub fn observe(&mut self, ev: &Event) {
        let model = self.model.as_str();
        match ev {
            Event::Delta(_) => {}
            Event::Finish { reason, timing, .. } => {
                self.ended = true;
                let m = &self.metrics;
                m.chat_requests
                    .with_label_values(&[model, reason.as_str()])
                    .inc();
                m.chat_time_to_first_token
                    .with_label_values(&[model])
                    .observe(timing.time_to_first_token.as_secs_f64());
                m.chat_queue_duration
                    .with_label_values(&[model])
                    .observe(timing.queued.as_secs_f64());
            }
            Event::Error(_) => {
                self.ended = true;
                self.metrics
                    .chat_requests
                    .with_label_values(&[model, "error"])
                    .inc();
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics
                .chat_requests
                .with_label_values(&[self.model.as_str(), "cancelled"])
                .inc();
        }
    }
}
