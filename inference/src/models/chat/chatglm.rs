//! THUDM's original GLM-4 layout (`ChatGLMModel`, e.g. THUDM/glm-4-9b-chat): the same network as
//! transformers' `GlmForCausalLM`, stored under other names (`transformer.encoder.layers.*`), with
//! q/k/v fused into one `query_key_value` projection, THUDM's own `config.json` keys, and the
//! tokenizer shipped as tiktoken ranks (`tokenizer.model`) instead of a `tokenizer.json`.
//!
//! Rather than a second decoder, the checkpoint is read through a [`Weights`] adapter that serves
//! the transformers names the shared [`Decoder`] asks for.
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::decoder::{Decoder, DecoderConfig};
use super::dummy::{chat_assets_or, DummyWeights};
use super::layers::Linear;
use super::snapshot::load_chat_assets_with;
use super::tiktoken::{self, TokenizerSpec, GLM4_PATTERN};
use super::weights::{SafetensorsWeights, Weights};
use super::{ChatLoadOptions, LoadFormat};
use crate::models::dir::ModelDir;
use crate::models::{Family, LoadedChat, ModelError};

/// The special tokens of THUDM's `tokenization_chatglm.py`, numbered after the ranks, for folders
/// whose `tokenizer_config.json` lacks `added_tokens_decoder`.
const GLM4_SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
];

/// What THUDM's tokenizer puts before every sequence when special tokens are added.
const GLM4_PREFIX: [&str; 2] = ["[gMASK]", "<sop>"];

/// Load a THUDM-layout GLM-4 folder: `config.json` (`ChatGLMConfig`), safetensors weights, and
/// `tokenizer.json` when present, else the tiktoken `tokenizer.model`.
pub fn load(dir: &Path, options: &ChatLoadOptions) -> Result<LoadedChat, ModelError> {
    let model_dir = ModelDir::new(dir);
    let raw: Value = model_dir.config()?;
    let cfg = config(&raw, &model_dir.file("config.json"))?;
    let dtype = options.dtype();
    let device = options.devices.first().cloned().unwrap_or(Device::Cpu);
    let st = match options.load_format {
        LoadFormat::Auto => SafetensorsWeights::open(dir, dtype, &device)?,
        LoadFormat::Dummy => {
            SafetensorsWeights::dummy(DummyWeights::for_chatglm(&raw), dtype, &device)
        }
    };
    let weights = ChatGlmWeights {
        st,
        cfg: cfg.clone(),
    };
    let placement = super::plan(dir, &cfg.model_bytes(dtype), options)?;
    let model = Decoder::load(&cfg, &weights, dtype, placement, options.kv_cache_memory)?;
    let assets = chat_assets_or(dir, options.load_format, cfg.vocab_size, || {
        load_chat_assets_with(dir, tokenizer(dir)?)
    })?;
    tracing::info!(path = %dir.display(), layers = cfg.num_layers, "loaded THUDM GLM-4 checkpoint");
    Ok(assets.with_model(Arc::new(model)))
}

/// `ChatGLMConfig` -> decoder shapes, read as the transformers `GlmConfig` of the same network
/// (what transformers' conversion writes) so the dense families share one reader and its defaults.
pub fn config(cfg: &Value, path: &Path) -> Result<DecoderConfig, ModelError> {
    let hf = glm_config(cfg).map_err(|m| ModelError::load(path, m))?;
    Ok(DecoderConfig {
        family: "chatglm",
        ..DecoderConfig::from_hf(&hf, Family::Glm, path)?
    })
}

/// THUDM's keys renamed to `GlmConfig`'s, with THUDM's defaults. Variants the GLM-4 release never
/// uses (LayerNorm instead of RMSNorm, residual after the norm, biased dense layers) are rejected
/// rather than misread.
fn glm_config(cfg: &Value) -> Result<Value, String> {
    let num = |key: &str| {
        cfg.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    let req = |key: &str| num(key).ok_or_else(|| format!("config.json: missing or invalid {key}"));
    let flag = |key: &str, default: bool| cfg.get(key).and_then(Value::as_bool).unwrap_or(default);
    if !flag("rmsnorm", true) {
        return Err(
            "config.json: rmsnorm false (LayerNorm) is not supported; GLM-4 uses RMSNorm".into(),
        );
    }
    if flag("apply_residual_connection_post_layernorm", false) {
        return Err(
            "config.json: apply_residual_connection_post_layernorm is not supported".into(),
        );
    }
    if flag("add_bias_linear", false) {
        return Err(
            "config.json: add_bias_linear is not supported (GLM-4 has biases on q/k/v only)".into(),
        );
    }
    if !flag("post_layer_norm", true) {
        return Err("config.json: post_layer_norm false is not supported".into());
    }
    let hidden_size = req("hidden_size")?;
    let num_heads = req("num_attention_heads")?;
    let num_kv_heads = if flag("multi_query_attention", false) {
        req("multi_query_group_num")?
    } else {
        num_heads
    };
    // modeling_chatglm.py: RotaryEmbedding(kv_channels // 2) over the first half of each head
    // (partial_rotary_factor 0.5), base 10000 * rope_ratio, on interleaved pairs (as GlmConfig).
    let rope_ratio = cfg.get("rope_ratio").and_then(Value::as_f64).unwrap_or(1.0);
    let eps = cfg.get("layernorm_epsilon").and_then(Value::as_f64);
    let mut hf = json!({
        "vocab_size": req("padded_vocab_size")?,
        "hidden_size": hidden_size,
        "intermediate_size": req("ffn_hidden_size")?,
        "num_hidden_layers": req("num_layers")?,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": eps.unwrap_or(1e-5),
        "rope_theta": 10_000.0 * rope_ratio,
        "partial_rotary_factor": 0.5,
        "tie_word_embeddings": false,
        "max_position_embeddings": num("seq_length").unwrap_or(8192),
    });
    if let Some(head_dim) = num("kv_channels") {
        hf["head_dim"] = head_dim.into();
    }
    Ok(hf)
}

/// Serves transformers tensor names from a THUDM checkpoint.
struct ChatGlmWeights {
    st: SafetensorsWeights,
    cfg: DecoderConfig,
}

/// Where a transformers tensor lives in the THUDM checkpoint.
#[derive(Debug, PartialEq)]
enum Source {
    Plain(String),
    /// Rows `start .. start + len` of the fused `query_key_value` projection.
    QkvRows {
        fused: String,
        part: Qkv,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Qkv {
    Q,
    K,
    V,
}

fn source(hf: &str) -> Option<Source> {
    let plain = |s: String| Some(Source::Plain(s));
    match hf {
        "model.embed_tokens" => return plain("transformer.embedding.word_embeddings".into()),
        "model.norm" => return plain("transformer.encoder.final_layernorm".into()),
        "lm_head" => return plain("transformer.output_layer".into()),
        _ => {}
    }
    let (layer, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let p = format!("transformer.encoder.layers.{layer}");
    let qkv = |part| {
        Some(Source::QkvRows {
            fused: format!("{p}.self_attention.query_key_value"),
            part,
        })
    };
    match part {
        "self_attn.q_proj" => qkv(Qkv::Q),
        "self_attn.k_proj" => qkv(Qkv::K),
        "self_attn.v_proj" => qkv(Qkv::V),
        "self_attn.o_proj" => plain(format!("{p}.self_attention.dense")),
        "mlp.gate_up_proj" => plain(format!("{p}.mlp.dense_h_to_4h")),
        "mlp.down_proj" => plain(format!("{p}.mlp.dense_4h_to_h")),
        "input_layernorm" | "post_attention_layernorm" => plain(format!("{p}.{part}")),
        _ => None,
    }
}

impl ChatGlmWeights {
    fn source(&self, hf: &str) -> Result<Source, ModelError> {
        source(hf).ok_or_else(|| {
            ModelError::Unsupported(format!("no THUDM GLM-4 tensor corresponds to {hf}"))
        })
    }

    /// Row range of q, k or v inside the fused projection (q rows first, then k, then v).
    fn qkv_rows(&self, part: Qkv) -> (usize, usize) {
        let q = self.cfg.num_heads * self.cfg.head_dim;
        let kv = self.cfg.num_kv_heads * self.cfg.head_dim;
        match part {
            Qkv::Q => (0, q),
            Qkv::K => (q, kv),
            Qkv::V => (q + kv, kv),
        }
    }

    fn fused_rows(
        &self,
        fused: &str,
        suffix: &str,
        part: Qkv,
        cols: Option<usize>,
    ) -> Result<Tensor, ModelError> {
        let q = self.cfg.num_heads * self.cfg.head_dim;
        let kv = self.cfg.num_kv_heads * self.cfg.head_dim;
        let total = q + 2 * kv;
        let shape: Vec<usize> = std::iter::once(total).chain(cols).collect();
        let all = self.st.get(&format!("{fused}.{suffix}"), &shape)?;
        let (start, len) = self.qkv_rows(part);
        Ok(all.narrow(0, start, len)?.contiguous()?)
    }
}

impl Weights for ChatGlmWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        match self.source(name)? {
            Source::Plain(n) => self.st.tensor(&n, shape),
            Source::QkvRows { .. } => Err(ModelError::Unsupported(format!(
                "{name} is a projection, not a plain tensor"
            ))),
        }
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError> {
        match self.source(name)? {
            Source::Plain(n) => self.st.linear(&n, out_dim, in_dim),
            Source::QkvRows { fused, part } => {
                let weight = self.fused_rows(&fused, "weight", part, Some(in_dim))?;
                if weight.dim(0)? != out_dim {
                    return Err(ModelError::Unsupported(format!(
                        "{name}: {} rows, expected {out_dim}",
                        weight.dim(0)?
                    )));
                }
                let bias = self
                    .st
                    .has(&format!("{fused}.bias"))
                    .then(|| self.fused_rows(&fused, "bias", part, None))
                    .transpose()?;
                Ok(Linear::dense(weight, bias))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        match source(name) {
            Some(Source::Plain(n)) => self.st.contains(&n),
            Some(Source::QkvRows { fused, .. }) => self.st.contains(&fused),
            None => false,
        }
    }

    fn on_device(&self, device: &Device) -> Result<Box<dyn Weights + '_>, ModelError> {
        Ok(Box::new(ChatGlmWeights {
            st: self.st.on(device)?,
            cfg: self.cfg.clone(),
        }))
    }
}

/// `tokenizer.json` when the folder has one (exact), else the tiktoken ranks converted to BPE.
fn tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    if dir.join("tokenizer.json").is_file() {
        return crate::tokenizer::load_tokenizer(dir);
    }
    let path = dir.join("tokenizer.model");
    // ChatGLM3 and earlier ship a SentencePiece model under the same name: say so plainly.
    let not_tiktoken = |e: &dyn std::fmt::Display| {
        let msg = format!(
            "no tokenizer.json, and tokenizer.model is not GLM-4's tiktoken ranks file ({e}); \
             SentencePiece tokenizers (ChatGLM3 and earlier) need a tokenizer.json"
        );
        ModelError::load(&path, msg)
    };
    let text = std::fs::read_to_string(&path).map_err(|e| not_tiktoken(&e))?;
    let ranks = tiktoken::parse_ranks(&text).map_err(|e| not_tiktoken(&e))?;
    let specials = special_tokens(dir, ranks.len())?;
    let spec = TokenizerSpec {
        pattern: GLM4_PATTERN,
        special_tokens: &specials,
        prefix: &GLM4_PREFIX,
    };
    tiktoken::build_tokenizer(&ranks, &spec).map_err(|e| ModelError::load(&path, e))
}

/// Special tokens from `tokenizer_config.json`'s `added_tokens_decoder` (id -> content), or THUDM's
/// fixed list numbered from `first_id`.
fn special_tokens(dir: &Path, first_id: usize) -> Result<Vec<(String, u32)>, ModelError> {
    let model_dir = ModelDir::new(dir);
    let path = model_dir.file("tokenizer_config.json");
    if let Some(decoder) = model_dir.tokenizer_config()?.added_tokens_decoder {
        return decoder
            .into_iter()
            .map(|(id, tok)| {
                let id = id
                    .parse::<u32>()
                    .map_err(|_| ModelError::load(&path, format!("added token id {id:?}")))?;
                let content = tok.content.ok_or_else(|| {
                    ModelError::load(&path, format!("added token {id} has no content"))
                })?;
                Ok((content, id))
            })
            .collect();
    }
    GLM4_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = u32::try_from(first_id + i)
                .map_err(|_| ModelError::load(&path, "too many tokens"))?;
            Ok(((*t).to_owned(), id))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::layers::RopeScaling;
    use super::*;

    #[test]
    fn maps_transformers_names_to_thudm_names() {
        assert_eq!(
            source("model.layers.3.self_attn.k_proj"),
            Some(Source::QkvRows {
                fused: "transformer.encoder.layers.3.self_attention.query_key_value".into(),
                part: Qkv::K
            })
        );
        assert_eq!(
            source("model.layers.0.mlp.gate_up_proj"),
            Some(Source::Plain(
                "transformer.encoder.layers.0.mlp.dense_h_to_4h".into()
            ))
        );
        assert_eq!(
            source("lm_head"),
            Some(Source::Plain("transformer.output_layer".into()))
        );
        assert_eq!(source("model.layers.0.post_mlp_layernorm"), None);
    }

    #[test]
    fn reads_thudm_config_keys() {
        let cfg = serde_json::json!({
            "num_layers": 40, "padded_vocab_size": 151552, "hidden_size": 4096, "ffn_hidden_size": 13696,
            "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": true,
            "multi_query_group_num": 2, "layernorm_epsilon": 1.5625e-07, "seq_length": 131072,
            "rope_ratio": 500, "rmsnorm": true, "add_qkv_bias": true, "add_bias_linear": false,
            "post_layer_norm": true, "apply_residual_connection_post_layernorm": false
        });
        let c = config(&cfg, Path::new("config.json")).unwrap();
        assert_eq!(
            (
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.rotary_dim
            ),
            (40, 32, 2, 128, 64)
        );
        assert_eq!(
            (c.vocab_size, c.intermediate_size, c.max_context),
            (151552, 13696, 131072)
        );
        assert_eq!(c.rope_theta, 5_000_000.0);
        assert_eq!(
            (c.family, c.rms_norm_eps, c.rope_scaling, c.rope_interleaved),
            ("chatglm", 1.5625e-07, RopeScaling::None, true)
        );
        assert_eq!(
            (c.fused_gate_up, c.sandwich_norms, c.tie_word_embeddings),
            (true, false, false)
        );
        let bad = serde_json::json!({"rmsnorm": false});
        let err = config(&bad, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("RMSNorm"), "{err}");
    }
}
