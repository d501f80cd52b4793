//! Candidate keywords as scikit-learn's `CountVectorizer` finds them in one document (the way KeyBERT
//! 0.9.0 calls it: `CountVectorizer(ngram_range, stop_words, min_df=1, vocabulary=candidates)`).
//!
//! The word analyzer is: lower-case the document, take the tokens of `(?u)\b\w\w+\b`, drop stop
//! words, then emit the n-grams of the remaining tokens joined by one space. With one document and
//! `min_df=1`, `max_df=1.0` nothing is pruned, so the candidates are the distinct n-grams in column
//! order: sorted (Python's code-point order, which is Rust's `str` order) for a learned vocabulary,
//! or the order of the given vocabulary, keeping only the entries the analyzer produced.
use std::collections::{BTreeSet, HashMap, HashSet};
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
#[cfg(test)]
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
/// The reference the streaming [`candidates`] is tested against; it holds every n-gram at once.
#[cfg(test)]
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

/// The document yields more distinct candidates than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooMany;

/// Visit every n-gram of the analyzer's output (see [`analyze`]) without storing them: one
/// buffer is extended word by word from each start position, so the work is linear in
/// tokens x longest n-gram and the memory is one n-gram. `visit` returns false to stop.
fn for_each_ngram(
    doc: &str,
    ngram_range: (usize, usize),
    stop_words: &StopWords,
    mut visit: impl FnMut(&str) -> bool,
) {
    let lowered = doc.to_lowercase();
    let filter = StopFilter::new(stop_words);
    let tokens: Vec<&str> = TOKEN
        .find_iter(&lowered)
        .map(|m| m.as_str())
        .filter(|t| !filter.is_stop(t))
        .collect();
    let (min_n, max_n) = ngram_range;
    let mut gram = String::new();
    for start in 0..tokens.len() {
        gram.clear();
        for (len, token) in tokens[start..].iter().take(max_n).enumerate() {
            if len > 0 {
                gram.push(' ');
            }
            gram.push_str(token);
            if len + 1 >= min_n && !visit(&gram) {
                return;
            }
        }
    }
}

/// The candidates present in `doc`, in `CountVectorizer` column order (see the module docs), or
/// [`TooMany`] as soon as more than `max_candidates` distinct ones are found. Memory is bounded
/// by the distinct candidates kept (at most `max_candidates + 1`), never by the n-grams seen.
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
    max_candidates: usize,
) -> Result<Vec<String>, TooMany> {
    match vocab {
        None => learned(doc, ngram_range, stop_words, max_candidates),
        Some(vocab) => fixed(doc, ngram_range, stop_words, vocab, max_candidates),
    }
}

/// Distinct n-grams in sorted order (Python's code-point order is Rust's `str` order).
fn learned(
    doc: &str,
    ngram_range: (usize, usize),
    stop_words: &StopWords,
    max_candidates: usize,
) -> Result<Vec<String>, TooMany> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut over = false;
    for_each_ngram(doc, ngram_range, stop_words, |gram| {
        if !seen.contains(gram) {
            if seen.len() == max_candidates {
                over = true;
                return false;
            }
            seen.insert(gram.to_owned());
        }
        true
    });
    if over {
        return Err(TooMany);
    }
    Ok(seen.into_iter().collect())
}

/// The vocabulary entries the document produces, in vocabulary order. Only n-gram lengths that
/// some entry has are generated (an entry of k space-separated words can only equal a k-gram).
fn fixed(
    doc: &str,
    ngram_range: (usize, usize),
    stop_words: &StopWords,
    vocab: &[String],
    max_candidates: usize,
) -> Result<Vec<String>, TooMany> {
    if has_duplicates(vocab) {
        tracing::debug!("keyword vocabulary repeats an entry; KeyBERT returns no keywords");
        return Ok(Vec::new());
    }
    let index: HashMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_str(), i))
        .collect();
    let longest = vocab
        .iter()
        .map(|v| v.split(' ').count())
        .max()
        .unwrap_or(0);
    let (min_n, max_n) = ngram_range;
    let range = (min_n, max_n.min(longest));
    let mut found = vec![false; vocab.len()];
    let mut count = 0;
    if range.0 <= range.1 {
        for_each_ngram(doc, range, stop_words, |gram| {
            if let Some(&i) = index.get(gram) {
                if !found[i] {
                    found[i] = true;
                    count += 1;
                }
            }
            count <= max_candidates
        });
    }
    if count > max_candidates {
        return Err(TooMany);
    }
    Ok(vocab
        .iter()
        .zip(found)
        .filter(|(_, f)| *f)
        .map(|(v, _)| v.clone())
        .collect())
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
        let c = candidates("beta alpha beta Gamma", (1, 1), &StopWords::None, None, 100).unwrap();
        assert_eq!(c, strings(&["alpha", "beta", "gamma"]));
    }

    #[test]
    fn custom_stop_words_are_matched_exactly() {
        let stop = StopWords::Custom(strings(&["beta", "Gamma"]));
        // "Gamma" is not lower-cased by sklearn, so the lower-cased token "gamma" survives.
        let c = candidates("beta alpha beta Gamma", (1, 1), &stop, None, 100).unwrap();
        assert_eq!(c, strings(&["alpha", "gamma"]));
    }

    #[test]
    fn fixed_vocabulary_keeps_its_order_and_case() {
        let vocab = strings(&["zeta", "Alpha", "alpha", "missing", "alpha zeta"]);
        let c = candidates("Alpha ZETA", (1, 2), &StopWords::None, Some(&vocab), 100).unwrap();
        assert_eq!(c, strings(&["zeta", "alpha", "alpha zeta"]));
    }

    #[test]
    fn bad_vocabulary_gives_no_candidates() {
        let dup = strings(&["alpha", "alpha"]);
        assert_eq!(
            candidates("alpha", (1, 1), &StopWords::None, Some(&dup), 100),
            Ok(vec![])
        );
        assert_eq!(
            candidates("alpha", (1, 1), &StopWords::None, Some(&[]), 100),
            Ok(vec![])
        );
    }

    /// Property test (a fuzzer for the vectorizer): on random documents mixing words, stop words,
    /// repeats, digits, CJK, marks and punctuation, the streaming candidates equal the reference
    /// built from every n-gram at once, for learned and fixed vocabularies, and the limit turns
    /// exactly the documents with too many distinct candidates into `TooMany`.
    mod property {
        use proptest::prelude::*;

        use super::super::*;

        fn word() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "the",
                    "and",
                    "of",
                    "rust",
                    "Rust",
                    "fast",
                    "x",
                    "7",
                    "42",
                    "na\u{ef}ve",
                    "\u{e9}t\u{e9}",
                    "\u{5317}\u{4eac}",
                    "a_b",
                    "it's",
                    "x-ray",
                    "\u{1f600}",
                    "e\u{301}",
                    "\u{df}",
                    "co-op",
                    "THE",
                    "again",
                    "with",
                ])
                .prop_map(str::to_owned),
                "[a-z\u{e0}-\u{ff}0-9_]{1,6}",
            ]
        }

        fn doc() -> impl Strategy<Value = String> {
            let sep = prop::sample::select(vec![" ", "  ", ", ", ". ", "\n", "-", "'", "\t"]);
            prop::collection::vec((word(), sep), 0..40)
                .prop_map(|parts| parts.into_iter().map(|(w, s)| format!("{w}{s}")).collect())
        }

        fn stop_words() -> impl Strategy<Value = StopWords> {
            prop_oneof![
                Just(StopWords::English),
                Just(StopWords::None),
                prop::collection::vec(word(), 0..4).prop_map(StopWords::Custom),
            ]
        }

        fn ngram_range() -> impl Strategy<Value = (usize, usize)> {
            (1usize..5, 0usize..4).prop_map(|(min, extra)| (min, min + extra))
        }

        proptest! {
            #[test]
            fn streaming_candidates_equal_the_reference(
                doc in doc(),
                range in ngram_range(),
                stop in stop_words(),
                max in 1usize..60,
            ) {
                let reference: Vec<String> = analyze(&doc, range, &stop)
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let got = candidates(&doc, range, &stop, None, max);
                if reference.len() <= max {
                    prop_assert_eq!(got, Ok(reference));
                } else {
                    prop_assert_eq!(got, Err(TooMany));
                }
            }

            #[test]
            fn fixed_vocabulary_candidates_equal_the_reference(
                doc in doc(),
                range in ngram_range(),
                stop in stop_words(),
                extra in prop::collection::vec(word(), 0..6),
                pick in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
                max in 1usize..20,
            ) {
                let grams = analyze(&doc, range, &stop);
                // Entries the document produces (when it produces any) plus arbitrary others.
                let mut vocab: Vec<String> = Vec::new();
                if !grams.is_empty() {
                    vocab.extend(pick.iter().map(|i| i.get(&grams).clone()));
                }
                vocab.extend(extra);
                let mut seen = HashSet::new();
                vocab.retain(|v| seen.insert(v.clone()));
                let present: HashSet<&str> = grams.iter().map(String::as_str).collect();
                let reference: Vec<String> = vocab
                    .iter()
                    .filter(|v| present.contains(v.as_str()))
                    .cloned()
                    .collect();
                let got = candidates(&doc, range, &stop, Some(&vocab), max);
                if reference.len() <= max {
                    prop_assert_eq!(got, Ok(reference));
                } else {
                    prop_assert_eq!(got, Err(TooMany));
                }
            }
        }
    }
}
