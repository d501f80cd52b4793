//! KeyBERT-style keyword extraction, matching KeyBERT 0.9.0 with scikit-learn's `CountVectorizer`.
//!
//! Two steps around the embedder, so that this module stays free of models and HTTP:
//! 1. [`plan`] validates the options, segments Chinese text with jieba and lists the candidate
//!    keywords found in the document ([`Plan::candidates`]) and the text to embed as the document
//!    ([`Plan::doc`]).
//! 2. The caller embeds `plan.doc` and every candidate with the same model, then [`select`] ranks
//!    the candidates by cosine similarity (plain, MMR or Max Sum).
//!
//! An empty candidate list means "no keywords" (KeyBERT returns `[]`); the caller can skip the
//! embedding then.
mod select;
mod stop_words;
mod vectorizer;

use std::sync::LazyLock;

use jieba_rs::Jieba;
use serde::Serialize;

/// Longest n-gram accepted in `ngram_range`. KeyBERT has no limit, but every extra length adds a
/// copy of the document's tokens to the candidates, and each candidate must be embedded.
pub const MAX_NGRAM: usize = 16;

/// Most pair similarities Max Sum may add up: `C(pool, top_n) * top_n * (top_n - 1)`, where pool is
/// `min(nr_candidates, candidates found)`. KeyBERT enumerates every combination, which grows
/// factorially; 50 million additions take tens of milliseconds and cover the defaults
/// (`C(20, 5)` = 15,504 combinations) up to `top_n` 10 with 20 candidates (`C(20, 10)` = 184,756).
pub const MAX_SUM_PAIR_LIMIT: u64 = 50_000_000;

/// Options of one extraction; field names follow KeyBERT's `extract_keywords` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct KeywordOptions {
    /// Number of keywords to return (`top_n`).
    pub top_n: usize,
    /// Maximal Marginal Relevance; wins over `use_maxsum` when both are set, as in KeyBERT.
    pub use_mmr: bool,
    /// Max Sum Distance.
    pub use_maxsum: bool,
    /// MMR trade-off in `[0, 1]`: 0 ranks by relevance only, 1 by diversity only.
    pub diversity: f32,
    /// Max Sum pool: how many of the most similar candidates are combined.
    pub nr_candidates: usize,
    /// Inclusive n-gram lengths of candidate keyphrases (`keyphrase_ngram_range`).
    pub ngram_range: (usize, usize),
    pub stop_words: StopWords,
    /// Fixed candidates (KeyBERT's `candidates`, the seed's `vocab`): only these can be keywords.
    pub vocab: Option<Vec<String>>,
}

impl Default for KeywordOptions {
    /// KeyBERT 0.9.0's defaults.
    fn default() -> Self {
        KeywordOptions {
            top_n: 5,
            use_mmr: false,
            use_maxsum: false,
            diversity: 0.5,
            nr_candidates: 20,
            ngram_range: (1, 1),
            stop_words: StopWords::English,
            vocab: None,
        }
    }
}

/// Words removed before n-grams are formed (scikit-learn's `stop_words`).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StopWords {
    /// scikit-learn's built-in English list (`'english'`, KeyBERT's default).
    #[default]
    English,
    /// Keep every word.
    None,
    /// These exact strings (compared with the lower-cased tokens, not lower-cased themselves).
    Custom(Vec<String>),
}

/// One extracted keyword with its cosine similarity to the document, rounded to 4 decimals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keyword {
    pub name: String,
    pub similarity: f32,
}

/// What to embed for one extraction.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The text to embed as the document: the input, or for Chinese text its jieba segmentation
    /// joined by spaces (the seed embeds the segmented text).
    pub doc: String,
    /// Candidate keywords present in the document, in `CountVectorizer` column order.
    pub candidates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeywordError {
    #[error("top_n must be at least 1")]
    TopN,
    #[error("ngram_range must satisfy 1 <= min <= max <= {MAX_NGRAM}, got ({min}, {max})")]
    NgramRange { min: usize, max: usize },
    #[error("diversity must be within [0, 1], got {0}")]
    Diversity(f32),
    #[error("nr_candidates ({nr_candidates}) must be at least top_n ({top_n}) for Max Sum")]
    NrCandidates { nr_candidates: usize, top_n: usize },
    #[error(
        "Max Sum would sum more than {MAX_SUM_PAIR_LIMIT} pair similarities (every combination of \
         top_n {top_n} among {pool} candidates, top_n * (top_n - 1) pairs each): lower \
         nr_candidates or top_n"
    )]
    MaxSumTooLarge { pool: usize, top_n: usize },
}

/// Validate `opts`, segment Chinese text and list the candidate keywords of `doc`.
pub fn plan(doc: &str, opts: &KeywordOptions) -> Result<Plan, KeywordError> {
    validate(opts)?;
    let doc = if has_han(doc) {
        segment(doc)
    } else {
        doc.to_owned()
    };
    let candidates = vectorizer::candidates(
        &doc,
        opts.ngram_range,
        &opts.stop_words,
        opts.vocab.as_deref(),
    );
    if max_sum_applies(opts) {
        check_max_sum_cost(candidates.len(), opts)?;
    }
    Ok(Plan { doc, candidates })
}

/// Rank the plan's candidates given the embedding of `plan.doc` and of each candidate (same
/// order as `plan.candidates`). Keywords come in KeyBERT's order: most similar first for plain
/// ranking and MMR, least similar first for Max Sum (KeyBERT keeps its pool order there).
pub fn select(
    plan: &Plan,
    doc_embedding: &[f32],
    candidate_embeddings: &[Vec<f32>],
    opts: &KeywordOptions,
) -> Vec<Keyword> {
    let n = plan.candidates.len().min(candidate_embeddings.len());
    if n < plan.candidates.len().max(candidate_embeddings.len()) {
        tracing::warn!(
            candidates = plan.candidates.len(),
            embeddings = candidate_embeddings.len(),
            "keyword candidates and embeddings differ in number; using the common prefix"
        );
    }
    let space = select::Space::new(doc_embedding, &candidate_embeddings[..n]);
    let keyword = |i: usize| Keyword {
        name: plan.candidates[i].clone(),
        similarity: select::round4(space.doc_sim[i]),
    };
    if opts.use_mmr {
        let mut keywords: Vec<Keyword> = select::mmr(&space, opts.top_n, opts.diversity)
            .into_iter()
            .map(keyword)
            .collect();
        // KeyBERT sorts MMR picks by rounded score, descending; Python's sort is stable.
        keywords.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        keywords
    } else if opts.use_maxsum {
        // `plan` refused oversized requests; options changed since then get nothing.
        if check_max_sum_cost(n, opts).is_err() || opts.nr_candidates < opts.top_n {
            tracing::warn!("Max Sum options not validated by plan; no keywords");
            return Vec::new();
        }
        select::max_sum(&space, opts.top_n, opts.nr_candidates)
            .into_iter()
            .map(keyword)
            .collect()
    } else {
        select::top_similar(&space, opts.top_n)
            .into_iter()
            .map(keyword)
            .collect()
    }
}

fn validate(opts: &KeywordOptions) -> Result<(), KeywordError> {
    if opts.top_n == 0 {
        return Err(KeywordError::TopN);
    }
    let (min, max) = opts.ngram_range;
    if min == 0 || min > max || max > MAX_NGRAM {
        return Err(KeywordError::NgramRange { min, max });
    }
    // KeyBERT reads diversity only for MMR, so only then can it be wrong.
    if opts.use_mmr && !(0.0..=1.0).contains(&opts.diversity) {
        return Err(KeywordError::Diversity(opts.diversity));
    }
    // KeyBERT raises here (a plain `Exception`, the seed's request fails) even with no candidates.
    if max_sum_applies(opts) && opts.nr_candidates < opts.top_n {
        return Err(KeywordError::NrCandidates {
            nr_candidates: opts.nr_candidates,
            top_n: opts.top_n,
        });
    }
    Ok(())
}

fn max_sum_applies(opts: &KeywordOptions) -> bool {
    opts.use_maxsum && !opts.use_mmr
}

fn check_max_sum_cost(found: usize, opts: &KeywordOptions) -> Result<(), KeywordError> {
    let top_n = opts.top_n;
    if top_n > found {
        return Ok(()); // KeyBERT returns [] without combining anything.
    }
    let pool = opts.nr_candidates.min(found);
    let per_combination = (top_n as u64)
        .saturating_mul(top_n.saturating_sub(1) as u64)
        .max(1);
    match binomial_up_to(
        pool as u64,
        top_n as u64,
        MAX_SUM_PAIR_LIMIT / per_combination,
    ) {
        Some(_) => Ok(()),
        None => Err(KeywordError::MaxSumTooLarge { pool, top_n }),
    }
}

/// `C(n, k)` when it is at most `limit`, else `None`. The running values `C(n - k + i, i)` only
/// grow with `i`, so the first one above `limit` decides and nothing overflows.
fn binomial_up_to(n: u64, k: u64, limit: u64) -> Option<u64> {
    if k > n {
        return Some(0);
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 1..=k {
        c = c * u128::from(n - k + i) / u128::from(i);
        if c > u128::from(limit) {
            return None;
        }
    }
    u64::try_from(c).ok()
}

/// Whether jieba would treat part of the text as Chinese (its `re_han_default` ideograph range).
fn has_han(text: &str) -> bool {
    text.chars().any(|c| ('\u{4E00}'..='\u{9FD5}').contains(&c))
}

static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);

/// `' '.join(jieba.cut(doc))`: accurate mode with HMM, default dictionary.
fn segment(doc: &str) -> String {
    let words: Vec<&str> = JIEBA.cut(doc, true).into_iter().map(|t| t.word).collect();
    words.join(" ")
}

#[cfg(test)]
mod tests;
