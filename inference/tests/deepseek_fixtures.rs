//! DeepSeek-V3 (MLA + MoE, `noaux_tc` routing) against the transformers reference in
//! `fixtures/tiny/deepseek-v3` (see the fixtures README for how it was made and the tolerances).
mod chat_support;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use glm_inference::models::chat::deepseek_v3::{self, DeepseekV3, RoutePolicy};
use glm_inference::models::{chat, detect_family, CausalLM, Device, Family, SeqCache, SeqStep};
use serde_json::Value;

use chat_support::{
    argmax, check_step_top5, check_template, floats, greedy_from, ids, max_abs_diff, read_json,
    tiny_dir, LOGITS_TOL,
};

const MAX_NEW_TOKENS: usize = 12;

fn fixture_dir() -> PathBuf {
    tiny_dir("deepseek-v3")
}

fn reference() -> Value {
    read_json(&fixture_dir().join("reference.json"))
}

fn model() -> DeepseekV3 {
    deepseek_v3::load_model(&fixture_dir(), &Device::Cpu).unwrap()
}

/// One forward for several sequences; rows of the returned logits, one per step.
fn step(model: &dyn CausalLM, batch: Vec<(&[u32], &mut SeqCache)>) -> Vec<Vec<f32>> {
    let mut steps: Vec<SeqStep> = batch
        .into_iter()
        .map(|(tokens, cache)| SeqStep { tokens, cache })
        .collect();
    model.forward(&mut steps).unwrap().to_vec2().unwrap()
}

/// Greedy decoding as transformers' `generate` does it: stop token included, at most 12 new tokens.
fn greedy(model: &dyn CausalLM, prompt: &[u32], eos: &[u32]) -> (Vec<u32>, &'static str) {
    let (out, finish, _) = greedy_steps(model, prompt, eos);
    (out, finish)
}

/// The same, also returning the logits each token was chosen from.
fn greedy_steps(
    model: &dyn CausalLM,
    prompt: &[u32],
    eos: &[u32],
) -> (Vec<u32>, &'static str, Vec<Vec<f32>>) {
    let mut cache = model.new_cache().unwrap();
    let logits = step(model, vec![(prompt, &mut cache)]).remove(0);
    greedy_from(model, logits, cache, MAX_NEW_TOKENS, eos)
}

/// Loaded as the server does (family detection, `chat::load`): tokenizer, stop ids, template.
#[test]
fn tokenization_template_and_prompt_ids_are_exact() {
    let r = reference();
    let dir = fixture_dir();
    assert_eq!(detect_family(&dir).unwrap(), Family::DeepseekV3);
    let loaded = chat::load(&dir, Family::DeepseekV3, &Device::Cpu).unwrap();
    for t in r["tokenization"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let plain = loaded.tokenizer.encode(text, false).unwrap();
        assert_eq!(plain.get_ids(), ids(&t["ids"]).as_slice(), "{text:?}");
        let with = loaded.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            with.get_ids(),
            ids(&t["ids_add_special_tokens"]).as_slice(),
            "{text:?}"
        );
    }
    for case in r["cases"].as_array().unwrap() {
        let enc = loaded
            .tokenizer
            .encode(case["prompt_text"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(enc.get_ids(), ids(&case["prompt_ids"]).as_slice());
    }
    assert_eq!(loaded.eos_token_ids, ids(&r["eos_token_ids"]));
    assert_eq!(
        loaded.model.info().vocab_size,
        r["config_vocab_size"].as_u64().unwrap() as usize
    );
    check_template("deepseek-v3", &loaded, &r);
    for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let decoded = loaded
            .tokenizer
            .decode(&ids(&case["generated_ids"]), false)
            .unwrap();
        assert_eq!(
            decoded,
            case["generated_text"].as_str().unwrap(),
            "case {i}: generated text"
        );
    }
}

#[test]
fn last_logits_match_transformers() {
    let r = reference();
    let model = model();
    for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let mut cache = model.new_cache().unwrap();
        let logits = step(&model, vec![(&prompt, &mut cache)]).remove(0);
        let diff = max_abs_diff(&logits, &floats(&case["last_logits"]));
        assert!(
            diff <= LOGITS_TOL,
            "case {i}: last_logits max abs diff {diff}"
        );
        assert_eq!(cache.len, prompt.len());
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let r = reference();
    let model = model();
    let eos = ids(&r["eos_token_ids"]);
    for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let (generated, finish, steps) = greedy_steps(&model, &ids(&case["prompt_ids"]), &eos);
        assert_eq!(generated, ids(&case["generated_ids"]), "case {i}");
        assert_eq!(finish, case["finish_reason"].as_str().unwrap(), "case {i}");
        // The top-5 logits of every step exercise the MLA cache across decode steps.
        check_step_top5(&format!("case {i}"), &steps, case);
    }
}

#[test]
fn routing_matches_transformers_and_both_rules_matter() {
    let r = reference();
    let routing = &r["routing"];
    let model = model();
    let prompt = ids(&r["cases"][0]["prompt_ids"]);
    let inputs = model.gate_inputs(&prompt).unwrap();
    let expected = routing["moe_layers"].as_array().unwrap();
    assert_eq!(
        inputs.len(),
        expected.len(),
        "one router input per MoE layer"
    );
    let no_bias = RoutePolicy {
        correction_bias: false,
        group_limit: true,
    };
    let no_group = RoutePolicy {
        correction_bias: true,
        group_limit: false,
    };
    let (mut pairs, mut changed_bias, mut changed_group) = (0, 0, 0);
    for (input, want) in inputs.iter().zip(expected) {
        assert_eq!(input.layer as u64, want["layer"].as_u64().unwrap());
        let gate = model.gate(input.layer).expect("MoE layer has a router");
        let routes = gate.route(&input.hidden, RoutePolicy::default()).unwrap();
        let want_experts = want["experts"].as_array().unwrap();
        let want_weights = want["weights"].as_array().unwrap();
        assert_eq!(routes.len(), want_experts.len());
        for (t, route) in routes.iter().enumerate() {
            let mut chosen: Vec<(usize, f32)> = route
                .experts
                .iter()
                .copied()
                .zip(route.weights.iter().copied())
                .collect();
            chosen.sort_by_key(|(e, _)| *e);
            let experts: Vec<u32> = chosen.iter().map(|(e, _)| *e as u32).collect();
            let weights: Vec<f32> = chosen.iter().map(|(_, w)| *w).collect();
            assert_eq!(
                experts,
                ids(&want_experts[t]),
                "layer {} token {t}",
                input.layer
            );
            let diff = max_abs_diff(&weights, &floats(&want_weights[t]));
            assert!(
                diff <= LOGITS_TOL,
                "layer {} token {t}: weight diff {diff}",
                input.layer
            );
        }
        let differs = |policy| {
            let other = gate.route(&input.hidden, policy).unwrap();
            routes
                .iter()
                .zip(&other)
                .filter(|(a, b)| {
                    let (mut x, mut y) = (a.experts.clone(), b.experts.clone());
                    x.sort();
                    y.sort();
                    x != y
                })
                .count()
        };
        pairs += routes.len();
        changed_bias += differs(no_bias);
        changed_group += differs(no_group);
    }
    assert_eq!(pairs as u64, routing["token_layer_pairs"].as_u64().unwrap());
    assert_eq!(
        changed_bias as u64,
        routing["changed_without_correction_bias"].as_u64().unwrap()
    );
    assert_eq!(
        changed_group as u64,
        routing["changed_without_group_limit"].as_u64().unwrap()
    );
}

/// Two prompts prefilled and decoded together (one forward per step), plus a third prefilled in two
/// chunks alongside, give each sequence what it gets alone.
#[test]
fn batched_sequences_match_single_sequences() {
    let r = reference();
    let model = model();
    let cases = r["cases"].as_array().unwrap();
    let (p0, p1, p2) = (
        ids(&cases[0]["prompt_ids"]),
        ids(&cases[1]["prompt_ids"]),
        ids(&cases[2]["prompt_ids"]),
    );
    let (mut c0, mut c1, mut c2) = (
        model.new_cache().unwrap(),
        model.new_cache().unwrap(),
        model.new_cache().unwrap(),
    );
    let split = p2.len() / 2;

    let first = step(
        &model,
        vec![(&p0, &mut c0), (&p1, &mut c1), (&p2[..split], &mut c2)],
    );
    for (i, (row, case)) in first.iter().zip(cases).take(2).enumerate() {
        let diff = max_abs_diff(row, &floats(&case["last_logits"]));
        assert!(
            diff <= LOGITS_TOL,
            "batched prefill of case {i}: diff {diff}"
        );
    }
    let (mut gen0, mut gen1) = (vec![argmax(&first[0])], vec![argmax(&first[1])]);
    // Decode steps for cases 0 and 1 while case 2 finishes its prefill in the same pass.
    let second = step(
        &model,
        vec![
            (&gen0[..1], &mut c0),
            (&p2[split..], &mut c2),
            (&gen1[..1], &mut c1),
        ],
    );
    let diff = max_abs_diff(&second[1], &floats(&cases[2]["last_logits"]));
    assert!(diff <= LOGITS_TOL, "chunked prefill of case 2: diff {diff}");
    assert_eq!(c2.len, p2.len());
    gen0.push(argmax(&second[0]));
    gen1.push(argmax(&second[2]));
    while gen0.len() < MAX_NEW_TOKENS {
        let (t0, t1) = ([*gen0.last().unwrap()], [*gen1.last().unwrap()]);
        let rows = step(&model, vec![(&t0, &mut c0), (&t1, &mut c1)]);
        gen0.push(argmax(&rows[0]));
        gen1.push(argmax(&rows[1]));
    }
    // Neither fixture case stops early (finish_reason "length"), so both run 12 tokens.
    assert_eq!(gen0, ids(&cases[0]["generated_ids"]));
    assert_eq!(gen1, ids(&cases[1]["generated_ids"]));
}

/// Zero rows (dim 0) or columns (dim 1) appended up to `to`.
fn pad(t: &Tensor, dim: usize, to: usize) -> Tensor {
    let mut shape = t.dims().to_vec();
    shape[dim] = to - shape[dim];
    let zeros = Tensor::zeros(shape, t.dtype(), t.device()).unwrap();
    Tensor::cat(&[t, &zeros], dim).unwrap()
}

/// A config with other sizes than the fixture's: the dense MLP, every expert and the shared expert
/// get extra zero units and the vocabulary extra zero rows, which leaves the function unchanged, so
/// the widened model must still reproduce the reference (nothing may assume the fixture's sizes).
#[test]
fn other_shapes_reproduce_the_reference() {
    let src = fixture_dir();
    let r = reference();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let (dense, expert, vocab) = (160, 48, 704);
    let shared = expert * cfg["n_shared_experts"].as_u64().unwrap() as usize;
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let widened: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let width = if name.contains(".experts.") {
                expert
            } else if name.contains(".shared_experts.") {
                shared
            } else {
                dense
            };
            let t = if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
                pad(&t, 0, width)
            } else if name.ends_with("down_proj.weight") {
                pad(&t, 1, width)
            } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                pad(&t, 0, vocab)
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&widened, dir.path().join("model.safetensors")).unwrap();
    cfg["intermediate_size"] = serde_json::json!(dense);
    cfg["moe_intermediate_size"] = serde_json::json!(expert);
    cfg["vocab_size"] = serde_json::json!(vocab);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }

    let loaded = chat::load(dir.path(), Family::DeepseekV3, &Device::Cpu).unwrap();
    let model = loaded.model.as_ref();
    assert_eq!(model.info().vocab_size, vocab);
    let eos = ids(&r["eos_token_ids"]);
    for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want = floats(&case["last_logits"]);
        let mut cache = model.new_cache().unwrap();
        let logits = step(model, vec![(&prompt, &mut cache)]).remove(0);
        let diff = max_abs_diff(&logits[..want.len()], &want);
        assert!(
            diff <= LOGITS_TOL,
            "case {i}: last_logits max abs diff {diff}"
        );
        let (generated, finish) = greedy(model, &prompt, &eos);
        assert_eq!(generated, ids(&case["generated_ids"]), "case {i}");
        assert_eq!(finish, case["finish_reason"].as_str().unwrap(), "case {i}");
    }
}

/// The released FP8 checkpoints must be converted first: loading one as plain weights would give
/// wrong numbers without any error.
#[test]
fn fp8_checkpoints_are_refused() {
    let src = fixture_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let err = chat::load(dir.path(), Family::DeepseekV3, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
}
