//! `--load-format dummy` for every chat family: a folder holding a fixture's config.json and
//! tokenizer files but no weights loads with random weights of the config's shapes, and runs a
//! batched prefill and decode with finite logits of the vocabulary's width.
mod chat_support;

use std::path::Path;

use glm_inference::models::chat::{self, ChatLoadOptions, LoadFormat};
use glm_inference::models::{detect_family, Device, SeqStep};
use serde_json::{json, Value};

use chat_support::{ids, read_json, tiny_dir};

fn without_weights(src: &Path, config: Option<Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
    }
    if let Some(cfg) = config {
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    }
    dir
}

fn check(name: &str, dir: &Path, prompt: &[u32], vocab: usize) {
    let options = ChatLoadOptions {
        load_format: LoadFormat::Dummy,
        ..ChatLoadOptions::on(&Device::Cpu)
    };
    let family = detect_family(dir).unwrap();
    let chat = chat::load_with(dir, family, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = chat.model.as_ref();
    assert_eq!(model.info().vocab_size, vocab, "{name}");
    assert!(model.info().weight_bytes > 0, "{name}");
    let (mut a, mut b) = (model.new_cache().unwrap(), model.new_cache().unwrap());
    let logits = model
        .forward(&mut [
            SeqStep {
                tokens: prompt,
                cache: &mut a,
            },
            SeqStep {
                tokens: &prompt[..3],
                cache: &mut b,
            },
        ])
        .unwrap();
    assert_eq!(logits.dims(), &[2, vocab], "{name}");
    let logits = model
        .forward(&mut [SeqStep {
            tokens: &[prompt[0]],
            cache: &mut a,
        }])
        .unwrap();
    let row = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        row.iter().all(|x| x.is_finite()),
        "{name}: non-finite logits"
    );
    assert!(row.iter().any(|x| *x != row[0]), "{name}: constant logits");
}

#[test]
fn every_chat_family_loads_dummy_weights_from_its_config() {
    for name in [
        "glm4-9b-chat-hf",
        "glm4-0414",
        "qwen2",
        "llama",
        "deepseek-v3",
    ] {
        let src = tiny_dir(name);
        let reference = read_json(&src.join("reference.json"));
        let prompt = ids(&reference["cases"][0]["prompt_ids"]);
        let vocab = reference["config_vocab_size"].as_u64().unwrap() as usize;
        let dir = without_weights(&src, None);
        check(name, dir.path(), &prompt, vocab);
    }
}

/// GLM-4's THUDM layout: its own config keys, fused `query_key_value`.
#[test]
fn the_thudm_glm4_layout_loads_dummy_weights_from_its_config() {
    let src = tiny_dir("glm4-9b-chat-hf");
    let hf = read_json(&src.join("config.json"));
    let reference = read_json(&src.join("reference.json"));
    let thudm = json!({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "num_layers": hf["num_hidden_layers"], "padded_vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"], "ffn_hidden_size": hf["intermediate_size"],
        "kv_channels": hf["head_dim"], "num_attention_heads": hf["num_attention_heads"],
        "multi_query_attention": true, "multi_query_group_num": hf["num_key_value_heads"],
        "layernorm_epsilon": hf["rms_norm_eps"], "seq_length": 8192, "rope_ratio": 500,
        "rmsnorm": true, "add_qkv_bias": true, "eos_token_id": hf["eos_token_id"],
    });
    let dir = without_weights(&src, Some(thudm));
    let prompt = ids(&reference["cases"][0]["prompt_ids"]);
    check(
        "chatglm",
        dir.path(),
        &prompt,
        hf["vocab_size"].as_u64().unwrap() as usize,
    );
}
