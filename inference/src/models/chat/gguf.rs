//! GGUF checkpoints (llama.cpp layout) of the llama, qwen2 and glm4 architectures: the same decoder
//! as the safetensors families, fed with quantized (or dequantized) weights, plus the tokenizer and
//! chat template stored in the file's metadata.
use std::cell::RefCell;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::decoder::{Decoder, DecoderConfig};
use super::layers::{Embedding, Linear, RopeScaling};
use super::placement::ModelBytes;
use super::weights::Weights;
use super::ChatLoadOptions;
use crate::kernels::quant::{QFormat, QWeight};
use crate::models::{LoadedChat, ModelError};

/// How GGUF weights are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufMode {
    /// Weights kept in their blocks (memory of the file). Q4_0, Q4_1 and Q8_0 run on our CPU
    /// integer kernels (activations quantized to two int8 planes per matmul, see
    /// `glm_kernels::quant`); other types on candle's ggml-style kernels.
    Quantized,
    /// Weights dequantized to the compute dtype at load: the reference path, 4-8x the memory.
    Dequantized,
    /// On the CPU, Q4_0/Q4_1/Q8_0 weights stay in their blocks and run on our kernels (float32
    /// numerics, memory of the file); other types are dequantized when the dequantized model fits
    /// in [`DEQUANTIZE_BUDGET_BYTES`], else run quantized.
    Auto,
}

impl std::str::FromStr for GgufMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(GgufMode::Auto),
            "quantized" => Ok(GgufMode::Quantized),
            "dequantized" => Ok(GgufMode::Dequantized),
            other => Err(format!(
                "`{other}` is not one of auto, quantized, dequantized"
            )),
        }
    }
}

/// Largest dequantized model [`GgufMode::Auto`] dequantizes: 2 GiB.
pub const DEQUANTIZE_BUDGET_BYTES: usize = 2 << 30;

/// How tensors our kernels do not cover run under `mode`: for [`GgufMode::Auto`], compare the
/// weights' size in `dtype` to the budget.
fn fallback_mode(mode: GgufMode, content: &Content, dtype: DType) -> GgufMode {
    if mode != GgufMode::Auto {
        return mode;
    }
    let elements: usize = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count())
        .sum();
    if elements.saturating_mul(dtype.size_in_bytes()) <= DEQUANTIZE_BUDGET_BYTES {
        GgufMode::Dequantized
    } else {
        GgufMode::Quantized
    }
}

/// Load a `.gguf` chat model: weights, tokenizer (`tokenizer.ggml.*`) and chat template.
pub fn load(path: &Path, options: &ChatLoadOptions) -> Result<LoadedChat, ModelError> {
    let device = &options.devices.first().cloned().unwrap_or(Device::Cpu);
    let file = File::open(path).map_err(|e| ModelError::load(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::load(path, format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        content: &content,
        path,
    };
    let mut cfg = config(&meta)?;
    let tok = tokenizer::from_metadata(&meta, cfg.family)?;
    let dtype = options.dtype();
    let mode = options.gguf_mode;
    let reader = RefCell::new(reader);
    let weights = GgufWeights {
        content: &content,
        reader: &reader,
        path,
        device: device.clone(),
        dtype,
        blocks: mode != GgufMode::Dequantized && device.is_cpu(),
        int8: mode == GgufMode::Quantized,
        fallback: fallback_mode(mode, &content, dtype),
    };
    if meta.has_tensor("rope_freqs.weight") {
        // llama.cpp's form of llama3 rope scaling: one divisor per rotary frequency.
        let factors = weights.qtensor("rope_freqs.weight", Some(&[cfg.rotary_dim / 2]))?;
        let factors = factors
            .dequantize(device)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        cfg.rope_scaling = RopeScaling::FreqFactors(factors);
    }
    let placement = super::plan(path, &model_bytes(&content, &cfg, &weights), options)?;
    let model = Decoder::load(&cfg, &weights, dtype, placement, options.kv_cache_memory)?;
    tracing::info!(path = %path.display(), family = cfg.family, ?mode, layers = cfg.num_layers,
        kernels = weights.blocks, "loaded GGUF model");
    Ok(LoadedChat {
        model: Arc::new(model),
        tokenizer: tok.tokenizer,
        chat_template: meta.string("tokenizer.chat_template"),
        bos_token: tok.bos_token,
        eos_token: tok.eos_token,
        eos_token_ids: tok.eos_token_ids,
    })
}

/// Bytes of each part as stored on the device: blocks (our kernels' or candle's), or floats when
/// dequantized.
fn model_bytes(content: &Content, cfg: &DecoderConfig, weights: &GgufWeights) -> ModelBytes {
    let size = |name: &str| -> u64 {
        content.tensor_infos.get(name).map_or(0, |t| {
            let elements = t.shape.elem_count();
            let kept = (weights.blocks && QFormat::from_ggml(t.ggml_dtype).is_some())
                || weights.fallback == GgufMode::Quantized;
            let bytes = if !kept {
                elements * weights.dtype.size_in_bytes()
            } else {
                elements / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()
            };
            bytes as u64
        })
    };
    let prefixed = |prefix: &str| -> u64 {
        content
            .tensor_infos
            .keys()
            .filter(|n| n.starts_with(prefix))
            .map(|n| size(n))
            .sum()
    };
    ModelBytes {
        head: size("token_embd.weight"),
        layers: (0..cfg.num_layers)
            .map(|i| prefixed(&format!("blk.{i}.")))
            .collect(),
        tail: size("output.weight") + size("output_norm.weight"),
    }
}

/// Typed access to GGUF metadata.
pub(crate) struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn num(&self, key: &str) -> Option<f64> {
        number(self.get(key)?)
    }

    fn usize(&self, key: &str) -> Option<usize> {
        self.num(key)
            .filter(|v| *v >= 0.0 && v.fract() == 0.0)
            .map(|v| v as usize)
    }

    fn req_usize(&self, key: &str) -> Result<usize, ModelError> {
        self.usize(key)
            .ok_or_else(|| self.err(format!("metadata {key} is missing or not an integer")))
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn array(&self, key: &str) -> Option<&Vec<Value>> {
        match self.get(key)? {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn err(&self, msg: impl std::fmt::Display) -> ModelError {
        ModelError::load(self.path, msg)
    }
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => f64::from(*x),
        Value::I8(x) => f64::from(*x),
        Value::U16(x) => f64::from(*x),
        Value::I16(x) => f64::from(*x),
        Value::U32(x) => f64::from(*x),
        Value::I32(x) => f64::from(*x),
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => f64::from(*x),
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// Decoder shapes from `{arch}.*` metadata and the tensors present.
fn config(meta: &Meta) -> Result<DecoderConfig, ModelError> {
    let arch = meta
        .string("general.architecture")
        .ok_or_else(|| meta.err("metadata general.architecture is missing"))?;
    // llama.cpp stores llama q/k rows permuted for pairwise rotation, glm4 rotates pairs natively;
    // qwen2 keeps transformers' half rotation.
    let (family, interleaved) = match arch.as_str() {
        "llama" => ("gguf-llama", true),
        "qwen2" => ("gguf-qwen2", false),
        "glm4" => ("gguf-glm4", true),
        other => {
            return Err(meta.err(format!(
                "unsupported GGUF architecture {other} (supported: llama, qwen2, glm4)"
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta.req_usize(&key("embedding_length"))?;
    let num_heads = meta.req_usize(&key("attention.head_count"))?;
    let head_dim = meta
        .usize(&key("attention.key_length"))
        .unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = meta
        .content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| meta.err("tensor token_embd.weight is missing"))?;
    let cfg = DecoderConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: meta.req_usize(&key("feed_forward_length"))?,
        num_layers: meta.req_usize(&key("block_count"))?,
        num_heads,
        num_kv_heads: meta
            .usize(&key("attention.head_count_kv"))
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: meta
            .num(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: meta.num(&key("rope.freq_base")).unwrap_or(10_000.0),
        rotary_dim: meta.usize(&key("rope.dimension_count")).unwrap_or(head_dim),
        rope_scaling: rope_scaling(meta, &arch)?,
        rope_interleaved: interleaved,
        fused_gate_up: !meta.has_tensor("blk.0.ffn_gate.weight"),
        sandwich_norms: meta.has_tensor("blk.0.post_attention_norm.weight"),
        tie_word_embeddings: !meta.has_tensor("output.weight"),
        max_context: meta.usize(&key("context_length")).unwrap_or(4096),
    };
    cfg.validate().map_err(|m| meta.err(m))?;
    Ok(cfg)
}

fn rope_scaling(meta: &Meta, arch: &str) -> Result<RopeScaling, ModelError> {
    match meta.string(&format!("{arch}.rope.scaling.type")).as_deref() {
        None | Some("none") => Ok(RopeScaling::None),
        Some("linear") => {
            let f = meta
                .num(&format!("{arch}.rope.scaling.factor"))
                .unwrap_or(1.0);
            Ok(RopeScaling::Linear(f))
        }
        Some(other) => Err(meta.err(format!(
            "unsupported rope scaling {other} (supported: none, linear, llama3)"
        ))),
    }
}

/// Transformers tensor names -> llama.cpp names.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.norm" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_self_attn_layernorm" => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "post_mlp_layernorm" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

struct GgufWeights<'a> {
    content: &'a Content,
    reader: &'a RefCell<BufReader<File>>,
    path: &'a Path,
    device: Device,
    dtype: DType,
    /// Run covered block types on our kernels.
    blocks: bool,
    /// Our kernels quantize activations to 8 bits (`Quantized` mode; `Auto` keeps float32).
    int8: bool,
    /// `Quantized` or `Dequantized`: how the other tensors run.
    fallback: GgufMode,
}

/// How one weight matrix is held.
enum Held {
    Blocks(QWeight),
    Quantized(QTensor),
    Dense(Tensor),
}

impl GgufWeights<'_> {
    fn name(&self, hf: &str, suffix: &str) -> Result<String, ModelError> {
        gguf_name(hf)
            .map(|n| format!("{n}.{suffix}"))
            .ok_or_else(|| {
                ModelError::load(self.path, format!("no GGUF tensor corresponds to {hf}"))
            })
    }

    fn qtensor(&self, name: &str, shape: Option<&[usize]>) -> Result<QTensor, ModelError> {
        let mut reader = self.reader.borrow_mut();
        let t = self
            .content
            .tensor(&mut *reader, name, &self.device)
            .map_err(|e| ModelError::load(self.path, format!("tensor {name}: {e}")))?;
        if let Some(shape) = shape {
            if t.shape().dims() != shape {
                return Err(ModelError::load(
                    self.path,
                    format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        t.shape().dims()
                    ),
                ));
            }
        }
        Ok(t)
    }

    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.qtensor(name, Some(shape))?;
        Ok(t.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }
}

fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

impl GgufWeights<'_> {
    /// A 2-D weight as our kernels' blocks, candle's quantized tensor, or a dense tensor.
    fn held(&self, name: &str, shape: &[usize]) -> Result<Held, ModelError> {
        let t = self.qtensor(name, Some(shape))?;
        if self.blocks {
            if let Some(w) = QWeight::from_qtensor(&t)? {
                return Ok(Held::Blocks(w.with_int8_activations(self.int8)));
            }
        }
        let quantizable = !is_float(t.dtype()) && shape[1].is_multiple_of(t.dtype().block_size());
        if self.fallback == GgufMode::Quantized && quantizable {
            return Ok(Held::Quantized(t));
        }
        Ok(Held::Dense(
            t.dequantize(&self.device)?.to_dtype(self.dtype)?,
        ))
    }
}

impl Weights for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.dense(&self.name(name, "weight")?, shape)
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError> {
        let weight = self.name(name, "weight")?;
        let bias = self.name(name, "bias")?;
        let bias = self
            .content
            .tensor_infos
            .contains_key(&bias)
            .then(|| self.dense(&bias, &[out_dim]))
            .transpose()?;
        Ok(match self.held(&weight, &[out_dim, in_dim])? {
            Held::Blocks(w) => Linear::blocks(Arc::new(w), bias),
            Held::Quantized(t) => Linear::quantized(Arc::new(t), bias)?,
            Held::Dense(t) => Linear::dense(t, bias),
        })
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        let name = self.name(name, "weight")?;
        Ok(match self.held(&name, &[vocab, hidden])? {
            Held::Blocks(w) => Embedding::Blocks(Arc::new(w)),
            Held::Quantized(t) => Embedding::Quantized(Arc::new(t)),
            Held::Dense(t) => Embedding::Dense(t),
        })
    }

    fn on_device(&self, device: &Device) -> Result<Box<dyn Weights + '_>, ModelError> {
        Ok(Box::new(GgufWeights {
            device: device.clone(),
            // Our block kernels are CPU code.
            blocks: self.blocks && device.is_cpu(),
            ..*self
        }))
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|n| {
            self.content
                .tensor_infos
                .contains_key(&format!("{n}.weight"))
        })
    }
}

pub(crate) mod tokenizer;

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn maps_transformers_names_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj").as_deref(),
            Some("blk.3.attn_q")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.gate_up_proj").as_deref(),
            Some("blk.0.ffn_up")
        );
        assert_eq!(
            gguf_name("model.layers.1.post_mlp_layernorm").as_deref(),
            Some("blk.1.post_ffw_norm")
        );
        assert_eq!(gguf_name("lm_head").as_deref(), Some("output"));
        assert_eq!(gguf_name("model.layers.1.unknown"), None);
    }
}
