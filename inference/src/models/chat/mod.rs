//! Decoder families for chat: GLM-4 (hf, 0414 and original THUDM layouts), Qwen2, Llama,
//! DeepSeek-V3 (MLA + MoE), and GGUF quantized checkpoints.
pub mod cache;
pub mod chatglm;
pub mod decoder;
pub mod deepseek_v3;
pub mod gguf;
pub mod layers;
pub mod snapshot;
pub mod tiktoken;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use super::{Device, Family, LoadedChat, ModelError};

/// Load a chat model folder or .gguf file of the given family (GGUF files in [`gguf::GgufMode::Auto`]).
pub fn load(path: &Path, family: Family, device: &Device) -> Result<LoadedChat, ModelError> {
    load_with(path, family, device, gguf::GgufMode::Auto)
}

/// [`load`] with an explicit choice of how GGUF weights run (`--gguf-mode`).
pub fn load_with(
    path: &Path,
    family: Family,
    device: &Device,
    gguf_mode: gguf::GgufMode,
) -> Result<LoadedChat, ModelError> {
    match family {
        Family::Glm | Family::Glm4 | Family::Qwen2 | Family::Llama => {
            load_dense(path, family, device)
        }
        Family::ChatGlm => chatglm::load(path, device),
        Family::DeepseekV3 => deepseek_v3::load(path, device),
        Family::Gguf => gguf::load(path, device, gguf_mode),
        Family::Bert | Family::XlmRoberta | Family::Ernie => Err(ModelError::load(
            path,
            format!("{family:?} is an embedding model, not a chat model"),
        )),
    }
}

/// A transformers snapshot folder of a dense decoder family.
fn load_dense(dir: &Path, family: Family, device: &Device) -> Result<LoadedChat, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::load(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::load(&cfg_path, format!("invalid JSON: {e}")))?;
    let cfg = decoder::DecoderConfig::from_hf(&cfg, family, dir)?;
    let dtype = decoder::compute_dtype(device);
    let weights = weights::SafetensorsWeights::open(dir, dtype, device)?;
    let model = decoder::Decoder::load(&cfg, &weights, dtype, device)?;
    let assets = snapshot::load_chat_assets(dir)?;
    Ok(LoadedChat {
        model: Arc::new(model),
        tokenizer: assets.tokenizer,
        chat_template: assets.chat_template,
        bos_token: assets.bos_token,
        eos_token: assets.eos_token,
        eos_token_ids: assets.eos_token_ids,
    })
}
