//! The encoder's transformer layers on the CPU as plain float32 loops over packed tokens: the
//! tokens of all inputs are laid end to end (`[tokens, hidden]`, no padding), every projection is
//! one [`par_matmul`] over all of them with its epilogue (bias, activation, residual + LayerNorm)
//! fused, and attention runs per input and head on that input's own tokens (no mask needed).
//!
//! Why (perf of the embedding server under the mixed-length bench, candle ops): 33% of samples in
//! candle's spin-wait barrier (`BarrierGuard::drop`) of its element-wise thread pool, 21% in gemm's
//! scalar packing of activations, the rest split across per-head matmuls that each crossed
//! threads, padding, and copies between layouts. Here one forward crosses threads five times per
//! layer, inside one rayon scope. Numerics: the same float32 operations as transformers' eager
//! BERT layer, in another summation order (the fixtures' tolerances hold).
use std::cell::RefCell;

use rayon::prelude::*;

use super::config::{Activation, EncoderConfig};
use super::weights::Checkpoint;
use crate::kernels::rows::{add_layer_norm, softmax_rows};
use crate::kernels::sgemm::{self, par_matmul, PackedB};
use crate::kernels::{Isa, SyncPtr};
use crate::models::ModelError;

/// Query rows of one attention task (bounds its score buffer to 64 x input length).
const QUERY_CHUNK: usize = 64;

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Rows [q; k; v] of the fused projection.
    qkv: PackedB,
    attn_out: PackedB,
    attn_norm: Norm,
    intermediate: PackedB,
    output: PackedB,
    out_norm: Norm,
}

/// The transformer layers of an encoder, weights packed for [`sgemm`].
pub struct Layers {
    layers: Vec<Layer>,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f32,
    activation: Activation,
}

fn floats(w: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let t = w.get(name, shape)?;
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| ModelError::load(w.file(), format!("{name}: {e}")))
}

fn norm(w: &Checkpoint, prefix: &str, h: usize) -> Result<Norm, ModelError> {
    let (weight, bias) = w.norm_names(prefix);
    Ok(Norm {
        weight: floats(w, &weight, &[h])?,
        bias: floats(w, &bias, &[h])?,
    })
}

fn linear(w: &Checkpoint, prefix: &str, out: usize, inp: usize) -> Result<PackedB, ModelError> {
    let weight = floats(w, &format!("{prefix}.weight"), &[out, inp])?;
    let bias = floats(w, &format!("{prefix}.bias"), &[out])?;
    Ok(PackedB::from_weight(&weight, out, inp, inp, Some(&bias)))
}

impl Layers {
    pub fn load(w: &Checkpoint, cfg: &EncoderConfig) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let (mut qkv_w, mut qkv_b) = (Vec::with_capacity(3 * h * h), Vec::new());
                for n in ["query", "key", "value"] {
                    let prefix = format!("{p}.attention.self.{n}");
                    qkv_w.extend(floats(w, &format!("{prefix}.weight"), &[h, h])?);
                    qkv_b.extend(floats(w, &format!("{prefix}.bias"), &[h])?);
                }
                Ok(Layer {
                    qkv: PackedB::from_weight(&qkv_w, 3 * h, h, h, Some(&qkv_b)),
                    attn_out: linear(w, &format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: norm(w, &format!("{p}.attention.output.LayerNorm"), h)?,
                    intermediate: linear(
                        w,
                        &format!("{p}.intermediate.dense"),
                        cfg.intermediate_size,
                        h,
                    )?,
                    output: linear(w, &format!("{p}.output.dense"), h, cfg.intermediate_size)?,
                    out_norm: norm(w, &format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Layers {
            layers,
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_heads,
            eps: cfg.layer_norm_eps as f32,
            activation: cfg.activation,
        })
    }

    /// Run every layer over packed tokens `x` (`[sum(lens), hidden]`, the embeddings output);
    /// `lens` are the inputs' token counts in order. Call from inside the rayon pool.
    pub fn forward(&self, mut x: Vec<f32>, lens: &[usize]) -> Vec<f32> {
        let (h, t) = (self.hidden, lens.iter().sum::<usize>());
        let mut qkv = vec![0f32; t * 3 * h];
        let mut context = vec![0f32; t * h];
        let mut attn = vec![0f32; t * h];
        let mut ff = vec![0f32; t * self.intermediate];
        for l in &self.layers {
            par_matmul(&x, h, t, &l.qkv, &mut qkv, |_, _| {});
            self.attention(&qkv, lens, &mut context);
            let norm = |rows: &mut [f32], residual: &[f32], n: &Norm| {
                add_layer_norm(rows, residual, &n.weight, &n.bias, self.eps)
            };
            par_matmul(&context, h, t, &l.attn_out, &mut attn, |rows, r0| {
                norm(rows, &x[r0 * h..r0 * h + rows.len()], &l.attn_norm)
            });
            par_matmul(&attn, h, t, &l.intermediate, &mut ff, |rows, _| {
                self.activation.apply_slice(rows)
            });
            par_matmul(&ff, self.intermediate, t, &l.output, &mut x, |rows, r0| {
                norm(rows, &attn[r0 * h..r0 * h + rows.len()], &l.out_norm)
            });
        }
        x
    }

    /// `context = softmax(q k^T / sqrt(d)) v` per input and head; one task per input, head and
    /// chunk of query rows.
    fn attention(&self, qkv: &[f32], lens: &[usize], context: &mut [f32]) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &l| {
                let s = *acc;
                *acc += l;
                Some(s)
            })
            .collect();
        let tasks: Vec<(usize, usize, usize)> = lens
            .iter()
            .enumerate()
            .flat_map(|(s, &len)| {
                (0..heads).flat_map(move |hd| {
                    (0..len.div_ceil(QUERY_CHUNK)).map(move |c| (s, hd, c * QUERY_CHUNK))
                })
            })
            .collect();
        let out = SyncPtr(context.as_mut_ptr());
        let scale = 1.0 / (d as f32).sqrt();
        let isa = Isa::detect();
        tasks.par_iter().for_each(|&(s, hd, q0)| {
            thread_local! {
                static SCRATCH: RefCell<(PackedB, PackedB, Vec<f32>)> = RefCell::default();
            }
            let (start, len) = (starts[s], lens[s]);
            let rows = QUERY_CHUNK.min(len - q0);
            let base = start * 3 * h + hd * d;
            SCRATCH.with(|cell| {
                let (keys, values, scores) = &mut *cell.borrow_mut();
                keys.pack_weight(&qkv[base + h..], len, d, 3 * h);
                values.pack_rows(&qkv[base + 2 * h..], len, d, 3 * h);
                scores.resize(rows * len, 0.0);
                let queries = &qkv[base + q0 * 3 * h..];
                sgemm::matmul(queries, 3 * h, rows, keys, scores, len);
                softmax_rows(scores, len, scale);
                // SAFETY: this task alone writes rows start+q0.. of head hd's d columns of
                // `context` ([tokens, h], in bounds: start + q0 + rows <= tokens).
                unsafe {
                    sgemm::matmul_raw(
                        isa,
                        scores,
                        len,
                        rows,
                        values,
                        out.get().add((start + q0) * h + hd * d),
                        h,
                        0..d.div_ceil(sgemm::NR),
                    )
                }
            });
        });
    }
}
