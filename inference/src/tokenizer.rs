//! Loading Hugging Face `tokenizer.json` files the way the reference libraries use them.
use std::path::Path;

use crate::models::ModelError;

/// Load `tokenizer.json` from a model folder with its own padding and truncation switched off:
/// sentence-transformers and transformers' chat path truncate by themselves and never pad a single
/// input, and some snapshots (all-MiniLM-L6-v2) ship padding/truncation settings that would change ids.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let file = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| ModelError::load(&file, format!("cannot load tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| ModelError::load(&file, format!("cannot disable truncation: {e}")))?;
    Ok(tok)
}

/// Texts up to this size are always tokenized whole, so that errors state exact token counts.
const WHOLE_TEXT_BYTES: usize = 64 * 1024;
/// Tokens beyond the `n` asked for that a prefix must reach before it is trusted: only the end
/// of a cut text (its last pre-token, a lookahead of the split pattern) can tokenize differently.
const HEAD_MARGIN: usize = 16;

/// Tokenize `text` without special tokens, but only as far as needed to know its first `n`
/// tokens: short texts whole; longer ones through doubling prefixes until one goes `HEAD_MARGIN`
/// tokens beyond `n`, then once more with a quarter more text, and the two must agree on their
/// first `n` tokens (else doubling goes on). Returns the encoding and whether it covers the whole
/// text (then it is exactly `encode(text, false)`). Work and memory stay within a small multiple
/// of what the first `n` tokens need, not of the text: a multi-megabyte body asked for 4,096
/// tokens costs a few tens of kilobytes of tokenization.
pub fn encode_head(
    tok: &tokenizers::Tokenizer,
    text: &str,
    n: usize,
) -> tokenizers::Result<(tokenizers::Encoding, bool)> {
    let mut len = WHOLE_TEXT_BYTES.max(n.saturating_add(HEAD_MARGIN).saturating_mul(2));
    loop {
        if len >= text.len() {
            return Ok((tok.encode(text, false)?, true));
        }
        let first = tok.encode(prefix(text, len), false)?;
        if first.len() > n + HEAD_MARGIN {
            let longer = len.saturating_add((len / 4).max(4096));
            if longer >= text.len() {
                return Ok((tok.encode(text, false)?, true));
            }
            let second = tok.encode(prefix(text, longer), false)?;
            if second.len() > n && second.get_ids()[..n] == first.get_ids()[..n] {
                return Ok((second, false));
            }
        }
        len = len.saturating_mul(2);
    }
}

/// The longest prefix of `text` of at most `len` bytes that ends on a character boundary.
fn prefix(text: &str, len: usize) -> &str {
    let mut cut = len.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// Why one text could not be encoded within a limit.
#[derive(Debug)]
pub enum EncodeError {
    /// `tokens` with special tokens; `exact` false when only a prefix was tokenized (then the
    /// text has more than that).
    TooLong {
        tokens: usize,
        exact: bool,
    },
    Tokenizer(String),
}

/// Encode `text` with the tokenizer's special tokens. Beyond `max_len` tokens (specials included)
/// fail with the length, or with `truncate` keep the first tokens and still add the specials
/// (what sentence-transformers does at `max_seq_length`). Only as much of the text is tokenized
/// as that needs (see [`encode_head`]), so a huge input costs no more than a long one.
pub fn encode_bounded(
    tok: &tokenizers::Tokenizer,
    text: &str,
    max_len: usize,
    truncate: bool,
) -> Result<tokenizers::Encoding, EncodeError> {
    use tokenizers::{PostProcessor, TruncationDirection};
    let added = tok
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false));
    let (mut enc, exact) = encode_head(tok, text, max_len.saturating_sub(added))
        .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
    let total = enc.len() + added;
    if total > max_len {
        if !truncate {
            return Err(EncodeError::TooLong {
                tokens: if exact { total } else { max_len },
                exact,
            });
        }
        enc.truncate(max_len.saturating_sub(added), 0, TruncationDirection::Right);
        enc.take_overflowing();
    }
    tok.post_process(enc, None, true)
        .map_err(|e| EncodeError::Tokenizer(e.to_string()))
}

/// Where the first id outside a vocabulary of `vocab` ids is (one would index past the embedding
/// matrix).
pub fn first_out_of_vocab(ids: &[u32], vocab: usize) -> Option<usize> {
    ids.iter().position(|&id| id as usize >= vocab)
}

/// Whether the tokenizer is byte-level (GPT-2 style BPE: GLM-4, Qwen2, Llama 3, DeepSeek, the GGUF
/// and tiktoken tokenizers): its vocabulary spells bytes with stand-in characters (`Ġ` for a
/// space, `ä¸Ń` for "中"), which mean nothing to a reader.
pub fn is_byte_level(tok: &tokenizers::Tokenizer) -> bool {
    use tokenizers::DecoderWrapper;
    fn byte_level(d: &DecoderWrapper) -> bool {
        match d {
            DecoderWrapper::ByteLevel(_) => true,
            DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(byte_level),
            _ => false,
        }
    }
    tok.get_decoder().is_some_and(byte_level)
}

/// Each token's readable text. Byte-level tokens are turned back into their bytes and decoded as
/// UTF-8, exactly as the tokenizer's ByteLevel decoder does for a single token: bytes that do not
/// complete a character become one U+FFFD each run (`String::from_utf8_lossy`), and a token that
/// is not spelled in the byte alphabet (an added token such as `<｜end▁of▁sentence｜>`) is kept as
/// written. Other tokenizers' tokens (WordPiece `##ing`, SentencePiece `▁想`) are already readable
/// and returned as they are.
pub fn readable_tokens(tok: &tokenizers::Tokenizer, raw: &[String]) -> Vec<String> {
    if !is_byte_level(tok) {
        return raw.to_vec();
    }
    raw.iter().map(|t| byte_level_text(t)).collect()
}

fn byte_level_text(token: &str) -> String {
    let bytes: Option<Vec<u8>> = token.chars().map(|c| CHAR_BYTES.get(&c).copied()).collect();
    match bytes {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => token.to_owned(),
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// are spelled with U+0100.. in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 0x100;
    (0u32..0x100)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

static CHAR_BYTES: std::sync::LazyLock<std::collections::HashMap<char, u8>> =
    std::sync::LazyLock::new(|| byte_chars().into_iter().zip(0u8..=255).collect());

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> tokenizers::Tokenizer {
        let root = std::env::var("GLM_FIXTURES_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into()
        });
        load_tokenizer(&Path::new(&root).join("tiny").join(name))
            .unwrap_or_else(|e| panic!("fixture tiny/{name} is needed: {e}"))
    }

    /// A byte-level BPE whose vocabulary holds a few of the seed README's words as single tokens,
    /// the way GLM-4's and Qwen's 150k vocabularies do; every other character stays in bytes.
    fn chinese_bpe() -> tokenizers::Tokenizer {
        let chars = byte_chars();
        let spell =
            |s: &str| -> Vec<String> { s.bytes().map(|b| chars[b as usize].to_string()).collect() };
        let mut vocab: Vec<String> = chars.iter().map(char::to_string).collect();
        let mut merges = Vec::new();
        for word in ["逃离", "虚拟", "世界"] {
            let pieces = spell(word);
            let mut joined = pieces[0].clone();
            for piece in &pieces[1..] {
                merges.push(serde_json::json!([joined.clone(), piece.clone()]));
                joined.push_str(piece);
                vocab.push(joined.clone());
            }
        }
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .zip(0u32..)
            .map(|(t, i)| (t, i.into()))
            .collect();
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        tokenizers::Tokenizer::from_bytes(json.to_string()).expect("a valid tokenizer.json")
    }

    #[test]
    fn byte_level_tokens_read_as_text() {
        let tok = chinese_bpe();
        let text = "给你一个机会，你会想逃离你所在的虚拟世界吗？";
        let enc = tok.encode(text, false).unwrap();
        let raw = enc.get_tokens().to_vec();
        // What /tokenize used to return: byte symbols such as "éĢĥç¦»" for "逃离".
        assert!(raw.iter().any(|t| t == "éĢĥç¦»"), "{raw:?}");
        let readable = readable_tokens(&tok, &raw);
        for word in ["逃离", "虚拟", "世界"] {
            assert!(readable.iter().any(|t| t == word), "{readable:?}");
        }
        // A character outside the vocabulary is three one-byte tokens: U+FFFD each.
        assert!(readable.iter().any(|t| t == "\u{FFFD}"), "{readable:?}");
        assert!(
            readable
                .iter()
                .all(|t| !t.contains('ç') && !t.contains('Ģ')),
            "{readable:?}"
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }

    #[test]
    fn readable_tokens_agree_with_the_decoder_token_by_token() {
        for name in ["qwen2", "glm4-0414", "llama"] {
            let tok = fixture(name);
            assert!(is_byte_level(&tok), "{name}");
            let enc = tok
                .encode("你好，世界！Hello wörld 😀 <|im_start|>", true)
                .unwrap();
            let readable = readable_tokens(&tok, enc.get_tokens());
            for (id, text) in enc.get_ids().iter().zip(&readable) {
                assert_eq!(&tok.decode(&[*id], false).unwrap(), text, "{name} id {id}");
            }
        }
        let bert = fixture("bert");
        assert!(!is_byte_level(&bert));
        let raw = vec!["[CLS]".to_owned(), "##ing".to_owned()];
        assert_eq!(readable_tokens(&bert, &raw), raw);
    }

    #[test]
    fn the_head_of_a_long_text_equals_the_head_of_its_whole_encoding() {
        for name in ["qwen2", "bert", "xlm-roberta"] {
            let tok = fixture(name);
            let text = "今天天气很好, the weather is fine today! 北京欢迎你。 ".repeat(8000);
            assert!(text.len() > 4 * WHOLE_TEXT_BYTES);
            let whole = tok.encode(text.as_str(), false).unwrap();
            for n in [1, 100, 5000] {
                let (head, complete) = encode_head(&tok, &text, n).unwrap();
                assert!(!complete, "{name}: a prefix suffices");
                assert!(head.len() > n);
                assert_eq!(head.get_ids()[..n], whole.get_ids()[..n], "{name} n={n}");
            }
            let short = "a short text";
            let (enc, complete) = encode_head(&tok, short, 1).unwrap();
            assert!(complete);
            assert_eq!(enc.get_ids(), tok.encode(short, false).unwrap().get_ids());
        }
    }

    #[test]
    fn encoding_is_bounded_with_specials_kept_on_truncation() {
        let tok = fixture("bert");
        let text = "a b c d e f g h";
        let full = tok.encode(text, true).unwrap();
        let n = full.len();
        let same = encode_bounded(&tok, text, n, false).ok().unwrap();
        assert_eq!(
            same.get_ids(),
            full.get_ids(),
            "within the limit: identical to encode(text, true)"
        );
        assert!(
            matches!(encode_bounded(&tok, text, n - 1, false), Err(EncodeError::TooLong { tokens, exact: true }) if tokens == n)
        );
        let cut = encode_bounded(&tok, text, 5, true).ok().unwrap();
        let ids = cut.get_ids();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[0], full.get_ids()[0], "leading special kept");
        assert_eq!(ids[4], full.get_ids()[n - 1], "trailing special kept");
        assert_eq!(&ids[1..4], &full.get_ids()[1..4]);
    }
}
