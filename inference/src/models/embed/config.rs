//! The `config.json` fields the encoder families share (BERT, ERNIE, XLM-RoBERTa), validated once at
//! load so that a bad folder fails with one line naming the file and the field.
use std::path::Path;

use serde::Deserialize;

use crate::models::{ModelDir, ModelError};

/// Feed-forward activation, as transformers' `ACT2FN` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    pub fn apply(self, xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::GeluErf => crate::kernels::act::gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }

    /// The same on float32 values in place (the CPU encoder's fused epilogue).
    pub fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Self::GeluErf => crate::kernels::act::gelu_slice(xs),
            Self::GeluTanh => xs.iter_mut().for_each(|x| {
                // candle's / transformers' `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let v = *x;
                let inner = 0.797_884_6 * v * (1.0 + 0.044_715 * v * v);
                *x = 0.5 * v * (1.0 + inner.tanh());
            }),
            Self::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Self::Silu => xs.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    // ERNIE 3.0
    #[serde(default)]
    use_task_id: bool,
    #[serde(default)]
    task_type_vocab_size: Option<usize>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Validated encoder hyper-parameters.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// ERNIE: add `task_type_embeddings` row 0 to every token.
    pub use_task_id: bool,
    pub task_type_vocab_size: usize,
}

impl EncoderConfig {
    /// Read and validate `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let dir = ModelDir::new(dir);
        Self::from_raw(dir.config()?).map_err(|msg| ModelError::load(dir.file("config.json"), msg))
    }

    #[cfg(test)]
    fn parse(text: &str) -> Result<Self, String> {
        Self::from_raw(
            serde_json::from_str(text).map_err(|e| format!("invalid encoder config: {e}"))?,
        )
    }

    fn from_raw(raw: RawConfig) -> Result<Self, String> {
        let activation = Activation::parse(&raw.hidden_act)
            .ok_or_else(|| format!("unsupported hidden_act `{}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu)", raw.hidden_act))?;
        if let Some(kind) = raw
            .position_embedding_type
            .as_deref()
            .filter(|k| *k != "absolute")
        {
            return Err(format!(
                "unsupported position_embedding_type `{kind}` (only `absolute`)"
            ));
        }
        if raw.hidden_size.checked_rem(raw.num_attention_heads) != Some(0) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            ));
        }
        if raw.type_vocab_size == 0 {
            return Err("type_vocab_size must be at least 1".into());
        }
        if raw.layer_norm_eps.is_nan() || raw.layer_norm_eps <= 0.0 {
            return Err(format!(
                "layer_norm_eps must be positive, got {}",
                raw.layer_norm_eps
            ));
        }
        let task_type_vocab_size = raw.task_type_vocab_size.unwrap_or(3);
        if raw.use_task_id && task_type_vocab_size == 0 {
            return Err("use_task_id needs task_type_vocab_size >= 1".into());
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            activation,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            pad_token_id: raw.pad_token_id.unwrap_or(0),
            use_task_id: raw.use_task_id,
            task_type_vocab_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid config with `extra`'s keys set (overriding the base ones).
    fn parse(extra: serde_json::Value) -> Result<EncoderConfig, String> {
        let mut cfg = serde_json::json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32});
        if let (Some(base), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        EncoderConfig::parse(&cfg.to_string())
    }

    #[test]
    fn reads_activation_and_defaults() {
        let cfg = parse(serde_json::json!({})).unwrap();
        assert_eq!(cfg.activation, Activation::GeluErf);
        assert_eq!(cfg.layer_norm_eps, 1e-12);
        assert_eq!(cfg.type_vocab_size, 2);
        assert_eq!(
            parse(serde_json::json!({"hidden_act": "gelu_new"}))
                .unwrap()
                .activation,
            Activation::GeluTanh
        );
        assert_eq!(
            parse(serde_json::json!({"layer_norm_eps": 1e-5}))
                .unwrap()
                .layer_norm_eps,
            1e-5
        );
    }

    #[test]
    fn rejects_what_the_encoder_cannot_run() {
        let err = parse(serde_json::json!({"hidden_act": "quick_gelu"})).unwrap_err();
        assert!(err.contains("unsupported hidden_act `quick_gelu`"), "{err}");
        let err =
            parse(serde_json::json!({"position_embedding_type": "relative_key"})).unwrap_err();
        assert!(err.contains("relative_key"), "{err}");
        let err = parse(serde_json::json!({"num_attention_heads": 3})).unwrap_err();
        assert!(err.contains("not a multiple"), "{err}");
        let err = EncoderConfig::parse(r#"{"hidden_size": 8}"#).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
    }
}
