//! Property tests of request parsing (the fuzz targets of the HTTP layer): random JSON built from
//! every route's field names and hostile values, random bytes, and mutated valid bodies go through
//! the real router (fake embedder, real tokenizer) and the chat request validation. Every answer
//! must be a success or a 4xx in OpenAI's envelope: never a panic, a 5xx or a non-JSON body.
//!
//! The seed is fixed so that CI runs the same cases every time; `GLM_FUZZ_SEED=<n>` and
//! `PROPTEST_CASES=<n>` explore further.
use axum::http::StatusCode;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Map, Value};

use super::chat::ChatRequest;
use super::extract::parse;
use super::tests::{post, send, state_with};
use super::ChatLimits;
use super::{router, Limits};

const FIELDS: &[&str] = &[
    "input",
    "prompt",
    "model",
    "messages",
    "role",
    "content",
    "encoding_format",
    "dimensions",
    "truncate",
    "return_sparse",
    "return_colbert",
    "user",
    "vocab",
    "top",
    "mmr",
    "maxsum",
    "diversity",
    "nr_candidates",
    "keyphrase_ngram_range",
    "stop_words",
    "tokens",
    "max_tokens",
    "add_special_tokens",
    "skip_special_tokens",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "n",
    "logprobs",
    "top_logprobs",
    "repetition_penalty",
    "min_tokens",
    "best_of",
    "echo",
    "response_format",
    "tools",
    "type",
    "text",
];

const ROUTES: &[&str] = &[
    "/v1/embeddings",
    "/embedding",
    "/keyword",
    "/tokenize",
    "/detokenize",
    "/v1/chat/completions",
];

fn config(cases: u32) -> Config {
    let seed = std::env::var("GLM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_241_124);
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(cases),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => "\\PC{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e300,
            -1e300,
            1e-300,
            0.5,
            2.0,
            4294967296.0
        ])
        .prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            " ",
            "english",
            "float",
            "base64",
            "user",
            "system",
            "assistant",
            "fake",
            "北京",
            "今天天气很好",
            "\u{FFFD}",
            "\u{0}",
            "[CLS]",
            "<|im_start|>",
            "😀😀",
            "a\nb",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request-shaped object: mostly known field names.
fn object() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::btree_map(key(), value(), 0..8).prop_map(|m| {
        Value::Object(m.into_iter().collect::<Map<_, _>>())
            .to_string()
            .into_bytes()
    })
}

/// A valid body with one cut, one flipped byte or one inserted character.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop::sample::select(vec![
        r#"{"input": ["今天天气很好", "北京"], "model": "fake", "dimensions": 2}"#,
        r#"{"input": [[11, 77, 12]], "encoding_format": "base64"}"#,
        r#"{"prompt": ["你好"]}"#,
        r#"{"input": "alpha beta gamma delta", "top": 2, "mmr": true, "keyphrase_ngram_range": [1, 2]}"#,
        r#"{"prompt": "今天天气很好", "max_tokens": 4}"#,
        r#"{"tokens": [11, 77, 124, 12], "skip_special_tokens": true}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}"#,
    ]);
    (valid, any::<prop::sample::Index>(), any::<u8>(), 0u8..3).prop_map(|(body, at, byte, how)| {
        let mut b = body.as_bytes().to_vec();
        let i = at.index(b.len());
        match how {
            0 => b.truncate(i),
            1 => b[i] ^= byte.max(1),
            _ => b.insert(i, byte),
        }
        b
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => object(),
        2 => mutated(),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => value().prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[test]
fn every_body_on_every_route_gets_a_success_or_a_4xx_envelope() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app = router(state_with(
        "fake",
        Limits {
            max_client_batch_size: 4,
            max_body_bytes: 4096,
            ..Limits::default()
        },
        None,
        64,
    ));
    proptest!(config(512), |(route in prop::sample::select(ROUTES), body in body())| {
        let (status, resp) = rt.block_on(send(&app, post(route, body.clone())));
        let shown = String::from_utf8_lossy(&body).into_owned();
        prop_assert!(
            status.is_success() || status.is_client_error(),
            "{route} {shown:?} -> {status} {resp}"
        );
        if status == StatusCode::OK {
            prop_assert!(resp.is_object(), "{route} {shown:?} -> {resp}");
        } else {
            let e = &resp["error"];
            prop_assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty())
                    && e["type"].is_string()
                    && e.get("param").is_some()
                    && e.get("code").is_some(),
                "{route} {shown:?} -> {status} {resp}"
            );
        }
    });
}

#[test]
fn chat_request_validation_accepts_or_names_the_problem() {
    proptest!(config(1024), |(body in body())| {
        if let Ok(req) = parse::<ChatRequest>(&body) {
            if let Err(e) = req.validate(&ChatLimits::default()) {
                prop_assert!(!e.message.is_empty());
            }
        }
    });
}
