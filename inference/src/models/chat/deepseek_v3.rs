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
use mla::{Mla, Rope};
use moe::{Mlp, Moe};
pub use moe::{MoeGate, RoutePolicy, TokenRoute};

use super::decoder::{prepare_step, to_device};
use super::dummy::{chat_assets_or, DummyBackend, DummyWeights};
use super::kv::{BlockAllocator, KvPool};
use super::layers::StepLayout;
use super::placement::{self, ModelBytes, Placement};
use super::snapshot::load_chat_assets;
use super::{ChatLoadOptions, LoadFormat};
use crate::models::dir::ModelDir;
use crate::models::{CausalLM, CausalLMInfo, LoadedChat, ModelError, SeqStep};

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
    head_device: Device,
    rope: Rope,
    info: CausalLMInfo,
    dtype: DType,
    placement: Placement,
    kv: KvPool,
}

/// The input of one MoE layer's router, captured for inspection (see [`DeepseekV3::gate_inputs`]).
pub struct GateInput {
    pub layer: usize,
    /// Post-attention-norm hidden states `[tokens, hidden]`, what `mlp.gate` sees.
    pub hidden: Tensor,
}

impl DeepseekV3 {
    /// `vbs`: one VarBuilder per device of `placement`, in its order.
    pub fn new(
        cfg: &DeepseekV3Config,
        vbs: &[VarBuilder],
        placement: Placement,
        kv_budget: Option<u64>,
    ) -> candle_core::Result<Self> {
        let vb_of = |i: usize| &vbs[placement.layer_device.get(i).copied().unwrap_or(0)];
        let first = vb_of(0).pp("model");
        let last_vb = vb_of(cfg.num_hidden_layers.saturating_sub(1));
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, first.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb_of(i).pp("model").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = rms_norm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            last_vb.pp("model").pp("norm"),
        )?;
        let (lm_head, head_device) = if cfg.tie_word_embeddings {
            let head = Linear::new(embed_tokens.embeddings().clone(), None);
            (head, placement.first().clone())
        } else {
            let head = linear_no_bias(cfg.hidden_size, cfg.vocab_size, last_vb.pp("lm_head"))?;
            (head, placement.last().clone())
        };
        let dtype = first.dtype();
        let shapes: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| (l.self_attn.kv_shape(), placement.layer(i).clone()))
            .collect();
        let tokens =
            placement::kv_tokens(kv_budget, &shapes, dtype).map_err(candle_core::Error::Msg)?;
        let kv = KvPool::new(tokens, &shapes, dtype)?;
        Ok(DeepseekV3 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_device,
            rope: Rope::new(cfg),
            info: CausalLMInfo {
                family: "deepseek_v3",
                vocab_size: cfg.vocab_size,
                max_context: cfg.max_position_embeddings,
                weight_bytes: placement.weight_bytes,
            },
            dtype,
            placement,
            kv,
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
        let mut cache = self.new_cache()?;
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
        let kv = prepare_step(steps, &self.kv.blocks, self.info.vocab_size)?;
        let tables = self.rope.tables(kv.positions());
        let layout = StepLayout::with_tables(kv, tables, self.rope.half(), self.dtype);
        let ids: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let ids = Tensor::new(ids.as_slice(), self.placement.first())?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, (layer, kv)) in self.layers.iter().zip(&self.kv.layers).enumerate() {
            x = to_device(x, self.placement.layer(i))?;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(&h, &self.rope, &layout, kv)?;
            let x1 = (&x + h)?;
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
        for s in steps.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        let last = Tensor::new(layout.kv.last_rows().as_slice(), x.device())?;
        let x = self.norm.forward(&x.index_select(&last, 0)?)?;
        let logits = self.lm_head.forward(&to_device(x, &self.head_device)?)?;
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

    fn kv_blocks(&self) -> &Arc<BlockAllocator> {
        &self.kv.blocks
    }

    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        self.run(steps, None)
    }
}

/// Load a DeepSeek-V3 snapshot folder: `config.json`, safetensors weights (bf16/f32; the FP8
/// release must be converted to bf16 first), tokenizer and chat template.
pub fn load(path: &Path, options: &ChatLoadOptions) -> Result<LoadedChat, ModelError> {
    let (model, vocab) = load_model_with(path, options)?;
    let assets = chat_assets_or(path, options.load_format, vocab, || load_chat_assets(path))?;
    Ok(assets.with_model(Arc::new(model)))
}

/// The model alone (no tokenizer), for callers that want the concrete type.
pub fn load_model(path: &Path, device: &Device) -> Result<DeepseekV3, ModelError> {
    load_model_with(path, &ChatLoadOptions::on(device)).map(|(m, _)| m)
}

fn load_model_with(
    path: &Path,
    options: &ChatLoadOptions,
) -> Result<(DeepseekV3, usize), ModelError> {
    let dir = ModelDir::new(path);
    let cfg: DeepseekV3Config = dir.config()?;
    cfg.validate()
        .map_err(|msg| ModelError::load(dir.file("config.json"), msg))?;
    let dtype = options.dtype();
    let placement = super::plan(path, &model_bytes(&cfg, dtype), options)?;
    let vbs = match options.load_format {
        LoadFormat::Auto => {
            let files = dir.safetensors_files()?;
            placement
                .devices
                .iter()
                .map(|d| {
                    // SAFETY: the files are memory-mapped read-only; modifying them while serving
                    // is unsupported.
                    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, d) }
                        .map_err(|e| ModelError::load(path, format!("cannot map weights: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        LoadFormat::Dummy => {
            let w = Arc::new(DummyWeights::default());
            placement
                .devices
                .iter()
                .map(|d| {
                    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
                        Box::new(DummyBackend(w.clone()));
                    VarBuilder::from_backend(backend, dtype, d.clone())
                })
                .collect()
        }
    };
    tracing::info!(path = %path.display(), layers = cfg.num_hidden_layers, experts = ?cfg.n_routed_experts, "loading deepseek_v3");
    let model = DeepseekV3::new(&cfg, &vbs, placement, options.kv_cache_memory)
        .map_err(|e| ModelError::load(path, format!("cannot load weights: {e}")))?;
    Ok((model, cfg.vocab_size))
}

/// Weight bytes of each part in `dtype` (norms and biases left out).
fn model_bytes(cfg: &DeepseekV3Config, dtype: DType) -> ModelBytes {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let q = match cfg.q_lora_rank {
        Some(r) => h * r + r * heads * cfg.qk_head_dim(),
        None => h * heads * cfg.qk_head_dim(),
    };
    let attention = q
        + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + heads * cfg.v_head_dim * h;
    let mlp = |i: usize| 3 * h * i;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let ff = if cfg.is_moe_layer(i) {
                let experts = cfg.n_routed_experts.unwrap_or(0);
                let shared = cfg.n_shared_experts.unwrap_or(0);
                experts * (mlp(cfg.moe_intermediate_size) + h)
                    + mlp(cfg.moe_intermediate_size * shared)
            } else {
                mlp(cfg.intermediate_size)
            };
            ((attention + ff) * dtype.size_in_bytes()) as u64
        })
        .collect();
    let embed = (cfg.vocab_size * h * dtype.size_in_bytes()) as u64;
    ModelBytes {
        head: embed,
        layers,
        tail: if cfg.tie_word_embeddings { 0 } else { embed },
    }
}
