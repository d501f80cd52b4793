//! HTTP layer: axum routes with the seed's request/response shapes and OpenAI's, validation, the
//! error envelope, auth, admission and request metrics. It knows models only through the registry
//! (tokenizers, batchers, the chat engine) and never touches tensors.
mod admission;
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
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

pub use admission::{Pools, RouteClass};
pub use chat::policy::ChatLimits;
pub use extract::JsonBody;
pub use middleware::ModelLabel;

use crate::error::ApiError;
use crate::keyword::KeywordLimits;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Request limits from the command line (defaults: `Limits::default()`, which the flags' defaults
/// equal).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_client_batch_size: usize,
    pub max_body_bytes: usize,
    /// Default of the per-request `truncate` field on OpenAI routes.
    pub auto_truncate: bool,
    /// Time a request body may take to arrive (408 beyond).
    pub body_read_timeout: Duration,
    /// `/keyword` requests in flight at once (429 beyond).
    pub max_concurrent_keyword: usize,
    /// `/tokenize` and `/detokenize` requests in flight at once (429 beyond).
    pub max_concurrent_tokenize: usize,
    /// Most tokens one `/tokenize` answer or `/detokenize` request may carry (400 beyond).
    pub tokenize_max_tokens: usize,
    pub keyword: KeywordLimits,
    pub chat: ChatLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_batch_size: 256,
            max_body_bytes: 8 * 1024 * 1024,
            auto_truncate: false,
            body_read_timeout: Duration::from_secs(60),
            max_concurrent_keyword: 8,
            max_concurrent_tokenize: 16,
            tokenize_max_tokens: 131_072,
            keyword: KeywordLimits::default(),
            chat: ChatLimits::default(),
        }
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub api_key: Option<Arc<str>>,
    /// Admission: a request that finds no permit in its pools gets 429 at once.
    pub pools: Pools,
    ready: Arc<AtomicBool>,
}

impl AppState {
    /// `api_key`: `None` serves without a key (an empty key is refused earlier, by `Args::validate`).
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
            api_key: api_key.map(Arc::from),
            pools: Pools::new(
                max_concurrent_requests,
                limits.max_concurrent_keyword,
                limits.max_concurrent_tokenize,
            ),
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

/// The whole application. Routes with a body have it read whole (size and time limits) before
/// admission takes their permits (global, plus the route's own pool for `/keyword` and the
/// tokenizer routes); everything but `/health`, `/ready` and `/metrics` sits behind the API key
/// when one is set, checked before the body is read.
pub fn router(state: AppState) -> Router {
    let admit = |class| from_fn_with_state((state.clone(), class), admission::admit);
    let inference = Router::new()
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embedding", post(embeddings::seed))
        .merge(chat::routes())
        .route_layer(admit(RouteClass::Inference));
    let keyword = Router::new()
        .route("/keyword", post(keyword::keyword))
        .route_layer(admit(RouteClass::Keyword));
    let tokenizer = Router::new()
        .route("/tokenize", post(models::tokenize))
        .route("/detokenize", post(models::detokenize))
        .route_layer(admit(RouteClass::Tokenize));
    let api = inference
        .merge(keyword)
        .merge(tokenizer)
        .route_layer(from_fn_with_state(state.clone(), admission::read_body))
        .route("/models", get(models::list))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get_one))
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

/// A handler's outcome, with the model it resolved attached for the metrics labels.
pub(crate) fn labelled<T: IntoResponse>(model: &str, result: Result<T, ApiError>) -> Response {
    let mut resp = match result {
        Ok(ok) => ok.into_response(),
        Err(err) => err.into_response(),
    };
    resp.extensions_mut().insert(ModelLabel(model.to_owned()));
    resp
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod tests;
