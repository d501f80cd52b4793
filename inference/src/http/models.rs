//! `GET /models`, `GET /v1/models[/{id}]` (the seed's list shape, which is OpenAI's plus nulls), and
//! `POST /tokenize` / `POST /detokenize` over any served model's tokenizer.
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::chat::types::ChatMessage;
use super::chat::validate::template_messages;
use super::tokens::check_ids;
use super::{labelled, AppState, JsonBody};
use crate::error::ApiError;
use crate::models::ModelKind;
use crate::registry::{ModelEntry, ServedModel};
use crate::tokenizer::{encode_bounded, encode_head, readable_tokens, EncodeError};

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

/// `GET /v1/models/{id}`: `id` is the rest of the path, so served names with `/` (which the
/// GLMModel CRD allows) are found; a path that does not decode to UTF-8 names no model.
pub async fn get_one(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<ModelCard>, ApiError> {
    let id = match id {
        Ok(Path(id)) => id,
        Err(_) => {
            let raw = uri.path().trim_start_matches("/v1/models/");
            return Err(ApiError::ModelNotFound {
                model: raw.to_owned(),
                available: state.registry.names(),
            });
        }
    };
    state
        .registry
        .get(&id)
        .map(|e| Json(card(e)))
        .map_err(|e| ApiError::registry(e, "/v1/models"))
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Text to tokenize; or `messages` (chat models), rendered with the model's chat template.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
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
    /// Each token's readable text (byte-level vocabularies decoded, see
    /// `tokenizer::readable_tokens`).
    tokens: Vec<String>,
    /// The vocabulary's own symbols (`Ġ`, `ä½ł`, `##ing`, `▁想`).
    #[serde(rename = "rawTokens")]
    raw_tokens: Vec<String>,
    model: String,
    object: &'static str,
    /// The rendered chat prompt (requests with `messages`).
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
}

pub async fn tokenize(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Response {
    match state.registry.tokenizer_model(req.model.as_deref()) {
        Ok(entry) => labelled(&entry.name, tokenize_inner(&state, entry, req).await),
        Err(e) => ApiError::registry(e, "/tokenize").into_response(),
    }
}

async fn tokenize_inner(
    state: &AppState,
    entry: &ModelEntry,
    req: TokenizeRequest,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let cap = state.limits.tokenize_max_tokens;
    match req.max_tokens {
        Some(0) => return Err(ApiError::invalid("max_tokens", "must be at least 1")),
        Some(n) if n > cap => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                "max_tokens is {n}, more than this server's limit of {cap} (--tokenize-max-tokens)"
            ),
            ))
        }
        _ => {}
    }
    let prompt = match (req.prompt, req.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give either `prompt` or `messages`, not both".into(),
            ))
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "give `prompt` (text) or `messages` (chat)".into(),
            ))
        }
        (None, Some(messages)) => return tokenize_messages(entry, messages, req.max_tokens).await,
        (Some(prompt), None) => prompt,
    };
    let tok = entry.model.tokenizer().clone();
    let (max, specials) = (req.max_tokens, req.add_special_tokens);
    // Only as much of the text as `max_tokens` (or the server's cap) needs is tokenized: a
    // multi-megabyte prompt cut to 4,096 tokens costs what 4,096 tokens cost.
    let (ids, raw_tokens, tokens) = tokio::task::spawn_blocking(move || {
        let limit = max.unwrap_or(cap);
        let enc = if specials {
            encode_bounded(&tok, &prompt, limit, max.is_some())
        } else {
            encode_head(&tok, &prompt, limit)
                .map_err(|e| EncodeError::Tokenizer(e.to_string()))
                .and_then(|(enc, whole)| match enc.len() {
                    n if max.is_none() && (!whole || n > limit) => Err(EncodeError::TooLong {
                        tokens: if whole { n } else { limit },
                        exact: whole,
                    }),
                    _ => Ok(enc),
                })
        }?;
        let keep = limit;
        let ids: Vec<u32> = enc.get_ids().iter().copied().take(keep).collect();
        let raw: Vec<String> = enc.get_tokens().iter().take(keep).cloned().collect();
        let readable = readable_tokens(&tok, &raw);
        Ok((ids, raw, readable))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))?
    .map_err(|e| match e {
        EncodeError::Tokenizer(msg) => {
            ApiError::invalid("prompt", format!("cannot be tokenized: {msg}"))
        }
        EncodeError::TooLong { tokens, exact } => ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {}{tokens} tokens, more than this server's limit of {cap} \
                 (--tokenize-max-tokens); pass max_tokens to get its first tokens",
                if exact { "" } else { "more than " }
            ),
        ),
    })?;
    Ok(Json(TokenizeResponse {
        token_ids: ids,
        tokens,
        raw_tokens,
        model: entry.name.clone(),
        object: "tokenizer",
        prompt: None,
    }))
}

/// Render `messages` with a chat model's template and tokenize the text as generation would.
async fn tokenize_messages(
    entry: &ModelEntry,
    messages: Vec<ChatMessage>,
    max_tokens: Option<usize>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let ServedModel::Chat(engine) = &entry.model else {
        return Err(ApiError::WrongModelKind {
            model: entry.name.clone(),
            is_chat: false,
            route: "/tokenize with messages",
        });
    };
    if messages.is_empty() {
        return Err(ApiError::EmptyInput {
            param: "messages".into(),
        });
    }
    let messages = template_messages(messages)?;
    let engine = engine.clone();
    let prompt = tokio::task::spawn_blocking(move || engine.chat_prompt(&messages))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))??;
    let tok = entry.model.tokenizer();
    let keep = max_tokens.unwrap_or(usize::MAX);
    let ids: Vec<u32> = prompt.ids.into_iter().take(keep).collect();
    let raw_tokens: Vec<String> = ids
        .iter()
        .map(|&id| tok.id_to_token(id).unwrap_or_default())
        .collect();
    Ok(Json(TokenizeResponse {
        token_ids: ids,
        tokens: readable_tokens(tok, &raw_tokens),
        raw_tokens,
        model: entry.name.clone(),
        object: "tokenizer",
        prompt: Some(prompt.text),
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
    match state.registry.tokenizer_model(req.model.as_deref()) {
        Ok(entry) => labelled(&entry.name, detokenize_inner(&state, entry, req).await),
        Err(e) => ApiError::registry(e, "/detokenize").into_response(),
    }
}

async fn detokenize_inner(
    state: &AppState,
    entry: &ModelEntry,
    req: DetokenizeRequest,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let tok = entry.model.tokenizer().clone();
    let vocab = tok.get_vocab_size(true);
    let cap = state.limits.tokenize_max_tokens;
    if req.tokens.len() > cap {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "{} token ids, more than this server's limit of {cap} (--tokenize-max-tokens)",
                req.tokens.len()
            ),
        ));
    }
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
