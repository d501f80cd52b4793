//! Incremental detokenization that never emits half a character.
//!
//! Text-generation-inference's method: decode a small window of ids twice, without and with the
//! newest ids, and emit the difference once it no longer ends in U+FFFD (an incomplete UTF-8
//! sequence of a byte-level token). Decoding a window rather than single ids keeps decoders that
//! depend on context (leading-space handling of SentencePiece/Metaspace) right.
use tokenizers::Tokenizer;

/// Prompt ids kept as left context so that the first generated token decodes as it would mid-text.
const PROMPT_CONTEXT: usize = 5;
const REPLACEMENT: char = '\u{FFFD}';

#[derive(Debug, thiserror::Error)]
#[error("detokenization failed: {0}")]
pub struct DecodeError(String);

#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        IncrementalDecoder {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            skip_special_tokens,
        }
    }

    /// Add one id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, DecodeError> {
        self.ids.push(id);
        let (prefix, full) = self.window(tokenizer)?;
        if full.len() > prefix.len() && !full.ends_with(REPLACEMENT) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(difference(&prefix, full));
        }
        Ok(String::new())
    }

    /// Text still held back (an incomplete character at the end of generation), rendered lossily.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, DecodeError> {
        let (prefix, full) = self.window(tokenizer)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(if full.len() > prefix.len() {
            difference(&prefix, full)
        } else {
            String::new()
        })
    }

    fn window(&self, tokenizer: &Tokenizer) -> Result<(String, String), DecodeError> {
        let start = self.prefix_offset;
        let prefix = self.decode(
            tokenizer,
            self.ids.get(start..self.read_offset).unwrap_or_default(),
        )?;
        let full = self.decode(tokenizer, self.ids.get(start..).unwrap_or_default())?;
        Ok((prefix, full))
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, DecodeError> {
        tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| DecodeError(e.to_string()))
    }
}

/// `full` minus its leading `prefix`. Decoders can rewrite the window's start (rare); then fall back
/// to the common byte length, cut at a character boundary.
fn difference(prefix: &str, full: String) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let mut cut = prefix.len().min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    full[cut..].to_owned()
}

/// A single token's text for log-probabilities: special tokens included, bytes lossily decoded.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen2_tokenizer() -> Tokenizer {
        let root = std::env::var("GLM_FIXTURES_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into()
        });
        let dir = std::path::Path::new(&root).join("tiny/qwen2");
        crate::tokenizer::load_tokenizer(&dir).unwrap_or_else(|e| {
            panic!("fixture tokenizer missing ({e}); see /work/shared/fixtures/README.md")
        })
    }

    #[test]
    fn multibyte_characters_are_never_split_and_concatenation_is_exact() {
        let tok = qwen2_tokenizer();
        let text = "你好，世界！Hello 😀 naïve 春天的短诗。";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut dec = IncrementalDecoder::new(&[], true);
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(
                !piece.contains(REPLACEMENT),
                "emitted a broken character: {piece:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&dec.flush(&tok).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn byte_tokens_of_one_character_are_held_until_complete() {
        let tok = qwen2_tokenizer();
        // "😀" is four bytes; byte-level BPE without that merge splits it over several ids
        let ids = tok.encode("😀", false).unwrap().get_ids().to_vec();
        let mut dec = IncrementalDecoder::new(&[], true);
        let pieces: Vec<String> = ids.iter().map(|&id| dec.push(&tok, id).unwrap()).collect();
        assert_eq!(pieces.concat(), "😀");
        if ids.len() > 1 {
            assert!(
                pieces[..ids.len() - 1].iter().all(String::is_empty),
                "{pieces:?}"
            );
        }
    }
}
