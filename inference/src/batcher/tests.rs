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

    fn embed(&self, batch: &[&[u32]], outputs: EmbedOutputs) -> Result<Vec<Embedding>, ModelError> {
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
