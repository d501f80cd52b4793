//! The HTTP chat layer over a model that fails: the real router and engine, served in-process on a
//! loopback port, with a mock model that predicts a scripted token per forward pass and fails at a
//! chosen pass (or panics when a sequence's cache is created).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use glm_inference::engine::{ChatEngine, EngineConfig};
use glm_inference::http::{router, AppState, Limits};
use glm_inference::metrics::Metrics;
use glm_inference::models::{
    BlockAllocator, CausalLM, CausalLMInfo, LoadedChat, ModelError, SeqStep, Tensor,
};
use glm_inference::registry::{ModelEntry, Registry, ServedModel};
use serde_json::{json, Value};

/// Forward pass number k (1-based) predicts `script[k - 1]` (the last entry once the script runs
/// out); pass number `fail_at` fails. With `escape_guards`, the first forward pass panics with a
/// payload whose drop panics again: the engine's per-step guard catches the first panic, and the
/// second escapes it as a bug in the engine itself would, so the engine thread dies.
struct Failing {
    info: CausalLMInfo,
    script: Vec<u32>,
    fail_at: usize,
    escape_guards: bool,
    forwards: AtomicUsize,
    kv: Arc<BlockAllocator>,
}

impl CausalLM for Failing {
    fn info(&self) -> &CausalLMInfo {
        &self.info
    }

    fn kv_blocks(&self) -> &Arc<BlockAllocator> {
        &self.kv
    }

    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        let n = self.forwards.fetch_add(1, Ordering::SeqCst) + 1;
        if self.escape_guards {
            std::panic::panic_any(PanicsWhenDropped);
        }
        if n == self.fail_at {
            return Err(ModelError::Unsupported("injected failure".into()));
        }
        let vocab = self.info.vocab_size;
        let token = self.script[(n - 1).min(self.script.len() - 1)];
        let mut rows = vec![0f32; steps.len() * vocab];
        for (i, step) in steps.iter_mut().enumerate() {
            step.cache.len += step.tokens.len();
            rows[i * vocab + token as usize] = 10.0;
        }
        Ok(Tensor::from_vec(
            rows,
            (steps.len(), vocab),
            &candle_core::Device::Cpu,
        )?)
    }
}

struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("injected panic outside the engine's guards");
        }
    }
}

fn fixture_dir() -> std::path::PathBuf {
    let root = std::env::var("GLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into());
    std::path::Path::new(&root).join("tiny/glm4-0414")
}

fn tokenizer() -> tokenizers::Tokenizer {
    glm_inference::tokenizer::load_tokenizer(&fixture_dir())
        .unwrap_or_else(|e| panic!("{e}: fixture tiny/glm4-0414 is needed (GLM_FIXTURES_DIR)"))
}

/// The first token of "hello" in the fixture's vocabulary ("he").
fn hello_token() -> u32 {
    tokenizer().encode("hello", false).unwrap().get_ids()[0]
}

/// Returns the base URL and the server task.
async fn serve(script: Vec<u32>, fail_at: usize) -> (String, tokio::task::JoinHandle<()>) {
    serve_model(script, fail_at, false).await
}

async fn serve_model(
    script: Vec<u32>,
    fail_at: usize,
    escape_guards: bool,
) -> (String, tokio::task::JoinHandle<()>) {
    let dir = fixture_dir();
    let tokenizer = tokenizer();
    let vocab_size = tokenizer.get_vocab_size(true);
    let model = Failing {
        info: CausalLMInfo {
            family: "mock",
            vocab_size,
            max_context: 256,
            weight_bytes: 0,
        },
        script,
        fail_at,
        escape_guards,
        forwards: AtomicUsize::new(0),
        kv: BlockAllocator::with_capacity(4096),
    };
    let loaded = LoadedChat {
        model: Arc::new(model),
        tokenizer,
        chat_template: Some("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        bos_token: None,
        eos_token: None,
        eos_token_ids: vec![],
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = ChatEngine::start_with_metrics(
        "mock",
        loaded,
        EngineConfig::default(),
        metrics.engine("mock"),
    )
    .unwrap();
    let entry = ModelEntry {
        name: "mock".into(),
        path: dir,
        created: 0,
        model: ServedModel::Chat(Arc::new(engine)),
    };
    let registry = Arc::new(Registry::new(vec![entry], None).unwrap());
    let limits = Limits {
        max_client_batch_size: 8,
        max_body_bytes: 1 << 20,
        auto_truncate: false,
        ..Limits::default()
    };
    let state = AppState::new(registry, metrics, limits, None, 16);
    state.set_ready(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (base, task)
}

/// The `data:` payloads of a finished SSE response.
async fn sse_events(base: &str, body: Value) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The last event is the model's error, not `[DONE]`.
fn assert_ends_with_the_injected_failure(events: &[String]) {
    let text = events.join("\n");
    let last: Value =
        serde_json::from_str(&events[events.len() - 1]).expect("last event is JSON, not [DONE]");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    let msg = last["error"]["message"].as_str().unwrap();
    assert!(msg.contains("injected failure"), "{text}");
}

/// The text of the content deltas between the role chunk and the last event.
fn streamed_content(events: &[String]) -> String {
    events[1..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_mid_stream_model_error_is_an_error_event_then_the_stream_closes() {
    // Forward 1 prefills and yields the first token, forward 2 the second, forward 3 fails.
    // Greedy: the request's sampling must not decide which tokens the mock's logits produce.
    let he = hello_token();
    let (base, task) = serve(vec![he], 3).await;
    let two = tokenizer().decode(&[he, he], false).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
        "stream": true, "temperature": 0});
    let events = sse_events(&base, body).await;
    let text = events.join("\n");
    assert!(events.len() >= 3, "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_content(&events), two, "{text}");
    assert_ends_with_the_injected_failure(&events);
    task.abort();
}

#[tokio::test]
async fn bytes_held_back_for_an_incomplete_character_reach_the_client_before_the_error() {
    // The second token is a lone UTF-8 lead byte (0xE4, "ä" in the byte-level alphabet): the
    // detokenizer holds it until the character completes. The model fails first; the byte was
    // generated, so it must be sent (as U+FFFD, as at any end of generation) before the error.
    let tok = tokenizer();
    let he = hello_token();
    let lead_byte = tok.token_to_id("ä").expect("byte-level symbol of 0xE4");
    let (base, task) = serve(vec![he, lead_byte], 3).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
        "stream": true, "temperature": 0});
    let events = sse_events(&base, body).await;
    let text = events.join("\n");
    let he_text = tok.decode(&[he], false).unwrap();
    assert_eq!(
        streamed_content(&events),
        format!("{he_text}\u{FFFD}"),
        "{text}"
    );
    assert_ends_with_the_injected_failure(&events);
    task.abort();
}

#[tokio::test]
async fn a_dead_engine_thread_turns_ready_and_health_to_503() {
    let (base, task) = serve_model(vec![hello_token()], usize::MAX, true).await;
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The engine thread dies while running this request: the request fails, it does not hang.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send(),
    )
    .await
    .expect("a request to a dying engine is answered")
    .unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());
    let err: Value = resp.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    // The thread finishes unwinding just after the request's channel closes: poll briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client
        .get(format!("{base}/ready"))
        .send()
        .await
        .unwrap()
        .status()
        == 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "/ready still 200 10 s after the engine thread died"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for probe in ["/ready", "/health"] {
        let resp = client.get(format!("{base}{probe}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 503, "{probe}");
        let body: Value = resp.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("mock") && msg.contains("restarted"),
            "{probe}: {msg}"
        );
    }
    // Later requests are refused at once (503), not queued for a thread that is gone.
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    task.abort();
}

#[tokio::test]
async fn a_model_error_without_streaming_is_a_500_envelope() {
    let (base, task) = serve(vec![hello_token()], 2).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0});
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{err}"
    );
    task.abort();
}
