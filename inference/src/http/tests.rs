//! In-process router tests: the real tokenizer of the tiny BERT fixture behind a fake embedder, so
//! that validation, envelopes, auth, readiness and metrics are checked without model maths.
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, AppState, Limits};
use crate::batcher::BatcherConfig;
use crate::embedding::EmbeddingService;
use crate::metrics::Metrics;
use crate::models::{EmbedOutputs, Embedder, EmbedderInfo, Embedding, LoadedEmbedder, ModelError};
use crate::registry::{ModelEntry, Registry, ServedModel};

/// A deterministic stand-in: 4 dimensions derived from the ids, L2-normalised.
struct Fake(EmbedderInfo);

impl Embedder for Fake {
    fn info(&self) -> &EmbedderInfo {
        &self.0
    }

    fn embed(
        &self,
        batch: &[&[u32]],
        _outputs: EmbedOutputs,
    ) -> Result<Vec<Embedding>, ModelError> {
        Ok(batch
            .iter()
            .map(|ids| {
                let first = *ids.first().unwrap_or(&0) as f32;
                let last = *ids.last().unwrap_or(&0) as f32;
                let v = [ids.len() as f32, first, last, 1.0];
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                Embedding {
                    dense: v.iter().map(|x| x / n).collect(),
                    ..Default::default()
                }
            })
            .collect())
    }
}

pub(super) fn fixtures() -> std::path::PathBuf {
    std::env::var_os("GLM_FIXTURES_DIR")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

const MAX_TOKENS: usize = 16;
const FAKE_TABLE_ROWS: usize = 500;

fn state(api_key: Option<&str>) -> AppState {
    let limits = Limits {
        max_client_batch_size: 4,
        max_body_bytes: 4096,
        auto_truncate: false,
        ..Limits::default()
    };
    state_with("fake", limits, api_key, 8)
}

/// The fake embedding model served as `name` behind the real router state.
pub(super) fn state_with(
    name: &str,
    limits: Limits,
    api_key: Option<&str>,
    max_concurrent_requests: usize,
) -> AppState {
    let dir = fixtures().join("tiny/bert");
    let tokenizer = crate::tokenizer::load_tokenizer(&dir).unwrap_or_else(|e| {
        panic!("fixture tokenizer missing ({e}); the fixtures live in /work/shared/fixtures")
    });
    let metrics = Arc::new(Metrics::new().unwrap());
    let info = EmbedderInfo {
        family: "fake",
        dimensions: 4,
        // Smaller than the fixture tokenizer's 604 entries: ids in between are refused too.
        vocab_size: FAKE_TABLE_ROWS,
        max_input_tokens: MAX_TOKENS,
        sparse: false,
        colbert: false,
    };
    let loaded = LoadedEmbedder {
        embedder: Arc::new(Fake(info)),
        tokenizer,
    };
    let cfg = BatcherConfig {
        max_batch_tokens: 256,
        max_queued_inputs: 64,
    };
    let model = EmbeddingService::new(name, loaded, cfg, &metrics).unwrap();
    let entry = ModelEntry {
        name: name.into(),
        path: dir,
        created: 1_700_000_000,
        model: ServedModel::Embedding(Arc::new(model)),
    };
    let registry = Arc::new(Registry::new(vec![entry], None).unwrap());
    let state = AppState::new(
        registry,
        metrics,
        limits,
        api_key.map(String::from),
        max_concurrent_requests,
    );
    state.set_ready(true);
    state
}

pub(super) async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, body)
}

pub(super) fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

pub(super) fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

pub(super) fn assert_envelope(status: StatusCode, body: &Value, want: u16, what: &str) {
    assert_eq!(status.as_u16(), want, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(
        e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {body}"
    );
}

#[tokio::test]
async fn embeddings_follow_openai_shape_and_usage() {
    let app = router(state(None));
    let texts = ["今天天气很好", "北京"];
    let (status, body) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": texts, "model": "fake"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "fake");
    // Reference tokenization of the fixture: 8 and 4 ids with [CLS]/[SEP].
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 12, "total_tokens": 12})
    );
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 4);
    }
    // [8, CLS=11, SEP=12, 1] normalised, as the fake computes from the reference ids.
    let v: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    let n = (64.0f32 + 121.0 + 144.0 + 1.0).sqrt();
    assert!(
        (v[0] - 8.0 / n).abs() < 1e-6 && (v[1] - 11.0 / n).abs() < 1e-6,
        "{v:?}"
    );
}

#[tokio::test]
async fn base64_dimensions_and_token_inputs() {
    let app = router(state(None));
    let (_, floats) = send(
        &app,
        post("/v1/embeddings", json!({"input": "北京"}).to_string()),
    )
    .await;
    let (status, b64) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": "北京", "encoding_format": "base64"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{b64}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(decoded, want);

    let (status, short) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": "北京", "dimensions": 2}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{short}");
    let v: Vec<f32> = serde_json::from_value(short["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 2);
    assert!(
        (v[0] * v[0] + v[1] * v[1] - 1.0).abs() < 1e-6,
        "renormalised: {v:?}"
    );

    // Ids are used as given: the reference ids of "北京" give the same vector as the text.
    let (status, ids) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": [[11, 96, 74, 12]]}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    let (_, text) = send(
        &app,
        post("/tokenize", json!({"prompt": "北京"}).to_string()),
    )
    .await;
    assert_eq!(
        text["tokenIds"],
        json!([11, 96, 74, 12]),
        "reference tokenization of 北京"
    );
    assert_eq!(ids["data"][0]["embedding"], floats["data"][0]["embedding"]);

    // An id the tokenizer has but the model's embedding table lacks is the client's error.
    let (status, err) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": [[11, 550, 12]]}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let msg = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("550") && msg.contains(&FAKE_TABLE_ROWS.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn seed_embedding_models_and_tokenize_shapes() {
    let app = router(state(None));
    let (status, body) = send(
        &app,
        post(
            "/embedding",
            json!({"model": "fake", "prompt": ["你好"]}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "embedding");
    assert_eq!(body["model"], "fake");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0].as_array().unwrap().len(), 4);

    for uri in ["/models", "/v1/models"] {
        let (status, body) = send(&app, get(uri)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"object": "list", "data": [{"id": "fake", "object": "embedding", "created": 1_700_000_000,
                "owned_by": "glm-inference", "root": null, "parent": null, "permission": null}]})
        );
    }
    let (status, _) = send(&app, get("/v1/models/fake")).await;
    assert_eq!(status, StatusCode::OK);

    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny/bert/reference.json")).unwrap(),
    )
    .unwrap();
    for case in reference["tokenization"].as_array().unwrap() {
        let (status, body) = send(
            &app,
            post("/tokenize", json!({"prompt": case["text"]}).to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["tokenIds"], case["ids"]);
        assert_eq!(body["tokens"], case["tokens"]);
        assert_eq!(body["object"], "tokenizer");
        let (status, back) = send(
            &app,
            post(
                "/detokenize",
                json!({"tokens": case["ids"], "skip_special_tokens": true}).to_string(),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{back}");
        assert!(back["text"].is_string());
    }
    // max_tokens truncates but keeps [CLS] ... [SEP].
    let (_, body) = send(
        &app,
        post(
            "/tokenize",
            json!({"prompt": "今天天气很好", "max_tokens": 4}).to_string(),
        ),
    )
    .await;
    assert_eq!(body["tokenIds"], json!([11, 77, 124, 12]));
}

#[tokio::test]
async fn too_long_inputs_are_refused_or_truncated_on_request() {
    let app = router(state(None));
    let long = "天".repeat(40);
    let (status, body) = send(
        &app,
        post("/v1/embeddings", json!({"input": long}).to_string()),
    )
    .await;
    assert_envelope(status, &body, 400, "too long");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("42") && msg.contains(&MAX_TOKENS.to_string()),
        "{msg}"
    );
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let (status, body) = send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": long, "truncate": true}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], MAX_TOKENS);
    // The seed route truncates like sentence-transformers did.
    let (status, _) = send(
        &app,
        post("/embedding", json!({"prompt": [long]}).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_requests_get_the_envelope() {
    let app = router(state(None));
    let big = "x".repeat(5000);
    let cases: Vec<(&str, Body, u16, &str)> = vec![
        (
            "/v1/embeddings",
            Body::from("{not json"),
            400,
            "invalid_json",
        ),
        ("/v1/embeddings", Body::from(""), 400, "invalid_json"),
        (
            "/v1/embeddings",
            Body::from(b"{\"input\":\"\xff\xfe\"}".to_vec()),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"model":"fake"}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","bogus":1}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":""}"#),
            400,
            "empty_input",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":[]}"#),
            400,
            "empty_input",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":[[]]}"#),
            400,
            "empty_input",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":["a","b","c","d","e"]}"#),
            400,
            "too_many_inputs",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":12}"#),
            400,
            "invalid_value",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":[1,-5]}"#),
            400,
            "invalid_value",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":[1e400]}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":[99999999]}"#),
            400,
            "invalid_token_id",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","model":"gpt-4"}"#),
            404,
            "model_not_found",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","model":7}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","dimensions":5}"#),
            400,
            "invalid_value",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","dimensions":-1}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","dimensions":0}"#),
            400,
            "invalid_value",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","dimensions":1e30}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","encoding_format":"hex"}"#),
            400,
            "invalid_json",
        ),
        (
            "/v1/embeddings",
            Body::from(r#"{"input":"a","return_sparse":true}"#),
            400,
            "invalid_value",
        ),
        (
            "/v1/embeddings",
            Body::from(format!(r#"{{"input":"{big}"}}"#)),
            413,
            "payload_too_large",
        ),
        (
            "/embedding",
            Body::from(r#"{"prompt":[1,2]}"#),
            400,
            "invalid_value",
        ),
        (
            "/embedding",
            Body::from(r#"{"prompt":null}"#),
            400,
            "invalid_value",
        ),
        (
            "/tokenize",
            Body::from(r#"{"prompt":5}"#),
            400,
            "invalid_json",
        ),
        (
            "/tokenize",
            Body::from(r#"{"prompt":"a","max_tokens":0}"#),
            400,
            "invalid_value",
        ),
        (
            "/detokenize",
            Body::from(r#"{"tokens":[-1]}"#),
            400,
            "invalid_json",
        ),
        (
            "/detokenize",
            Body::from(r#"{"tokens":[4294967296]}"#),
            400,
            "invalid_token_id",
        ),
        (
            "/detokenize",
            Body::from(r#"{"tokens":[100000]}"#),
            400,
            "invalid_token_id",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":""}"#),
            400,
            "empty_input",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":"a b","top":0}"#),
            400,
            "invalid_value",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":"a b","mmr":true,"diversity":2}"#),
            400,
            "invalid_value",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":"a b","maxsum":true,"nr_candidates":2}"#),
            400,
            "invalid_value",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":"a b","keyphrase_ngram_range":[2,1]}"#),
            400,
            "invalid_value",
        ),
        (
            "/keyword",
            Body::from(r#"{"input":"a b","stop_words":"french"}"#),
            400,
            "invalid_value",
        ),
    ];
    for (uri, body, want, code) in cases {
        let (status, resp) = send(&app, post(uri, body)).await;
        assert_envelope(status, &resp, want, uri);
        assert_eq!(resp["error"]["code"], code, "{uri}: {resp}");
    }
    let (status, body) = send(&app, get("/nope")).await;
    assert_envelope(status, &body, 404, "unknown route");
    let (status, body) = send(&app, get("/v1/embeddings")).await;
    assert_envelope(status, &body, 405, "wrong method");
    let (status, body) = send(&app, get("/v1/models/nope")).await;
    assert_envelope(status, &body, 404, "unknown model card");
    // The JSON path of a wrongly typed field is the envelope's param.
    let (_, body) = send(
        &app,
        post("/v1/embeddings", r#"{"input":"a","dimensions":"x"}"#),
    )
    .await;
    assert_eq!(body["error"]["param"], "dimensions");
    // Bodies are JSON whatever the Content-Type (curl -d sends form encoding).
    let req = Request::post("/v1/embeddings")
        .body(Body::from(r#"{"input":"北京"}"#))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn api_key_guards_everything_but_probes() {
    let app = router(state(Some("s3cret")));
    let (status, body) = send(
        &app,
        post("/v1/embeddings", json!({"input": "a"}).to_string()),
    )
    .await;
    assert_envelope(status, &body, 401, "no key");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, _) = send(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let wrong = Request::get("/v1/models")
        .header("authorization", "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::get("/v1/models")
        .header("authorization", "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, right).await.0, StatusCode::OK);
    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(send(&app, get(probe)).await.0, StatusCode::OK, "{probe}");
    }
}

#[tokio::test]
async fn readiness_and_metrics() {
    let state = state(None);
    let app = router(state.clone());
    assert_eq!(send(&app, get("/ready")).await.0, StatusCode::OK);
    send(
        &app,
        post("/v1/embeddings", json!({"input": "北京"}).to_string()),
    )
    .await;
    send(
        &app,
        post(
            "/v1/embeddings",
            json!({"input": "a", "model": "nope"}).to_string(),
        ),
    )
    .await;
    let resp = app.clone().oneshot(get("/metrics")).await.unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(r#"glm_requests_total{model="fake",route="/v1/embeddings",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"glm_requests_total{model="",route="/v1/embeddings",status="404"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"glm_batch_size_count{model="fake"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"glm_queue_duration_seconds_count{model="fake"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"glm_embedded_tokens_total{model="fake"} 4"#),
        "{text}"
    );
    assert!(text.contains("glm_ready 1"), "{text}");

    state.set_ready(false);
    let (status, body) = send(&app, get("/ready")).await;
    assert_envelope(status, &body, 503, "draining");
    let (status, body) = send(
        &app,
        post("/v1/embeddings", json!({"input": "a"}).to_string()),
    )
    .await;
    assert_envelope(status, &body, 503, "inference while draining");
    assert_eq!(send(&app, get("/health")).await.0, StatusCode::OK);
}
