//! `GET /models`, `GET /v1/models[/{id}]` (the seed's list shape, which is OpenAI's plus nulls), and
//! `POST /tokenize` / `POST /detokenize` over any served model's tokenizer.
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::tokens::{check_ids, encode_bounded, EncodeError};
use super::{respond, AppState, JsonBody};
use crate::error::ApiError;
use crate::models::ModelKind;
use crate::registry::ModelEntry;

#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

#[derive(Serialize)]
pub struct ModelCard {
    id: String,
    /// "embedding" or "chat.completion", as the seed lists them.
    object: &'static str,
    created: i64,
    owned_by: &'static str,
    root: Option<String>,
    parent: Option<String>,
    permission: Option<Vec<serde_json::Value>>,
}

fn card(entry: &ModelEntry) -> ModelCard {
    ModelCard {
        id: entry.name.clone(),
        object: match entry.model.kind() {
            ModelKind::Embedding => "embedding",
            ModelKind::Chat => "chat.completion",
        },
        created: entry.created,
        owned_by: "glm-inference",
        root: None,
        parent: None,
        permission: None,
    }
}

pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state.registry.entries().iter().map(card).collect(),
    })
}

pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    state.registry.get(&id).map(|e| Json(card(e)))
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    /// Keep at most this many ids (special tokens included), as the seed's `max_tokens`.
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize)]
pub struct TokenizeResponse {
    #[serde(rename = "tokenIds")]
    token_ids: Vec<u32>,
    tokens: Vec<String>,
    model: String,
    object: &'static str,
}

pub async fn tokenize(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Response {
    let mut label = None;
    let result = tokenize_inner(&state, req, &mut label).await;
    respond(result, label)
}

async fn tokenize_inner(
    state: &AppState,
    req: TokenizeRequest,
    label: &mut Option<String>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let entry = state.registry.tokenizer_model(req.model.as_deref())?;
    *label = Some(entry.name.clone());
    if req.max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "must be at least 1"));
    }
    let tok = entry.model.tokenizer().clone();
    let (prompt, max, specials) = (req.prompt, req.max_tokens, req.add_special_tokens);
    let enc = tokio::task::spawn_blocking(move || match (specials, max) {
        (true, Some(max)) => encode_bounded(&tok, &prompt, max, true),
        _ => tok
            .encode(prompt.as_str(), specials)
            .map_err(|e| EncodeError::Tokenizer(e.to_string())),
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))?
    .map_err(|e| match e {
        EncodeError::Tokenizer(msg) => {
            ApiError::invalid("prompt", format!("cannot be tokenized: {msg}"))
        }
        EncodeError::TooLong(_) => ApiError::Internal("truncation was requested".into()),
    })?;
    let keep = req.max_tokens.unwrap_or(usize::MAX);
    Ok(Json(TokenizeResponse {
        token_ids: enc.get_ids().iter().copied().take(keep).collect(),
        tokens: enc.get_tokens().iter().take(keep).cloned().collect(),
        model: entry.name.clone(),
        object: "tokenizer",
    }))
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    tokens: Vec<u64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    skip_special_tokens: bool,
}

#[derive(Serialize)]
pub struct DetokenizeResponse {
    text: String,
    model: String,
    object: &'static str,
}

pub async fn detokenize(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Response {
    let mut label = None;
    let result = detokenize_inner(&state, req, &mut label).await;
    respond(result, label)
}

async fn detokenize_inner(
    state: &AppState,
    req: DetokenizeRequest,
    label: &mut Option<String>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let entry = state.registry.tokenizer_model(req.model.as_deref())?;
    *label = Some(entry.name.clone());
    let tok = entry.model.tokenizer().clone();
    let vocab = tok.get_vocab_size(true);
    let mut ids = Vec::with_capacity(req.tokens.len());
    for (i, &id) in req.tokens.iter().enumerate() {
        match u32::try_from(id) {
            Ok(id) => ids.push(id),
            Err(_) => {
                return Err(ApiError::InvalidTokenId {
                    param: format!("tokens[{i}]"),
                    model: entry.name.clone(),
                    id: id.to_string(),
                    vocab,
                })
            }
        }
    }
    check_ids(&ids, vocab, &entry.name, "tokens")?;
    let skip = req.skip_special_tokens;
    let text = tokio::task::spawn_blocking(move || tok.decode(&ids, skip))
        .await
        .map_err(|e| ApiError::Internal(format!("detokenization task failed: {e}")))?
        .map_err(|e| ApiError::invalid("tokens", format!("cannot be decoded: {e}")))?;
    Ok(Json(DetokenizeResponse {
        text,
        model: entry.name.clone(),
        object: "detokenizer",
    }))
}
