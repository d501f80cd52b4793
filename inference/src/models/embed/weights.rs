//! Reading a checkpoint's tensors by name, whatever the file layout (one safetensors file, sharded
//! safetensors, or a torch pickle), with errors that name the file and the missing or misshapen tensor.
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{pickle::PthTensors, DType, Device, Shape, Tensor};

use crate::models::{ModelDir, ModelError};

enum Store {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

/// The tensors of one checkpoint, loaded on demand as `dtype` on `device`.
pub struct Checkpoint {
    /// File named in errors (the single file, or the shard index).
    file: PathBuf,
    store: Store,
    /// Prepended to every name asked for, e.g. `bert.` when the checkpoint was saved from a
    /// `BertForMaskedLM`-style wrapper.
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Checkpoint {
    /// Open the model weights of a Hugging Face folder: `model.safetensors`, then the shards listed in
    /// `model.safetensors.index.json`, then `pytorch_model.bin`.
    pub fn open_model(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(&single, dtype, device);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let shards = ModelDir::new(dir).safetensors_files()?;
            // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them not
            // being truncated while the server runs.
            let st = unsafe { MmapedSafetensors::multi(&shards) }
                .map_err(|e| ModelError::load(&index, format!("cannot read shards: {e}")))?;
            return Ok(Self::new(index, Store::Safetensors(st), dtype, device));
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Self::open(&bin, dtype, device);
        }
        Err(ModelError::load(
            dir,
            "no weights found: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
        ))
    }

    /// Open one weights file; `.safetensors` is memory-mapped, anything else is read as a torch pickle.
    pub fn open(file: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let store = if file.extension().is_some_and(|e| e == "safetensors") {
            // SAFETY: read-only mapping, see `open_model`.
            let st = unsafe { MmapedSafetensors::new(file) }
                .map_err(|e| ModelError::load(file, format!("cannot read safetensors: {e}")))?;
            Store::Safetensors(st)
        } else {
            let pth = PthTensors::new(file, None).map_err(|e| {
                ModelError::load(file, format!("cannot read torch checkpoint: {e}"))
            })?;
            Store::Pth(pth)
        };
        Ok(Self::new(file.to_path_buf(), store, dtype, device))
    }

    fn new(file: PathBuf, store: Store, dtype: DType, device: &Device) -> Self {
        Self {
            file,
            store,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn names(&self) -> Vec<String> {
        match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(name, _)| name).collect(),
            Store::Pth(pth) => pth.tensor_infos().keys().cloned().collect(),
        }
    }

    /// Real checkpoints store encoder tensors with or without a wrapper prefix (`bert.`, `ernie.`,
    /// `roberta.`); find it from where `anchor` (e.g. `embeddings.word_embeddings.weight`) lives.
    pub fn detect_prefix(&mut self, anchor: &str) -> Result<(), ModelError> {
        let names = self.names();
        let found = names
            .iter()
            .filter_map(|n| n.strip_suffix(anchor))
            .min_by_key(|p| p.len());
        match found {
            Some(prefix) if prefix.is_empty() || prefix.ends_with('.') => {
                self.prefix = prefix.to_string();
                Ok(())
            }
            _ => Err(ModelError::load(
                &self.file,
                format!("missing tensor `{anchor}` (with or without a model prefix)"),
            )),
        }
    }

    /// Whether `name` (after the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        match &self.store {
            Store::Safetensors(st) => st.get(&full).is_ok(),
            Store::Pth(pth) => pth.tensor_infos().contains_key(&full),
        }
    }

    /// Names of the LayerNorm at `prefix`: `(weight, bias)`, or `(gamma, beta)` as old
    /// TF-converted checkpoints call them.
    pub fn norm_names(&self, prefix: &str) -> (String, String) {
        let old = !self.contains(&format!("{prefix}.weight"))
            && self.contains(&format!("{prefix}.gamma"));
        let (w, b) = if old {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        (format!("{prefix}.{w}"), format!("{prefix}.{b}"))
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor, ModelError> {
        let shape = shape.into();
        let t = self.get_any(name)?;
        if t.shape() != &shape {
            return Err(ModelError::load(
                &self.file,
                format!(
                    "tensor `{}{name}` has shape {:?}, expected {:?}",
                    self.prefix,
                    t.dims(),
                    shape.dims()
                ),
            ));
        }
        Ok(t)
    }

    /// The tensor `name`, whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor, ModelError> {
        let full = format!("{}{name}", self.prefix);
        let bad = |e: candle_core::Error| {
            ModelError::load(&self.file, format!("cannot read tensor `{full}`: {e}"))
        };
        let missing = || ModelError::load(&self.file, format!("missing tensor `{full}`"));
        let t = match &self.store {
            Store::Safetensors(st) => {
                let view = st.get(&full).map_err(|_| missing())?;
                candle_core::safetensors::Load::load(&view, &self.device).map_err(bad)?
            }
            Store::Pth(pth) => pth
                .get(&full)
                .map_err(bad)?
                .ok_or_else(missing)?
                .to_device(&self.device)
                .map_err(bad)?,
        };
        t.to_dtype(self.dtype).map_err(bad)
    }
}
