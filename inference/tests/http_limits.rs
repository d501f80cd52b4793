//! The server's bounds against the real binary: slow clients (headers and bodies that never
//! finish) are cut off and hold no admission permit, a stream holds its permit for its whole life,
//! shutdown cuts streams at its deadline, an empty API key stops the start, and `/tokenize` shows
//! byte-level tokens readably.
mod http_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tiny_arg() -> String {
    let dir: PathBuf = fixtures_dir().join("tiny/glm4-0414");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing; set GLM_FIXTURES_DIR",
        dir.display()
    );
    format!("tiny={}", dir.display())
}

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Read until the server closes the connection (or `within` passes); returns what it sent.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_hold_no_permits() {
    // Four permits; the timeouts are short so that the test is quick.
    let server = Server::minilm(&[
        "--max-concurrent-requests",
        "4",
        "--header-read-timeout-secs",
        "2",
        "--body-read-timeout-secs",
        "2",
    ]);
    let host = addr(&server);
    // Twelve clients that send complete headers and a few body bytes, then stall; six that never
    // finish their headers.
    let mut stalled_bodies = Vec::new();
    for _ in 0..12 {
        let mut s = TcpStream::connect(&host).await.unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"input\": \"a"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        stalled_bodies.push(s);
    }
    let mut stalled_heads = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(&host).await.unwrap();
        s.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await
            .unwrap();
        stalled_heads.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Real requests are served meanwhile: the stalled uploads hold no permit.
    for _ in 0..6 {
        let (status, body) = server
            .post_json("/v1/embeddings", json!({"input": "hello"}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // The stalled bodies get a 408 envelope and the connection is closed.
    for mut s in stalled_bodies {
        let reply = read_until_closed(&mut s, Duration::from_secs(30))
            .await
            .expect("the server closes a stalled upload");
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains("--body-read-timeout-secs"), "{reply}");
    }
    // Unfinished headers: the connection is closed (hyper's header timeout).
    for mut s in stalled_heads {
        assert!(
            read_until_closed(&mut s, Duration::from_secs(30))
                .await
                .is_some(),
            "a connection with unfinished headers is still open"
        );
    }
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
}

/// The tiny chat fixture served with `flags`, and a greedy stream of 100,000 tokens that has sent
/// its first event and is left open.
async fn server_with_open_stream(flags: &[&str]) -> (Server, reqwest::Response) {
    let tiny = tiny_arg();
    let mut args = vec!["--model", tiny.as_str(), "--chat-max-tokens", "100000"];
    args.extend_from_slice(flags);
    let server = Server::start(&args, &[]);
    let long = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000,
        "ignore_eos": true, "temperature": 0, "stream": true});
    let mut open = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status().as_u16(), 200);
    assert!(open.chunk().await.unwrap().is_some(), "first event");
    (server, open)
}

#[tokio::test]
async fn a_stream_holds_its_permit_until_it_ends() {
    let (server, open) = server_with_open_stream(&["--max-concurrent-requests", "1"]).await;
    let short = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, err) = server
        .post_json("/v1/chat/completions", short.clone())
        .await;
    assert_envelope(status, &err, 429, "while a stream is open");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--max-concurrent-requests"), "{msg}");
    drop(open);
    // The server notices the disconnect at its next write (a token or a keep-alive).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server
            .post_json("/v1/chat/completions", short.clone())
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(Instant::now() < deadline, "the permit was never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn shutdown_cuts_streams_at_its_deadline() {
    let (mut server, mut open) = server_with_open_stream(&["--shutdown-timeout-secs", "1"]).await;
    // Without the deadline the server would wait for 100,000 tokens.
    let status = server.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let mut tail = String::new();
    while let Ok(Some(bytes)) = open.chunk().await {
        tail.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(!tail.contains("[DONE]"), "the stream was not cut");
}

#[test]
fn an_empty_api_key_stops_the_start() {
    let model = format!("minilm={}", minilm_dir().display());
    for (args, env) in [(vec!["--api-key", ""], None), (vec![], Some(""))] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--model", &model])
            .args(&args)
            .env_remove("GLM_MODELS")
            .env_remove("API_KEY");
        if let Some(v) = env {
            cmd.env("API_KEY", v);
        }
        let out = cmd.output().expect("run glm-inference");
        assert!(!out.status.success(), "{args:?} {env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("API_KEY") && stderr.contains("empty"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn tokenize_returns_readable_text_for_byte_level_tokens() {
    let tiny = tiny_arg();
    let server = Server::start(&["--model", &tiny], &[]);
    let tok =
        tokenizers::Tokenizer::from_file(fixtures_dir().join("tiny/glm4-0414/tokenizer.json"))
            .unwrap();
    let text = "给你一个机会，你会想逃离你所在的虚拟世界吗？ Hello world";
    let (status, body) = server
        .post_json(
            "/tokenize",
            json!({"prompt": text, "add_special_tokens": false}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u32> = serde_json::from_value(body["tokenIds"].clone()).unwrap();
    let tokens: Vec<String> = serde_json::from_value(body["tokens"].clone()).unwrap();
    let raw: Vec<String> = serde_json::from_value(body["rawTokens"].clone()).unwrap();
    let expected_raw: Vec<String> = tok.encode(text, false).unwrap().get_tokens().to_vec();
    assert_eq!(raw, expected_raw);
    assert_eq!(tokens.len(), ids.len());
    for (id, t) in ids.iter().zip(&tokens) {
        // Each token reads as the tokenizer decodes it alone.
        assert_eq!(&tok.decode(&[*id], false).unwrap(), t);
    }
    // The fixture's small vocabulary has "你" and " H" as tokens; the seed's words are bytes there.
    assert!(tokens.iter().any(|t| t == "你"), "{tokens:?}");
    assert!(raw.iter().any(|t| t == "ä½ł"), "{raw:?}");
    assert!(tokens.iter().any(|t| t == " H"), "{tokens:?}");
    assert!(raw.iter().any(|t| t == "ĠH"), "{raw:?}");
    assert!(
        tokens.iter().all(|t| !t.contains('Ġ') && !t.contains('ç')),
        "byte symbols leaked: {tokens:?}"
    );
    let (_, body) = server
        .post_json(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "你好 world"}]}),
        )
        .await;
    let tokens: Vec<Value> = serde_json::from_value(body["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), body["rawTokens"].as_array().unwrap().len());
}
