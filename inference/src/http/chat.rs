//! `POST /v1/chat/completions` and the seed's `POST /chat` (same shapes): OpenAI request validation,
//! prompt building through the model's chat template, and the non-streaming or SSE response.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::chat_policy::{self, ChatLimits};
use super::{respond, AppState, JsonBody};
use crate::engine::{
    ChatEngine, Delta, EngineError, Event, FinishReason, GenerateRequest, SamplingParams,
    StopParams, TokenLogprob, Usage,
};
use crate::error::ApiError;
use crate::metrics::Metrics;

const OPENAI_ROUTE: &str = "/v1/chat/completions";
const SEED_ROUTE: &str = "/chat";

/// The chat routes; the caller adds admission control and auth.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(OPENAI_ROUTE, post(openai))
        .route(SEED_ROUTE, post(seed))
}

async fn openai(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    handle(state, req, OPENAI_ROUTE).await
}

/// The seed's path: same request and response shapes as OpenAI's.
async fn seed(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    handle(state, req, SEED_ROUTE).await
}

async fn handle(state: AppState, req: ChatRequest, route: &'static str) -> Response {
    let mut label = None;
    let result = complete(&state, req, route, &mut label).await;
    respond(result, label)
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        match e.param {
            Some(param) => ApiError::invalid(param, e.message),
            None => ApiError::BadRequest(e.message),
        }
    }
}

async fn complete(
    state: &AppState,
    req: ChatRequest,
    route: &'static str,
    label: &mut Option<String>,
) -> Result<Response, ApiError> {
    let engine = state.registry.chat(req.model.as_deref(), route)?;
    *label = Some(engine.name().to_owned());
    let plan = req.validate(&state.limits.chat)?;
    let (stream, include_usage, want_logprobs) =
        (plan.stream, plan.include_usage, plan.sampling.logprobs);
    // Template rendering and tokenization are CPU work: off the async workers.
    let blocking_engine = engine.clone();
    let (request, reasoning_model) =
        tokio::task::spawn_blocking(move || generate_request(&blocking_engine, &plan))
            .await
            .map_err(|e| ApiError::Internal(format!("prompt task failed: {e}")))??;
    let generation = engine.submit(request)?;
    let mut recorder = Recorder::new(state.metrics.clone(), engine.name());
    recorder.prompt_tokens(generation.prompt_tokens);
    let id = CompletionId::new(engine.name());
    if stream {
        let on_event = move |ev: &Event| recorder.observe(ev);
        return Ok(sse_response(
            generation.events,
            id,
            reasoning_model,
            want_logprobs,
            include_usage,
            on_event,
        ));
    }
    let collected = collect(generation.events, |ev| recorder.observe(ev))
        .await
        .map_err(|e| ApiError::Internal(format!("generation failed: {e}")))?;
    Ok(Json(collected.to_json(&id, reasoning_model, want_logprobs)).into_response())
}

/// Per-request chat metrics. A request dropped before its final event (client gone) counts as
/// `cancelled`.
struct Recorder {
    metrics: Arc<Metrics>,
    model: String,
    ended: bool,
}

impl Recorder {
    fn new(metrics: Arc<Metrics>, model: &str) -> Self {
        Recorder {
            metrics,
            model: model.to_owned(),
            ended: false,
        }
    }

    fn prompt_tokens(&self, n: usize) {
        self.metrics
            .chat_prompt_tokens
            .with_label_values(&[self.model.as_str()])
            .inc_by(n as u64);
    }

    fn observe(&mut self, ev: &Event) {
        let model = self.model.as_str();
        match ev {
            Event::Delta(_) => {}
            Event::Finish { reason, timing, .. } => {
                self.ended = true;
                let m = &self.metrics;
                m.chat_requests
                    .with_label_values(&[model, reason.as_str()])
                    .inc();
                m.chat_time_to_first_token
                    .with_label_values(&[model])
                    .observe(timing.time_to_first_token.as_secs_f64());
                m.chat_queue_duration
                    .with_label_values(&[model])
                    .observe(timing.queued.as_secs_f64());
            }
            Event::Error(_) => {
                self.ended = true;
                self.metrics
                    .chat_requests
                    .with_label_values(&[model, "error"])
                    .inc();
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics
                .chat_requests
                .with_label_values(&[self.model.as_str(), "cancelled"])
                .inc();
        }
    }
}

const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub n: Option<u32>,
    pub user: Option<String>,
    /// vLLM extensions.
    pub skip_special_tokens: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub response_format: Option<Value>,
    /// Everything else; see [`chat_policy::check_other_fields`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    /// Earlier assistant turns may carry their reasoning; templates decide what to keep.
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// What a chat template sees of a message: `content` is a string or null; `tool_calls` only when
/// present (DeepSeek's template tests `'tool_calls' in message`).
#[derive(Debug, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A client error: the message names the offending field.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub param: Option<String>,
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(param: &str, message: impl Into<String>) -> Self {
        Invalid {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub struct ChatPlan {
    pub model: Option<String>,
    pub messages: Vec<TemplateMessage>,
    pub stream: bool,
    pub include_usage: bool,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

impl ChatRequest {
    /// Check every field against the server's `limits` and build the engine's parameters.
    pub fn validate(self, limits: &ChatLimits) -> Result<ChatPlan, Invalid> {
        chat_policy::check_other_fields(&self.other)?;
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(Value::as_str);
            if !format.is_null() && kind != Some("text") {
                return Err(Invalid::new(
                    "response_format",
                    "response_format other than {\"type\": \"text\"} is not supported",
                ));
            }
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(Invalid::new(
                    "n",
                    format!("n = {n} is not supported; only one choice per request (n = 1)"),
                ));
            }
        }
        if self.messages.is_empty() {
            return Err(Invalid::new("messages", "messages must not be empty"));
        }
        let messages = template_messages(self.messages)?;
        let sampling = sampling_params(
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.seed,
            (
                self.presence_penalty,
                self.frequency_penalty,
                self.repetition_penalty,
            ),
            (self.logprobs, self.top_logprobs),
        )?;
        let requested = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some((m, "max_completion_tokens")),
            (None, Some(m)) => Some((m, "max_tokens")),
            (None, None) => None,
        };
        let max_tokens = chat_policy::max_tokens(requested, limits)?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        chat_policy::check_stop(&stop, limits)?;
        Ok(ChatPlan {
            model: self.model,
            messages,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            sampling,
            stop: StopParams {
                max_tokens: Some(max_tokens),
                stop,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            },
        })
    }
}

/// Check roles and content parts and shape messages for the chat template.
pub fn template_messages(messages: Vec<ChatMessage>) -> Result<Vec<TemplateMessage>, Invalid> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| template_message(i, m))
        .collect()
}

fn template_message(i: usize, m: ChatMessage) -> Result<TemplateMessage, Invalid> {
    let role = match m.role.as_str() {
        "system" | "user" | "assistant" | "tool" => m.role,
        "developer" => "system".to_owned(),
        other => {
            return Err(Invalid::new(
                &format!("messages[{i}].role"),
                format!("unknown role '{other}'; expected system, user, assistant or tool"),
            ))
        }
    };
    let content = match m.content {
        None => None,
        Some(MessageContent::Text(s)) => Some(s),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(Invalid::new(
                            &format!("messages[{i}].content[{j}]"),
                            format!(
                                "content part of type '{kind}' is not supported; only text parts"
                            ),
                        ))
                    }
                }
            }
            Some(text)
        }
    };
    if content.is_none() && m.tool_calls.is_none() {
        return Err(Invalid::new(
            &format!("messages[{i}].content"),
            "a message needs content (or tool_calls)",
        ));
    }
    Ok(TemplateMessage {
        role,
        content,
        name: m.name,
        tool_calls: m.tool_calls,
        tool_call_id: m.tool_call_id,
    })
}

fn sampling_params(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
    (presence, frequency, repetition): (Option<f32>, Option<f32>, Option<f32>),
    (logprobs, top_logprobs): (Option<bool>, Option<u32>),
) -> Result<SamplingParams, Invalid> {
    let in_range = |name: &str, v: Option<f32>, lo: f32, hi: f32| match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(Invalid::new(
            name,
            format!("{name} must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    };
    in_range("temperature", temperature, 0.0, 2.0)?;
    in_range("top_p", top_p, 0.0, 1.0)?;
    in_range("min_p", min_p, 0.0, 1.0)?;
    in_range("presence_penalty", presence, -2.0, 2.0)?;
    in_range("frequency_penalty", frequency, -2.0, 2.0)?;
    if top_p == Some(0.0) {
        return Err(Invalid::new("top_p", "top_p must be greater than 0"));
    }
    chat_policy::check_repetition_penalty(repetition)?;
    let top_k = match top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(Invalid::new(
                "top_k",
                format!("top_k must be -1, 0 (off) or positive, got {k}"),
            ))
        }
    };
    let logprobs = logprobs.unwrap_or(false);
    let top_logprobs = top_logprobs.unwrap_or(0);
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(Invalid::new(
            "top_logprobs",
            format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    if top_logprobs > 0 && !logprobs {
        return Err(Invalid::new(
            "top_logprobs",
            "top_logprobs requires logprobs = true",
        ));
    }
    Ok(SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k,
        min_p: min_p.unwrap_or(0.0),
        seed: seed.map(|s| s as u64),
        presence_penalty: presence.unwrap_or(0.0),
        frequency_penalty: frequency.unwrap_or(0.0),
        repetition_penalty: repetition.unwrap_or(1.0),
        logprobs,
        top_logprobs: top_logprobs as usize,
    })
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens()})
}

fn logprobs_json(items: &[TokenLogprob]) -> Value {
    let entry = |t: &crate::engine::TopLogprob| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes});
    let content: Vec<Value> = items
        .iter()
        .map(|lp| {
            let mut e = entry(&lp.chosen);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(entry).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

/// Identity of one completion, shared by all its chunks.
#[derive(Debug, Clone)]
pub struct CompletionId {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl CompletionId {
    pub fn new(model: &str) -> Self {
        CompletionId {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: now_secs(),
            model: model.to_owned(),
        }
    }
}

/// Everything a non-streaming response needs, gathered from the events.
#[derive(Debug, Default)]
pub struct Collected {
    pub content: String,
    pub reasoning_content: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<(FinishReason, Usage)>,
}

impl Collected {
    pub fn add(&mut self, d: Delta) {
        self.content.push_str(&d.content);
        self.reasoning_content.push_str(&d.reasoning_content);
        self.logprobs.extend(d.logprobs);
    }

    pub fn to_json(&self, id: &CompletionId, reasoning_model: bool, want_logprobs: bool) -> Value {
        let (reason, usage) = self
            .finish
            .unwrap_or((FinishReason::Stop, Usage::default()));
        let mut message = json!({"role": "assistant", "content": self.content});
        if reasoning_model {
            message["reasoning_content"] = json!(self.reasoning_content);
        }
        json!({
            "id": id.id,
            "object": "chat.completion",
            "created": id.created,
            "model": id.model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": if want_logprobs { logprobs_json(&self.logprobs) } else { Value::Null },
                "finish_reason": reason.as_str(),
            }],
            "usage": usage_json(&usage),
        })
    }
}

/// One `chat.completion.chunk`.
pub fn chunk_json(
    id: &CompletionId,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<FinishReason>,
    include_usage: bool,
) -> Value {
    let mut chunk = json!({
        "id": id.id,
        "object": "chat.completion.chunk",
        "created": id.created,
        "model": id.model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": logprobs.unwrap_or(Value::Null),
            "finish_reason": finish.map(FinishReason::as_str),
        }],
    });
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// The final usage chunk (`stream_options.include_usage`): no choices.
pub fn usage_chunk_json(id: &CompletionId, usage: &Usage) -> Value {
    json!({
        "id": id.id,
        "object": "chat.completion.chunk",
        "created": id.created,
        "model": id.model,
        "choices": [],
        "usage": usage_json(usage),
    })
}

pub fn delta_json(d: &Delta, reasoning_model: bool) -> Value {
    let mut delta = Map::new();
    if !d.content.is_empty() || !reasoning_model {
        delta.insert("content".into(), json!(d.content));
    }
    if reasoning_model && !d.reasoning_content.is_empty() {
        delta.insert("reasoning_content".into(), json!(d.reasoning_content));
    }
    Value::Object(delta)
}

/// SSE data lines for one engine event (the stream ends after `Finish` or `Error`).
pub fn sse_for_event(
    ev: Event,
    id: &CompletionId,
    reasoning_model: bool,
    want_logprobs: bool,
    include_usage: bool,
) -> (Vec<String>, bool) {
    match ev {
        Event::Delta(d) => {
            let lp = want_logprobs.then(|| logprobs_json(&d.logprobs));
            (
                vec![
                    chunk_json(id, delta_json(&d, reasoning_model), lp, None, include_usage)
                        .to_string(),
                ],
                false,
            )
        }
        Event::Finish { reason, usage, .. } => {
            let mut lines =
                vec![chunk_json(id, json!({}), None, Some(reason), include_usage).to_string()];
            if include_usage {
                lines.push(usage_chunk_json(id, &usage).to_string());
            }
            lines.push("[DONE]".to_owned());
            (lines, true)
        }
        Event::Error(msg) => {
            let err = json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}});
            (vec![err.to_string()], true)
        }
    }
}

/// Turn a generation into an SSE response. The engine's receiver lives inside the stream: when the
/// client disconnects, axum drops the stream, the receiver closes and the engine cancels the sequence.
pub fn sse_response(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    id: CompletionId,
    reasoning_model: bool,
    want_logprobs: bool,
    include_usage: bool,
    mut on_event: impl FnMut(&Event) + Send + 'static,
) -> Response {
    let stream = async_stream::stream! {
        let first = chunk_json(&id, json!({"role": "assistant", "content": ""}), None, None, include_usage);
        yield Ok::<_, Infallible>(SseEvent::default().data(first.to_string()));
        while let Some(ev) = events.recv().await {
            on_event(&ev);
            let (lines, last) = sse_for_event(ev, &id, reasoning_model, want_logprobs, include_usage);
            for line in lines {
                yield Ok(SseEvent::default().data(line));
            }
            if last {
                return;
            }
        }
        let err = json!({"error": {"message": "generation ended unexpectedly", "type": "server_error", "param": null, "code": null}});
        yield Ok(SseEvent::default().data(err.to_string()));
    };
    sse(stream).into_response()
}

fn sse<S>(stream: S) -> Sse<axum::response::sse::KeepAliveStream<S>>
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    // A disconnect is only noticed when something is written: keep-alive comments bound how long
    // a generation whose tokens show no text yet (held-back stop prefixes, skipped special tokens)
    // runs for a client that has gone.
    Sse::new(stream).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(2)))
}

/// Gather a whole generation (non-streaming response).
pub async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    mut on_event: impl FnMut(&Event),
) -> Result<Collected, String> {
    let mut out = Collected::default();
    while let Some(ev) = events.recv().await {
        on_event(&ev);
        match ev {
            Event::Delta(d) => out.add(d),
            Event::Finish { reason, usage, .. } => {
                out.finish = Some((reason, usage));
                return Ok(out);
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err("generation ended unexpectedly".into())
}

/// Build the engine request for a validated plan.
pub fn generate_request(
    engine: &ChatEngine,
    plan: &ChatPlan,
) -> Result<(GenerateRequest, bool), EngineError> {
    let prompt = engine.chat_prompt(&plan.messages, None)?;
    let reasoning_model = prompt.reasoning.is_some();
    let req = GenerateRequest {
        prompt_ids: prompt.ids,
        sampling: plan.sampling.clone(),
        stop: plan.stop.clone(),
        reasoning: prompt.reasoning,
    };
    Ok((req, reasoning_model))
}
