//! Candidate keywords as scikit-learn's `CountVectorizer` finds them in one document (the way KeyBERT
//! 0.9.0 calls it: `CountVectorizer(ngram_range, stop_words, min_df=1, vocabulary=candidates)`).
//!
//! The word analyzer is: lower-case the document, take the tokens of `(?u)\b\w\w+\b`, drop stop
//! words, then emit the n-grams of the remaining tokens joined by one space. With one document and
//! `min_df=1`, `max_df=1.0` nothing is pruned, so the candidates are the distinct n-grams in column
//! order: sorted (Python's code-point order, which is Rust's `str` order) for a learned vocabulary,
//! or the order of the given vocabulary, keeping only the entries the analyzer produced.
use std::collections::{BTreeSet, HashSet};
use std::sync::LazyLock;

use regex::Regex;

use super::stop_words::is_english_stop_word;
use super::StopWords;

/// Python's `re` `\w` on `str` patterns is exactly `[\p{L}\p{N}_]` (checked over every code point
/// with Python 3.11), which is narrower than Rust's Unicode `\w` (that one adds marks and
/// `Join_Control`), so the class is spelled out. A maximal run of two or more such characters is
/// what `\b\w\w+\b` matches: `\b` forbids starting or ending inside a run.
static TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[\p{L}\p{N}_]{2,}").expect("constant token pattern compiles"));

/// The analyzer's tokens: the lower-cased document split by the token pattern.
pub(crate) fn tokenize(doc: &str) -> Vec<String> {
    let lowered = doc.to_lowercase();
    TOKEN
        .find_iter(&lowered)
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// Stop-word filter resolved once per call (sklearn's `_check_stop_list`).
enum StopFilter<'a> {
    None,
    English,
    Custom(HashSet<&'a str>),
}

impl<'a> StopFilter<'a> {
    fn new(stop_words: &'a StopWords) -> Self {
        match stop_words {
            StopWords::None => StopFilter::None,
            StopWords::English => StopFilter::English,
            StopWords::Custom(words) => {
                StopFilter::Custom(words.iter().map(String::as_str).collect())
            }
        }
    }

    fn is_stop(&self, token: &str) -> bool {
        match self {
            StopFilter::None => false,
            StopFilter::English => is_english_stop_word(token),
            StopFilter::Custom(set) => set.contains(token),
        }
    }
}

/// Every n-gram the analyzer emits (with repeats), as sklearn's `_word_ngrams` builds them:
/// stop words are removed first, so an n-gram may join words that a stop word separated.
pub(crate) fn analyze(
    doc: &str,
    ngram_range: (usize, usize),
    stop_words: &StopWords,
) -> Vec<String> {
    let filter = StopFilter::new(stop_words);
    let tokens: Vec<String> = tokenize(doc)
        .into_iter()
        .filter(|t| !filter.is_stop(t))
        .collect();
    let (min_n, max_n) = ngram_range;
    let mut out = Vec::new();
    for n in min_n..=max_n.min(tokens.len()) {
        out.extend(tokens.windows(n).map(|w| w.join(" ")));
    }
    out
}

/// The candidates present in `doc`, in `CountVectorizer` column order (see the module docs).
///
/// With a vocabulary, entries are matched as given: the document is lower-cased but the vocabulary
/// is not, so an entry with upper-case letters never matches (sklearn only warns). A vocabulary that
/// is empty or repeats an entry makes sklearn raise `ValueError`, which KeyBERT turns into "no
/// keywords"; both give an empty list here.
pub(crate) fn candidates(
    doc: &str,
    ngram_range: (usize, usize),
    stop_words: &StopWords,
    vocab: Option<&[String]>,
) -> Vec<String> {
    let grams = analyze(doc, ngram_range, stop_words);
    match vocab {
        None => grams
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        Some(vocab) => {
            if has_duplicates(vocab) {
                tracing::debug!("keyword vocabulary repeats an entry; KeyBERT returns no keywords");
                return Vec::new();
            }
            let present: HashSet<&str> = grams.iter().map(String::as_str).collect();
            vocab
                .iter()
                .filter(|v| present.contains(v.as_str()))
                .cloned()
                .collect()
        }
    }
}

fn has_duplicates(vocab: &[String]) -> bool {
    let mut seen = HashSet::with_capacity(vocab.len());
    !vocab.iter().all(|v| seen.insert(v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn tokens_are_runs_of_two_or_more_word_chars() {
        // Single characters ("a", "I", "7") never match; apostrophes and hyphens split words;
        // "_" and digits are word characters; Python lower-cases the whole document first.
        assert_eq!(
            tokenize("I'm a Rust_fan, x-ray 7 Ünïcödé 2,900 ß"),
            strings(&["rust_fan", "ray", "ünïcödé", "900"])
        );
    }

    #[test]
    fn combining_marks_split_tokens_as_in_python() {
        // "e" + U+0301 (a mark, not \w in Python) + "te": Python yields no token "é" but "te".
        assert_eq!(tokenize("ae\u{301}te"), strings(&["ae", "te"]));
        // Superscript two is No (a number), so \w in Python: "x²" is one token.
        assert_eq!(tokenize("x² y"), strings(&["x²"]));
    }

    #[test]
    fn stop_words_are_removed_before_ngrams() {
        let grams = analyze("The cat and the dog", (1, 2), &StopWords::English);
        assert_eq!(grams, strings(&["cat", "dog", "cat dog"]));
        let grams = analyze("The cat and the dog", (2, 2), &StopWords::None);
        assert_eq!(
            grams,
            strings(&["the cat", "cat and", "and the", "the dog"])
        );
    }

    #[test]
    fn ngram_longer_than_document_gives_nothing() {
        assert!(analyze("one two", (3, 4), &StopWords::None).is_empty());
    }

    #[test]
    fn learned_vocabulary_is_sorted_and_distinct() {
        let c = candidates("beta alpha beta Gamma", (1, 1), &StopWords::None, None);
        assert_eq!(c, strings(&["alpha", "beta", "gamma"]));
    }

    #[test]
    fn custom_stop_words_are_matched_exactly() {
        let stop = StopWords::Custom(strings(&["beta", "Gamma"]));
        // "Gamma" is not lower-cased by sklearn, so the lower-cased token "gamma" survives.
        let c = candidates("beta alpha beta Gamma", (1, 1), &stop, None);
        assert_eq!(c, strings(&["alpha", "gamma"]));
    }

    #[test]
    fn fixed_vocabulary_keeps_its_order_and_case() {
        let vocab = strings(&["zeta", "Alpha", "alpha", "missing", "alpha zeta"]);
        let c = candidates("Alpha ZETA", (1, 2), &StopWords::None, Some(&vocab));
        assert_eq!(c, strings(&["zeta", "alpha", "alpha zeta"]));
    }

    #[test]
    fn bad_vocabulary_gives_no_candidates() {
        let dup = strings(&["alpha", "alpha"]);
        assert!(candidates("alpha", (1, 1), &StopWords::None, Some(&dup)).is_empty());
        assert!(candidates("alpha", (1, 1), &StopWords::None, Some(&[])).is_empty());
    }
}
