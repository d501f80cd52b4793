//! A corpus of malformed and hostile requests against the real binary: every one must get a 4xx
//! with OpenAI's error envelope, and the server must stay up and keep answering correctly.
mod http_support;

use http_support::*;
use serde_json::json;

const MAX_BODY: usize = 64 * 1024;

/// (route, body bytes, content type, expected status)
fn corpus() -> Vec<(&'static str, Vec<u8>, Option<&'static str>, u16)> {
    let j = Some("application/json");
    let s = |x: &str| x.as_bytes().to_vec();
    let mut cases = vec![
        // Not JSON at all, or not an object.
        ("/v1/embeddings", s("{"), j, 400),
        ("/v1/embeddings", s("}{"), j, 400),
        ("/v1/embeddings", s(""), j, 400),
        ("/v1/embeddings", s("null"), j, 400),
        ("/v1/embeddings", s("[1,2,3]"), j, 400),
        ("/v1/embeddings", s("\"input\""), j, 400),
        (
            "/v1/embeddings",
            s(r#"{"input":"a"} {"input":"b"}"#),
            j,
            400,
        ),
        ("/v1/embeddings", s(r#"{"input":"a",}"#), j, 400),
        (
            "/v1/embeddings",
            s("input=hello&model=minilm"),
            Some("application/x-www-form-urlencoded"),
            400,
        ),
        (
            "/v1/embeddings",
            b"{\"input\":\"\xc3\x28\"}".to_vec(),
            j,
            400,
        ),
        ("/v1/embeddings", b"\xff\xfe\x00{".to_vec(), j, 400),
        ("/v1/embeddings", s(r#"{"input":"\ud800"}"#), j, 400),
        // Missing, empty or mistyped fields.
        ("/v1/embeddings", s("{}"), j, 400),
        ("/v1/embeddings", s(r#"{"input":null}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":""}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":[]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":[""]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":[[]]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":true}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":{"text":"a"}}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":["a",["b"]]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":["a",null]}"#), j, 400),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","model":["minilm"]}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","model":"gpt-4"}"#),
            j,
            404,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","unknown_field":1}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","encoding_format":"int8"}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","encoding_format":null,"dimensions":"64"}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","return_sparse":true}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","return_colbert":"yes"}"#),
            j,
            400,
        ),
        ("/v1/embeddings", s(r#"{"input":"a","truncate":1}"#), j, 400),
        // Huge and negative numbers, token ids outside the vocabulary.
        (
            "/v1/embeddings",
            s(r#"{"input":"a","dimensions":0}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","dimensions":-3}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","dimensions":1e999}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","dimensions":184467440737095516160}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":"a","dimensions":385}"#),
            j,
            400,
        ),
        ("/v1/embeddings", s(r#"{"input":[-1]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":[101,1.5,102]}"#), j, 400),
        ("/v1/embeddings", s(r#"{"input":[101,30522,102]}"#), j, 400),
        (
            "/v1/embeddings",
            s(r#"{"input":[[101,4294967295]]}"#),
            j,
            400,
        ),
        (
            "/v1/embeddings",
            s(r#"{"input":[99999999999999999999999]}"#),
            j,
            400,
        ),
        // Too many inputs, too long an input.
        ("/embedding", s(r#"{"prompt":[]}"#), j, 400),
        ("/embedding", s(r#"{"prompt":[1,2]}"#), j, 400),
        ("/embedding", s(r#"{"prompt":"a","model":"nope"}"#), j, 404),
        ("/embedding", s(r#"{"model":"minilm"}"#), j, 400),
        ("/tokenize", s(r#"{}"#), j, 400),
        ("/tokenize", s(r#"{"prompt":["a"]}"#), j, 400),
        ("/tokenize", s(r#"{"prompt":"a","max_tokens":-1}"#), j, 400),
        ("/tokenize", s(r#"{"prompt":"a","model":"nope"}"#), j, 404),
        ("/detokenize", s(r#"{"tokens":"101"}"#), j, 400),
        ("/detokenize", s(r#"{"tokens":[-1]}"#), j, 400),
        ("/detokenize", s(r#"{"tokens":[30522]}"#), j, 400),
        ("/detokenize", s(r#"{"tokens":[1e10]}"#), j, 400),
        ("/keyword", s(r#"{}"#), j, 400),
        ("/keyword", s(r#"{"input":""}"#), j, 400),
        ("/keyword", s(r#"{"input":"a b c","top":-1}"#), j, 400),
        (
            "/keyword",
            s(r#"{"input":"a b c","diversity":"high"}"#),
            j,
            400,
        ),
        (
            "/keyword",
            s(r#"{"input":"a b c","keyphrase_ngram_range":[0,9]}"#),
            j,
            400,
        ),
        ("/keyword", s(r#"{"input":"a b c","stop_words":5}"#), j, 400),
        ("/keyword", s(r#"{"input":"a b c","vocab":[1,2]}"#), j, 400),
        ("/keyword", s(r#"{"input":"a b c","model":"nope"}"#), j, 404),
        ("/keyword", s(r#"{"input":"aa bb cc","top":0}"#), j, 400),
        (
            "/keyword",
            s(r#"{"input":"aa bb cc","keyphrase_ngram_range":[1,1000]}"#),
            j,
            400,
        ),
        (
            "/keyword",
            s(r#"{"input":"aa bb cc","keyphrase_ngram_range":[1]}"#),
            j,
            400,
        ),
        (
            "/keyword",
            s(r#"{"input":"aa bb cc","mmr":true,"diversity":-0.5}"#),
            j,
            400,
        ),
        (
            "/keyword",
            s(r#"{"input":"aa bb cc","maxsum":true,"top":5,"nr_candidates":2}"#),
            j,
            400,
        ),
        (
            "/keyword",
            s(r#"{"input":"aa bb cc","vocab":"aa"}"#),
            j,
            400,
        ),
    ];
    let many: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    cases.push((
        "/v1/embeddings",
        json!({"input": many}).to_string().into_bytes(),
        j,
        400,
    ));
    let long = "word ".repeat(2000);
    cases.push((
        "/v1/embeddings",
        json!({"input": long}).to_string().into_bytes(),
        j,
        400,
    ));
    // Max Sum over C(60, 12) combinations: refused before any embedding, not enumerated.
    let words: Vec<String> = (0..60)
        .map(|i| format!("w{}{}", i / 26, (b'a' + (i % 26) as u8) as char))
        .collect();
    let max_sum = json!({"input": words.join(" "), "maxsum": true, "top": 12, "nr_candidates": 60});
    cases.push(("/keyword", max_sum.to_string().into_bytes(), j, 400));
    let long_ids: Vec<u32> = vec![1000; 600];
    cases.push((
        "/v1/embeddings",
        json!({"input": long_ids}).to_string().into_bytes(),
        j,
        400,
    ));
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    cases.push((
        "/v1/embeddings",
        format!(r#"{{"input":{deep}}}"#).into_bytes(),
        j,
        400,
    ));
    cases
}

#[tokio::test]
async fn every_bad_request_gets_an_envelope_and_the_server_survives() {
    let max_body = MAX_BODY.to_string();
    let mut server = Server::minilm(&["--max-body-bytes", &max_body]);
    for (route, body, content_type, want) in corpus() {
        let what = format!(
            "{route} {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(80)
                .collect::<String>()
        );
        let (status, resp) = server.post_raw(route, body, content_type).await;
        assert_envelope(status, &resp, want, &what);
        assert!(server.alive(), "server died after {what}");
    }
    // A giant body (beyond --max-body-bytes), on every route that takes a body.
    for route in [
        "/v1/embeddings",
        "/embedding",
        "/tokenize",
        "/detokenize",
        "/keyword",
    ] {
        let giant = json!({"input": "x".repeat(4 * MAX_BODY)})
            .to_string()
            .into_bytes();
        let (status, body) = server.post_oversized(route, giant).await;
        assert_envelope(status, &body, 413, route);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&max_body),
            "{body}"
        );
        assert!(server.alive(), "server died after a giant body on {route}");
    }
    // Wrong methods and unknown routes get the envelope too.
    let (status, body) = server.get("/v1/embeddings").await;
    assert_envelope(status, &body, 405, "GET /v1/embeddings");
    let (status, body) = server.get("/v2/everything").await;
    assert_envelope(status, &body, 404, "unknown route");
    // Unknown model errors list what is served.
    let (_, body) = server
        .post_json("/v1/embeddings", json!({"input": "a", "model": "gpt-4"}))
        .await;
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("minilm"),
        "{body}"
    );
    // Limits are stated.
    let many: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    let (_, body) = server
        .post_json("/v1/embeddings", json!({"input": many}))
        .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("256"),
        "{body}"
    );
    let (_, body) = server
        .post_json("/v1/embeddings", json!({"input": "word ".repeat(2000)}))
        .await;
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2002") && msg.contains("256"), "{msg}");
    // Still healthy and still correct.
    assert_eq!(server.get("/health").await.0, 200);
    let (status, body) = server
        .post_json("/v1/embeddings", json!({"input": "hello"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 384);
    // Over-long input with the truncate extension is served.
    let (status, body) = server
        .post_json(
            "/v1/embeddings",
            json!({"input": "word ".repeat(2000), "truncate": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 256);
}
