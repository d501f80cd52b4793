//! Decoder families for chat: GLM-4 (hf, 0414 and original THUDM layouts), Qwen2, Llama,
//! DeepSeek-V3 (MLA + MoE), and GGUF quantized checkpoints.
pub mod attention;
pub mod chatglm;
pub mod decoder;
pub mod deepseek_v3;
pub mod dummy;
pub mod gguf;
pub mod kv;
pub mod layers;
pub mod linear;
pub mod placement;
pub mod snapshot;
pub mod tiktoken;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::DType;

use super::dir::ModelDir;
use super::{Device, Family, LoadedChat, ModelError};

/// Where the weights come from (`--load-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// The checkpoint's files.
    #[default]
    Auto,
    /// Random weights shaped by `config.json` alone (benchmarks of real shapes without weights).
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("`{other}` is not one of auto, dummy")),
        }
    }
}

/// How a chat model is loaded: devices, precision, KV pool.
#[derive(Debug, Clone)]
pub struct ChatLoadOptions {
    /// Layers are split across these in order (one entry: everything there).
    pub devices: Vec<Device>,
    /// Compute dtype; `None`: float32 on the CPU (reference numerics), bfloat16 on GPUs.
    pub dtype: Option<DType>,
    pub gguf_mode: gguf::GgufMode,
    pub load_format: LoadFormat,
    /// KV pool size in bytes (all layers); `None`: see [`placement`].
    pub kv_cache_memory: Option<u64>,
}

impl ChatLoadOptions {
    pub fn on(device: &Device) -> Self {
        ChatLoadOptions {
            devices: vec![device.clone()],
            dtype: None,
            gguf_mode: gguf::GgufMode::Auto,
            load_format: LoadFormat::Auto,
            kv_cache_memory: None,
        }
    }

    /// The compute dtype on these devices.
    pub fn dtype(&self) -> DType {
        self.dtype
            .unwrap_or_else(|| decoder::compute_dtype(self.devices.first().unwrap_or(&Device::Cpu)))
    }

    fn first_device(&self) -> Device {
        self.devices.first().cloned().unwrap_or(Device::Cpu)
    }
}

/// Load a chat model folder or .gguf file of the given family (GGUF files in [`gguf::GgufMode::Auto`]).
pub fn load(path: &Path, family: Family, device: &Device) -> Result<LoadedChat, ModelError> {
    load_with(path, family, &ChatLoadOptions::on(device))
}

/// [`load`] with explicit devices, dtype, GGUF mode, load format and KV budget.
pub fn load_with(
    path: &Path,
    family: Family,
    options: &ChatLoadOptions,
) -> Result<LoadedChat, ModelError> {
    if options.devices.is_empty() {
        return Err(ModelError::load(path, "no device to load the model on"));
    }
    match family {
        Family::Glm | Family::Glm4 | Family::Qwen2 | Family::Llama => {
            load_dense(path, family, options)
        }
        Family::ChatGlm => chatglm::load(path, options),
        Family::DeepseekV3 => deepseek_v3::load(path, options),
        Family::Gguf if options.load_format == LoadFormat::Dummy => Err(ModelError::load(
            path,
            "--load-format dummy needs a snapshot folder with config.json, not a GGUF file",
        )),
        Family::Gguf => gguf::load(path, options),
        Family::Bert | Family::XlmRoberta | Family::Ernie => Err(ModelError::load(
            path,
            format!("{family:?} is an embedding model, not a chat model"),
        )),
    }
}

/// A transformers snapshot folder of a dense decoder family.
fn load_dense(
    dir: &Path,
    family: Family,
    options: &ChatLoadOptions,
) -> Result<LoadedChat, ModelError> {
    let raw: serde_json::Value = ModelDir::new(dir).config()?;
    let cfg = decoder::DecoderConfig::from_hf(&raw, family, dir)?;
    let dtype = options.dtype();
    let weights: Box<dyn weights::Weights> = match options.load_format {
        LoadFormat::Auto => Box::new(weights::SafetensorsWeights::open(
            dir,
            dtype,
            &options.first_device(),
        )?),
        LoadFormat::Dummy => Box::new(weights::SafetensorsWeights::dummy(
            dummy::DummyWeights::for_dense(family, &raw),
            dtype,
            &options.first_device(),
        )),
    };
    let placement = plan(dir, &cfg.model_bytes(dtype), options)?;
    let model = decoder::Decoder::load(
        &cfg,
        weights.as_ref(),
        dtype,
        placement,
        options.kv_cache_memory,
    )?;
    Ok(dummy::chat_assets(dir, options.load_format, cfg.vocab_size)?.with_model(Arc::new(model)))
}

/// The layers' devices; a model that does not fit its GPUs fails here, naming the bytes.
pub(crate) fn plan(
    path: &Path,
    bytes: &placement::ModelBytes,
    options: &ChatLoadOptions,
) -> Result<placement::Placement, ModelError> {
    placement::Placement::plan(bytes, &options.devices).map_err(|e| ModelError::load(path, e))
}
