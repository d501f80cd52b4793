//! Chat engine throughput and latency at several concurrencies, driving `ChatEngine` directly (no
//! HTTP): every stream gets the same prompt and generates exactly `--max-tokens` tokens (EOS
//! ignored, greedy), all submitted at once.
//!
//! cargo bench -p glm-inference --bench chat_engine -- [--model PATH] [--concurrency 1,4,16,64]
//!     [--prompt-tokens 64] [--max-tokens 64] [--load-format auto|dummy] [--device cpu|cuda]
//!     [--dtype auto|f32|bf16] [--gguf-mode auto|quantized|dequantized]
//!     [--kv-cache-memory BYTES] [--hbm-gbps 4800]
//!     [--parity FIXTURE_DIR ...] [--bf16-tol 0.15]
//!
//! Per concurrency: aggregate tokens/s (all tokens / wall time), its ratio to one stream, time to
//! first token and inter-token latency (gaps between streamed deltas, one token each where a token
//! is a whole character) at p50/p99, and the decode rate: streams x `--decode-extra` (48) tokens
//! divided by the extra wall time of a second run that much longer, which cancels prefill and
//! start-up. Tokens per CPU-second (all threads of the process, /proc/self/stat) show the batching
//! gain where other processes share the cores and wall-clock figures move with their load. With
//! `--hbm-gbps`, the decode rate against the memory roofline (every step reads every weight once:
//! streams x bandwidth / weight bytes). `--parity DIR...` first checks tiny fixtures' logits and
//! greedy ids on the chosen device and dtype (see parity.rs) and exits non-zero on a mismatch.
//!
//! Without `--bench` (`cargo test --all-targets`) it runs concurrency 1 and 2 for two tokens on the
//! tiny GLM-4 fixture and measures nothing.
mod parity;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use glm_inference::config::{all_devices, ByteSize, DeviceChoice, DtypeChoice};
use glm_inference::engine::{
    ChatEngine, EngineConfig, Event, GenerateRequest, SamplingParams, StopParams,
};
use glm_inference::models::chat::gguf::GgufMode;
use glm_inference::models::chat::{self, ChatLoadOptions, LoadFormat};
use glm_inference::models::detect_family;

#[derive(Debug, Parser)]
struct Opts {
    /// Model folder or .gguf file (default: .models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value = "auto")]
    load_format: LoadFormat,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    #[arg(long, value_enum, default_value_t = DtypeChoice::Auto)]
    dtype: DtypeChoice,
    /// How GGUF blocks are multiplied (the server's `--gguf-mode`).
    #[arg(long, default_value = "auto")]
    gguf_mode: GgufMode,
    #[arg(long)]
    kv_cache_memory: Option<ByteSize>,
    /// Tokens per forward pass (prefill chunks plus decode tokens).
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Tokens of the second, longer run whose extra time gives the decode rate (0: skip it).
    #[arg(long, default_value_t = 48)]
    decode_extra: usize,
    /// Memory bandwidth in GB/s for the roofline column (H200: 4800).
    #[arg(long)]
    hbm_gbps: Option<f64>,
    /// Tiny fixture folders to check on the device first.
    #[arg(long, num_args = 1..)]
    parity: Vec<PathBuf>,
    /// Largest last-position logit difference accepted in bfloat16 (see parity.rs).
    #[arg(long, default_value_t = parity::BF16_TOL)]
    bf16_tol: f32,
    /// Set by `cargo bench`; without it, a smoke run.
    #[arg(long)]
    bench: bool,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` may append a filter argument: ignore what is not ours.
    let mut opts = Opts::try_parse().unwrap_or_else(|e| e.exit());
    let device = opts.device.open().map_err(anyhow::Error::msg)?;
    let devices = all_devices(&device).map_err(anyhow::Error::msg)?;
    let load = ChatLoadOptions {
        dtype: opts.dtype.dtype(),
        load_format: opts.load_format,
        gguf_mode: opts.gguf_mode,
        kv_cache_memory: opts.kv_cache_memory.map(|b| b.0),
        ..ChatLoadOptions::on(&device)
    };
    let load = ChatLoadOptions { devices, ..load };
    if !opts.parity.is_empty() {
        if !parity::run(&opts.parity, &load, opts.bf16_tol)? {
            anyhow::bail!("parity failed");
        }
        if opts.model.is_none() && !opts.bench {
            return Ok(());
        }
    }
    if !opts.bench {
        opts.concurrency = vec![1, 2];
        opts.max_tokens = 2;
        opts.prompt_tokens = 8;
    }
    let model = opts.model.clone().unwrap_or_else(|| {
        if opts.bench {
            repo().join(".models/SmolLM2-135M-Instruct.Q4_1.gguf")
        } else {
            parity::fixtures_dir().join("tiny/glm4-9b-chat-hf")
        }
    });
    let max_streams = opts.concurrency.iter().copied().max().unwrap_or(1);
    let engine = start_engine(&model, &load, max_streams, opts.max_batch_tokens)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let prompt = prompt_ids(&engine, opts.prompt_tokens)?;
    // One short run first: lazy initialisation (allocations, kernels) is not measured.
    runtime.block_on(run(&engine, &prompt, 1, 2))?;
    print_header(&engine, &model, &opts);
    let mut single = None;
    for &streams in &opts.concurrency {
        let a = runtime.block_on(run(&engine, &prompt, streams, opts.max_tokens))?;
        let extra = opts.decode_extra;
        let longer = if opts.bench && extra > 0 {
            Some(runtime.block_on(run(&engine, &prompt, streams, opts.max_tokens + extra))?)
        } else {
            None
        };
        let tps = a.tokens as f64 / a.wall.as_secs_f64();
        let base = *single.get_or_insert(tps);
        let decode =
            longer.map(|b| (streams * extra) as f64 / (b.wall - a.wall).as_secs_f64().max(1e-9));
        let weights = engine.info().weight_bytes as f64;
        print_row(streams, &a, tps, tps / base, decode, opts.hbm_gbps, weights);
    }
    Ok(())
}

fn start_engine(
    model: &Path,
    load: &ChatLoadOptions,
    streams: usize,
    max_batch_tokens: usize,
) -> anyhow::Result<ChatEngine> {
    let family = detect_family(model)?;
    let started = Instant::now();
    let loaded = chat::load_with(model, family, load)?;
    eprintln!(
        "loaded {} in {:.1} s",
        model.display(),
        started.elapsed().as_secs_f64()
    );
    let config = EngineConfig {
        max_batch_size: streams,
        max_batch_tokens,
        max_waiting: streams,
    };
    Ok(ChatEngine::start("bench", loaded, config)?)
}

/// `n` tokens of English prose in the model's own tokenizer (repeated as needed).
fn prompt_ids(engine: &ChatEngine, n: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "The history of computing is a story of abstraction: each generation of \
        engineers hides the details of the previous one behind a simpler interface, and builds \
        something larger on top. ";
    let ids = engine.encode(&TEXT.repeat(n / 20 + 2))?;
    Ok(ids.into_iter().take(n.max(1)).collect())
}

/// What one concurrency level gave.
struct RunStats {
    tokens: usize,
    wall: Duration,
    ttft: Vec<Duration>,
    itl: Vec<Duration>,
    deltas: usize,
    /// CPU time of the whole process (every thread) during the run: unlike wall time it hardly
    /// moves when other processes share the cores.
    cpu: Option<Duration>,
}

/// User plus system time of this process so far, from /proc/self/stat (Linux; USER_HZ is 100).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

async fn run(
    engine: &ChatEngine,
    prompt: &[u32],
    streams: usize,
    max_tokens: usize,
) -> anyhow::Result<RunStats> {
    let start = Instant::now();
    let cpu_start = cpu_time();
    let mut gens = Vec::with_capacity(streams);
    for _ in 0..streams {
        gens.push(engine.submit(GenerateRequest {
            prompt_ids: prompt.to_vec(),
            sampling: SamplingParams::default(),
            stop: StopParams {
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                ..StopParams::default()
            },
            reasoning: None,
        })?);
    }
    let collected = futures::future::join_all(gens.into_iter().map(|mut g| async move {
        let (mut times, mut tokens) = (Vec::new(), 0);
        while let Some(ev) = g.events.recv().await {
            match ev {
                Event::Delta(_) => times.push(Instant::now()),
                Event::Finish { usage, .. } => tokens = usage.completion_tokens,
                Event::Error(e) => return Err(anyhow::anyhow!("generation failed: {e}")),
            }
        }
        Ok((times, tokens))
    }))
    .await;
    let wall = start.elapsed();
    let cpu = cpu_time()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    let mut stats = RunStats {
        tokens: 0,
        wall,
        cpu,
        ttft: Vec::new(),
        itl: Vec::new(),
        deltas: 0,
    };
    for c in collected {
        let (times, tokens) = c?;
        stats.tokens += tokens;
        stats.deltas += times.len();
        if let Some(first) = times.first() {
            stats.ttft.push(*first - start);
        }
        stats.itl.extend(times.windows(2).map(|w| w[1] - w[0]));
    }
    Ok(stats)
}

fn percentile(xs: &mut [Duration], p: f64) -> Option<Duration> {
    if xs.is_empty() {
        return None;
    }
    xs.sort();
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    Some(xs[i])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

fn print_header(engine: &ChatEngine, model: &Path, opts: &Opts) {
    println!(
        "\nchat engine: {} ({}, {:.2} GB of weights, sequences up to {} positions), prompt {} tokens, {} generated per stream, greedy, EOS ignored",
        model.display(),
        engine.info().family,
        engine.info().weight_bytes as f64 / 1e9,
        engine.max_context(),
        opts.prompt_tokens,
        opts.max_tokens
    );
    println!(
        "| streams | tokens/s | vs 1 stream | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | decode tokens/s | roofline | tokens/CPU-s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
}

fn print_row(
    streams: usize,
    s: &RunStats,
    tps: f64,
    ratio: f64,
    decode: Option<f64>,
    hbm_gbps: Option<f64>,
    weights: f64,
) {
    let (mut ttft, mut itl) = (s.ttft.clone(), s.itl.clone());
    // Deltas stand for tokens only when (almost) every token printed text.
    let per_token = s.deltas * 10 >= s.tokens * 9;
    let latency = |xs: &mut [Duration], p| {
        if per_token {
            ms(percentile(xs, p))
        } else {
            "n/a".into()
        }
    };
    let roofline = match (decode, hbm_gbps) {
        (Some(d), Some(bw)) if weights > 0.0 => {
            format!("{:.0}%", 100.0 * d / (streams as f64 * bw * 1e9 / weights))
        }
        _ => "n/a".into(),
    };
    let per_cpu = match s.cpu {
        Some(cpu) if !cpu.is_zero() => format!("{:.1}", s.tokens as f64 / cpu.as_secs_f64()),
        _ => "n/a".into(),
    };
    println!(
        "| {streams} | {tps:.1} | {ratio:.2}x | {} | {} | {} | {} | {} | {roofline} | {per_cpu} |",
        latency(&mut ttft, 0.5),
        latency(&mut ttft, 0.99),
        latency(&mut itl, 0.5),
        latency(&mut itl, 0.99),
        decode.map_or("n/a".into(), |d| format!("{d:.1}")),
    );
}
