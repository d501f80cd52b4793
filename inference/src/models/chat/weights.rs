//! Where decoder weights come from. The decoder asks for tensors by their transformers names
//! (`model.layers.0.self_attn.q_proj`); each source maps them to its own layout.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::dummy::{DummyBackend, DummyWeights};
use super::layers::{Embedding, Linear};
use crate::models::dir::ModelDir;
use crate::models::ModelError;

pub trait Weights {
    /// A dense tensor `{name}.weight` of the given shape, in the compute dtype.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError>;
    /// `{name}.weight` as `[out, in]`, with `{name}.bias` when the checkpoint has one.
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError>;
    /// `{name}.weight` as `[vocab, hidden]` token embeddings (dense unless the source quantizes).
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        Ok(Embedding::Dense(self.tensor(name, &[vocab, hidden])?))
    }
    /// Whether `{name}.weight` exists.
    fn contains(&self, name: &str) -> bool;
    /// The same source, creating tensors on `device` (layers split across GPUs).
    fn on_device(&self, device: &Device) -> Result<Box<dyn Weights + '_>, ModelError>;
}

/// A Hugging Face snapshot: `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`, memory-mapped; or random weights (`--load-format dummy`).
pub struct SafetensorsWeights {
    vb: VarBuilder<'static>,
    dir: PathBuf,
    source: Source,
}

#[derive(Clone)]
enum Source {
    Files(Vec<PathBuf>),
    Dummy(Arc<DummyWeights>),
}

impl SafetensorsWeights {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let files = ModelDir::new(dir).safetensors_files()?;
        Self::from_source(dir, Source::Files(files), dtype, device)
    }

    /// Random weights of whatever shapes are asked for.
    pub fn dummy(weights: DummyWeights, dtype: DType, device: &Device) -> Self {
        let source = Source::Dummy(Arc::new(weights));
        let vb = Self::dummy_vb(&source, dtype, device);
        SafetensorsWeights {
            vb,
            dir: PathBuf::from("<dummy weights>"),
            source,
        }
    }

    fn dummy_vb(source: &Source, dtype: DType, device: &Device) -> VarBuilder<'static> {
        match source {
            Source::Dummy(w) => {
                VarBuilder::from_backend(Box::new(DummyBackend(w.clone())), dtype, device.clone())
            }
            Source::Files(_) => unreachable!("only called for dummy sources"),
        }
    }

    fn from_source(
        dir: &Path,
        source: Source,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = match &source {
            // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely
            // on them not being truncated while the server runs.
            Source::Files(files) => {
                unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
                    .map_err(|e| ModelError::load(dir, format!("cannot read safetensors: {e}")))?
            }
            Source::Dummy(_) => Self::dummy_vb(&source, dtype, device),
        };
        Ok(SafetensorsWeights {
            vb,
            dir: dir.to_owned(),
            source,
        })
    }

    /// The same weights, loaded onto `device`.
    pub fn on(&self, device: &Device) -> Result<Self, ModelError> {
        Self::from_source(&self.dir, self.source.clone(), self.vb.dtype(), device)
    }

    /// Whether the checkpoint holds a tensor of this full name (`....weight`, `....bias`).
    pub fn has(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The tensor of this full name, checked against `shape`, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.vb.get(shape, name).map_err(|e| {
            ModelError::load(
                &self.dir,
                format!("tensor {name} (expected shape {shape:?}): {e}"),
            )
        })
    }
}

impl Weights for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.get(&format!("{name}.weight"), shape)
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError> {
        let weight = self.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let bias_name = format!("{name}.bias");
        let bias = self
            .has(&bias_name)
            .then(|| self.get(&bias_name, &[out_dim]))
            .transpose()?;
        Ok(Linear::dense(weight, bias))
    }

    fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(&format!("{name}.weight"))
    }

    fn on_device(&self, device: &Device) -> Result<Box<dyn Weights + '_>, ModelError> {
        Ok(Box::new(self.on(device)?))
    }
}
