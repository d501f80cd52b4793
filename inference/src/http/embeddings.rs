//! `POST /v1/embeddings` (OpenAI shape, plus bge-m3 extensions) and `POST /embedding` (the seed's shape).
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokens::parse_input;
use super::{labelled, AppState, JsonBody};
use crate::batcher::BatchError;
use crate::embedding::{EmbedError, EmbedRequest, EmbeddingService, Input};
use crate::error::ApiError;
use crate::models::{EmbedOutputs, Embedding};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// Accepted for OpenAI compatibility; only logged.
    #[serde(default)]
    user: Option<String>,
    /// Extension: cut over-long inputs at the model's limit instead of rejecting them.
    #[serde(default)]
    truncate: Option<bool>,
    /// Extension (bge-m3): add `sparse_embedding` (lexical weights) to every item.
    #[serde(default)]
    return_sparse: bool,
    /// Extension (bge-m3): add `colbert_embedding` (one vector per token) to every item.
    #[serde(default)]
    return_colbert: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: Usage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    embedding: Vector,
    index: usize,
    /// Token id (as a string) -> weight, as FlagEmbedding's `lexical_weights`.
    #[serde(skip_serializing_if = "Option::is_none")]
    sparse_embedding: Option<BTreeMap<String, f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    colbert_embedding: Option<Vec<Vec<f32>>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    /// Little-endian f32 bytes, base64 (what OpenAI's SDK decodes with `np.frombuffer(..., "float32")`).
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

pub async fn openai(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<EmbeddingsRequest>,
) -> Response {
    match state.registry.embedding(req.model.as_deref()) {
        Ok(model) => labelled(&model.name, openai_inner(&state, &model, req).await),
        Err(e) => ApiError::registry(e, "/v1/embeddings").into_response(),
    }
}

async fn openai_inner(
    state: &AppState,
    model: &Arc<EmbeddingService>,
    req: EmbeddingsRequest,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let inputs = parse_input(&req.input, "input")?;
    check_batch_size(state, inputs.len())?;
    if let Some(user) = &req.user {
        tracing::debug!(user, model = %model.name, "embeddings request");
    }
    let request = EmbedRequest {
        inputs,
        truncate: req.truncate.unwrap_or(state.limits.auto_truncate),
        outputs: EmbedOutputs {
            sparse: req.return_sparse,
            colbert: req.return_colbert,
        },
        dimensions: req.dimensions,
    };
    let embedded = model
        .embed_pooled(request)
        .await
        .map_err(|e| api_error(e, "input"))?;
    let format = req.encoding_format.unwrap_or_default();
    let data = embedded
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, emb)| item(index, emb, format))
        .collect();
    Ok(Json(EmbeddingsResponse {
        object: "list",
        data,
        model: model.name.clone(),
        usage: Usage {
            prompt_tokens: embedded.prompt_tokens,
            total_tokens: embedded.prompt_tokens,
        },
    }))
}

/// The seed's `/embedding`: `{"model", "prompt": [..]}` -> `{"data": [[..]], "model", "object"}`.
/// Over-long inputs are truncated as the seed's sentence-transformers did.
#[derive(Debug, Deserialize)]
pub struct SeedRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: Value,
}

#[derive(Serialize)]
struct SeedResponse {
    data: Vec<Vec<f32>>,
    model: String,
    object: &'static str,
}

pub async fn seed(State(state): State<AppState>, JsonBody(req): JsonBody<SeedRequest>) -> Response {
    match state.registry.embedding(req.model.as_deref()) {
        Ok(model) => labelled(&model.name, seed_inner(&state, &model, req).await),
        Err(e) => ApiError::registry(e, "/embedding").into_response(),
    }
}

async fn seed_inner(
    state: &AppState,
    model: &Arc<EmbeddingService>,
    req: SeedRequest,
) -> Result<Json<SeedResponse>, ApiError> {
    let inputs = parse_input(&req.prompt, "prompt")?;
    if inputs.iter().any(|i| matches!(i, Input::Ids(_))) {
        return Err(ApiError::invalid(
            "prompt",
            "must be a string or an array of strings",
        ));
    }
    check_batch_size(state, inputs.len())?;
    let request = EmbedRequest {
        inputs,
        truncate: true,
        outputs: EmbedOutputs::default(),
        dimensions: None,
    };
    let embedded = model
        .embed_pooled(request)
        .await
        .map_err(|e| api_error(e, "prompt"))?;
    Ok(Json(SeedResponse {
        data: embedded.embeddings.into_iter().map(|e| e.dense).collect(),
        model: model.name.clone(),
        object: "embedding",
    }))
}

/// The embedding service's refusals in OpenAI's envelope; `param` is the request field that
/// carried the inputs (`input`, `prompt`).
pub(super) fn api_error(e: EmbedError, param: &str) -> ApiError {
    let name = |input: Option<usize>| match input {
        Some(i) => format!("{param}[{i}]"),
        None => param.to_owned(),
    };
    match e {
        EmbedError::TooLong {
            input,
            model,
            tokens,
            exact,
            limit,
        } => ApiError::InputTooLong {
            param: name(input),
            model,
            tokens,
            exact,
            limit,
        },
        EmbedError::Untokenizable { input, message } => {
            ApiError::invalid(name(input), format!("cannot be tokenized: {message}"))
        }
        EmbedError::InvalidTokenId {
            input,
            position,
            model,
            id,
            vocab,
        } => ApiError::InvalidTokenId {
            param: format!("{}[{position}]", name(input)),
            model,
            id: id.to_string(),
            vocab,
        },
        EmbedError::ZeroDimensions | EmbedError::TooManyDimensions { .. } => {
            ApiError::invalid("dimensions", e.to_string())
        }
        EmbedError::NoSparseHead(_) => ApiError::invalid("return_sparse", e.to_string()),
        EmbedError::NoColbertHead(_) => ApiError::invalid("return_colbert", e.to_string()),
        EmbedError::Keyword(err) => {
            // The seed's field names, not KeyBERT's.
            let option = match err.option() {
                "top_n" => "top",
                "docs" => "input",
                other => other,
            };
            ApiError::invalid(option, err.to_string())
        }
        EmbedError::Batch(BatchError::QueueFull { .. }) => ApiError::Overloaded(e.to_string()),
        EmbedError::Batch(BatchError::ShuttingDown) => ApiError::Unavailable(e.to_string()),
        EmbedError::Batch(BatchError::Model { .. })
        | EmbedError::WrongDimensions { .. }
        | EmbedError::Task { .. } => ApiError::Internal(e.to_string()),
    }
}

fn check_batch_size(state: &AppState, n: usize) -> Result<(), ApiError> {
    let limit = state.limits.max_client_batch_size;
    if n > limit {
        return Err(ApiError::TooManyInputs { got: n, limit });
    }
    Ok(())
}

fn item(index: usize, emb: Embedding, format: EncodingFormat) -> EmbeddingItem {
    let embedding = match format {
        EncodingFormat::Float => Vector::Float(emb.dense),
        EncodingFormat::Base64 => Vector::Base64(encode_base64(&emb.dense)),
    };
    EmbeddingItem {
        object: "embedding",
        embedding,
        index,
        sparse_embedding: emb.sparse.map(|w| {
            w.into_iter()
                .map(|(id, weight)| (id.to_string(), weight))
                .collect()
        }),
        colbert_embedding: emb.colbert,
    }
}

pub fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        let s = encode_base64(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }
}
