//! The embedding service (after TEI's `core/src/infer.rs` and `core/src/tokenization.rs`): one
//! place owns tokenize -> queue -> post-process for `/v1/embeddings`, `/embedding`, `/keyword`
//! and warm-up. Handlers only convert wire types; errors are [`EmbedError`], which the HTTP layer
//! maps once.
mod input;
mod keywords;

use std::sync::Arc;

use tokenizers::Tokenizer;

pub use input::{Input, Tokenized};

use crate::batcher::{BatchError, Batcher, BatcherConfig};
use crate::keyword::KeywordError;
use crate::metrics::Metrics;
use crate::models::{EmbedOutputs, EmbedderInfo, Embedding, LoadedEmbedder};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// `input`: which input (None when the request had one); `exact` false when the text was
    /// tokenized only far enough to know it has more than `tokens`.
    #[error("input has {tokens} tokens, more than the {limit} of `{model}`")]
    TooLong {
        input: Option<usize>,
        model: String,
        tokens: usize,
        exact: bool,
        limit: usize,
    },
    #[error("cannot be tokenized: {message}")]
    Untokenizable {
        input: Option<usize>,
        message: String,
    },
    /// `position`: the id's place within its input.
    #[error("token id {id} is outside the vocabulary of `{model}` (0..{vocab})")]
    InvalidTokenId {
        input: Option<usize>,
        position: usize,
        model: String,
        id: u32,
        vocab: usize,
    },
    #[error("must be at least 1")]
    ZeroDimensions,
    #[error("{requested} is more than the {available} dimensions of `{model}`")]
    TooManyDimensions {
        model: String,
        requested: usize,
        available: usize,
    },
    #[error("`{0}` has no sparse (lexical) head")]
    NoSparseHead(String),
    #[error("`{0}` has no ColBERT head")]
    NoColbertHead(String),
    #[error(transparent)]
    Keyword(#[from] KeywordError),
    /// The queue refused the inputs or the model failed on them.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// A warm-up answer that does not match the model's declared shape.
    #[error("returned {got} dimensions, the model declares {declared}")]
    WrongDimensions { got: usize, declared: usize },
    /// A blocking task (tokenization, keyword planning) panicked or was cancelled.
    #[error("{what} failed: {message}")]
    Task { what: &'static str, message: String },
}

/// What one embeddings request asks for.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub inputs: Vec<Input>,
    /// Cut over-long inputs at the model's limit instead of refusing them.
    pub truncate: bool,
    pub outputs: EmbedOutputs,
    /// OpenAI's `dimensions`: keep this many leading components, normalised again.
    pub dimensions: Option<usize>,
}

/// The answer: one embedding per input, in order, and the tokens they took.
#[derive(Debug)]
pub struct Embedded {
    pub embeddings: Vec<Embedding>,
    /// Tokens over all inputs, special tokens included (`usage.prompt_tokens`).
    pub prompt_tokens: usize,
}

/// An embedding model ready to serve: its tokenizer and its batching queue.
pub struct EmbeddingService {
    pub name: String,
    pub info: EmbedderInfo,
    pub tokenizer: Arc<Tokenizer>,
    /// Ids below this are valid token-id inputs (tokenizer vocabulary with added tokens).
    pub vocab_size: usize,
    pub batcher: Batcher,
}

impl EmbeddingService {
    pub fn new(
        name: &str,
        loaded: LoadedEmbedder,
        config: BatcherConfig,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let info = loaded.embedder.info().clone();
        // An id the tokenizer knows but the embedding table lacks would fail inside the model.
        let vocab_size = loaded.tokenizer.get_vocab_size(true).min(info.vocab_size);
        let batcher = Batcher::new(name, loaded.embedder, config, metrics)?;
        Ok(EmbeddingService {
            name: name.to_string(),
            info,
            tokenizer: Arc::new(loaded.tokenizer),
            vocab_size,
            batcher,
        })
    }

    /// Check what the request asks of the model, tokenize, embed through the queue, shorten.
    pub async fn embed_pooled(self: &Arc<Self>, req: EmbedRequest) -> Result<Embedded, EmbedError> {
        let dimensions = self.check_dimensions(req.dimensions)?;
        self.check_outputs(req.outputs)?;
        let tokenized = self.encode_inputs(req.inputs, req.truncate).await?;
        let mut embeddings = self.batcher.embed(tokenized.ids, req.outputs).await?;
        if let Some(d) = dimensions {
            for e in &mut embeddings {
                shorten(&mut e.dense, d);
            }
        }
        Ok(Embedded {
            embeddings,
            prompt_tokens: tokenized.tokens,
        })
    }

    /// Embed `texts` (truncated at the model's limit) through the queue `chunk` inputs at a time,
    /// so that one caller never holds more than `chunk` places of the queue others share.
    pub async fn embed_texts(
        self: &Arc<Self>,
        texts: Vec<String>,
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let inputs = texts.into_iter().map(Input::Text).collect();
        let tokenized = self.encode_inputs(inputs, true).await?;
        let mut out = Vec::with_capacity(tokenized.ids.len());
        let mut ids = tokenized.ids.into_iter().peekable();
        while ids.peek().is_some() {
            let part: Vec<Vec<u32>> = ids.by_ref().take(chunk.max(1)).collect();
            let embedded = self.batcher.embed(part, EmbedOutputs::default()).await?;
            out.extend(embedded.into_iter().map(|e| e.dense));
        }
        Ok(out)
    }

    /// Run one tiny input through the whole path, so that the first client does not pay for lazy
    /// initialisation, and check the model answers with the dimensions it declares.
    pub async fn warm_up(self: &Arc<Self>) -> Result<(), EmbedError> {
        let out = self.embed_texts(vec!["warm up".into()], 1).await?;
        let got = out.first().map_or(0, Vec::len);
        if got != self.info.dimensions {
            return Err(EmbedError::WrongDimensions {
                got,
                declared: self.info.dimensions,
            });
        }
        Ok(())
    }

    fn check_dimensions(&self, dimensions: Option<usize>) -> Result<Option<usize>, EmbedError> {
        match dimensions {
            Some(0) => Err(EmbedError::ZeroDimensions),
            Some(d) if d > self.info.dimensions => Err(EmbedError::TooManyDimensions {
                model: self.name.clone(),
                requested: d,
                available: self.info.dimensions,
            }),
            other => Ok(other),
        }
    }

    fn check_outputs(&self, outputs: EmbedOutputs) -> Result<(), EmbedError> {
        if outputs.sparse && !self.info.sparse {
            return Err(EmbedError::NoSparseHead(self.name.clone()));
        }
        if outputs.colbert && !self.info.colbert {
            return Err(EmbedError::NoColbertHead(self.name.clone()));
        }
        Ok(())
    }
}

/// Run CPU work (tokenization, keyword planning and selection) off the async workers.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EmbedError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EmbedError::Task {
            what,
            message: e.to_string(),
        })
}

/// OpenAI's `dimensions`: keep the first `d` components and L2-normalise again.
fn shorten(v: &mut Vec<f32>, d: usize) {
    v.truncate(d);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shortened(mut v: Vec<f32>, d: usize) -> Vec<f32> {
        shorten(&mut v, d);
        v
    }

    #[test]
    fn shortening_renormalises() {
        let v = shortened(vec![3.0, 4.0, 12.0], 2);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(
            shortened(vec![0.0, 0.0, 1.0], 2),
            vec![0.0, 0.0],
            "zero vector stays zero, no NaN"
        );
    }
}
