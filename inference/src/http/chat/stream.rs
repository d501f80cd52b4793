//! From the engine's events to the answer: a server-sent event stream, or the events gathered into
//! one `chat.completion`.
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedReceiver;

use super::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta,
    CompletionChoice, Logprobs, StreamError,
};
use crate::engine::{Delta, Event, FinishReason, TokenLogprob, Usage};

/// How one completion is answered: its identity, shared by all its chunks, and what the request
/// asked to see.
#[derive(Debug, Clone)]
pub struct Answer {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The model splits `reasoning_content` from `content`.
    pub reasoning_model: bool,
    pub logprobs: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

impl Answer {
    pub fn new(model: &str, reasoning_model: bool, logprobs: bool, include_usage: bool) -> Self {
        Answer {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: now_secs(),
            model: model.to_owned(),
            reasoning_model,
            logprobs,
            include_usage,
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            choices,
            created: self.created,
            id: self.id.clone(),
            model: self.model.clone(),
            object: "chat.completion.chunk",
            usage: self.include_usage.then_some(None),
        }
    }

    fn choice_chunk(
        &self,
        delta: ChunkDelta,
        logprobs: Option<Logprobs>,
        finish: Option<FinishReason>,
    ) -> ChatCompletionChunk {
        self.chunk(vec![ChunkChoice {
            delta,
            finish_reason: finish.map(FinishReason::as_str),
            index: 0,
            logprobs,
        }])
    }

    /// The final usage chunk (`stream_options.include_usage`): no choices.
    fn usage_chunk(&self, usage: Usage) -> ChatCompletionChunk {
        ChatCompletionChunk {
            usage: Some(Some(usage.into())),
            ..self.chunk(Vec::new())
        }
    }

    /// SSE data lines for one engine event, and whether the stream ends with it (after `Finish`
    /// or `Error`).
    pub fn sse_lines(&self, ev: Event) -> (Vec<String>, bool) {
        match ev {
            Event::Delta(d) => {
                let lp = self.logprobs.then(|| Logprobs::from_engine(&d.logprobs));
                let delta = ChunkDelta::from_engine(d, self.reasoning_model);
                (vec![json(&self.choice_chunk(delta, lp, None))], false)
            }
            Event::Finish { reason, usage, .. } => {
                let finish = self.choice_chunk(ChunkDelta::default(), None, Some(reason));
                let mut lines = vec![json(&finish)];
                if self.include_usage {
                    lines.push(json(&self.usage_chunk(usage)));
                }
                lines.push("[DONE]".to_owned());
                (lines, true)
            }
            Event::Error(msg) => (vec![json(&StreamError::server(msg))], true),
        }
    }

    /// The non-streaming answer.
    pub fn completion(&self, collected: Collected) -> ChatCompletion {
        let (reason, usage) = collected
            .finish
            .unwrap_or((FinishReason::Stop, Usage::default()));
        let message = AssistantMessage {
            content: collected.content,
            reasoning_content: self.reasoning_model.then_some(collected.reasoning_content),
            role: "assistant",
        };
        ChatCompletion {
            choices: [CompletionChoice {
                finish_reason: reason.as_str(),
                index: 0,
                logprobs: self
                    .logprobs
                    .then(|| Logprobs::from_engine(&collected.logprobs)),
                message,
            }],
            created: self.created,
            id: self.id.clone(),
            model: self.model.clone(),
            object: "chat.completion",
            usage: usage.into(),
        }
    }

    /// Turn a generation into an SSE response. The engine's receiver lives inside the stream: when
    /// the client disconnects, axum drops the stream, the receiver closes and the engine cancels
    /// the sequence.
    pub fn sse(
        self,
        mut events: UnboundedReceiver<Event>,
        mut on_event: impl FnMut(&Event) + Send + 'static,
    ) -> Response {
        let stream = async_stream::stream! {
            let first = self.choice_chunk(ChunkDelta::role(), None, None);
            yield Ok::<_, Infallible>(SseEvent::default().data(json(&first)));
            while let Some(ev) = events.recv().await {
                on_event(&ev);
                let (lines, last) = self.sse_lines(ev);
                for line in lines {
                    yield Ok(SseEvent::default().data(line));
                }
                if last {
                    return;
                }
            }
            let err = StreamError::server(ENDED_UNEXPECTEDLY);
            yield Ok(SseEvent::default().data(json(&err)));
        };
        // A disconnect is only noticed when something is written: keep-alive comments bound how
        // long a generation whose tokens show no text yet (held-back stop prefixes, skipped special
        // tokens) runs for a client that has gone.
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(2)))
            .into_response()
    }
}

const ENDED_UNEXPECTEDLY: &str = "generation ended unexpectedly";

fn json<T: serde::Serialize>(value: &T) -> String {
    // Plain structs of strings and numbers: serialising them cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything a non-streaming response needs, gathered from the events.
#[derive(Debug, Default)]
pub struct Collected {
    pub content: String,
    pub reasoning_content: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<(FinishReason, Usage)>,
}

impl Collected {
    fn add(&mut self, d: Delta) {
        self.content.push_str(&d.content);
        self.reasoning_content.push_str(&d.reasoning_content);
        self.logprobs.extend(d.logprobs);
    }
}

/// Gather a whole generation (non-streaming response).
pub async fn collect(
    mut events: UnboundedReceiver<Event>,
    mut on_event: impl FnMut(&Event),
) -> Result<Collected, String> {
    let mut out = Collected::default();
    while let Some(ev) = events.recv().await {
        on_event(&ev);
        match ev {
            Event::Delta(d) => out.add(d),
            Event::Finish { reason, usage, .. } => {
                out.finish = Some((reason, usage));
                return Ok(out);
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err(ENDED_UNEXPECTEDLY.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Timing, TopLogprob};

    fn answer(reasoning_model: bool, logprobs: bool, include_usage: bool) -> Answer {
        Answer {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            reasoning_model,
            logprobs,
            include_usage,
        }
    }

    fn top(token: &str, logprob: f32) -> TopLogprob {
        TopLogprob {
            id: 1,
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
        }
    }

    /// The bytes the server sent before the wire types were typed (built with `json!`, whose maps
    /// sort keys): a refactor must not change them.
    #[test]
    fn chunks_keep_their_wire_bytes() {
        let a = answer(false, true, true);
        let delta = Delta {
            content: "Hi".into(),
            reasoning_content: String::new(),
            logprobs: vec![TokenLogprob {
                chosen: top("Hi", -0.1),
                top: vec![top("Hi", -0.1)],
            }],
        };
        let (lines, last) = a.sse_lines(Event::Delta(delta));
        assert!(!last);
        assert_eq!(
            lines[0],
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null,"index":0,"logprobs":{"content":[{"bytes":[72,105],"logprob":-0.10000000149011612,"token":"Hi","top_logprobs":[{"bytes":[72,105],"logprob":-0.10000000149011612,"token":"Hi"}]}]}}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk","usage":null}"#
        );
        let finish = Event::Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
            timing: Timing::default(),
        };
        let (lines, last) = a.sse_lines(finish);
        assert!(last);
        assert_eq!(
            lines,
            [
                r#"{"choices":[{"delta":{},"finish_reason":"length","index":0,"logprobs":null}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk","usage":null}"#,
                r#"{"choices":[],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}"#,
                "[DONE]",
            ]
        );
        let (lines, _) = answer(true, false, false).sse_lines(Event::Error("boom".into()));
        assert_eq!(
            lines[0],
            r#"{"error":{"code":null,"message":"boom","param":null,"type":"server_error"}}"#
        );
        let reasoning = Delta {
            reasoning_content: "hmm".into(),
            ..Delta::default()
        };
        let (lines, _) = answer(true, false, false).sse_lines(Event::Delta(reasoning));
        assert_eq!(
            lines[0],
            r#"{"choices":[{"delta":{"reasoning_content":"hmm"},"finish_reason":null,"index":0,"logprobs":null}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk"}"#
        );
        let first = a.choice_chunk(ChunkDelta::role(), None, None);
        assert!(json(&first).starts_with(
            r#"{"choices":[{"delta":{"content":"","role":"assistant"},"finish_reason":null"#
        ));
    }

    #[test]
    fn completions_keep_their_wire_bytes() {
        let collected = Collected {
            content: "Hello".into(),
            reasoning_content: "think".into(),
            logprobs: Vec::new(),
            finish: Some((
                FinishReason::Stop,
                Usage {
                    prompt_tokens: 4,
                    completion_tokens: 1,
                },
            )),
        };
        assert_eq!(
            json(&answer(true, false, false).completion(collected)),
            r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Hello","reasoning_content":"think","role":"assistant"}}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion","usage":{"completion_tokens":1,"prompt_tokens":4,"total_tokens":5}}"#
        );
    }
}
