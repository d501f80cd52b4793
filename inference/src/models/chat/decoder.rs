//! One pre-norm decoder for the dense families: transformers `GlmForCausalLM` (glm-4-9b-chat-hf),
//! `Glm4ForCausalLM` (GLM-4-0414: extra norms after attention and MLP), `Qwen2ForCausalLM`,
//! `LlamaForCausalLM`, and the same architectures read from GGUF files.
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::attention::StepKv;
use super::kv::{BlockAllocator, KvLayer, KvPool};
use super::layers::{
    Attention, Embedding, Linear, Llama3Scaling, Mlp, Qkv, RmsNorm, RopeScaling, Rotary, StepLayout,
};
use super::placement::{self, ModelBytes, Placement};
use super::weights::Weights;
use crate::models::{CausalLM, CausalLMInfo, Family, ModelError, SeqStep};

/// Shapes and options of a dense decoder, whatever file they were read from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Channels of each head that rotate (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rope_scaling: RopeScaling,
    /// Rotate interleaved pairs (GLM; GGUF llama/glm4) instead of halves (transformers Llama/Qwen2).
    pub rope_interleaved: bool,
    /// `mlp.gate_up_proj` (gate rows first) instead of `gate_proj` + `up_proj`.
    pub fused_gate_up: bool,
    /// GLM-4-0414's `post_self_attn_layernorm` and `post_mlp_layernorm`.
    pub sandwich_norms: bool,
    pub tie_word_embeddings: bool,
    pub max_context: usize,
}

impl DecoderConfig {
    /// Read a transformers `config.json` of a dense family. Missing optional keys take
    /// transformers' defaults; missing shapes fail naming the key.
    pub fn from_hf(cfg: &Value, family: Family, path: &Path) -> Result<Self, ModelError> {
        let req = |key: &str| -> Result<usize, ModelError> {
            get_usize(cfg, key).ok_or_else(|| {
                ModelError::load(path, format!("config.json: missing or invalid {key}"))
            })
        };
        let (name, interleaved, fused, sandwich) = match family {
            Family::Glm => ("glm", true, true, false),
            Family::Glm4 => ("glm4", true, true, true),
            Family::Qwen2 => ("qwen2", false, false, false),
            Family::Llama => ("llama", false, false, false),
            other => {
                return Err(ModelError::load(
                    path,
                    format!("{other:?} is not a dense decoder family"),
                ))
            }
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = get_usize(cfg, "num_key_value_heads").unwrap_or(num_heads);
        let head_dim = get_usize(cfg, "head_dim").unwrap_or(hidden_size / num_heads.max(1));
        // transformers 5 may nest rope settings in `rope_parameters`; older configs keep them on top.
        let rope = cfg.get("rope_parameters").filter(|v| v.is_object());
        let rope_key = |key: &str| rope.and_then(|r| r.get(key)).or_else(|| cfg.get(key));
        let default_partial = if matches!(family, Family::Glm | Family::Glm4) {
            0.5
        } else {
            1.0
        };
        let partial = rope_key("partial_rotary_factor")
            .and_then(Value::as_f64)
            .unwrap_or(default_partial);
        let rotary_dim = (head_dim as f64 * partial) as usize;
        let scaling_value = cfg.get("rope_scaling").filter(|v| v.is_object()).or(rope);
        let config = DecoderConfig {
            family: name,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: cfg
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: rope_key("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rotary_dim,
            rope_scaling: rope_scaling(scaling_value)
                .map_err(|m| ModelError::load(path, format!("config.json: {m}")))?,
            rope_interleaved: interleaved,
            fused_gate_up: fused,
            sandwich_norms: sandwich,
            tie_word_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_context: get_usize(cfg, "max_position_embeddings").unwrap_or(4096),
        };
        config
            .validate()
            .map_err(|m| ModelError::load(path, format!("config.json: {m}")))?;
        Ok(config)
    }

    /// Weight bytes of the embeddings, each layer and the output head in `dtype` (biases and norms
    /// are negligible and left out).
    pub fn model_bytes(&self, dtype: DType) -> ModelBytes {
        let (h, d, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads);
        let layer = (attention + 3 * h * i) * dtype.size_in_bytes();
        let embed = (self.vocab_size * h * dtype.size_in_bytes()) as u64;
        ModelBytes {
            head: embed,
            layers: vec![layer as u64; self.num_layers],
            tail: if self.tie_word_embeddings { 0 } else { embed },
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err("attention heads and head_dim must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.rotary_dim.is_multiple_of(2)
            || self.rotary_dim == 0
            || self.rotary_dim > self.head_dim
        {
            return Err(format!(
                "rotary dimension {} does not fit head_dim {}",
                self.rotary_dim, self.head_dim
            ));
        }
        Ok(())
    }
}

fn get_usize(cfg: &Value, key: &str) -> Option<usize> {
    cfg.get(key)?.as_u64().and_then(|v| usize::try_from(v).ok())
}

fn rope_scaling(v: Option<&Value>) -> Result<RopeScaling, String> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope_scaling {kind}: missing {key}"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear(num("factor")?)),
        "llama3" => Ok(RopeScaling::Llama3(Llama3Scaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(format!(
            "unsupported rope_scaling type {other} (supported: default, linear, llama3)"
        )),
    }
}

struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_self_attn_norm: Option<RmsNorm>,
    pre_mlp_norm: RmsNorm,
    mlp: Mlp,
    post_mlp_norm: Option<RmsNorm>,
}

impl Block {
    fn forward(
        &self,
        xs: &Tensor,
        layout: &StepLayout,
        kv: &KvLayer,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .attn
            .forward(&self.input_norm.forward(xs)?, layout, kv)?;
        let h = match &self.post_self_attn_norm {
            Some(n) => n.forward(&h)?,
            None => h,
        };
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.pre_mlp_norm.forward(&xs)?)?;
        let h = match &self.post_mlp_norm {
            Some(n) => n.forward(&h)?,
            None => h,
        };
        xs + h
    }
}

pub struct Decoder {
    info: CausalLMInfo,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Where `lm_head` lives: with the embeddings when tied, else with the last layer.
    head_device: Device,
    rotary: Arc<Rotary>,
    dtype: DType,
    placement: Placement,
    kv: KvPool,
}

impl Decoder {
    /// Build the decoder from weights named as in transformers checkpoints, layers on the devices
    /// `placement` gives, with a KV pool of `kv_budget` bytes (`None`: the default).
    pub fn load(
        cfg: &DecoderConfig,
        w: &dyn Weights,
        dtype: DType,
        placement: Placement,
        kv_budget: Option<u64>,
    ) -> Result<Self, ModelError> {
        let rotary = Arc::new(Rotary::new(
            cfg.rotary_dim,
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.rope_interleaved,
        ));
        let views = placement
            .devices
            .iter()
            .map(|d| w.on_device(d))
            .collect::<Result<Vec<_>, _>>()?;
        let first = views[placement.layer_device.first().copied().unwrap_or(0)].as_ref();
        let last = views[placement.layer_device.last().copied().unwrap_or(0)].as_ref();
        let embed = first.embedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let w = views[placement.layer_device[i]].as_ref();
                load_block(cfg, w, &format!("model.layers.{i}"), &rotary)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let norm = norm(cfg, last, "model.norm")?;
        let tied = cfg.tie_word_embeddings || !last.contains("lm_head");
        let (lm_head, head_device) = if tied {
            (embed.as_linear()?, placement.first().clone())
        } else {
            let head = last.linear("lm_head", cfg.vocab_size, cfg.hidden_size)?;
            (head, placement.last().clone())
        };
        let shapes: Vec<_> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (b.attn.kv_shape(), placement.layer(i).clone()))
            .collect();
        let tokens =
            placement::kv_tokens(kv_budget, &shapes, dtype).map_err(ModelError::Unsupported)?;
        let kv = KvPool::new(tokens, &shapes, dtype)?;
        let info = CausalLMInfo {
            family: cfg.family,
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_context,
            weight_bytes: placement.weight_bytes,
        };
        tracing::info!(
            family = cfg.family,
            kv_positions = tokens,
            devices = placement.devices.len(),
            "decoder ready"
        );
        Ok(Decoder {
            info,
            embed,
            blocks,
            norm,
            lm_head,
            head_device,
            rotary,
            dtype,
            placement,
            kv,
        })
    }

    fn step(&self, steps: &mut [SeqStep<'_>]) -> candle_core::Result<Tensor> {
        let layout = StepLayout::new(
            prepare_step(steps, &self.kv.blocks, self.info.vocab_size)?,
            &self.rotary,
            self.dtype,
        );
        let ids: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let ids = Tensor::new(ids.as_slice(), self.placement.first())?;
        let mut xs = self.embed.forward(&ids, self.dtype)?;
        for (i, (block, kv)) in self.blocks.iter().zip(&self.kv.layers).enumerate() {
            xs = to_device(xs, self.placement.layer(i))?;
            xs = block.forward(&xs, &layout, kv)?;
        }
        for s in steps.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Only the last new position of each sequence needs logits.
        let last = Tensor::new(layout.kv.last_rows().as_slice(), xs.device())?;
        let xs = self.norm.forward(&xs.index_select(&last, 0)?)?;
        let xs = to_device(xs, &self.head_device)?;
        self.lm_head.forward(&xs)?.to_dtype(DType::F32)
    }
}

/// Check a step's inputs and grow each cache to hold its new tokens; the pool layout of the step.
pub(crate) fn prepare_step(
    steps: &mut [SeqStep<'_>],
    alloc: &Arc<BlockAllocator>,
    vocab_size: usize,
) -> candle_core::Result<StepKv> {
    for s in steps.iter_mut() {
        if s.tokens.is_empty() {
            candle_core::bail!("a sequence in the batch has no new tokens");
        }
        // Checked here: a quantized embedding lookup would index out of bounds.
        if let Some(bad) = s.tokens.iter().find(|&&id| id as usize >= vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({vocab_size})");
        }
        if !s.cache.belongs_to(alloc) {
            candle_core::bail!("a cache of another model was passed to this one");
        }
        let needed = s.cache.len + s.tokens.len();
        s.cache.grow(needed)?;
    }
    let shapes: Vec<_> = steps.iter().map(|s| (&*s.cache, s.tokens.len())).collect();
    Ok(StepKv::new(&shapes, alloc.block_size()))
}

/// Activations cross to the next GPU between layers placed on different devices.
pub(crate) fn to_device(xs: Tensor, device: &Device) -> candle_core::Result<Tensor> {
    if xs.device().same_device(device) {
        Ok(xs)
    } else {
        xs.to_device(device)
    }
}

fn norm(cfg: &DecoderConfig, w: &dyn Weights, name: &str) -> Result<RmsNorm, ModelError> {
    Ok(RmsNorm::new(
        w.tensor(name, &[cfg.hidden_size])?,
        cfg.rms_norm_eps,
    ))
}

fn load_block(
    cfg: &DecoderConfig,
    w: &dyn Weights,
    p: &str,
    rotary: &Arc<Rotary>,
) -> Result<Block, ModelError> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let attn = Attention {
        qkv: Qkv::new(
            w.linear(&format!("{p}.self_attn.q_proj"), cfg.num_heads * d, h)?,
            w.linear(&format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * d, h)?,
            w.linear(&format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * d, h)?,
        )?,
        o_proj: w.linear(&format!("{p}.self_attn.o_proj"), h, cfg.num_heads * d)?,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: d,
        rotary: rotary.clone(),
    };
    let i = cfg.intermediate_size;
    let mlp = if cfg.fused_gate_up {
        Mlp::Fused {
            gate_up: w.linear(&format!("{p}.mlp.gate_up_proj"), 2 * i, h)?,
            down: w.linear(&format!("{p}.mlp.down_proj"), h, i)?,
            intermediate: i,
        }
    } else {
        Mlp::new(
            w.linear(&format!("{p}.mlp.gate_proj"), i, h)?,
            w.linear(&format!("{p}.mlp.up_proj"), i, h)?,
            w.linear(&format!("{p}.mlp.down_proj"), h, i)?,
            i,
        )?
    };
    let sandwich = |name: &str| -> Result<Option<RmsNorm>, ModelError> {
        if cfg.sandwich_norms {
            Ok(Some(norm(cfg, w, &format!("{p}.{name}"))?))
        } else {
            Ok(None)
        }
    };
    Ok(Block {
        input_norm: norm(cfg, w, &format!("{p}.input_layernorm"))?,
        attn,
        post_self_attn_norm: sandwich("post_self_attn_layernorm")?,
        pre_mlp_norm: norm(cfg, w, &format!("{p}.post_attention_layernorm"))?,
        mlp,
        post_mlp_norm: sandwich("post_mlp_layernorm")?,
    })
}

impl CausalLM for Decoder {
    fn info(&self) -> &CausalLMInfo {
        &self.info
    }

    fn kv_blocks(&self) -> &Arc<BlockAllocator> {
        &self.kv.blocks
    }

    /// On error the caches of this step may hold keys/values of some layers only: the caller must
    /// drop those sequences.
    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        if steps.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.info.vocab_size),
                DType::F32,
                &self.head_device,
            )?);
        }
        Ok(self.step(steps)?)
    }
}

/// The compute dtype for dense weights on a device: float32 on CPU (reference precision),
/// bfloat16 on GPUs.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}
