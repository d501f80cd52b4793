//! glm-inference: an OpenAI-compatible server for GLM-4, DeepSeek and embedding models.
//!
//! Where a request goes:
//! - `http/`     axum routes, request/response types, validation, the OpenAI error envelope;
//!   knows nothing of tensors.
//! - `registry`  served model name -> loaded model (embedding or chat), built from `--model NAME=PATH`.
//! - `embedding` the embedding service: tokenize -> queue -> post-process, keywords, warm-up.
//! - `batcher`   embeddings: token-budget dynamic batching, admission control, cancellation.
//! - `engine/`   chat: queue, scheduler, sampling, stop strings, streaming detokenizer, templates.
//! - `models/`   one module per model family (candle); traits `Embedder` and `CausalLM`.
//! - `keyword`   KeyBERT-style keyword extraction over an embedder.
//! - `metrics`   Prometheus registry (`glm_*`).
//! - `server`    the accept loop: connection limit, header/write timeouts, shutdown deadline.
//! - `liveness`  whether worker threads still run (`/ready`, `/health`).
pub mod batcher;
pub mod config;
pub mod embedding;
pub mod engine;
pub mod error;
pub mod http;
pub use glm_kernels as kernels;
pub mod keyword;
pub mod liveness;
pub mod metrics;
pub mod models;
pub mod registry;
pub mod server;
pub mod tokenizer;
