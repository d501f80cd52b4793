//! The HTTP side of the gateway: model listing and request forwarding.
//!
//! Forwarding reads the (bounded) request body once, looks only at its `model` field, and streams
//! the upstream response back untouched: status, content type and bytes as they arrive, so SSE
//! chunks reach the client one by one. Dropping the response (client gone) drops the upstream
//! request, which closes its connection and lets the model server cancel the generation.

use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{header, HeaderMap, HeaderName, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    error::GatewayError,
    lifecycle::{ConnectTo, Readiness},
    metrics::{GatewayMetrics, UNROUTED},
    routing::{Lookup, Route, RoutingTable},
};

/// Paths forwarded to the model named in the body: the inference server's own routes.
pub const FORWARDED_PATHS: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/chat",
    "/embedding",
    "/tokenize",
    "/detokenize",
    "/keyword",
];

#[derive(Clone)]
pub struct GatewayState {
    table: watch::Receiver<Arc<RoutingTable>>,
    client: reqwest::Client,
    metrics: GatewayMetrics,
    max_body_bytes: usize,
    readiness: Readiness,
    connect_to: Arc<ConnectTo>,
}

impl GatewayState {
    pub fn new(
        table: watch::Receiver<Arc<RoutingTable>>,
        client: reqwest::Client,
        metrics: GatewayMetrics,
        max_body_bytes: usize,
        readiness: Readiness,
    ) -> Self {
        Self {
            table,
            client,
            metrics,
            max_body_bytes,
            readiness,
            connect_to: Arc::default(),
        }
    }

    pub fn with_connect_to(mut self, connect_to: ConnectTo) -> Self {
        self.connect_to = Arc::new(connect_to);
        self
    }

    fn table(&self) -> Arc<RoutingTable> {
        Arc::clone(&self.table.borrow())
    }
}

pub fn router(state: GatewayState) -> Router {
    let mut router = Router::new()
        .route("/v1/models", get(list_models))
        .route("/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    for path in FORWARDED_PATHS {
        router = router.route(
            path,
            post(move |State(state): State<GatewayState>, request: Request| {
                forward(state, path, request)
            }),
        );
    }
    router.fallback(unknown_path).with_state(state)
}

/// One entry of OpenAI's `GET /v1/models` list.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    /// The primary served name: equal to `id` except for aliases.
    pub root: String,
    pub parent: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

fn card(route: &Route) -> ModelCard {
    ModelCard {
        id: route.requested.clone(),
        object: "model".into(),
        created: route.created,
        owned_by: route.namespace.clone(),
        root: route.served_name.clone(),
        parent: None,
    }
}

async fn list_models(State(state): State<GatewayState>) -> Json<ModelList> {
    let table = state.table();
    Json(ModelList {
        object: "list".into(),
        data: table.routes().map(card).collect(),
    })
}

async fn get_model(
    State(state): State<GatewayState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, GatewayError> {
    let table = state.table();
    match table.lookup(&model) {
        Lookup::Ready(route) => Ok(Json(card(route))),
        Lookup::NotReady => Err(GatewayError::ModelNotReady(model)),
        Lookup::Unknown => Err(not_found(&table, model)),
    }
}

async fn health(State(state): State<GatewayState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "ready_models": state.table().len()}))
}

/// The readiness probe: 503 until the first full list of GLMModels is routed, and again from
/// SIGTERM on, so a Service sends no traffic to a gateway that would answer 404 or go away.
async fn ready(State(state): State<GatewayState>) -> Response {
    let models = state.table().len();
    match state.readiness.not_ready_reason() {
        None => {
            Json(serde_json::json!({"status": "ready", "ready_models": models})).into_response()
        }
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": reason, "ready_models": models})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<GatewayState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn unknown_path(request: Request) -> GatewayError {
    GatewayError::RouteNotFound(request.uri().path().to_owned())
}

fn not_found(table: &RoutingTable, requested: String) -> GatewayError {
    GatewayError::ModelNotFound {
        requested,
        available: table.names().map(str::to_owned).collect(),
    }
}

/// The only field of the body the gateway reads.
#[derive(Deserialize)]
struct ModelField {
    model: Option<String>,
}

async fn forward(state: GatewayState, route_label: &'static str, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let outcome = async {
        let body = axum::body::to_bytes(body, state.max_body_bytes)
            .await
            .map_err(|err| body_error(err, state.max_body_bytes))?;
        let table = state.table();
        let route = resolve(&table, &body)?.clone();
        let body = rewrite_alias(&route, body)?;
        Ok::<_, GatewayError>((route, body))
    }
    .await;

    let (route, body) = match outcome {
        Ok(found) => found,
        Err(err) => {
            state
                .metrics
                .record_status(UNROUTED, route_label, err.status().as_u16());
            return err.into_response();
        }
    };

    let model = route.served_name.as_str();
    let timer = state.metrics.timer(model, route_label);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(route_label, |pq| pq.as_str());
    let response = match send_upstream(
        &state,
        &route,
        parts.method,
        &parts.headers,
        path_and_query,
        body,
    )
    .await
    {
        Ok(upstream) => stream_back(&state, model, upstream, timer),
        Err(err) => err.into_response(),
    };
    state
        .metrics
        .record_status(model, route_label, response.status().as_u16());
    response
}

fn body_error(err: axum::Error, limit: usize) -> GatewayError {
    let too_large = std::error::Error::source(&err)
        .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
    if too_large {
        GatewayError::BodyTooLarge(limit)
    } else {
        GatewayError::InvalidBody(err.to_string())
    }
}

fn resolve<'t>(table: &'t RoutingTable, body: &[u8]) -> Result<&'t Route, GatewayError> {
    let field: ModelField = serde_json::from_slice(body)
        .map_err(|err| GatewayError::InvalidBody(format!("expected a JSON object: {err}")))?;
    let Some(model) = field.model else {
        return table.sole_route().ok_or_else(|| {
            GatewayError::ModelRequired(table.names().map(str::to_owned).collect())
        });
    };
    match table.lookup(&model) {
        Lookup::Ready(route) => Ok(route),
        Lookup::NotReady => Err(GatewayError::ModelNotReady(model)),
        Lookup::Unknown => Err(not_found(table, model)),
    }
}

/// The upstream knows a model only by its served name: replace an alias in the body by it.
fn rewrite_alias(route: &Route, body: Bytes) -> Result<Bytes, GatewayError> {
    if !route.is_alias() {
        return Ok(body);
    }
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|err| GatewayError::InvalidBody(err.to_string()))?;
    object.insert("model".into(), route.served_name.clone().into());
    serde_json::to_vec(&object)
        .map(Bytes::from)
        .map_err(|err| GatewayError::InvalidBody(err.to_string()))
}

async fn send_upstream(
    state: &GatewayState,
    route: &Route,
    method: Method,
    headers: &HeaderMap,
    path_and_query: &str,
    body: Bytes,
) -> Result<reqwest::Response, GatewayError> {
    let model = route.served_name.as_str();
    // Concatenate rather than Url::join so an endpoint with a path prefix keeps it.
    let endpoint = state.connect_to.apply(route.endpoint.as_str());
    let url = format!("{}{}", endpoint.trim_end_matches('/'), path_and_query);
    let mut forwarded = forwardable(headers);
    forwarded.remove(header::CONTENT_LENGTH);
    tracing::debug!(model, %url, "forwarding");
    state
        .client
        .request(method, url)
        .headers(forwarded)
        .body(body)
        .send()
        .await
        .map_err(|err| {
            let reason = error_chain(&err);
            if err.is_connect() {
                state.metrics.upstream_error(model, "connect");
                GatewayError::UpstreamUnreachable {
                    model: model.to_owned(),
                    reason,
                }
            } else if err.is_timeout() {
                state.metrics.upstream_error(model, "timeout");
                GatewayError::UpstreamTimeout {
                    model: model.to_owned(),
                    reason,
                }
            } else {
                state.metrics.upstream_error(model, "request");
                GatewayError::UpstreamFailed {
                    model: model.to_owned(),
                    reason,
                }
            }
        })
}

fn stream_back(
    state: &GatewayState,
    model: &str,
    upstream: reqwest::Response,
    timer: super::metrics::RequestTimer,
) -> Response {
    let status = upstream.status();
    let mut headers = forwardable(upstream.headers());
    // The body is re-chunked by our server; a stale length would corrupt the framing.
    headers.remove(header::CONTENT_LENGTH);
    let metrics = state.metrics.clone();
    let model = model.to_owned();
    let body = upstream.bytes_stream().map(move |chunk| {
        // The timer lives as long as the stream: it records when the body ends or is dropped.
        let _timer = &timer;
        chunk.inspect_err(|err| {
            metrics.upstream_error(&model, "body");
            tracing::warn!(model = %model, error = %error_chain(err), "upstream body failed mid-stream");
        })
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// End-to-end headers: everything except hop-by-hop ones (RFC 9110 §7.6.1) and `Host`.
fn forwardable(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            *name != header::HOST
                && !HOP_BY_HOP.contains(&name.as_str())
                && !named_by_connection.contains(name)
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// reqwest's Display hides the cause ("error sending request"); the chain says why.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
