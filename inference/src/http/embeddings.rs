//! `POST /v1/embeddings` (OpenAI shape, plus bge-m3 extensions) and `POST /embedding` (the seed's shape).
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokens::{parse_input, tokenize_inputs, Input};
use super::{respond, AppState, JsonBody};
use crate::batcher::BatchError;
use crate::error::ApiError;
use crate::models::{EmbedOutputs, Embedding};
use crate::registry::EmbeddingModel;

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
    let mut label = None;
    let result = openai_inner(&state, req, &mut label).await;
    respond(result, label)
}

async fn openai_inner(
    state: &AppState,
    req: EmbeddingsRequest,
    label: &mut Option<String>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let model = state
        .registry
        .embedding(req.model.as_deref(), "/v1/embeddings")?;
    *label = Some(model.name.clone());
    let inputs = parse_input(&req.input, "input")?;
    check_batch_size(state, inputs.len())?;
    let dimensions = check_dimensions(&model, req.dimensions)?;
    let outputs = EmbedOutputs {
        sparse: req.return_sparse,
        colbert: req.return_colbert,
    };
    check_outputs(&model, outputs)?;
    if let Some(user) = &req.user {
        tracing::debug!(user, model = %model.name, "embeddings request");
    }
    let truncate = req.truncate.unwrap_or(state.limits.auto_truncate);
    let tokenized = tokenize_inputs(&model, inputs, truncate, "input").await?;
    let embeddings = run(&model, tokenized.ids, outputs).await?;
    let format = req.encoding_format.unwrap_or_default();
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, emb)| item(index, emb, dimensions, format))
        .collect();
    Ok(Json(EmbeddingsResponse {
        object: "list",
        data,
        model: model.name.clone(),
        usage: Usage {
            prompt_tokens: tokenized.tokens,
            total_tokens: tokenized.tokens,
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
    let mut label = None;
    let result = seed_inner(&state, req, &mut label).await;
    respond(result, label)
}

async fn seed_inner(
    state: &AppState,
    req: SeedRequest,
    label: &mut Option<String>,
) -> Result<Json<SeedResponse>, ApiError> {
    let model = state
        .registry
        .embedding(req.model.as_deref(), "/embedding")?;
    *label = Some(model.name.clone());
    let inputs = parse_input(&req.prompt, "prompt")?;
    if inputs.iter().any(|i| matches!(i, Input::Ids(_))) {
        return Err(ApiError::invalid(
            "prompt",
            "must be a string or an array of strings",
        ));
    }
    check_batch_size(state, inputs.len())?;
    let tokenized = tokenize_inputs(&model, inputs, true, "prompt").await?;
    let embeddings = run(&model, tokenized.ids, EmbedOutputs::default()).await?;
    Ok(Json(SeedResponse {
        data: embeddings.into_iter().map(|e| e.dense).collect(),
        model: model.name.clone(),
        object: "embedding",
    }))
}

/// Embed through the model's batcher, mapping queue outcomes to HTTP errors.
pub async fn run(
    model: &Arc<EmbeddingModel>,
    ids: Vec<Vec<u32>>,
    outputs: EmbedOutputs,
) -> Result<Vec<Embedding>, ApiError> {
    model
        .batcher
        .embed(ids, outputs)
        .await
        .map_err(|e| match e {
            BatchError::QueueFull { .. } => ApiError::Overloaded(e.to_string()),
            BatchError::ShuttingDown => ApiError::Unavailable(e.to_string()),
            BatchError::Model { .. } => ApiError::Internal(e.to_string()),
        })
}

fn check_batch_size(state: &AppState, n: usize) -> Result<(), ApiError> {
    let limit = state.limits.max_client_batch_size;
    if n > limit {
        return Err(ApiError::TooManyInputs { got: n, limit });
    }
    Ok(())
}

fn check_dimensions(
    model: &EmbeddingModel,
    dimensions: Option<usize>,
) -> Result<Option<usize>, ApiError> {
    match dimensions {
        Some(0) => Err(ApiError::invalid("dimensions", "must be at least 1")),
        Some(d) if d > model.info.dimensions => Err(ApiError::invalid(
            "dimensions",
            format!(
                "{d} is more than the {} dimensions of `{}`",
                model.info.dimensions, model.name
            ),
        )),
        other => Ok(other),
    }
}

fn check_outputs(model: &EmbeddingModel, outputs: EmbedOutputs) -> Result<(), ApiError> {
    if outputs.sparse && !model.info.sparse {
        return Err(ApiError::invalid(
            "return_sparse",
            format!("`{}` has no sparse (lexical) head", model.name),
        ));
    }
    if outputs.colbert && !model.info.colbert {
        return Err(ApiError::invalid(
            "return_colbert",
            format!("`{}` has no ColBERT head", model.name),
        ));
    }
    Ok(())
}

fn item(
    index: usize,
    emb: Embedding,
    dimensions: Option<usize>,
    format: EncodingFormat,
) -> EmbeddingItem {
    let dense = match dimensions {
        Some(d) => shorten(emb.dense, d),
        None => emb.dense,
    };
    let embedding = match format {
        EncodingFormat::Float => Vector::Float(dense),
        EncodingFormat::Base64 => Vector::Base64(encode_base64(&dense)),
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

/// OpenAI's `dimensions`: keep the first `d` components and L2-normalise again.
fn shorten(mut v: Vec<f32>, d: usize) -> Vec<f32> {
    v.truncate(d);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

pub fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortening_renormalises() {
        let v = shorten(vec![3.0, 4.0, 12.0], 2);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(
            shorten(vec![0.0, 0.0, 1.0], 2),
            vec![0.0, 0.0],
            "zero vector stays zero, no NaN"
        );
    }

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
