//! Encoder families for embeddings: BERT, XLM-RoBERTa (+ bge-m3 heads), ERNIE 3.0.
use std::path::Path;

use super::{Device, Family, LoadedEmbedder, ModelError};

/// Load an embedding model folder (Hugging Face snapshot) of the given family.
pub fn load(path: &Path, family: Family, _device: &Device) -> Result<LoadedEmbedder, ModelError> {
    Err(ModelError::load(path, format!("{family:?} embedding models are not implemented yet")))
}
