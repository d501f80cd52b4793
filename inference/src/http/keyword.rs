//! `POST /keyword`: the seed's KeyBERT endpoint, over the embedding service's
//! [`EmbeddingService::keywords`] (embedding a client batch at a time, so that one keyword request
//! never holds more than `--max-client-batch-size` places of the queue that other requests share).
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::sync::Arc;

use super::embeddings::api_error;
use super::{labelled, AppState, JsonBody};
use crate::embedding::EmbeddingService;
use crate::error::ApiError;
use crate::keyword as kw;

#[derive(Debug, Deserialize)]
pub struct KeywordRequest {
    input: String,
    #[serde(default)]
    model: Option<String>,
    /// Candidate keywords (KeyBERT's `candidates`); without it, candidates are the document's n-grams.
    #[serde(default)]
    vocab: Option<Vec<String>>,
    #[serde(default = "default_top")]
    top: usize,
    #[serde(default)]
    mmr: bool,
    #[serde(default)]
    maxsum: bool,
    #[serde(default = "default_diversity")]
    diversity: f32,
    #[serde(default = "default_nr_candidates")]
    nr_candidates: usize,
    #[serde(default = "default_ngram_range")]
    keyphrase_ngram_range: (usize, usize),
    /// "english" (KeyBERT's default), null (keep every word) or a list of words.
    #[serde(default = "default_stop_words")]
    stop_words: Value,
}

fn default_top() -> usize {
    5
}
fn default_diversity() -> f32 {
    0.5
}
fn default_nr_candidates() -> usize {
    20
}
fn default_ngram_range() -> (usize, usize) {
    (1, 1)
}
fn default_stop_words() -> Value {
    Value::String("english".into())
}

#[derive(Serialize)]
pub struct KeywordResponse {
    model: String,
    keywords: Vec<kw::Keyword>,
}

pub async fn keyword(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<KeywordRequest>,
) -> Response {
    match state.registry.embedding(req.model.as_deref()) {
        Ok(model) => labelled(&model.name, keyword_inner(&state, &model, req).await),
        Err(e) => ApiError::registry(e, "/keyword").into_response(),
    }
}

async fn keyword_inner(
    state: &AppState,
    model: &Arc<EmbeddingService>,
    req: KeywordRequest,
) -> Result<Json<KeywordResponse>, ApiError> {
    if req.input.trim().is_empty() {
        return Err(ApiError::EmptyInput {
            param: "input".into(),
        });
    }
    let opts = options(&req)?;
    let limits = &state.limits;
    let keywords = model
        .keywords(
            req.input,
            opts,
            limits.keyword,
            limits.max_client_batch_size,
        )
        .await
        .map_err(|e| api_error(e, "input"))?;
    Ok(Json(KeywordResponse {
        model: model.name.clone(),
        keywords,
    }))
}

/// The request's fields as KeyBERT's options. The option rules (ranges, Max Sum's cost cap) live
/// in `keyword::plan`, which reports them as [`KeywordError`]; vocabulary entries are taken as
/// written, as scikit-learn does (an entry the document cannot produce simply never matches).
fn options(req: &KeywordRequest) -> Result<kw::KeywordOptions, ApiError> {
    Ok(kw::KeywordOptions {
        top_n: req.top,
        use_mmr: req.mmr,
        use_maxsum: req.maxsum,
        diversity: req.diversity,
        nr_candidates: req.nr_candidates,
        ngram_range: req.keyphrase_ngram_range,
        stop_words: stop_words(&req.stop_words)?,
        vocab: req.vocab.clone(),
    })
}

fn stop_words(value: &Value) -> Result<kw::StopWords, ApiError> {
    const SHAPE: &str = "must be \"english\", null or a list of words";
    match value {
        Value::Null => Ok(kw::StopWords::None),
        Value::String(s) if s.eq_ignore_ascii_case("english") => Ok(kw::StopWords::English),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(kw::StopWords::Custom)
            .ok_or_else(|| ApiError::invalid("stop_words", SHAPE)),
        _ => Err(ApiError::invalid("stop_words", SHAPE)),
    }
}
