//! Chat over HTTP against the real binary: a tiny fixture checkpoint (exact greedy parity with
//! transformers' `reference.json`) and the real SmolLM2-135M-Instruct Q4_1 GGUF; streaming shape,
//! stop strings, seeds, admission (429), context limits, client disconnects and graceful shutdown.
mod http_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_support::*;
use serde_json::{json, Value};

/// Non-reasoning tiny fixture (no `</think>` in its vocabulary) whose first case decodes to valid UTF-8.
const TINY: &str = "tiny/glm4-0414";

fn tiny_dir() -> PathBuf {
    let dir = fixtures_dir().join(TINY);
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing; set GLM_FIXTURES_DIR",
        dir.display()
    );
    dir
}

fn smollm2_path() -> PathBuf {
    let models = std::env::var_os("GLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".models"));
    let path = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set GLM_MODELS_DIR)",
        path.display()
    );
    path
}

fn tiny_server(extra: &[&str]) -> Server {
    let model = format!("tiny={}", tiny_dir().display());
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args, &[])
}

fn smollm2_server(extra: &[&str]) -> Server {
    let model = format!("smollm2={}", smollm2_path().display());
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args, &[])
}

/// A streamed response read to its end: every `data:` payload in order.
struct Sse {
    status: u16,
    events: Vec<String>,
}

impl Sse {
    fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).expect("JSON event"))
            .collect()
    }

    fn content(&self) -> String {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }

    fn finish_reasons(&self) -> Vec<String> {
        self.chunks()
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Split SSE bytes into `data:` payloads (events end with a blank line).
fn sse_events(buf: &mut String) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        for line in block.lines() {
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_owned());
            }
        }
    }
    out
}

async fn stream(server: &Server, path: &str, body: Value) -> Sse {
    let mut resp = server
        .client
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let (mut buf, mut events) = (String::new(), Vec::new());
    while let Some(bytes) = resp.chunk().await.expect("stream chunk") {
        buf.push_str(std::str::from_utf8(&bytes).expect("SSE is UTF-8 at chunk boundaries"));
        events.extend(sse_events(&mut buf));
    }
    Sse { status, events }
}

/// Read a stream until `n` data events arrived; the response is returned still open.
async fn open_stream(server: &Server, body: Value, n: usize) -> (reqwest::Response, Vec<String>) {
    let mut resp = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let (mut buf, mut events) = (String::new(), Vec::new());
    while events.len() < n {
        let bytes = resp
            .chunk()
            .await
            .expect("chunk")
            .expect("stream ended early");
        buf.push_str(std::str::from_utf8(&bytes).expect("UTF-8"));
        events.extend(sse_events(&mut buf));
    }
    (resp, events)
}

/// The value of one Prometheus series (0 when absent).
async fn metric(server: &Server, series: &str) -> f64 {
    let (_, text) = server.get_text("/metrics").await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

async fn wait_for_metric(server: &Server, series: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = metric(server, series).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, expected {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tiny_reference_case() -> (Value, String) {
    let reference = fixture_json(&format!("{TINY}/reference.json"));
    let case = reference["cases"][0].clone();
    let tokenizer = tokenizers::Tokenizer::from_file(tiny_dir().join("tokenizer.json"))
        .expect("fixture tokenizer");
    let ids: Vec<u32> = case["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // The reference ids decoded as transformers decodes them (special tokens kept).
    let text = tokenizer.decode(&ids, false).expect("decode reference ids");
    assert!(
        !text.contains('\u{fffd}'),
        "the chosen case must decode to valid UTF-8"
    );
    (case, text)
}

#[tokio::test]
async fn tiny_fixture_greedy_equals_the_reference_streaming_and_not() {
    let server = tiny_server(&[]);
    let (case, expected) = tiny_reference_case();
    let n = case["generated_ids"].as_array().unwrap().len();
    let prompt_tokens = case["prompt_ids"].as_array().unwrap().len();
    let body = json!({
        "model": "tiny", "messages": case["messages"], "temperature": 0, "max_tokens": n,
        "skip_special_tokens": false,
    });

    // The template renders the reference prompt token for token.
    let (status, tok) = server
        .post_json(
            "/tokenize",
            json!({"model": "tiny", "messages": case["messages"]}),
        )
        .await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(tok["tokenIds"], case["prompt_ids"]);
    assert_eq!(tok["prompt"], case["prompt_text"]);

    let (status, r) = server.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "tiny");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], case["finish_reason"]);
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n})
    );

    // The seed's route answers the same.
    let (status, seed) = server.post_json("/chat", body.clone()).await;
    assert_eq!(status, 200, "{seed}");
    assert_eq!(seed["choices"][0]["message"]["content"], expected.as_str());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let sse = stream(&server, "/v1/chat/completions", streamed).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.events.last().map(String::as_str),
        Some("[DONE]"),
        "{:?}",
        sse.events
    );
    let chunks = sse.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(sse.content(), expected);
    assert_eq!(sse.finish_reasons(), vec!["length".to_owned()]);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], r["usage"]);

    // Without include_usage no chunk has usage.
    let mut plain = body;
    plain["stream"] = json!(true);
    let sse = stream(&server, "/v1/chat/completions", plain).await;
    assert!(
        sse.chunks().iter().all(|c| c.get("usage").is_none()),
        "{:?}",
        sse.events
    );
    assert_eq!(sse.content(), expected);

    // Listed as a chat model; chat metrics recorded.
    let (_, models) = server.get("/v1/models").await;
    assert_eq!(
        models["data"][0],
        json!({"id": "tiny", "object": "chat.completion", "created": models["data"][0]["created"],
        "owned_by": "glm-inference", "root": null, "parent": null, "permission": null})
    );
    assert_eq!(
        metric(
            &server,
            r#"glm_chat_requests_total{finish_reason="length",model="tiny"}"#
        )
        .await,
        4.0
    );
    assert_eq!(
        metric(
            &server,
            r#"glm_chat_time_to_first_token_seconds_count{model="tiny"}"#
        )
        .await,
        4.0
    );
    // Warm-up generated one token before /ready.
    assert_eq!(
        metric(&server, r#"glm_chat_generated_tokens_total{model="tiny"}"#).await,
        (4 * n + 1) as f64
    );
    assert!(metric(&server, r#"glm_chat_batch_size_count{model="tiny"}"#).await >= (4 * n) as f64);
}

#[tokio::test]
async fn bad_requests_are_refused_in_the_openai_envelope() {
    let tiny = format!("tiny={}", tiny_dir().display());
    let other = format!(
        "other={}",
        fixtures_dir().join("tiny/glm4-9b-chat-hf").display()
    );
    let minilm = format!("minilm={}", minilm_dir().display());
    let server = Server::start(
        &["--model", &tiny, "--model", &other, "--model", &minilm],
        &[("GLM_MODEL", "other")],
    );
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "tiny", "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            "tools",
        ),
        (json!({"model": "tiny", "messages": msgs, "n": 2}), 400, "n"),
        (
            json!({"model": "tiny", "messages": msgs, "response_format": {"type": "json_object"}}),
            400,
            "response_format",
        ),
        (
            json!({"model": "tiny", "messages": msgs, "temperature": 3}),
            400,
            "temperature",
        ),
        (json!({"model": "tiny", "messages": []}), 400, "messages"),
        (
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (json!({"model": "nope", "messages": msgs}), 404, "model"),
        (json!({"model": "minilm", "messages": msgs}), 400, "model"),
    ];
    for (body, status, param) in cases {
        let (got, resp) = server.post_json("/v1/chat/completions", body.clone()).await;
        assert_envelope(got, &resp, status, &body.to_string());
        assert_eq!(resp["error"]["param"], param, "{body}: {resp}");
    }
    // No `model`: GLM_MODEL picks the default chat model.
    let (status, r) = server
        .post_json("/chat", json!({"messages": msgs, "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "other");
    // /tokenize with messages needs a chat model.
    let (got, resp) = server
        .post_json("/tokenize", json!({"model": "minilm", "messages": msgs}))
        .await;
    assert_envelope(got, &resp, 400, "tokenize messages on an embedding model");
}

#[tokio::test]
async fn smollm2_gguf_follows_the_reference_and_honours_stop_strings() {
    let server = smollm2_server(&[]);
    let reference = fixture_json("real/smollm2/reference.json");
    for case in reference["cases"].as_array().unwrap() {
        let (status, tok) = server
            .post_json("/tokenize", json!({"messages": case["messages"]}))
            .await;
        assert_eq!(status, 200, "{tok}");
        assert_eq!(
            tok["tokenIds"], case["prompt_ids"],
            "prompt of {}",
            case["messages"]
        );
    }
    // Case 2: greedy margins stay >= 0.1 for the first 10 tokens, which decode to this prefix.
    let case = &reference["cases"][2];
    let prefix = "That's a great way to start. I'll";
    assert!(case["generated_text"].as_str().unwrap().starts_with(prefix));
    let body = json!({"messages": case["messages"], "temperature": 0, "max_tokens": 16});
    let (status, r) = server.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(content.starts_with(prefix), "{content:?}");
    assert_eq!(r["model"], "smollm2");

    // A stop string spanning several tokens: nothing of it is ever streamed.
    let mut stopped = body.clone();
    stopped["stop"] = json!([" great way", "never"]);
    stopped["stream"] = json!(true);
    let sse = stream(&server, "/v1/chat/completions", stopped.clone()).await;
    assert_eq!(sse.content(), "That's a");
    assert!(sse
        .chunks()
        .iter()
        .all(|c| !c["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .contains('g')));
    assert_eq!(sse.finish_reasons(), vec!["stop".to_owned()]);
    stopped["stream"] = json!(false);
    let (_, r) = server.post_json("/v1/chat/completions", stopped).await;
    assert_eq!(r["choices"][0]["message"]["content"], "That's a");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // Same seed, same text; different seeds do not all agree.
    let sampled = |seed: u64| json!({"messages": case["messages"], "temperature": 1.0, "seed": seed, "max_tokens": 12});
    let text = |r: Value| {
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = text(server.post_json("/v1/chat/completions", sampled(7)).await.1);
    let b = text(server.post_json("/v1/chat/completions", sampled(7)).await.1);
    assert_eq!(a, b, "seed 7 twice");
    let mut others = Vec::new();
    for seed in [1, 2, 3] {
        others.push(text(
            server
                .post_json("/v1/chat/completions", sampled(seed))
                .await
                .1,
        ));
    }
    assert!(
        others.iter().any(|o| *o != a),
        "four seeds gave the same text {a:?}"
    );

    // A prompt longer than the context: 400 stating both numbers.
    let long = "hello ".repeat(9000);
    let msgs = json!([{"role": "user", "content": long}]);
    let (_, tok) = server
        .post_json("/tokenize", json!({"messages": msgs}))
        .await;
    let n = tok["tokenIds"].as_array().unwrap().len();
    assert!(n > 8192, "{n}");
    let (status, err) = server
        .post_json("/v1/chat/completions", json!({"messages": msgs}))
        .await;
    assert_envelope(status, &err, 400, "prompt too long");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&n.to_string()) && msg.contains("8192"),
        "{msg}"
    );
    assert_eq!(err["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn disconnected_clients_stop_their_generation() {
    let server = tiny_server(&["--chat-max-tokens", "30000"]);
    let long = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
        "ignore_eos": true, "temperature": 0, "stream": true});
    let (resp, _) = open_stream(&server, long.clone(), 3).await;
    drop(resp);
    let cancelled = r#"glm_chat_cancelled_total{model="tiny"}"#;
    wait_for_metric(&server, cancelled, 1.0, Duration::from_secs(10)).await;
    wait_for_metric(
        &server,
        r#"glm_chat_running_sequences{model="tiny"}"#,
        0.0,
        Duration::from_secs(1),
    )
    .await;
    let generated = r#"glm_chat_generated_tokens_total{model="tiny"}"#;
    let before = metric(&server, generated).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&server, generated).await,
        before,
        "generation went on after the disconnect"
    );
    assert!(before < 30000.0);
    assert_eq!(
        metric(
            &server,
            r#"glm_chat_requests_total{finish_reason="cancelled",model="tiny"}"#
        )
        .await,
        1.0
    );

    // Non-streaming: a client that times out cancels too.
    let mut body = long;
    body["stream"] = json!(false);
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(quick
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .is_err());
    wait_for_metric(&server, cancelled, 2.0, Duration::from_secs(10)).await;
    wait_for_metric(
        &server,
        r#"glm_chat_running_sequences{model="tiny"}"#,
        0.0,
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn a_full_queue_answers_429() {
    let server = tiny_server(&[
        "--chat-max-batch-size",
        "1",
        "--chat-max-waiting",
        "1",
        "--chat-max-tokens",
        "30000",
    ]);
    let long = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
        "ignore_eos": true, "stream": true});
    let (running, _) = open_stream(&server, long.clone(), 2).await;
    // The second waits for the batch slot: its response starts (200) but carries nothing yet.
    let waiting = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .expect("request");
    assert_eq!(waiting.status().as_u16(), 200);
    wait_for_metric(
        &server,
        r#"glm_chat_waiting_requests{model="tiny"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    let (status, err) = server.post_json("/v1/chat/completions", long.clone()).await;
    assert_envelope(status, &err, 429, "third request");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("tiny") && msg.contains("limit 1"), "{msg}");
    drop(running);
    drop(waiting);
    wait_for_metric(
        &server,
        r#"glm_chat_running_sequences{model="tiny"}"#,
        0.0,
        Duration::from_secs(10),
    )
    .await;
    wait_for_metric(
        &server,
        r#"glm_chat_waiting_requests{model="tiny"}"#,
        0.0,
        Duration::from_secs(10),
    )
    .await;
    let (status, r) = server
        .post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "after the load is gone: {r}");
}

#[tokio::test]
async fn shutdown_drains_open_streams() {
    // A deadline far beyond what the tokens take even on a loaded machine: this test is about
    // draining; cutting at the deadline is http_limits' `shutdown_cuts_streams_at_its_deadline`.
    let mut server = smollm2_server(&["--shutdown-timeout-secs", "600"]);
    // Few tokens: the debug build on a loaded 2-core machine needed over the client's 120 s for 40.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12,
        "ignore_eos": true, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (mut resp, mut events) = open_stream(&server, body, 3).await;
    let pid = server.pid();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let mut buf = String::new();
    while let Some(bytes) = resp.chunk().await.expect("stream chunk") {
        buf.push_str(std::str::from_utf8(&bytes).expect("UTF-8"));
        events.extend(sse_events(&mut buf));
    }
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the open stream was cut: {events:?}"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12, "{usage}");
    assert!(server.wait(Duration::from_secs(60)).success());
}

#[tokio::test]
async fn reasoning_models_split_think_into_reasoning_content() {
    // tiny/qwen2 is a DeepSeek-R1 distill layout: its template opens `<think>` in the prompt.
    let model = format!("r1={}", fixtures_dir().join("tiny/qwen2").display());
    let server = Server::start(&["--model", &model], &[]);
    let reference = fixture_json("tiny/qwen2/reference.json");
    for case in reference["cases"].as_array().unwrap() {
        let text = case["generated_text"].as_str().unwrap();
        let (reasoning, content) = text.split_once("</think>").unwrap_or((text, ""));
        let n = case["generated_ids"].as_array().unwrap().len();
        let body = json!({"messages": case["messages"], "max_tokens": n, "temperature": 0});
        let (status, r) = server.post_json("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 200, "{r}");
        let message = &r["choices"][0]["message"];
        assert_eq!(message["reasoning_content"], reasoning, "{r}");
        assert_eq!(message["content"], content, "{r}");

        let mut streamed = body;
        streamed["stream"] = json!(true);
        let sse = stream(&server, "/v1/chat/completions", streamed).await;
        let chunks = sse.chunks();
        let joined = |field: &str| -> String {
            chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"][field].as_str().map(str::to_owned))
                .collect()
        };
        assert_eq!(joined("reasoning_content"), reasoning, "{:?}", sse.events);
        assert_eq!(joined("content"), content, "{:?}", sse.events);
    }
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_each_equals_its_reference() {
    let server = tiny_server(&[]);
    let reference = fixture_json(&format!("{TINY}/reference.json"));
    let tokenizer = tokenizers::Tokenizer::from_file(tiny_dir().join("tokenizer.json"))
        .expect("fixture tokenizer");
    let cases: Vec<Value> = reference["cases"].as_array().unwrap().clone();
    let expected: Vec<String> = cases
        .iter()
        .map(|c| {
            let ids: Vec<u32> = c["generated_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            tokenizer.decode(&ids, false).unwrap()
        })
        .collect();
    // Every case twice, all at once: different prompt lengths share forward passes.
    let requests = cases.iter().chain(cases.iter()).map(|c| {
        let n = c["generated_ids"].as_array().unwrap().len();
        let body = json!({"messages": c["messages"], "max_tokens": n, "temperature": 0, "skip_special_tokens": false,
            "logprobs": true, "top_logprobs": 2});
        server.post_json("/v1/chat/completions", body)
    });
    let responses = futures::future::join_all(requests).await;
    for (i, (status, r)) in responses.iter().enumerate() {
        assert_eq!(*status, 200, "{r}");
        let case = i % cases.len();
        assert_eq!(
            r["choices"][0]["message"]["content"],
            expected[case].as_str(),
            "case {case}"
        );
        // Greedy: the chosen token is the most likely one.
        let logprobs = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(
            logprobs.len(),
            cases[case]["generated_ids"].as_array().unwrap().len()
        );
        for lp in logprobs {
            let top = lp["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 2);
            assert_eq!(top[0]["logprob"], lp["logprob"], "{lp}");
            assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        }
    }
    let sum = metric(&server, r#"glm_chat_batch_size_sum{model="tiny"}"#).await;
    let steps = metric(&server, r#"glm_chat_batch_size_count{model="tiny"}"#).await;
    assert!(
        sum > steps,
        "no forward pass held more than one sequence ({sum} sequences in {steps} steps)"
    );
}
