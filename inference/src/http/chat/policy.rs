//! What a chat request may ask for beyond the typed fields: the server's bounds on generation
//! (`--chat-max-tokens`, `--chat-max-stop-strings`, `--chat-max-stop-chars`) and the policy for
//! fields this server does not implement. OpenAI refuses arguments it does not recognise; so does
//! this server, except for fields that never change the output (metadata) and fields given at the
//! value that leaves the output as it would be without them (`"best_of": 1`, `"echo": false`, ...).
use serde_json::{Map, Value};

use super::Invalid;

/// Server-side bounds of one chat request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatLimits {
    /// Largest `max_tokens` / `max_completion_tokens`, and the default when the request sets none.
    pub max_tokens: usize,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Longest stop string, in characters.
    pub max_stop_chars: usize,
}

impl Default for ChatLimits {
    fn default() -> Self {
        ChatLimits {
            max_tokens: 8192,
            max_stop_strings: 16,
            max_stop_chars: 256,
        }
    }
}

/// `repetition_penalty` range: beyond it, dividing or multiplying logits overflows float32 or
/// flattens every distribution, and the sampler would pick a wrong token instead of failing.
pub const REPETITION_PENALTY_RANGE: (f32, f32) = (0.01, 100.0);

/// Fields that do not change what is generated: accepted and ignored.
const METADATA: &[&str] = &[
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "request_id",
    "priority",
];

/// A value that leaves the output unchanged.
#[derive(Clone, Copy)]
enum Neutral {
    /// null only.
    Null,
    /// null, `[]` or `{}`.
    Empty,
    /// null or this boolean.
    Bool(bool),
    /// null or this number.
    Number(f64),
    /// null or this string.
    Str(&'static str),
    /// null or any boolean (only meaningful together with a field refused otherwise).
    AnyBool,
}

/// Fields of OpenAI's API and of vLLM/TGI-style servers that change the output, with the only
/// value they are accepted at. Anything not listed here nor typed in `ChatRequest` is unknown.
const UNSUPPORTED: &[(&str, Neutral)] = &[
    ("tools", Neutral::Empty),
    ("tool_choice", Neutral::Str("none")),
    ("functions", Neutral::Empty),
    ("function_call", Neutral::Str("none")),
    ("parallel_tool_calls", Neutral::AnyBool),
    ("logit_bias", Neutral::Empty),
    ("prediction", Neutral::Null),
    ("audio", Neutral::Null),
    ("modalities", Neutral::Null),
    ("web_search_options", Neutral::Null),
    ("reasoning_effort", Neutral::Null),
    ("verbosity", Neutral::Null),
    ("best_of", Neutral::Number(1.0)),
    ("echo", Neutral::Bool(false)),
    ("min_tokens", Neutral::Number(0.0)),
    ("length_penalty", Neutral::Number(1.0)),
    ("typical_p", Neutral::Number(1.0)),
    ("top_a", Neutral::Number(0.0)),
    ("stop_token_ids", Neutral::Empty),
    ("bad_words", Neutral::Empty),
    ("allowed_token_ids", Neutral::Null),
    ("use_beam_search", Neutral::Bool(false)),
    ("include_stop_str_in_output", Neutral::Bool(false)),
    ("spaces_between_special_tokens", Neutral::Bool(true)),
    ("prompt_logprobs", Neutral::Null),
    ("truncate_prompt_tokens", Neutral::Null),
    ("add_generation_prompt", Neutral::Bool(true)),
    ("continue_final_message", Neutral::Bool(false)),
    ("chat_template", Neutral::Null),
    ("chat_template_kwargs", Neutral::Empty),
    ("documents", Neutral::Empty),
    ("guided_json", Neutral::Null),
    ("guided_regex", Neutral::Null),
    ("guided_choice", Neutral::Null),
    ("guided_grammar", Neutral::Null),
    ("guided_decoding_backend", Neutral::Null),
    ("guided_whitespace_pattern", Neutral::Null),
    ("structured_outputs", Neutral::Null),
    ("response_format_schema", Neutral::Null),
    ("suffix", Neutral::Null),
];

impl Neutral {
    fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) => true,
            (Neutral::Empty, Value::Array(a)) => a.is_empty(),
            (Neutral::Empty, Value::Object(o)) => o.is_empty(),
            (Neutral::Bool(b), Value::Bool(x)) => *x == b,
            (Neutral::AnyBool, Value::Bool(_)) => true,
            (Neutral::Number(n), Value::Number(x)) => x.as_f64() == Some(n),
            (Neutral::Str(s), Value::String(x)) => x == s,
            _ => false,
        }
    }

    fn describe(self) -> String {
        match self {
            Neutral::Null | Neutral::AnyBool => "null".into(),
            Neutral::Empty => "null or empty".into(),
            Neutral::Bool(b) => format!("{b}"),
            Neutral::Number(n) => format!("{n}"),
            Neutral::Str(s) => format!("\"{s}\""),
        }
    }
}

/// Refuse every field outside the typed ones that would change the output (400, `param` = the
/// field): unsupported fields unless at their neutral value, and fields this server does not know.
pub fn check_other_fields(other: &Map<String, Value>) -> Result<(), Invalid> {
    for (field, value) in other {
        if METADATA.contains(&field.as_str()) {
            continue;
        }
        match UNSUPPORTED.iter().find(|(name, _)| name == field) {
            Some((_, neutral)) if neutral.accepts(value) => {}
            Some((_, neutral)) => {
                return Err(Invalid::new(
                    field,
                    format!(
                        "'{field}' is not supported by this server (accepted only as {}, which \
                         leaves the output unchanged)",
                        neutral.describe()
                    ),
                ))
            }
            None => {
                return Err(Invalid::new(
                    field,
                    format!("unrecognized request argument '{field}'"),
                ))
            }
        }
    }
    Ok(())
}

/// `max_tokens` within `--chat-max-tokens`; the limit itself when the request sets none.
pub fn max_tokens(requested: Option<(u32, &str)>, limits: &ChatLimits) -> Result<usize, Invalid> {
    match requested {
        None => Ok(limits.max_tokens),
        Some((0, field)) => Err(Invalid::new(field, format!("{field} must be at least 1"))),
        Some((n, field)) if n as usize > limits.max_tokens => Err(Invalid::new(
            field,
            format!(
                "{field} is {n}, more than this server's limit of {} tokens (--chat-max-tokens)",
                limits.max_tokens
            ),
        )),
        Some((n, _)) => Ok(n as usize),
    }
}

/// Stop strings within `--chat-max-stop-strings` and `--chat-max-stop-chars`: each one is
/// searched for at every step of the shared engine thread.
pub fn check_stop(stop: &[String], limits: &ChatLimits) -> Result<(), Invalid> {
    if stop.len() > limits.max_stop_strings {
        return Err(Invalid::new(
            "stop",
            format!(
                "at most {} stop strings (--chat-max-stop-strings), got {}",
                limits.max_stop_strings,
                stop.len()
            ),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(Invalid::new("stop", "stop strings must not be empty"));
        }
        let chars = s.chars().count();
        if chars > limits.max_stop_chars {
            return Err(Invalid::new(
                "stop",
                format!(
                    "stop[{i}] has {chars} characters, more than the limit of {} \
                     (--chat-max-stop-chars)",
                    limits.max_stop_chars
                ),
            ));
        }
    }
    Ok(())
}

/// Hugging Face's `repetition_penalty` within [`REPETITION_PENALTY_RANGE`].
pub fn check_repetition_penalty(r: Option<f32>) -> Result<(), Invalid> {
    let (lo, hi) = REPETITION_PENALTY_RANGE;
    match r {
        Some(r) if !(lo..=hi).contains(&r) => Err(Invalid::new(
            "repetition_penalty",
            format!("repetition_penalty must be between {lo} and {hi}, got {r}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn fields_that_change_the_output_are_refused_naming_the_field() {
        for (field, value) in [
            ("min_tokens", json!(5)),
            ("best_of", json!(2)),
            ("echo", json!(true)),
            ("stop_token_ids", json!([2])),
            ("guided_json", json!({"type": "object"})),
            ("length_penalty", json!(0.5)),
            ("tools", json!([{"type": "function"}])),
            ("logit_bias", json!({"1": 5})),
            ("made_up_option", json!(1)),
        ] {
            let err = check_other_fields(&fields(json!({ field: value }))).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field));
            assert!(err.message.contains(field), "{}", err.message);
        }
    }

    #[test]
    fn neutral_values_and_metadata_are_accepted() {
        let ok = json!({
            "min_tokens": 0, "best_of": 1, "echo": false, "stop_token_ids": [],
            "guided_json": null, "length_penalty": 1.0, "tools": [], "tool_choice": "none",
            "logit_bias": {}, "parallel_tool_calls": true, "store": true,
            "metadata": {"team": "a"}, "service_tier": "auto",
        });
        assert_eq!(check_other_fields(&fields(ok)), Ok(()));
    }

    #[test]
    fn generation_bounds_name_their_flags() {
        let limits = ChatLimits::default();
        assert_eq!(max_tokens(None, &limits), Ok(8192));
        assert_eq!(max_tokens(Some((7, "max_tokens")), &limits), Ok(7));
        let err = max_tokens(Some((100_000, "max_completion_tokens")), &limits).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_completion_tokens"));
        assert!(err.message.contains("--chat-max-tokens"), "{}", err.message);
        let long = vec!["x".repeat(257)];
        let err = check_stop(&long, &limits).unwrap_err();
        assert!(
            err.message.contains("257") && err.message.contains("--chat-max-stop-chars"),
            "{}",
            err.message
        );
        assert!(check_stop(&["界".repeat(256)], &limits).is_ok());
        let many = vec!["a".to_owned(); 17];
        let err = check_stop(&many, &limits).unwrap_err();
        assert!(
            err.message.contains("--chat-max-stop-strings"),
            "{}",
            err.message
        );
        for bad in [1e-37, 0.0, -1.0, 1e6, f32::NAN, f32::INFINITY] {
            assert!(check_repetition_penalty(Some(bad)).is_err(), "{bad}");
        }
        assert!(check_repetition_penalty(Some(1.3)).is_ok());
    }
}
