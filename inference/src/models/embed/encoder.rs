//! The post-LayerNorm transformer encoder that BERT, ERNIE 3.0 and XLM-RoBERTa share. The families
//! differ only in their embeddings layer: how positions are numbered and which constant per-token
//! rows (token type, ERNIE task type) are added; [`Flavour`] carries that difference.
use candle_core::{CpuStorage, Device, Module, Storage, Tensor};
use candle_nn::ops::{layer_norm, softmax_last_dim};
use candle_nn::Linear;

use super::config::{Activation, EncoderConfig};
use super::fast;
use super::weights::Checkpoint;
use super::EncoderKernels;
use crate::models::ModelError;

/// How position ids are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// BERT / ERNIE: 0, 1, 2, ... for every slot.
    FromZero,
    /// RoBERTa / XLM-RoBERTa: `pad_token_id + 1`, `+ 2`, ... counting only non-padding tokens;
    /// padding tokens get `pad_token_id`.
    AfterPadding,
}

/// What distinguishes one family's embeddings layer.
#[derive(Debug, Clone, Copy)]
pub struct Flavour {
    pub positions: Positions,
    /// ERNIE's `use_task_id`: add `task_type_embeddings` row 0 (no task ids are passed, as in
    /// sentence-transformers) to every token.
    pub task_type: bool,
}

/// A padded batch ready for the encoder.
pub struct Batch {
    /// Token count of each row (before padding).
    pub lens: Vec<usize>,
    /// Padded length.
    pub width: usize,
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(w: &Checkpoint, prefix: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        let (weight, bias) = w.norm_names(prefix);
        Ok(Self {
            weight: w.get(&weight, size)?,
            bias: w.get(&bias, size)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

fn linear(w: &Checkpoint, prefix: &str, out: usize, inp: usize) -> Result<Linear, ModelError> {
    Ok(Linear::new(
        w.get(&format!("{prefix}.weight"), (out, inp))?,
        Some(w.get(&format!("{prefix}.bias"), out)?),
    ))
}

struct Layer {
    /// query, key and value projections fused into one matmul: rows [q; k; v].
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
    activation: Activation,
    heads: usize,
    head_dim: usize,
}

impl Layer {
    fn load(w: &Checkpoint, i: usize, cfg: &EncoderConfig) -> Result<Self, ModelError> {
        let p = format!("encoder.layer.{i}");
        let h = cfg.hidden_size;
        let [q, k, v] =
            ["query", "key", "value"].map(|n| linear(w, &format!("{p}.attention.self.{n}"), h, h));
        let (q, k, v) = (q?, k?, v?);
        let fuse = |parts: [&Tensor; 3]| {
            Tensor::cat(&parts, 0).map_err(|e| ModelError::load(w.file(), format!("{p}: {e}")))
        };
        let qkv_w = fuse([q.weight(), k.weight(), v.weight()])?;
        let biases = [q.bias(), k.bias(), v.bias()];
        let qkv_b = match biases {
            [Some(a), Some(b), Some(c)] => Some(fuse([a, b, c])?),
            _ => None,
        };
        Ok(Self {
            qkv: Linear::new(qkv_w, qkv_b),
            attn_out: linear(w, &format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: Norm::load(
                w,
                &format!("{p}.attention.output.LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            intermediate: linear(
                w,
                &format!("{p}.intermediate.dense"),
                cfg.intermediate_size,
                h,
            )?,
            output: linear(w, &format!("{p}.output.dense"), h, cfg.intermediate_size)?,
            out_norm: Norm::load(w, &format!("{p}.output.LayerNorm"), h, cfg.layer_norm_eps)?,
            activation: cfg.activation,
            heads: cfg.num_heads,
            head_dim: h / cfg.num_heads,
        })
    }

    /// `xs`: [batch, width, hidden]; `mask`: additive [batch, 1, 1, width] or none when no row is padded.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        // One copy lays q, k and v out head-major: [3, batch, heads, width, head_dim].
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((b, t, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let context = softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, h))?;
        let attn = self
            .attn_norm
            .forward(&(self.attn_out.forward(&context)? + xs)?)?;
        let ff = self.activation.apply(&self.intermediate.forward(&attn)?)?;
        self.out_norm.forward(&(self.output.forward(&ff)? + &attn)?)
    }
}

/// How the transformer layers run.
enum Layers {
    /// candle tensor ops (GPUs).
    Candle(Vec<Layer>),
    /// Packed tokens and our float32 kernels (CPU).
    Cpu(fast::Layers),
}

/// Embeddings layer plus the stack of transformer layers.
pub struct Encoder {
    word: Tensor,
    position: Tensor,
    /// Rows added to every token: token type 0 (inputs are single segments), plus ERNIE's task
    /// type 0.
    constant_rows: Tensor,
    embed_norm: Norm,
    layers: Layers,
    positions: Positions,
    pad_id: u32,
    vocab_size: usize,
    device: Device,
}

impl Encoder {
    /// With [`EncoderKernels::Packed`] on the CPU the layers run on [`fast`]; else on candle's ops.
    pub fn load(
        cfg: &EncoderConfig,
        w: &Checkpoint,
        flavour: Flavour,
        kernels: EncoderKernels,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let word = w.get("embeddings.word_embeddings.weight", (cfg.vocab_size, h))?;
        let position = w.get(
            "embeddings.position_embeddings.weight",
            (cfg.max_position_embeddings, h),
        )?;
        let token_types = w.get(
            "embeddings.token_type_embeddings.weight",
            (cfg.type_vocab_size, h),
        )?;
        let bad = |e: candle_core::Error| ModelError::load(w.file(), format!("embeddings: {e}"));
        let mut constant_rows = token_types.get(0).map_err(bad)?;
        if flavour.task_type {
            let tasks = w.get(
                "embeddings.task_type_embeddings.weight",
                (cfg.task_type_vocab_size, h),
            )?;
            constant_rows = (constant_rows + tasks.get(0).map_err(bad)?).map_err(bad)?;
        }
        let layers = if kernels == EncoderKernels::Packed && word.device().is_cpu() {
            Layers::Cpu(fast::Layers::load(w, cfg)?)
        } else {
            Layers::Candle(
                (0..cfg.num_layers)
                    .map(|i| Layer::load(w, i, cfg))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        if flavour.positions == Positions::AfterPadding
            && cfg.max_position_embeddings <= cfg.pad_token_id as usize + 1
        {
            return Err(ModelError::load(
                w.file(),
                "max_position_embeddings leaves no positions after pad_token_id",
            ));
        }
        Ok(Self {
            device: word.device().clone(),
            word,
            position,
            constant_rows,
            embed_norm: Norm::load(w, "embeddings.LayerNorm", h, cfg.layer_norm_eps)?,
            layers,
            positions: flavour.positions,
            pad_id: cfg.pad_token_id,
            vocab_size: cfg.vocab_size,
        })
    }

    /// Most tokens one input may have (special tokens included), as the position table allows.
    pub fn capacity(&self) -> usize {
        let table = self.position.dims()[0];
        match self.positions {
            Positions::FromZero => table,
            Positions::AfterPadding => table.saturating_sub(self.pad_id as usize + 1),
        }
    }

    /// Run the encoder on a batch of token id sequences, right-padded to the longest. Returns the
    /// last hidden states [batch, width, hidden] (padding slots hold values that must be ignored)
    /// and the batch shape.
    pub fn forward(&self, inputs: &[&[u32]]) -> Result<(Tensor, Batch), ModelError> {
        let batch = self.check(inputs)?;
        let layers = match &self.layers {
            Layers::Cpu(fast) => return self.forward_cpu(fast, inputs, batch),
            Layers::Candle(layers) => layers,
        };
        let (ids, positions) = self.layout(inputs, &batch);
        let n = inputs.len();
        let ids = Tensor::from_vec(ids, n * batch.width, &self.device)?;
        let positions = Tensor::from_vec(positions, n * batch.width, &self.device)?;
        let embedded = (self.word.index_select(&ids, 0)?
            + self.position.index_select(&positions, 0)?)?
        .broadcast_add(&self.constant_rows)?
        .reshape((n, batch.width, ()))?;
        let mut xs = self.embed_norm.forward(&embedded)?;
        let mask = self.mask(&batch)?;
        for layer in layers {
            xs = layer.forward(&xs, mask.as_ref())?;
        }
        Ok((xs, batch))
    }

    /// Whether padding costs compute (candle's padded batches) or not (packed CPU tokens).
    pub fn pads(&self) -> bool {
        matches!(self.layers, Layers::Candle(_))
    }

    /// The CPU path: tokens packed end to end, embeddings summed and normalised in place, the
    /// layers in one rayon scope (so their parallel loops are joins inside the pool, not hand-offs
    /// from this thread), then the states spread back into the padded batch layout.
    fn forward_cpu(
        &self,
        fast: &fast::Layers,
        inputs: &[&[u32]],
        batch: Batch,
    ) -> Result<(Tensor, Batch), ModelError> {
        let (mut ids, mut positions) = (Vec::new(), Vec::new());
        for row in inputs {
            self.row_layout(row, row.len(), &mut ids, &mut positions);
        }
        let h = self.constant_rows.dims1()?;
        let mut x = vec![0f32; ids.len() * h];
        with_f32(&self.word, |word| {
            with_f32(&self.position, |position| {
                with_f32(&self.constant_rows, |constant| {
                    for ((out, &id), &pos) in x.chunks_exact_mut(h).zip(&ids).zip(&positions) {
                        let (id, pos) = (id as usize, pos as usize);
                        let w = &word[id * h..(id + 1) * h];
                        let p = &position[pos * h..(pos + 1) * h];
                        for (((o, w), p), c) in out.iter_mut().zip(w).zip(p).zip(constant) {
                            *o = w + p + c;
                        }
                    }
                })
            })
        })???;
        let norm = &self.embed_norm;
        with_f32(&norm.weight, |w| {
            with_f32(&norm.bias, |b| {
                crate::kernels::rows::add_layer_norm(&mut x, &[], w, b, norm.eps)
            })
        })??;
        let x = rayon::scope(|_| fast.forward(x, &batch.lens));
        let mut padded = vec![0f32; inputs.len() * batch.width * h];
        let mut at = 0;
        for (row, &len) in padded.chunks_exact_mut(batch.width * h).zip(&batch.lens) {
            row[..len * h].copy_from_slice(&x[at..at + len * h]);
            at += len * h;
        }
        let states = Tensor::from_vec(padded, (inputs.len(), batch.width, h), &self.device)?;
        Ok((states, batch))
    }

    fn check(&self, inputs: &[&[u32]]) -> Result<Batch, ModelError> {
        let capacity = self.capacity();
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() {
                return Err(ModelError::Unsupported(format!("input {i} has no tokens")));
            }
            if ids.len() > capacity {
                return Err(ModelError::Unsupported(format!(
                    "input {i} has {} tokens, more than the model's {capacity}",
                    ids.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(ModelError::Unsupported(format!(
                    "input {i} has token id {bad}, outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        let lens: Vec<usize> = inputs.iter().map(|ids| ids.len()).collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        Ok(Batch { lens, width })
    }

    /// Padded token ids and their position ids, row-major.
    fn layout(&self, inputs: &[&[u32]], batch: &Batch) -> (Vec<u32>, Vec<u32>) {
        let total = inputs.len() * batch.width;
        let (mut ids, mut positions) = (Vec::with_capacity(total), Vec::with_capacity(total));
        for row in inputs {
            self.row_layout(row, batch.width, &mut ids, &mut positions);
        }
        (ids, positions)
    }

    /// One input's ids padded to `width`, and their position ids, appended.
    fn row_layout(&self, row: &[u32], width: usize, ids: &mut Vec<u32>, positions: &mut Vec<u32>) {
        let padded = row
            .iter()
            .copied()
            .chain(std::iter::repeat(self.pad_id))
            .take(width);
        let mut seen = 0u32;
        for (slot, id) in padded.enumerate() {
            ids.push(id);
            positions.push(match self.positions {
                Positions::FromZero => slot as u32,
                // transformers' create_position_ids_from_input_ids: a pad id never advances the count.
                Positions::AfterPadding if id == self.pad_id => self.pad_id,
                Positions::AfterPadding => {
                    seen += 1;
                    self.pad_id + seen
                }
            });
        }
    }

    /// Additive attention mask hiding padded keys, [batch, 1, 1, width]; none when nothing is padded.
    fn mask(&self, batch: &Batch) -> candle_core::Result<Option<Tensor>> {
        if batch.lens.iter().all(|&l| l == batch.width) {
            return Ok(None);
        }
        let values: Vec<f32> = batch
            .lens
            .iter()
            .flat_map(|&len| {
                (0..batch.width).map(move |slot| if slot < len { 0.0 } else { f32::MIN })
            })
            .collect();
        Tensor::from_vec(values, (batch.lens.len(), 1, 1, batch.width), &self.device).map(Some)
    }
}

/// `f` over the values of a contiguous float32 CPU tensor, without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Err(ModelError::Unsupported(
            "the CPU encoder needs contiguous float32 CPU weights".into(),
        ));
    };
    Ok(f(&v[start..end]))
}
