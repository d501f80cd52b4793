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
mod cost;
mod select;
mod stop_words;
mod vectorizer;

use std::sync::LazyLock;

use jieba_rs::Jieba;
use serde::Serialize;

/// Bounds of one extraction (the server's `--keyword-*` flags): every one caps memory or CPU that
/// a single request could otherwise take without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeywordLimits {
    /// Largest document, in bytes (UTF-8).
    pub max_input_bytes: usize,
    /// Longest n-gram in `ngram_range`. KeyBERT has no limit, but every extra length adds a copy
    /// of the document's tokens to the candidates, and each candidate must be embedded.
    pub max_ngram: usize,
    /// Most distinct candidates one document may yield (each is embedded).
    pub max_candidates: usize,
    /// Most multiply-adds the selection may take: the candidates' unit vectors, the similarity
    /// matrix MMR or Max Sum reads (each entry a dot product of `dimensions` values), and Max
    /// Sum's combinations (`C(pool, top_n) * top_n * (top_n - 1)` additions).
    pub max_selection_cost: u64,
}

impl Default for KeywordLimits {
    fn default() -> Self {
        KeywordLimits {
            max_input_bytes: 1 << 20,
            max_ngram: 16,
            max_candidates: 4096,
            max_selection_cost: 100_000_000,
        }
    }
}

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
    #[error("the document has {bytes} bytes, more than the limit of {limit} (--keyword-max-input-bytes)")]
    DocumentTooLong { bytes: usize, limit: usize },
    #[error("ngram_range must satisfy 1 <= min <= max <= {limit} (--keyword-max-ngram), got ({min}, {max})")]
    NgramRange {
        min: usize,
        max: usize,
        limit: usize,
    },
    #[error("diversity must be within [0, 1], got {0}")]
    Diversity(f32),
    #[error("nr_candidates ({nr_candidates}) must be at least top_n ({top_n}) for Max Sum")]
    NrCandidates { nr_candidates: usize, top_n: usize },
    #[error(
        "the document yields more than {limit} candidate keywords (--keyword-max-candidates): \
         shorten it, narrow keyphrase_ngram_range or pass vocab"
    )]
    TooManyCandidates { limit: usize },
    #[error(
        "{method} over {candidates} candidates would take about {cost} multiply-adds (similarity \
         matrix of {dimensions}-dimension embeddings{combinations}), more than the limit of {limit} \
         (--keyword-max-selection-cost): lower {lower}"
    )]
    SelectionTooCostly {
        method: &'static str,
        candidates: usize,
        dimensions: usize,
        cost: u64,
        limit: u64,
        combinations: &'static str,
        lower: &'static str,
    },
}

impl KeywordError {
    /// The request option to change, for error reports (KeyBERT's argument names).
    pub fn option(&self) -> &'static str {
        match self {
            KeywordError::TopN => "top_n",
            KeywordError::DocumentTooLong { .. } | KeywordError::TooManyCandidates { .. } => "docs",
            KeywordError::NgramRange { .. } => "keyphrase_ngram_range",
            KeywordError::Diversity(_) => "diversity",
            KeywordError::NrCandidates { .. } => "nr_candidates",
            KeywordError::SelectionTooCostly { method, .. } => match *method {
                "MMR" => "top_n",
                "Max Sum" => "nr_candidates",
                _ => "docs",
            },
        }
    }
}

/// Validate `opts` against `limits`, segment Chinese text and list the candidate keywords of
/// `doc`. `dimensions` is the embedding size of the model that will embed them: the selection's
/// cost grows with it and is checked here, before anything is embedded.
pub fn plan(
    doc: &str,
    opts: &KeywordOptions,
    limits: &KeywordLimits,
    dimensions: usize,
) -> Result<Plan, KeywordError> {
    validate(opts, limits)?;
    if doc.len() > limits.max_input_bytes {
        return Err(KeywordError::DocumentTooLong {
            bytes: doc.len(),
            limit: limits.max_input_bytes,
        });
    }
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
        limits.max_candidates,
    )
    .map_err(|vectorizer::TooMany| KeywordError::TooManyCandidates {
        limit: limits.max_candidates,
    })?;
    cost::check(
        candidates.len(),
        dimensions,
        opts,
        limits.max_selection_cost,
    )?;
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
        // `plan` refused these (KeyBERT raises); options changed since then get nothing.
        if opts.nr_candidates < opts.top_n {
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

fn validate(opts: &KeywordOptions, limits: &KeywordLimits) -> Result<(), KeywordError> {
    if opts.top_n == 0 {
        return Err(KeywordError::TopN);
    }
    let (min, max) = opts.ngram_range;
    if min == 0 || min > max || max > limits.max_ngram {
        return Err(KeywordError::NgramRange {
            min,
            max,
            limit: limits.max_ngram,
        });
    }
    // KeyBERT reads diversity only for MMR, so only then can it be wrong.
    if opts.use_mmr && !(0.0..=1.0).contains(&opts.diversity) {
        return Err(KeywordError::Diversity(opts.diversity));
    }
    // KeyBERT raises here (a plain `Exception`, the seed's request fails) even with no candidates.
    if cost::max_sum_applies(opts) && opts.nr_candidates < opts.top_n {
        return Err(KeywordError::NrCandidates {
            nr_candidates: opts.nr_candidates,
            top_n: opts.top_n,
        });
    }
    Ok(())
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
