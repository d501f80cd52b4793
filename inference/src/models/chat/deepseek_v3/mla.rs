//! Multi-head latent attention (MLA) with yarn-scaled rotary embeddings on the `qk_rope_head_dim`
//! part of each head.
//!
//! Cache layout: the paged pool (`kv.rs`) holds, per position, the decompressed keys `[heads,
//! qk_nope_head_dim + qk_rope_head_dim]` and values `[heads, v_head_dim]`, so attention is the
//! shared paged attention with as many key/value heads as query heads. That is right for small and
//! distilled models. For the 671B checkpoints the memory-efficient path is to cache the compressed
//! latent (`kv_lora_rank + qk_rope_head_dim` per token, shared by all heads: ~70x smaller) and
//! absorb `kv_b_proj` into the query and output projections; that change stays inside this file.
use candle_core::{Module, Tensor, D};
use candle_nn::{linear_b, rms_norm, Linear, RmsNorm, VarBuilder};

use super::config::DeepseekV3Config;
use crate::models::chat::attention::paged_attention;
use crate::models::chat::kv::{KvLayer, KvShape};
use crate::models::chat::layers::StepLayout;

/// Inverse frequencies and attention factor of the rotary embedding.
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Yarn's magnitude correction, folded into cos and sin.
    attention_factor: f32,
    interleaved: bool,
}

/// `0.1 * mscale * ln(scale) + 1` for scale > 1, as in DeepSeek's yarn implementation.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    pub fn new(cfg: &DeepseekV3Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_base();
        // Computed in f32 as transformers does, so positions round the same way.
        let pos_freqs: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (base as f32).powf(i as f32 / dim as f32))
            .collect();
        let Some(yarn) = cfg.yarn() else {
            return Rope {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
                interleaved: cfg.rope_interleave,
            };
        };
        let factor = yarn.factor.unwrap_or(1.0);
        let original_max = yarn
            .original_max_position_embeddings
            .unwrap_or(cfg.max_position_embeddings) as f64;
        let beta_fast = yarn.beta_fast.unwrap_or(32.0);
        let beta_slow = yarn.beta_slow.unwrap_or(1.0);
        let attention_factor = match (yarn.attention_factor, yarn.mscale, yarn.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                yarn_get_mscale(factor, m) / yarn_get_mscale(factor, m_all)
            }
            _ => yarn_get_mscale(factor, 1.0),
        };
        let correction_dim = |rotations: f64| {
            dim as f64 * (original_max / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(beta_fast).floor().max(0.0);
        let high = correction_dim(beta_slow).ceil().min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let (inv_extra, inv_inter) = (1.0 / p, 1.0 / (factor as f32 * p));
                inv_inter * (1.0 - extrapolation) + inv_extra * extrapolation
            })
            .collect();
        Rope {
            inv_freq,
            attention_factor: attention_factor as f32,
            interleaved: cfg.rope_interleave,
        }
    }

    /// cos and sin tables `[positions * dim / 2]` (attention factor folded in).
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
        (cos, sin)
    }

    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Rotate `x: [tokens, heads, dim]`, token `t` with row `t` of `cos`/`sin` `[tokens, dim / 2]`.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let x = x.contiguous()?.reshape((t, h, 1, d))?;
        let (cos, sin) = (cos.reshape((t, 1, d / 2))?, sin.reshape((t, 1, d / 2))?);
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?.reshape((t, h, d))
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?.reshape((t, h, d))
        }
    }
}

enum QueryProj {
    /// `q_a_proj -> q_a_layernorm -> q_b_proj` (q_lora_rank set).
    LowRank {
        a: Linear,
        norm: RmsNorm,
        b: Linear,
    },
    Full(Linear),
}

pub struct Mla {
    q: QueryProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Linear,
    o_proj: Linear,
    heads: usize,
    nope_dim: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora_rank: usize,
    softmax_scale: f64,
}

impl Mla {
    pub fn new(cfg: &DeepseekV3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let heads = cfg.num_attention_heads;
        let qk_dim = cfg.qk_head_dim();
        let bias = cfg.attention_bias;
        let q = match cfg.q_lora_rank {
            Some(rank) => QueryProj::LowRank {
                a: linear_b(cfg.hidden_size, rank, bias, vb.pp("q_a_proj"))?,
                norm: rms_norm(rank, cfg.rms_norm_eps, vb.pp("q_a_layernorm"))?,
                b: linear_b(rank, heads * qk_dim, false, vb.pp("q_b_proj"))?,
            },
            None => QueryProj::Full(linear_b(
                cfg.hidden_size,
                heads * qk_dim,
                false,
                vb.pp("q_proj"),
            )?),
        };
        let kv_a_proj_with_mqa = linear_b(
            cfg.hidden_size,
            cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            bias,
            vb.pp("kv_a_proj_with_mqa"),
        )?;
        let kv_a_layernorm = rms_norm(cfg.kv_lora_rank, cfg.rms_norm_eps, vb.pp("kv_a_layernorm"))?;
        let kv_b_proj = linear_b(
            cfg.kv_lora_rank,
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            false,
            vb.pp("kv_b_proj"),
        )?;
        let o_proj = linear_b(
            heads * cfg.v_head_dim,
            cfg.hidden_size,
            bias,
            vb.pp("o_proj"),
        )?;
        // Yarn stretches attention logits as well: the softmax scale takes mscale(factor, mscale_all_dim)^2.
        let mut softmax_scale = 1.0 / (qk_dim as f64).sqrt();
        if let Some(yarn) = cfg.yarn() {
            let m_all = yarn.mscale_all_dim.unwrap_or(0.0);
            if m_all != 0.0 {
                let m = yarn_get_mscale(yarn.factor.unwrap_or(1.0), m_all);
                softmax_scale *= m * m;
            }
        }
        Ok(Mla {
            q,
            kv_a_proj_with_mqa,
            kv_a_layernorm,
            kv_b_proj,
            o_proj,
            heads,
            nope_dim: cfg.qk_nope_head_dim,
            rope_dim: cfg.qk_rope_head_dim,
            v_dim: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            softmax_scale,
        })
    }

    /// Keys/values this layer caches per position.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            kv_heads: self.heads,
            key_dim: self.nope_dim + self.rope_dim,
            value_dim: self.v_dim,
        }
    }

    /// Attention for the packed tokens `x: [total, hidden]` of the step's sequences: writes their
    /// keys/values to `kv`, then each token attends to its own sequence's positions.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        layout: &StepLayout,
        kv: &KvLayer,
    ) -> candle_core::Result<Tensor> {
        let total = x.dim(0)?;
        let (h, qk_dim) = (self.heads, self.nope_dim + self.rope_dim);
        let q = match &self.q {
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
            QueryProj::Full(proj) => proj.forward(x)?,
        };
        let q = q.reshape((total, h, qk_dim))?;
        let q_nope = q.narrow(D::Minus1, 0, self.nope_dim)?;
        let q_rot = q.narrow(D::Minus1, self.nope_dim, self.rope_dim)?;

        let compressed = self.kv_a_proj_with_mqa.forward(x)?;
        let latent = compressed.narrow(D::Minus1, 0, self.kv_lora_rank)?;
        let k_rot = compressed
            .narrow(D::Minus1, self.kv_lora_rank, self.rope_dim)?
            .reshape((total, 1, self.rope_dim))?;
        let kv_up = self
            .kv_b_proj
            .forward(&self.kv_a_layernorm.forward(&latent.contiguous()?)?)?
            .reshape((total, h, self.nope_dim + self.v_dim))?;
        let k_nope = kv_up.narrow(D::Minus1, 0, self.nope_dim)?;
        let v = kv_up.narrow(D::Minus1, self.nope_dim, self.v_dim)?;

        let (cos, sin) = layout.cos_sin(x.device())?;
        let q_rot = rope.apply(&q_rot, &cos, &sin)?;
        // The rotary key part is shared by all heads (it comes from the MQA-style compressed vector).
        let k_rot = rope
            .apply(&k_rot, &cos, &sin)?
            .broadcast_as((total, h, self.rope_dim))?;
        let q = Tensor::cat(&[&q_nope, &q_rot], D::Minus1)?;
        let k = Tensor::cat(&[&k_nope, &k_rot], D::Minus1)?;
        layout.kv.write(kv, &k, &v)?;
        let out = paged_attention(&q, kv, &layout.kv, self.softmax_scale)?;
        self.o_proj.forward(&out.reshape((total, h * self.v_dim))?)
    }
}
