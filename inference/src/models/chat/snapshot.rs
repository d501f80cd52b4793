//! What a chat model folder carries besides weights: tokenizer, chat template, special tokens and
//! stop ids (Hugging Face snapshot layout).
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::models::{CausalLM, LoadedChat, ModelError};

/// Tokenizer-side assets of a chat snapshot folder.
pub struct ChatAssets {
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// From generation_config.json (`eos_token_id`, a number or a list), falling back to the
    /// tokenizer's eos token. GLM-4 needs all three of its ids.
    pub eos_token_ids: Vec<u32>,
}

impl ChatAssets {
    /// The served model: these assets around its decoder.
    pub fn with_model(self, model: Arc<dyn CausalLM>) -> LoadedChat {
        LoadedChat {
            model,
            tokenizer: self.tokenizer,
            chat_template: self.chat_template,
            bos_token: self.bos_token,
            eos_token: self.eos_token,
            eos_token_ids: self.eos_token_ids,
        }
    }
}

pub fn load_chat_assets(dir: &Path) -> Result<ChatAssets, ModelError> {
    load_chat_assets_with(dir, crate::tokenizer::load_tokenizer(dir)?)
}

/// The same, with a tokenizer built by the caller (THUDM's GLM-4 ships `tokenizer.model` as
/// tiktoken ranks instead of a `tokenizer.json`).
pub fn load_chat_assets_with(
    dir: &Path,
    tokenizer: tokenizers::Tokenizer,
) -> Result<ChatAssets, ModelError> {
    let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
    let bos_token = special_token(&tok_cfg, "bos_token");
    let eos_token = special_token(&tok_cfg, "eos_token");
    let mut eos_token_ids = ids_of(gen_cfg.get("eos_token_id"));
    if eos_token_ids.is_empty() {
        // Snapshots without generation_config.json often list the same ids in config.json.
        let model_cfg = read_json_opt(&dir.join("config.json"))?.unwrap_or(Value::Null);
        eos_token_ids = ids_of(model_cfg.get("eos_token_id"));
    }
    if eos_token_ids.is_empty() {
        eos_token_ids.extend(eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)));
    }
    if eos_token_ids.is_empty() {
        return Err(ModelError::load(
            dir,
            "no eos_token_id in generation_config.json or config.json, and no eos_token in tokenizer_config.json",
        ));
    }
    Ok(ChatAssets {
        tokenizer,
        chat_template: chat_template(&tok_cfg),
        bos_token,
        eos_token,
        eos_token_ids,
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::load(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::load(path, e)),
    }
}

/// `bos_token` may be a plain string or an AddedToken object `{"content": ...}`.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` where "default" is the chat one.
fn chat_template(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        let root = std::env::var("GLM_FIXTURES_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into()
        });
        Path::new(&root).join("tiny").join(name)
    }

    #[test]
    fn glm_has_three_stop_ids_and_a_template() {
        let a = load_chat_assets(&fixture("glm4-9b-chat-hf")).unwrap();
        assert_eq!(a.eos_token_ids, vec![586, 593, 595]);
        assert!(a.chat_template.unwrap().contains("[gMASK]"));
        assert_eq!(a.eos_token.as_deref(), Some("<|endoftext|>"));
    }

    #[test]
    fn stop_ids_fall_back_to_config_json() {
        let src = fixture("glm4-0414");
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let a = load_chat_assets(dir.path()).unwrap();
        assert_eq!(a.eos_token_ids, vec![586, 593, 595]);
    }

    #[test]
    fn single_eos_id_and_bos_token() {
        let a = load_chat_assets(&fixture("qwen2")).unwrap();
        assert_eq!(a.eos_token_ids, vec![556]);
        assert_eq!(a.bos_token.as_deref(), Some("<｜begin▁of▁sentence｜>"));
    }
}
