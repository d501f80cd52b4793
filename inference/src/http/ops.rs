//! Operational routes: liveness, readiness, Prometheus metrics, and envelope-shaped 404/405.
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::error::ApiError;

/// Liveness: 200 while the process serves HTTP and every model's worker thread runs; 503 once one
/// has died (the process can no longer serve that model: restart it).
pub async fn health(State(state): State<AppState>) -> Response {
    match dead_workers(&state) {
        Some(err) => err.into_response(),
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

/// Readiness: 200 once every model is loaded and warmed up, 503 while shutting down or when a
/// model's worker thread has died.
pub async fn ready(State(state): State<AppState>) -> Response {
    if let Some(err) = dead_workers(&state) {
        return err.into_response();
    }
    if state.is_ready() {
        Json(json!({"status": "ready", "models": state.registry.names()})).into_response()
    } else {
        ApiError::Unavailable("not ready: the server is starting or shutting down".into())
            .into_response()
    }
}

fn dead_workers(state: &AppState) -> Option<ApiError> {
    let dead = state.registry.dead_workers();
    (!dead.is_empty()).then(|| {
        ApiError::Unavailable(format!(
            "the worker thread of model(s) {} has stopped; this process must be restarted",
            dead.join(", ")
        ))
    })
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("cannot render metrics: {e}")).into_response(),
    }
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
