//! The chat engine's resource limits and weight sources through the real binary: a KV cache smaller
//! than the load (requests queue and all complete), and `--load-format dummy` on a scaled-down
//! GLM-4-9B-chat config (the one the GPU check uses at full size), with and without tokenizer files.
mod http_support;

use std::path::Path;
use std::time::{Duration, Instant};

use http_support::*;
use serde_json::{json, Value};

fn chat(max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user", "content": "你好"}], "max_tokens": max_tokens,
           "ignore_eos": true, "temperature": 0})
}

async fn metric(server: &Server, series: &str) -> Option<f64> {
    let (_, text) = server.get_text("/metrics").await;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// tiny/glm4-9b-chat-hf caches 2 layers x (k + v) x 2 heads x 16 x 4 bytes = 512 bytes a position:
/// 16 KiB hold 32 positions, one request of a ~23-token prompt plus 8 tokens at a time.
#[tokio::test]
async fn a_load_beyond_the_kv_cache_queues_and_every_request_completes() {
    let dir = fixtures_dir().join("tiny/glm4-9b-chat-hf");
    let model = format!("tiny={}", dir.display());
    let server = Server::start(
        &[
            "--model",
            &model,
            "--kv-cache-memory",
            "16KiB",
            "--chat-max-batch-size",
            "8",
        ],
        &[],
    );
    assert_eq!(
        metric(&server, r#"glm_kv_cache_capacity_tokens{model="tiny"}"#).await,
        Some(32.0)
    );
    let requests = (0..6).map(|_| server.post_json("/v1/chat/completions", chat(8)));
    let answers = futures::future::join_all(requests).await;
    let first = answers[0].1["choices"][0]["message"]["content"].clone();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], first,
            "greedy answers agree"
        );
    }
    // Without max_tokens a request may run to what the cache holds, not to the model's 131072.
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "你好"}], "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        32 - prompt
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // The engine drops a finished sequence (and its blocks) right after sending its last event, so
    // the gauge may lag the response by one engine iteration.
    let usage = r#"glm_kv_cache_usage_ratio{model="tiny"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&server, usage).await != Some(0.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&server, usage).await,
        Some(0.0),
        "finished requests return their blocks"
    );
}

/// GLM-4-9B-chat's config.json with its sizes divided down (vocabulary: the tiny fixture's).
fn scaled_glm4_config() -> Value {
    let real = repo_root().join("scripts/gpu-check/models/glm-4-9b-chat-hf/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&real).unwrap()).unwrap();
    for (key, value) in [
        ("hidden_size", 256),
        ("intermediate_size", 512),
        ("num_hidden_layers", 3),
        ("num_attention_heads", 8),
        ("head_dim", 32),
        ("vocab_size", 600),
    ] {
        assert!(cfg.get(key).is_some(), "the real config has {key}");
        cfg[key] = json!(value);
    }
    cfg["eos_token_id"] = json!([586, 593, 595]);
    cfg
}

/// A folder with the scaled config and, when `tokenizer` is set, the tiny fixture's tokenizer files.
fn dummy_folder(tokenizer: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = scaled_glm4_config();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    if tokenizer {
        let src = fixtures_dir().join("tiny/glm4-9b-chat-hf");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
    }
    dir
}

fn dummy_server(dir: &Path) -> Server {
    let model = format!("glm4={}", dir.display());
    Server::start(&["--model", &model, "--load-format", "dummy"], &[])
}

#[tokio::test]
async fn dummy_weights_serve_a_scaled_glm4_config_end_to_end() {
    let dir = dummy_folder(true);
    let server = dummy_server(dir.path());
    let (status, body) = server.post_json("/v1/chat/completions", chat(6)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    assert!(models.to_string().contains("glm4"), "{models}");
    // Without --load-format dummy the folder has no weights: a clear start failure.
    let model = format!("glm4={}", dir.path().display());
    let (exit, stderr) = run_to_exit(&["--model", &model]);
    assert!(!exit.success());
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

#[tokio::test]
async fn dummy_weights_from_a_config_alone_get_a_byte_level_tokenizer() {
    let dir = dummy_folder(false);
    let server = dummy_server(dir.path());
    let (status, body) = server.post_json("/v1/chat/completions", chat(4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let (status, t) = server
        .post_json("/tokenize", json!({"model": "glm4", "prompt": "héllo"}))
        .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        t["tokenIds"].as_array().map(Vec::len),
        Some(6),
        "one id per byte: {t}"
    );
}
