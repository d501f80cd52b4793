//! Served model name -> loaded model, built once from `--model NAME=PATH` before the server listens.
//! Every model is either an embedding model (tokenizer + batcher) or a chat model (served by
//! `crate::engine`); routes ask the registry for the kind they serve and get a precise error otherwise.
use std::path::PathBuf;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::ModelSpec;
use crate::engine::{ChatEngine, EngineConfig, Event, GenerateRequest, SamplingParams, StopParams};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::models::{self, Device, EmbedOutputs, EmbedderInfo, Family, LoadedEmbedder, ModelKind};

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
        // An id the tokenizer knows but the embedding table lacks would fail inside the model.
        let vocab_size = loaded.tokenizer.get_vocab_size(true).min(info.vocab_size);
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

/// What a served name refers to.
pub enum ServedModel {
    Embedding(Arc<EmbeddingModel>),
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
        options: &LoadOptions,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let started = std::time::Instant::now();
            let model = load_one(spec, device, options, metrics)
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

    /// Run one tiny input through every model (the whole path: tokenizer or chat template, queue,
    /// forward pass, sampling), so that the first client does not pay for lazy initialisation.
    pub async fn warm_up(&self) -> Result<(), String> {
        for entry in &self.entries {
            if let ServedModel::Chat(engine) = &entry.model {
                warm_up_chat(engine).await?;
            }
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
            ServedModel::Chat(_) => Err(ApiError::WrongModelKind {
                model: entry.name.clone(),
                is_chat: true,
                route,
            }),
        }
    }

    /// The chat model a request names, or the default chat model (GLM_MODEL) when it names none.
    pub fn chat(
        &self,
        name: Option<&str>,
        route: &'static str,
    ) -> Result<Arc<ChatEngine>, ApiError> {
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
        match &entry.model {
            ServedModel::Chat(engine) => Ok(engine.clone()),
            ServedModel::Embedding(_) => Err(ApiError::WrongModelKind {
                model: entry.name.clone(),
                is_chat: false,
                route,
            }),
        }
    }

    pub fn default_chat(&self) -> Option<&str> {
        self.default_chat.as_deref()
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
    options: &LoadOptions,
    metrics: &Metrics,
) -> Result<ServedModel, String> {
    let path = models::source::resolve(&spec.path).map_err(|e| e.to_string())?;
    let family: Family = models::detect_family(&path).map_err(|e| e.to_string())?;
    match family.kind() {
        ModelKind::Embedding => {
            let loaded = models::embed::load_with(&path, family, device, options.embed_kernels)
                .map_err(|e| e.to_string())?;
            let model = EmbeddingModel::new(&spec.name, loaded, options.batching, metrics)?;
            Ok(ServedModel::Embedding(Arc::new(model)))
        }
        ModelKind::Chat => {
            let loaded =
                models::chat::load_with(&path, family, &options.chat).map_err(|e| e.to_string())?;
            let engine = ChatEngine::start_with_metrics(
                &spec.name,
                loaded,
                options.engine.clone(),
                metrics.engine(&spec.name),
            )
            .map_err(|e| e.to_string())?;
            Ok(ServedModel::Chat(Arc::new(engine)))
        }
    }
}

/// Generate one greedy token from a one-message chat (or a raw prompt for template-less models):
/// checks the template renders and runs a prefill and a decode step before `/ready` turns 200.
async fn warm_up_chat(engine: &ChatEngine) -> Result<(), String> {
    let name = engine.name();
    let ids = match engine.chat_prompt(
        &[serde_json::json!({"role": "user", "content": "Hi"})],
        None,
    ) {
        Ok(prompt) => prompt.ids,
        Err(crate::engine::EngineError::NoChatTemplate(_)) => {
            engine.encode("Hi").map_err(|e| e.to_string())?
        }
        Err(e) => return Err(format!("warm-up of `{name}`: {e}")),
    };
    let request = GenerateRequest {
        prompt_ids: ids,
        sampling: SamplingParams::default(),
        stop: StopParams {
            max_tokens: Some(1),
            ..StopParams::default()
        },
        reasoning: None,
    };
    let mut generation = engine
        .submit(request)
        .map_err(|e| format!("warm-up of `{name}`: {e}"))?;
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Delta(_) => {}
            Event::Finish { usage, .. } => {
                tracing::debug!(model = %name, ?usage, "chat engine warmed up");
                return Ok(());
            }
            Event::Error(e) => return Err(format!("warm-up of `{name}` failed: {e}")),
        }
    }
    Err(format!("warm-up of `{name}`: the engine stopped"))
}
