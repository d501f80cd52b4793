//! Every wire type of the chat routes, in one place: the OpenAI request as clients send it and the
//! `chat.completion` / `chat.completion.chunk` objects the server answers with.
//!
//! Response fields are declared in alphabetical order: that is the key order the server has
//! always sent (it built these objects as `serde_json::Value`s, whose maps sort their keys), and
//! clients that compare raw bytes keep seeing the same bytes.
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::{Delta, TokenLogprob, TopLogprob, Usage};

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
    /// Everything else; see [`super::policy::check_other_fields`].
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

/// A whole answer (`"stream": false`).
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub choices: [CompletionChoice; 1],
    pub created: u64,
    pub id: String,
    pub model: String,
    pub object: &'static str,
    pub usage: UsageBody,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub finish_reason: &'static str,
    pub index: u32,
    pub logprobs: Option<Logprobs>,
    pub message: AssistantMessage,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub content: String,
    /// Reasoning models only (present, possibly empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    pub role: &'static str,
}

/// One server-sent event of a streamed answer.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    /// One choice; none in the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    pub created: u64,
    pub id: String,
    pub model: String,
    pub object: &'static str,
    /// Absent without `stream_options.include_usage`; with it, null in every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub delta: ChunkDelta,
    pub finish_reason: Option<&'static str>,
    pub index: u32,
    pub logprobs: Option<Logprobs>,
}

/// What a chunk adds; every part is optional (the finish chunk's delta is `{}`).
#[derive(Debug, Default, Serialize)]
pub struct ChunkDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
}

impl ChunkDelta {
    /// The first chunk of every stream.
    pub fn role() -> Self {
        ChunkDelta {
            content: Some(String::new()),
            reasoning_content: None,
            role: Some("assistant"),
        }
    }

    /// `content` always for plain models, only when non-empty for reasoning models (whose deltas
    /// may carry reasoning only); `reasoning_content` only when non-empty.
    pub fn from_engine(d: Delta, reasoning_model: bool) -> Self {
        let content = (!d.content.is_empty() || !reasoning_model).then_some(d.content);
        let reasoning_content =
            (reasoning_model && !d.reasoning_content.is_empty()).then_some(d.reasoning_content);
        ChunkDelta {
            content,
            reasoning_content,
            role: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct UsageBody {
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        UsageBody {
            completion_tokens: u.completion_tokens,
            prompt_tokens: u.prompt_tokens,
            total_tokens: u.total_tokens(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Logprobs {
    pub content: Vec<LogprobEntry>,
}

#[derive(Debug, Serialize)]
pub struct LogprobEntry {
    pub bytes: Vec<u8>,
    /// Widened to f64 as it always was on the wire (`0.1f32` is written 0.10000000149011612).
    pub logprob: f64,
    pub token: String,
    /// The chosen token's alternatives; absent on the alternatives themselves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<LogprobEntry>>,
}

impl Logprobs {
    pub fn from_engine(items: &[TokenLogprob]) -> Self {
        let entry = |t: &TopLogprob| LogprobEntry {
            bytes: t.bytes.clone(),
            logprob: f64::from(t.logprob),
            token: t.token.clone(),
            top_logprobs: None,
        };
        let content = items
            .iter()
            .map(|lp| LogprobEntry {
                top_logprobs: Some(lp.top.iter().map(entry).collect()),
                ..entry(&lp.chosen)
            })
            .collect();
        Logprobs { content }
    }
}

/// An error in the middle of a stream (the status line has gone): OpenAI's envelope as one event.
#[derive(Debug, Serialize)]
pub struct StreamError {
    pub error: StreamErrorBody,
}

#[derive(Debug, Serialize)]
pub struct StreamErrorBody {
    pub code: Option<&'static str>,
    pub message: String,
    pub param: Option<&'static str>,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl StreamError {
    pub fn server(message: impl Into<String>) -> Self {
        StreamError {
            error: StreamErrorBody {
                code: None,
                message: message.into(),
                param: None,
                kind: "server_error",
            },
        }
    }
}
