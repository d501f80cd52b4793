//! Gateway overhead: latency of a request sent straight to a glm-inference process vs through
//! the gateway (static routing table and endpoint index, as the cluster watches would give, in
//! this process on its own runtime threads), sequential and with concurrent clients. Prints a
//! table; run through `scripts/bench-gateway.sh`, which starts the backend.
//!
//! env: GLM_BENCH_BACKEND (host:port of a glm-inference serving `tiny`; default: a stub answering
//! in-process), GLM_BENCH_REQUESTS (per row, default 2000), GLM_BENCH_PATH / GLM_BENCH_BODY (the
//! request; default /tokenize). `cargo test --all-targets` runs it without `--bench`: a smoke run
//! of 20 requests against the stub.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use glm_operator::gateway::{
    endpoints::EndpointIndex,
    router,
    routing::{ModelRecord, RouteSettings, RoutingTable},
    GatewayConfig, GatewayMetrics, GatewayState, Readiness,
};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let backend: SocketAddr = match std::env::var("GLM_BENCH_BACKEND") {
        Ok(addr) if full => addr
            .parse()
            .unwrap_or_else(|e| panic!("GLM_BENCH_BACKEND: {e}")),
        _ => start_stub(),
    };
    let requests: usize = std::env::var("GLM_BENCH_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|_| full)
        .unwrap_or(if full { 2000 } else { 20 });
    let path = std::env::var("GLM_BENCH_PATH").unwrap_or_else(|_| "/tokenize".into());
    let body = std::env::var("GLM_BENCH_BODY")
        .unwrap_or_else(|_| r#"{"model":"tiny","prompt":"hello world"}"#.into());

    let gateway = start_gateway(backend);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    println!("| path | clients | requests | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for clients in [1usize, 8] {
        let direct = client_rt.block_on(measure(backend, &path, &body, requests, clients));
        let through = client_rt.block_on(measure(gateway, &path, &body, requests, clients));
        let (d50, d99) = (percentile(&direct, 0.50), percentile(&direct, 0.99));
        let (g50, g99) = (percentile(&through, 0.50), percentile(&through, 0.99));
        println!(
            "| `{path}` | {clients} | {requests} | {} | {} | **{}** | {} | {} | {} |",
            ms(d50),
            ms(g50),
            ms(g50 - d50),
            ms(d99),
            ms(g99),
            ms(g99 - d99)
        );
    }
}

fn ms(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1e3)
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// A backend answering every POST at once with a small JSON body (when no glm-inference is given).
fn start_stub() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async move {
            let app = axum::Router::new().fallback(|| async {
                axum::Json(serde_json::json!({"tokenIds": [1, 2], "tokens": ["hello", "world"]}))
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tx.send(listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
            let _ = axum::serve(listener, app).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("stub did not start: {e}"))
}

/// The gateway on loopback, on two runtime threads of its own (as a small gateway pod).
fn start_gateway(backend: SocketAddr) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async move {
            let record = ModelRecord {
                namespace: "bench".into(),
                name: "tiny".into(),
                served_name: "tiny".into(),
                aliases: Vec::new(),
                endpoint: Some("http://tiny.bench.svc:8200".into()),
                ready: true,
                replicas: 1,
                settings: RouteSettings::default(),
                created: 0,
            };
            let table = Arc::new(RoutingTable::build(&[record]));
            let index = Arc::new(EndpointIndex::from_map(BTreeMap::from([(
                ("bench".to_owned(), "tiny".to_owned()),
                vec![backend.to_string()],
            )])));
            let (_table_tx, table_rx) = tokio::sync::watch::channel(table);
            let (_index_tx, index_rx) = tokio::sync::watch::channel(index);
            let state = GatewayState::new(
                table_rx,
                GatewayConfig::default()
                    .upstream_client()
                    .unwrap_or_else(|e| panic!("{e}")),
                GatewayMetrics::new().unwrap_or_else(|e| panic!("{e}")),
                1 << 20,
                Readiness::synced(),
            )
            .with_endpoints(index_rx);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tx.send(listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
            let _ = axum::serve(listener, router(state)).await;
            drop((_table_tx, _index_tx));
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"))
}

/// Seconds per request, `requests` in all over `clients` concurrent keep-alive clients (after a
/// warm-up of 100).
async fn measure(
    target: SocketAddr,
    path: &str,
    body: &str,
    requests: usize,
    clients: usize,
) -> Vec<f64> {
    let url = format!("http://{target}{path}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let one = |client: reqwest::Client, url: String, body: String| async move {
        let started = Instant::now();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        let _ = response.bytes().await;
        started.elapsed().as_secs_f64()
    };
    for _ in 0..requests.min(100) {
        one(client.clone(), url.clone(), body.to_owned()).await;
    }
    let per_client = requests.div_ceil(clients);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.to_owned());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    samples.push(one(client.clone(), url.clone(), body.clone()).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap_or_else(|e| panic!("{e}")));
    }
    samples
}
