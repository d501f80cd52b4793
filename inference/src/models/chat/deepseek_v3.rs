//! DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`): multi-head latent attention, yarn rope, and a
//! mixture of experts with `noaux_tc` routing after `first_k_dense_replace` dense layers.
//!
//! The multi-token-prediction layer that the released checkpoints store after the last decoder layer
//! (`model.layers.{num_hidden_layers}.*`) is never read: it is not part of next-token inference.
pub mod config;
pub mod mla;
pub mod moe;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

pub use config::DeepseekV3Config;
use mla::{Mla, Rope, SeqSpan};
use moe::{Mlp, Moe};
pub use moe::{MoeGate, RoutePolicy, TokenRoute};

use super::decoder::compute_dtype;
use super::snapshot::load_chat_assets;
use super::weights::safetensors_files;
use crate::models::{CausalLM, CausalLMInfo, LoadedChat, ModelError, SeqCache, SeqStep};

enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Mla,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

pub struct DeepseekV3 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    info: CausalLMInfo,
    device: Device,
}

/// The input of one MoE layer's router, captured for inspection (see [`DeepseekV3::gate_inputs`]).
pub struct GateInput {
    pub layer: usize,
    /// Post-attention-norm hidden states `[tokens, hidden]`, what `mlp.gate` sees.
    pub hidden: Tensor,
}

impl DeepseekV3 {
    pub fn new(cfg: &DeepseekV3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, m.pp("layers").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(DeepseekV3 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            info: CausalLMInfo {
                family: "deepseek_v3",
                vocab_size: cfg.vocab_size,
                max_context: cfg.max_position_embeddings,
            },
            device: vb.device().clone(),
        })
    }

    /// The router of decoder layer `layer`, `None` for a dense layer.
    pub fn gate(&self, layer: usize) -> Option<&MoeGate> {
        match &self.layers.get(layer)?.mlp {
            FeedForward::Moe(moe) => Some(&moe.gate),
            FeedForward::Dense(_) => None,
        }
    }

    /// Run `tokens` as a fresh sequence and return what each MoE router sees; with [`Self::gate`] and
    /// [`MoeGate::route`] this gives the routing decisions of the forward pass.
    pub fn gate_inputs(&self, tokens: &[u32]) -> Result<Vec<GateInput>, ModelError> {
        let mut cache = self.new_cache();
        let mut trace = Vec::new();
        self.run(
            &mut [SeqStep {
                tokens,
                cache: &mut cache,
            }],
            Some(&mut trace),
        )?;
        Ok(trace)
    }

    fn run(
        &self,
        steps: &mut [SeqStep<'_>],
        mut trace: Option<&mut Vec<GateInput>>,
    ) -> Result<Tensor, ModelError> {
        let mut spans = Vec::with_capacity(steps.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for step in steps.iter() {
            if step.tokens.is_empty() {
                return Err(ModelError::Unsupported(
                    "a sequence step has no new tokens".into(),
                ));
            }
            if step.cache.layers.len() != self.layers.len() {
                return Err(ModelError::Unsupported(format!(
                    "cache has {} layers, model has {}",
                    step.cache.layers.len(),
                    self.layers.len()
                )));
            }
            let past = step.cache.len;
            spans.push(SeqSpan {
                offset: ids.len(),
                len: step.tokens.len(),
                past,
            });
            ids.extend_from_slice(step.tokens);
            positions.extend((past..past + step.tokens.len()).map(|p| p as u32));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
            return Err(ModelError::Unsupported(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let total = ids.len();
        let mut caches: Vec<&mut SeqCache> = steps.iter_mut().map(|s| &mut *s.cache).collect();
        let mut x = self
            .embed_tokens
            .forward(&Tensor::from_vec(ids, total, &self.device)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer
                .self_attn
                .forward(&h, &self.rope, &positions, &spans, &mut caches, i)?;
            let x1 = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            if let (Some(trace), FeedForward::Moe(_)) = (trace.as_deref_mut(), &layer.mlp) {
                trace.push(GateInput {
                    layer: i,
                    hidden: h.clone(),
                });
            }
            let h = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.forward(&h)?,
                FeedForward::Moe(moe) => moe.forward(&h)?,
            };
            x = (x1 + h)?;
        }
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            cache.len = span.past + span.len;
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let n = last.len();
        let x = x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

impl DecoderLayer {
    fn new(cfg: &DeepseekV3Config, i: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let mlp = if cfg.is_moe_layer(i) {
            FeedForward::Moe(Moe::new(cfg, vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(Mlp::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("mlp"),
            )?)
        };
        Ok(DecoderLayer {
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Mla::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp,
        })
    }
}

impl CausalLM for DeepseekV3 {
    fn info(&self) -> &CausalLMInfo {
        &self.info
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.layers.len())
    }

    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        self.run(steps, None)
    }
}

/// Load a DeepSeek-V3 snapshot folder: `config.json`, safetensors weights (bf16/f32; the FP8
/// release must be converted to bf16 first), tokenizer and chat template.
pub fn load(path: &Path, device: &Device) -> Result<LoadedChat, ModelError> {
    let model = load_model(path, device)?;
    Ok(load_chat_assets(path)?.with_model(Arc::new(model)))
}

/// The model alone (no tokenizer), for callers that want the concrete type.
pub fn load_model(path: &Path, device: &Device) -> Result<DeepseekV3, ModelError> {
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::load(&cfg_path, e))?;
    let cfg: DeepseekV3Config = serde_json::from_str(&text)
        .map_err(|e| ModelError::load(&cfg_path, format!("invalid config: {e}")))?;
    cfg.validate()
        .map_err(|msg| ModelError::load(&cfg_path, msg))?;
    let files = safetensors_files(path)?;
    let dtype = compute_dtype(device);
    // SAFETY: the files are memory-mapped read-only; modifying them while serving is unsupported.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| ModelError::load(path, format!("cannot map weights: {e}")))?;
    tracing::info!(path = %path.display(), layers = cfg.num_hidden_layers, experts = ?cfg.n_routed_experts, "loading deepseek_v3");
    DeepseekV3::new(&cfg, vb)
        .map_err(|e| ModelError::load(path, format!("cannot load weights: {e}")))
}
