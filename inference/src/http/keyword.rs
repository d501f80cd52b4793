//! `POST /keyword`: the seed's KeyBERT endpoint. Candidates come from `keyword::plan` (within the
//! `--keyword-*` limits), the document and the candidates are embedded through the model's batcher
//! a client batch at a time, and `keyword::select` ranks them (plain cosine, MMR or Max Sum) on the
//! blocking pool.
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::sync::Arc;

use super::embeddings::run;
use super::tokens::{tokenize_inputs, Input};
use super::{respond, AppState, JsonBody};
use crate::error::ApiError;
use crate::keyword::{self as kw, KeywordError};
use crate::models::{EmbedOutputs, Embedding};
use crate::registry::EmbeddingModel;

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
    let mut label = None;
    let result = keyword_inner(&state, req, &mut label).await;
    respond(result, label)
}

async fn keyword_inner(
    state: &AppState,
    req: KeywordRequest,
    label: &mut Option<String>,
) -> Result<Json<KeywordResponse>, ApiError> {
    let model = state.registry.embedding(req.model.as_deref(), "/keyword")?;
    *label = Some(model.name.clone());
    if req.input.trim().is_empty() {
        return Err(ApiError::EmptyInput {
            param: "input".into(),
        });
    }
    let opts = options(&req)?;
    let (doc, plan_opts) = (req.input, opts.clone());
    let (limits, dims) = (state.limits.keyword, model.info.dimensions);
    let plan = blocking("keyword planning", move || {
        kw::plan(&doc, &plan_opts, &limits, dims)
    })
    .await?
    .map_err(keyword_error)?;
    if plan.candidates.is_empty() {
        return Ok(Json(KeywordResponse {
            model: model.name.clone(),
            keywords: Vec::new(),
        }));
    }
    // KeyBERT embeds through sentence-transformers, which truncates at max_seq_length.
    let inputs = std::iter::once(&plan.doc)
        .chain(&plan.candidates)
        .map(|s| Input::Text(s.clone()))
        .collect();
    let tokenized = tokenize_inputs(&model, inputs, true, "input").await?;
    let mut vectors = embed_in_chunks(state, &model, tokenized.ids)
        .await?
        .into_iter()
        .map(|e| e.dense);
    let doc_vec = vectors
        .next()
        .ok_or_else(|| ApiError::Internal("no document embedding".into()))?;
    let candidate_vecs: Vec<Vec<f32>> = vectors.collect();
    // MMR and Max Sum are CPU work bounded by --keyword-max-selection-cost: off the async workers.
    let keywords = blocking("keyword selection", move || {
        kw::select(&plan, &doc_vec, &candidate_vecs, &opts)
    })
    .await?;
    Ok(Json(KeywordResponse {
        model: model.name.clone(),
        keywords,
    }))
}

/// Embed through the model's queue a client batch at a time, so that one keyword request never
/// holds more than `--max-client-batch-size` places of the queue that other requests share.
async fn embed_in_chunks(
    state: &AppState,
    model: &Arc<EmbeddingModel>,
    ids: Vec<Vec<u32>>,
) -> Result<Vec<Embedding>, ApiError> {
    let chunk = state.limits.max_client_batch_size.max(1);
    let mut out = Vec::with_capacity(ids.len());
    let mut ids = ids.into_iter().peekable();
    while ids.peek().is_some() {
        let part: Vec<Vec<u32>> = ids.by_ref().take(chunk).collect();
        out.extend(run(model, part, EmbedOutputs::default()).await?);
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("{what} failed: {e}")))
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

/// Name the request field (the seed's names, not KeyBERT's) that a keyword error is about.
fn keyword_error(err: KeywordError) -> ApiError {
    let param = match err.option() {
        "top_n" => "top",
        "docs" => "input",
        other => other,
    };
    ApiError::invalid(param, err.to_string())
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
