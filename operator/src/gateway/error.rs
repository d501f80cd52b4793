//! Gateway errors, answered in OpenAI's error envelope so SDK clients surface them properly:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("The model `{requested}` does not exist. Available models: {}", available_list(.available))]
    ModelNotFound {
        requested: String,
        available: Vec<String>,
    },
    #[error("The model `{0}` exists but is not ready yet; retry later.")]
    ModelNotReady(String),
    #[error("A `model` field is required. Available models: {}", available_list(.0))]
    ModelRequired(Vec<String>),
    #[error("Unknown path `{0}`.")]
    RouteNotFound(String),
    #[error("Invalid request body: {0}")]
    InvalidBody(String),
    #[error("Request body larger than {0} bytes.")]
    BodyTooLarge(usize),
    #[error("Upstream for model `{model}` is unreachable: {reason}")]
    UpstreamUnreachable { model: String, reason: String },
    #[error("Upstream for model `{model}` timed out: {reason}")]
    UpstreamTimeout { model: String, reason: String },
    #[error("Upstream for model `{model}` failed: {reason}")]
    UpstreamFailed { model: String, reason: String },
    #[error("No pod of model `{model}` answered after {attempts} attempts (--gateway-max-attempts); last error: {reason}")]
    AllAttemptsFailed {
        model: String,
        attempts: usize,
        reason: String,
    },
    #[error("No pod of model `{model}` became ready within {}s (spec.routing.holdTimeoutSeconds or --gateway-hold-timeout); retry later.", .waited.as_secs())]
    HoldTimeout {
        model: String,
        waited: std::time::Duration,
    },
    #[error(
        "Too many requests are waiting for models to start ({0}, --gateway-max-held); retry later."
    )]
    TooManyHeld(usize),
    #[error("Invalid or missing API key: send `Authorization: Bearer <key>`.")]
    Unauthorized,
}

/// Seconds a client is told to wait (Retry-After) when no pod became ready in time.
const HOLD_RETRY_AFTER_SECS: u64 = 10;

fn available_list(names: &[String]) -> String {
    if names.is_empty() {
        "none (no GLMModel is ready)".to_owned()
    } else {
        names.join(", ")
    }
}

#[derive(Debug, Serialize)]
struct Envelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ModelNotFound { .. } | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::ModelNotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ModelRequired(_) | Self::InvalidBody(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UpstreamUnreachable { .. } | Self::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::AllAttemptsFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::HoldTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyHeld(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    /// OpenAI's `type`: client mistakes are `invalid_request_error`, ours are `server_error`.
    fn kind(&self) -> &'static str {
        if matches!(self, Self::Unauthorized) {
            "authentication_error"
        } else if self.status().is_client_error() && !matches!(self, Self::TooManyHeld(_)) {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::ModelNotFound { .. } => "model_not_found",
            Self::ModelNotReady(_) => "model_not_ready",
            Self::ModelRequired(_) => "model_required",
            Self::RouteNotFound(_) => "unknown_url",
            Self::InvalidBody(_) => "invalid_body",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamFailed { .. } => "upstream_error",
            Self::AllAttemptsFailed { .. } => "upstream_unavailable",
            Self::HoldTimeout { .. } => "model_not_ready",
            Self::TooManyHeld(_) => "too_many_held_requests",
            Self::Unauthorized => "invalid_api_key",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound { .. }
            | Self::ModelNotReady(_)
            | Self::ModelRequired(_)
            | Self::HoldTimeout { .. } => Some("model"),
            _ => None,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let envelope = Envelope {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        let retry_after = matches!(self, Self::HoldTimeout { .. } | Self::TooManyHeld(_));
        let mut response = (self.status(), Json(envelope)).into_response();
        if retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(HOLD_RETRY_AFTER_SECS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn not_found_envelope_lists_available_models() {
        let err = GatewayError::ModelNotFound {
            requested: "gpt-4".into(),
            available: vec!["bge-m3".into(), "glm-4-9b-chat".into()],
        };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
        let body: serde_json::Value =
            serde_json::from_slice(&bytes.unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "The model `gpt-4` does not exist. Available models: bge-m3, glm-4-9b-chat",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }})
        );
    }
}
