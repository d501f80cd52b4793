//! Request validation (after TGI's `validation.rs`): every field checked against the server's
//! limits and turned into the engine's parameters, with errors naming the field.
use serde_json::Value;

use super::policy::{self, ChatLimits};
use super::types::{ChatMessage, ChatRequest, MessageContent, StopField};
use crate::engine::{ChatGenerateRequest, PromptMessage, SamplingParams, StopParams};

const MAX_TOP_LOGPROBS: u32 = 20;

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

/// A validated request: the engine's part, and how to answer.
#[derive(Debug)]
pub struct ChatPlan {
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub request: ChatGenerateRequest,
}

impl ChatRequest {
    /// Check every field against the server's `limits` and build the engine's parameters.
    pub fn validate(self, limits: &ChatLimits) -> Result<ChatPlan, Invalid> {
        policy::check_other_fields(&self.other)?;
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
        let max_tokens = policy::max_tokens(requested, limits)?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        policy::check_stop(&stop, limits)?;
        Ok(ChatPlan {
            model: self.model,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            request: ChatGenerateRequest {
                messages,
                sampling,
                stop: StopParams {
                    max_tokens: Some(max_tokens),
                    stop,
                    ignore_eos: self.ignore_eos.unwrap_or(false),
                    skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
                },
            },
        })
    }
}

/// Check roles and content parts and shape messages for the chat template.
pub fn template_messages(messages: Vec<ChatMessage>) -> Result<Vec<PromptMessage>, Invalid> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| template_message(i, m))
        .collect()
}

fn template_message(i: usize, m: ChatMessage) -> Result<PromptMessage, Invalid> {
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
    Ok(PromptMessage {
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
    policy::check_repetition_penalty(repetition)?;
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
