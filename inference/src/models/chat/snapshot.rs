//! What a chat model folder carries besides weights: tokenizer, chat template, special tokens and
//! stop ids (Hugging Face snapshot layout).
use std::path::Path;
use std::sync::Arc;

use crate::models::dir::{GenerationConfig, ModelDir, SpecialToken};
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
    let dir = ModelDir::new(dir);
    let tok_cfg = dir.tokenizer_config()?;
    let bos_token = tok_cfg.token(SpecialToken::Bos).map(str::to_owned);
    let eos_token = tok_cfg.token(SpecialToken::Eos).map(str::to_owned);
    let mut eos_token_ids = dir.generation_config()?.eos_token_ids();
    if eos_token_ids.is_empty() {
        // Snapshots without generation_config.json often list the same ids in config.json.
        let model_cfg: Option<GenerationConfig> = dir.config_opt()?;
        eos_token_ids = model_cfg.unwrap_or_default().eos_token_ids();
    }
    if eos_token_ids.is_empty() {
        eos_token_ids.extend(eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)));
    }
    if eos_token_ids.is_empty() {
        return Err(ModelError::load(
            dir.path(),
            "no eos_token_id in generation_config.json or config.json, and no eos_token in tokenizer_config.json",
        ));
    }
    Ok(ChatAssets {
        tokenizer,
        chat_template: tok_cfg.chat_template().map(str::to_owned),
        bos_token,
        eos_token,
        eos_token_ids,
    })
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
