//! Decoder families for chat: GLM-4 (hf, 0414 and original THUDM layouts), Qwen2, Llama,
//! DeepSeek-V3 (MLA + MoE), and GGUF quantized checkpoints.
pub mod cache;
pub mod chatglm;
pub mod deepseek_v3;
pub mod snapshot;
pub mod tiktoken;

use std::path::Path;

use super::{Device, Family, LoadedChat, ModelError};

/// Load a chat model folder or .gguf file of the given family.
pub fn load(path: &Path, family: Family, _device: &Device) -> Result<LoadedChat, ModelError> {
    Err(ModelError::load(path, format!("{family:?} chat models are not implemented yet")))
}
