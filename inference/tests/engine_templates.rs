//! Chat templates render exactly what transformers' `apply_chat_template` rendered for every chat
//! fixture, and the rendered text encodes (no special tokens added) to the reference ids.
use std::path::PathBuf;

use glm_inference::engine::ChatTemplate;
use glm_inference::models::chat::snapshot::load_chat_assets;
use serde_json::Value;

fn fixtures() -> PathBuf {
    std::env::var("GLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into())
        .into()
}

fn reference(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("{}: {e}; the fixtures come with the repository's shared/fixtures (GLM_FIXTURES_DIR overrides)", path.display())
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases(reference: &Value) -> &Vec<Value> {
    reference["cases"]
        .as_array()
        .filter(|c| !c.is_empty())
        .expect("reference.json has cases")
}

fn messages(case: &Value) -> Vec<Value> {
    case["messages"]
        .as_array()
        .cloned()
        .expect("case has messages")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn check_snapshot(name: &str) {
    let dir = fixtures().join("tiny").join(name);
    let assets = load_chat_assets(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let source = assets
        .chat_template
        .as_deref()
        .unwrap_or_else(|| panic!("{name}: no chat_template"));
    let template = ChatTemplate::new(
        source,
        assets.bos_token.as_deref(),
        assets.eos_token.as_deref(),
    )
    .unwrap();
    let reference = reference(&dir.join("reference.json"));
    for (i, case) in cases(&reference).iter().enumerate() {
        let text = template
            .render(&messages(case), None, true)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "{name} case {i}: prompt text"
        );
        let enc = assets.tokenizer.encode(text.as_str(), false).unwrap();
        assert_eq!(
            enc.get_ids(),
            ids(&case["prompt_ids"]).as_slice(),
            "{name} case {i}: prompt ids"
        );
    }
}

#[test]
fn glm4_9b_chat_hf_template() {
    check_snapshot("glm4-9b-chat-hf");
}

#[test]
fn glm4_0414_template() {
    check_snapshot("glm4-0414");
}

#[test]
fn qwen2_r1_distill_template() {
    check_snapshot("qwen2");
}

#[test]
fn llama_r1_distill_template() {
    check_snapshot("llama");
}

#[test]
fn deepseek_v3_r1_template() {
    check_snapshot("deepseek-v3");
}

/// SmolLM2's template comes from its GGUF (copied into reference.json); it adds a default system
/// prompt when the conversation has none. (Its ids are checked against the GGUF tokenizer in
/// `engine_http`, where the real model is loaded.)
#[test]
fn smollm2_gguf_template_text() {
    let reference = reference(&fixtures().join("real/smollm2/reference.json"));
    let source = reference["chat_template"].as_str().expect("chat_template");
    let template = ChatTemplate::new(source, None, None).unwrap();
    for (i, case) in cases(&reference).iter().enumerate() {
        let text = template.render(&messages(case), None, true).unwrap();
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "smollm2 case {i}"
        );
    }
}

/// The R1 templates drop earlier turns' reasoning and concatenate several system messages; tool
/// calls pass through to the template.
#[test]
fn deepseek_template_system_join_and_tool_calls() {
    let dir = fixtures().join("tiny/deepseek-v3");
    let assets = load_chat_assets(&dir).unwrap();
    let template = ChatTemplate::new(
        assets.chat_template.as_deref().unwrap(),
        assets.bos_token.as_deref(),
        None,
    )
    .unwrap();
    let messages: Vec<Value> = serde_json::from_value(serde_json::json!([
        {"role": "system", "content": "A."},
        {"role": "system", "content": "B."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"}
    ]))
    .unwrap();
    let text = template.render(&messages, None, true).unwrap();
    assert_eq!(
        text,
        "<｜begin▁of▁sentence｜>A.\n\nB.<｜User｜>weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    );
}
