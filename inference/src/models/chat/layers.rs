//! Building blocks shared by the dense decoders (GLM-4 hf/0414, Qwen2, Llama, GGUF) and reusable by
//! other chat families: linear layers over dense or quantized weights, RMSNorm, rotary embeddings with
//! per-token positions, attention over caller-owned per-sequence caches, gated MLPs.
//!
//! Activations of one forward step are packed: the new tokens of every sequence are concatenated
//! into one `[total_tokens, hidden]` tensor, so projections and MLPs run once per step for the whole
//! batch; only attention is split per sequence (each against its own cache).
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::cache::{append_kv, SeqCache};
pub use super::linear::{Embedding, Linear};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
    }
}

/// Llama-3 frequency-dependent scaling of the rotary inverse frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// How the rotary inverse frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers `rope_type: linear`).
    Linear(f64),
    Llama3(Llama3Scaling),
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, how llama.cpp stores llama3 scaling).
    FreqFactors(Vec<f32>),
}

/// Rotary position embedding over the first `rot_dim` channels of each head.
///
/// `interleaved`: rotate pairs `(x[2i], x[2i+1])` (GLM, and GGUF llama whose q/k rows are permuted
/// for it); otherwise rotate halves `(x[i], x[i + rot_dim/2])` (transformers Llama/Qwen2).
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    rot_dim: usize,
    interleaved: bool,
}

impl Rotary {
    pub fn new(rot_dim: usize, theta: f64, scaling: &RopeScaling, interleaved: bool) -> Self {
        let inv_freq = (0..rot_dim / 2)
            .map(|i| {
                let base = 1.0 / theta.powf((2 * i) as f64 / rot_dim as f64);
                match scaling {
                    RopeScaling::None => base,
                    RopeScaling::Linear(f) => base / f,
                    RopeScaling::Llama3(s) => llama3_scale(base, s),
                    RopeScaling::FreqFactors(f) => {
                        base / f64::from(f.get(i).copied().unwrap_or(1.0))
                    }
                }
            })
            .map(|f| f as f32)
            .collect();
        Rotary {
            inv_freq,
            rot_dim,
            interleaved,
        }
    }

    pub fn rot_dim(&self) -> usize {
        self.rot_dim
    }

    /// Cos and sin tables `[positions.len(), rot_dim / 2]` for arbitrary (per-token) positions.
    pub fn cos_sin(
        &self,
        positions: &[usize],
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // float32 product as transformers computes it, so long positions round the same way.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// `xs`: `[heads, tokens, head_dim]`, one row of `cos`/`sin` per token.
    pub fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = xs.dim(D::Minus1)?;
        let rot = if self.rot_dim == head_dim {
            xs.clone()
        } else {
            xs.narrow(D::Minus1, 0, self.rot_dim)?
        };
        let rot = rot.contiguous()?.unsqueeze(0)?;
        let rot = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&rot, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&rot, cos, sin)?
        }
        .squeeze(0)?;
        if self.rot_dim == head_dim {
            return Ok(rot);
        }
        let pass = xs.narrow(D::Minus1, self.rot_dim, head_dim - self.rot_dim)?;
        Tensor::cat(&[&rot, &pass], D::Minus1)
    }
}

fn llama3_scale(inv_freq: f64, s: &Llama3Scaling) -> f64 {
    let low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// Where each sequence's new tokens sit in the packed activations, plus the rotary tables of the
/// step (shared by every layer).
pub struct StepLayout {
    /// `(offset in the packed rows, new tokens, tokens already cached)` per sequence.
    pub spans: Vec<(usize, usize, usize)>,
    pub cos: Tensor,
    pub sin: Tensor,
}

impl StepLayout {
    pub fn new(
        caches: &[(usize, usize)],
        rotary: &Rotary,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut spans = Vec::with_capacity(caches.len());
        let mut positions = Vec::new();
        let mut offset = 0;
        for &(past, len) in caches {
            spans.push((offset, len, past));
            positions.extend(past..past + len);
            offset += len;
        }
        let (cos, sin) = rotary.cos_sin(&positions, device, dtype)?;
        Ok(StepLayout { spans, cos, sin })
    }

    pub fn total_tokens(&self) -> usize {
        self.spans.iter().map(|s| s.1).sum()
    }

    /// Row index of each sequence's last new token.
    pub fn last_rows(&self) -> Vec<u32> {
        self.spans
            .iter()
            .map(|&(off, len, _)| (off + len).saturating_sub(1) as u32)
            .collect()
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rotary: Arc<Rotary>,
}

impl Attention {
    /// `xs`: packed `[total_tokens, hidden]`. Appends this layer's new keys/values to each cache.
    pub fn forward(
        &self,
        xs: &Tensor,
        layout: &StepLayout,
        caches: &mut [&mut SeqCache],
        layer: usize,
    ) -> Result<Tensor> {
        let total = xs.dim(0)?;
        let q = self.heads(&self.q_proj.forward(xs)?, total, self.num_heads)?;
        let k = self.heads(&self.k_proj.forward(xs)?, total, self.num_kv_heads)?;
        let v = self.heads(&self.v_proj.forward(xs)?, total, self.num_kv_heads)?;
        let q = self.rotary.apply(&q, &layout.cos, &layout.sin)?;
        let k = self.rotary.apply(&k, &layout.cos, &layout.sin)?;

        let mut outs = Vec::with_capacity(caches.len());
        for (cache, &(off, len, past)) in caches.iter_mut().zip(&layout.spans) {
            let q = q.narrow(1, off, len)?;
            let k = k.narrow(1, off, len)?;
            let v = v.narrow(1, off, len)?;
            let slot = cache.layers.get_mut(layer).ok_or_else(|| {
                candle_core::Error::Msg(format!("cache has no slot for layer {layer}"))
            })?;
            let (k, v) = append_kv(slot, past, &k, &v)?;
            outs.push(self.attend(&q, &k, &v, past)?);
        }
        let out = Tensor::cat(&outs, 0)?;
        self.o_proj.forward(&out)
    }

    /// `[total, n * head_dim]` -> `[n, total, head_dim]`.
    fn heads(&self, xs: &Tensor, total: usize, n: usize) -> Result<Tensor> {
        xs.reshape((total, n, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// One sequence: `q` `[heads, len, d]` against `k`/`v` `[kv_heads, past + len, d]`, causal
    /// within the new chunk. Returns `[len, heads * d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
        let len = q.dim(1)?;
        let kv_len = k.dim(1)?;
        let groups = self.num_heads / self.num_kv_heads;
        // Query heads sharing a key/value head are stacked along the rows, so K and V are used
        // as they are instead of being repeated per query head.
        let q = q
            .contiguous()?
            .reshape((self.num_kv_heads, groups * len, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = if len > 1 {
            let mask = causal_mask(len, past, kv_len, q.device())?;
            scores
                .reshape((self.num_kv_heads, groups, len, kv_len))?
                .broadcast_add(&mask)?
                .reshape((self.num_kv_heads, groups * len, kv_len))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(v)?; // [kv_heads, groups * len, d]
        out.reshape((self.num_heads, len, self.head_dim))?
            .transpose(0, 1)?
            .reshape((len, self.num_heads * self.head_dim))
    }
}

/// `[len, past + len]`: new token `i` (absolute position `past + i`) sees positions `<= past + i`.
fn causal_mask(len: usize, past: usize, kv_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, kv_len), device)
}

/// SiLU-gated MLP, with separate or fused (gate first) gate/up projections.
#[derive(Debug, Clone)]
pub enum Mlp {
    Split {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Fused {
        gate_up: Linear,
        down: Linear,
        intermediate: usize,
    },
}

impl Mlp {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Split { gate, up, down } => {
                let h = (gate.forward(xs)?.silu()? * up.forward(xs)?)?;
                down.forward(&h)
            }
            Mlp::Fused {
                gate_up,
                down,
                intermediate,
            } => {
                let gu = gate_up.forward(xs)?;
                let gate = gu.narrow(D::Minus1, 0, *intermediate)?;
                let up = gu.narrow(D::Minus1, *intermediate, *intermediate)?;
                down.forward(&(gate.silu()? * up)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let low = 2.0 * std::f64::consts::PI / 10_000.0;
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-15);
    }

    #[test]
    fn causal_mask_sees_the_cache_and_earlier_new_tokens() {
        let m = causal_mask(2, 3, 5, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][..4], [0.0; 4]);
        assert!(m[0][4].is_infinite());
        assert_eq!(m[1], vec![0.0; 5]);
    }

    #[test]
    fn interleaved_partial_rotary_rotates_pairs_of_the_first_channels_only() {
        let rot = Rotary::new(4, 10_000.0, &RopeScaling::None, true);
        let x = Tensor::new(&[[[1f32, 2., 3., 4., 5., 6.]]], &Device::Cpu).unwrap();
        let (cos, sin) = rot.cos_sin(&[1], &Device::Cpu, DType::F32).unwrap();
        let y = rot
            .apply(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (c0, s0) = (1f32.cos(), 1f32.sin());
        let (c1, s1) = (0.01f32.cos(), 0.01f32.sin());
        let want = [
            1. * c0 - 2. * s0,
            2. * c0 + 1. * s0,
            3. * c1 - 4. * s1,
            4. * c1 + 3. * s1,
            5.,
            6.,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }
}
