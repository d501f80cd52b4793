//! Served model name -> loaded model, built once from `--model NAME=PATH` before the server listens.
//! Every model is either an embedding model (`crate::embedding`) or a chat model (`crate::engine`);
//! callers ask the registry for the kind they serve and get a [`RegistryError`] otherwise, which
//! the HTTP layer words for its route.
use std::path::PathBuf;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::batcher::BatcherConfig;
use crate::config::ModelSpec;
use crate::embedding::{EmbedError, EmbeddingService};
use crate::engine::{ChatEngine, EngineConfig, EngineError};
use crate::metrics::Metrics;
use crate::models::{self, Device, ModelError, ModelKind};

/// A name that does not lead to a model of the kind asked for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("the model `{model}` does not exist; served models: {}", .available.join(", "))]
    NotFound {
        model: String,
        available: Vec<String>,
    },
    /// `model` is of the other kind than the one asked for.
    #[error("the model `{model}` is {} model", if .is.is_chat() { "a chat" } else { "an embedding" })]
    WrongKind { model: String, is: ModelKind },
    #[error("no {} model is served (served models: {})", .kind.as_str(), .available.join(", "))]
    NoDefault {
        kind: ModelKind,
        available: Vec<String>,
    },
}

/// Why the server cannot start with its `--model`s.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load model `{name}`: {source}")]
    Model { name: String, source: ModelError },
    #[error("cannot load model `{name}`: {source}")]
    Engine { name: String, source: EngineError },
    #[error("cannot load model `{name}`: cannot start the batching thread of `{name}`: {source}")]
    Batcher {
        name: String,
        source: std::io::Error,
    },
    #[error("GLM_MODEL / --default-chat-model names `{name}`, which is not a served chat model (chat models: [{}])", .chat_models.join(", "))]
    DefaultChat {
        name: String,
        chat_models: Vec<String>,
    },
    #[error("warm-up of `{name}` failed: {source}")]
    EmbedWarmUp { name: String, source: EmbedError },
    #[error("warm-up of `{name}` failed: {source}")]
    ChatWarmUp { name: String, source: EngineError },
}

/// What a served name refers to.
pub enum ServedModel {
    Embedding(Arc<EmbeddingService>),
    /// A chat model behind its continuous-batching engine (its own scheduler thread).
    Chat(Arc<ChatEngine>),
}

impl ServedModel {
    pub fn kind(&self) -> ModelKind {
        match self {
            ServedModel::Embedding(_) => ModelKind::Embedding,
            ServedModel::Chat(_) => ModelKind::Chat,
        }
    }

    /// The tokenizer behind `/tokenize` and `/detokenize`.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        match self {
            ServedModel::Embedding(m) => &m.tokenizer,
            ServedModel::Chat(engine) => engine.tokenizer(),
        }
    }
}

/// How models are loaded and served (from the command line).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub batching: BatcherConfig,
    pub engine: EngineConfig,
    /// Chat models: devices (layers split across them), dtype, load format, KV budget, GGUF mode.
    pub chat: models::chat::ChatLoadOptions,
    pub embed_kernels: models::embed::EncoderKernels,
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
    pub fn new(entries: Vec<ModelEntry>, default_chat: Option<String>) -> Result<Self, LoadError> {
        let chat_names: Vec<&str> = entries
            .iter()
            .filter(|e| e.model.kind() == ModelKind::Chat)
            .map(|e| e.name.as_str())
            .collect();
        let default_chat = match default_chat {
            Some(name) if !chat_names.contains(&name.as_str()) => {
                return Err(LoadError::DefaultChat {
                    name,
                    chat_models: chat_names.iter().map(|s| s.to_string()).collect(),
                })
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
        options: &LoadOptions,
        metrics: &Metrics,
    ) -> Result<Self, LoadError> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let started = std::time::Instant::now();
            let model = load_one(spec, device, options, metrics)?;
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

    /// Run one tiny input through every model (the whole path: tokenizer or chat template, queue,
    /// forward pass, sampling), so that the first client does not pay for lazy initialisation.
    pub async fn warm_up(&self) -> Result<(), LoadError> {
        for entry in &self.entries {
            let name = entry.name.clone();
            match &entry.model {
                ServedModel::Chat(engine) => {
                    let usage = engine
                        .warm_up()
                        .await
                        .map_err(|source| LoadError::ChatWarmUp { name, source })?;
                    tracing::debug!(model = %entry.name, ?usage, "chat engine warmed up");
                }
                ServedModel::Embedding(m) => m
                    .warm_up()
                    .await
                    .map_err(|source| LoadError::EmbedWarmUp { name, source })?,
            }
        }
        Ok(())
    }

    /// Models whose worker thread (chat engine or embedding batcher) has stopped.
    pub fn dead_workers(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| match &e.model {
                ServedModel::Embedding(m) => !m.batcher.is_alive(),
                ServedModel::Chat(engine) => !engine.is_alive(),
            })
            .map(|e| e.name.clone())
            .collect()
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

    pub fn get(&self, name: &str) -> Result<&ModelEntry, RegistryError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| RegistryError::NotFound {
                model: name.to_string(),
                available: self.names(),
            })
    }

    /// The embedding model a request names, or the first embedding model when it names none.
    pub fn embedding(&self, name: Option<&str>) -> Result<Arc<EmbeddingService>, RegistryError> {
        let entry = match name.filter(|n| !n.is_empty()) {
            Some(name) => self.get(name)?,
            None => self.first_of(ModelKind::Embedding)?,
        };
        match &entry.model {
            ServedModel::Embedding(m) => Ok(m.clone()),
            ServedModel::Chat(_) => Err(RegistryError::WrongKind {
                model: entry.name.clone(),
                is: ModelKind::Chat,
            }),
        }
    }

    /// The chat model a request names, or the default chat model (GLM_MODEL) when it names none.
    pub fn chat(&self, name: Option<&str>) -> Result<Arc<ChatEngine>, RegistryError> {
        let entry = match (name.filter(|n| !n.is_empty()), &self.default_chat) {
            (Some(name), _) => self.get(name)?,
            (None, Some(default)) => self.get(default)?,
            (None, None) => {
                return Err(RegistryError::NoDefault {
                    kind: ModelKind::Chat,
                    available: self.names_of(ModelKind::Chat),
                })
            }
        };
        match &entry.model {
            ServedModel::Chat(engine) => Ok(engine.clone()),
            ServedModel::Embedding(_) => Err(RegistryError::WrongKind {
                model: entry.name.clone(),
                is: ModelKind::Embedding,
            }),
        }
    }

    pub fn default_chat(&self) -> Option<&str> {
        self.default_chat.as_deref()
    }

    /// The model whose tokenizer `/tokenize` uses: the named one, else the default chat model (the
    /// seed tokenized for its chat model), else the first embedding model.
    pub fn tokenizer_model(&self, name: Option<&str>) -> Result<&ModelEntry, RegistryError> {
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.get(name),
            None => match &self.default_chat {
                Some(default) => self.get(default),
                None => self.first_of(ModelKind::Embedding),
            },
        }
    }

    fn first_of(&self, kind: ModelKind) -> Result<&ModelEntry, RegistryError> {
        self.entries
            .iter()
            .find(|e| e.model.kind() == kind)
            .ok_or_else(|| RegistryError::NoDefault {
                kind,
                available: self.names(),
            })
    }
}

fn load_one(
    spec: &ModelSpec,
    device: &Device,
    options: &LoadOptions,
    metrics: &Metrics,
) -> Result<ServedModel, LoadError> {
    let name = spec.name.clone();
    let model_error = |source| LoadError::Model {
        name: name.clone(),
        source,
    };
    let path = models::source::resolve(&spec.path).map_err(model_error)?;
    let family = models::detect_family(&path).map_err(model_error)?;
    match family.kind() {
        ModelKind::Embedding => {
            let loaded = models::embed::load_with(&path, family, device, options.embed_kernels)
                .map_err(model_error)?;
            let model = EmbeddingService::new(&spec.name, loaded, options.batching, metrics)
                .map_err(|source| LoadError::Batcher {
                    name: name.clone(),
                    source,
                })?;
            Ok(ServedModel::Embedding(Arc::new(model)))
        }
        ModelKind::Chat => {
            let loaded =
                models::chat::load_with(&path, family, &options.chat).map_err(model_error)?;
            let engine = ChatEngine::start_with_metrics(
                &spec.name,
                loaded,
                options.engine.clone(),
                metrics.engine(&spec.name),
            )
            .map_err(|source| LoadError::Engine {
                name: name.clone(),
                source,
            })?;
            Ok(ServedModel::Chat(Arc::new(engine)))
        }
    }
}
