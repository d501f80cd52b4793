//! Sentences per second of all-MiniLM-L6-v2 at batch sizes 1, 8 and 32 (tokenization included, as
//! in sentence-transformers' `encode`), side by side with sentence-transformers' figures: the bench
//! runs `scripts/bench-embeddings.py` first, which measures them when sentence-transformers is
//! installed and says so otherwise.
//!
//! cargo bench -p glm-inference --bench embed_throughput
//! env: GLM_MODELS_DIR (default <repo>/.models), GLM_FIXTURES_DIR, GLM_BENCH_SECS (per batch size,
//! default 3), GLM_ST_BENCH_JSON (default <repo>/target/bench-embeddings-st.json), GLM_BENCH_ST=0 to
//! skip the Python side, PYTHON (default python3).
//!
//! Without `--bench` (`cargo test --all-targets` runs bench targets that way) it embeds one batch
//! per size and measures nothing, so the test suite stays fast.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use glm_inference::models::{detect_family, embed, Device, EmbedOutputs, LoadedEmbedder};

const BATCH_SIZES: [usize; 3] = [1, 8, 32];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env_path(key: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(key).map(PathBuf::from).unwrap_or(default)
}

/// The sentences of the minilm fixture (24 English sentences of 6 to 21 tokens).
fn sentences() -> anyhow::Result<Vec<String>> {
    let fixtures = env_path("GLM_FIXTURES_DIR", repo().join("../shared/fixtures"));
    let file = fixtures.join("real/minilm/reference.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    let list = reference["sentences"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{}: no sentences", file.display()))?;
    Ok(list
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect())
}

fn encode(model: &LoadedEmbedder, texts: &[String], max_tokens: usize) -> anyhow::Result<usize> {
    let mut ids = Vec::with_capacity(texts.len());
    for text in texts {
        let enc = model
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ids.push(enc.get_ids().to_vec());
    }
    let refs: Vec<&[u32]> = ids.iter().map(|i| &i[..i.len().min(max_tokens)]).collect();
    Ok(model.embedder.embed(&refs, EmbedOutputs::default())?.len())
}

/// Sentences per second at `batch`, cycling through `corpus` for at least `budget`.
fn measure(
    model: &LoadedEmbedder,
    corpus: &[String],
    batch: usize,
    budget: Duration,
) -> anyhow::Result<f64> {
    let max_tokens = model.embedder.info().max_input_tokens;
    let batches: Vec<Vec<String>> = corpus
        .iter()
        .cycle()
        .take(corpus.len() * batch)
        .cloned()
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(<[String]>::to_vec)
        .collect();
    encode(model, &batches[0], max_tokens)?; // warm-up
    let (start, mut done) = (Instant::now(), 0usize);
    for chunk in batches.iter().cycle() {
        done += encode(model, chunk, max_tokens)?;
        if start.elapsed() >= budget {
            break;
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn st_json() -> PathBuf {
    env_path(
        "GLM_ST_BENCH_JSON",
        repo().join("target/bench-embeddings-st.json"),
    )
}

/// Run scripts/bench-embeddings.py (same model, sentences and time budget). It writes fresh
/// figures when sentence-transformers is installed; a stale file is removed first so that old
/// figures are never printed as today's.
fn run_sentence_transformers(secs: f64) {
    if std::env::var("GLM_BENCH_ST").is_ok_and(|v| v == "0") {
        return;
    }
    let _ = std::fs::remove_file(st_json());
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = std::process::Command::new(&python)
        .arg(repo().join("scripts/bench-embeddings.py"))
        .env("GLM_BENCH_SECS", secs.to_string())
        .env("GLM_ST_BENCH_JSON", st_json())
        .status();
    if let Err(e) = status {
        println!("(cannot run {python} scripts/bench-embeddings.py: {e})");
    }
}

/// `{"batch_sizes": {"1": sentences_per_s, ...}, ...}` written by scripts/bench-embeddings.py.
fn reference_figures() -> Option<(PathBuf, serde_json::Value)> {
    let file = st_json();
    let text = std::fs::read_to_string(&file).ok()?;
    Some((file, serde_json::from_str(&text).ok()?))
}

/// `cargo test --all-targets` mode: prove the bench still runs, in well under a second.
fn smoke(model: &LoadedEmbedder, corpus: &[String]) -> anyhow::Result<()> {
    let max_tokens = model.embedder.info().max_input_tokens;
    for batch in BATCH_SIZES {
        let texts: Vec<String> = corpus.iter().cycle().take(batch).cloned().collect();
        anyhow::ensure!(
            encode(model, &texts, max_tokens)? == batch,
            "batch {batch}: wrong number of embeddings"
        );
    }
    println!("embed_throughput: smoke run ok (run `cargo bench -p glm-inference` to measure)");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = env_path("GLM_MODELS_DIR", repo().join(".models")).join("all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        anyhow::bail!("{} missing: run scripts/fetch-models.sh", dir.display());
    }
    let secs: f64 = std::env::var("GLM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let model = embed::load(&dir, detect_family(&dir)?, &Device::Cpu)?;
    let corpus = sentences()?;
    if !std::env::args().any(|a| a == "--bench") {
        return smoke(&model, &corpus);
    }
    run_sentence_transformers(secs);
    let st = reference_figures();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("all-MiniLM-L6-v2, CPU f32, {threads} threads, {} fixture sentences cycled, {secs}s per row", corpus.len());
    match &st {
        Some((file, _)) => println!("sentence-transformers figures from {}", file.display()),
        None => println!(
            "(no sentence-transformers figures: `pip install sentence-transformers` to add them)"
        ),
    }
    println!(
        "{:>6} | {:>16} | {:>22}",
        "batch", "glm sent/s", "sentence-transformers"
    );
    println!("{:-<6}-+-{:-<16}-+-{:-<22}", "", "", "");
    for batch in BATCH_SIZES {
        let ours = measure(&model, &corpus, batch, Duration::from_secs_f64(secs))?;
        let theirs = st
            .as_ref()
            .and_then(|(_, v)| v["batch_sizes"][batch.to_string()].as_f64())
            .map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        println!("{batch:>6} | {ours:>16.1} | {theirs:>22}");
    }
    Ok(())
}
