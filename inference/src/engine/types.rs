//! What goes into the engine (a tokenized prompt and how to sample and stop) and what comes out
//! (a stream of [`Event`]s).
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// How to pick each next token. Defaults give greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below [`super::sampler::GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to `top_p`; 1 = off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 = off.
    pub min_p: f32,
    /// Same seed, same prompt, same parameters: same tokens.
    pub seed: Option<u64>,
    /// OpenAI semantics: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI semantics: subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    /// Hugging Face semantics over prompt and generated tokens: positive logits divided, negative
    /// multiplied; 1 = off.
    pub repetition_penalty: f32,
    /// Report the chosen token's log-probability (and `top_logprobs` alternatives).
    pub logprobs: bool,
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// When to stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopParams {
    /// Generated tokens at most; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Drop special tokens (`added_tokens` with `special: true`) from the text.
    pub skip_special_tokens: bool,
}

/// What a chat template sees of a message: `content` is a string or null; `tool_calls` only when
/// present (DeepSeek's template tests `'tool_calls' in message`).
#[derive(Debug, Clone, Serialize)]
pub struct PromptMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl PromptMessage {
    pub fn user(content: &str) -> Self {
        PromptMessage {
            role: "user".into(),
            content: Some(content.into()),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// A validated chat request, as [`super::ChatEngine::generate`] takes it: messages to render with
/// the model's template, how to sample and when to stop.
#[derive(Debug, Clone)]
pub struct ChatGenerateRequest {
    pub messages: Vec<PromptMessage>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

/// One tokenized generation request for the engine's queue.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Split `<think>...</think>` into `reasoning_content` (DeepSeek-R1 style models).
    pub reasoning: Option<super::reasoning::ReasoningStart>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A candidate token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub id: u32,
    /// The token's text (special tokens included); may be a partial UTF-8 sequence rendered lossily.
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The chosen token with its log-probability and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub chosen: TopLogprob,
    pub top: Vec<TopLogprob>,
}

/// Text produced since the previous delta. Either part may be empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub content: String,
    pub reasoning_content: String,
    /// Log-probabilities of the tokens consumed since the previous delta (when asked for).
    pub logprobs: Vec<TokenLogprob>,
}

/// What a request's channel carries: deltas, then exactly one `Finish` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(Delta),
    Finish {
        reason: FinishReason,
        usage: Usage,
        timing: Timing,
    },
    Error(String),
}

/// Latencies of one request, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timing {
    pub queued: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}
