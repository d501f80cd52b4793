//! Dynamic batching for embedding models, after text-embeddings-inference's `queue.rs`:
//! - admission is bounded: a request whose inputs do not fit in the queue is refused at once (429)
//!   instead of waiting behind an unbounded backlog;
//! - one FIFO per model; each forward pass takes inputs from the front while the padded size
//!   (batch size x longest input) stays within `max_batch_tokens`;
//! - inputs whose client went away (receiver dropped) are dropped before they cost a forward pass;
//! - the model runs on a dedicated OS thread, never on the async runtime, so a long batch cannot
//!   stall HTTP handling.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::models::{EmbedOutputs, Embedder, Embedding};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Budget of one forward pass in padded tokens; a single longer input still runs alone.
    pub max_batch_tokens: usize,
    /// Inputs allowed to wait in the queue.
    pub max_queued_inputs: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch_tokens: 16384,
            max_queued_inputs: 4096,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("model `{model}` is overloaded: {queued} inputs already queued, the queue holds {limit}; retry later")]
    QueueFull {
        model: String,
        queued: usize,
        limit: usize,
    },
    #[error("model `{model}` failed: {msg}")]
    Model { model: String, msg: String },
    #[error("the server is shutting down")]
    ShuttingDown,
}

pub type EmbedResult = Result<Embedding, BatchError>;

struct Entry {
    ids: Vec<u32>,
    outputs: EmbedOutputs,
    enqueued: Instant,
    tx: oneshot::Sender<EmbedResult>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Entry>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    /// A panic while holding the lock cannot leave the queue half-updated (every update is a single
    /// push/pop), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Metric children bound to one model's label.
struct BatchMetrics {
    queue_duration: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    inference_duration: Histogram,
    embedded_tokens: IntCounter,
    queue_depth: IntGauge,
    cancelled: IntCounter,
}

impl BatchMetrics {
    fn new(m: &Metrics, model: &str) -> Self {
        let l = &[model];
        BatchMetrics {
            queue_duration: m.queue_duration.with_label_values(l),
            batch_size: m.batch_size.with_label_values(l),
            batch_tokens: m.batch_tokens.with_label_values(l),
            inference_duration: m.inference_duration.with_label_values(l),
            embedded_tokens: m.embedded_tokens.with_label_values(l),
            queue_depth: m.queue_depth.with_label_values(l),
            cancelled: m.cancelled_inputs.with_label_values(l),
        }
    }
}

/// The queue and worker thread of one embedding model. Dropping it stops the worker; inputs still
/// queued then fail with [`BatchError::ShuttingDown`].
pub struct Batcher {
    model: String,
    config: BatcherConfig,
    shared: Arc<Shared>,
    queue_depth: IntGauge,
    liveness: Liveness,
}

impl Batcher {
    pub fn new(
        model: &str,
        embedder: Arc<dyn Embedder>,
        config: BatcherConfig,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let worker = Worker {
            model: model.to_string(),
            embedder,
            config,
            shared: shared.clone(),
            metrics: BatchMetrics::new(metrics, model),
        };
        let (liveness, alive) = Liveness::new(format!("embedding batcher `{model}`"));
        std::thread::Builder::new()
            .name(format!("embed-{model}"))
            .spawn(move || {
                let _alive = alive;
                worker.run()
            })?;
        Ok(Batcher {
            model: model.to_string(),
            config,
            shared,
            queue_depth: metrics.queue_depth.with_label_values(&[model]),
            liveness,
        })
    }

    /// Queue tokenized inputs (all or none) and return one receiver per input, in order.
    /// Dropping a receiver cancels that input if its batch has not started.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
        outputs: EmbedOutputs,
    ) -> Result<Vec<oneshot::Receiver<EmbedResult>>, BatchError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(BatchError::ShuttingDown);
        }
        let queued = state.queue.len();
        if queued + inputs.len() > self.config.max_queued_inputs {
            return Err(BatchError::QueueFull {
                model: self.model.clone(),
                queued,
                limit: self.config.max_queued_inputs,
            });
        }
        let now = Instant::now();
        let receivers = inputs
            .into_iter()
            .map(|ids| {
                let (tx, rx) = oneshot::channel();
                state.queue.push_back(Entry {
                    ids,
                    outputs,
                    enqueued: now,
                    tx,
                });
                rx
            })
            .collect();
        self.queue_depth.set(state.queue.len() as i64);
        drop(state);
        self.shared.wake.notify_one();
        Ok(receivers)
    }

    /// Embed tokenized inputs through the queue; results are in input order.
    pub async fn embed(
        &self,
        inputs: Vec<Vec<u32>>,
        outputs: EmbedOutputs,
    ) -> Result<Vec<Embedding>, BatchError> {
        let receivers = self.submit(inputs, outputs)?;
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            out.push(rx.await.map_err(|_| BatchError::ShuttingDown)??);
        }
        Ok(out)
    }

    pub fn config(&self) -> BatcherConfig {
        self.config
    }

    /// False once the worker thread has stopped (a panic outside the forward pass's guard).
    pub fn is_alive(&self) -> bool {
        self.liveness.is_alive()
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

struct Worker {
    model: String,
    embedder: Arc<dyn Embedder>,
    config: BatcherConfig,
    shared: Arc<Shared>,
    metrics: BatchMetrics,
}

impl Worker {
    fn run(self) {
        while let Some(batch) = self.next_batch() {
            self.run_batch(batch);
        }
        tracing::debug!(model = %self.model, "embedding worker stopped");
    }

    /// Block until there is work, then take the longest FIFO prefix that fits the token budget.
    fn next_batch(&self) -> Option<Vec<Entry>> {
        let mut state = self.shared.lock();
        loop {
            if state.closed {
                return None;
            }
            let batch = self.take_batch(&mut state.queue);
            self.metrics.queue_depth.set(state.queue.len() as i64);
            if !batch.is_empty() {
                return Some(batch);
            }
            state = self
                .shared
                .wake
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn take_batch(&self, queue: &mut VecDeque<Entry>) -> Vec<Entry> {
        let mut batch: Vec<Entry> = Vec::new();
        let mut longest = 0;
        while let Some(entry) = queue.pop_front() {
            if entry.tx.is_closed() {
                self.metrics.cancelled.inc();
                continue;
            }
            let padded_len = longest.max(entry.ids.len());
            if !batch.is_empty() && (batch.len() + 1) * padded_len > self.config.max_batch_tokens {
                queue.push_front(entry);
                break;
            }
            longest = padded_len;
            batch.push(entry);
        }
        batch
    }

    fn run_batch(&self, batch: Vec<Entry>) {
        let started = Instant::now();
        let longest = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let tokens: usize = batch.iter().map(|e| e.ids.len()).sum();
        for e in &batch {
            self.metrics
                .queue_duration
                .observe(started.duration_since(e.enqueued).as_secs_f64());
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        self.metrics
            .batch_tokens
            .observe((batch.len() * longest) as f64);

        // Entries of one batch may want different outputs: compute the union once, strip per entry.
        let outputs = batch
            .iter()
            .fold(EmbedOutputs::default(), |acc, e| EmbedOutputs {
                sparse: acc.sparse || e.outputs.sparse,
                colbert: acc.colbert || e.outputs.colbert,
            });
        let inputs: Vec<&[u32]> = batch.iter().map(|e| e.ids.as_slice()).collect();
        let embedder = &self.embedder;
        let pass = || crate::kernels::on_pool(|| embedder.embed(&inputs, outputs));
        let result = catch_unwind(AssertUnwindSafe(pass));
        self.metrics
            .inference_duration
            .observe(started.elapsed().as_secs_f64());

        let error = |msg: String| BatchError::Model {
            model: self.model.clone(),
            msg,
        };
        match result {
            Ok(Ok(embeddings)) if embeddings.len() == batch.len() => {
                self.metrics.embedded_tokens.inc_by(tokens as u64);
                for (entry, mut emb) in batch.into_iter().zip(embeddings) {
                    if !entry.outputs.sparse {
                        emb.sparse = None;
                    }
                    if !entry.outputs.colbert {
                        emb.colbert = None;
                    }
                    // The client may have gone meanwhile; nothing to do then.
                    let _ = entry.tx.send(Ok(emb));
                }
            }
            Ok(Ok(embeddings)) => {
                let msg = format!(
                    "returned {} embeddings for {} inputs",
                    embeddings.len(),
                    batch.len()
                );
                fail_all(batch, error(msg));
            }
            Ok(Err(e)) => fail_all(batch, error(e.to_string())),
            Err(panic) => {
                let msg = crate::error::panic_message(panic.as_ref());
                tracing::error!(model = %self.model, %msg, "embedding forward pass panicked");
                fail_all(batch, error(format!("forward pass panicked: {msg}")));
            }
        }
    }
}

fn fail_all(batch: Vec<Entry>, err: BatchError) {
    for entry in batch {
        let _ = entry.tx.send(Err(err.clone()));
    }
}

#[cfg(test)]
mod tests;
