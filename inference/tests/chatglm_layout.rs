//! THUDM's original GLM-4 layout (`ChatGLMModel`, tiktoken `tokenizer.model`), built here from the
//! `glm4-9b-chat-hf` fixture exactly as THUDM names and fuses the tensors, must load through
//! `chatglm::load` and reproduce the fixture's transformers reference.
mod chat_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use glm_inference::models::chat::tiktoken;
use glm_inference::models::{chat, detect_family, Family, LoadedChat};
use serde_json::{json, Value};

use chat_support::{
    check_template, floats, forward_one, greedy_from, ids, max_abs_diff, read_json, tiny_dir,
    LOGITS_TOL,
};

const MAX_NEW_TOKENS: usize = 12;

fn fixture_dir() -> PathBuf {
    tiny_dir("glm4-9b-chat-hf")
}

/// THUDM's config.json keys for the fixture's shapes.
fn original_config(hf: &Value) -> Value {
    let heads = hf["num_attention_heads"].as_u64().unwrap();
    let kv_heads = hf["num_key_value_heads"].as_u64().unwrap();
    json!({
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "num_layers": hf["num_hidden_layers"],
        "padded_vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "kv_channels": hf["head_dim"],
        "num_attention_heads": heads,
        "multi_query_attention": kv_heads != heads,
        "multi_query_group_num": kv_heads,
        "layernorm_epsilon": hf["rms_norm_eps"],
        "seq_length": hf["max_position_embeddings"],
        // rope base = 10000 * rope_ratio
        "rope_ratio": hf["rope_theta"].as_f64().unwrap() / 10_000.0,
        "rmsnorm": true,
        "apply_residual_connection_post_layernorm": false,
        "post_layer_norm": true,
        "add_bias_linear": false,
        "add_qkv_bias": hf["attention_bias"],
        "original_rope": true,
        "eos_token_id": hf["eos_token_id"],
        "pad_token_id": hf["pad_token_id"],
        "tie_word_embeddings": false,
        "torch_dtype": "float32"
    })
}

/// The `-hf` tensors under THUDM's names: q/k/v fused into `query_key_value` (weight and bias),
/// `gate_up_proj` is `dense_h_to_4h` (gate rows first in both).
fn original_tensors(hf: HashMap<String, Tensor>, layers: usize) -> HashMap<String, Tensor> {
    let take = |name: &str| {
        hf.get(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"))
            .clone()
    };
    let mut out = HashMap::new();
    out.insert(
        "transformer.embedding.word_embeddings.weight".into(),
        take("model.embed_tokens.weight"),
    );
    out.insert(
        "transformer.encoder.final_layernorm.weight".into(),
        take("model.norm.weight"),
    );
    out.insert(
        "transformer.output_layer.weight".into(),
        take("lm_head.weight"),
    );
    for i in 0..layers {
        let (hf_p, p) = (
            format!("model.layers.{i}"),
            format!("transformer.encoder.layers.{i}"),
        );
        for suffix in ["weight", "bias"] {
            let parts: Vec<Tensor> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|q| take(&format!("{hf_p}.self_attn.{q}.{suffix}")))
                .collect();
            out.insert(
                format!("{p}.self_attention.query_key_value.{suffix}"),
                Tensor::cat(&parts, 0).unwrap(),
            );
        }
        let renames = [
            ("self_attn.o_proj.weight", "self_attention.dense.weight"),
            ("mlp.gate_up_proj.weight", "mlp.dense_h_to_4h.weight"),
            ("mlp.down_proj.weight", "mlp.dense_4h_to_h.weight"),
            ("input_layernorm.weight", "input_layernorm.weight"),
            (
                "post_attention_layernorm.weight",
                "post_attention_layernorm.weight",
            ),
        ];
        for (from, to) in renames {
            out.insert(format!("{p}.{to}"), take(&format!("{hf_p}.{from}")));
        }
    }
    // The release also stores the rotary table; loaders must ignore it.
    out.insert(
        "transformer.rotary_pos_emb.inv_freq".into(),
        Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    out
}

/// tiktoken ranks from the `-hf` byte-level BPE vocabulary (rank = id), without the added tokens.
fn ranks_file(tokenizer_json: &Value) -> String {
    let vocab = tokenizer_json["model"]["vocab"].as_object().unwrap();
    let mut ranks: Vec<(Vec<u8>, u32)> = vocab
        .iter()
        .map(|(token, id)| {
            (
                tiktoken::bytes_from_byte_level(token).unwrap(),
                id.as_u64().unwrap() as u32,
            )
        })
        .collect();
    ranks.sort_by_key(|(_, id)| *id);
    tiktoken::format_ranks(&ranks)
}

/// A temp folder holding the fixture as THUDM/glm-4-9b-chat ships it (no tokenizer.json).
fn build_original_layout() -> tempfile::TempDir {
    let src = fixture_dir();
    let dir = tempfile::tempdir().unwrap();
    let hf_cfg = read_json(&src.join("config.json"));
    std::fs::write(
        dir.path().join("config.json"),
        original_config(&hf_cfg).to_string(),
    )
    .unwrap();
    let hf = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let layers = hf_cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    candle_core::safetensors::save(
        &original_tensors(hf, layers),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer.model"),
        ranks_file(&read_json(&src.join("tokenizer.json"))),
    )
    .unwrap();
    for f in [
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// The folder as the server loads it: detected as THUDM's layout, then `chat::load`.
fn load_original(dir: &Path) -> LoadedChat {
    assert_eq!(detect_family(dir).unwrap(), Family::ChatGlm);
    chat::load(dir, Family::ChatGlm, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn tiktoken_tokenizer_matches_the_hf_tokenizer() {
    let dir = build_original_layout();
    assert!(!dir.path().join("tokenizer.json").exists());
    let reference = read_json(&fixture_dir().join("reference.json"));
    let loaded = load_original(dir.path());
    for t in reference["tokenization"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let plain = loaded.tokenizer.encode(text, false).unwrap();
        assert_eq!(plain.get_ids(), ids(&t["ids"]).as_slice(), "{text:?}");
        let with = loaded.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            with.get_ids(),
            ids(&t["ids_add_special_tokens"]).as_slice(),
            "{text:?}"
        );
        assert_eq!(
            loaded.tokenizer.decode(plain.get_ids(), false).unwrap(),
            t["decoded"].as_str().unwrap()
        );
    }
    for case in reference["cases"].as_array().unwrap() {
        let enc = loaded
            .tokenizer
            .encode(case["prompt_text"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(enc.get_ids(), ids(&case["prompt_ids"]).as_slice());
    }
    assert_eq!(loaded.eos_token_ids, ids(&reference["eos_token_ids"]));
    check_template("THUDM layout", &loaded, &reference);
}

#[test]
fn original_layout_reproduces_the_reference() {
    let dir = build_original_layout();
    let reference = read_json(&fixture_dir().join("reference.json"));
    let loaded = load_original(dir.path());
    let model = loaded.model.as_ref();
    let eos = ids(&reference["eos_token_ids"]);
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let mut cache = model.new_cache().unwrap();
        let logits = forward_one(model, &ids(&case["prompt_ids"]), &mut cache);
        let diff = max_abs_diff(&logits, &floats(&case["last_logits"]));
        assert!(
            diff <= LOGITS_TOL,
            "case {i}: last_logits max abs diff {diff}"
        );
        let (generated, finish, _) = greedy_from(model, logits, cache, MAX_NEW_TOKENS, &eos);
        assert_eq!(generated, ids(&case["generated_ids"]), "case {i}");
        assert_eq!(finish, case["finish_reason"].as_str().unwrap(), "case {i}");
    }
}

/// ChatGLM3-style folders carry a binary SentencePiece `tokenizer.model`: the load fails naming the
/// file and what is expected instead of a parse error deep in the ranks.
#[test]
fn sentencepiece_tokenizer_model_is_refused_with_a_clear_message() {
    let dir = build_original_layout();
    std::fs::write(
        dir.path().join("tokenizer.model"),
        [0x0a, 0x0b, 0xff, 0xfe, 0x00, 0x12],
    )
    .unwrap();
    let err = chat::load(dir.path(), Family::ChatGlm, &Device::Cpu)
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains("tokenizer.model") && err.contains("tiktoken"),
        "{err}"
    );
}
