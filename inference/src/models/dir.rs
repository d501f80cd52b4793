//! A Hugging Face model folder: the one place that reads its JSON files and finds its weight
//! files, for every family. Errors name the file and the problem.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;

use super::ModelError;

/// A snapshot folder (`config.json`, `tokenizer_config.json`, weights...).
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
}

impl ModelDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ModelDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `config.json` as `T`.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, ModelError> {
        read_json(&self.file("config.json"))
    }

    /// `config.json` as `T`, or None when the folder has none.
    pub fn config_opt<T: DeserializeOwned>(&self) -> Result<Option<T>, ModelError> {
        self.json_opt(&self.file("config.json"))
    }

    /// `tokenizer_config.json`; empty when the folder has none.
    pub fn tokenizer_config(&self) -> Result<TokenizerConfig, ModelError> {
        Ok(self
            .json_opt(&self.file("tokenizer_config.json"))?
            .unwrap_or_default())
    }

    /// `generation_config.json`; empty when the folder has none.
    pub fn generation_config(&self) -> Result<GenerationConfig, ModelError> {
        Ok(self
            .json_opt(&self.file("generation_config.json"))?
            .unwrap_or_default())
    }

    /// `model.safetensors`, or the distinct shards listed in `model.safetensors.index.json`
    /// (all must exist).
    pub fn safetensors_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        let single = self.file("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = self.file("model.safetensors.index.json");
        if !index.is_file() {
            return Err(ModelError::load(
                &self.path,
                "no model.safetensors or model.safetensors.index.json",
            ));
        }
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let parsed: Index = read_json(&index)?;
        let mut files: Vec<PathBuf> = parsed
            .weight_map
            .into_values()
            .map(|f| self.path.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::load(
                missing,
                "listed in model.safetensors.index.json but missing",
            ));
        }
        Ok(files)
    }

    /// A JSON file that may be absent.
    fn json_opt<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, ModelError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| ModelError::load(path, format!("invalid JSON: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ModelError::load(path, e)),
        }
    }
}

/// Read a JSON file of a model folder; errors name the file.
pub(crate) fn read_json<T: DeserializeOwned>(file: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ModelError::load(file, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| ModelError::load(file, format!("invalid JSON: {e}")))
}

/// What the server reads of `tokenizer_config.json`. Fields of unexpected types read as absent,
/// as the reference libraries ignore them.
#[derive(Debug, Default, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default)]
    bos_token: Option<TokenName>,
    #[serde(default)]
    eos_token: Option<TokenName>,
    #[serde(default)]
    cls_token: Option<TokenName>,
    #[serde(default)]
    pad_token: Option<TokenName>,
    #[serde(default)]
    unk_token: Option<TokenName>,
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    model_max_length: Option<serde_json::Value>,
    /// id (as a string) -> the added token.
    #[serde(default)]
    pub added_tokens_decoder: Option<BTreeMap<String, AddedToken>>,
}

/// A special token as transformers saves it: a plain string or an AddedToken object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Added { content: String },
    Other(IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    /// `[{name, template}]`, where "default" is the chat template.
    Named(Vec<NamedTemplate>),
    Other(IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: Option<String>,
    template: Option<String>,
}

/// An entry of `added_tokens_decoder`.
#[derive(Debug, Deserialize)]
pub struct AddedToken {
    pub content: Option<String>,
}

/// Which special token of [`TokenizerConfig::token`].
#[derive(Debug, Clone, Copy)]
pub enum SpecialToken {
    Bos,
    Eos,
    Cls,
    Pad,
    Unk,
}

impl TokenizerConfig {
    /// A special token's text, whichever way it was saved.
    pub fn token(&self, which: SpecialToken) -> Option<&str> {
        let field = match which {
            SpecialToken::Bos => &self.bos_token,
            SpecialToken::Eos => &self.eos_token,
            SpecialToken::Cls => &self.cls_token,
            SpecialToken::Pad => &self.pad_token,
            SpecialToken::Unk => &self.unk_token,
        };
        match field.as_ref()? {
            TokenName::Plain(s) | TokenName::Added { content: s } => Some(s),
            TokenName::Other(_) => None,
        }
    }

    /// The chat template: the string, or the one named "default" in a list.
    pub fn chat_template(&self) -> Option<&str> {
        match self.chat_template.as_ref()? {
            TemplateField::One(s) => Some(s),
            TemplateField::Named(list) => list
                .iter()
                .find(|t| t.name.as_deref() == Some("default"))?
                .template
                .as_deref(),
            TemplateField::Other(_) => None,
        }
    }

    /// `model_max_length` when it is a whole number (transformers writes 1e30 for "unbounded").
    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length.as_ref()?.as_u64()
    }
}

/// What the server reads of `generation_config.json` (and of `config.json`, which older snapshots
/// use for the same keys).
#[derive(Debug, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

impl GenerationConfig {
    /// `eos_token_id`: a number or a list of numbers; ids that are not u32 are skipped.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let id = |n: &serde_json::Value| n.as_u64().and_then(|n| u32::try_from(n).ok());
        match &self.eos_token_id {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(id).collect(),
            Some(n) => id(n).into_iter().collect(),
            None => Vec::new(),
        }
    }
}
