//! Chat decoders against the transformers references in `shared/fixtures` (tolerances from its
//! README): tokenization, last-position logits, greedy generation, and batched steps that mix
//! prefill and decode of different sequences.
mod chat_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use glm_inference::models::chat::gguf::{self, GgufMode};
use glm_inference::models::{
    chat, detect_family, CausalLM, Device, Family, LoadedChat, SeqCache, SeqStep,
};
use serde_json::{json, Value};

use chat_support::{
    argmax, check_step_top5, check_template, fixtures_dir, floats, greedy_from, ids, max_abs_diff,
    models_dir, read_json, tiny_dir, LOGITS_TOL,
};

/// A sequence must get the same logits in a batch as alone, up to summation order.
const BATCH_TOL: f32 = 1e-5;

/// Load through the server's path: family detection, then `chat::load`.
fn load_dir(dir: &Path) -> LoadedChat {
    let family = detect_family(dir).unwrap();
    chat::load(dir, family, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

fn load_tiny(name: &str) -> (LoadedChat, Value) {
    let dir = tiny_dir(name);
    (load_dir(&dir), read_json(&dir.join("reference.json")))
}

fn encode(chat: &LoadedChat, text: &str, special: bool) -> Vec<u32> {
    chat.tokenizer
        .encode(text, special)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// Logits of the last prompt position, the prompt run as one prefill.
fn prefill_logits(model: &dyn CausalLM, prompt: &[u32]) -> (Vec<f32>, SeqCache) {
    let mut cache = model.new_cache().unwrap();
    let logits = model
        .forward(&mut [SeqStep {
            tokens: prompt,
            cache: &mut cache,
        }])
        .unwrap();
    assert_eq!(logits.dims(), &[1, model.info().vocab_size]);
    (logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap(), cache)
}

/// Greedy decoding of one sequence, as transformers `generate(do_sample=False)`.
fn greedy(
    model: &dyn CausalLM,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> (Vec<u32>, &'static str) {
    let (ids, finish, _) = greedy_steps(model, prompt, max_new, eos);
    (ids, finish)
}

/// Greedy decoding that also returns the logits each new token was chosen from.
fn greedy_steps(
    model: &dyn CausalLM,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> (Vec<u32>, &'static str, Vec<Vec<f32>>) {
    let (logits, cache) = prefill_logits(model, prompt);
    greedy_from(model, logits, cache, max_new, eos)
}

fn check_tokenization(chat: &LoadedChat, reference: &Value) {
    for t in reference["tokenization"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(encode(chat, text, false), ids(&t["ids"]), "ids of {text:?}");
        assert_eq!(
            encode(chat, text, true),
            ids(&t["ids_add_special_tokens"]),
            "ids with specials of {text:?}"
        );
    }
}

fn check_tiny(name: &str) {
    let (chat, reference) = load_tiny(name);
    check_tokenization(&chat, &reference);
    check_template(name, &chat, &reference);
    assert_eq!(chat.eos_token_ids, ids(&reference["eos_token_ids"]));
    assert_eq!(
        chat.model.info().vocab_size,
        reference["config_vocab_size"].as_u64().unwrap() as usize
    );
    check_generation(name, &chat, &reference, usize::MAX);
}

/// Last prompt logits, greedy ids (with the top-5 logits of every step, which exercise the KV
/// cache), finish reason and decoded text against the reference. Logits are compared on the first
/// `vocab` rows only (widened copies of a fixture add rows the reference does not have).
fn check_generation(name: &str, chat: &LoadedChat, reference: &Value, vocab: usize) {
    let eos = ids(&reference["eos_token_ids"]);
    let max_new = reference["generation"]["max_new_tokens"]
        .as_u64()
        .unwrap_or(12) as usize;
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = encode(chat, case["prompt_text"].as_str().unwrap(), false);
        assert_eq!(
            prompt,
            ids(&case["prompt_ids"]),
            "{name} case {i}: prompt ids"
        );
        let (generated, finish, steps) = greedy_steps(chat.model.as_ref(), &prompt, max_new, &eos);
        let want = floats(&case["last_logits"]);
        let got = &steps[0][..want.len().min(vocab).min(steps[0].len())];
        assert_eq!(got.len(), want.len(), "{name} case {i}: logits length");
        let diff = max_abs_diff(got, &want);
        assert!(
            diff <= LOGITS_TOL,
            "{name} case {i}: last_logits max abs diff {diff}"
        );
        assert_eq!(
            generated,
            ids(&case["generated_ids"]),
            "{name} case {i}: greedy ids"
        );
        assert_eq!(
            finish,
            case["finish_reason"].as_str().unwrap(),
            "{name} case {i}: finish reason"
        );
        check_step_top5(&format!("{name} case {i}"), &steps, case);
        let text = chat.tokenizer.decode(&generated, false).unwrap();
        assert_eq!(
            text,
            case["generated_text"].as_str().unwrap(),
            "{name} case {i}: generated text"
        );
    }
}

/// Two prompts of different lengths in ONE forward call give each the logits it gets alone (and
/// the reference's); then one call mixes a decode token of the first with the second's next
/// chunk, against the same tokens run alone. This is what continuous batching relies on.
fn check_mixed_forward(name: &str) {
    let (chat, reference) = load_tiny(name);
    let model = chat.model.as_ref();
    let cases = reference["cases"].as_array().unwrap();
    let (a, b) = (ids(&cases[0]["prompt_ids"]), ids(&cases[2]["prompt_ids"]));
    assert_ne!(
        a.len(),
        b.len(),
        "{name}: the two prompts should differ in length"
    );
    let (alone_a, mut cache_a1) = prefill_logits(model, &a);
    let split = b.len() / 2;
    let (alone_b, mut cache_b1) = prefill_logits(model, &b[..split]);

    let (mut cache_a, mut cache_b) = (model.new_cache().unwrap(), model.new_cache().unwrap());
    let rows = model
        .forward(&mut [
            SeqStep {
                tokens: &a,
                cache: &mut cache_a,
            },
            SeqStep {
                tokens: &b[..split],
                cache: &mut cache_b,
            },
        ])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        (cache_a.len(), cache_b.len()),
        (a.len(), split),
        "{name}: cache lengths"
    );
    let diff = max_abs_diff(&rows[0], &alone_a);
    assert!(
        diff <= BATCH_TOL,
        "{name}: batched vs alone, first sequence: {diff}"
    );
    let diff = max_abs_diff(&rows[1], &alone_b);
    assert!(
        diff <= BATCH_TOL,
        "{name}: batched vs alone, second sequence: {diff}"
    );
    let diff = max_abs_diff(&rows[0], &floats(&cases[0]["last_logits"]));
    assert!(diff <= LOGITS_TOL, "{name}: batched vs reference: {diff}");

    // Next step, mixed: one decode token for `a`, the rest of `b`'s prompt (a prefill chunk).
    let next = [argmax(&rows[0])];
    let rows = model
        .forward(&mut [
            SeqStep {
                tokens: &b[split..],
                cache: &mut cache_b,
            },
            SeqStep {
                tokens: &next,
                cache: &mut cache_a,
            },
        ])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let step = |tokens: &[u32], cache: &mut SeqCache| {
        model
            .forward(&mut [SeqStep { tokens, cache }])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let alone_b = step(&b[split..], &mut cache_b1);
    let alone_a = step(&next, &mut cache_a1);
    let diff = max_abs_diff(&rows[0], &alone_b);
    assert!(
        diff <= BATCH_TOL,
        "{name}: chunked prefill batched vs alone: {diff}"
    );
    let diff = max_abs_diff(&rows[1], &alone_a);
    assert!(diff <= BATCH_TOL, "{name}: decode batched vs alone: {diff}");
    let diff = max_abs_diff(&rows[0], &floats(&cases[2]["last_logits"]));
    assert!(
        diff <= LOGITS_TOL,
        "{name}: chunked prefill vs reference: {diff}"
    );
}

/// Every case of a fixture decoded together: sequences join at different steps (so prefill chunks
/// and single decode tokens share a forward), each must give its single-sequence greedy ids.
fn check_batched(name: &str) {
    let (chat, reference) = load_tiny(name);
    let model = chat.model.as_ref();
    let eos = ids(&reference["eos_token_ids"]);
    let cases = reference["cases"].as_array().unwrap();
    let max_new = 12;
    struct Seq {
        prompt: Vec<u32>,
        joins_at: usize,
        cache: SeqCache,
        out: Vec<u32>,
        done: bool,
    }
    let mut seqs: Vec<Seq> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| Seq {
            prompt: ids(&c["prompt_ids"]),
            joins_at: i * 2,
            cache: model.new_cache().unwrap(),
            out: Vec::new(),
            done: false,
        })
        .collect();
    let mut step = 0;
    while seqs.iter().any(|s| !s.done) {
        let mut active: Vec<&mut Seq> = seqs
            .iter_mut()
            .filter(|s| !s.done && s.joins_at <= step)
            .collect();
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .map(|s| {
                if s.cache.is_empty() {
                    s.prompt.clone()
                } else {
                    vec![*s.out.last().unwrap()]
                }
            })
            .collect();
        if !active.is_empty() {
            let mut steps: Vec<SeqStep> = active
                .iter_mut()
                .zip(&inputs)
                .map(|(s, t)| SeqStep {
                    tokens: t,
                    cache: &mut s.cache,
                })
                .collect();
            let logits = model.forward(&mut steps).unwrap().to_vec2::<f32>().unwrap();
            for (s, row) in active.iter_mut().zip(logits) {
                let next = argmax(&row);
                s.out.push(next);
                s.done = eos.contains(&next) || s.out.len() == max_new;
            }
        }
        step += 1;
    }
    for (i, (s, c)) in seqs.iter().zip(cases).enumerate() {
        assert_eq!(
            s.out,
            ids(&c["generated_ids"]),
            "{name} case {i}: batched greedy ids"
        );
        assert_eq!(
            s.cache.len(),
            s.prompt.len() + s.out.len() - 1,
            "{name} case {i}: cache length"
        );
    }
}

#[test]
fn glm4_9b_chat_hf_matches_transformers() {
    check_tiny("glm4-9b-chat-hf");
}

#[test]
fn glm4_0414_matches_transformers() {
    check_tiny("glm4-0414");
}

#[test]
fn qwen2_matches_transformers() {
    check_tiny("qwen2");
}

#[test]
fn llama3_matches_transformers() {
    check_tiny("llama");
}

#[test]
fn glm4_9b_chat_hf_batched_equals_single() {
    check_batched("glm4-9b-chat-hf");
}

#[test]
fn glm4_0414_batched_equals_single() {
    check_batched("glm4-0414");
}

#[test]
fn qwen2_batched_equals_single() {
    check_batched("qwen2");
}

#[test]
fn llama3_batched_equals_single() {
    check_batched("llama");
}

#[test]
fn glm4_9b_chat_hf_mixed_forward_equals_alone() {
    check_mixed_forward("glm4-9b-chat-hf");
}

#[test]
fn glm4_0414_mixed_forward_equals_alone() {
    check_mixed_forward("glm4-0414");
}

#[test]
fn qwen2_mixed_forward_equals_alone() {
    check_mixed_forward("qwen2");
}

#[test]
fn llama3_mixed_forward_equals_alone() {
    check_mixed_forward("llama");
}

// ---------------------------------------------------------------------------------------------
// Shapes other than the fixtures': a fixture widened so that the network computes the same
// function (key/value heads duplicated, MLP padded with zero units, vocabulary padded with zero
// rows) must still reproduce the fixture's reference. Nothing in the loader may assume a size.
// ---------------------------------------------------------------------------------------------

struct Widen {
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    max_positions: usize,
}

/// Rows `[n * block, ...]` -> each block of `block` rows repeated `times` times in place
/// (key/value head `j` of the widened model is head `j / times` of the original).
fn repeat_blocks(t: &Tensor, block: usize, times: usize) -> Tensor {
    let n = t.dim(0).unwrap() / block;
    let parts: Vec<Tensor> = (0..n)
        .flat_map(|j| std::iter::repeat_n(t.narrow(0, j * block, block).unwrap(), times))
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

/// Zero rows (dim 0) or columns (dim 1) appended up to `to`.
fn pad(t: &Tensor, dim: usize, to: usize) -> Tensor {
    let mut shape = t.dims().to_vec();
    let extra = to - shape[dim];
    shape[dim] = extra;
    let zeros = Tensor::zeros(shape, t.dtype(), t.device()).unwrap();
    Tensor::cat(&[t, &zeros], dim).unwrap()
}

fn widen_tensor(name: &str, t: &Tensor, cfg: &Value, w: &Widen) -> Tensor {
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map(|d| d as usize)
        .unwrap_or_else(|| {
            (cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap())
                as usize
        });
    let kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let inter = cfg["intermediate_size"].as_u64().unwrap() as usize;
    if name.contains("self_attn.k_proj") || name.contains("self_attn.v_proj") {
        return repeat_blocks(t, head_dim, w.kv_heads / kv);
    }
    if name.ends_with("mlp.gate_up_proj.weight") {
        // Gate rows first, then up rows: each half padded on its own.
        let (gate, up) = (
            t.narrow(0, 0, inter).unwrap(),
            t.narrow(0, inter, inter).unwrap(),
        );
        return Tensor::cat(
            &[pad(&gate, 0, w.intermediate), pad(&up, 0, w.intermediate)],
            0,
        )
        .unwrap();
    }
    if name.ends_with("mlp.gate_proj.weight") || name.ends_with("mlp.up_proj.weight") {
        return pad(t, 0, w.intermediate);
    }
    if name.ends_with("mlp.down_proj.weight") {
        return pad(t, 1, w.intermediate);
    }
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        return pad(t, 0, w.vocab);
    }
    t.clone()
}

/// A copy of a tiny fixture with the widened shapes, in a temp folder.
fn widened_fixture(name: &str, w: &Widen) -> tempfile::TempDir {
    let src = tiny_dir(name);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let widened: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), widen_tensor(n, t, &cfg, w)))
        .collect();
    candle_core::safetensors::save(&widened, dir.path().join("model.safetensors")).unwrap();
    cfg["num_key_value_heads"] = json!(w.kv_heads);
    cfg["intermediate_size"] = json!(w.intermediate);
    cfg["vocab_size"] = json!(w.vocab);
    cfg["max_position_embeddings"] = json!(w.max_positions);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn check_widened(name: &str, w: Widen) {
    let reference = read_json(&tiny_dir(name).join("reference.json"));
    let original_vocab = reference["config_vocab_size"].as_u64().unwrap() as usize;
    let dir = widened_fixture(name, &w);
    let chat = load_dir(dir.path());
    let info = chat.model.info();
    assert_eq!(
        (info.vocab_size, info.max_context),
        (w.vocab, w.max_positions),
        "{name}: widened info"
    );
    check_generation(name, &chat, &reference, original_vocab);
}

#[test]
fn llama3_with_other_shapes_matches_transformers() {
    // GQA 4:1 becomes plain multi-head attention; 112 -> 200 MLP units; 587 -> 640 vocabulary rows.
    check_widened(
        "llama",
        Widen {
            kv_heads: 4,
            intermediate: 200,
            vocab: 640,
            max_positions: 2048,
        },
    );
}

#[test]
fn glm4_0414_with_other_shapes_matches_transformers() {
    // Fused gate/up projection and q/k/v biases; 2 -> 4 key/value heads, 160 -> 176 units.
    check_widened(
        "glm4-0414",
        Widen {
            kv_heads: 4,
            intermediate: 176,
            vocab: 608,
            max_positions: 4096,
        },
    );
}

/// A token id beyond the embedding rows is an error (the engine drops that sequence), not a panic.
#[test]
fn out_of_vocabulary_token_is_an_error() {
    let (chat, _) = load_tiny("qwen2");
    let model = chat.model.as_ref();
    let vocab = model.info().vocab_size as u32;
    let mut cache = model.new_cache().unwrap();
    let err = model
        .forward(&mut [SeqStep {
            tokens: &[1, vocab],
            cache: &mut cache,
        }])
        .expect_err("forward must fail")
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn families_are_detected_for_tiny_chat_fixtures() {
    let root = fixtures_dir().join("tiny");
    assert_eq!(
        detect_family(&root.join("glm4-9b-chat-hf")).unwrap(),
        Family::Glm
    );
    assert_eq!(detect_family(&root.join("llama")).unwrap(), Family::Llama);
}

#[test]
fn missing_weights_fail_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("tiny").join("qwen2");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let err = chat::load(dir.path(), Family::Qwen2, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("model.safetensors"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Real SmolLM2-135M-Instruct Q4_1 GGUF
// ---------------------------------------------------------------------------------------------

fn smollm2(mode: GgufMode) -> (LoadedChat, Value) {
    let file = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        file.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set GLM_MODELS_DIR)",
        file.display()
    );
    let reference = read_json(&fixtures_dir().join("real/smollm2/reference.json"));
    let chat = match mode {
        // What the server does with a .gguf path (chat::load picks Auto).
        GgufMode::Auto => load_dir(&file),
        _ => {
            let options = chat::ChatLoadOptions {
                gguf_mode: mode,
                ..chat::ChatLoadOptions::on(&Device::Cpu)
            };
            gguf::load(&file, &options).unwrap()
        }
    };
    (chat, reference)
}

#[test]
fn smollm2_gguf_tokenizer_and_template_match_transformers() {
    let (chat, reference) = smollm2(GgufMode::Auto);
    check_tokenization(&chat, &reference);
    for case in reference["cases"].as_array().unwrap() {
        let prompt = encode(&chat, case["prompt_text"].as_str().unwrap(), false);
        assert_eq!(prompt, ids(&case["prompt_ids"]));
    }
    assert_eq!(
        chat.chat_template.as_deref(),
        reference["chat_template"].as_str()
    );
    check_template("smollm2", &chat, &reference);
    assert_eq!(chat.eos_token_ids, ids(&reference["eos_token_ids"]));
    assert_eq!(chat.eos_token.as_deref(), Some("<|im_end|>"));
}

/// Greedy ids of the reference up to the first step whose margin is too small for another
/// implementation (quantized activations) to be expected to agree.
fn check_smollm2_greedy(chat: &LoadedChat, reference: &Value, min_margin: f64) {
    let eos = ids(&reference["eos_token_ids"]);
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["generated_ids"]);
        let margins = floats(&case["greedy_margins"]);
        let sure = margins
            .iter()
            .position(|m| f64::from(*m) < min_margin)
            .unwrap_or(want.len());
        let (got, finish) = greedy(chat.model.as_ref(), &prompt, want.len(), &eos);
        assert_eq!(
            got[..sure],
            want[..sure],
            "case {i}: greedy ids before step {sure}"
        );
        if sure == want.len() {
            assert_eq!(
                finish,
                case["finish_reason"].as_str().unwrap(),
                "case {i}: finish reason"
            );
        }
    }
}

/// Quantized kernels (Q4_1 weights x Q8 activations) move logits by a few tenths over 30 layers, so
/// the top-1 is only required where the reference's first greedy margin is at least 0.1 (the
/// README's bound for this mode; the top-1 at the last prompt position is that first greedy step).
#[test]
fn smollm2_quantized_kernels_agree_with_dequantized_reference() {
    const SURE_MARGIN: f64 = 0.1;
    let (chat, reference) = smollm2(GgufMode::Quantized);
    let mut checked = 0;
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let first_margin = f64::from(floats(&case["greedy_margins"])[0]);
        if first_margin < SURE_MARGIN {
            continue;
        }
        let (logits, _) = prefill_logits(chat.model.as_ref(), &ids(&case["prompt_ids"]));
        let top = ids(&case["last_logits_top20"]["ids"]);
        assert_eq!(argmax(&logits), top[0], "case {i}: top-1");
        checked += 1;
    }
    assert!(
        checked >= 2,
        "only {checked} cases have a first margin >= {SURE_MARGIN}"
    );
    check_smollm2_greedy(&chat, &reference, SURE_MARGIN);
}

/// The server's load of the default model (`GgufMode::Auto`: 135M parameters fit the dequantize
/// budget) reproduces transformers, which also runs the weights dequantized to float32.
#[test]
fn smollm2_server_load_matches_transformers_top20() {
    let (chat, reference) = smollm2(GgufMode::Auto);
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let (logits, _) = prefill_logits(chat.model.as_ref(), &ids(&case["prompt_ids"]));
        let top = ids(&case["last_logits_top20"]["ids"]);
        let want = floats(&case["last_logits_top20"]["logits"]);
        for (id, w) in top.iter().zip(want) {
            let got = logits[*id as usize];
            assert!(
                (got - w).abs() <= 2e-3,
                "case {i}: logit of {id}: {got} vs {w}"
            );
        }
    }
    check_smollm2_greedy(&chat, &reference, 0.0);
}

/// Two prompts of different lengths in one forward give each the logits it gets alone, with the
/// quantized kernels and with dequantized weights.
fn check_smollm2_mixed_forward(mode: GgufMode) {
    let (chat, reference) = smollm2(mode);
    let model = chat.model.as_ref();
    let cases = reference["cases"].as_array().unwrap();
    let (a, b) = (ids(&cases[0]["prompt_ids"]), ids(&cases[2]["prompt_ids"]));
    let (alone_a, _) = prefill_logits(model, &a);
    let (alone_b, _) = prefill_logits(model, &b);
    let (mut cache_a, mut cache_b) = (model.new_cache().unwrap(), model.new_cache().unwrap());
    let rows = model
        .forward(&mut [
            SeqStep {
                tokens: &b,
                cache: &mut cache_b,
            },
            SeqStep {
                tokens: &a,
                cache: &mut cache_a,
            },
        ])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (da, db) = (
        max_abs_diff(&rows[1], &alone_a),
        max_abs_diff(&rows[0], &alone_b),
    );
    // 30 layers and logits around 30: summation order (the matmul blocks differ with the number of
    // rows) shows at 1e-6 relative, so the bound scales with the logits.
    let scale = alone_a
        .iter()
        .chain(&alone_b)
        .fold(1f32, |m, x| m.max(x.abs()));
    let tol = BATCH_TOL * scale;
    assert!(
        da <= tol && db <= tol,
        "batched vs alone: {da}, {db} (tolerance {tol})"
    );
}

#[test]
fn smollm2_quantized_mixed_forward_equals_alone() {
    check_smollm2_mixed_forward(GgufMode::Quantized);
}

#[test]
fn smollm2_dequantized_mixed_forward_equals_alone() {
    check_smollm2_mixed_forward(GgufMode::Dequantized);
}

// ---------------------------------------------------------------------------------------------
// GGUF files of the other architectures, written from the tiny fixtures the way llama.cpp's
// convert_hf_to_gguf.py writes them (llama.cpp tensor names, q/k rows permuted for llama, llama3
// scaling as `rope_freqs.weight`, tokenizer as `tokenizer.ggml.*`), float32 so the numbers stay
// the reference's: the GGUF loader must reproduce transformers on each.
// ---------------------------------------------------------------------------------------------

use candle_core::quantized::gguf_file::Value as GgufValue;
use candle_core::quantized::{GgmlDType, QTensor};

/// transformers name -> llama.cpp name (None: not stored in the GGUF).
fn llama_cpp_name(hf: &str) -> Option<String> {
    let short = match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => hf.strip_prefix("model.layers.")?,
    };
    let (layer, rest) = short.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_self_attn_layernorm" => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "post_mlp_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

/// convert_hf_to_gguf's `LlamaModel.permute`: rotate-half q/k rows reordered for pairwise rope.
fn permute_for_pairs(w: &Tensor, heads: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let half = dims[0] / heads / 2;
    let mut shape = vec![heads, 2, half];
    shape.extend_from_slice(&dims[1..]);
    w.reshape(shape)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// convert_hf_to_gguf's llama3 `rope_freqs`: one divisor per rotary frequency.
fn llama3_rope_factors(cfg: &Value, rot_dim: usize) -> Tensor {
    let s = &cfg["rope_scaling"];
    let (factor, low, high, old) = (
        s["factor"].as_f64().unwrap(),
        s["low_freq_factor"].as_f64().unwrap(),
        s["high_freq_factor"].as_f64().unwrap(),
        s["original_max_position_embeddings"].as_f64().unwrap(),
    );
    let base = cfg["rope_theta"].as_f64().unwrap();
    let factors: Vec<f32> = (0..rot_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / rot_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    Tensor::new(factors, &Device::Cpu).unwrap()
}

fn gguf_strings(items: impl IntoIterator<Item = String>) -> GgufValue {
    GgufValue::Array(items.into_iter().map(GgufValue::String).collect())
}

/// `tokenizer.ggml.*` from a tokenizer.json: tokens in id order (padded to the model's rows),
/// merges as "a b", token types (1 normal, 3 control = special added, 4 user-defined).
fn gguf_tokenizer(dir: &Path, rows: usize, pre: &str, add_bos: bool) -> Vec<(String, GgufValue)> {
    let tok = read_json(&dir.join("tokenizer.json"));
    let tok_cfg = read_json(&dir.join("tokenizer_config.json"));
    let gen = read_json(&dir.join("generation_config.json"));
    let mut tokens = vec![String::new(); rows];
    let mut types = vec![1i32; rows];
    for (t, id) in tok["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_owned();
        types[id] = if a["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
    }
    for (i, t) in tokens.iter_mut().enumerate().filter(|(_, t)| t.is_empty()) {
        *t = format!("[PAD{i}]");
        types[i] = 4;
    }
    let merges = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
        });
    let eos = match &gen["eos_token_id"] {
        Value::Array(list) => list[0].as_u64().unwrap() as u32,
        one => one.as_u64().unwrap() as u32,
    };
    let mut meta = vec![
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), gguf_strings(tokens.clone())),
        ("tokenizer.ggml.merges".into(), gguf_strings(merges)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(eos)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(add_bos),
        ),
        (
            "tokenizer.chat_template".into(),
            GgufValue::String(tok_cfg["chat_template"].as_str().unwrap().into()),
        ),
    ];
    if let Some(bos) = tok_cfg["bos_token"]
        .as_str()
        .and_then(|b| tokens.iter().position(|t| t == b))
    {
        meta.push((
            "tokenizer.ggml.bos_token_id".into(),
            GgufValue::U32(bos as u32),
        ));
    }
    meta
}

/// Write `name` as `<tmp>/model.gguf` with llama.cpp architecture `arch`.
fn fixture_as_gguf(
    name: &str,
    arch: &str,
    pre: &str,
    add_bos: bool,
) -> (tempfile::TempDir, PathBuf) {
    let src = tiny_dir(name);
    let cfg = read_json(&src.join("config.json"));
    let num = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (hidden, heads) = (num("hidden_size"), num("num_attention_heads"));
    let kv_heads = cfg["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |v| v as usize);
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |v| v as usize);
    let rot_dim = (head_dim as f64 * cfg["partial_rotary_factor"].as_f64().unwrap_or(1.0)) as usize;

    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (hf, t) in
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap()
    {
        let Some(gguf) = llama_cpp_name(&hf) else {
            continue;
        };
        let t = match (arch, hf.rsplit('.').nth(1)) {
            ("llama", Some("q_proj")) => permute_for_pairs(&t, heads),
            ("llama", Some("k_proj")) => permute_for_pairs(&t, kv_heads),
            _ => t,
        };
        tensors.push((gguf, t));
    }
    if cfg["rope_scaling"]["rope_type"].as_str() == Some("llama3") {
        tensors.push((
            "rope_freqs.weight".into(),
            llama3_rope_factors(&cfg, rot_dim),
        ));
    }
    let rows = num("vocab_size");
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        (key("embedding_length"), GgufValue::U32(hidden as u32)),
        (
            key("block_count"),
            GgufValue::U32(num("num_hidden_layers") as u32),
        ),
        (
            key("feed_forward_length"),
            GgufValue::U32(num("intermediate_size") as u32),
        ),
        (key("attention.head_count"), GgufValue::U32(heads as u32)),
        (
            key("attention.head_count_kv"),
            GgufValue::U32(kv_heads as u32),
        ),
        (key("attention.key_length"), GgufValue::U32(head_dim as u32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            key("rope.freq_base"),
            GgufValue::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (key("rope.dimension_count"), GgufValue::U32(rot_dim as u32)),
        (
            key("context_length"),
            GgufValue::U32(num("max_position_embeddings") as u32),
        ),
    ];
    meta.extend(gguf_tokenizer(&src, rows, pre, add_bos));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let meta_refs: Vec<(&str, &GgufValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    (dir, path)
}

fn check_gguf_fixture(name: &str, arch: &str, pre: &str, add_bos: bool) {
    let (_dir, path) = fixture_as_gguf(name, arch, pre, add_bos);
    let reference = read_json(&tiny_dir(name).join("reference.json"));
    let chat = load_dir(&path);
    assert_eq!(chat.model.info().family, format!("gguf-{arch}"));
    assert_eq!(
        chat.eos_token_ids,
        ids(&reference["eos_token_ids"]),
        "{name}: stop ids"
    );
    for t in reference["tokenization"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            encode(&chat, text, false),
            ids(&t["ids"]),
            "{name}: ids of {text:?}"
        );
        if add_bos {
            let want = ids(&t["ids_add_special_tokens"]);
            assert_eq!(
                encode(&chat, text, true),
                want,
                "{name}: ids with BOS of {text:?}"
            );
        }
    }
    check_template(name, &chat, &reference);
    check_generation(name, &chat, &reference, usize::MAX);
}

#[test]
fn gguf_qwen2_from_the_tiny_fixture_matches_transformers() {
    check_gguf_fixture("qwen2", "qwen2", "deepseek-r1-qwen", true);
}

#[test]
fn gguf_llama_from_the_tiny_fixture_matches_transformers() {
    check_gguf_fixture("llama", "llama", "llama-bpe", true);
}

#[test]
fn gguf_glm4_from_the_tiny_fixture_matches_transformers() {
    // GLM-4's [gMASK]<sop> prefix is in the rendered prompt; llama.cpp adds no BOS for glm4.
    check_gguf_fixture("glm4-0414", "glm4", "glm4", false);
}
