//! A JSON body extractor whose every failure is an [`ApiError`] (OpenAI envelope) instead of axum's
//! plain-text rejections, which accepts bodies whatever their Content-Type (the seed's FastAPI did:
//! `curl -d '{...}'` works), and which reports the JSON path of a wrong field as `param`.
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::AppState;
use crate::error::ApiError;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.limits.max_body_bytes,
                }
            } else {
                ApiError::InvalidJson {
                    msg: rejection.body_text(),
                    param: None,
                }
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parse a whole body as `T`; trailing data after the value is an error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson {
            msg: "the body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let param = (path != ".").then_some(path);
        ApiError::InvalidJson {
            msg: err.into_inner().to_string(),
            param,
        }
    })?;
    de.end().map_err(|e| ApiError::InvalidJson {
        msg: e.to_string(),
        param: None,
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        dims: Option<u32>,
        list: Option<Vec<u32>>,
    }

    fn err(body: &[u8]) -> (Option<String>, String) {
        match parse::<Req>(body).unwrap_err() {
            ApiError::InvalidJson { msg, param } => (param, msg),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        assert!(parse::<Req>(br#"{"model":"m"}"#).is_ok());
        let (param, msg) = err(br#"{"model":"m","dims":"x"}"#);
        assert_eq!(param.as_deref(), Some("dims"));
        assert!(msg.contains("invalid type"), "{msg}");
        let (param, _) = err(br#"{"model":"m","list":[1,-2]}"#);
        assert_eq!(param.as_deref(), Some("list[1]"));
        let (_, msg) = err(br#"{"model":"m","extra":1}"#);
        assert!(msg.contains("unknown field `extra`"), "{msg}");
        let (_, msg) = err(br#"{"dims":1}"#);
        assert!(msg.contains("missing field `model`"), "{msg}");
        let (_, msg) = err(b"");
        assert!(msg.contains("empty"), "{msg}");
        let (_, msg) = err(br#"{"model":"m"} trailing"#);
        assert!(msg.contains("trailing"), "{msg}");
        let (_, msg) = err(b"{\"model\":\"\xff\"}");
        assert!(msg.contains("invalid unicode"), "{msg}");
        // Deep nesting stops at serde_json's recursion limit instead of overflowing the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse::<serde_json::Value>(deep.as_bytes()).is_err());
    }
}
