//! The HTTP side of the gateway: model listing and request forwarding.
//!
//! Forwarding reads the (bounded) request body once, looks only at its `model` field (and, for
//! `PrefixHash` chat models, its messages), waits for a ready pod if there is none
//! ([`super::hold`]), sends it to a pod ([`super::upstream`]) and streams the answer back
//! untouched: status, content type and bytes as they arrive, so SSE chunks reach the client one
//! by one. Dropping the response (client gone) drops the upstream request, which closes its
//! connection and lets the model server cancel the generation.

use std::sync::Arc;
use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{Path, Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use glm_crds::RoutingStrategy;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    auth::ApiKeys,
    balancer::{Balancer, Pick},
    endpoints::EndpointIndex,
    error::GatewayError,
    hold::{labels, Holder},
    lifecycle::{ConnectTo, Readiness},
    metrics::{GatewayMetrics, UNROUTED},
    routing::{Lookup, Route, RoutingTable},
    upstream::{prompt_key, send_with_retries, stream_back, Outgoing},
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

/// Paths whose bodies are chat prompts (`PrefixHash` applies to them only).
const CHAT_PATHS: [&str; 2] = ["/v1/chat/completions", "/chat"];

#[derive(Clone)]
pub struct GatewayState {
    table: watch::Receiver<Arc<RoutingTable>>,
    endpoints: watch::Receiver<Arc<EndpointIndex>>,
    client: reqwest::Client,
    metrics: GatewayMetrics,
    max_body_bytes: usize,
    readiness: Readiness,
    connect_to: Arc<ConnectTo>,
    balancer: Balancer,
    holder: Holder,
    max_attempts: usize,
    api_keys: ApiKeys,
}

impl GatewayState {
    pub fn new(
        table: watch::Receiver<Arc<RoutingTable>>,
        client: reqwest::Client,
        metrics: GatewayMetrics,
        max_body_bytes: usize,
        readiness: Readiness,
    ) -> Self {
        let (_, endpoints) = watch::channel(Arc::default());
        let defaults = super::GatewayConfig::default();
        Self {
            table,
            endpoints,
            client,
            metrics,
            max_body_bytes,
            readiness,
            connect_to: Arc::default(),
            balancer: Balancer::default(),
            holder: Holder::new(
                defaults.gateway_max_held,
                Duration::from_secs(defaults.gateway_hold_timeout_secs),
                None,
            ),
            max_attempts: usize::from(defaults.gateway_max_attempts),
            api_keys: ApiKeys::disabled(),
        }
    }

    pub fn with_connect_to(mut self, connect_to: ConnectTo) -> Self {
        self.connect_to = Arc::new(connect_to);
        self
    }

    /// The ready pods of each model's Service.
    pub fn with_endpoints(mut self, endpoints: watch::Receiver<Arc<EndpointIndex>>) -> Self {
        self.endpoints = endpoints;
        self
    }

    pub fn with_holder(mut self, holder: Holder) -> Self {
        self.holder = holder;
        self
    }

    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = keys;
        self
    }

    fn table(&self) -> Arc<RoutingTable> {
        Arc::clone(&self.table.borrow())
    }

    pub(super) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub(super) fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    pub(super) fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    pub(super) fn max_attempts(&self) -> usize {
        self.max_attempts
    }

    /// The route's ready pods now; `None` when it has none.
    pub(super) fn ready_pods(&self, route: &Route) -> Option<Vec<String>> {
        let pods = self.endpoints.borrow().ready(&route.service_key()).to_vec();
        (!pods.is_empty()).then_some(pods)
    }

    /// Base URL for a pod. A `--gateway-connect-to` naming the model's Service (`status.endpoint`)
    /// wins: a gateway outside the cluster cannot reach pod IPs, only what the override names.
    pub(super) fn upstream_base(&self, route: &Route, pod: &str) -> String {
        if let Some(service) = &route.endpoint {
            let overridden = self.connect_to.apply(service.as_str());
            if overridden != service.as_str() {
                return overridden;
            }
        }
        self.connect_to.apply(&format!("http://{pod}"))
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
        data: table.ready_routes().map(card).collect(),
    })
}

async fn get_model(
    State(state): State<GatewayState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, GatewayError> {
    let table = state.table();
    match table.lookup(&model) {
        Lookup::Found(route) if route.ready => Ok(Json(card(route))),
        Lookup::Found(_) => Err(GatewayError::ModelNotReady(model)),
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
    if let Err(err) = state.api_keys.check(&parts.headers, &state.metrics) {
        state
            .metrics
            .record_status(UNROUTED, route_label, err.status().as_u16());
        return err.into_response();
    }
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
    let model_labels = labels(&route);
    state.metrics.model_request(&model_labels);
    let timer = state.metrics.timer(&route.served_name, route_label);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or(route_label, |pq| pq.as_str());
    let pick = match route.settings.strategy {
        RoutingStrategy::PrefixHash if CHAT_PATHS.contains(&route_label) => {
            prompt_key(&body, route.settings.prefix_chars).map_or(Pick::LeastLoad, Pick::Hash)
        }
        _ => Pick::LeastLoad,
    };
    let out = Outgoing {
        method: parts.method,
        headers: &parts.headers,
        path_and_query,
        body,
        pick,
    };
    let response = async {
        let mut endpoints = state.endpoints.clone();
        let pods = state
            .holder
            .wait_for_pods(&route, &mut endpoints, &state.metrics)
            .await?;
        let in_flight = state.metrics.in_flight(&model_labels);
        let answer = send_with_retries(&state, &route, pods, &out).await?;
        Ok::<_, GatewayError>(stream_back(&state, &route, answer, in_flight, timer))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    state
        .metrics
        .record_status(&route.served_name, route_label, response.status().as_u16());
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
        Lookup::Found(route) => Ok(route),
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
