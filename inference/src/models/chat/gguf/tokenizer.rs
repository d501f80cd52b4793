//! A `tokenizers::Tokenizer` rebuilt from `tokenizer.ggml.*` (gpt2-style byte-level BPE), the
//! way transformers converts GGUF tokenizers: vocabulary and merges as stored, control tokens
//! (type 3) as special added tokens, user-defined tokens (type 4) as plain added tokens.
use serde_json::{json, Map};

use super::{Meta, Value};
use crate::models::ModelError;

pub(crate) struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
}

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// llama.cpp's pre-tokenizer regexes for the `tokenizer.ggml.pre` names this server meets.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(crate) fn from_metadata(meta: &Meta, family: &str) -> Result<GgufTokenizer, ModelError> {
    let model = meta.string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(meta.err(format!(
            "tokenizer.ggml.model {model:?} is not supported (only gpt2-style byte-level BPE)"
        )));
    }
    let tokens = strings(meta.array("tokenizer.ggml.tokens")).ok_or_else(|| {
        meta.err("metadata tokenizer.ggml.tokens is missing or not a string array")
    })?;
    let merges = strings(meta.array("tokenizer.ggml.merges")).ok_or_else(|| {
        meta.err("metadata tokenizer.ggml.merges is missing or not a string array")
    })?;
    let types: Vec<i64> = meta
        .array("tokenizer.ggml.token_type")
        .map(|a| {
            a.iter()
                .map(|v| super::number(v).unwrap_or(1.0) as i64)
                .collect()
        })
        .unwrap_or_default();
    let id = |key: &str| {
        meta.usize(key)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|i| (*i as usize) < tokens.len())
    };
    let token_of = |i: u32| tokens.get(i as usize).cloned();
    let bos = id("tokenizer.ggml.bos_token_id");
    let add_bos = matches!(
        meta.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let pre = meta.string("tokenizer.ggml.pre").unwrap_or_default();

    let json = tokenizer_json(
        &tokens,
        &merges,
        &types,
        &pre,
        bos.filter(|_| add_bos)
            .and_then(|b| Some((b, token_of(b)?))),
    );
    let tokenizer: tokenizers::Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| meta.err(format!("cannot build tokenizer from GGUF metadata: {e}")))?;

    let mut eos_token_ids: Vec<u32> = ["eos", "eot", "eom"]
        .iter()
        .filter_map(|k| id(&format!("tokenizer.ggml.{k}_token_id")))
        .collect();
    if family == "gguf-glm4" {
        // GLM-4 chats also end when the model starts the next user or tool turn.
        eos_token_ids.extend(
            ["<|user|>", "<|observation|>"]
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    eos_token_ids.retain(|i| seen.insert(*i));
    if eos_token_ids.is_empty() {
        return Err(meta.err("metadata tokenizer.ggml.eos_token_id is missing"));
    }
    Ok(GgufTokenizer {
        bos_token: bos.and_then(token_of),
        eos_token: id("tokenizer.ggml.eos_token_id").and_then(token_of),
        eos_token_ids,
        tokenizer,
    })
}

fn strings(a: Option<&Vec<Value>>) -> Option<Vec<String>> {
    a?.iter()
        .map(|v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// The tokenizer.json document of the GGUF tokenizer.
fn tokenizer_json(
    tokens: &[String],
    merges: &[String],
    types: &[i64],
    pre: &str,
    bos: Option<(u32, String)>,
) -> serde_json::Value {
    // Later duplicates win, as in transformers' `{tok: i for i, tok in enumerate(tokens)}`.
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .filter_map(|(i, t)| {
            Some(json!({
                "id": i, "content": tokens.get(i)?, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *t == CONTROL,
            }))
        })
        .collect();
    let split = match pre {
        "llama-bpe" | "llama3" | "smaug-bpe" | "glm4" | "chatglm-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    };
    let pre_tokenizer = match split {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };
    let post_processor = match bos {
        Some((id, tok)) => {
            let mut specials = Map::new();
            specials.insert(
                tok.clone(),
                json!({"id": tok, "ids": [id], "tokens": [tok]}),
            );
            json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": specials,
            })
        }
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": split == Some(LLAMA3_SPLIT), "vocab": vocab, "merges": merges,
        },
    })
}
