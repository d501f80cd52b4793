//! Building blocks shared by the dense decoders (GLM-4 hf/0414, Qwen2, Llama, GGUF) and reusable by
//! other chat families: linear layers over dense or quantized weights, RMSNorm, rotary embeddings with
//! per-token positions, attention over the paged KV pool, gated MLPs.
//!
//! Activations of one forward step are packed: the new tokens of every sequence are concatenated
//! into one `[total_tokens, hidden]` tensor, so projections, MLPs and attention (see `attention.rs`)
//! each run once per layer and step for the whole batch.
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::{paged_attention, PerDevice, StepKv};
use super::kv::KvLayer;
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
        let (cos, sin) = self.tables(positions);
        let shape = (positions.len(), self.inv_freq.len());
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Cos and sin tables as flat `[positions.len() * rot_dim / 2]` float32 vectors.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
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
        (cos, sin)
    }

    /// `xs`: `[tokens, heads, head_dim]`, one row of `cos`/`sin` (`[tokens, rot_dim / 2]`) per token.
    pub fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (tokens, heads, head_dim) = xs.dims3()?;
        let rot = if self.rot_dim == head_dim {
            xs.clone()
        } else {
            xs.narrow(D::Minus1, 0, self.rot_dim)?
        };
        // Each token is its own "batch" row with its own cos/sin row: any positions, one kernel.
        let rot = rot
            .contiguous()?
            .reshape((tokens, heads, 1, self.rot_dim))?;
        let (cos, sin) = (
            cos.reshape((tokens, 1, self.rot_dim / 2))?,
            sin.reshape((tokens, 1, self.rot_dim / 2))?,
        );
        let rot = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&rot, &cos, &sin)?
        }
        .reshape((tokens, heads, self.rot_dim))?;
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

/// What every layer of a step shares: where each sequence's tokens sit in the packed activations
/// and in the KV pool, and the rotary tables of their positions (built once per device).
pub struct StepLayout {
    pub kv: StepKv,
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    dtype: DType,
    cos_on: PerDevice,
    sin_on: PerDevice,
}

impl StepLayout {
    pub fn new(kv: StepKv, rotary: &Rotary, dtype: DType) -> Self {
        let (cos, sin) = rotary.tables(kv.positions());
        Self::with_tables(kv, (cos, sin), rotary.rot_dim() / 2, dtype)
    }

    /// With cos/sin tables (`[tokens * half]` each) computed by the caller's own rotary scheme.
    pub fn with_tables(
        kv: StepKv,
        tables: (Vec<f32>, Vec<f32>),
        half: usize,
        dtype: DType,
    ) -> Self {
        StepLayout {
            kv,
            cos: tables.0,
            sin: tables.1,
            half,
            dtype,
            cos_on: PerDevice::default(),
            sin_on: PerDevice::default(),
        }
    }

    /// Cos and sin `[tokens, rot_dim / 2]` on `device`.
    pub fn cos_sin(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.kv.total_tokens(), self.half);
        let table = |t: &[f32]| Tensor::from_slice(t, shape, device)?.to_dtype(self.dtype);
        Ok((
            self.cos_on.get(device, || table(&self.cos))?,
            self.sin_on.get(device, || table(&self.sin))?,
        ))
    }
}

/// The query, key and value projections: separate, or one matrix (rows q, then k, then v) when
/// they are blocks our kernels can join ([`Linear::concat_rows`]).
#[derive(Debug, Clone)]
pub enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl Qkv {
    /// Joins the three when [`Linear::concat_rows`] can.
    pub fn new(q: Linear, k: Linear, v: Linear) -> Result<Qkv> {
        Ok(match Linear::concat_rows(&[&q, &k, &v])? {
            Some(fused) => Qkv::Fused(fused),
            None => Qkv::Split { q, k, v },
        })
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rotary: Arc<Rotary>,
}

impl Attention {
    /// `xs`: packed `[total_tokens, hidden]`. Writes this layer's new keys/values to `kv`, then
    /// attends every token to its own sequence's cached positions.
    pub fn forward(&self, xs: &Tensor, layout: &StepLayout, kv: &KvLayer) -> Result<Tensor> {
        let total = xs.dim(0)?;
        let (cos, sin) = layout.cos_sin(xs.device())?;
        let (q, k, v) = self.project(xs)?;
        let heads = |t: Tensor, n: usize| t.reshape((total, n, self.head_dim));
        let q = self.rotary.apply(&heads(q, self.num_heads)?, &cos, &sin)?;
        let k = self
            .rotary
            .apply(&heads(k, self.num_kv_heads)?, &cos, &sin)?;
        let v = heads(v, self.num_kv_heads)?;
        layout.kv.write(kv, &k, &v)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = paged_attention(&q, kv, &layout.kv, scale)?;
        self.o_proj
            .forward(&out.reshape((total, self.num_heads * self.head_dim))?)
    }

    /// Queries, keys and values `[total, heads * head_dim]` each.
    fn project(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            Qkv::Split { q, k, v } => Ok((q.forward(xs)?, k.forward(xs)?, v.forward(xs)?)),
            Qkv::Fused(qkv) => {
                let all = qkv.forward(xs)?;
                let (nq, nkv) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                Ok((
                    all.narrow(D::Minus1, 0, nq)?,
                    all.narrow(D::Minus1, nq, nkv)?,
                    all.narrow(D::Minus1, nq + nkv, nkv)?,
                ))
            }
        }
    }

    /// Keys/values this layer caches per position.
    pub fn kv_shape(&self) -> super::kv::KvShape {
        super::kv::KvShape {
            kv_heads: self.num_kv_heads,
            key_dim: self.head_dim,
            value_dim: self.head_dim,
        }
    }
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
    /// Separate gate/up projections, joined into one when [`Linear::concat_rows`] can.
    pub fn new(gate: Linear, up: Linear, down: Linear, intermediate: usize) -> Result<Mlp> {
        Ok(match Linear::concat_rows(&[&gate, &up])? {
            Some(gate_up) => Mlp::Fused {
                gate_up,
                down,
                intermediate,
            },
            None => Mlp::Split { gate, up, down },
        })
    }

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
                down.forward(&crate::kernels::act::silu_mul(&gu, *intermediate)?)
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
