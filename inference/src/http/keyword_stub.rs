//! TEMPORARY stand-in for `crate::keyword` with its agreed signatures, so that the `/keyword`
//! handler compiles before the keyword branch lands. Delete this file on merge and point
//! `http/keyword.rs` at `crate::keyword`.
#![allow(dead_code)]

#[derive(Debug, Clone)]
pub struct KeywordOptions {
    pub top_n: usize,
    pub use_mmr: bool,
    pub use_maxsum: bool,
    pub diversity: f32,
    pub nr_candidates: usize,
    pub ngram_range: (usize, usize),
    pub stop_words: StopWords,
    pub vocab: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub enum StopWords {
    English,
    None,
    Custom(Vec<String>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Keyword {
    pub name: String,
    pub similarity: f32,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub doc: String,
    pub candidates: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeywordError {
    #[error("{0}")]
    Invalid(String),
}

pub fn plan(doc: &str, opts: &KeywordOptions) -> Result<Plan, KeywordError> {
    let candidates = match &opts.vocab {
        Some(v) => v.clone(),
        None => doc.split_whitespace().map(str::to_lowercase).collect(),
    };
    Ok(Plan { doc: doc.to_string(), candidates })
}

pub fn select(plan: &Plan, doc: &[f32], candidates: &[Vec<f32>], opts: &KeywordOptions) -> Vec<Keyword> {
    let mut out: Vec<Keyword> = plan
        .candidates
        .iter()
        .zip(candidates)
        .map(|(name, v)| Keyword { name: name.clone(), similarity: v.iter().zip(doc).map(|(a, b)| a * b).sum() })
        .collect();
    out.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    out.truncate(opts.top_n);
    out
}
