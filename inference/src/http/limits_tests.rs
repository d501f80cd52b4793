//! In-process router tests of the request bounds: body read timeout, admission after the body,
//! per-route pools, readiness of the tokenizer routes, auth scheme, model ids in paths, keyword
//! limits. The fake embedder of `super::tests` stands in for a model.
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use serde_json::json;
use tower::ServiceExt;

use super::tests::{assert_envelope, get, post, send, state_with};
use super::{router, Limits};
use crate::keyword::KeywordLimits;

fn limits() -> Limits {
    Limits {
        max_client_batch_size: 4,
        max_body_bytes: 1 << 20,
        ..Limits::default()
    }
}

/// A request whose body sends `first` and then nothing until the returned sender is dropped.
fn stalled_post(
    uri: &str,
    first: &'static str,
) -> (
    Request<Body>,
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(Ok(Bytes::from_static(first.as_bytes())))
        .unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let req = Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    (req, tx)
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408() {
    let app = router(state_with(
        "fake",
        Limits {
            body_read_timeout: Duration::from_millis(300),
            ..limits()
        },
        None,
        8,
    ));
    let (req, _keep_open) = stalled_post("/v1/embeddings", r#"{"input": "#);
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), send(&app, req))
        .await
        .expect("a stalled body is answered, not waited for");
    assert_envelope(status, &body, 408, "stalled body");
    assert_eq!(body["error"]["code"], "request_timeout");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--body-read-timeout-secs"), "{msg}");
}

#[tokio::test]
async fn admission_waits_for_the_body_so_stalled_uploads_hold_no_permit() {
    // One permit in all. A client stuck mid-body must not take it from a complete request.
    let app = router(state_with("fake", limits(), None, 1));
    let stalled = {
        let app = app.clone();
        let (req, keep_open) = stalled_post("/v1/embeddings", r#"{"input": "#);
        let task = tokio::spawn(async move { send(&app, req).await });
        (task, keep_open)
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let (status, body) = send(
            &app,
            post("/v1/embeddings", json!({"input": "北京"}).to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    stalled.0.abort();
}

#[tokio::test]
async fn tokenizer_routes_are_admitted_and_refused_while_shutting_down() {
    let state = state_with(
        "fake",
        Limits {
            max_concurrent_tokenize: 1,
            ..limits()
        },
        None,
        8,
    );
    let app = router(state.clone());
    let tokenize = || post("/tokenize", json!({"prompt": "北京"}).to_string());
    let detokenize = || post("/detokenize", json!({"tokens": [11, 12]}).to_string());
    assert_eq!(send(&app, tokenize()).await.0, StatusCode::OK);
    // The route's pool: its one permit is held by an upload-complete request whose response is
    // still unread, so a second one is refused, naming the flag.
    let held = app.clone().oneshot(tokenize()).await.unwrap();
    let (status, body) = send(&app, detokenize()).await;
    assert_envelope(status, &body, 429, "tokenize pool exhausted");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--max-concurrent-tokenize"), "{msg}");
    drop(held);
    assert_eq!(send(&app, detokenize()).await.0, StatusCode::OK);
    state.set_ready(false);
    for req in [tokenize(), detokenize()] {
        let (status, body) = send(&app, req).await;
        assert_envelope(status, &body, 503, "tokenizer route while shutting down");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = router(state_with("fake", limits(), Some("s3cret"), 8));
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = Request::get("/v1/models")
            .header("authorization", format!("{scheme} s3cret"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::OK, "{scheme}");
    }
    let req = Request::get("/v1/models")
        .header("authorization", "Basic s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn model_ids_with_slashes_and_undecodable_paths() {
    let app = router(state_with("org/minilm", limits(), None, 8));
    let (status, body) = send(&app, get("/v1/models/org/minilm")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "org/minilm");
    let (status, body) = send(&app, get("/v1/models/%ff%fe")).await;
    assert_envelope(status, &body, 404, "undecodable id");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = send(&app, get("/v1/models/org/nope")).await;
    assert_envelope(status, &body, 404, "unknown id");
}

#[tokio::test]
async fn keyword_requests_are_bounded_and_embedded_a_client_batch_at_a_time() {
    let keyword = KeywordLimits {
        max_input_bytes: 4000,
        max_candidates: 100,
        ..KeywordLimits::default()
    };
    let app = router(state_with(
        "fake",
        Limits {
            keyword,
            ..limits()
        },
        None,
        8,
    ));
    // 100 candidates and the document: more than the fake model's queue of 64 inputs, served in
    // batches of --max-client-batch-size (4) instead of being refused.
    let words: String = (0..100).map(|i| format!("w{i:03}x ")).collect();
    let (status, body) = send(
        &app,
        post("/keyword", json!({"input": words, "top": 3}).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keywords"].as_array().unwrap().len(), 3);
    let cases = [
        (
            json!({"input": "word ".repeat(1000)}),
            "input",
            "--keyword-max-input-bytes",
        ),
        (
            json!({"input": format!("{words} extra")}),
            "input",
            "--keyword-max-candidates",
        ),
        (
            json!({"input": "aa bb", "keyphrase_ngram_range": [1, 17]}),
            "keyphrase_ngram_range",
            "--keyword-max-ngram",
        ),
        (
            json!({"input": words, "maxsum": true, "top": 1, "nr_candidates": 100}),
            "nr_candidates",
            "--keyword-max-selection-cost",
        ),
        (
            json!({"input": words, "mmr": true, "top": 100}),
            "top",
            "--keyword-max-selection-cost",
        ),
    ];
    // The fake model has 4 dimensions: tighten the cost limit so that the last two exceed it.
    let app_costly = router(state_with(
        "fake",
        Limits {
            keyword: KeywordLimits {
                max_selection_cost: 20_000,
                ..keyword
            },
            ..limits()
        },
        None,
        8,
    ));
    for (req, param, flag) in cases {
        let (status, body) = send(&app_costly, post("/keyword", req.to_string())).await;
        assert_envelope(status, &body, 400, flag);
        assert_eq!(body["error"]["param"], param, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(flag), "{msg}");
    }
}

#[tokio::test]
async fn tokenizer_answers_are_capped_unless_max_tokens_asks_for_a_head() {
    let app = router(state_with(
        "fake",
        Limits {
            tokenize_max_tokens: 10,
            ..limits()
        },
        None,
        8,
    ));
    let long = "北京 ".repeat(20);
    for specials in [true, false] {
        let req = json!({"prompt": long, "add_special_tokens": specials});
        let (status, body) = send(&app, post("/tokenize", req.to_string())).await;
        assert_envelope(status, &body, 400, "more tokens than the cap");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("--tokenize-max-tokens"), "{msg}");
        let req = json!({"prompt": long, "add_special_tokens": specials, "max_tokens": 5});
        let (status, body) = send(&app, post("/tokenize", req.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["tokenIds"].as_array().unwrap().len(), 5);
    }
    let req = json!({"prompt": "北京", "max_tokens": 11});
    let (status, body) = send(&app, post("/tokenize", req.to_string())).await;
    assert_envelope(status, &body, 400, "max_tokens over the cap");
    let req = json!({"tokens": vec![11; 11]});
    let (status, body) = send(&app, post("/detokenize", req.to_string())).await;
    assert_envelope(status, &body, 400, "too many ids");
    assert_eq!(body["error"]["param"], "tokens");
    let req = json!({"tokens": vec![11; 10]});
    assert_eq!(
        send(&app, post("/detokenize", req.to_string())).await.0,
        StatusCode::OK
    );
}
