//! In-process speed of the GGUF chat decoder (SmolLM2-135M Q4_1), without HTTP or the scheduler:
//! single-sequence greedy decode, N sequences decoded in one forward per step, and a long prefill,
//! for each `--gguf-mode`. What profiles (perf record, callgrind) of the model maths run on;
//! scripts/bench-peers.sh is the side-by-side comparison through the server.
//!
//! cargo bench -p glm-inference --bench chat_step
//! env: GLM_MODELS_DIR (default <repo>/.models), GLM_BENCH_MODES (default auto,quantized,dequantized),
//! GLM_BENCH_TOKENS (decode steps, default 64), GLM_BENCH_STREAMS (default 16), GLM_BENCH_PREFILL
//! (prompt tokens, default 1000), GLM_THREADS (default: available CPUs).
//!
//! Without `--bench` (`cargo test --all-targets`) it runs two steps per mode and measures nothing.
use std::path::{Path, PathBuf};
use std::time::Instant;

use glm_inference::models::chat::gguf::{self, GgufMode};
use glm_inference::models::chat::ChatLoadOptions;
use glm_inference::models::{CausalLM, Device, SeqCache, SeqStep};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A cache with room for `positions` (the paged KV pool holds far fewer than `streams` whole
/// contexts).
fn reserve(model: &dyn CausalLM, positions: usize) -> anyhow::Result<SeqCache> {
    model
        .kv_blocks()
        .try_reserve(positions)
        .ok_or_else(|| anyhow::anyhow!("the KV pool cannot hold {positions} more positions"))
}

/// Greedy steps of `n` sequences together; returns generated tokens per second.
fn decode(model: &dyn CausalLM, n: usize, steps: usize) -> anyhow::Result<f64> {
    let prompt: Vec<u32> = (0..16).map(|i| 100 + i * 37).collect();
    let caches: anyhow::Result<Vec<SeqCache>> = (0..n)
        .map(|_| reserve(model, prompt.len() + steps + 1))
        .collect();
    let mut caches = caches?;
    let mut next = vec![0u32; n];
    let run = |caches: &mut [SeqCache], toks: &[Vec<u32>]| -> anyhow::Result<Vec<u32>> {
        let mut batch: Vec<SeqStep> = caches
            .iter_mut()
            .zip(toks)
            .map(|(cache, t)| SeqStep { tokens: t, cache })
            .collect();
        // As the engine runs it: the whole pass on a pool worker.
        let logits = glm_inference::kernels::on_pool(|| model.forward(&mut batch))?;
        let logits = logits.to_vec2::<f32>()?;
        Ok(logits.iter().map(|r| argmax(r)).collect())
    };
    let firsts = run(&mut caches, &vec![prompt; n])?;
    next.copy_from_slice(&firsts);
    let start = Instant::now();
    for _ in 0..steps {
        let toks: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        next = run(&mut caches, &toks)?;
    }
    Ok((n * steps) as f64 / start.elapsed().as_secs_f64())
}

fn prefill(model: &dyn CausalLM, tokens: usize) -> anyhow::Result<f64> {
    let prompt: Vec<u32> = (0..tokens as u32)
        .map(|i| 50 + (i * 7919) % 40000)
        .collect();
    let mut cache = reserve(model, tokens)?;
    let start = Instant::now();
    glm_inference::kernels::on_pool(|| {
        model.forward(&mut [SeqStep {
            tokens: &prompt,
            cache: &mut cache,
        }])
    })?;
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("GLM_MODELS_DIR").map_or(repo.join(".models"), PathBuf::from);
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    anyhow::ensure!(
        file.is_file(),
        "{} missing: run scripts/fetch-models.sh",
        file.display()
    );
    let threads = glm_inference::kernels::init_threads(env_usize("GLM_THREADS", 0));
    let bench = std::env::args().any(|a| a == "--bench");
    let modes =
        std::env::var("GLM_BENCH_MODES").unwrap_or_else(|_| "auto,quantized,dequantized".into());
    let (steps, streams, prompt) = if bench {
        (
            env_usize("GLM_BENCH_TOKENS", 64),
            env_usize("GLM_BENCH_STREAMS", 16),
            env_usize("GLM_BENCH_PREFILL", 1000),
        )
    } else {
        (2, 2, 8)
    };
    println!("SmolLM2-135M Q4_1, {threads} threads, {steps} decode steps, {streams} streams, {prompt}-token prefill");
    println!(
        "{:>12} | {:>12} | {:>16} | {:>12}",
        "mode", "decode tok/s", "streams tok/s", "prefill tok/s"
    );
    for mode in modes.split(',') {
        let parsed: GgufMode = mode.parse().map_err(anyhow::Error::msg)?;
        let options = ChatLoadOptions {
            gguf_mode: parsed,
            ..ChatLoadOptions::on(&Device::Cpu)
        };
        let chat = gguf::load(&file, &options)?;
        let model = chat.model.as_ref();
        let one = decode(model, 1, steps)?;
        let many = decode(model, streams, steps)?;
        let pre = prefill(model, prompt)?;
        println!("{mode:>12} | {one:>12.1} | {many:>16.1} | {pre:>12.1}");
    }
    Ok(())
}
