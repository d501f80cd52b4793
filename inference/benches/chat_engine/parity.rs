//! The tiny fixtures' transformers references on whatever device and dtype the bench runs: the
//! GPU check's correctness half (the parity tests themselves run float32 on the CPU).
//!
//! Per fixture case: the last prompt position's logits against `last_logits` (max abs diff), then
//! greedy decoding against `generated_ids`. Tolerances: float32 `F32_TOL` and every greedy id
//! equal; bfloat16 `--bf16-tol` (default [`BF16_TOL`]: bf16 keeps 8 significant bits, so logits of
//! magnitude ~5 move by a few hundredths over a few layers) and greedy ids equal up to the first
//! step whose reference margin (top-1 minus top-2 logit) is below twice the tolerance, where
//! rounding may legitimately pick the runner-up.
use std::path::{Path, PathBuf};

use candle_core::DType;
use glm_inference::models::chat::{self, ChatLoadOptions};
use glm_inference::models::{detect_family, CausalLM, SeqCache, SeqStep};
use serde_json::Value;

pub const F32_TOL: f32 = 1e-3;
pub const BF16_TOL: f32 = 0.15;

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo().join("../shared/fixtures"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn step(model: &dyn CausalLM, tokens: &[u32], cache: &mut SeqCache) -> anyhow::Result<Vec<f32>> {
    let logits = model.forward(&mut [SeqStep { tokens, cache }])?;
    Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
}

/// Check every fixture; prints one line per case, returns whether all passed.
pub fn run(dirs: &[PathBuf], load: &ChatLoadOptions, bf16_tol: f32) -> anyhow::Result<bool> {
    let dtype = load.dtype();
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        bf16_tol
    };
    println!(
        "\nparity on {:?} in {dtype:?}: last logits max abs diff <= {tol}, greedy ids {}",
        load.devices[0].location(),
        if dtype == DType::F32 {
            "all equal"
        } else {
            "equal until a reference margin < 2 x tol"
        }
    );
    let mut all = true;
    for dir in dirs {
        all &= check_fixture(dir, load, tol, dtype == DType::F32)?;
    }
    println!("parity: {}", if all { "PASS" } else { "FAIL" });
    Ok(all)
}

fn check_fixture(
    dir: &Path,
    load: &ChatLoadOptions,
    tol: f32,
    strict: bool,
) -> anyhow::Result<bool> {
    let family = detect_family(dir)?;
    let chat = chat::load_with(dir, family, load)?;
    let model = chat.model.as_ref();
    let text = std::fs::read_to_string(dir.join("reference.json"))?;
    let reference: Value = serde_json::from_str(&text)?;
    let eos = ids(&reference["eos_token_ids"]);
    let mut ok = true;
    for (i, case) in reference["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let mut cache = model.new_cache()?;
        let mut logits = step(model, &ids(&case["prompt_ids"]), &mut cache)?;
        let want = floats(&case["last_logits"]);
        let diff = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let expected = ids(&case["generated_ids"]);
        let margins: Vec<f32> = case["step_top5"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let l = floats(&s["logits"]);
                l.first().copied().unwrap_or(0.0) - l.get(1).copied().unwrap_or(0.0)
            })
            .collect();
        let (mut matched, mut diverged) = (0, None);
        for (t, &want_id) in expected.iter().enumerate() {
            let got = argmax(&logits);
            if got != want_id {
                diverged = Some(t);
                break;
            }
            matched += 1;
            if eos.contains(&got) || t + 1 == expected.len() {
                break;
            }
            logits = step(model, &[got], &mut cache)?;
        }
        let greedy_ok = match diverged {
            None => true,
            Some(_) if strict => false,
            Some(t) => margins[..=t.min(margins.len().saturating_sub(1))]
                .iter()
                .any(|m| *m < 2.0 * tol),
        };
        let pass = diff <= tol && greedy_ok && want.len() == logits.len();
        ok &= pass;
        println!(
            "  {:<18} case {i}: max abs diff {diff:.2e}, greedy {matched}/{} ids{} -> {}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            expected.len(),
            diverged.map_or(String::new(), |t| format!(
                " (first difference at step {t}, reference margin {:.3})",
                margins.get(t).copied().unwrap_or(f32::NAN)
            )),
            if pass { "ok" } else { "FAIL" }
        );
    }
    Ok(ok)
}
