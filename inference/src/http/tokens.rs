//! Turning request inputs into token ids: the OpenAI `input` union, length limits and truncation,
//! token-id validation. Tokenization runs on the blocking pool (it is CPU work).
use std::sync::Arc;

use serde_json::Value;
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use crate::error::ApiError;
use crate::registry::EmbeddingModel;
use crate::tokenizer::encode_head;

/// One embedding input: text, or token ids used as given (no special tokens added).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

const INPUT_SHAPE: &str =
    "must be a string, an array of strings, an array of token ids or an array of token id arrays";

/// Parse OpenAI's `input`: string | [string] | [int] | [[int]]. `param` names the field in errors.
pub fn parse_input(value: &Value, param: &str) -> Result<Vec<Input>, ApiError> {
    match value {
        Value::String(s) => Ok(vec![text(s, param)?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::EmptyInput {
            param: param.to_string(),
        }),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => text(s, &format!("{param}[{i}]")),
                    _ => Err(ApiError::invalid(
                        format!("{param}[{i}]"),
                        "must be a string like the other items",
                    )),
                })
                .collect(),
            Value::Number(_) => Ok(vec![Input::Ids(ids(items, param)?)]),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let p = format!("{param}[{i}]");
                    match item {
                        Value::Array(inner) if inner.is_empty() => {
                            Err(ApiError::EmptyInput { param: p })
                        }
                        Value::Array(inner) => Ok(Input::Ids(ids(inner, &p)?)),
                        _ => Err(ApiError::invalid(
                            p,
                            "must be an array of token ids like the other items",
                        )),
                    }
                })
                .collect(),
            _ => Err(ApiError::invalid(param, INPUT_SHAPE)),
        },
        _ => Err(ApiError::invalid(param, INPUT_SHAPE)),
    }
}

fn text(s: &str, param: &str) -> Result<Input, ApiError> {
    if s.is_empty() {
        return Err(ApiError::EmptyInput {
            param: param.to_string(),
        });
    }
    Ok(Input::Text(s.to_string()))
}

fn ids(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let p = format!("{param}[{i}]");
            match item {
                Value::Number(n) => {
                    n.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                p,
                                format!("token ids are non-negative integers below 2^32, got {n}"),
                            )
                        })
                }
                _ => Err(ApiError::invalid(
                    p,
                    "must be a token id (integer) like the other items",
                )),
            }
        })
        .collect()
}

/// Tokenized inputs ready for the batcher.
pub struct Tokenized {
    pub ids: Vec<Vec<u32>>,
    /// Tokens over all inputs, special tokens included (`usage.prompt_tokens`).
    pub tokens: usize,
}

/// Why one text could not be encoded within a limit.
pub enum EncodeError {
    /// `tokens` with special tokens; `exact` false when only a prefix was tokenized (then the
    /// text has more than that).
    TooLong {
        tokens: usize,
        exact: bool,
    },
    Tokenizer(String),
}

/// Encode `text` with the tokenizer's special tokens. Beyond `max_len` tokens (specials included)
/// fail with the length, or with `truncate` keep the first tokens and still add the specials
/// (what sentence-transformers does at `max_seq_length`). Only as much of the text is tokenized
/// as that needs (see [`encode_head`]), so a huge input costs no more than a long one.
pub fn encode_bounded(
    tok: &Tokenizer,
    text: &str,
    max_len: usize,
    truncate: bool,
) -> Result<Encoding, EncodeError> {
    let added = tok
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false));
    let (mut enc, exact) = encode_head(tok, text, max_len.saturating_sub(added))
        .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    let total = enc.len() + added;
    if total > max_len {
        if !truncate {
            return Err(EncodeError::TooLong {
                tokens: if exact { total } else { max_len },
                exact,
            });
        }
        enc.truncate(max_len.saturating_sub(added), 0, TruncationDirection::Right);
        enc.take_overflowing();
    }
    tok.post_process(enc, None, true)
        .map_err(|e| EncodeError::Tokenizer(e.to_string()))
}

/// Tokenize and bound every input for `model`, on the blocking pool.
pub async fn tokenize_inputs(
    model: &Arc<EmbeddingModel>,
    inputs: Vec<Input>,
    truncate: bool,
    param: &'static str,
) -> Result<Tokenized, ApiError> {
    let model = model.clone();
    tokio::task::spawn_blocking(move || tokenize_blocking(&model, inputs, truncate, param))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization task failed: {e}")))?
}

fn tokenize_blocking(
    model: &EmbeddingModel,
    inputs: Vec<Input>,
    truncate: bool,
    param: &str,
) -> Result<Tokenized, ApiError> {
    let max_len = model.info.max_input_tokens;
    let single = inputs.len() == 1;
    let name = |i: usize| {
        if single {
            param.to_string()
        } else {
            format!("{param}[{i}]")
        }
    };
    let mut out = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let ids = match input {
            Input::Text(text) => match encode_bounded(&model.tokenizer, &text, max_len, truncate) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(EncodeError::TooLong { tokens, exact }) => {
                    return Err(ApiError::InputTooLong {
                        param: name(i),
                        model: model.name.clone(),
                        tokens,
                        exact,
                        limit: max_len,
                    })
                }
                Err(EncodeError::Tokenizer(msg)) => {
                    return Err(ApiError::invalid(
                        name(i),
                        format!("cannot be tokenized: {msg}"),
                    ))
                }
            },
            Input::Ids(mut ids) => {
                check_ids(&ids, model.vocab_size, &model.name, &name(i))?;
                if ids.len() > max_len {
                    if !truncate {
                        return Err(ApiError::InputTooLong {
                            param: name(i),
                            model: model.name.clone(),
                            tokens: ids.len(),
                            exact: true,
                            limit: max_len,
                        });
                    }
                    ids.truncate(max_len);
                }
                ids
            }
        };
        out.push(ids);
    }
    let tokens = out.iter().map(Vec::len).sum();
    Ok(Tokenized { ids: out, tokens })
}

/// Every id must index the model's vocabulary (an out-of-range id would index past the embedding
/// matrix).
pub fn check_ids(ids: &[u32], vocab: usize, model: &str, param: &str) -> Result<(), ApiError> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(pos) => Err(ApiError::InvalidTokenId {
            param: format!("{param}[{pos}]"),
            model: model.to_string(),
            id: ids[pos].to_string(),
            vocab,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn code(err: ApiError) -> String {
        let param = match &err {
            ApiError::InvalidParam { param, .. } | ApiError::EmptyInput { param } => param.clone(),
            other => panic!("unexpected {other:?}"),
        };
        format!(
            "{}@{param}",
            if matches!(err, ApiError::EmptyInput { .. }) {
                "empty"
            } else {
                "invalid"
            }
        )
    }

    #[test]
    fn accepts_the_four_openai_input_shapes() {
        assert_eq!(
            parse_input(&json!("hi"), "input").unwrap(),
            vec![Input::Text("hi".into())]
        );
        assert_eq!(
            parse_input(&json!(["a", "b"]), "input").unwrap(),
            vec![Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            parse_input(&json!([1, 2, 3]), "input").unwrap(),
            vec![Input::Ids(vec![1, 2, 3])]
        );
        assert_eq!(
            parse_input(&json!([[1], [2, 3]]), "input").unwrap(),
            vec![Input::Ids(vec![1]), Input::Ids(vec![2, 3])]
        );
    }

    #[test]
    fn rejects_bad_inputs_naming_the_item() {
        let cases = [
            (json!(""), "empty@input"),
            (json!([]), "empty@input"),
            (json!(["a", ""]), "empty@input[1]"),
            (json!([[1], []]), "empty@input[1]"),
            (json!(null), "invalid@input"),
            (json!(5), "invalid@input"),
            (json!({"a": 1}), "invalid@input"),
            (json!([true]), "invalid@input"),
            (json!(["a", 1]), "invalid@input[1]"),
            (json!([1, "a"]), "invalid@input[1]"),
            (json!([1, -1]), "invalid@input[1]"),
            (json!([1, 1.5]), "invalid@input[1]"),
            (json!([4294967296u64]), "invalid@input[0]"),
            (json!([1e300]), "invalid@input[0]"),
            (json!([[1], 2]), "invalid@input[1]"),
            (json!([[1, "x"]]), "invalid@input[0][1]"),
        ];
        for (value, want) in cases {
            assert_eq!(
                code(parse_input(&value, "input").unwrap_err()),
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary() {
        assert!(check_ids(&[0, 9], 10, "m", "input").is_ok());
        match check_ids(&[0, 10], 10, "m", "input").unwrap_err() {
            ApiError::InvalidTokenId {
                param, id, vocab, ..
            } => {
                assert_eq!((param.as_str(), id.as_str(), vocab), ("input[1]", "10", 10));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn encoding_is_bounded_with_specials_kept_on_truncation() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/tiny/bert");
        let tok = crate::tokenizer::load_tokenizer(&dir)
            .expect("fixture tiny/bert tokenizer (see /work/shared/fixtures)");
        let text = "a b c d e f g h";
        let full = tok.encode(text, true).unwrap();
        let n = full.len();
        let same = encode_bounded(&tok, text, n, false).ok().unwrap();
        assert_eq!(
            same.get_ids(),
            full.get_ids(),
            "within the limit: identical to encode(text, true)"
        );
        assert!(
            matches!(encode_bounded(&tok, text, n - 1, false), Err(EncodeError::TooLong { tokens, exact: true }) if tokens == n)
        );
        let cut = encode_bounded(&tok, text, 5, true).ok().unwrap();
        let ids = cut.get_ids();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[0], full.get_ids()[0], "leading special kept");
        assert_eq!(ids[4], full.get_ids()[n - 1], "trailing special kept");
        assert_eq!(&ids[1..4], &full.get_ids()[1..4]);
    }
}
