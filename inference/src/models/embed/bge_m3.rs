//! bge-m3's two extra heads on top of the XLM-RoBERTa encoder, as FlagEmbedding's `M3Embedder` runs
//! them: lexical (sparse) weights `relu(sparse_linear(h))` and ColBERT multi-vectors
//! `normalize(colbert_linear(h[1:]))`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use super::pooling::l2_normalize;
use super::weights::Checkpoint;
use crate::models::ModelError;

/// The optional heads of a folder.
pub struct M3Heads {
    pub sparse: Option<SparseHead>,
    pub colbert: Option<Linear>,
}

/// `sparse_linear` plus the ids whose weights bge-m3 never reports (`<s> </s> <pad> <unk>`).
pub struct SparseHead {
    linear: Linear,
    skip: Vec<u32>,
}

impl M3Heads {
    /// Load `sparse_linear` / `colbert_linear` from `.safetensors`, or the `.pt` torch files that
    /// BAAI/bge-m3 ships, when present. `skip` lists the special-token ids dropped from sparse output.
    pub fn load(
        dir: &Path,
        hidden: usize,
        skip: Vec<u32>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let sparse = match head_file(dir, "sparse_linear") {
            Some(file) => Some(SparseHead {
                linear: read_linear(&file, 1, hidden, device)?,
                skip,
            }),
            None => None,
        };
        let colbert = match head_file(dir, "colbert_linear") {
            Some(file) => Some(read_linear(&file, hidden, hidden, device)?),
            None => None,
        };
        Ok(Self { sparse, colbert })
    }
}

fn head_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    ["safetensors", "pt"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
}

fn read_linear(file: &Path, out: usize, inp: usize, device: &Device) -> Result<Linear, ModelError> {
    let w = Checkpoint::open(file, DType::F32, device)?;
    Ok(Linear::new(
        w.get("weight", (out, inp))?,
        Some(w.get("bias", out)?),
    ))
}

impl SparseHead {
    /// Lexical weights of each row of `states` [batch, width, hidden]: for every distinct token id
    /// its largest weight, positive weights only, special tokens dropped; sorted by id.
    pub fn forward(
        &self,
        states: &Tensor,
        inputs: &[&[u32]],
    ) -> Result<Vec<Vec<(u32, f32)>>, ModelError> {
        let weights = self
            .linear
            .forward(states)?
            .relu()?
            .squeeze(2)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(inputs
            .iter()
            .zip(weights)
            .map(|(ids, row)| {
                let mut best: HashMap<u32, f32> = HashMap::new();
                for (&id, &w) in ids.iter().zip(&row) {
                    if w > 0.0 && !self.skip.contains(&id) {
                        let slot = best.entry(id).or_insert(w);
                        *slot = slot.max(w);
                    }
                }
                let mut out: Vec<(u32, f32)> = best.into_iter().collect();
                out.sort_unstable_by_key(|&(id, _)| id);
                out
            })
            .collect())
    }
}

/// ColBERT vectors of each row: every real token after CLS (the final `</s>` kept), L2-normalised.
pub fn colbert(
    head: &Linear,
    states: &Tensor,
    lens: &[usize],
) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    let (_, width, _) = states.dims3()?;
    if width < 2 {
        return Ok(vec![Vec::new(); lens.len()]);
    }
    let projected = head.forward(&states.narrow(1, 1, width - 1)?)?;
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let rows = projected.get(i)?.narrow(0, 0, len.saturating_sub(1))?;
            Ok(l2_normalize(&rows)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?)
        })
        .collect()
}

/// bge-m3's lexical matching score: sum of weight products over shared token ids.
pub fn lexical_score(a: &[(u32, f32)], b: &[(u32, f32)]) -> f32 {
    let b: HashMap<u32, f32> = b.iter().copied().collect();
    a.iter()
        .filter_map(|(id, wa)| b.get(id).map(|wb| wa * wb))
        .sum()
}

/// bge-m3's ColBERT score: mean over query vectors of the best dot product with any passage vector.
pub fn colbert_score(query: &[Vec<f32>], passage: &[Vec<f32>]) -> f32 {
    if query.is_empty() || passage.is_empty() {
        return 0.0;
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let total: f32 = query
        .iter()
        .map(|q| {
            passage
                .iter()
                .map(|p| dot(q, p))
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .sum();
    total / query.len() as f32
}
