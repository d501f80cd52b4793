//! The attention paths the CPU parity tests do not take by default, against the same transformers
//! references: the candle-ops implementation GPUs run (forced onto the CPU here), and a model whose
//! layers are split over two devices (two CPU "devices": the placement, per-device step tensors and
//! activation moves run as on several GPUs; the copies between real GPUs are not exercised).
//!
//! Every fixture case runs in one batch: all prompts prefilled in one forward pass, then one decode
//! token per unfinished case per pass, each compared with its reference.
mod chat_support;

use std::sync::Arc;

use glm_inference::models::chat::{self, attention, ChatLoadOptions};
use glm_inference::models::{detect_family, CausalLM, Device, SeqStep};
use serde_json::Value;

use chat_support::{floats, ids, max_abs_diff, read_json, tiny_dir, LOGITS_TOL};

const FIXTURES: [&str; 5] = [
    "glm4-9b-chat-hf",
    "glm4-0414",
    "qwen2",
    "llama",
    "deepseek-v3",
];

fn load(name: &str, devices: Vec<Device>) -> (Arc<dyn CausalLM>, Value) {
    let dir = tiny_dir(name);
    let options = ChatLoadOptions {
        devices,
        ..ChatLoadOptions::on(&Device::Cpu)
    };
    let chat = chat::load_with(&dir, detect_family(&dir).unwrap(), &options)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (chat.model, read_json(&dir.join("reference.json")))
}

/// All cases of `reference` decoded greedily side by side in shared forward passes.
fn check_batched_greedy(name: &str, model: &dyn CausalLM, reference: &Value) {
    let eos = ids(&reference["eos_token_ids"]);
    let cases = reference["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();
    let mut caches: Vec<_> = cases.iter().map(|_| model.new_cache().unwrap()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    let mut inputs: Vec<Vec<u32>> = prompts.clone();
    let mut first = true;
    loop {
        let active: Vec<usize> = (0..cases.len())
            .filter(|&i| {
                out[i].len() < want[i].len() && !out[i].last().is_some_and(|t| eos.contains(t))
            })
            .collect();
        if active.is_empty() {
            break;
        }
        let mut steps: Vec<SeqStep> = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if active.contains(&i) {
                steps.push(SeqStep {
                    tokens: &inputs[i],
                    cache,
                });
            }
        }
        let rows: Vec<Vec<f32>> = model.forward(&mut steps).unwrap().to_vec2().unwrap();
        drop(steps);
        for (&i, row) in active.iter().zip(&rows) {
            if first {
                let reference = floats(&cases[i]["last_logits"]);
                let diff = max_abs_diff(&row[..reference.len()], &reference);
                assert!(
                    diff <= LOGITS_TOL,
                    "{name} case {i}: last logits differ by {diff}"
                );
            }
            let next = chat_support::argmax(row);
            out[i].push(next);
            inputs[i] = vec![next];
        }
        first = false;
    }
    assert_eq!(out, want, "{name}: greedy ids of every case");
}

#[test]
fn the_generic_attention_reproduces_every_fixture() {
    attention::force_generic(true);
    for name in FIXTURES {
        let (model, reference) = load(name, vec![Device::Cpu]);
        check_batched_greedy(name, model.as_ref(), &reference);
    }
}

#[test]
fn layers_split_over_two_devices_reproduce_every_fixture() {
    for name in FIXTURES {
        let (model, reference) = load(name, vec![Device::Cpu, Device::Cpu]);
        check_batched_greedy(name, model.as_ref(), &reference);
    }
}
