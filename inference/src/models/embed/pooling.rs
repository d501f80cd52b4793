//! Sentence pooling as sentence-transformers configures it: `modules.json` lists the modules,
//! `1_Pooling/config.json` the pooling modes, a `Normalize` module L2-normalises the result.
use std::path::Path;

use candle_core::{Tensor, D};
use serde::Deserialize;

use crate::models::{read_json, ModelError};

/// One pooling mode; several may be enabled, their vectors are concatenated in this order (the
/// order of sentence-transformers' `Pooling.forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Cls,
    Max,
    Mean,
    MeanSqrtLen,
    LastToken,
}

/// How token states become one sentence vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooling {
    pub modes: Vec<PoolMode>,
    pub normalize: bool,
}

impl Default for Pooling {
    /// transformers-only folders: mean pooling, as sentence-transformers does when it wraps them.
    fn default() -> Self {
        Self {
            modes: vec![PoolMode::Mean],
            normalize: false,
        }
    }
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PoolingFile {
    word_embedding_dimension: Option<usize>,
    pooling_mode: Option<String>,
    pooling_mode_cls_token: bool,
    pooling_mode_max_tokens: bool,
    pooling_mode_mean_tokens: bool,
    pooling_mode_mean_sqrt_len_tokens: bool,
    pooling_mode_weightedmean_tokens: bool,
    pooling_mode_lasttoken: bool,
}

impl Pooling {
    /// Read a folder's sentence-transformers pipeline; `hidden` is the encoder width it must match.
    pub fn from_dir(dir: &Path, hidden: usize) -> Result<Self, ModelError> {
        let modules_file = dir.join("modules.json");
        if !modules_file.is_file() {
            return Ok(Self::default());
        }
        let modules: Vec<Module> = read_json(&modules_file)?;
        let mut pooling = None;
        let mut normalize = false;
        for m in &modules {
            match m.kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" if m.path.is_empty() => {}
                "Pooling" => pooling = Some(Self::read_modes(&dir.join(&m.path).join("config.json"), hidden)?),
                "Normalize" => normalize = true,
                _ => {
                    return Err(ModelError::load(
                        &modules_file,
                        format!("unsupported sentence-transformers module `{}` at `{}` (supported: Transformer at the folder root, Pooling, Normalize)", m.kind, m.path),
                    ))
                }
            }
        }
        let modes =
            pooling.ok_or_else(|| ModelError::load(&modules_file, "lists no Pooling module"))?;
        Ok(Self { modes, normalize })
    }

    fn read_modes(file: &Path, hidden: usize) -> Result<Vec<PoolMode>, ModelError> {
        let cfg: PoolingFile = read_json(file)?;
        if let Some(dim) = cfg.word_embedding_dimension.filter(|&d| d != hidden) {
            return Err(ModelError::load(
                file,
                format!(
                    "word_embedding_dimension {dim} differs from the model's hidden_size {hidden}"
                ),
            ));
        }
        if cfg.pooling_mode_weightedmean_tokens {
            return Err(ModelError::load(
                file,
                "weightedmean pooling is not supported",
            ));
        }
        let modes: Vec<PoolMode> = match cfg.pooling_mode.as_deref() {
            Some(name) => vec![match name {
                "cls" => PoolMode::Cls,
                "max" => PoolMode::Max,
                "mean" => PoolMode::Mean,
                "mean_sqrt_len_tokens" => PoolMode::MeanSqrtLen,
                "lasttoken" => PoolMode::LastToken,
                other => {
                    return Err(ModelError::load(
                        file,
                        format!("unsupported pooling_mode `{other}`"),
                    ))
                }
            }],
            None => [
                (cfg.pooling_mode_cls_token, PoolMode::Cls),
                (cfg.pooling_mode_max_tokens, PoolMode::Max),
                (cfg.pooling_mode_mean_tokens, PoolMode::Mean),
                (cfg.pooling_mode_mean_sqrt_len_tokens, PoolMode::MeanSqrtLen),
                (cfg.pooling_mode_lasttoken, PoolMode::LastToken),
            ]
            .into_iter()
            .filter_map(|(on, mode)| on.then_some(mode))
            .collect(),
        };
        if modes.is_empty() {
            return Err(ModelError::load(file, "enables no pooling mode"));
        }
        Ok(modes)
    }

    /// Length of the pooled vector for an encoder of width `hidden`.
    pub fn dimensions(&self, hidden: usize) -> usize {
        hidden * self.modes.len()
    }

    /// Pool the rows of `states` [batch, width, hidden] whose real lengths are `lens`: [batch, dims].
    pub fn forward(&self, states: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let rows = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                // Only the row's real tokens: padding never enters a sentence vector.
                let tokens = states.get(i)?.narrow(0, 0, len)?;
                let parts = self
                    .modes
                    .iter()
                    .map(|mode| pool(&tokens, *mode))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// One mode over one row's tokens [len, hidden] -> [hidden].
fn pool(tokens: &Tensor, mode: PoolMode) -> candle_core::Result<Tensor> {
    let len = tokens.dim(0)?;
    match mode {
        PoolMode::Cls => tokens.get(0),
        PoolMode::Max => tokens.max(0),
        PoolMode::Mean => tokens.mean(0),
        PoolMode::MeanSqrtLen => tokens.sum(0)? / (len as f64).sqrt(),
        PoolMode::LastToken => tokens.get(len - 1),
    }
}

/// Divide each row of a [rows, dims] tensor by its L2 norm (floored at 1e-12, as torch's
/// `F.normalize`).
pub fn l2_normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
    let norms = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    xs.broadcast_div(&norms)
}

/// The parts of `sentence_bert_config.json` that matter here.
pub fn max_seq_length(dir: &Path) -> Result<Option<usize>, ModelError> {
    #[derive(Deserialize)]
    struct StConfig {
        max_seq_length: Option<usize>,
    }
    let file = dir.join("sentence_bert_config.json");
    if !file.is_file() {
        return Ok(None);
    }
    Ok(read_json::<StConfig>(&file)?.max_seq_length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pools_only_real_tokens() {
        // Row 0 has 2 real tokens, row 1 has 3; padding slot of row 0 holds 100s.
        let states = Tensor::new(
            &[
                [[1f32, 2.], [3., 6.], [100., 100.]],
                [[1., 1.], [2., 2.], [6., 3.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let pooled = |modes: Vec<PoolMode>| {
            Pooling {
                modes,
                normalize: false,
            }
            .forward(&states, &[2, 3])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
        };
        assert_eq!(
            pooled(vec![PoolMode::Mean]),
            vec![vec![2., 4.], vec![3., 2.]]
        );
        assert_eq!(
            pooled(vec![PoolMode::Max]),
            vec![vec![3., 6.], vec![6., 3.]]
        );
        assert_eq!(
            pooled(vec![PoolMode::LastToken]),
            vec![vec![3., 6.], vec![6., 3.]]
        );
        assert_eq!(
            pooled(vec![PoolMode::Cls, PoolMode::Mean]),
            vec![vec![1., 2., 2., 4.], vec![1., 1., 3., 2.]]
        );
        let normed = Pooling {
            modes: vec![PoolMode::Cls],
            normalize: true,
        }
        .forward(&states, &[2, 3])
        .unwrap();
        let row = normed.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (row[0] - 1. / 5f32.sqrt()).abs() < 1e-7 && (row[1] - 2. / 5f32.sqrt()).abs() < 1e-7,
            "{row:?}"
        );
    }
}
