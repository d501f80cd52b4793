//! `POST /keyword`: the seed's KeyBERT endpoint. Candidates come from `keyword::plan`, the document
//! and the candidates are embedded through the model's batcher, and `keyword::select` ranks them
//! (plain cosine, MMR or Max Sum).
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::embeddings::run;
use super::tokens::{tokenize_inputs, Input};
use super::{respond, AppState, JsonBody};
use crate::error::ApiError;
use crate::keyword::{self as kw, KeywordError};
use crate::models::EmbedOutputs;

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
    let doc = req.input;
    let plan_opts = opts.clone();
    let plan = tokio::task::spawn_blocking(move || kw::plan(&doc, &plan_opts))
        .await
        .map_err(|e| ApiError::Internal(format!("keyword planning failed: {e}")))?
        .map_err(keyword_error)?;
    if plan.candidates.is_empty() {
        return Ok(Json(KeywordResponse {
            model: model.name.clone(),
            keywords: Vec::new(),
        }));
    }
    let max_inputs = model.batcher.config().max_queued_inputs;
    if plan.candidates.len() + 1 > max_inputs {
        return Err(ApiError::BadRequest(format!(
            "{} candidate keywords plus the document exceed the {max_inputs} inputs one request may queue",
            plan.candidates.len()
        )));
    }
    // KeyBERT embeds through sentence-transformers, which truncates at max_seq_length.
    let inputs = std::iter::once(&plan.doc)
        .chain(&plan.candidates)
        .map(|s| Input::Text(s.clone()))
        .collect();
    let tokenized = tokenize_inputs(&model, inputs, true, "input").await?;
    let mut vectors = run(&model, tokenized.ids, EmbedOutputs::default())
        .await?
        .into_iter()
        .map(|e| e.dense);
    let doc_vec = vectors
        .next()
        .ok_or_else(|| ApiError::Internal("no document embedding".into()))?;
    let candidate_vecs: Vec<Vec<f32>> = vectors.collect();
    let keywords = kw::select(&plan, &doc_vec, &candidate_vecs, &opts);
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

/// Name the request field (the seed's names, not KeyBERT's) that a keyword error is about.
fn keyword_error(err: KeywordError) -> ApiError {
    let param = match err {
        KeywordError::TopN => "top",
        KeywordError::NgramRange { .. } => "keyphrase_ngram_range",
        KeywordError::Diversity(_) => "diversity",
        KeywordError::NrCandidates { .. } | KeywordError::MaxSumTooLarge { .. } => "nr_candidates",
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
