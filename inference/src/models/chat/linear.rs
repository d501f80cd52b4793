//! Weight-bearing layers of the chat decoders: linear projections and token embeddings over dense
//! tensors, GGUF blocks run by our CPU kernels ([`crate::kernels::quant`]), or candle's quantized
//! tensors (GPUs, and block types our kernels do not cover).
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::kernels::quant::QWeight;

/// A linear projection `y = x W^T + b`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// GGUF blocks multiplied with float32 activations by our kernels (CPU).
    Blocks {
        weight: Arc<QWeight>,
        bias: Option<Tensor>,
    },
    /// candle's ggml-style kernels (activations quantized to 8 bits on CPU).
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, bias))
    }

    pub fn blocks(weight: Arc<QWeight>, bias: Option<Tensor>) -> Self {
        Linear::Blocks { weight, bias }
    }

    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear::Quantized {
            weight: QMatMul::from_arc(weight)?,
            bias,
        })
    }

    /// The projections of `parts` (same input) as one projection whose outputs are the parts'
    /// outputs side by side, when they are all blocks our kernels can join
    /// ([`QWeight::concat_rows`]); `None` otherwise (dense and candle-quantized projections stay
    /// separate: joining them would copy weights for no gain on those paths).
    pub fn concat_rows(parts: &[&Linear]) -> Result<Option<Linear>> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for p in parts {
            let Linear::Blocks { weight, bias } = p else {
                return Ok(None);
            };
            weights.push(weight.as_ref());
            biases.push(bias.as_ref());
        }
        // Decide the bias before joining: a mix of biased and unbiased parts stays separate,
        // and the weights are not copied for nothing.
        let biases = if biases.iter().all(Option::is_none) {
            None
        } else if let Some(all) = biases.iter().copied().collect::<Option<Vec<&Tensor>>>() {
            Some(all)
        } else {
            return Ok(None);
        };
        let Some(joined) = QWeight::concat_rows(&weights) else {
            return Ok(None);
        };
        let bias = biases.map(|all| Tensor::cat(&all, 0)).transpose()?;
        Ok(Some(Linear::blocks(Arc::new(joined), bias)))
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(xs),
            Linear::Blocks { weight, bias } => {
                let dtype = xs.dtype();
                let ys = xs
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(weight.as_ref())?;
                with_bias(ys, bias.as_ref())?.to_dtype(dtype)
            }
            Linear::Quantized { weight, bias } => {
                // Quantized kernels take and give float32 activations.
                let dtype = xs.dtype();
                let ys = weight.forward(&xs.to_dtype(DType::F32)?)?;
                with_bias(ys, bias.as_ref())?.to_dtype(dtype)
            }
        }
    }
}

fn with_bias(ys: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => ys.broadcast_add(&b.to_dtype(DType::F32)?),
        None => Ok(ys),
    }
}

/// Token embeddings: dense, GGUF blocks, or a candle quantized tensor (rows dequantized on lookup).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Blocks(Arc<QWeight>),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// `ids` `[n]` u32 -> `[n, hidden]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Embedding::Dense(w) => w.index_select(ids, 0)?.to_dtype(dtype),
            Embedding::Blocks(w) => {
                let (vocab, hidden) = w.dims();
                let ids = ids.to_vec1::<u32>()?;
                let mut rows = vec![0f32; ids.len() * hidden];
                for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(hidden)) {
                    if id as usize >= vocab {
                        candle_core::bail!("token id {id} is outside the vocabulary ({vocab})");
                    }
                    w.dequantize_row(id as usize, out);
                }
                Tensor::from_vec(rows, (ids.len(), hidden), &candle_core::Device::Cpu)?
                    .to_dtype(dtype)
            }
            Embedding::Quantized(q) => q.embedding(ids)?.to_dtype(dtype),
        }
    }

    /// The same matrix as an output projection (tied word embeddings), sharing its memory.
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(w) => Ok(Linear::dense(w.clone(), None)),
            Embedding::Blocks(w) => Ok(Linear::blocks(w.clone(), None)),
            Embedding::Quantized(q) => Linear::quantized(q.clone(), None),
        }
    }
}
