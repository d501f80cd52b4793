//! Decoder families for chat: GLM-4 (hf, 0414 and original THUDM layouts), Qwen2, Llama,
//! DeepSeek-V3 (MLA + MoE), and GGUF quantized checkpoints.
pub mod cache;
pub mod chatglm;
pub mod decoder;
pub mod deepseek_v3;
pub mod gguf;
pub mod layers;
pub mod linear;
pub mod snapshot;
pub mod tiktoken;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use super::{read_json, Device, Family, LoadedChat, ModelError};

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
    let cfg: serde_json::Value = read_json(&dir.join("config.json"))?;
    let cfg = decoder::DecoderConfig::from_hf(&cfg, family, dir)?;
    let dtype = decoder::compute_dtype(device);
    let weights = weights::SafetensorsWeights::open(dir, dtype, device)?;
    let model = decoder::Decoder::load(&cfg, &weights, dtype, device)?;
    Ok(snapshot::load_chat_assets(dir)?.with_model(Arc::new(model)))
}
