//! Encoder families for embeddings: BERT, ERNIE 3.0 and XLM-RoBERTa (+ bge-m3's sparse and ColBERT
//! heads), all one post-LayerNorm [`encoder::Encoder`] with a family-specific embeddings layer,
//! followed by sentence-transformers pooling.
pub mod bge_m3;
mod config;
pub mod encoder;
mod fast;
pub mod pooling;
mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::DType;

use self::bge_m3::M3Heads;
use self::config::EncoderConfig;
use self::encoder::{Encoder, Flavour, Positions};
use self::pooling::Pooling;
use self::weights::Checkpoint;
use super::dir::{ModelDir, SpecialToken, TokenizerConfig};
use super::{
    Device, EmbedOutputs, Embedder, EmbedderInfo, Embedding, Family, LoadedEmbedder, ModelError,
};
use crate::tokenizer::load_tokenizer;

/// How an encoder's transformer layers run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncoderKernels {
    /// On the CPU, tokens packed without padding through our float32 kernels ([`fast`]); on
    /// GPUs, candle's ops.
    #[default]
    Packed,
    /// candle's tensor ops on padded batches everywhere (the path GPUs take).
    Candle,
}

impl std::str::FromStr for EncoderKernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "packed" => Ok(EncoderKernels::Packed),
            "candle" => Ok(EncoderKernels::Candle),
            other => Err(format!("`{other}` is not one of packed, candle")),
        }
    }
}

/// Load an embedding model folder (Hugging Face snapshot) of the given family.
pub fn load(path: &Path, family: Family, device: &Device) -> Result<LoadedEmbedder, ModelError> {
    load_with(path, family, device, EncoderKernels::default())
}

/// [`load`] with the encoder layers on the given kernels.
pub fn load_with(
    path: &Path,
    family: Family,
    device: &Device,
    kernels: EncoderKernels,
) -> Result<LoadedEmbedder, ModelError> {
    let (name, flavour) = family_flavour(path, family)?;
    let cfg = EncoderConfig::from_dir(path)?;
    let tokenizer = load_tokenizer(path)?;
    let encoder = open_encoder(path, &cfg, flavour, device, kernels)?;
    let pooling = Pooling::from_dir(path, cfg.hidden_size)?;
    let heads = match family {
        Family::XlmRoberta => Some(M3Heads::load(
            path,
            cfg.hidden_size,
            special_ids(path, &tokenizer),
            device,
        )?),
        _ => None,
    };
    let info = EmbedderInfo {
        family: name,
        dimensions: pooling.dimensions(cfg.hidden_size),
        vocab_size: cfg.vocab_size,
        max_input_tokens: max_input_tokens(path, encoder.capacity())?,
        sparse: heads.as_ref().is_some_and(|h| h.sparse.is_some()),
        colbert: heads.as_ref().is_some_and(|h| h.colbert.is_some()),
    };
    tracing::info!(path = %path.display(), family = name, dims = info.dimensions, max_tokens = info.max_input_tokens,
        pooling = ?pooling.modes, normalize = pooling.normalize, sparse = info.sparse, colbert = info.colbert, "embedding model loaded");
    let embedder = EncoderEmbedder {
        info,
        encoder,
        pooling,
        heads,
    };
    Ok(LoadedEmbedder {
        embedder: Arc::new(embedder),
        tokenizer,
    })
}

/// Load only the encoder of a folder (its last hidden states, without pooling or heads): for
/// parity checks against transformers' `last_hidden_state`.
pub fn load_encoder(
    path: &Path,
    family: Family,
    device: &Device,
    kernels: EncoderKernels,
) -> Result<Encoder, ModelError> {
    let (_, flavour) = family_flavour(path, family)?;
    open_encoder(
        path,
        &EncoderConfig::from_dir(path)?,
        flavour,
        device,
        kernels,
    )
}

fn family_flavour(path: &Path, family: Family) -> Result<(&'static str, Flavour), ModelError> {
    Ok(match family {
        Family::Bert => (
            "bert",
            Flavour {
                positions: Positions::FromZero,
                task_type: false,
            },
        ),
        Family::Ernie => (
            "ernie",
            Flavour {
                positions: Positions::FromZero,
                task_type: true,
            },
        ),
        Family::XlmRoberta => (
            "xlm-roberta",
            Flavour {
                positions: Positions::AfterPadding,
                task_type: false,
            },
        ),
        other => {
            return Err(ModelError::load(
                path,
                format!("{other:?} is not an embedding model family"),
            ))
        }
    })
}

fn open_encoder(
    path: &Path,
    cfg: &EncoderConfig,
    flavour: Flavour,
    device: &Device,
    kernels: EncoderKernels,
) -> Result<Encoder, ModelError> {
    // ERNIE checkpoints without `use_task_id` have no task-type table.
    let flavour = Flavour {
        task_type: flavour.task_type && cfg.use_task_id,
        ..flavour
    };
    let mut weights = Checkpoint::open_model(path, DType::F32, device)?;
    weights.detect_prefix("embeddings.word_embeddings.weight")?;
    Encoder::load(cfg, &weights, flavour, kernels)
}

/// sentence-transformers' `max_seq_length`, else the tokenizer's `model_max_length`, never more
/// than the position table holds.
fn max_input_tokens(dir: &Path, capacity: usize) -> Result<usize, ModelError> {
    let configured = match pooling::max_seq_length(dir)? {
        Some(n) => Some(n),
        None => tokenizer_config(dir).model_max_length().map(|n| n as usize),
    };
    Ok(configured.map_or(capacity, |n| n.min(capacity)))
}

/// A `tokenizer_config.json` that cannot be read counts as absent: its keys only refine defaults.
fn tokenizer_config(dir: &Path) -> TokenizerConfig {
    ModelDir::new(dir).tokenizer_config().unwrap_or_default()
}

/// Ids of the CLS, EOS, PAD and UNK tokens (FlagEmbedding drops them from lexical weights), named
/// as `tokenizer_config.json` names them, XLM-R's defaults otherwise.
fn special_ids(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let cfg = tokenizer_config(dir);
    [
        (SpecialToken::Cls, "<s>"),
        (SpecialToken::Eos, "</s>"),
        (SpecialToken::Pad, "<pad>"),
        (SpecialToken::Unk, "<unk>"),
    ]
    .into_iter()
    .filter_map(|(which, default)| tokenizer.token_to_id(cfg.token(which).unwrap_or(default)))
    .collect()
}

/// Any encoder family plus its pooling and optional bge-m3 heads.
struct EncoderEmbedder {
    info: EmbedderInfo,
    encoder: Encoder,
    pooling: Pooling,
    heads: Option<M3Heads>,
}

impl EncoderEmbedder {
    fn check_outputs(&self, outputs: EmbedOutputs) -> Result<(), ModelError> {
        if outputs.sparse && !self.info.sparse {
            return Err(ModelError::Unsupported(format!(
                "{} model has no sparse (lexical) head",
                self.info.family
            )));
        }
        if outputs.colbert && !self.info.colbert {
            return Err(ModelError::Unsupported(format!(
                "{} model has no ColBERT head",
                self.info.family
            )));
        }
        Ok(())
    }
}

impl Embedder for EncoderEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn embed(&self, batch: &[&[u32]], outputs: EmbedOutputs) -> Result<Vec<Embedding>, ModelError> {
        self.check_outputs(outputs)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Inputs sorted by length and run in chunks of similar lengths, so that few padding slots
        // are computed (sentence-transformers sorts by length too); results go back in input order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].len());
        let sorted: Vec<&[u32]> = order.iter().map(|&i| batch[i]).collect();
        let lens: Vec<usize> = sorted.iter().map(|ids| ids.len()).collect();
        let mut out: Vec<Option<Embedding>> = vec![None; batch.len()];
        // Packed CPU layers compute no padding: one pass over everything.
        let chunks = if self.encoder.pads() {
            length_chunks(&lens)
        } else {
            std::iter::once(0..lens.len()).collect()
        };
        for range in chunks {
            let embedded = self.embed_sorted(&sorted[range.clone()], outputs)?;
            for (slot, emb) in order[range].iter().zip(embedded) {
                out[*slot] = Some(emb);
            }
        }
        out.into_iter()
            .map(|e| e.ok_or_else(|| ModelError::Unsupported("an input was not embedded".into())))
            .collect()
    }
}

/// Padding allowed in a chunk: padded tokens may exceed real tokens by this fraction, plus
/// [`PAD_SLACK`] tokens (a chunk's fixed cost is worth a little padding).
const PAD_FRACTION: f64 = 0.15;
const PAD_SLACK: usize = 32;

/// Split lengths sorted ascending into consecutive chunks whose padded size stays within
/// [`PAD_FRACTION`] + [`PAD_SLACK`] of their real size.
fn length_chunks(lens: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut real) = (0, 0usize);
    for (i, &len) in lens.iter().enumerate() {
        let padded = (i - start + 1) * len;
        let budget = ((real + len) as f64 * (1.0 + PAD_FRACTION)) as usize + PAD_SLACK;
        if i > start && padded > budget {
            chunks.push(start..i);
            start = i;
            real = 0;
        }
        real += len;
    }
    if start < lens.len() {
        chunks.push(start..lens.len());
    }
    chunks
}

impl EncoderEmbedder {
    /// One forward pass over inputs of similar lengths.
    fn embed_sorted(
        &self,
        batch: &[&[u32]],
        outputs: EmbedOutputs,
    ) -> Result<Vec<Embedding>, ModelError> {
        let (states, shape) = self.encoder.forward(batch)?;
        let dense = self
            .pooling
            .forward(&states, &shape.lens)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let heads = self.heads.as_ref();
        let sparse: Vec<Option<_>> = match heads
            .and_then(|h| h.sparse.as_ref())
            .filter(|_| outputs.sparse)
        {
            Some(head) => head
                .forward(&states, batch)?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; batch.len()],
        };
        let colbert: Vec<Option<_>> = match heads
            .and_then(|h| h.colbert.as_ref())
            .filter(|_| outputs.colbert)
        {
            Some(head) => bge_m3::colbert(head, &states, &shape.lens)?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; batch.len()],
        };
        Ok(dense
            .into_iter()
            .zip(sparse)
            .zip(colbert)
            .map(|((dense, sparse), colbert)| Embedding {
                dense,
                sparse,
                colbert,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::length_chunks;

    #[test]
    fn similar_lengths_share_a_chunk_and_outliers_get_their_own() {
        assert_eq!(length_chunks(&[5, 6, 7, 8]), vec![0..4]);
        assert_eq!(
            length_chunks(&[4, 4, 4, 4, 4, 4, 4, 4, 200]),
            vec![0..8, 8..9]
        );
        assert_eq!(length_chunks(&[7]), vec![0..1]);
        assert!(length_chunks(&[]).is_empty());
        // Every input lands in exactly one chunk, in order.
        let lens: Vec<usize> = (1..300).map(|i| i / 3 + 1).collect();
        let chunks = length_chunks(&lens);
        assert_eq!(chunks.first().unwrap().start, 0);
        assert_eq!(chunks.last().unwrap().end, lens.len());
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
    }
}
