//! The real binary serving the real all-MiniLM-L6-v2, checked against sentence-transformers'
//! reference outputs (`real/minilm/reference.json`).
mod http_support;

use std::time::Duration;

use base64::Engine as _;
use http_support::*;
use serde_json::{json, Value};

fn reference() -> Value {
    fixture_json("real/minilm/reference.json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let dot: f32 = got.iter().zip(want).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (norm(got) * norm(want));
    assert!(
        max <= 1e-5 && cos >= 0.99999,
        "{what}: max abs diff {max}, cosine {cos}"
    );
}

#[tokio::test]
async fn openai_embeddings_match_sentence_transformers() {
    let server = Server::minilm(&[]);
    let reference = reference();
    let sentences = reference["sentences"].clone();
    let (status, body) = server
        .post_json(
            "/v1/embeddings",
            json!({"model": "minilm", "input": sentences}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    let want = reference["embeddings"].as_array().unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), want.len());
    for (i, (item, row)) in data.iter().zip(want).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_close(
            &floats(&item["embedding"]),
            &floats(row),
            &format!("sentence {i}"),
        );
    }
    let tokens: usize = reference["tokenization"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": tokens, "total_tokens": tokens})
    );

    // One string alone gives the same vector as inside the batch (padding does not leak).
    let (_, one) = server
        .post_json(
            "/v1/embeddings",
            json!({"model": "minilm", "input": sentences[3]}),
        )
        .await;
    assert_close(
        &floats(&one["data"][0]["embedding"]),
        &floats(&want[3]),
        "alone",
    );

    // Token ids from the reference tokenization give the reference vector too.
    let ids = reference["tokenization"][5]["ids"].clone();
    let (status, by_ids) = server
        .post_json("/v1/embeddings", json!({"model": "minilm", "input": [ids]}))
        .await;
    assert_eq!(status, 200, "{by_ids}");
    assert_close(
        &floats(&by_ids["data"][0]["embedding"]),
        &floats(&want[5]),
        "token ids",
    );
}

#[tokio::test]
async fn base64_dimensions_and_the_seed_route() {
    let server = Server::minilm(&[]);
    let reference = reference();
    let want = floats(&reference["embeddings"][0]);
    let text = reference["sentences"][0].clone();

    let (status, body) = server
        .post_json(
            "/v1/embeddings",
            json!({"model": "minilm", "input": text, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(
            body["data"][0]["embedding"]
                .as_str()
                .expect("base64 string"),
        )
        .expect("valid base64");
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_close(&decoded, &want, "base64");

    let (status, body) = server
        .post_json("/v1/embeddings", json!({"input": text, "dimensions": 64}))
        .await;
    assert_eq!(status, 200, "{body}");
    let short = floats(&body["data"][0]["embedding"]);
    let norm = want[..64].iter().map(|x| x * x).sum::<f32>().sqrt();
    let expected: Vec<f32> = want[..64].iter().map(|x| x / norm).collect();
    assert_close(&short, &expected, "dimensions 64");
    let (status, body) = server
        .post_json("/v1/embeddings", json!({"input": text, "dimensions": 385}))
        .await;
    assert_envelope(status, &body, 400, "dimensions above 384");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("384"),
        "{body}"
    );

    // The seed's /embedding: {"model","prompt"} -> {"data":[[..]],"model","object":"embedding"}.
    let (status, body) = server
        .post_json("/embedding", json!({"model": "minilm", "prompt": [text]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "embedding");
    assert_eq!(body["model"], "minilm");
    assert_eq!(
        body.as_object().unwrap().len(),
        3,
        "exactly data/model/object: {body}"
    );
    assert_close(&floats(&body["data"][0]), &want, "seed /embedding");
}

#[tokio::test]
async fn models_tokenize_detokenize() {
    let server = Server::minilm(&[]);
    for path in ["/models", "/v1/models"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, 200);
        assert_eq!(body["object"], "list");
        let card = &body["data"][0];
        assert_eq!(card["id"], "minilm");
        assert_eq!(card["object"], "embedding");
        assert!(card["created"].as_i64().unwrap() > 1_700_000_000);
        for key in ["owned_by", "root", "parent", "permission"] {
            assert!(card.get(key).is_some(), "{key} missing: {card}");
        }
    }
    for case in reference()["tokenization"].as_array().unwrap() {
        let (status, body) = server
            .post_json(
                "/tokenize",
                json!({"prompt": case["text"], "model": "minilm"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["tokenIds"], case["ids"], "{}", case["text"]);
        assert_eq!(body["tokens"], case["tokens"], "{}", case["text"]);
        assert_eq!(body["model"], "minilm");
        assert_eq!(body["object"], "tokenizer");
    }
    let (status, body) = server
        .post_json(
            "/detokenize",
            json!({"model": "minilm", "tokens": [101, 7592, 2088, 102]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], "[CLS] hello world [SEP]");
    let (_, body) = server
        .post_json(
            "/detokenize",
            json!({"tokens": [101, 7592, 2088, 102], "skip_special_tokens": true}),
        )
        .await;
    assert_eq!(body["text"], "hello world");
}

#[tokio::test]
async fn ready_metrics_and_graceful_shutdown() {
    let mut server = Server::minilm(&["--shutdown-delay-secs", "2"]);
    assert_eq!(server.get("/health").await.0, 200);
    let (status, body) = server.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    server
        .post_json("/v1/embeddings", json!({"input": "hello"}))
        .await;
    server
        .post_json("/v1/embeddings", json!({"input": "hello", "model": "nope"}))
        .await;
    let (status, text) = server.get_text("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"glm_requests_total{model="minilm",route="/v1/embeddings",status="200"}"#,
        r#"glm_requests_total{model="",route="/v1/embeddings",status="404"} 1"#,
        r#"glm_request_duration_seconds_bucket{model="minilm",route="/v1/embeddings""#,
        r#"glm_queue_duration_seconds_count{model="minilm"}"#,
        r#"glm_batch_size_count{model="minilm"}"#,
        r#"glm_embedded_tokens_total{model="minilm"}"#,
        r#"glm_queue_depth{model="minilm"} 0"#,
        "glm_ready 1",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }

    // SIGTERM: /ready turns 503 during the delay, then the process exits cleanly.
    let pid = server.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut saw_503 = false;
    for _ in 0..30 {
        match server.client.get(server.url("/ready")).send().await {
            Ok(resp) if resp.status().as_u16() == 503 => {
                saw_503 = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(saw_503, "/ready never answered 503 while draining");
    let status = server.wait(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn api_key_is_required_except_on_probes() {
    let model = format!("minilm={}", minilm_dir().display());
    let server = Server::start(&["--model", &model], &[("API_KEY", "s3cret")]);
    let (status, body) = server
        .post_json("/v1/embeddings", json!({"input": "hi"}))
        .await;
    assert_envelope(status, &body, 401, "no key");
    let resp = server
        .client
        .post(server.url("/v1/embeddings"))
        .bearer_auth("wrong")
        .json(&json!({"input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = server
        .client
        .post(server.url("/v1/embeddings"))
        .bearer_auth("s3cret")
        .json(&json!({"input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(server.get_text(probe).await.0, 200, "{probe}");
    }
    assert_eq!(server.get("/v1/models").await.0, 401);
}

#[tokio::test]
async fn environment_variables_configure_models_and_listen_address() {
    // The seed's names (API_PORT) and GLM_MODELS, a comma-separated NAME=PATH list, without flags.
    let models = format!(
        "minilm={},tiny-bert={}",
        minilm_dir().display(),
        fixtures_dir().join("tiny/bert").display()
    );
    let env = [
        ("GLM_MODELS", models.as_str()),
        ("API_HOST", "127.0.0.1"),
        ("API_PORT", "0"),
    ];
    let server = Server::spawn(&[], &env);
    assert!(
        server.base.starts_with("http://127.0.0.1:"),
        "{}",
        server.base
    );
    let (status, body) = server.get("/v1/models").await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, ["minilm", "tiny-bert"]);
    let (status, body) = server
        .post_json(
            "/embedding",
            json!({"model": "tiny-bert", "prompt": ["北京"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"][0].as_array().unwrap().len(),
        64,
        "tiny BERT hidden size"
    );
}

#[tokio::test]
async fn concurrency_limit_answers_429_with_the_envelope() {
    let server = Server::minilm(&["--max-concurrent-requests", "1"]);
    let text = "Kubernetes is an open-source container orchestration system. ".repeat(20);
    let body = json!({"input": vec![text; 16], "truncate": true});
    let requests = (0..12).map(|_| server.post_json("/v1/embeddings", body.clone()));
    let results = futures::future::join_all(requests).await;
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        !refused.is_empty(),
        "no 429 among {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (status, body) in &results {
        match status {
            200 => {}
            429 => assert_envelope(*status, body, 429, "overloaded"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
}

#[tokio::test]
async fn a_full_batch_queue_answers_429_and_the_server_recovers() {
    // Room for two requests of 16 inputs in the queue, and one forward pass takes about one request
    // (16 x ~200 tokens); the admission semaphore lets all twelve through.
    let server = Server::minilm(&[
        "--max-queued-inputs",
        "32",
        "--max-client-batch-size",
        "16",
        "--max-batch-tokens",
        "4096",
    ]);
    let text = "Kubernetes is an open-source container orchestration system. ".repeat(20);
    let body = json!({"input": vec![text; 16], "truncate": true});
    let results = futures::future::join_all(
        (0..12).map(|_| server.post_json("/v1/embeddings", body.clone())),
    )
    .await;
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    for (status, body) in results.iter().filter(|r| r.0 == 429) {
        assert_envelope(*status, body, 429, "queue full");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("queue holds 32") && msg.contains("retry"),
            "{msg}"
        );
    }
    let (status, body) = server
        .post_json("/v1/embeddings", json!({"input": "hello"}))
        .await;
    assert_eq!(status, 200, "after the burst: {body}");
}

#[test]
fn broken_model_folders_fail_the_start_naming_the_folder() {
    let missing = std::env::temp_dir().join(format!("glm-missing-{}", std::process::id()));
    let arg = format!("broken={}", missing.display());
    let (status, stderr) = run_to_exit(&["--model", &arg]);
    assert!(!status.success());
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("broken"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    let arg = format!("t5={}", dir.path().display());
    let (status, stderr) = run_to_exit(&["--model", &arg]);
    assert!(!status.success());
    assert!(
        stderr.contains(&dir.path().display().to_string()) && stderr.contains("unsupported"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");

    let (status, stderr) = run_to_exit(&["--model", "no-equals-sign"]);
    assert!(!status.success());
    assert!(stderr.contains("NAME=PATH"), "{stderr}");
}

/// A KeyBERT call's parameters (`keyword/reference.json`) as the seed's `/keyword` request.
fn keyword_request(reference: &Value, case: &Value) -> Value {
    let name = case["doc"].as_str().expect("doc name");
    let doc = &reference["docs"][name];
    let input = doc.get("original").unwrap_or(doc).clone();
    let mut req = json!({"model": "minilm", "input": input});
    for (from, to) in [
        ("top_n", "top"),
        ("use_mmr", "mmr"),
        ("use_maxsum", "maxsum"),
        ("diversity", "diversity"),
        ("nr_candidates", "nr_candidates"),
        ("keyphrase_ngram_range", "keyphrase_ngram_range"),
        ("stop_words", "stop_words"),
        ("candidates", "vocab"),
    ] {
        if let Some(v) = case["params"].get(from) {
            req[to] = v.clone();
        }
    }
    req
}

#[tokio::test]
async fn keyword_endpoint_matches_keybert() {
    let server = Server::minilm(&[]);
    let reference = fixture_json("keyword/reference.json");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(!cases.is_empty(), "no keyword cases in the fixture");
    for case in cases {
        let what = case["name"].as_str().unwrap_or("?");
        let (status, body) = server
            .post_json("/keyword", keyword_request(&reference, case))
            .await;
        assert_eq!(status, 200, "{what}: {body}");
        assert_eq!(body["model"], "minilm", "{what}");
        let got = body["keywords"].as_array().expect("keywords");
        let want = case["expected"].as_array().expect("expected");
        let names =
            |v: &[Value], key: &dyn Fn(&Value) -> Value| v.iter().map(key).collect::<Vec<_>>();
        assert_eq!(
            names(got, &|k| k["name"].clone()),
            names(want, &|k| k[0].clone()),
            "{what}: keywords and order"
        );
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g["similarity"].as_f64().unwrap(), w[1].as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-4 + 1e-9,
                "{what}: similarity {g} vs KeyBERT {w}"
            );
        }
    }
}

/// bge-m3's extension over HTTP: the tiny XLM-RoBERTa fixture with its sparse and ColBERT heads,
/// against FlagEmbedding's `M3Embedder` outputs.
#[tokio::test]
async fn bge_m3_sparse_and_colbert_over_http_match_flagembedding() {
    let dir = fixtures_dir().join("tiny/xlm-roberta");
    let model = format!("m3={}", dir.display());
    let server = Server::start(&["--model", &model], &[]);
    let reference = fixture_json("tiny/xlm-roberta/reference.json");
    let body = json!({"input": reference["texts"], "return_sparse": true, "return_colbert": true});
    let (status, body) = server.post_json("/v1/embeddings", body).await;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().expect("data");
    let texts = reference["texts"].as_array().expect("texts");
    assert_eq!(data.len(), texts.len());
    for (i, item) in data.iter().enumerate() {
        assert_close(
            &floats(&item["embedding"]),
            &floats(&reference["dense"][i]),
            &format!("dense {i}"),
        );

        let sparse = |v: &Value| -> Vec<(String, f32)> {
            let mut w: Vec<(String, f32)> = v
                .as_object()
                .expect("sparse map")
                .iter()
                .map(|(k, x)| (k.clone(), x.as_f64().expect("weight") as f32))
                .filter(|(_, x)| *x >= 1e-4)
                .collect();
            w.sort_by(|a, b| a.0.cmp(&b.0));
            w
        };
        let (got, want) = (
            sparse(&item["sparse_embedding"]),
            sparse(&reference["sparse"][i]),
        );
        let ids = |v: &[(String, f32)]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want), "sparse token ids of text {i}");
        for ((id, g), (_, w)) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4,
                "text {i} token {id}: weight {g} vs {w}"
            );
        }

        let got = item["colbert_embedding"]
            .as_array()
            .expect("colbert vectors");
        let want = reference["colbert"][i]
            .as_array()
            .expect("reference colbert");
        assert_eq!(got.len(), want.len(), "ColBERT vectors of text {i}");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert_close(&floats(g), &floats(w), &format!("colbert {i}/{j}"));
        }
    }
    // Without the flags the items carry the dense vector only.
    let (_, plain) = server
        .post_json("/v1/embeddings", json!({"input": texts[0]}))
        .await;
    let item = plain["data"][0].as_object().expect("item");
    assert!(
        !item.contains_key("sparse_embedding") && !item.contains_key("colbert_embedding"),
        "{plain}"
    );
}
