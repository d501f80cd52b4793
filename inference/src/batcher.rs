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
        let result = catch_unwind(AssertUnwindSafe(|| self.embedder.embed(&inputs, outputs)));
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
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::models::{EmbedderInfo, ModelError};

    /// Records each batch's input lengths; the first call can be held until the test releases it,
    /// so that the test controls what is queued when the next batches form.
    struct FakeEmbedder {
        info: EmbedderInfo,
        batches: Mutex<Vec<Vec<usize>>>,
        hold_first: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    }

    impl FakeEmbedder {
        /// Returns the embedder, a receiver told when the first batch started, and a sender that
        /// releases it.
        fn held() -> (Arc<Self>, mpsc::Receiver<()>, mpsc::Sender<()>) {
            let (started_tx, started_rx) = mpsc::channel();
            let (release_tx, release_rx) = mpsc::channel();
            let fake = Arc::new(FakeEmbedder {
                info: EmbedderInfo {
                    family: "fake",
                    dimensions: 2,
                    vocab_size: 1 << 20,
                    max_input_tokens: 512,
                    sparse: true,
                    colbert: true,
                },
                batches: Mutex::new(Vec::new()),
                hold_first: Mutex::new(Some((started_tx, release_rx))),
            });
            (fake, started_rx, release_tx)
        }

        fn batches(&self) -> Vec<Vec<usize>> {
            self.batches.lock().unwrap().clone()
        }
    }

    impl Embedder for FakeEmbedder {
        fn info(&self) -> &EmbedderInfo {
            &self.info
        }

        fn embed(
            &self,
            batch: &[&[u32]],
            outputs: EmbedOutputs,
        ) -> Result<Vec<Embedding>, ModelError> {
            if let Some((started, release)) = self.hold_first.lock().unwrap().take() {
                started.send(()).unwrap();
                release.recv_timeout(Duration::from_secs(10)).unwrap();
            }
            self.batches
                .lock()
                .unwrap()
                .push(batch.iter().map(|b| b.len()).collect());
            if batch.iter().any(|b| b.first() == Some(&666)) {
                return Err(ModelError::Unsupported("poisoned input".into()));
            }
            if batch.iter().any(|b| b.first() == Some(&999)) {
                panic!("kaboom");
            }
            Ok(batch
                .iter()
                .map(|ids| Embedding {
                    dense: vec![ids.len() as f32, ids[0] as f32],
                    sparse: outputs.sparse.then(|| vec![(ids[0], 1.0)]),
                    colbert: outputs.colbert.then(|| vec![vec![1.0]]),
                })
                .collect())
        }
    }

    fn batcher(
        fake: Arc<FakeEmbedder>,
        max_batch_tokens: usize,
        max_queued_inputs: usize,
    ) -> (Batcher, Metrics) {
        let metrics = Metrics::new().unwrap();
        let cfg = BatcherConfig {
            max_batch_tokens,
            max_queued_inputs,
        };
        (Batcher::new("fake", fake, cfg, &metrics).unwrap(), metrics)
    }

    fn input(first: u32, len: usize) -> Vec<u32> {
        let mut v = vec![first];
        v.resize(len, 7);
        v
    }

    fn wait(rx: oneshot::Receiver<EmbedResult>) -> EmbedResult {
        rx.blocking_recv().expect("worker dropped the entry")
    }

    #[test]
    fn batches_fill_up_to_the_padded_token_budget() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, metrics) = batcher(fake.clone(), 32, 100);
        let first = b
            .submit(vec![input(1, 4)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        // Queued while the worker is busy: ten inputs of 10 tokens and one of 40 (over budget alone).
        let mut inputs: Vec<Vec<u32>> = (0..10).map(|i| input(10 + i, 10)).collect();
        inputs.push(input(50, 40));
        inputs.push(input(51, 2));
        let rest = b.submit(inputs, EmbedOutputs::default()).unwrap();
        release.send(()).unwrap();
        for rx in first.into_iter().chain(rest) {
            wait(rx).unwrap();
        }
        // 3 x 10 = 30 <= 32 but 4 x 10 > 32; the 40-token input runs alone; then the 2-token one.
        assert_eq!(
            fake.batches(),
            vec![
                vec![4],
                vec![10, 10, 10],
                vec![10, 10, 10],
                vec![10, 10, 10],
                vec![10],
                vec![40],
                vec![2]
            ]
        );
        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"glm_batch_size_count{model="fake"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"glm_embedded_tokens_total{model="fake"} 146"#),
            "{text}"
        );
    }

    #[test]
    fn results_come_back_in_input_order() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, _m) = batcher(fake, 1000, 100);
        let rxs = b
            .submit(
                vec![input(5, 3), input(6, 1), input(7, 2)],
                EmbedOutputs::default(),
            )
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        release.send(()).unwrap();
        let dense: Vec<Vec<f32>> = rxs.into_iter().map(|rx| wait(rx).unwrap().dense).collect();
        assert_eq!(dense, vec![vec![3.0, 5.0], vec![1.0, 6.0], vec![2.0, 7.0]]);
    }

    #[test]
    fn a_full_queue_refuses_the_whole_request() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, _m) = batcher(fake, 1000, 4);
        let first = b
            .submit(vec![input(1, 2)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap(); // the worker holds it: queue empty
        let three = b
            .submit(
                vec![input(2, 2), input(3, 2), input(4, 2)],
                EmbedOutputs::default(),
            )
            .unwrap();
        let err = b
            .submit(vec![input(5, 2), input(6, 2)], EmbedOutputs::default())
            .unwrap_err();
        assert!(
            matches!(
                err,
                BatchError::QueueFull {
                    queued: 3,
                    limit: 4,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("retry"), "{err}");
        let one = b
            .submit(vec![input(7, 2)], EmbedOutputs::default())
            .unwrap();
        release.send(()).unwrap();
        for rx in first.into_iter().chain(three).chain(one) {
            wait(rx).unwrap();
        }
    }

    #[test]
    fn inputs_whose_client_left_are_dropped_before_running() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, metrics) = batcher(fake.clone(), 1000, 100);
        let first = b
            .submit(vec![input(1, 1)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut rxs = b
            .submit(
                vec![input(2, 2), input(3, 3), input(4, 4)],
                EmbedOutputs::default(),
            )
            .unwrap();
        drop(rxs.remove(1)); // the 3-token input's client goes away
        release.send(()).unwrap();
        for rx in first.into_iter().chain(rxs) {
            wait(rx).unwrap();
        }
        assert_eq!(fake.batches(), vec![vec![1], vec![2, 4]]);
        assert!(metrics
            .render()
            .unwrap()
            .contains(r#"glm_cancelled_inputs_total{model="fake"} 1"#));
    }

    #[test]
    fn model_errors_and_panics_fail_the_batch_not_the_worker() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, _m) = batcher(fake, 1000, 100);
        let first = b
            .submit(vec![input(1, 1)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let poisoned = b
            .submit(vec![input(666, 1), input(2, 1)], EmbedOutputs::default())
            .unwrap();
        release.send(()).unwrap();
        wait(first.into_iter().next().unwrap()).unwrap();
        for rx in poisoned {
            let err = wait(rx).unwrap_err();
            assert!(err.to_string().contains("poisoned input"), "{err}");
        }
        let panicking = b
            .submit(vec![input(999, 1)], EmbedOutputs::default())
            .unwrap();
        let err = wait(panicking.into_iter().next().unwrap()).unwrap_err();
        assert!(err.to_string().contains("kaboom"), "{err}");
        let after = b
            .submit(vec![input(3, 1)], EmbedOutputs::default())
            .unwrap();
        assert!(
            wait(after.into_iter().next().unwrap()).is_ok(),
            "worker must survive a panic"
        );
    }

    #[test]
    fn extra_outputs_go_only_to_the_inputs_that_asked() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, _m) = batcher(fake.clone(), 1000, 100);
        let first = b
            .submit(vec![input(1, 1)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let plain = b
            .submit(vec![input(2, 1)], EmbedOutputs::default())
            .unwrap();
        let sparse = b
            .submit(
                vec![input(3, 1)],
                EmbedOutputs {
                    sparse: true,
                    colbert: false,
                },
            )
            .unwrap();
        release.send(()).unwrap();
        wait(first.into_iter().next().unwrap()).unwrap();
        let p = wait(plain.into_iter().next().unwrap()).unwrap();
        let s = wait(sparse.into_iter().next().unwrap()).unwrap();
        assert_eq!(fake.batches()[1], vec![1, 1], "both ran in one batch");
        assert!(p.sparse.is_none() && p.colbert.is_none());
        assert_eq!(s.sparse, Some(vec![(3, 1.0)]));
        assert!(s.colbert.is_none());
    }

    #[test]
    fn dropping_the_batcher_fails_queued_inputs() {
        let (fake, started, release) = FakeEmbedder::held();
        let (b, _m) = batcher(fake, 1000, 100);
        let first = b
            .submit(vec![input(1, 1)], EmbedOutputs::default())
            .unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let queued = b
            .submit(vec![input(2, 1)], EmbedOutputs::default())
            .unwrap();
        drop(b);
        release.send(()).unwrap();
        assert!(
            wait(first.into_iter().next().unwrap()).is_ok(),
            "the running batch finishes"
        );
        let rx = queued.into_iter().next().unwrap();
        assert!(
            rx.blocking_recv().is_err(),
            "queued input is dropped, its receiver sees closure"
        );
    }
}
