//! Decode-shaped products (`m` = 1, 4, 16 activation rows) over GGUF-block weights with the shapes
//! of SmolLM2-135M, per kernel numerics: weight bytes streamed per second and time per block.
//! "hot" repeats one matrix (it stays in cache); "model" walks 30 layers of distinct matrices and
//! the tied output projection, as one decode step does, so weights come from memory.
//!
//! cargo bench -p glm-kernels --bench gemv
//! env: GLM_THREADS (pool size, default all CPUs), GLM_BENCH_ACTS (`f32`, `int8`; default both),
//! GLM_BENCH_HOT (0: skip the single-matrix cases), GLM_BENCH_M (activation rows, default 1,4,16).
//!
//! Without `--bench` (`cargo test --all-targets`) it runs each case once and measures nothing.
use std::time::Instant;

use glm_kernels::quant::{QFormat, QWeight};

/// Random but valid blocks: small f16 scales and mins, random quants.
fn weight(format: QFormat, rows: usize, cols: usize, seed: u64) -> QWeight {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let blocks = rows * cols / QFormat::BLOCK;
    let mut data = Vec::with_capacity(blocks * format.block_bytes());
    for _ in 0..blocks {
        data.extend_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        if format == QFormat::Q4_1 {
            data.extend_from_slice(&half::f16::from_f32(-0.08).to_bits().to_le_bytes());
        }
        let quants = format.block_bytes() - data.len() % format.block_bytes();
        data.extend((0..quants).map(|_| next() as u8));
    }
    QWeight::new(format, rows, cols, data).expect("valid blocks")
}

fn activations(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Activation rows per case: GLM_BENCH_M (comma-separated), default 1, 4, 16.
fn rows_list() -> Vec<usize> {
    std::env::var("GLM_BENCH_M")
        .ok()
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .filter(|ms: &Vec<usize>| !ms.is_empty())
        .unwrap_or_else(|| vec![1, 4, 16])
}

/// Seconds per call of `run`, over at least `min_secs` (one call when not benchmarking). Timed
/// on a pool worker, as the server runs every forward pass (`on_pool`): called from outside the
/// pool, each product's fork-join would also pay for waking the pool.
fn time(bench: bool, min_secs: f64, run: impl FnMut() + Send) -> f64 {
    glm_kernels::on_pool(|| time_here(bench, min_secs, run))
}

fn time_here(bench: bool, min_secs: f64, mut run: impl FnMut()) -> f64 {
    run();
    if !bench {
        return 0.0;
    }
    let (start, mut calls) = (Instant::now(), 0u32);
    while calls < 3 || start.elapsed().as_secs_f64() < min_secs {
        run();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(calls)
}

struct Layer(Vec<QWeight>);

/// One decoder layer of SmolLM2-135M: q, k, v, o, gate, up, down (or, `fused`, qkv, o,
/// gate_up, down).
fn layer(seed: u64, int8: bool, fused: bool) -> Layer {
    let separate: &[(usize, usize)] = &[
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let joined: &[(usize, usize)] = &[(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let shapes = if fused { joined } else { separate };
    Layer(
        shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                weight(QFormat::Q4_1, r, c, seed * 8 + i as u64).with_int8_activations(int8)
            })
            .collect(),
    )
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let threads = glm_kernels::init_threads(
        std::env::var("GLM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let secs = if bench { 1.0 } else { 0.0 };
    println!("{threads} threads; GB/s of weight bytes read, ns per 32-weight block (per call)");
    println!(
        "{:>26} | {:>5} | {:>2} | {:>8} | {:>6} | {:>8}",
        "case", "acts", "m", "us/call", "GB/s", "ns/block"
    );
    let ms = rows_list();
    let wanted = std::env::var("GLM_BENCH_ACTS").unwrap_or_else(|_| "f32,int8".into());
    let hot_cases = std::env::var("GLM_BENCH_HOT").map_or(true, |v| v != "0");
    for int8 in [false, true] {
        let acts = if int8 { "int8" } else { "f32" };
        if !wanted.split(',').any(|w| w == acts) {
            continue;
        }
        let hot = [
            ("576x576 Q4_1 (q, o)", QFormat::Q4_1, 576, 576),
            ("1536x576 Q4_1 (gate, up)", QFormat::Q4_1, 1536, 576),
            ("576x1536 Q4_1 (down)", QFormat::Q4_1, 576, 1536),
            ("49152x576 Q8_0 (lm_head)", QFormat::Q8_0, 49152, 576),
        ];
        for (name, format, rows, cols) in hot.into_iter().filter(|_| hot_cases) {
            let w = weight(format, rows, cols, 1).with_int8_activations(int8);
            for &m in &ms {
                let x = activations(m * cols);
                let mut out = vec![0f32; m * rows];
                let t = time(bench, secs, || w.matmul(&x, m, &mut out));
                report(name, acts, m, t, w.size_in_bytes(), rows * cols / 32);
            }
        }
        for fused in [false, true] {
            walk(bench, secs, acts, int8, fused);
        }
    }
}

/// The decode step's weight walk: 30 layers and the output projection.
fn walk(bench: bool, secs: f64, acts: &str, int8: bool, fused: bool) {
    let ms = rows_list();
    let layers: Vec<Layer> = (0..if bench { 30 } else { 1 })
        .map(|l| layer(l + 10, int8, fused))
        .collect();
    let head = weight(QFormat::Q8_0, 49152, 576, 99).with_int8_activations(int8);
    let all = || layers.iter().flat_map(|l| &l.0).chain([&head]);
    let bytes: usize = all().map(QWeight::size_in_bytes).sum();
    let blocks: usize = all().map(|w| w.dims().0 * w.dims().1 / 32).sum();
    let name = if fused {
        "model, fused qkv + gate_up"
    } else {
        "model: 30 layers + lm_head"
    };
    for &m in &ms {
        let x = activations(m * 1536);
        let mut out = vec![0f32; m * 49152];
        let t = time(bench, secs, || {
            for w in all() {
                let (rows, cols) = w.dims();
                w.matmul(&x[..m * cols], m, &mut out[..m * rows]);
            }
        });
        report(name, acts, m, t, bytes, blocks);
    }
}

fn report(name: &str, acts: &str, m: usize, secs: f64, bytes: usize, blocks: usize) {
    if secs == 0.0 {
        println!("{name:>26} | {acts:>5} | {m:>2} | ran once, not timed (pass --bench)");
        return;
    }
    println!(
        "{name:>26} | {acts:>5} | {m:>2} | {:>8.1} | {:>6.1} | {:>8.2}",
        secs * 1e6,
        bytes as f64 / secs.max(1e-12) / 1e9,
        secs * 1e9 / blocks as f64
    );
}
