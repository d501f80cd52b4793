//! HTTP layer: axum routes with the seed's request/response shapes and OpenAI's, validation, the
//! error envelope, auth, admission and request metrics. It knows models only through the registry
//! (tokenizers, batchers, the chat engine) and never touches tensors.
pub mod chat;
mod embeddings;
mod extract;
mod keyword;
mod middleware;
mod models;
mod ops;
mod tokens;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;

pub use extract::JsonBody;
pub use middleware::ModelLabel;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Request limits from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_client_batch_size: usize,
    pub max_body_bytes: usize,
    /// Default of the per-request `truncate` field on OpenAI routes.
    pub auto_truncate: bool,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub api_key: Option<Arc<str>>,
    /// Admission for inference routes: a request that finds no permit gets 429 at once.
    pub permits: Arc<Semaphore>,
    pub max_concurrent_requests: usize,
    ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        limits: Limits,
        api_key: Option<String>,
        max_concurrent_requests: usize,
    ) -> Self {
        AppState {
            registry,
            metrics,
            limits,
            api_key: api_key.filter(|k| !k.is_empty()).map(Arc::from),
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            max_concurrent_requests,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Flip `/ready` (and `glm_ready`): true once models are warm, false when shutting down.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// The whole application. Inference routes sit behind admission control; everything but
/// `/health`, `/ready` and `/metrics` sits behind the API key when one is set.
pub fn router(state: AppState) -> Router {
    let inference = Router::new()
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embedding", post(embeddings::seed))
        .route("/keyword", post(keyword::keyword))
        .merge(chat::routes())
        .route_layer(from_fn_with_state(state.clone(), middleware::admission));
    let api = inference
        .route("/tokenize", post(models::tokenize))
        .route("/detokenize", post(models::detokenize))
        .route("/models", get(models::list))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get_one))
        .route_layer(from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ));
    let open = Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics));
    api.merge(open)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(from_fn_with_state(state.clone(), middleware::track))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Attach the resolved model name (for metrics) to a handler's outcome.
pub(crate) fn respond<T: IntoResponse>(
    result: Result<T, ApiError>,
    model: Option<String>,
) -> Response {
    let mut resp = match result {
        Ok(ok) => ok.into_response(),
        Err(err) => err.into_response(),
    };
    if let Some(model) = model {
        resp.extensions_mut().insert(ModelLabel(model));
    }
    resp
}

#[cfg(test)]
mod tests;
