//! Command-line flags; every flag has an environment twin so that the same binary runs from a shell,
//! a Helm chart or the seed's `run.sh` environment (`API_PORT`, `GLM_MODEL`).
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

use crate::models::Device;

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
    #[arg(long, env = "GLM_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,

    /// Inputs one embedding request may carry.
    #[arg(long, env = "GLM_MAX_CLIENT_BATCH_SIZE", default_value_t = 256)]
    pub max_client_batch_size: usize,

    /// Requests handled at once across inference routes; more are refused with 429.
    #[arg(long, env = "GLM_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Inputs waiting in one embedding model's queue; a request that does not fit is refused with 429.
    #[arg(long, env = "GLM_MAX_QUEUED_INPUTS", default_value_t = 4096)]
    pub max_queued_inputs: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "GLM_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Truncate over-long embedding inputs instead of rejecting them (per request: `"truncate": true`).
    #[arg(long, env = "GLM_AUTO_TRUNCATE", default_value_t = false)]
    pub auto_truncate: bool,

    /// Chat: sequences one model's engine generates at the same time (continuous batching).
    #[arg(long, env = "GLM_CHAT_MAX_BATCH_SIZE", default_value_t = 8)]
    pub chat_max_batch_size: usize,

    /// Chat: tokens in one forward pass (a decode token per running sequence plus prompt chunks);
    /// longer prompts are prefilled in chunks of this size.
    #[arg(long, env = "GLM_CHAT_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub chat_max_batch_tokens: usize,

    /// Chat: requests waiting for a batch slot per model; beyond, requests are refused with 429.
    #[arg(long, env = "GLM_CHAT_MAX_WAITING", default_value_t = 64)]
    pub chat_max_waiting: usize,

    /// GGUF chat models: `quantized` runs ggml's quantized kernels (least memory), `dequantized`
    /// expands the weights to floats at load (reference numerics, 4-8x the memory, faster where
    /// candle's kernels for the type are scalar), `auto` dequantizes when that fits in 2 GiB.
    #[arg(long, env = "GLM_GGUF_MODE", default_value = "auto")]
    pub gguf_mode: crate::models::chat::gguf::GgufMode,

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
}

/// One `--model NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
}

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Open the device models load on.
    pub fn open(self) -> Result<Device, String> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => open_cuda(),
            DeviceChoice::Auto if cfg!(feature = "cuda") => open_cuda().or_else(|e| {
                tracing::warn!("{e}; running on the CPU (--device cuda makes this an error)");
                Ok(Device::Cpu)
            }),
            DeviceChoice::Auto => Ok(Device::Cpu),
        }
    }
}

/// CUDA numbers the GPUs that CUDA_VISIBLE_DEVICES leaves visible from 0 (in Kubernetes, the ones
/// the device plugin allocated), so ordinal 0 is always the first GPU this process may use.
#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
    Device::new_cuda(0)
        .map_err(|e| format!("cannot open CUDA device 0 (CUDA_VISIBLE_DEVICES={visible}): {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, String> {
    Err("--device cuda needs a glm-inference built with `--features cuda`".into())
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
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        // A request is queued whole or refused: a larger one could never be served.
        if self.max_client_batch_size > self.max_queued_inputs {
            return Err(format!(
                "--max-client-batch-size ({}) must not exceed --max-queued-inputs ({})",
                self.max_client_batch_size, self.max_queued_inputs
            ));
        }
        Ok(())
    }

    /// Limits of every chat model's engine.
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            max_batch_size: self.chat_max_batch_size,
            max_batch_tokens: self.chat_max_batch_tokens,
            max_waiting: self.chat_max_waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse_and_reject_garbage() {
        let m: ModelSpec = "minilm=.models/all-MiniLM-L6-v2".parse().unwrap();
        assert_eq!(m.name, "minilm");
        assert_eq!(m.path, PathBuf::from(".models/all-MiniLM-L6-v2"));
        // Only the first '=' separates: paths may contain '='.
        let m: ModelSpec = "a=/x=y".parse().unwrap();
        assert_eq!(m.path, PathBuf::from("/x=y"));
        assert!("noequals".parse::<ModelSpec>().is_err());
        assert!("=path".parse::<ModelSpec>().is_err());
        assert!("name=".parse::<ModelSpec>().is_err());
    }

    #[test]
    fn flags_parse_with_defaults_and_duplicates_are_refused() {
        let args =
            Args::try_parse_from(["glm-inference", "--model", "a=/x", "--model", "b=/y"]).unwrap();
        assert_eq!(args.models.len(), 2);
        assert_eq!(args.port, 8200);
        assert!(args.validate().is_ok());
        let args =
            Args::try_parse_from(["glm-inference", "--model", "a=/x", "--model", "a=/y"]).unwrap();
        assert!(args.validate().unwrap_err().contains("`a`"));
        let args = Args::try_parse_from([
            "glm-inference",
            "--model",
            "a=/x",
            "--max-batch-tokens",
            "0",
        ])
        .unwrap();
        assert!(args.validate().unwrap_err().contains("--max-batch-tokens"));
        let args = Args::try_parse_from([
            "glm-inference",
            "--model",
            "a=/x",
            "--max-client-batch-size",
            "9",
            "--max-queued-inputs",
            "8",
        ])
        .unwrap();
        assert!(args
            .validate()
            .unwrap_err()
            .contains("--max-queued-inputs (8)"));
        assert!(
            Args::try_parse_from(["glm-inference"]).is_err(),
            "--model is required"
        );
    }

    #[test]
    fn device_choice_parses_and_cpu_builds_refuse_cuda() {
        let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
        assert_eq!(args.device, DeviceChoice::Auto);
        let args =
            Args::try_parse_from(["glm-inference", "--model", "a=/x", "--device", "cpu"]).unwrap();
        assert!(matches!(args.device.open(), Ok(Device::Cpu)));
        assert!(
            Args::try_parse_from(["glm-inference", "--model", "a=/x", "--device", "gpu"]).is_err()
        );
        #[cfg(not(feature = "cuda"))]
        {
            assert!(matches!(DeviceChoice::Auto.open(), Ok(Device::Cpu)));
            let err = DeviceChoice::Cuda.open().unwrap_err();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn gguf_mode_defaults_to_auto_and_rejects_unknown_values() {
        use crate::models::chat::gguf::GgufMode;
        let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
        assert_eq!(args.gguf_mode, GgufMode::Auto);
        let args = Args::try_parse_from([
            "glm-inference",
            "--model",
            "a=/x",
            "--gguf-mode",
            "quantized",
        ])
        .unwrap();
        assert_eq!(args.gguf_mode, GgufMode::Quantized);
        let err = Args::try_parse_from(["glm-inference", "--model", "a=/x", "--gguf-mode", "q4"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not one of auto, quantized, dequantized"),
            "{err}"
        );
    }

    #[test]
    fn chat_engine_limits_come_from_flags_and_must_be_positive() {
        let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
        assert_eq!(args.engine_config(), crate::engine::EngineConfig::default());
        let args = Args::try_parse_from([
            "glm-inference",
            "--model",
            "a=/x",
            "--chat-max-batch-size",
            "2",
            "--chat-max-batch-tokens",
            "64",
            "--chat-max-waiting",
            "3",
        ])
        .unwrap();
        let config = args.engine_config();
        assert_eq!(
            (
                config.max_batch_size,
                config.max_batch_tokens,
                config.max_waiting
            ),
            (2, 64, 3)
        );
        let args = Args::try_parse_from([
            "glm-inference",
            "--model",
            "a=/x",
            "--chat-max-waiting",
            "0",
        ])
        .unwrap();
        assert!(args.validate().unwrap_err().contains("--chat-max-waiting"));
    }
}
