//! The chat engine: prompt building (chat templates), a bounded queue, a continuous-batching
//! scheduler on its own thread, sampling, stop handling and streaming detokenization.
//!
//! [`ChatEngine`] is the handle the HTTP layer holds. Its entry point, [`ChatEngine::generate`],
//! takes a validated chat request, renders and tokenizes it and queues it (after TGI's
//! `Infer::generate_stream`); every request gets its own channel of [`Event`]s. Dropping the
//! receiver cancels the request within one scheduler step.
pub mod detokenizer;
pub mod reasoning;
pub mod sampler;
mod scheduler;
pub mod stop;
pub mod template;
pub mod types;

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGauge};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use reasoning::ReasoningStart;
pub use scheduler::Counters;
pub use template::{ChatTemplate, TemplateError};
pub use types::*;

use crate::liveness::Liveness;
use crate::models::{CausalLMInfo, LoadedChat};
use scheduler::{Pending, Scheduler};

/// Limits of one model's engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences generating at the same time.
    pub max_batch_size: usize,
    /// Tokens in one forward pass (decode tokens plus prompt chunks); long prompts are prefilled in
    /// chunks of at most this size.
    pub max_batch_tokens: usize,
    /// Requests waiting for a batch slot before new ones are refused (HTTP 429).
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 8,
            max_batch_tokens: 2048,
            max_waiting: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// HTTP 429.
    #[error("model '{model}' is overloaded: {waiting} requests are already waiting (limit {max_waiting}); retry later")]
    QueueFull {
        model: String,
        waiting: usize,
        max_waiting: usize,
    },
    /// HTTP 400.
    #[error("the prompt has {prompt_tokens} tokens but model '{model}' has a context of {max_context} tokens (at least one must be left to generate)")]
    PromptTooLong {
        model: String,
        prompt_tokens: usize,
        max_context: usize,
    },
    /// HTTP 400: a prompt so long that it was tokenized only far enough to know it does not fit.
    #[error("the prompt has more than {at_least} tokens but model '{model}' has a context of {max_context} tokens")]
    PromptFarTooLong {
        model: String,
        at_least: usize,
        max_context: usize,
    },
    /// HTTP 400.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// HTTP 400.
    #[error("model '{0}' has no chat template; it cannot take chat messages")]
    NoChatTemplate(String),
    /// HTTP 400 (client messages the template rejects) or 500 (a broken template, reported at start).
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// HTTP 500.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// HTTP 503.
    #[error("the engine of model '{0}' has stopped")]
    Stopped(String),
    /// A generation that ended with an error event (warm-up).
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Prometheus series the scheduler thread updates, already labelled with the model's name
/// (see `crate::metrics::Metrics::engine`).
#[derive(Clone)]
pub struct EngineMetrics {
    pub generated_tokens: IntCounter,
    pub batch_size: Histogram,
    pub step_duration: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub cancelled: IntCounter,
    /// Share of the KV pool reserved by running sequences.
    pub kv_usage: Gauge,
    /// Positions the KV pool holds.
    pub kv_capacity: IntGauge,
}

impl EngineMetrics {
    /// Series registered nowhere: for engines started outside a server (tests, benchmarks).
    pub fn detached() -> Result<Self, prometheus::Error> {
        let histogram = |name: &str| Histogram::with_opts(HistogramOpts::new(name, "detached"));
        Ok(EngineMetrics {
            generated_tokens: IntCounter::new("generated_tokens", "detached")?,
            batch_size: histogram("batch_size")?,
            step_duration: histogram("step_duration")?,
            running: IntGauge::new("running", "detached")?,
            waiting: IntGauge::new("waiting", "detached")?,
            cancelled: IntCounter::new("cancelled", "detached")?,
            kv_usage: Gauge::new("kv_usage", "detached")?,
            kv_capacity: IntGauge::new("kv_capacity", "detached")?,
        })
    }
}

/// A rendered and tokenized chat prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// Set for reasoning models (vocabularies with `</think>`): where generation starts.
    pub reasoning: Option<ReasoningStart>,
}

/// What a submitted request returns: its prompt size and its stream of events.
#[derive(Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// The events split `<think>` text into `reasoning_content` (reasoning models).
    pub reasoning: bool,
    pub events: UnboundedReceiver<Event>,
}

/// Handle to one chat model's engine. Cheap to share behind an `Arc`; the scheduler thread stops
/// once the handle is dropped and running requests are done.
pub struct ChatEngine {
    name: String,
    info: CausalLMInfo,
    /// Longest sequence served: the model's context, or what the whole KV pool holds if less.
    max_context: usize,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    reasoning: bool,
    config: EngineConfig,
    counters: Arc<Counters>,
    metrics: EngineMetrics,
    queue: Sender<Pending>,
    liveness: Liveness,
}

impl std::fmt::Debug for ChatEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatEngine")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ChatEngine {
    /// Compile the template and spawn the scheduler thread, with metrics registered nowhere.
    pub fn start(
        name: impl Into<String>,
        loaded: LoadedChat,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let name = name.into();
        let metrics = EngineMetrics::detached()
            .map_err(|e| EngineError::Stopped(format!("{name}: metrics: {e}")))?;
        Self::start_with_metrics(name, loaded, config, metrics)
    }

    /// Compile the template and spawn the scheduler thread, which updates `metrics`.
    pub fn start_with_metrics(
        name: impl Into<String>,
        loaded: LoadedChat,
        config: EngineConfig,
        metrics: EngineMetrics,
    ) -> Result<Self, EngineError> {
        let name = name.into();
        let template = loaded
            .chat_template
            .as_deref()
            .map(|src| {
                ChatTemplate::new(
                    src,
                    loaded.bos_token.as_deref(),
                    loaded.eos_token.as_deref(),
                )
            })
            .transpose()?;
        let tokenizer = Arc::new(loaded.tokenizer);
        let reasoning = tokenizer.token_to_id("</think>").is_some();
        let info = loaded.model.info().clone();
        let kv = loaded.model.kv_blocks().clone();
        let max_context = info.max_context.min(kv.capacity_tokens());
        if max_context < info.max_context {
            tracing::warn!(model = %name, context = info.max_context, kv_positions = kv.capacity_tokens(),
                "the KV cache holds less than one full context: sequences are limited to what it holds (raise --kv-cache-memory)");
        }
        metrics.kv_capacity.set(kv.capacity_tokens() as i64);
        let counters = Arc::new(Counters::default());
        let (queue, rx) = std::sync::mpsc::channel();
        let scheduler = Scheduler {
            kv,
            model: loaded.model,
            tokenizer: tokenizer.clone(),
            eos_token_ids: loaded.eos_token_ids,
            config: config.clone(),
            counters: counters.clone(),
            metrics: metrics.clone(),
            queue: rx,
            name: name.clone(),
        };
        let (liveness, alive) = Liveness::new(format!("chat engine `{name}`"));
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let _alive = alive;
                scheduler.run()
            })
            .map_err(|e| EngineError::Stopped(format!("{name}: cannot spawn its thread: {e}")))?;
        tracing::info!(model = %name, family = info.family, max_context, ?config, "chat engine started");
        Ok(ChatEngine {
            name,
            info,
            max_context,
            tokenizer,
            template,
            reasoning,
            config,
            counters,
            metrics,
            queue,
            liveness,
        })
    }

    /// False once the scheduler thread has stopped (a panic outside the per-step guards): the
    /// model can then only fail requests.
    pub fn is_alive(&self) -> bool {
        self.liveness.is_alive()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> &CausalLMInfo {
        &self.info
    }

    /// Longest sequence (prompt + generated) served: the model's context, or the KV pool's size.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Reasoning models (vocabularies with `</think>`) answer with `reasoning_content` too.
    pub fn is_reasoning(&self) -> bool {
        self.reasoning
    }

    /// Sequences generating now.
    pub fn running(&self) -> usize {
        self.counters.running.load(Ordering::Relaxed)
    }

    /// Requests queued for a batch slot.
    pub fn waiting(&self) -> usize {
        self.counters.waiting.load(Ordering::Relaxed)
    }

    /// The one way a chat request enters the engine: render its messages, tokenize them, queue
    /// the result. CPU work (template and tokenizer): call it off the async workers.
    pub fn generate(&self, request: ChatGenerateRequest) -> Result<Generation, EngineError> {
        let prompt = self.chat_prompt(&request.messages)?;
        self.submit(GenerateRequest {
            prompt_ids: prompt.ids,
            sampling: request.sampling,
            stop: request.stop,
            reasoning: prompt.reasoning,
        })
    }

    /// Generate one greedy token from a one-message chat (or a raw prompt for template-less
    /// models): checks the template renders and runs a prefill and a decode step, so that the
    /// first client does not pay for lazy initialisation.
    pub async fn warm_up(&self) -> Result<Usage, EngineError> {
        let stop = StopParams {
            max_tokens: Some(1),
            ..StopParams::default()
        };
        let chat = ChatGenerateRequest {
            messages: vec![PromptMessage::user("Hi")],
            sampling: SamplingParams::default(),
            stop: stop.clone(),
        };
        let mut generation = match self.generate(chat) {
            Err(EngineError::NoChatTemplate(_)) => self.submit(GenerateRequest {
                prompt_ids: self.encode("Hi")?,
                sampling: SamplingParams::default(),
                stop,
                reasoning: None,
            })?,
            other => other?,
        };
        while let Some(event) = generation.events.recv().await {
            match event {
                Event::Delta(_) => {}
                Event::Finish { usage, .. } => return Ok(usage),
                Event::Error(e) => return Err(EngineError::Failed(e)),
            }
        }
        Err(EngineError::Stopped(self.name.clone()))
    }

    /// Render `messages` with the model's chat template (generation prompt added) and tokenize the
    /// text without adding special tokens: the template already wrote BOS / `[gMASK]<sop>`.
    pub fn chat_prompt(&self, messages: &[PromptMessage]) -> Result<Prompt, EngineError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::NoChatTemplate(self.name.clone()))?;
        let text = template.render(messages, None, true)?;
        let ids = self.encode_for_context(&text)?;
        let reasoning = self
            .reasoning
            .then(|| reasoning::ReasoningParser::start_for_prompt(&text));
        Ok(Prompt {
            text,
            ids,
            reasoning,
        })
    }

    /// Tokenize a prompt only as far as the context needs: a multi-megabyte prompt is refused after
    /// tokenizing a prefix of about the context's size instead of all of it.
    fn encode_for_context(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let max_context = self.info.max_context;
        let (enc, whole) = crate::tokenizer::encode_head(&self.tokenizer, text, max_context)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        if !whole {
            return Err(EngineError::PromptFarTooLong {
                model: self.name.clone(),
                at_least: max_context,
                max_context,
            });
        }
        Ok(enc.get_ids().to_vec())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Queue a request. Fails at once when the prompt does not fit or the queue is full. Generation
    /// is capped at the context (`max_tokens` beyond it finishes with "length").
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let prompt_tokens = request.prompt_ids.len();
        let max_context = self.max_context;
        if prompt_tokens == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_tokens >= max_context {
            return Err(EngineError::PromptTooLong {
                model: self.name.clone(),
                prompt_tokens,
                max_context,
            });
        }
        let reasoning = request.reasoning.is_some();
        let room = max_context - prompt_tokens;
        let max_new_tokens = request.stop.max_tokens.map_or(room, |m| m.clamp(1, room));
        self.reserve_slot()?;
        let (tx, events) = unbounded_channel();
        let pending = Pending {
            request,
            events: tx,
            enqueued: Instant::now(),
            max_new_tokens,
        };
        if self.queue.send(pending).is_err() {
            self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped(self.name.clone()));
        }
        Ok(Generation {
            prompt_tokens,
            reasoning,
            events,
        })
    }

    fn reserve_slot(&self) -> Result<(), EngineError> {
        let max_waiting = self.config.max_waiting;
        self.counters
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max_waiting).then_some(w + 1)
            })
            .map(|w| self.metrics.waiting.set(w as i64 + 1))
            .map_err(|waiting| EngineError::QueueFull {
                model: self.name.clone(),
                waiting,
                max_waiting,
            })
    }
}
