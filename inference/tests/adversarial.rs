//! The adversarial suite: one real server (all-MiniLM-L6-v2 and SmolLM2) against hostile clients,
//! group after group — the committed corpus (`tests/adversarial/corpus.json`: malformed, deeply
//! nested, unsupported and oversized requests on every route), bodies over the size limit, slow
//! clients (unfinished headers, stalled uploads, a client that stops reading), and many streaming
//! clients that disconnect. Every refusal must be OpenAI's envelope within a per-request time
//! bound (a generous safety bound, not a performance assertion), and after every group the server
//! must be healthy, answer a small embedding and a small chat exactly as the references do, and
//! have grown its resident memory by less than a bound.
mod http_support;

use std::time::{Duration, Instant};

use futures::future::join_all;
use http_support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// No single request may take longer (a hung or pathological request fails the suite).
const REQUEST_BOUND: Duration = Duration::from_secs(60);
/// Resident memory the server may gain over its warmed-up baseline, across the whole suite.
const RSS_GROWTH_BOUND_MB: f64 = 400.0;

fn corpus() -> Value {
    let path = repo_root().join("inference/tests/adversarial/corpus.json");
    let text = std::fs::read_to_string(&path).expect("the committed corpus");
    serde_json::from_str(&text).expect("corpus.json is JSON")
}

/// Expand the corpus' generators (`$repeat`, `$words`, `$ids`).
fn expand(v: &Value) -> Value {
    match v {
        Value::Object(m) if m.len() == 1 && m.contains_key("$repeat") => {
            let (text, n) = (&m["$repeat"][0], &m["$repeat"][1]);
            Value::String(text.as_str().unwrap().repeat(n.as_u64().unwrap() as usize))
        }
        Value::Object(m) if m.len() == 1 && m.contains_key("$words") => {
            let n = m["$words"].as_u64().unwrap();
            Value::String((0..n).map(|i| format!("w{i} ")).collect())
        }
        Value::Object(m) if m.len() == 1 && m.contains_key("$ids") => {
            let (id, n) = (
                m["$ids"][0].as_u64().unwrap(),
                m["$ids"][1].as_u64().unwrap(),
            );
            Value::Array(vec![json!(id); n as usize])
        }
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), expand(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(expand).collect()),
        other => other.clone(),
    }
}

fn body_of(case: &Value) -> Vec<u8> {
    if let Some(text) = case["body"].as_str() {
        return text.as_bytes().to_vec();
    }
    if let Some(hex) = case["body_hex"].as_str() {
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
    }
    if case["nest"].is_object() {
        let part = |k: &str| case["nest"][k].as_str().unwrap();
        let depth = case["nest"]["depth"].as_u64().unwrap() as usize;
        let body = [
            part("head").to_owned(),
            part("open").repeat(depth),
            part("leaf").to_owned(),
            part("close").repeat(depth),
            part("tail").to_owned(),
        ];
        return body.concat().into_bytes();
    }
    if !case["json"].is_null() {
        return expand(&case["json"]).to_string().into_bytes();
    }
    Vec::new()
}

/// Resident set size of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    match tokio::time::timeout(REQUEST_BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {REQUEST_BOUND:?} (started {started:?})"),
    }
}

async fn send_case(server: &Server, case: &Value) -> (u16, Value) {
    let route = case["route"].as_str().unwrap();
    let method = case["method"].as_str().unwrap_or("POST");
    let req = match method {
        "POST" => server
            .client
            .post(server.url(route))
            .header("content-type", "application/json")
            .body(body_of(case)),
        other => server
            .client
            .request(other.parse().unwrap(), server.url(route)),
    };
    read(req.send().await.expect("request")).await
}

fn describe(case: &Value) -> String {
    let mut s = case.to_string();
    s.truncate(160);
    s
}

/// The server is alive, healthy and still right: a fixture sentence embeds as the reference
/// does and a greedy chat follows the reference; its memory stayed within the bound.
async fn still_healthy_and_correct(server: &Server, after: &str, baseline_mb: f64) {
    let (status, _) = bounded(after, server.get("/health")).await;
    assert_eq!(status, 200, "/health after {after}");
    let reference = fixture_json("real/minilm/reference.json");
    let sentence = reference["sentences"][0].clone();
    let want: Vec<f64> = serde_json::from_value(reference["embeddings"][0].clone()).unwrap();
    let (status, body) = bounded(
        after,
        server.post_json(
            "/v1/embeddings",
            json!({"model": "minilm", "input": sentence}),
        ),
    )
    .await;
    assert_eq!(status, 200, "embedding after {after}: {body}");
    let got: Vec<f64> = serde_json::from_value(body["data"][0]["embedding"].clone()).unwrap();
    let cosine: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum::<f64>()
        / (got.iter().map(|a| a * a).sum::<f64>().sqrt()
            * want.iter().map(|b| b * b).sum::<f64>().sqrt());
    assert!(cosine > 0.99999, "embedding after {after}: cosine {cosine}");
    // SmolLM2 case 2: its first greedy steps have margins >= 0.1, so the prefix is exact.
    let chat = fixture_json("real/smollm2/reference.json");
    let case = &chat["cases"][2];
    let prefix = "That's a great way to start. I'll";
    assert!(case["generated_text"].as_str().unwrap().starts_with(prefix));
    let (status, r) = bounded(
        after,
        server.post_json(
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": case["messages"], "temperature": 0, "max_tokens": 12}),
        ),
    )
    .await;
    assert_eq!(status, 200, "chat after {after}: {r}");
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with(prefix),
        "chat after {after}: {content:?}"
    );
    let rss = rss_mb(server.pid());
    assert!(
        rss - baseline_mb < RSS_GROWTH_BOUND_MB,
        "after {after}: resident memory {rss:.0} MB, {:.0} MB over the baseline",
        rss - baseline_mb
    );
    println!("after {after}: healthy, correct, RSS {rss:.0} MB (baseline {baseline_mb:.0} MB)");
}

async fn corpus_group(server: &Server, name: &str, cases: &[Value]) {
    for case in cases {
        let what = format!("{name}: {}", describe(case));
        let (status, body) = bounded(&what, send_case(server, case)).await;
        let want = case["status"].as_u64().unwrap() as u16;
        if want >= 400 {
            assert_envelope(status, &body, want, &what);
            if let Some(text) = case["message"].as_str() {
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(msg.contains(text), "{what}: message {msg:?} lacks {text:?}");
            }
        } else {
            assert_eq!(status, want, "{what}: {body}");
        }
    }
}

/// Bodies over `--max-body-bytes` on every route with a body: 413 envelopes, read while the
/// upload is still being written.
async fn oversized_bodies(server: &Server) {
    let giant = json!({"input": "x".repeat(3 << 20)})
        .to_string()
        .into_bytes();
    for route in [
        "/v1/embeddings",
        "/embedding",
        "/keyword",
        "/tokenize",
        "/detokenize",
        "/v1/chat/completions",
    ] {
        let (status, body) = bounded(route, server.post_oversized(route, giant.clone())).await;
        assert_envelope(status, &body, 413, route);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-body-bytes"),
            "{body}"
        );
    }
}

/// Slow-loris: 40 unfinished header blocks and 40 stalled uploads (more than the 16 permits)
/// while real requests keep being served; every slow connection is closed by the server.
async fn slow_clients(server: &Server) {
    let host = server.base.trim_start_matches("http://").to_owned();
    let mut heads = Vec::new();
    let mut uploads = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(&host).await.unwrap();
        s.write_all(
            format!("POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nX-Slow-{i}: ").as_bytes(),
        )
        .await
        .unwrap();
        heads.push(s);
        let mut s = TcpStream::connect(&host).await.unwrap();
        let route = [
            "/v1/embeddings",
            "/keyword",
            "/tokenize",
            "/v1/chat/completions",
        ][i % 4];
        s.write_all(
            format!(
                "POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n{{\"input\": \"abc"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        uploads.push(s);
    }
    // Real requests meanwhile (the stalled uploads hold no permits).
    for _ in 0..4 {
        let (status, body) = bounded(
            "request during slow-loris",
            server.post_json("/v1/embeddings", json!({"input": "hello"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let closes = |s: TcpStream, expect_408: bool| async move {
        let mut s = s;
        let mut got = Vec::new();
        let read = tokio::time::timeout(REQUEST_BOUND, s.read_to_end(&mut got)).await;
        assert!(
            read.is_ok(),
            "a slow connection is still open after {REQUEST_BOUND:?}"
        );
        let reply = String::from_utf8_lossy(&got).into_owned();
        if expect_408 {
            assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        }
    };
    join_all(heads.into_iter().map(|s| closes(s, false))).await;
    join_all(uploads.into_iter().map(|s| closes(s, true))).await;
    // A client that sends a request and stops reading its large answer (about 10 MB, more than
    // the socket buffers hold) is cut off after --write-timeout-secs instead of holding its
    // connection and permit forever.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(host.parse().unwrap()).await.unwrap();
    let body = json!({"prompt": "a b ".repeat(240_000)}).to_string();
    s.write_all(
        format!(
            "POST /tokenize HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Wait for the answer to start (the server has tokenized), then stop reading for longer than
    // the write timeout.
    let mut got = vec![0u8; 1];
    bounded("the start of a large answer", s.read_exact(&mut got))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let read = tokio::time::timeout(REQUEST_BOUND, s.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "a client that stopped reading still holds its connection"
    );
    let split = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    // The server's send buffer (at most tcp_wmem's maximum) must not hold the whole answer.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().last().and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20);
    assert!(
        length > wmem_max + (1 << 20),
        "the answer ({length} bytes) fits in the socket buffers ({wmem_max})"
    );
    let received = got.len() - split - 4;
    assert!(
        received < length,
        "the whole answer arrived: the connection was not cut"
    );
}

/// 48 streams (three times the permits) that disconnect after their first events, twice over;
/// then the permits and batch slots are all free again.
async fn disconnecting_streams(server: &Server) {
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400, "ignore_eos": true, "stream": true});
    for _ in 0..2 {
        let opened = join_all((0..48).map(|_| {
            let req = server
                .client
                .post(server.url("/v1/chat/completions"))
                .json(&body);
            async move {
                let mut resp = req.send().await.expect("request");
                let status = resp.status().as_u16();
                if status == 200 {
                    let _ = tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await;
                }
                (status, resp)
            }
        }))
        .await;
        for (status, resp) in opened {
            if status != 200 {
                let (s, b) = read(resp).await;
                assert_envelope(s, &b, 429, "a stream beyond the permits");
            }
        }
    }
    // Every generation stops and every permit returns.
    let deadline = Instant::now() + REQUEST_BOUND;
    loop {
        let (_, text) = server.get_text("/metrics").await;
        let running = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"glm_chat_running_sequences{model="smollm2"}"#))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let waiting = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"glm_chat_waiting_requests{model="smollm2"}"#))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if running == 0.0 && waiting == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} sequences still running, {waiting} waiting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replies =
        join_all((0..16).map(|_| server.post_json("/v1/embeddings", json!({"input": "again"}))))
            .await;
    let refused = replies.iter().filter(|(s, _)| *s == 429).count();
    let deadline = Instant::now() + REQUEST_BOUND;
    // Permits of dropped streams return when the server notices the disconnect (its next write).
    let mut refused = refused;
    while refused > 0 {
        assert!(
            Instant::now() < deadline,
            "{refused} of 16 permits never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let replies = join_all(
            (0..16).map(|_| server.post_json("/v1/embeddings", json!({"input": "again"}))),
        )
        .await;
        refused = replies.iter().filter(|(s, _)| *s == 429).count();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_do_not_take_the_server_down() {
    let corpus = corpus();
    let minilm = format!("minilm={}", minilm_dir().display());
    let smollm2 = format!(
        "smollm2={}",
        std::env::var_os("GLM_MODELS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".models"))
            .join("SmolLM2-135M-Instruct.Q4_1.gguf")
            .display()
    );
    let mut args = vec!["--model".to_owned(), minilm, "--model".to_owned(), smollm2];
    args.extend(
        corpus["server_flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&args, &[]);
    let started = Instant::now();
    // Baseline after one round of normal traffic (lazy allocations done).
    still_healthy_and_correct(&server, "start", f64::INFINITY).await;
    let baseline = rss_mb(server.pid());
    for name in ["malformed", "unsupported", "oversized"] {
        let cases = corpus["groups"][name].as_array().unwrap();
        corpus_group(&server, name, cases).await;
        still_healthy_and_correct(&server, name, baseline).await;
    }
    oversized_bodies(&server).await;
    still_healthy_and_correct(&server, "bodies over the limit", baseline).await;
    slow_clients(&server).await;
    still_healthy_and_correct(&server, "slow clients", baseline).await;
    disconnecting_streams(&server).await;
    still_healthy_and_correct(&server, "disconnecting streams", baseline).await;
    assert!(server.alive());
    println!("adversarial suite: {:?}", started.elapsed());
}
