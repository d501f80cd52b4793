//! What the chat-model parity tests share: fixture locations, reading `reference.json`, greedy
//! decoding as transformers' `generate(do_sample=False)` does it, and the reference checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use glm_inference::engine::ChatTemplate;
use glm_inference::models::{CausalLM, LoadedChat, SeqCache, SeqStep};
use serde_json::Value;

/// README tolerance for the tiny chat models' logits (float32 on CPU).
pub const LOGITS_TOL: f32 = 1e-4;

pub fn fixtures_dir() -> PathBuf {
    std::env::var("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

pub fn models_dir() -> PathBuf {
    std::env::var("GLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.models")))
}

/// `tiny/<name>` of the fixtures, failing with where to get it when it is missing.
pub fn tiny_dir(name: &str) -> PathBuf {
    let dir = fixtures_dir().join("tiny").join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "fixture {} is missing: it ships in shared/fixtures (set GLM_FIXTURES_DIR)",
        dir.display()
    );
    dir
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (fixtures live in shared/fixtures; set GLM_FIXTURES_DIR)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The first index of the largest value, as `torch.argmax`.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One sequence's step: its logits row.
pub fn forward_one(model: &dyn CausalLM, tokens: &[u32], cache: &mut SeqCache) -> Vec<f32> {
    let logits = model.forward(&mut [SeqStep { tokens, cache }]).unwrap();
    logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

/// Greedy decoding from a prefilled prompt (its last logits and cache): the new ids (stop token
/// included), the finish reason, and the logits each new id was chosen from.
pub fn greedy_from(
    model: &dyn CausalLM,
    mut logits: Vec<f32>,
    mut cache: SeqCache,
    max_new: usize,
    eos: &[u32],
) -> (Vec<u32>, &'static str, Vec<Vec<f32>>) {
    let mut out = Vec::new();
    let mut steps = Vec::new();
    loop {
        let next = argmax(&logits);
        out.push(next);
        steps.push(logits);
        if eos.contains(&next) {
            return (out, "stop", steps);
        }
        if out.len() == max_new {
            return (out, "length", steps);
        }
        logits = forward_one(model, &[next], &mut cache);
    }
}

/// The chat template of a loaded model, rendered by the engine's minijinja setup, must give every
/// case's `prompt_text` (transformers' `apply_chat_template(..., add_generation_prompt=True)`).
pub fn check_template(name: &str, chat: &LoadedChat, reference: &Value) {
    let source = chat
        .chat_template
        .as_deref()
        .unwrap_or_else(|| panic!("{name}: no chat template"));
    let template =
        ChatTemplate::new(source, chat.bos_token.as_deref(), chat.eos_token.as_deref()).unwrap();
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let text = template
            .render(messages, None, true)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "{name} case {i}: rendered prompt"
        );
    }
}

/// The top-5 logits the reference recorded at every greedy step (they exercise the KV cache
/// across decode steps) against the logits each id was chosen from.
pub fn check_step_top5(label: &str, steps: &[Vec<f32>], case: &Value) {
    let tops = case["step_top5"].as_array().unwrap();
    assert_eq!(steps.len(), tops.len(), "{label}: step_top5 entries");
    for (t, (logits, top)) in steps.iter().zip(tops).enumerate() {
        for (id, want) in ids(&top["ids"]).iter().zip(floats(&top["logits"])) {
            let got = logits[*id as usize];
            assert!(
                (got - want).abs() <= LOGITS_TOL,
                "{label} step {t}: logit of {id} {got} vs {want}"
            );
        }
    }
}
