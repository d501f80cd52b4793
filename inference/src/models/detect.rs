//! Decide a model folder's family from its config.json (or a .gguf file's architecture), so that a
//! bad `--model` fails at start with one line naming the folder and the problem.
use std::path::Path;

use super::ModelError;

/// Whether a family serves embeddings or chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Embedding,
    Chat,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Embedding => "embedding",
            ModelKind::Chat => "chat",
        }
    }

    pub fn is_chat(self) -> bool {
        self == ModelKind::Chat
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BertModel (text2vec-large-chinese, text2vec-base-multilingual, all-MiniLM-L6-v2).
    Bert,
    /// XLMRobertaModel (bge-m3).
    XlmRoberta,
    /// ErnieModel (ernie-3.0, text2vec-base-chinese-paraphrase).
    Ernie,
    /// transformers `GlmForCausalLM` (glm-4-9b-chat-hf).
    Glm,
    /// transformers `Glm4ForCausalLM` (GLM-4-9B-0414).
    Glm4,
    /// THUDM's original `ChatGLMModel` layout (glm-4-9b-chat, `transformer.encoder.*`).
    ChatGlm,
    Qwen2,
    Llama,
    DeepseekV3,
    /// A quantized .gguf file (llama, qwen2 or glm4 architecture inside).
    Gguf,
}

impl Family {
    pub fn kind(self) -> ModelKind {
        match self {
            Family::Bert | Family::XlmRoberta | Family::Ernie => ModelKind::Embedding,
            _ => ModelKind::Chat,
        }
    }
}

/// Detect the family of a model path: a `.gguf` file, or a folder holding config.json.
pub fn detect_family(path: &Path) -> Result<Family, ModelError> {
    if path.is_file() {
        return match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(Family::Gguf),
            _ => Err(ModelError::load(
                path,
                "is a file but not a .gguf; expected a model folder or a .gguf file",
            )),
        };
    }
    if !path.is_dir() {
        return Err(ModelError::load(path, "does not exist"));
    }
    let cfg: serde_json::Value = super::ModelDir::new(path).config()?;
    family_from_config(&cfg).ok_or_else(|| {
        let mt = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("<missing>");
        let arch = cfg.get("architectures").map(|v| v.to_string()).unwrap_or_else(|| "<missing>".into());
        ModelError::load(
            path,
            format!("unsupported model: model_type {mt}, architectures {arch} (supported: bert, xlm-roberta, ernie, glm, glm4, chatglm, qwen2, llama, deepseek_v3, .gguf)"),
        )
    })
}

pub fn family_from_config(cfg: &serde_json::Value) -> Option<Family> {
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let archs: Vec<&str> = cfg
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    let has = |name: &str| archs.contains(&name);
    Some(match model_type {
        "bert" => Family::Bert,
        "xlm-roberta" => Family::XlmRoberta,
        "ernie" => Family::Ernie,
        "glm" => Family::Glm,
        "glm4" => Family::Glm4,
        "chatglm" => Family::ChatGlm,
        "qwen2" => Family::Qwen2,
        "llama" => Family::Llama,
        "deepseek_v3" => Family::DeepseekV3,
        _ if has("ChatGLMModel") || has("ChatGLMForConditionalGeneration") => Family::ChatGlm,
        _ if has("BertModel") || has("BertForMaskedLM") => Family::Bert,
        _ if has("XLMRobertaModel") => Family::XlmRoberta,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_fixture_families() {
        let cases = [
            ("bert", Family::Bert),
            ("xlm-roberta", Family::XlmRoberta),
            ("ernie", Family::Ernie),
            ("glm4-9b-chat-hf", Family::Glm),
            ("glm4-0414", Family::Glm4),
            ("qwen2", Family::Qwen2),
            ("llama", Family::Llama),
            ("deepseek-v3", Family::DeepseekV3),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny");
        for (dir, fam) in cases {
            assert_eq!(detect_family(&root.join(dir)).unwrap(), fam, "{dir}");
        }
    }

    #[test]
    fn unknown_and_missing_folders_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("glm-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = detect_family(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), r#"{"model_type":"t5"}"#).unwrap();
        let err = detect_family(&dir).unwrap_err().to_string();
        assert!(err.contains("unsupported model: model_type t5"), "{err}");
        let err = detect_family(&dir.join("nope")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
