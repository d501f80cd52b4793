//! Served model name -> loaded model, built once from `--model NAME=PATH` before the server listens.
//! Every model is either an embedding model (tokenizer + batcher) or a chat model (served by
//! `crate::engine`); routes ask the registry for the kind they serve and get a precise error otherwise.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::ModelSpec;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::models::{
    self, Device, EmbedOutputs, EmbedderInfo, Family, LoadedEmbedder, ModelError, ModelKind,
};

/// An embedding model ready to serve.
pub struct EmbeddingModel {
    pub name: String,
    pub info: EmbedderInfo,
    pub tokenizer: Arc<Tokenizer>,
    /// Ids below this are valid token-id inputs (tokenizer vocabulary with added tokens).
    pub vocab_size: usize,
    pub batcher: Batcher,
}

impl EmbeddingModel {
    pub fn new(
        name: &str,
        loaded: LoadedEmbedder,
        config: BatcherConfig,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let info = loaded.embedder.info().clone();
        let vocab_size = loaded.tokenizer.get_vocab_size(true);
        let batcher = Batcher::new(name, loaded.embedder, config, metrics)
            .map_err(|e| format!("cannot start the batching thread of `{name}`: {e}"))?;
        Ok(EmbeddingModel {
            name: name.to_string(),
            info,
            tokenizer: Arc::new(loaded.tokenizer),
            vocab_size,
            batcher,
        })
    }
}

/// What a served name refers to. The chat engine adds `Chat(Arc<crate::engine::ChatEngine>)`.
pub enum ServedModel {
    Embedding(Arc<EmbeddingModel>),
}

impl ServedModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            ServedModel::Embedding(_) => ModelKind::Embedding,
        }
    }

    /// The tokenizer behind `/tokenize` and `/detokenize`.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        match self {
            ServedModel::Embedding(m) => &m.tokenizer,
        }
    }
}

pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    /// Unix seconds when the model was loaded (`created` in `/models`).
    pub created: i64,
    pub model: ServedModel,
}

pub struct Registry {
    entries: Vec<ModelEntry>,
    default_chat: Option<String>,
}

impl Registry {
    /// Build from already loaded entries (in `--model` order). `default_chat` must name a chat entry.
    pub fn new(entries: Vec<ModelEntry>, default_chat: Option<String>) -> Result<Self, String> {
        let chat_names: Vec<&str> = entries
            .iter()
            .filter(|e| e.model.kind() == ModelKind::Chat)
            .map(|e| e.name.as_str())
            .collect();
        let default_chat = match default_chat {
            Some(name) if !chat_names.contains(&name.as_str()) => {
                return Err(format!(
                    "GLM_MODEL / --default-chat-model names `{name}`, which is not a served chat model (chat models: [{}])",
                    chat_names.join(", ")
                ))
            }
            Some(name) => Some(name),
            None => chat_names.first().map(|s| s.to_string()),
        };
        Ok(Registry {
            entries,
            default_chat,
        })
    }

    /// Load every `--model` (detect family, load weights and tokenizer, start batchers).
    /// Blocking: call it off the async runtime. Errors name the model and its path.
    pub fn load(
        specs: &[ModelSpec],
        default_chat: Option<String>,
        device: &Device,
        batching: BatcherConfig,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let started = std::time::Instant::now();
            let model = load_one(spec, device, batching, metrics)
                .map_err(|e| format!("cannot load model `{}`: {e}", spec.name))?;
            tracing::info!(
                model = %spec.name,
                path = %spec.path.display(),
                seconds = started.elapsed().as_secs_f32(),
                "model loaded"
            );
            entries.push(ModelEntry {
                name: spec.name.clone(),
                path: spec.path.clone(),
                created: chrono::Utc::now().timestamp(),
                model,
            });
        }
        Registry::new(entries, default_chat)
    }

    /// Run one tiny input through every embedding model (the whole path: tokenizer, queue,
    /// forward pass), so that the first client does not pay for lazy initialisation.
    pub async fn warm_up(&self) -> Result<(), String> {
        for entry in &self.entries {
            #[allow(irrefutable_let_patterns)] // refutable once the chat variant exists
            if let ServedModel::Embedding(m) = &entry.model {
                let enc = m
                    .tokenizer
                    .encode("warm up", true)
                    .map_err(|e| format!("`{}`: {e}", m.name))?;
                let out = m
                    .batcher
                    .embed(vec![enc.get_ids().to_vec()], EmbedOutputs::default())
                    .await
                    .map_err(|e| format!("warm-up of `{}` failed: {e}", m.name))?;
                let dims = out.first().map(|e| e.dense.len()).unwrap_or(0);
                if dims != m.info.dimensions {
                    return Err(format!(
                        "warm-up of `{}` returned {dims} dimensions, the model declares {}",
                        m.name, m.info.dimensions
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    fn names_of(&self, kind: ModelKind) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.model.kind() == kind)
            .map(|e| e.name.clone())
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<&ModelEntry, ApiError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ApiError::ModelNotFound {
                model: name.to_string(),
                available: self.names(),
            })
    }

    /// The embedding model a request names, or the first embedding model when it names none.
    pub fn embedding(
        &self,
        name: Option<&str>,
        route: &'static str,
    ) -> Result<Arc<EmbeddingModel>, ApiError> {
        let entry = match name.filter(|n| !n.is_empty()) {
            Some(name) => self.get(name)?,
            None => self.first_of(ModelKind::Embedding)?,
        };
        match &entry.model {
            ServedModel::Embedding(m) => Ok(m.clone()),
            #[allow(unreachable_patterns)] // reachable once the chat variant exists
            _ => Err(ApiError::WrongModelKind {
                model: entry.name.clone(),
                is_chat: true,
                route,
            }),
        }
    }

    /// The chat model a request names, or the default chat model (GLM_MODEL) when it names none.
    pub fn chat(&self, name: Option<&str>, route: &'static str) -> Result<&ModelEntry, ApiError> {
        let entry = match (name.filter(|n| !n.is_empty()), &self.default_chat) {
            (Some(name), _) => self.get(name)?,
            (None, Some(default)) => self.get(default)?,
            (None, None) => {
                return Err(ApiError::NoDefaultModel {
                    kind: "chat",
                    available: self.names_of(ModelKind::Chat),
                })
            }
        };
        match entry.model.kind() {
            ModelKind::Chat => Ok(entry),
            ModelKind::Embedding => Err(ApiError::WrongModelKind {
                model: entry.name.clone(),
                is_chat: false,
                route,
            }),
        }
    }

    /// The model whose tokenizer `/tokenize` uses: the named one, else the default chat model (the
    /// seed tokenized for its chat model), else the first embedding model.
    pub fn tokenizer_model(&self, name: Option<&str>) -> Result<&ModelEntry, ApiError> {
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.get(name),
            None => match &self.default_chat {
                Some(default) => self.get(default),
                None => self.first_of(ModelKind::Embedding),
            },
        }
    }

    fn first_of(&self, kind: ModelKind) -> Result<&ModelEntry, ApiError> {
        self.entries
            .iter()
            .find(|e| e.model.kind() == kind)
            .ok_or_else(|| ApiError::NoDefaultModel {
                kind: match kind {
                    ModelKind::Embedding => "embedding",
                    ModelKind::Chat => "chat",
                },
                available: self.names(),
            })
    }
}

fn load_one(
    spec: &ModelSpec,
    device: &Device,
    batching: BatcherConfig,
    metrics: &Metrics,
) -> Result<ServedModel, String> {
    let family: Family = models::detect_family(&spec.path).map_err(|e| e.to_string())?;
    match family.kind() {
        ModelKind::Embedding => {
            let loaded =
                models::embed::load(&spec.path, family, device).map_err(|e| e.to_string())?;
            let model = EmbeddingModel::new(&spec.name, loaded, batching, metrics)?;
            Ok(ServedModel::Embedding(Arc::new(model)))
        }
        ModelKind::Chat => Err(chat_not_available(&spec.path, family).to_string()),
    }
}

/// Until the chat engine is wired in, chat checkpoints are refused at start with a clear reason.
fn chat_not_available(path: &Path, family: Family) -> ModelError {
    ModelError::load(
        path,
        format!("{family:?} is a chat model; this build cannot serve chat models yet"),
    )
}
