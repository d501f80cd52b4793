//! The gateway in front of several REAL `glm-inference` processes on loopback (the tiny GLM-4
//! fixture checkpoint), with the EndpointSlice index a cluster would give: balancing, retries
//! when a pod dies, unbuffered streams and cancellation, observed on the backends' own metrics.
//!
//! The `glm-inference` binary comes from the same target directory (`cargo test --workspace`
//! builds it) or `GLM_INFERENCE_BIN`.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Instant,
};

use super::*;

/// A glm-inference process serving the tiny chat fixture as `tiny`; killed on drop.
pub(super) struct Backend {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn inference_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GLM_INFERENCE_BIN") {
        return PathBuf::from(bin);
    }
    // target/debug/deps/<this test> -> target/debug/glm-inference
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("glm-inference"))
        .unwrap_or_default();
    assert!(
        bin.is_file(),
        "{} missing: build it (`cargo build -p glm-inference`, or `cargo test --workspace`) or set GLM_INFERENCE_BIN",
        bin.display()
    );
    bin
}

fn tiny_model() -> PathBuf {
    let fixtures = std::env::var_os("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let dir = fixtures.join("tiny/glm4-0414");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing; set GLM_FIXTURES_DIR",
        dir.display()
    );
    dir
}

impl Backend {
    /// Starts one and waits until it listens (its log names the address).
    pub(super) fn start() -> Self {
        let model = format!("tiny={}", tiny_model().display());
        let mut child = Command::new(inference_bin())
            .args(["--host", "127.0.0.1", "--port", "0", "--model", &model])
            // All of one backend's streams run at once: the test counts them as running.
            .args(["--chat-max-batch-size", "32", "--threads", "1"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning glm-inference: {e}"));
        let (tx, rx) = std::sync::mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("glm-inference did not listen:\n{}", seen.join("\n"));
            };
            let found = line
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(|a| a.trim_start_matches("http://").to_owned());
            if let Some(addr) = found.and_then(|a| a.parse().ok()) {
                break addr;
            }
            seen.push(line);
        };
        Self { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn metrics(&self, client: &reqwest::Client) -> String {
        client
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap_or_else(|e| panic!("backend metrics: {e}"))
            .text()
            .await
            .unwrap_or_default()
    }

    /// Chat sequences running or waiting in this backend now.
    async fn in_engine(&self, client: &reqwest::Client) -> i64 {
        let text = self.metrics(client).await;
        ["glm_chat_running_sequences", "glm_chat_waiting_requests"]
            .iter()
            .map(|name| metric_sum(&text, name) as i64)
            .sum()
    }

    async fn cancelled(&self, client: &reqwest::Client) -> f64 {
        metric_sum(&self.metrics(client).await, "glm_chat_cancelled_total")
    }
}

/// Sum of every sample of a metric in Prometheus text.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A gateway routing the model `tiny` (GLMModel ml/tiny) to these pods.
async fn gateway_over(addrs: &[SocketAddr]) -> (String, GatewayState) {
    let records = [record(
        "tiny",
        "tiny",
        &[],
        "http://tiny.ml.svc:8200".into(),
        true,
    )];
    let state = static_state(
        &records,
        pods(&[("tiny", addrs)]),
        Duration::from_secs(5),
        1 << 20,
        Readiness::synced(),
    );
    let addr = serve(router(state.clone())).await;
    (format!("http://{addr}"), state)
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "tiny", "stream": stream, "max_tokens": max_tokens, "ignore_eos": true,
           "temperature": 0, "messages": [{"role": "user", "content": "你好"}]})
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_load_spreads_32_streams_within_one_of_even() {
    let backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (gateway, _state) = gateway_over(&addrs).await;
    let client = client();
    // Long generations: all 32 are still running when the last one is routed.
    let opened = futures::future::join_all((0..32).map(|_| {
        client
            .post(format!("{gateway}/v1/chat/completions"))
            .json(&chat(8000, true))
            .send()
    }))
    .await;
    let streams: Vec<reqwest::Response> = opened
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("stream did not open: {e}")))
        .collect();
    assert!(streams.iter().all(|s| s.status() == StatusCode::OK));
    let mut loads = Vec::new();
    until("all 32 streams in the backends' engines", async || {
        loads.clear();
        for b in &backends {
            loads.push(b.in_engine(&client).await);
        }
        loads.iter().sum::<i64>() == 32
    })
    .await;
    assert!(loads.iter().all(|l| (10..=11).contains(l)), "{loads:?}");
    drop(streams);
    // Dropping the streams cancels every generation upstream.
    until("generations cancelled", async || {
        let mut sum = 0;
        for b in &backends {
            sum += b.in_engine(&client).await;
        }
        sum == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backend_fails_no_request_started_after_it_died() {
    let mut backends: Vec<Backend> = (0..3).map(|_| Backend::start()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // The index still lists the dead pod, as EndpointSlices do until the kubelet reports it.
    let (gateway, state) = gateway_over(&addrs).await;
    let client = client();
    let halt = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (client, gateway, halt) = (client.clone(), gateway.clone(), halt.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                while !halt.load(std::sync::atomic::Ordering::SeqCst) {
                    let started = Instant::now();
                    let sent = client
                        .post(format!("{gateway}/v1/chat/completions"))
                        .json(&chat(4, false))
                        .send()
                        .await;
                    let status = match sent {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    results.push((started, status));
                }
                results
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    backends[1].kill();
    let died = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    halt.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut after = Vec::new();
    for worker in workers {
        let results = worker.await.unwrap_or_else(|e| panic!("{e}"));
        after.extend(
            results
                .into_iter()
                .filter(|(s, _)| *s > died)
                .map(|(_, st)| st),
        );
    }
    assert!(
        after.len() >= 6,
        "too few requests after the kill: {}",
        after.len()
    );
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
    let metrics = state_metrics(&state);
    assert!(
        metric_sum(&metrics, "glm_gateway_retries_total") >= 1.0,
        "{metrics}"
    );
}

fn state_metrics(state: &GatewayState) -> String {
    state.metrics().render().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_are_unbuffered_and_a_leaving_client_cancels_the_generation() {
    let backend = Backend::start();
    let (gateway, state) = gateway_over(&[backend.addr]).await;
    let client = client();
    let response = client
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&chat(8000, true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let first = next_chunk(&mut stream).await;
    assert!(first.starts_with(b"data: "), "{first:?}");
    // The first chunk came through while the backend still generates the other ~8000 tokens.
    assert_eq!(backend.in_engine(&client).await, 1);
    let text = state_metrics(&state);
    assert!(
        text.contains(r#"glm_gateway_model_in_flight{model="tiny",namespace="ml"} 1"#),
        "{text}"
    );
    drop(stream);
    until("the generation cancelled", async || {
        backend.in_engine(&client).await == 0 && backend.cancelled(&client).await == 1.0
    })
    .await;
    let text = state_metrics(&state);
    assert!(
        text.contains(r#"glm_gateway_model_in_flight{model="tiny",namespace="ml"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"glm_gateway_model_requests_total{model="tiny",namespace="ml"} 1"#),
        "{text}"
    );
}
