//! The HTTP chat layer over a model that fails mid-generation: the real router and engine, served
//! in-process on a loopback port, with a mock model whose third forward pass returns an error.
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

/// Always predicts `token`; forward pass number `fail_at` (1-based) fails.
struct Failing {
    info: CausalLMInfo,
    token: u32,
    fail_at: usize,
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
        if n == self.fail_at {
            return Err(ModelError::Unsupported("injected failure".into()));
        }
        let vocab = self.info.vocab_size;
        let mut rows = vec![0f32; steps.len() * vocab];
        for (i, step) in steps.iter_mut().enumerate() {
            step.cache.len += step.tokens.len();
            rows[i * vocab + self.token as usize] = 10.0;
        }
        Ok(Tensor::from_vec(
            rows,
            (steps.len(), vocab),
            &candle_core::Device::Cpu,
        )?)
    }
}

/// Returns the base URL, the server task and the text of two generated tokens.
async fn serve(fail_at: usize) -> (String, tokio::task::JoinHandle<()>, String) {
    let root = std::env::var("GLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into());
    let dir = std::path::Path::new(&root).join("tiny/glm4-0414");
    let tokenizer = glm_inference::tokenizer::load_tokenizer(&dir)
        .unwrap_or_else(|e| panic!("{e}: fixture tiny/glm4-0414 is needed (GLM_FIXTURES_DIR)"));
    let token = tokenizer.encode("hello", false).unwrap().get_ids()[0];
    let two = tokenizer.decode(&[token, token], false).unwrap();
    let vocab_size = tokenizer.get_vocab_size(true);
    let model = Failing {
        info: CausalLMInfo {
            family: "mock",
            vocab_size,
            max_context: 256,
            weight_bytes: 0,
        },
        token,
        fail_at,
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
    };
    let state = AppState::new(registry, metrics, limits, None, 16);
    state.set_ready(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (base, task, two)
}

#[tokio::test]
async fn a_mid_stream_model_error_is_an_error_event_then_the_stream_closes() {
    // Forward 1 prefills and yields the first token, forward 2 the second, forward 3 fails.
    let (base, task, two) = serve(3).await;
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": true});
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(events.len() >= 3, "{text}");
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let content: String = events[1..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, two, "{text}");
    let last: Value =
        serde_json::from_str(events[events.len() - 1]).expect("last event is JSON, not [DONE]");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{text}"
    );
    task.abort();
}

#[tokio::test]
async fn a_model_error_without_streaming_is_a_500_envelope() {
    let (base, task, _) = serve(2).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
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
