//! End-to-end tests of the gateway over real sockets: fake model servers on loopback, the gateway
//! router in front of them with a static routing table, and a reqwest client.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Mutex},
};
use tokio_stream_shim::ReceiverStream;

use super::{
    endpoints::EndpointIndex,
    hold::Holder,
    metrics::GatewayMetrics,
    proxy::{router, GatewayState, ModelList},
    routing::{ModelRecord, RouteSettings, RoutingTable},
    GatewayConfig, Readiness,
};

/// `tokio-stream` is not a dependency of this crate: a minimal receiver stream is enough here.
mod tokio_stream_shim {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::sync::mpsc;

    pub struct ReceiverStream<T>(pub mpsc::Receiver<T>);

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(app: Router) -> SocketAddr {
    let listener = match TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(err) => panic!("cannot bind loopback: {err}"),
    };
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The chat upstream streams whatever the test pushes into its channel, so the test controls
/// exactly when each SSE chunk leaves the upstream.
#[derive(Clone)]
struct ChatUpstream {
    chunks: Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>,
    seen: mpsc::UnboundedSender<(HeaderMap, Value)>,
}

async fn chat_completions(
    State(upstream): State<ChatUpstream>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let _ = upstream.seen.send((headers, body.clone()));
    if body["stream"] != json!(true) {
        return Json(json!({"object": "chat.completion", "model": body["model"]})).into_response();
    }
    let Some(chunks) = upstream.chunks.lock().await.take() else {
        return StatusCode::CONFLICT.into_response();
    };
    let stream = ReceiverStream(chunks).map(Ok::<_, std::convert::Infallible>);
    (
        [
            ("content-type", "text/event-stream"),
            ("x-upstream", "chat"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn embeddings(Json(body): Json<Value>) -> Response {
    if body["input"] == json!("overload") {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "1")],
            r#"{"error":{"message":"busy","type":"server_error","param":null,"code":"overloaded"}}"#,
        )
            .into_response();
    }
    Json(json!({"object": "list", "model": body["model"], "data": [{"object": "embedding", "embedding": [0.5], "index": 0}]}))
        .into_response()
}

struct Harness {
    gateway: String,
    client: reqwest::Client,
    chunks: mpsc::Sender<Bytes>,
    seen: mpsc::UnboundedReceiver<(HeaderMap, Value)>,
}

fn record(
    name: &str,
    served: &str,
    aliases: &[&str],
    endpoint: String,
    ready: bool,
) -> ModelRecord {
    ModelRecord {
        namespace: "ml".into(),
        name: name.into(),
        served_name: served.into(),
        aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
        endpoint: Some(endpoint),
        ready,
        replicas: 1,
        settings: RouteSettings {
            prefix_chars: 100,
            ..RouteSettings::default()
        },
        created: 1_700_000_000,
    }
}

/// Ready pods by GLMModel name (namespace `ml`), as EndpointSlices would list them.
fn pods(entries: &[(&str, &[SocketAddr])]) -> EndpointIndex {
    EndpointIndex::from_map(
        entries
            .iter()
            .map(|(name, addrs)| {
                (
                    ("ml".to_owned(), (*name).to_owned()),
                    addrs.iter().map(ToString::to_string).collect(),
                )
            })
            .collect(),
    )
}

/// A gateway state over a fixed table and endpoint index; requests for a model without pods
/// are held `hold` long.
fn static_state(
    records: &[ModelRecord],
    index: EndpointIndex,
    hold: Duration,
    max_body_bytes: usize,
    readiness: Readiness,
) -> GatewayState {
    let (_tx, table_rx) = watch::channel(Arc::new(RoutingTable::build(records)));
    let (_tx, index_rx) = watch::channel(Arc::new(index));
    GatewayState::new(
        table_rx,
        GatewayConfig::default()
            .upstream_client()
            .unwrap_or_else(|e| panic!("{e}")),
        GatewayMetrics::new().unwrap_or_else(|e| panic!("{e}")),
        max_body_bytes,
        readiness,
    )
    .with_endpoints(index_rx)
    .with_holder(Holder::new(16, hold, None))
}

/// A port nothing listens on: bind one, then let it go.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// A chat upstream on loopback streaming what is pushed into the returned sender; it reports
/// every request it sees on the returned receiver.
async fn chat_upstream() -> (
    SocketAddr,
    mpsc::Sender<Bytes>,
    mpsc::UnboundedReceiver<(HeaderMap, Value)>,
) {
    let (chunks_tx, chunks_rx) = mpsc::channel(16);
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let chat = serve(
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(ChatUpstream {
                chunks: Arc::new(Mutex::new(Some(chunks_rx))),
                seen: seen_tx,
            }),
    )
    .await;
    (chat, chunks_tx, seen_rx)
}

async fn harness(max_body_bytes: usize) -> Harness {
    let (chat, chunks_tx, seen_rx) = chat_upstream().await;
    let embed = serve(Router::new().route("/v1/embeddings", post(embeddings))).await;
    let down = closed_port().await;

    let records = [
        record(
            "glm4",
            "glm-4-9b-chat",
            &["glm4"],
            format!("http://{chat}"),
            true,
        ),
        record("bge", "bge-m3", &[], format!("http://{embed}/"), true),
        record("gone", "gone-model", &[], format!("http://{down}"), true),
        record(
            "warming",
            "qwen2",
            &[],
            "http://qwen2.ml.svc:8080".into(),
            false,
        ),
    ];
    let index = pods(&[("glm4", &[chat]), ("bge", &[embed]), ("gone", &[down])]);
    let state = static_state(
        &records,
        index,
        Duration::from_millis(300),
        max_body_bytes,
        Readiness::synced(),
    );
    let gateway = serve(router(state)).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    Harness {
        gateway: format!("http://{gateway}"),
        client,
        chunks: chunks_tx,
        seen: seen_rx,
    }
}

impl Harness {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.gateway))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.gateway))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

async fn json_of(response: reqwest::Response) -> Value {
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("body is not JSON: {e}"))
}

async fn next_chunk(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<Bytes>> + Unpin),
) -> Bytes {
    match tokio::time::timeout(TIMEOUT, stream.next()).await {
        Ok(Some(Ok(chunk))) => chunk,
        other => panic!("expected a chunk, got {other:?}"),
    }
}

#[tokio::test]
async fn forwards_by_model_and_propagates_status_and_headers() {
    let h = harness(1 << 20).await;

    let ok = h
        .post(
            "/v1/embeddings",
            json!({"model": "bge-m3", "input": ["你好"]}),
        )
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(json_of(ok).await["model"], "bge-m3");

    let busy = h
        .post(
            "/v1/embeddings",
            json!({"model": "bge-m3", "input": "overload"}),
        )
        .await;
    assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.headers()["retry-after"], "1");
    assert_eq!(busy.headers()["content-type"], "application/json");
    assert_eq!(json_of(busy).await["error"]["code"], "overloaded");
}

#[tokio::test]
async fn alias_is_rewritten_to_the_served_name() {
    let mut h = harness(1 << 20).await;
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.gateway))
        .header("authorization", "Bearer secret")
        .json(&json!({"model": "glm4", "messages": [{"role": "user", "content": "hi"}], "stream": false}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["model"], "glm-4-9b-chat");

    let (headers, body) = h
        .seen
        .recv()
        .await
        .unwrap_or_else(|| panic!("upstream saw nothing"));
    assert_eq!(body["model"], "glm-4-9b-chat");
    assert_eq!(
        body["messages"][0]["content"], "hi",
        "the rest of the body is kept"
    );
    assert_eq!(headers["authorization"], "Bearer secret");
}

#[tokio::test]
async fn sse_passes_through_chunk_by_chunk() {
    let mut h = harness(1 << 20).await;
    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "glm-4-9b-chat", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-upstream"], "chat");
    let mut stream = response.bytes_stream();

    // Each chunk must reach the client before the upstream has produced the next one:
    // a buffering gateway would block here until the upstream finished.
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"你\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"好\"}}]}\n\n",
        "data: [DONE]\n\n",
    ];
    for event in events {
        h.chunks
            .send(Bytes::from_static(event.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut received = next_chunk(&mut stream).await.to_vec();
        while received.len() < event.len() {
            received.extend_from_slice(&next_chunk(&mut stream).await);
        }
        assert_eq!(String::from_utf8_lossy(&received), event);
    }
    drop(h.chunks);
    let end = tokio::time::timeout(TIMEOUT, stream.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "stream must end with the upstream: {end:?}"
    );
    assert!(h.seen.recv().await.is_some());
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let h = harness(1 << 20).await;
    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "glm-4-9b-chat", "stream": true}),
        )
        .await;
    let mut stream = response.bytes_stream();
    h.chunks
        .send(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    next_chunk(&mut stream).await;
    drop(stream);

    // The upstream's body (our channel's receiver) must be dropped once the client is gone:
    // keep producing until sending fails, as a generating model would.
    let cancelled = tokio::time::timeout(TIMEOUT, async {
        while h
            .chunks
            .send(Bytes::from_static(b"data: more\n\n"))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        cancelled.is_ok(),
        "upstream kept streaming after the client left"
    );
}

#[tokio::test]
async fn unknown_model_is_404_in_openai_envelope() {
    let h = harness(1 << 20).await;
    let response = h
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = json_of(response).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for name in ["gpt-4", "bge-m3", "glm-4-9b-chat", "glm4"] {
        assert!(message.contains(name), "{message} should name {name}");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_no_ready_pod_is_503_after_the_hold() {
    let h = harness(1 << 20).await;
    let response = h
        .post(
            "/v1/embeddings",
            json!({"model": "gone-model", "input": "x"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = json_of(response).await;
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "upstream_unreachable");

    let response = h
        .post("/v1/chat/completions", json!({"model": "qwen2"}))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "10");
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], "model_not_ready");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--gateway-hold-timeout"), "{message}");
}

#[tokio::test]
async fn bad_bodies_are_rejected_before_forwarding() {
    let h = harness(64).await;
    let too_big = h
        .post(
            "/v1/embeddings",
            json!({"model": "bge-m3", "input": "x".repeat(100)}),
        )
        .await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(too_big).await["error"]["code"], "body_too_large");

    let not_json = h
        .client
        .post(format!("{}/v1/embeddings", h.gateway))
        .body("model=bge-m3")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);

    // Several models are ready, so a body without `model` is ambiguous.
    let no_model = h.post("/tokenize", json!({"prompt": "你好"})).await;
    assert_eq!(no_model.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(no_model).await["error"]["code"], "model_required");
}

#[tokio::test]
async fn models_lists_every_ready_name() {
    let h = harness(1 << 20).await;
    for path in ["/v1/models", "/models"] {
        let list: ModelList = h
            .get(path)
            .await
            .json()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(list.object, "list");
        let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["bge-m3", "glm-4-9b-chat", "glm4", "gone-model"]);
        assert!(list
            .data
            .iter()
            .all(|m| m.object == "model" && m.owned_by == "ml"));
        let alias = list.data.iter().find(|m| m.id == "glm4");
        assert_eq!(alias.map(|m| m.root.as_str()), Some("glm-4-9b-chat"));
    }
    let one = json_of(h.get("/v1/models/bge-m3").await).await;
    assert_eq!(one["id"], "bge-m3");
    assert_eq!(
        h.get("/v1/models/nope").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let h = harness(1 << 20).await;
    let health = json_of(h.get("/health").await).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["ready_models"], 4);

    let _ = h
        .post("/v1/embeddings", json!({"model": "bge-m3", "input": "x"}))
        .await;
    let _ = h
        .post("/v1/embeddings", json!({"model": "nope", "input": "x"}))
        .await;
    let text = h
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        text.contains(
            r#"glm_gateway_requests_total{model="bge-m3",route="/v1/embeddings",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"glm_gateway_requests_total{model="_unrouted",route="/v1/embeddings",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains("glm_gateway_request_duration_seconds_count"),
        "{text}"
    );
}

mod backends;
mod drain;
mod hold;
