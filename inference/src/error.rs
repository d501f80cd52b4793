//! The one error type of the HTTP layer, mapped once to a status code and OpenAI's error envelope
//! `{"error":{"message","type","param","code"}}`, so that every client (openai SDK, LangChain, the
//! seed's users) sees the same shape for every failure.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EngineError;
use crate::models::ModelError;
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid JSON body: {msg}")]
    InvalidJson { msg: String, param: Option<String> },
    #[error("{msg}")]
    InvalidParam { param: String, msg: String },
    #[error("the model `{model}` does not exist; served models: {}", .available.join(", "))]
    ModelNotFound {
        model: String,
        available: Vec<String>,
    },
    #[error("the model `{model}` is a{} model and cannot serve {route}", if *.is_chat { " chat" } else { "n embedding" })]
    WrongModelKind {
        model: String,
        is_chat: bool,
        route: &'static str,
    },
    #[error("no {kind} model is served; pass `model` (served models: {})", .available.join(", "))]
    NoDefaultModel {
        kind: &'static str,
        available: Vec<String>,
    },
    #[error("`{param}` must not be empty")]
    EmptyInput { param: String },
    #[error("too many inputs: {got}, the limit is {limit} per request")]
    TooManyInputs { got: usize, limit: usize },
    /// `exact` false: the input was tokenized only far enough to know it has more than `tokens`.
    #[error("{param} has {}{tokens} tokens, the model `{model}` accepts at most {limit} (set \"truncate\": true to cut it)", if *.exact { "" } else { "more than " })]
    InputTooLong {
        param: String,
        model: String,
        tokens: usize,
        exact: bool,
        limit: usize,
    },
    #[error("{param}: token id {id} is outside the vocabulary of `{model}` (0..{vocab})")]
    InvalidTokenId {
        param: String,
        model: String,
        id: String,
        vocab: usize,
    },
    /// A chat prompt that leaves no room to generate (the message states both numbers).
    #[error("{0}")]
    ContextLengthExceeded(String),
    #[error("request body is larger than the limit of {limit} bytes (--max-body-bytes)")]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within `--body-read-timeout-secs` (HTTP 408).
    #[error("the request body did not arrive within {0} s (--body-read-timeout-secs)")]
    BodyTimeout(u64),
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// A request that is well-formed but cannot be served as asked (e.g. keyword options).
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid or missing API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("model error: {0}")]
    Model(#[from] ModelError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A registry refusal for a request to `route` (the registry knows nothing of routes).
    pub fn registry(e: RegistryError, route: &'static str) -> Self {
        match e {
            RegistryError::NotFound { model, available } => {
                ApiError::ModelNotFound { model, available }
            }
            RegistryError::WrongKind { model, is } => ApiError::WrongModelKind {
                model,
                is_chat: is.is_chat(),
                route,
            },
            RegistryError::NoDefault { kind, available } => ApiError::NoDefaultModel {
                kind: kind.as_str(),
                available,
            },
        }
    }
}

/// Every engine refusal maps here once: the HTTP routes never match on engine errors themselves.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull { .. } => ApiError::Overloaded(e.to_string()),
            EngineError::PromptTooLong { .. } | EngineError::PromptFarTooLong { .. } => {
                ApiError::ContextLengthExceeded(e.to_string())
            }
            EngineError::EmptyPrompt
            | EngineError::NoChatTemplate(_)
            | EngineError::Template(_) => ApiError::BadRequest(e.to_string()),
            EngineError::Tokenizer(_) | EngineError::Failed(_) => ApiError::Internal(e.to_string()),
            EngineError::Stopped(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, msg: impl Into<String>) -> Self {
        ApiError::InvalidParam {
            param: param.into(),
            msg: msg.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson { .. }
            | InvalidParam { .. }
            | WrongModelKind { .. }
            | NoDefaultModel { .. }
            | EmptyInput { .. }
            | TooManyInputs { .. }
            | InputTooLong { .. }
            | InvalidTokenId { .. }
            | ContextLengthExceeded(_)
            | BadRequest(_) => StatusCode::BAD_REQUEST,
            ModelNotFound { .. } | NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Model(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&str> {
        use ApiError::*;
        match self {
            InvalidJson { param, .. } => param.as_deref(),
            InvalidParam { param, .. }
            | EmptyInput { param }
            | InputTooLong { param, .. }
            | InvalidTokenId { param, .. } => Some(param),
            ModelNotFound { .. } | WrongModelKind { .. } | NoDefaultModel { .. } => Some("model"),
            TooManyInputs { .. } => Some("input"),
            ContextLengthExceeded(_) => Some("messages"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        use ApiError::*;
        Some(match self {
            InvalidJson { .. } => "invalid_json",
            InvalidParam { .. } => "invalid_value",
            ModelNotFound { .. } => "model_not_found",
            WrongModelKind { .. } => "wrong_model_kind",
            NoDefaultModel { .. } => "model_required",
            EmptyInput { .. } => "empty_input",
            TooManyInputs { .. } => "too_many_inputs",
            InputTooLong { .. } | ContextLengthExceeded(_) => "context_length_exceeded",
            InvalidTokenId { .. } => "invalid_token_id",
            PayloadTooLarge { .. } => "payload_too_large",
            BodyTimeout(_) => "request_timeout",
            NotFound(_) => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            BadRequest(_) => "invalid_request",
            Unauthorized => "invalid_api_key",
            Overloaded(_) => "overloaded",
            Unavailable(_) => "unavailable",
            Model(_) | Internal(_) => return None,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        }
        let body = Envelope {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        (status, Json(body)).into_response()
    }
}

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`), for the error a
/// guarded worker (engine step, embedding batch) reports instead of dying.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn render(err: ApiError) -> (StatusCode, serde_json::Value) {
        let resp = err.into_response();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn every_error_renders_the_openai_envelope() {
        let cases = [
            (
                ApiError::InvalidJson {
                    msg: "x".into(),
                    param: None,
                },
                400,
                "invalid_json",
            ),
            (
                ApiError::invalid("dimensions", "too big"),
                400,
                "invalid_value",
            ),
            (
                ApiError::ModelNotFound {
                    model: "m".into(),
                    available: vec!["a".into(), "b".into()],
                },
                404,
                "model_not_found",
            ),
            (
                ApiError::TooManyInputs { got: 9, limit: 8 },
                400,
                "too_many_inputs",
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
            ),
            (ApiError::Unauthorized, 401, "invalid_api_key"),
            (ApiError::BodyTimeout(60), 408, "request_timeout"),
            (ApiError::Overloaded("queue full".into()), 429, "overloaded"),
            (
                ApiError::Unavailable("shutting down".into()),
                503,
                "unavailable",
            ),
        ];
        for (err, status, code) in cases {
            let (s, body) = render(err).await;
            assert_eq!(s.as_u16(), status);
            let e = &body["error"];
            assert_eq!(e["code"], code, "{body}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(e["type"].is_string());
            assert!(e.as_object().unwrap().contains_key("param"));
        }
    }

    #[tokio::test]
    async fn messages_state_limits_and_alternatives() {
        let (_, body) = render(ApiError::ModelNotFound {
            model: "gpt-4".into(),
            available: vec!["minilm".into()],
        })
        .await;
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("gpt-4") && msg.contains("minilm"), "{msg}");
        assert_eq!(body["error"]["param"], "model");
        let (_, body) = render(ApiError::InputTooLong {
            param: "input[1]".into(),
            model: "m".into(),
            tokens: 300,
            exact: true,
            limit: 256,
        })
        .await;
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("300") && msg.contains("256"), "{msg}");
        assert_eq!(body["error"]["param"], "input[1]");
        let (_, body) = render(ApiError::TooManyInputs {
            got: 300,
            limit: 256,
        })
        .await;
        assert!(body["error"]["message"].as_str().unwrap().contains("256"));
    }
}
