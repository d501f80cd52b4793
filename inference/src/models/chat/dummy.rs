//! `--load-format dummy`: random weights shaped by `config.json` alone, so that real model sizes
//! (GLM-4-9B, DeepSeek-V3, the R1 distills) can be benchmarked where no weights can be downloaded.
//!
//! Every tensor the loaders ask for is drawn on its device from N(0, 0.02) (transformers'
//! `initializer_range`), norm weights are ones and DeepSeek's router correction bias zeros, so
//! activations keep sensible magnitudes through any depth. Biases exist where the architecture
//! has them. The tokenizer, chat template and stop ids come from the folder when it has a
//! tokenizer; a folder with `config.json` alone gets a byte-level tokenizer (256 byte tokens plus
//! `<|endoftext|>`) and a plain role-tagged template.
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use serde_json::{json, Value};

use super::snapshot::{load_chat_assets, ChatAssets};
use super::LoadFormat;
use crate::models::{Family, ModelError};

/// Which optional tensors exist (biases), by architecture and config.
#[derive(Debug, Clone, Default)]
pub struct DummyWeights {
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
}

impl DummyWeights {
    /// Dense decoders (glm, glm4, qwen2, llama), as their transformers modules build them.
    pub fn for_dense(family: Family, cfg: &Value) -> Self {
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool);
        match family {
            Family::Glm | Family::Glm4 => DummyWeights {
                qkv_bias: flag("attention_bias").unwrap_or(true),
                ..Default::default()
            },
            Family::Qwen2 => DummyWeights {
                qkv_bias: true,
                ..Default::default()
            },
            _ => DummyWeights {
                qkv_bias: flag("attention_bias").unwrap_or(false),
                o_bias: flag("attention_bias").unwrap_or(false),
                mlp_bias: flag("mlp_bias").unwrap_or(false),
            },
        }
    }

    /// THUDM's layout: a bias on `query_key_value` when `add_qkv_bias`.
    pub fn for_chatglm(cfg: &Value) -> Self {
        DummyWeights {
            qkv_bias: cfg
                .get("add_qkv_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ..Default::default()
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let Some(owner) = name.strip_suffix(".bias") else {
            return true;
        };
        let part = owner.rsplit('.').next().unwrap_or_default();
        match part {
            "q_proj" | "k_proj" | "v_proj" | "query_key_value" => self.qkv_bias,
            "o_proj" => self.o_bias,
            "gate_proj" | "up_proj" | "down_proj" => self.mlp_bias,
            _ => false,
        }
    }

    /// The tensor `name` of `shape`, in `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let last = name
            .strip_suffix(".weight")
            .and_then(|n| n.rsplit('.').next())
            .unwrap_or_default();
        if last.contains("norm") {
            return Tensor::ones(shape, dtype, device);
        }
        if name.ends_with("e_score_correction_bias") || name.ends_with(".bias") {
            return Tensor::zeros(shape, dtype, device);
        }
        Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
    }
}

/// candle-nn's VarBuilder backend over [`DummyWeights`].
pub struct DummyBackend(pub Arc<DummyWeights>);

impl candle_nn::var_builder::SimpleBackend for DummyBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.0.tensor(name, s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("dummy weights need a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Tokenizer, template and stop ids: the folder's (through `real`) unless dummy weights are asked
/// for in a folder without tokenizer files.
pub fn chat_assets_or(
    dir: &Path,
    format: LoadFormat,
    vocab_size: usize,
    real: impl FnOnce() -> std::result::Result<ChatAssets, ModelError>,
) -> std::result::Result<ChatAssets, ModelError> {
    let has_tokenizer = ["tokenizer.json", "tokenizer.model"]
        .iter()
        .any(|f| dir.join(f).is_file());
    if format == LoadFormat::Auto || has_tokenizer {
        return real();
    }
    byte_level_assets(vocab_size).map_err(|m| ModelError::load(dir, m))
}

/// [`chat_assets_or`] for transformers snapshots.
pub fn chat_assets(
    dir: &Path,
    format: LoadFormat,
    vocab_size: usize,
) -> std::result::Result<ChatAssets, ModelError> {
    chat_assets_or(dir, format, vocab_size, || load_chat_assets(dir))
}

const EOS: &str = "<|endoftext|>";
const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// GPT-2's byte-to-character table, as byte-level BPE vocabularies spell bytes.
fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bytes.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    table
}

fn byte_level_assets(vocab_size: usize) -> std::result::Result<ChatAssets, String> {
    if vocab_size < 257 {
        return Err(format!(
            "dummy weights without tokenizer files need vocab_size >= 257 for a byte-level tokenizer, config.json says {vocab_size}"
        ));
    }
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
        "added_tokens": [{"id": 256, "content": EOS, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    let tokenizer: tokenizers::Tokenizer = doc
        .to_string()
        .parse()
        .map_err(|e| format!("cannot build the byte-level tokenizer: {e}"))?;
    Ok(ChatAssets {
        tokenizer,
        chat_template: Some(TEMPLATE.into()),
        bos_token: None,
        eos_token: Some(EOS.into()),
        eos_token_ids: vec![256],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_follow_the_architecture() {
        let glm = DummyWeights::for_dense(Family::Glm, &json!({"attention_bias": true}));
        assert!(glm.contains("model.layers.0.self_attn.k_proj.bias"));
        assert!(!glm.contains("model.layers.0.self_attn.o_proj.bias"));
        assert!(glm.contains("model.layers.0.self_attn.o_proj.weight"));
        let llama = DummyWeights::for_dense(Family::Llama, &json!({}));
        assert!(!llama.contains("model.layers.0.self_attn.q_proj.bias"));
        let chatglm = DummyWeights::for_chatglm(&json!({"add_qkv_bias": true}));
        assert!(
            chatglm.contains("transformer.encoder.layers.1.self_attention.query_key_value.bias")
        );
    }

    #[test]
    fn norms_are_ones_and_matrices_small_random() {
        let w = DummyWeights::default();
        let dev = Device::Cpu;
        let norm = w
            .tensor(
                "model.layers.0.post_attention_layernorm.weight",
                Shape::from(4),
                DType::F32,
                &dev,
            )
            .unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        let m = w
            .tensor(
                "model.layers.0.mlp.down_proj.weight",
                Shape::from((64, 64)),
                DType::BF16,
                &dev,
            )
            .unwrap();
        assert_eq!(m.dtype(), DType::BF16);
        let v = m
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((0.015..0.025).contains(&std), "std {std}");
    }

    #[test]
    fn byte_level_tokenizer_round_trips_any_text() {
        let a = byte_level_assets(300).unwrap();
        let text = "héllo, 世界 <|endoftext|>";
        let ids = a.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(*ids.last().unwrap(), 256);
        assert!(ids.iter().all(|&i| i <= 256));
        assert_eq!(a.tokenizer.decode(&ids, false).unwrap(), text);
        assert!(byte_level_assets(100).is_err());
    }
}
