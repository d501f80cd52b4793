//! Model families. Each family is our own module built from candle-nn layers; the rest of the server
//! sees them only through the [`Embedder`] and [`CausalLM`] traits.
pub mod chat;
pub mod detect;
pub mod dir;
pub mod embed;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;

pub use candle_core::{DType, Device, Tensor};
pub use detect::{detect_family, Family, ModelKind};
pub(crate) use dir::read_json;
pub use dir::ModelDir;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model folder or file that cannot be served; the message names the path and the problem.
    #[error("{}: {msg}", path.display())]
    Load { path: PathBuf, msg: String },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The caller asked for something the model cannot do (e.g. sparse output from a BERT model).
    #[error("{0}")]
    Unsupported(String),
}

impl ModelError {
    pub fn load(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        ModelError::Load {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------------

/// What an embedding model can produce and how its inputs are bounded.
#[derive(Debug, Clone)]
pub struct EmbedderInfo {
    /// Family name for logs and `/models` (e.g. "bert", "xlm-roberta", "ernie").
    pub family: &'static str,
    /// Length of the dense vector.
    pub dimensions: usize,
    /// Rows of the token embedding table: token-id inputs must be below it (and below the
    /// tokenizer's vocabulary, which a checkpoint may pad or, when broken, exceed).
    pub vocab_size: usize,
    /// Longest input in tokens, special tokens included (sentence-transformers' `max_seq_length`,
    /// capped by `max_position_embeddings`).
    pub max_input_tokens: usize,
    /// bge-m3 lexical weights available.
    pub sparse: bool,
    /// bge-m3 ColBERT multi-vectors available.
    pub colbert: bool,
}

/// Which outputs a request wants; dense is always computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbedOutputs {
    pub sparse: bool,
    pub colbert: bool,
}

/// One input's outputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embedding {
    /// Pooled (and, when the model's modules say so, L2-normalized) sentence vector.
    pub dense: Vec<f32>,
    /// bge-m3 lexical weights: (token id, weight), weight > 0, one entry per distinct token.
    pub sparse: Option<Vec<(u32, f32)>>,
    /// bge-m3 ColBERT vectors, one per token after CLS (final `</s>` kept), L2-normalized.
    pub colbert: Option<Vec<Vec<f32>>>,
}

/// An embedding model. Implementations are CPU/GPU bound and synchronous: callers run them off the
/// async runtime (see `batcher`).
pub trait Embedder: Send + Sync {
    fn info(&self) -> &EmbedderInfo;
    /// Embed a batch of tokenized inputs (special tokens already added, already within
    /// `max_input_tokens`). Implementations pad internally and must give each row the same result
    /// it would get alone (up to float rounding).
    fn embed(&self, batch: &[&[u32]], outputs: EmbedOutputs) -> Result<Vec<Embedding>, ModelError>;
}

/// An embedding model ready to serve: weights plus the tokenizer that feeds them.
pub struct LoadedEmbedder {
    pub embedder: Arc<dyn Embedder>,
    /// Tokenizer with tokenizer.json's own padding/truncation disabled (sentence-transformers
    /// truncates at `max_seq_length` itself and never pads single inputs).
    pub tokenizer: tokenizers::Tokenizer,
}

// ---------------------------------------------------------------------------------------------
// Chat (causal language models)
// ---------------------------------------------------------------------------------------------

pub use chat::kv::{BlockAllocator, SeqCache};

#[derive(Debug, Clone)]
pub struct CausalLMInfo {
    /// Family name for logs (e.g. "glm", "glm4", "qwen2", "llama", "deepseek_v3", "gguf-llama").
    pub family: &'static str,
    /// Rows of the output projection (may exceed the tokenizer's size: padded rows).
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model supports.
    pub max_context: usize,
    /// Bytes of weights on the device(s) (what a decode step reads at least once).
    pub weight_bytes: u64,
}

/// New tokens for one sequence in a batched forward pass. The tokens take positions
/// `cache.len() .. cache.len() + tokens.len()`; the forward appends their keys/values to `cache`.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// A decoder-only language model with a paged KV pool (`chat::kv`): each sequence holds a
/// [`SeqCache`] (its blocks of the pool), so that an engine can batch sequences of different lengths
/// and positions in one pass and admit only what the pool can hold.
pub trait CausalLM: Send + Sync {
    fn info(&self) -> &CausalLMInfo;
    /// The pool's block bookkeeping: caches are reserved from it.
    fn kv_blocks(&self) -> &Arc<BlockAllocator>;
    /// An empty cache with room for a whole context (or the whole pool, if smaller).
    fn new_cache(&self) -> Result<SeqCache, ModelError> {
        let blocks = self.kv_blocks();
        let tokens = self.info().max_context.min(blocks.capacity_tokens());
        blocks.try_reserve(tokens).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "the KV cache is full: {} of {} blocks are reserved",
                blocks.reserved_blocks(),
                blocks.total_blocks()
            ))
        })
    }
    /// Run one step for several sequences (prefill chunks and single decode tokens may be mixed).
    /// Returns float32 logits of each sequence's last new position, shape `[steps.len(), vocab_size]`.
    fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError>;
}

/// A chat model ready to serve: weights, tokenizer and what is needed to build prompts and stop.
pub struct LoadedChat {
    pub model: Arc<dyn CausalLM>,
    pub tokenizer: tokenizers::Tokenizer,
    /// Jinja chat template (tokenizer_config.json `chat_template`, or GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// Special token strings the template may reference (`bos_token`, `eos_token`).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (generation_config.json `eos_token_id`, which may be a list).
    pub eos_token_ids: Vec<u32>,
}
