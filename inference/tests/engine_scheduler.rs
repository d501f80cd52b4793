//! The continuous-batching engine against a mock model whose logits are a pure function of the
//! token history: batching, chunked prefill, cancellation, admission control, stop handling, seeds.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glm_inference::engine::{
    ChatEngine, EngineConfig, EngineError, Event, FinishReason, GenerateRequest, SamplingParams,
    StopParams,
};
use glm_inference::models::{
    BlockAllocator, CausalLM, CausalLMInfo, LoadedChat, ModelError, SeqStep, Tensor,
};
use tokenizers::Tokenizer;

const EOS: u32 = 556; // qwen2 fixture's <｜end▁of▁sentence｜>

/// Logits: a peak of 8.0 at `script[generated position]` over pseudo-random values in [0, 1) that
/// depend on every token seen so far. The mock keeps each cache's token history so that it can
/// check that the engine feeds each sequence its own tokens at the right positions, and grows the
/// cache's blocks as a real model does (failing if the engine reserved too little).
struct Mock {
    info: CausalLMInfo,
    script: Vec<u32>,
    prompt_len: usize,
    delay: Duration,
    batch_sizes: Mutex<Vec<usize>>,
    forwards: AtomicUsize,
    kv: Arc<BlockAllocator>,
    histories: Mutex<HashMap<u64, Vec<u32>>>,
}

impl Mock {
    fn new(script: Vec<u32>, prompt_len: usize, vocab: usize, delay: Duration) -> Arc<Self> {
        Self::with_kv(script, prompt_len, vocab, delay, 4096)
    }

    fn with_kv(
        script: Vec<u32>,
        prompt_len: usize,
        vocab: usize,
        delay: Duration,
        kv_positions: usize,
    ) -> Arc<Self> {
        Arc::new(Mock {
            info: CausalLMInfo {
                family: "mock",
                vocab_size: vocab,
                max_context: 64,
                weight_bytes: 0,
            },
            script,
            prompt_len,
            delay,
            batch_sizes: Mutex::new(Vec::new()),
            forwards: AtomicUsize::new(0),
            kv: BlockAllocator::new(kv_positions.div_ceil(16), 16),
            histories: Mutex::new(HashMap::new()),
        })
    }

    fn max_batch(&self) -> usize {
        self.batch_sizes
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

impl CausalLM for Mock {
    fn info(&self) -> &CausalLMInfo {
        &self.info
    }

    fn kv_blocks(&self) -> &Arc<BlockAllocator> {
        &self.kv
    }

    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        std::thread::sleep(self.delay);
        self.forwards.fetch_add(1, Ordering::SeqCst);
        self.batch_sizes.lock().unwrap().push(steps.len());
        let vocab = self.info.vocab_size;
        let mut rows = Vec::with_capacity(steps.len() * vocab);
        for step in steps.iter_mut() {
            let mut histories = self.histories.lock().unwrap();
            let h = histories.entry(step.cache.id()).or_default();
            assert_eq!(h.len(), step.cache.len, "cache length and history disagree");
            h.extend_from_slice(step.tokens);
            step.cache.grow(h.len())?;
            step.cache.len = h.len();
            let h = h.clone();
            drop(histories);
            let mut seed = h.iter().fold(1469598103934665603u64, |acc, &x| {
                (acc ^ x as u64).wrapping_mul(1099511628211)
            });
            let peak = h
                .len()
                .checked_sub(self.prompt_len)
                .and_then(|i| self.script.get(i))
                .copied();
            for i in 0..vocab {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (seed >> 40) as f32 / (1u64 << 24) as f32;
                rows.push(if Some(i as u32) == peak { 8.0 } else { noise });
            }
        }
        Ok(Tensor::from_vec(
            rows,
            (steps.len(), vocab),
            &candle_core::Device::Cpu,
        )?)
    }
}

fn tokenizer() -> Tokenizer {
    let root = std::env::var("GLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into());
    let dir = std::path::Path::new(&root).join("tiny/qwen2");
    glm_inference::tokenizer::load_tokenizer(&dir)
        .unwrap_or_else(|e| panic!("{e}: fixture tiny/qwen2 is needed (GLM_FIXTURES_DIR)"))
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn start(mock: Arc<Mock>, config: EngineConfig) -> ChatEngine {
    let tokenizer = tokenizer();
    let loaded = LoadedChat {
        model: mock,
        tokenizer,
        chat_template: None,
        bos_token: None,
        eos_token: None,
        eos_token_ids: vec![EOS],
    };
    ChatEngine::start("mock", loaded, config).unwrap()
}

fn request(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        sampling: SamplingParams::default(),
        stop: StopParams {
            max_tokens: Some(max_tokens),
            skip_special_tokens: true,
            ..Default::default()
        },
        reasoning: None,
    }
}

struct Outcome {
    deltas: Vec<String>,
    reason: FinishReason,
    completion_tokens: usize,
}

impl Outcome {
    fn text(&self) -> String {
        self.deltas.concat()
    }
}

async fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Outcome {
    let mut deltas = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Delta(d) => deltas.push(d.content),
            Event::Finish { reason, usage, .. } => {
                return Outcome {
                    deltas,
                    reason,
                    completion_tokens: usage.completion_tokens,
                }
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("channel closed without a finish event");
}

const PROMPT: &str = "Question: what is six times seven?";

fn setup(script_text: &str, delay_ms: u64) -> (Arc<Mock>, Vec<u32>, Vec<u32>) {
    let tok = tokenizer();
    let prompt = encode(&tok, PROMPT);
    let script = encode(&tok, script_text);
    let mock = Mock::new(
        script.clone(),
        prompt.len(),
        tok.get_vocab_size(true),
        Duration::from_millis(delay_ms),
    );
    (mock, prompt, script)
}

#[tokio::test]
async fn concurrent_requests_share_forward_passes() {
    let (mock, prompt, script) = setup("The answer is forty-two, said the machine.", 15);
    let engine = start(
        mock.clone(),
        EngineConfig {
            max_batch_size: 4,
            max_batch_tokens: 256,
            max_waiting: 8,
        },
    );
    let gens: Vec<_> = (0..4)
        .map(|_| engine.submit(request(&prompt, script.len())).unwrap())
        .collect();
    let outcomes = futures::future::join_all(gens.into_iter().map(|g| collect(g.events))).await;
    for o in &outcomes {
        assert_eq!(o.text(), "The answer is forty-two, said the machine.");
        assert_eq!(o.reason, FinishReason::Length);
        assert_eq!(o.completion_tokens, script.len());
    }
    assert!(
        mock.max_batch() >= 2,
        "requests were never batched: {:?}",
        mock.batch_sizes.lock().unwrap()
    );
    // alone, each request needs 1 prefill + (n-1) decode passes
    assert!(
        mock.forwards.load(Ordering::SeqCst) < 4 * script.len(),
        "no sharing of forward passes"
    );
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_with_the_same_result() {
    let (mock, prompt, script) = setup("Forty-two.", 0);
    assert!(prompt.len() > 3);
    let engine = start(
        mock.clone(),
        EngineConfig {
            max_batch_size: 2,
            max_batch_tokens: 3,
            max_waiting: 8,
        },
    );
    // The mock only peaks on the scripted tokens: stop there (past them it emits noise).
    let out = collect(
        engine
            .submit(request(&prompt, script.len()))
            .unwrap()
            .events,
    )
    .await;
    assert_eq!(out.text(), "Forty-two.");
    let sizes = mock.batch_sizes.lock().unwrap().clone();
    assert!(
        sizes.len() >= prompt.len().div_ceil(3),
        "prompt of {} tokens was not chunked: {sizes:?}",
        prompt.len()
    );
}

#[tokio::test]
async fn eos_finishes_with_stop_and_its_text_is_not_emitted() {
    let tok = tokenizer();
    let prompt = encode(&tok, PROMPT);
    let mut script = encode(&tok, "Forty-two.");
    script.push(EOS);
    script.extend(encode(&tok, " never"));
    let mock = Mock::new(
        script.clone(),
        prompt.len(),
        tok.get_vocab_size(true),
        Duration::ZERO,
    );
    let engine = start(mock, EngineConfig::default());
    let out = collect(engine.submit(request(&prompt, 50)).unwrap().events).await;
    assert_eq!(out.text(), "Forty-two.");
    assert_eq!(out.reason, FinishReason::Stop);
    assert_eq!(
        out.completion_tokens,
        encode(&tok, "Forty-two.").len() + 1,
        "the EOS token counts"
    );
}

#[tokio::test]
async fn max_tokens_finishes_with_length() {
    let (mock, prompt, script) = setup("one two three four five six seven", 0);
    let engine = start(mock, EngineConfig::default());
    let out = collect(engine.submit(request(&prompt, 3)).unwrap().events).await;
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.completion_tokens, 3);
    let tok = tokenizer();
    assert_eq!(out.text(), tok.decode(&script[..3], true).unwrap());
}

#[tokio::test]
async fn the_context_limit_ends_generation_with_length() {
    let (mock, prompt, _) = setup(&"word ".repeat(80), 0);
    let max_context = mock.info.max_context;
    let engine = start(mock, EngineConfig::default());
    let out = collect(engine.submit(request(&prompt, 1000)).unwrap().events).await;
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.completion_tokens, max_context - prompt.len());
}

#[tokio::test]
async fn stop_strings_across_token_boundaries_are_cut_and_never_leak() {
    let (mock, prompt, script) = setup("The answer is 42. ### That is all, folks.", 0);
    let engine = start(mock, EngineConfig::default());
    let mut req = request(&prompt, script.len());
    req.stop.stop = vec![
        "nothing".into(),
        "2. ##".into(),
        "folks".into(),
        "zzz".into(),
    ];
    let out = collect(engine.submit(req).unwrap().events).await;
    assert_eq!(out.text(), "The answer is 4");
    assert_eq!(out.reason, FinishReason::Stop);
    assert!(
        out.deltas
            .iter()
            .all(|d| !d.contains('2') && !d.contains('#')),
        "{:?}",
        out.deltas
    );
}

#[tokio::test]
async fn same_seed_same_text_other_seed_other_text() {
    let (mock, prompt, _) = setup("x", 0);
    let engine = start(mock, EngineConfig::default());
    let sampled = |seed| {
        let mut req = request(&prompt, 20);
        req.sampling = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        req.stop.ignore_eos = true;
        engine.submit(req).unwrap()
    };
    let a = collect(sampled(42).events).await.text();
    let b = collect(sampled(42).events).await.text();
    let c = collect(sampled(43).events).await.text();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test]
async fn dropping_the_receiver_cancels_the_sequence() {
    let (mock, prompt, _) = setup(&"token ".repeat(60), 10);
    let engine = start(mock.clone(), EngineConfig::default());
    let mut gen = engine.submit(request(&prompt, 60)).unwrap();
    // wait for the first text, then go away
    while let Some(ev) = gen.events.recv().await {
        if matches!(ev, Event::Delta(_)) {
            break;
        }
    }
    drop(gen);
    let deadline = Instant::now() + Duration::from_secs(2);
    while engine.running() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.running(), 0, "cancelled sequence still running");
    let after = mock.forwards.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        mock.forwards.load(Ordering::SeqCst),
        after,
        "forward passes continue after cancellation"
    );
    assert!(
        after < 20,
        "generation was not cut short ({after} forward passes)"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_new_requests() {
    let (mock, prompt, _) = setup(&"busy ".repeat(60), 20);
    let engine = start(
        mock,
        EngineConfig {
            max_batch_size: 1,
            max_batch_tokens: 256,
            max_waiting: 2,
        },
    );
    let first = engine.submit(request(&prompt, 40)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while engine.running() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let queued: Vec<_> = (0..2)
        .map(|_| engine.submit(request(&prompt, 40)).unwrap())
        .collect();
    assert_eq!(engine.waiting(), 2);
    let err = engine.submit(request(&prompt, 40)).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::QueueFull {
                waiting: 2,
                max_waiting: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("limit 2"), "{err}");
    drop((first, queued));
}

#[tokio::test]
async fn prompts_that_fill_the_context_are_refused_with_both_numbers() {
    let (mock, _, _) = setup("x", 0);
    let engine = start(mock, EngineConfig::default());
    let err = engine.submit(request(&[1; 64], 4)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                prompt_tokens: 64,
                max_context: 64,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("64 tokens") && msg.contains("context of 64"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_load_beyond_the_kv_cache_queues_and_every_request_completes() {
    let (mock, prompt, script) = setup("The answer is forty-two.", 2);
    let worst = prompt.len() + script.len();
    // Room for three worst cases at a time, twelve requests at once.
    let blocks = worst.div_ceil(16);
    let mock = Mock::with_kv(
        script.clone(),
        prompt.len(),
        mock.info.vocab_size,
        Duration::from_millis(2),
        3 * blocks * 16,
    );
    let engine = start(
        mock.clone(),
        EngineConfig {
            max_batch_size: 12,
            max_batch_tokens: 512,
            max_waiting: 12,
        },
    );
    let gens: Vec<_> = (0..12)
        .map(|_| engine.submit(request(&prompt, script.len())).unwrap())
        .collect();
    let outcomes = futures::future::join_all(gens.into_iter().map(|g| collect(g.events))).await;
    for o in &outcomes {
        assert_eq!(o.text(), "The answer is forty-two.");
        assert_eq!(o.completion_tokens, script.len());
    }
    let max = mock.max_batch();
    assert!(
        (2..=3).contains(&max),
        "at most 3 sequences fit the KV cache, batches were {:?}",
        mock.batch_sizes.lock().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while mock.kv.reserved_blocks() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        mock.kv.reserved_blocks(),
        0,
        "finished sequences return their blocks"
    );
}

#[tokio::test]
async fn a_kv_cache_smaller_than_the_context_caps_generation() {
    let (mock, prompt, _) = setup(&"word ".repeat(80), 0);
    let mock = Mock::with_kv(
        mock.script.clone(),
        prompt.len(),
        mock.info.vocab_size,
        Duration::ZERO,
        32,
    );
    let engine = start(mock, EngineConfig::default());
    assert_eq!(
        engine.max_context(),
        32,
        "model context 64, KV cache 32 positions"
    );
    let out = collect(engine.submit(request(&prompt, 1000)).unwrap().events).await;
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.completion_tokens, 32 - prompt.len());
    let err = engine.submit(request(&[1; 40], 4)).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                max_context: 32,
                ..
            }
        ),
        "{err}"
    );
}
