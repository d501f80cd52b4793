//! Cross-cutting request handling: API key and request metrics (admission: `super::admission`).
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::ApiError;

/// Served model name a handler resolved, carried in response extensions for the metrics labels
/// (only resolved names, so that clients cannot blow up label cardinality with made-up names).
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// The credentials of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 section 11.1).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compare without an early exit, so that response timing does not reveal a key prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Count and time every request by route template, resolved model and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    let model = resp
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.as_str())
        .unwrap_or("");
    let status = resp.status().as_u16().to_string();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[route.as_str(), model, status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[route.as_str(), model])
        .observe(started.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "BeArEr   k1 ",
            "Bearer\tk1",
        ] {
            assert_eq!(super::bearer_token(header), Some("k1"), "{header:?}");
        }
        for header in ["Basic k1", "Bearerk1", "k1", ""] {
            assert_eq!(super::bearer_token(header), None, "{header:?}");
        }
    }

    #[test]
    fn constant_time_eq_compares_fully() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
