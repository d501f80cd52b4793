//! `POST /v1/chat/completions` and the seed's `POST /chat` (same shapes). The handler converts
//! types and makes one engine call: `types` holds the wire structs, `validate` checks a request
//! against the server's limits (`policy`), `stream` turns the engine's events into the answer and
//! `metrics` records each request.
mod metrics;
pub mod policy;
mod stream;
pub mod types;
pub mod validate;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::{labelled, AppState, JsonBody};
use crate::engine::ChatEngine;
use crate::error::ApiError;
use metrics::Recorder;
use std::sync::Arc;
use stream::{collect, Answer};
pub use types::ChatRequest;
pub use validate::Invalid;

const OPENAI_ROUTE: &str = "/v1/chat/completions";
const SEED_ROUTE: &str = "/chat";

/// The chat routes; the caller adds admission control and auth.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(OPENAI_ROUTE, post(openai))
        .route(SEED_ROUTE, post(seed))
}

async fn openai(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    handle(state, req, OPENAI_ROUTE).await
}

/// The seed's path: same request and response shapes as OpenAI's.
async fn seed(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    handle(state, req, SEED_ROUTE).await
}

async fn handle(state: AppState, req: ChatRequest, route: &'static str) -> Response {
    match state.registry.chat(req.model.as_deref()) {
        Ok(engine) => labelled(engine.name(), complete(&state, &engine, req).await),
        Err(e) => ApiError::registry(e, route).into_response(),
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        match e.param {
            Some(param) => ApiError::invalid(param, e.message),
            None => ApiError::BadRequest(e.message),
        }
    }
}

async fn complete(
    state: &AppState,
    engine: &Arc<ChatEngine>,
    req: ChatRequest,
) -> Result<Response, ApiError> {
    let plan = req.validate(&state.limits.chat)?;
    let want_logprobs = plan.request.sampling.logprobs;
    // Template rendering and tokenization are CPU work: off the async workers.
    let blocking_engine = engine.clone();
    let generation = tokio::task::spawn_blocking(move || blocking_engine.generate(plan.request))
        .await
        .map_err(|e| ApiError::Internal(format!("prompt task failed: {e}")))??;
    let mut recorder = Recorder::new(state.metrics.clone(), engine.name());
    recorder.prompt_tokens(generation.prompt_tokens);
    let answer = Answer::new(
        engine.name(),
        generation.reasoning,
        want_logprobs,
        plan.include_usage,
    );
    if plan.stream {
        return Ok(answer.sse(generation.events, move |ev| recorder.observe(ev)));
    }
    let collected = collect(generation.events, |ev| recorder.observe(ev))
        .await
        .map_err(|e| ApiError::Internal(format!("generation failed: {e}")))?;
    Ok(Json(answer.completion(collected)).into_response())
}
