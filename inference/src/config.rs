//! Command-line flags; every flag has an environment twin so that the same binary runs from a shell,
//! a Helm chart or the seed's `run.sh` environment (`API_PORT`, `GLM_MODEL`).
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

mod device;

pub use device::{all_devices, ByteSize, DeviceChoice, DtypeChoice};

use crate::batcher::BatcherConfig;
use crate::engine::EngineConfig;
use crate::http::{ChatLimits, Limits};
use crate::keyword::KeywordLimits;
use crate::models::Device;
use crate::server::ServeConfig;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "glm-inference",
    version,
    about = "OpenAI-compatible server for chat and embedding models"
)]
pub struct Args {
    /// A model to serve, as NAME=PATH (PATH: Hugging Face snapshot folder or .gguf file). Repeatable;
    /// the env twin is a comma-separated list.
    #[arg(
        long = "model",
        env = "GLM_MODELS",
        value_delimiter = ',',
        required = true
    )]
    pub models: Vec<ModelSpec>,

    /// Chat model used when a chat request omits `model` (the seed's GLM_MODEL); defaults to the
    /// first chat model.
    #[arg(long, env = "GLM_MODEL")]
    pub default_chat_model: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "API_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on (the seed's API_PORT).
    #[arg(long, env = "API_PORT", default_value_t = 8200)]
    pub port: u16,

    /// Require `Authorization: Bearer <key>` on every route except /health, /ready and /metrics.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Padded tokens (batch size x longest input) one embedding forward pass may take.
    #[arg(long, env = "GLM_MAX_BATCH_TOKENS", default_value_t = BatcherConfig::default().max_batch_tokens)]
    pub max_batch_tokens: usize,

    /// Inputs one embedding request may carry.
    #[arg(long, env = "GLM_MAX_CLIENT_BATCH_SIZE", default_value_t = Limits::default().max_client_batch_size)]
    pub max_client_batch_size: usize,

    /// Requests handled at once across inference routes; more are refused with 429.
    #[arg(long, env = "GLM_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Inputs waiting in one embedding model's queue; a request that does not fit is refused with 429.
    #[arg(long, env = "GLM_MAX_QUEUED_INPUTS", default_value_t = BatcherConfig::default().max_queued_inputs)]
    pub max_queued_inputs: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "GLM_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,

    /// Truncate over-long embedding inputs instead of rejecting them (per request: `"truncate": true`).
    #[arg(long, env = "GLM_AUTO_TRUNCATE", default_value_t = Limits::default().auto_truncate)]
    pub auto_truncate: bool,

    /// Chat: sequences one model's engine generates at the same time (continuous batching).
    #[arg(long, env = "GLM_CHAT_MAX_BATCH_SIZE", default_value_t = EngineConfig::default().max_batch_size)]
    pub chat_max_batch_size: usize,

    /// Chat: tokens in one forward pass (a decode token per running sequence plus prompt chunks);
    /// longer prompts are prefilled in chunks of this size.
    #[arg(long, env = "GLM_CHAT_MAX_BATCH_TOKENS", default_value_t = EngineConfig::default().max_batch_tokens)]
    pub chat_max_batch_tokens: usize,

    /// Chat: requests waiting for a batch slot per model; beyond, requests are refused with 429.
    #[arg(long, env = "GLM_CHAT_MAX_WAITING", default_value_t = EngineConfig::default().max_waiting)]
    pub chat_max_waiting: usize,

    /// GGUF chat models: `quantized` runs ggml's quantized kernels (least memory), `dequantized`
    /// expands the weights to floats at load (reference numerics, 4-8x the memory, faster where
    /// candle's kernels for the type are scalar), `auto` dequantizes when that fits in 2 GiB.
    #[arg(long, env = "GLM_GGUF_MODE", default_value = "auto")]
    pub gguf_mode: crate::models::chat::gguf::GgufMode,

    /// Chat: bytes of KV cache per chat model (all layers; suffixes KiB, MiB, GiB, KB, MB, GB
    /// accepted). Default: 90% of the memory the weights leave free on each GPU, less 1 GiB kept for
    /// activations; 2 GiB on the CPU. Requests are admitted only while their worst case (prompt plus
    /// max_tokens) fits; the others wait.
    #[arg(long, env = "GLM_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<ByteSize>,

    /// Chat: `auto` reads the checkpoint's weights; `dummy` draws random weights shaped by
    /// config.json alone (benchmarks of real shapes without downloading weights).
    #[arg(long, env = "GLM_LOAD_FORMAT", default_value = "auto")]
    pub load_format: crate::models::chat::LoadFormat,

    /// Chat compute dtype: `auto` (float32 on the CPU, bfloat16 on GPUs), `f32`, `bf16`, `f16`.
    #[arg(long, env = "GLM_DTYPE", value_enum, default_value_t = DtypeChoice::Auto)]
    pub dtype: DtypeChoice,

    /// Embedding encoders on the CPU: `packed` runs every input's tokens end to end without
    /// padding through our float32 kernels, `candle` runs padded batches on candle's ops (what
    /// GPUs always use). Same numerics within float32 rounding.
    #[arg(long, env = "GLM_EMBED_KERNELS", default_value = "packed")]
    pub embed_kernels: crate::models::embed::EncoderKernels,

    /// Seconds to keep serving (with /ready at 503) after SIGTERM before draining, so that load
    /// balancers stop sending traffic first.
    #[arg(long, env = "GLM_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,

    /// Where models run: `cuda` (the first GPU that CUDA_VISIBLE_DEVICES leaves visible; fails at
    /// start when there is none), `cpu`, or `auto` (CUDA when this build has it and a GPU opens,
    /// else the CPU, with a warning).
    #[arg(long, env = "GLM_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,

    /// Threads for model maths (matmuls, kernels); 0: the CPUs this process may use (affinity
    /// mask and cgroup CPU quota, e.g. a pod's CPU limit).
    #[arg(long, env = "GLM_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Log as JSON lines (level via RUST_LOG, default info).
    #[arg(long, env = "GLM_JSON_LOGS", default_value_t = false)]
    pub json_logs: bool,

    /// Connections open at once; beyond, new ones wait in the kernel's backlog.
    #[arg(long, env = "GLM_MAX_CONNECTIONS", default_value_t = ServeConfig::default().max_connections)]
    pub max_connections: usize,

    /// Seconds a client has to send a request's headers, counted from the connection's start or
    /// the end of its previous response (so also how long an idle keep-alive connection stays).
    #[arg(long, env = "GLM_HEADER_READ_TIMEOUT_SECS", default_value_t = ServeConfig::default().header_read_timeout.as_secs())]
    pub header_read_timeout_secs: u64,

    /// Seconds a request body may take to arrive (408 beyond).
    #[arg(long, env = "GLM_BODY_READ_TIMEOUT_SECS", default_value_t = Limits::default().body_read_timeout.as_secs())]
    pub body_read_timeout_secs: u64,

    /// Seconds a response may wait for the client to accept more bytes before the connection is
    /// closed (a client that stopped reading a stream; its generation is cancelled).
    #[arg(long, env = "GLM_WRITE_TIMEOUT_SECS", default_value_t = ServeConfig::default().write_timeout.as_secs())]
    pub write_timeout_secs: u64,

    /// Seconds open requests and streams get to finish after the shutdown delay; then they are cut.
    #[arg(long, env = "GLM_SHUTDOWN_TIMEOUT_SECS", default_value_t = ServeConfig::default().shutdown_timeout.as_secs())]
    pub shutdown_timeout_secs: u64,

    /// `/keyword` requests in flight at once (429 beyond); each embeds up to
    /// --keyword-max-candidates phrases.
    #[arg(long, env = "GLM_MAX_CONCURRENT_KEYWORD", default_value_t = Limits::default().max_concurrent_keyword)]
    pub max_concurrent_keyword: usize,

    /// `/tokenize` and `/detokenize` requests in flight at once (429 beyond).
    #[arg(long, env = "GLM_MAX_CONCURRENT_TOKENIZE", default_value_t = Limits::default().max_concurrent_tokenize)]
    pub max_concurrent_tokenize: usize,

    /// Most tokens one `/tokenize` answer (without `max_tokens`) or `/detokenize` request may
    /// carry; each costs about 150 bytes of memory while the answer is built.
    #[arg(long, env = "GLM_TOKENIZE_MAX_TOKENS", default_value_t = Limits::default().tokenize_max_tokens)]
    pub tokenize_max_tokens: usize,

    /// Largest `/keyword` document in bytes.
    #[arg(long, env = "GLM_KEYWORD_MAX_INPUT_BYTES", default_value_t = KeywordLimits::default().max_input_bytes)]
    pub keyword_max_input_bytes: usize,

    /// Longest n-gram a `/keyword` request may ask for (`keyphrase_ngram_range` maximum).
    #[arg(long, env = "GLM_KEYWORD_MAX_NGRAM", default_value_t = KeywordLimits::default().max_ngram)]
    pub keyword_max_ngram: usize,

    /// Most distinct candidate keywords one `/keyword` document may yield (each is embedded).
    #[arg(long, env = "GLM_KEYWORD_MAX_CANDIDATES", default_value_t = KeywordLimits::default().max_candidates)]
    pub keyword_max_candidates: usize,

    /// Most multiply-adds a `/keyword` selection may take (similarity matrix, MMR picks, Max Sum
    /// combinations).
    #[arg(long, env = "GLM_KEYWORD_MAX_SELECTION_COST", default_value_t = KeywordLimits::default().max_selection_cost)]
    pub keyword_max_selection_cost: u64,

    /// Largest `max_tokens` a chat request may ask for, and the default when it sets none.
    #[arg(long, env = "GLM_CHAT_MAX_TOKENS", default_value_t = ChatLimits::default().max_tokens)]
    pub chat_max_tokens: usize,

    /// Most stop strings per chat request.
    #[arg(long, env = "GLM_CHAT_MAX_STOP_STRINGS", default_value_t = ChatLimits::default().max_stop_strings)]
    pub chat_max_stop_strings: usize,

    /// Longest stop string, in characters.
    #[arg(long, env = "GLM_CHAT_MAX_STOP_CHARS", default_value_t = ChatLimits::default().max_stop_chars)]
    pub chat_max_stop_chars: usize,
}

/// One `--model NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PATH, got `{s}`"))?;
        let (name, path) = (name.trim(), path.trim());
        if name.is_empty() || path.is_empty() {
            return Err(format!(
                "expected NAME=PATH with both parts non-empty, got `{s}`"
            ));
        }
        Ok(ModelSpec {
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

impl Args {
    /// Checks clap cannot express: unique names, positive limits.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(m.name.as_str()) {
                return Err(format!("model name `{}` is given twice", m.name));
            }
        }
        let positive = [
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-client-batch-size", self.max_client_batch_size),
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-queued-inputs", self.max_queued_inputs),
            ("--max-body-bytes", self.max_body_bytes),
            ("--chat-max-batch-size", self.chat_max_batch_size),
            ("--chat-max-batch-tokens", self.chat_max_batch_tokens),
            // Every request passes through the queue on its way into the batch.
            ("--chat-max-waiting", self.chat_max_waiting),
            ("--max-connections", self.max_connections),
            ("--max-concurrent-keyword", self.max_concurrent_keyword),
            ("--max-concurrent-tokenize", self.max_concurrent_tokenize),
            ("--tokenize-max-tokens", self.tokenize_max_tokens),
            ("--keyword-max-input-bytes", self.keyword_max_input_bytes),
            ("--keyword-max-ngram", self.keyword_max_ngram),
            ("--keyword-max-candidates", self.keyword_max_candidates),
            ("--chat-max-tokens", self.chat_max_tokens),
            ("--chat-max-stop-strings", self.chat_max_stop_strings),
            ("--chat-max-stop-chars", self.chat_max_stop_chars),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        let positive_u64 = [
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--body-read-timeout-secs", self.body_read_timeout_secs),
            ("--write-timeout-secs", self.write_timeout_secs),
            (
                "--keyword-max-selection-cost",
                self.keyword_max_selection_cost,
            ),
        ];
        if let Some((flag, _)) = positive_u64.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        self.check_api_key(std::env::var_os("API_KEY").is_some())?;
        // A request is queued whole or refused: a larger one could never be served.
        if self.max_client_batch_size > self.max_queued_inputs {
            return Err(format!(
                "--max-client-batch-size ({}) must not exceed --max-queued-inputs ({})",
                self.max_client_batch_size, self.max_queued_inputs
            ));
        }
        Ok(())
    }

    /// How chat models are loaded: on `devices` (layers split across them), with the KV budget,
    /// load format, dtype and GGUF mode of the flags.
    pub fn chat_load_options(&self, devices: Vec<Device>) -> crate::models::chat::ChatLoadOptions {
        crate::models::chat::ChatLoadOptions {
            devices,
            dtype: self.dtype.dtype(),
            gguf_mode: self.gguf_mode,
            load_format: self.load_format,
            kv_cache_memory: self.kv_cache_memory.map(|b| b.0),
        }
    }

    /// An empty key would serve without authentication while the operator believes a key is
    /// required: refuse to start instead. `env_set`: whether the variable `API_KEY` exists (clap
    /// treats an empty variable as absent).
    fn check_api_key(&self, env_set: bool) -> Result<(), String> {
        let empty = match &self.api_key {
            Some(key) => key.trim().is_empty(),
            None => env_set,
        };
        if empty {
            return Err(
                "--api-key / API_KEY is set but empty: give the key, or unset it to \
                        serve without authentication"
                    .into(),
            );
        }
        Ok(())
    }

    /// Request limits of the HTTP layer.
    pub fn limits(&self) -> Limits {
        Limits {
            max_client_batch_size: self.max_client_batch_size,
            max_body_bytes: self.max_body_bytes,
            auto_truncate: self.auto_truncate,
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            max_concurrent_keyword: self.max_concurrent_keyword,
            max_concurrent_tokenize: self.max_concurrent_tokenize,
            tokenize_max_tokens: self.tokenize_max_tokens,
            keyword: KeywordLimits {
                max_input_bytes: self.keyword_max_input_bytes,
                max_ngram: self.keyword_max_ngram,
                max_candidates: self.keyword_max_candidates,
                max_selection_cost: self.keyword_max_selection_cost,
            },
            chat: ChatLimits {
                max_tokens: self.chat_max_tokens,
                max_stop_strings: self.chat_max_stop_strings,
                max_stop_chars: self.chat_max_stop_chars,
            },
        }
    }

    /// Connection bounds of the accept loop.
    pub fn serve_config(&self) -> ServeConfig {
        ServeConfig {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            max_connections: self.max_connections,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
        }
    }

    /// Queue and batch bounds of every embedding model.
    pub fn batcher_config(&self) -> BatcherConfig {
        BatcherConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_queued_inputs: self.max_queued_inputs,
        }
    }

    /// Limits of every chat model's engine.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch_size: self.chat_max_batch_size,
            max_batch_tokens: self.chat_max_batch_tokens,
            max_waiting: self.chat_max_waiting,
        }
    }
}

#[cfg(test)]
mod tests;
