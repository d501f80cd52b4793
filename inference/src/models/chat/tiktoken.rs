//! tiktoken rank files (THUDM's GLM-4 `tokenizer.model`: one `base64(token bytes) rank` per line)
//! turned into a Hugging Face byte-level BPE `tokenizers::Tokenizer`.
//!
//! tiktoken keeps only ranks; BPE needs merges. The merges are recovered the standard way
//! (transformers' `TikTokenConverter`): running tiktoken's own algorithm on each token's bytes with
//! only lower-ranked tokens allowed must end in exactly two parts, which are that token's merge.
//! `ignore_merges` is on because tiktoken takes a pre-token that is itself in the vocabulary whole.
use std::collections::HashMap;

use base64::Engine;
use serde_json::{json, Value};

/// GLM-4's pre-tokenizer split (tokenization_chatglm.py `pat_str`).
pub const GLM4_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TiktokenError {
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
    #[error("rank {0} is used by more than one token")]
    DuplicateRank(u32),
    #[error("the ranks lack single byte {0:#04x}: byte-level BPE needs all 256")]
    MissingByte(u8),
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
}

/// Token bytes and rank (= token id), in file order.
pub type Ranks = Vec<(Vec<u8>, u32)>;

/// Parse a tiktoken ranks file.
pub fn parse_ranks(text: &str) -> Result<Ranks, TiktokenError> {
    let mut ranks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |msg: String| TiktokenError::Parse { line: i + 1, msg };
        let mut parts = line.split_whitespace();
        let (Some(token), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err("expected `base64-token rank`".into()));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|e| err(e.to_string()))?;
        let rank = rank
            .parse::<u32>()
            .map_err(|e| err(format!("rank {rank:?}: {e}")))?;
        ranks.push((bytes, rank));
    }
    Ok(ranks)
}

/// Write ranks in tiktoken's file format (used to build test inputs).
pub fn format_ranks(ranks: &[(Vec<u8>, u32)]) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    ranks
        .iter()
        .map(|(bytes, rank)| format!("{} {rank}\n", engine.encode(bytes)))
        .collect()
}

/// GPT-2's byte <-> printable char table used by byte-level BPE vocabularies.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\u{FFFD}')
        };
    }
    table
}

/// The bytes behind a byte-level BPE vocabulary string (`None` for a char outside the table).
pub fn bytes_from_byte_level(token: &str) -> Option<Vec<u8>> {
    let table = byte_to_char();
    let back: HashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    token.chars().map(|c| back.get(&c).copied()).collect()
}

fn to_byte_level(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// Byte-level BPE vocabulary (token string -> id) and merges in priority order.
pub type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

/// Vocabulary and merges recovered from ranks.
pub fn bpe_vocab_and_merges(ranks: &[(Vec<u8>, u32)]) -> Result<VocabAndMerges, TiktokenError> {
    let table = byte_to_char();
    let by_bytes: HashMap<&[u8], u32> = ranks.iter().map(|(b, r)| (b.as_slice(), *r)).collect();
    if by_bytes.len() != ranks.len() {
        return Err(TiktokenError::Parse {
            line: 0,
            msg: "a token appears twice".into(),
        });
    }
    if let Some(missing) = (0..=255u8).find(|b| !by_bytes.contains_key([*b].as_slice())) {
        return Err(TiktokenError::MissingByte(missing));
    }
    let mut vocab = HashMap::with_capacity(ranks.len());
    for (bytes, rank) in ranks {
        if vocab.insert(to_byte_level(bytes, &table), *rank).is_some() {
            return Err(TiktokenError::DuplicateRank(*rank));
        }
    }
    let mut merges: Vec<(u32, String, String)> = Vec::new();
    for (bytes, rank) in ranks.iter().filter(|(b, _)| b.len() > 1) {
        if let [left, right] = tiktoken_bpe(&by_bytes, bytes, Some(*rank)).as_slice() {
            merges.push((
                *rank,
                to_byte_level(left, &table),
                to_byte_level(right, &table),
            ));
        }
    }
    merges.sort_by_key(|(rank, _, _)| *rank);
    Ok((vocab, merges.into_iter().map(|(_, l, r)| (l, r)).collect()))
}

/// tiktoken's merge loop: repeatedly join the adjacent pair whose concatenation has the lowest rank
/// (below `max_rank` when given).
fn tiktoken_bpe<'a>(
    ranks: &HashMap<&[u8], u32>,
    token: &'a [u8],
    max_rank: Option<u32>,
) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = (0..=token.len()).collect();
    loop {
        let best = bounds
            .windows(3)
            .enumerate()
            .filter_map(|(i, w)| ranks.get(&token[w[0]..w[2]]).map(|&r| (r, i)))
            .min();
        match best {
            Some((rank, i)) if max_rank.is_none_or(|m| rank < m) => {
                bounds.remove(i + 1);
            }
            _ => break,
        }
    }
    bounds.windows(2).map(|w| &token[w[0]..w[1]]).collect()
}

/// What besides the ranks makes the tokenizer.
pub struct TokenizerSpec<'a> {
    /// Pre-tokenizer regex (e.g. [`GLM4_PATTERN`]).
    pub pattern: &'a str,
    /// Special tokens (content, id), matched whole before BPE.
    pub special_tokens: &'a [(String, u32)],
    /// Special tokens put before every sequence when special tokens are added (GLM-4: `[gMASK]`,
    /// `<sop>`); they must be among `special_tokens`.
    pub prefix: &'a [&'a str],
}

/// Build a byte-level BPE tokenizer equivalent to tiktoken with these ranks.
pub fn build_tokenizer(
    ranks: &[(Vec<u8>, u32)],
    spec: &TokenizerSpec<'_>,
) -> Result<tokenizers::Tokenizer, TiktokenError> {
    let (mut vocab, merges) = bpe_vocab_and_merges(ranks)?;
    // `tokenizers` numbers an added token that is missing from the model's vocabulary after the
    // vocabulary, whatever id it is given; in the vocabulary it keeps its own id.
    for (content, id) in spec.special_tokens {
        if let Some(taken) = vocab.insert(content.clone(), *id).filter(|old| old != id) {
            return Err(TiktokenError::Build(format!(
                "special token {content} (id {id}) is also rank {taken}"
            )));
        }
        if let Some((bytes, _)) = ranks.iter().find(|(_, r)| r == id) {
            return Err(TiktokenError::Build(format!(
                "special token {content} has id {id}, which is the rank of {:?}",
                String::from_utf8_lossy(bytes)
            )));
        }
    }
    let added: Vec<Value> = spec
        .special_tokens
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": spec.pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": post_processor(spec)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merges},
    });
    tokenizer
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| TiktokenError::Build(e.to_string()))
}

fn post_processor(spec: &TokenizerSpec<'_>) -> Result<Value, TiktokenError> {
    if spec.prefix.is_empty() {
        return Ok(
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        );
    }
    let mut special = serde_json::Map::new();
    let mut single = Vec::new();
    for &token in spec.prefix {
        let id = spec
            .special_tokens
            .iter()
            .find(|(content, _)| content == token)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                TiktokenError::Build(format!("prefix token {token} is not a special token"))
            })?;
        special.insert(
            token.into(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
        single.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
    }
    let mut pair = single.clone();
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks_of(tokens: &[&str]) -> Ranks {
        let mut ranks: Ranks = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        ranks.extend(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_bytes().to_vec(), 256 + i as u32)),
        );
        ranks
    }

    #[test]
    fn merges_follow_tiktoken_order() {
        // "abc" is reachable only through "ab" (rank 256) + "c", not "a" + "bc" (rank 258).
        let (_, merges) = bpe_vocab_and_merges(&ranks_of(&["ab", "abc", "bc"])).unwrap();
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, vec![("a", "b"), ("ab", "c"), ("b", "c")]);
    }

    #[test]
    fn round_trips_the_file_format() {
        let ranks = ranks_of(&["he", "llo", "你"]);
        assert_eq!(parse_ranks(&format_ranks(&ranks)).unwrap(), ranks);
        assert!(matches!(
            parse_ranks("aGk= x"),
            Err(TiktokenError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn missing_bytes_are_rejected() {
        let ranks: Ranks = vec![(b"a".to_vec(), 0)];
        assert!(matches!(
            bpe_vocab_and_merges(&ranks),
            Err(TiktokenError::MissingByte(0))
        ));
    }

    #[test]
    fn encodes_with_specials_and_prefix() {
        let ranks = ranks_of(&["he", "ll", "hell", "hello", " w"]);
        let specials = vec![("[gMASK]".to_string(), 300), ("<sop>".to_string(), 301)];
        let spec = TokenizerSpec {
            pattern: GLM4_PATTERN,
            special_tokens: &specials,
            prefix: &["[gMASK]", "<sop>"],
        };
        let tok = build_tokenizer(&ranks, &spec).unwrap();
        let plain = tok.encode("hello w[gMASK]", false).unwrap();
        assert_eq!(plain.get_ids(), &[259, 260, 300]);
        let with = tok.encode("hello", true).unwrap();
        assert_eq!(with.get_ids(), &[300, 301, 259]);
        assert_eq!(tok.decode(&[259, 260], false).unwrap(), "hello w");
    }
}
