//! Inputs to token ids (TEI's `encode_input`): texts tokenized with the model's special tokens
//! within its length limit (or cut at it), token ids checked against the vocabulary.
use std::sync::Arc;

use super::{blocking, EmbedError, EmbeddingService};
use crate::tokenizer::{encode_bounded, first_out_of_vocab, EncodeError};

/// One embedding input: text, or token ids used as given (no special tokens added).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// Tokenized inputs ready for the queue.
#[derive(Debug)]
pub struct Tokenized {
    pub ids: Vec<Vec<u32>>,
    /// Tokens over all inputs, special tokens included (`usage.prompt_tokens`).
    pub tokens: usize,
}

impl EmbeddingService {
    /// Tokenize and bound every input, on the blocking pool (it is CPU work).
    pub async fn encode_inputs(
        self: &Arc<Self>,
        inputs: Vec<Input>,
        truncate: bool,
    ) -> Result<Tokenized, EmbedError> {
        let this = self.clone();
        blocking("tokenization task", move || {
            this.encode_blocking(inputs, truncate)
        })
        .await?
    }

    fn encode_blocking(&self, inputs: Vec<Input>, truncate: bool) -> Result<Tokenized, EmbedError> {
        // Errors name the input only when there are several.
        let which = |i: usize| (inputs.len() > 1).then_some(i);
        let mut out = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            out.push(self.encode_one(input, truncate, which(i))?);
        }
        let tokens = out.iter().map(Vec::len).sum();
        Ok(Tokenized { ids: out, tokens })
    }

    fn encode_one(
        &self,
        input: &Input,
        truncate: bool,
        which: Option<usize>,
    ) -> Result<Vec<u32>, EmbedError> {
        let limit = self.info.max_input_tokens;
        let too_long = |tokens, exact| EmbedError::TooLong {
            input: which,
            model: self.name.clone(),
            tokens,
            exact,
            limit,
        };
        match input {
            Input::Text(text) => match encode_bounded(&self.tokenizer, text, limit, truncate) {
                Ok(enc) => Ok(enc.get_ids().to_vec()),
                Err(EncodeError::TooLong { tokens, exact }) => Err(too_long(tokens, exact)),
                Err(EncodeError::Tokenizer(message)) => Err(EmbedError::Untokenizable {
                    input: which,
                    message,
                }),
            },
            Input::Ids(ids) => {
                if let Some(position) = first_out_of_vocab(ids, self.vocab_size) {
                    return Err(EmbedError::InvalidTokenId {
                        input: which,
                        position,
                        model: self.name.clone(),
                        id: ids[position],
                        vocab: self.vocab_size,
                    });
                }
                if ids.len() > limit && !truncate {
                    return Err(too_long(ids.len(), true));
                }
                Ok(ids[..ids.len().min(limit)].to_vec())
            }
        }
    }
}
