//! Request inputs as the wire carries them: the OpenAI `input` union and token-id lists.
//! Tokenization itself is the embedding service's (`crate::embedding`).
use serde_json::Value;

use crate::embedding::Input;
use crate::error::ApiError;
use crate::tokenizer::first_out_of_vocab;

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

/// Every id must index the model's vocabulary (an out-of-range id would index past the embedding
/// matrix).
pub fn check_ids(ids: &[u32], vocab: usize, model: &str, param: &str) -> Result<(), ApiError> {
    match first_out_of_vocab(ids, vocab) {
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
}
