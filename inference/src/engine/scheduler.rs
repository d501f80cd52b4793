//! Continuous batching on a dedicated thread.
//!
//! Every step: take newly submitted requests into the running batch (up to `max_batch_size`, and
//! only while the KV pool can reserve each one's worst case: prompt plus `max_tokens`), drop
//! sequences whose client went away, then run ONE `CausalLM::forward` over a decode token for every
//! sequence that is generating plus prompt chunks of sequences still prefilling (within
//! `max_batch_tokens`), sample, and push text to each request's channel. Finished sequences leave the
//! batch at once and their KV blocks return to the pool with them. A request the pool cannot take
//! yet waits in the queue (first come, first served) until running ones finish.
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::detokenizer::{token_text, DecodeError, IncrementalDecoder};
use super::reasoning::ReasoningParser;
use super::sampler::{Sampled, Sampler};
use super::stop::StopMatcher;
use super::types::{
    Delta, Event, FinishReason, GenerateRequest, Timing, TokenLogprob, TopLogprob, Usage,
};
use super::{EngineConfig, EngineMetrics};
use crate::models::{BlockAllocator, CausalLM, ModelError, SeqCache, SeqStep};

/// A request handed from [`super::ChatEngine::submit`] to the scheduler thread.
pub(crate) struct Pending {
    pub request: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
    /// Generated tokens allowed: `max_tokens` capped by the room left in the context.
    pub max_new_tokens: usize,
}

/// Counters shared with the engine handle (admission control and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
}

pub(crate) struct Scheduler {
    pub model: Arc<dyn CausalLM>,
    pub kv: Arc<BlockAllocator>,
    pub tokenizer: Arc<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    pub config: EngineConfig,
    pub counters: Arc<Counters>,
    pub metrics: EngineMetrics,
    pub queue: Receiver<Pending>,
    pub name: String,
}

impl Scheduler {
    pub fn run(self) {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        loop {
            if !self.receive(&mut waiting, running.is_empty())
                && waiting.is_empty()
                && running.is_empty()
            {
                tracing::info!(model = %self.name, "chat engine stopped");
                return;
            }
            self.admit(&mut waiting, &mut running);
            running.retain(|seq| {
                let gone = seq.events.is_closed();
                if gone {
                    self.metrics.cancelled.inc();
                    tracing::debug!(model = %self.name, generated = seq.generated.len(), "client went away; sequence cancelled");
                }
                !gone
            });
            self.publish(&running);
            if !running.is_empty() {
                self.step(&mut running);
                self.publish(&running);
            }
        }
    }

    /// Move submitted requests into `waiting`; blocks when there is nothing else to do.
    /// Returns false once every engine handle is gone.
    fn receive(&self, waiting: &mut VecDeque<Pending>, idle: bool) -> bool {
        if idle && waiting.is_empty() {
            match self.queue.recv() {
                Ok(p) => waiting.push_back(p),
                Err(_) => return false,
            }
        }
        loop {
            match self.queue.try_recv() {
                Ok(p) => waiting.push_back(p),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn admit(&self, waiting: &mut VecDeque<Pending>, running: &mut Vec<Sequence>) {
        waiting.retain(|p| {
            let gone = p.events.is_closed();
            if gone {
                self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
                self.metrics.cancelled.inc();
            }
            !gone
        });
        while running.len() < self.config.max_batch_size.max(1) {
            let Some(p) = waiting.front() else { break };
            // `submit` capped the worst case at what the whole pool holds, so the head of the
            // queue fits once enough running sequences have finished.
            let worst = p.request.prompt_ids.len() + p.max_new_tokens;
            let Some(cache) = self.kv.try_reserve(worst) else {
                break;
            };
            let Some(p) = waiting.pop_front() else { break };
            self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
            running.push(Sequence::new(p, cache));
        }
    }

    fn publish(&self, running: &[Sequence]) {
        self.counters
            .running
            .store(running.len(), Ordering::Relaxed);
        self.metrics.running.set(running.len() as i64);
        self.metrics.kv_usage.set(self.kv.usage_ratio());
        self.metrics
            .waiting
            .set(self.counters.waiting.load(Ordering::Relaxed) as i64);
    }

    /// One forward pass over the batch, then sampling and output for every sequence that got logits
    /// of a position to continue from.
    fn step(&self, running: &mut Vec<Sequence>) {
        let plan = self.plan(running);
        self.metrics
            .batch_size
            .observe(plan.iter().filter(|&&n| n > 0).count() as f64);
        let started = Instant::now();
        let result = self.forward(running, &plan);
        self.metrics
            .step_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(rows) => {
                let taking_part = running.iter_mut().zip(&plan).filter(|(_, &n)| n > 0);
                for ((seq, &n), row) in taking_part.zip(rows) {
                    if seq.advance(n) {
                        self.sample(seq, &row);
                    }
                }
            }
            Err(e) => {
                // The caches of this step are in an unknown state: its sequences cannot go on.
                tracing::error!(model = %self.name, error = %e, "forward pass failed; failing its sequences");
                for (seq, _) in running.iter_mut().zip(&plan).filter(|(_, &n)| n > 0) {
                    seq.fail_after_output(&self.tokenizer, format!("model error: {e}"));
                }
            }
        }
        running.retain(|s| {
            if s.cancelled {
                self.metrics.cancelled.inc();
                tracing::debug!(model = %self.name, generated = s.generated.len(), "client went away; sequence cancelled");
            }
            !s.done
        });
    }

    /// Sample, detokenize and send one sequence's next token. A panic there (a sampler or
    /// tokenizer bug, a decoder that chokes on a token) fails that sequence only, instead of
    /// killing the engine thread and every other generation with it.
    fn sample(&self, seq: &mut Sequence, row: &[f32]) {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            seq.on_logits(row, &self.tokenizer, &self.eos_token_ids)
        }));
        match outcome {
            Ok(()) => self.metrics.generated_tokens.inc(),
            Err(panic) => {
                let msg = crate::error::panic_message(panic.as_ref());
                tracing::error!(model = %self.name, %msg, "sampling or detokenization panicked; failing the sequence");
                seq.fail(format!("internal error while sampling: {msg}"));
            }
        }
    }

    /// New tokens per running sequence for this step (0: sits out): one for each decoding sequence
    /// first (latency of running requests), then prompt chunks within the token budget.
    fn plan(&self, running: &[Sequence]) -> Vec<usize> {
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut plan = vec![0; running.len()];
        for (n, seq) in plan.iter_mut().zip(running) {
            if seq.prefill_left() == 0 && budget > 0 {
                *n = 1;
                budget -= 1;
            }
        }
        for (n, seq) in plan.iter_mut().zip(running) {
            let left = seq.prefill_left();
            if left > 0 && budget > 0 {
                *n = left.min(budget);
                budget -= *n;
            }
        }
        plan
    }

    /// Logits rows of the sequences taking part, in batch order.
    fn forward(
        &self,
        running: &mut [Sequence],
        plan: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut steps: Vec<SeqStep<'_>> = running
            .iter_mut()
            .zip(plan)
            .filter(|(_, &n)| n > 0)
            .map(|(seq, &n)| seq.input(n))
            .collect();
        let expected = steps.len();
        let model = &self.model;
        let pass = || crate::kernels::on_pool(|| model.forward(&mut steps));
        let logits = std::panic::catch_unwind(AssertUnwindSafe(pass)).map_err(|panic| {
            ModelError::Unsupported(format!(
                "forward pass panicked: {}",
                crate::error::panic_message(panic.as_ref())
            ))
        })??;
        let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        if rows.len() != expected {
            return Err(ModelError::Unsupported(format!(
                "forward returned {} rows for {expected} sequences",
                rows.len()
            )));
        }
        Ok(rows)
    }
}

/// One request in the running batch.
struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    cache: SeqCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    max_new_tokens: usize,
    ignore_eos: bool,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    reasoning: Option<ReasoningParser>,
    logprobs: Vec<TokenLogprob>,
    events: UnboundedSender<Event>,
    enqueued: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    done: bool,
    /// Its receiver was gone when output was sent.
    cancelled: bool,
}

impl Sequence {
    fn new(p: Pending, cache: SeqCache) -> Self {
        let GenerateRequest {
            prompt_ids,
            sampling,
            stop,
            reasoning,
        } = p.request;
        Sequence {
            sampler: Sampler::new(sampling, &prompt_ids),
            decoder: IncrementalDecoder::new(&prompt_ids, stop.skip_special_tokens),
            stops: StopMatcher::new(stop.stop),
            reasoning: reasoning.map(ReasoningParser::new),
            ignore_eos: stop.ignore_eos,
            prompt: prompt_ids,
            generated: Vec::new(),
            cache,
            prefilled: 0,
            max_new_tokens: p.max_new_tokens,
            logprobs: Vec::new(),
            events: p.events,
            enqueued: p.enqueued,
            admitted: Instant::now(),
            first_token: None,
            done: false,
            cancelled: false,
        }
    }

    fn prefill_left(&self) -> usize {
        self.prompt.len() - self.prefilled
    }

    /// The next `n` tokens to feed and the cache they extend.
    fn input(&mut self, n: usize) -> SeqStep<'_> {
        let tokens: &[u32] = if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + n).min(self.prompt.len());
            &self.prompt[self.prefilled..end]
        } else {
            self.generated
                .last()
                .map(std::slice::from_ref)
                .unwrap_or_default()
        };
        SeqStep {
            tokens,
            cache: &mut self.cache,
        }
    }

    /// Account for a step of `n` tokens; true when its logits continue the sequence (decode, or the
    /// last prefill chunk).
    fn advance(&mut self, n: usize) -> bool {
        if self.prefilled < self.prompt.len() {
            self.prefilled = (self.prefilled + n).min(self.prompt.len());
            return self.prefilled == self.prompt.len();
        }
        true
    }

    fn on_logits(&mut self, logits: &[f32], tokenizer: &Tokenizer, eos: &[u32]) {
        let sampled = self.sampler.sample(logits);
        let id = sampled.id;
        self.generated.push(id);
        self.first_token.get_or_insert_with(Instant::now);
        if self.sampler.params().logprobs {
            self.logprobs.push(token_logprob(tokenizer, &sampled));
        }
        if !self.ignore_eos && eos.contains(&id) {
            return self.finish(tokenizer, FinishReason::Stop, true);
        }
        let text = match self.decoder.push(tokenizer, id) {
            Ok(t) => t,
            Err(e) => return self.fail(e.to_string()),
        };
        let check = self.stops.push(&text);
        self.emit(&check.emit);
        if check.stopped {
            return self.finish(tokenizer, FinishReason::Stop, false);
        }
        if self.generated.len() >= self.max_new_tokens {
            // max_tokens or the end of the context: both are "length" for the client.
            self.finish(tokenizer, FinishReason::Length, true);
        }
    }

    /// Send text through the reasoning split; deltas carry the logprobs gathered so far.
    fn emit(&mut self, text: &str) {
        let split = match &mut self.reasoning {
            Some(parser) => parser.push(text),
            None => super::reasoning::Split {
                reasoning: String::new(),
                content: text.to_owned(),
            },
        };
        self.send_delta(split.content, split.reasoning, false);
    }

    fn send_delta(&mut self, content: String, reasoning_content: String, last: bool) {
        // An empty delta is only worth sending to carry the last logprobs.
        let carries_logprobs = last && !self.logprobs.is_empty();
        if content.is_empty() && reasoning_content.is_empty() && !carries_logprobs {
            return;
        }
        let delta = Delta {
            content,
            reasoning_content,
            logprobs: std::mem::take(&mut self.logprobs),
        };
        if self.events.send(Event::Delta(delta)).is_err() {
            self.done = true;
            self.cancelled = true;
        }
    }

    /// Flush held-back text (unless a stop string cut it) and send the final event.
    fn finish(&mut self, tokenizer: &Tokenizer, reason: FinishReason, flush: bool) {
        if let Err(e) = self.drain_output(tokenizer, flush) {
            return self.fail(e.to_string());
        }
        let now = Instant::now();
        let timing = Timing {
            queued: self.admitted.saturating_duration_since(self.enqueued),
            time_to_first_token: self
                .first_token
                .unwrap_or(now)
                .saturating_duration_since(self.enqueued),
            total: now.saturating_duration_since(self.enqueued),
        };
        let usage = Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
        };
        let _ = self.events.send(Event::Finish {
            reason,
            usage,
            timing,
        });
        self.done = true;
    }

    /// Send everything still held back: with `flush`, the detokenizer's incomplete bytes (rendered
    /// lossily) and text kept because it could have started a stop string; then the reasoning
    /// parser's rest and the last logprobs.
    fn drain_output(&mut self, tokenizer: &Tokenizer, flush: bool) -> Result<(), DecodeError> {
        if flush {
            let rest = self.decoder.flush(tokenizer)?;
            let check = self.stops.push(&rest);
            let tail = if check.stopped {
                check.emit
            } else {
                check.emit + &self.stops.flush()
            };
            self.emit(&tail);
        }
        let split = self
            .reasoning
            .as_mut()
            .map(ReasoningParser::flush)
            .unwrap_or_default();
        self.send_delta(split.content, split.reasoning, true);
        Ok(())
    }

    /// A failure after generation started (the model's forward pass): the tokens generated before
    /// it reach the client first, including text held back for a character or a stop string to
    /// complete, so that the error event follows everything that was generated.
    fn fail_after_output(&mut self, tokenizer: &Tokenizer, msg: String) {
        if let Err(e) = self.drain_output(tokenizer, true) {
            tracing::debug!(error = %e, "cannot flush the output of a failed sequence");
        }
        self.fail(msg);
    }

    fn fail(&mut self, msg: String) {
        let _ = self.events.send(Event::Error(msg));
        self.done = true;
    }
}

fn token_logprob(tokenizer: &Tokenizer, s: &Sampled) -> TokenLogprob {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        TopLogprob {
            id,
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
        }
    };
    TokenLogprob {
        chosen: entry(s.id, s.logprob.unwrap_or(f32::NEG_INFINITY)),
        top: s
            .top_logprobs
            .iter()
            .map(|&(id, lp)| entry(id, lp))
            .collect(),
    }
}
