//! Option handling and the plan/select glue; the vectorizer and the selection algorithms have
//! their own tests, and `tests/keyword_fixtures.rs` compares everything with KeyBERT's output.
use super::*;

fn opts() -> KeywordOptions {
    KeywordOptions::default()
}

/// `plan` within the default limits, for all-MiniLM-L6-v2's 384 dimensions.
fn plan(doc: &str, o: &KeywordOptions) -> Result<Plan, KeywordError> {
    super::plan(doc, o, &KeywordLimits::default(), 384)
}

#[test]
fn defaults_are_keybert_0_9_0() {
    let o = opts();
    assert_eq!(
        (o.top_n, o.diversity, o.nr_candidates, o.ngram_range),
        (5, 0.5, 20, (1, 1))
    );
    assert!(!o.use_mmr && !o.use_maxsum && o.vocab.is_none());
    assert_eq!(o.stop_words, StopWords::English);
}

#[test]
fn invalid_options_are_refused_with_their_limits() {
    let err = |o: KeywordOptions| plan("some text here", &o).unwrap_err();
    assert_eq!(
        err(KeywordOptions { top_n: 0, ..opts() }),
        KeywordError::TopN
    );
    let max_ngram = KeywordLimits::default().max_ngram;
    for range in [(0, 1), (2, 1), (1, max_ngram + 1)] {
        let e = err(KeywordOptions {
            ngram_range: range,
            ..opts()
        });
        assert_eq!(
            e,
            KeywordError::NgramRange {
                min: range.0,
                max: range.1,
                limit: max_ngram,
            }
        );
        assert!(e.to_string().contains("1 <= min <= max <= 16"), "{e}");
    }
    for d in [-0.1, 1.5, f32::NAN] {
        let e = err(KeywordOptions {
            use_mmr: true,
            diversity: d,
            ..opts()
        });
        assert!(matches!(e, KeywordError::Diversity(_)), "{e}");
    }
    let e = err(KeywordOptions {
        use_maxsum: true,
        nr_candidates: 4,
        ..opts()
    });
    assert_eq!(
        e,
        KeywordError::NrCandidates {
            nr_candidates: 4,
            top_n: 5
        }
    );
}

#[test]
fn options_that_keybert_ignores_are_not_checked() {
    // diversity only matters for MMR, nr_candidates only for Max Sum (and MMR wins over it).
    let text = "alpha beta gamma";
    assert!(plan(
        text,
        &KeywordOptions {
            diversity: 3.0,
            ..opts()
        }
    )
    .is_ok());
    let both = KeywordOptions {
        use_mmr: true,
        use_maxsum: true,
        nr_candidates: 1,
        ..opts()
    };
    assert!(plan(text, &both).is_ok());
}

#[test]
fn max_sum_cost_is_bounded_by_the_candidates_actually_found() {
    // 40 distinct words: C(40, 10) * 90 is far beyond the limit; C(20, 10) * 90 = 16.6M is not.
    let doc: String = (0..40).map(|i| format!("w{i:02}x ")).collect();
    let big = KeywordOptions {
        use_maxsum: true,
        top_n: 10,
        nr_candidates: 40,
        ..opts()
    };
    let e = plan(&doc, &big).unwrap_err();
    assert!(
        matches!(
            e,
            KeywordError::SelectionTooCostly {
                method: "Max Sum",
                candidates: 40,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.option(), "nr_candidates");
    let ok = KeywordOptions {
        nr_candidates: 20,
        ..big.clone()
    };
    assert_eq!(plan(&doc, &ok).map(|p| p.candidates.len()), Ok(40));
    // A short document limits the pool: C(12, 10) = 66.
    let short: String = (0..12).map(|i| format!("w{i:02}x ")).collect();
    assert!(plan(&short, &big).is_ok());
}

#[test]
fn documents_and_candidates_beyond_the_limits_are_refused() {
    let limits = KeywordLimits {
        max_input_bytes: 100,
        max_candidates: 10,
        ..KeywordLimits::default()
    };
    let long = "word ".repeat(30);
    let e = super::plan(&long, &opts(), &limits, 384).unwrap_err();
    assert_eq!(
        e,
        KeywordError::DocumentTooLong {
            bytes: 150,
            limit: 100
        }
    );
    assert!(e.to_string().contains("--keyword-max-input-bytes"), "{e}");
    // 11 distinct words: one more than allowed.
    let many: String = (0..11).map(|i| format!("w{i:02}x ")).collect();
    let e = super::plan(&many, &opts(), &limits, 384).unwrap_err();
    assert_eq!(e, KeywordError::TooManyCandidates { limit: 10 });
    assert!(e.to_string().contains("--keyword-max-candidates"), "{e}");
    let ten: String = (0..10).map(|i| format!("w{i:02}x w{i:02}x ")).collect();
    assert_eq!(
        super::plan(&ten, &opts(), &limits, 384).map(|p| p.candidates.len()),
        Ok(10)
    );
    // With a vocabulary, only the entries found count.
    let vocab = KeywordOptions {
        vocab: Some((0..11).map(|i| format!("w{i:02}x")).collect()),
        ..opts()
    };
    assert_eq!(
        super::plan(&many, &vocab, &limits, 384).unwrap_err(),
        KeywordError::TooManyCandidates { limit: 10 }
    );
    assert_eq!(
        super::plan(&ten, &vocab, &limits, 384).map(|p| p.candidates.len()),
        Ok(10)
    );
}

#[test]
fn only_chinese_text_is_segmented() {
    let en = plan("Rust is fast, really fast.", &opts()).unwrap();
    assert_eq!(en.doc, "Rust is fast, really fast.");
    assert_eq!(en.candidates, vec!["fast", "really", "rust"]);
    let zh = plan("我爱北京天安门", &opts()).unwrap();
    assert_eq!(zh.doc, "我 爱 北京 天安门");
    assert_eq!(zh.candidates, vec!["北京", "天安门"]);
}

fn plan_of(candidates: &[&str]) -> Plan {
    Plan {
        doc: String::new(),
        candidates: candidates.iter().map(|c| (*c).to_owned()).collect(),
    }
}

#[test]
fn select_rounds_and_orders_plain_ranking() {
    let p = plan_of(&["a", "b", "c"]);
    // doc (1, 0); candidates with cosines 0.6, 0.8, 0.0 to it.
    let emb = vec![vec![0.6, 0.8], vec![0.8, 0.6], vec![0.0, 2.0]];
    let got = select(
        &p,
        &[3.0, 0.0],
        &emb,
        &KeywordOptions { top_n: 2, ..opts() },
    );
    let want = vec![
        Keyword {
            name: "b".into(),
            similarity: 0.8,
        },
        Keyword {
            name: "a".into(),
            similarity: 0.6,
        },
    ];
    assert_eq!(got, want);
}

#[test]
fn mmr_results_are_sorted_by_rounded_score_keeping_pick_order_on_ties() {
    // doc (1, 0). a: cos 0.9, b: cos 0.50001, c: cos 0.50004, all rounding to 0.5 for b and c.
    // MMR with diversity 0 picks by raw score: a, c, b; the stable sort by rounded score keeps
    // c before b although both show 0.5.
    let unit = |c: f32| vec![c, (1.0 - c * c).sqrt()];
    let p = plan_of(&["a", "b", "c"]);
    let emb = vec![unit(0.9), unit(0.50001), unit(0.50004)];
    let o = KeywordOptions {
        use_mmr: true,
        diversity: 0.0,
        ..opts()
    };
    let names: Vec<String> = select(&p, &[1.0, 0.0], &emb, &o)
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, vec!["a", "c", "b"]);
}

#[test]
fn select_without_candidates_is_empty() {
    let p = plan_of(&[]);
    for o in [
        opts(),
        KeywordOptions {
            use_mmr: true,
            ..opts()
        },
        KeywordOptions {
            use_maxsum: true,
            ..opts()
        },
    ] {
        assert!(select(&p, &[1.0, 0.0], &[], &o).is_empty());
    }
}

#[test]
fn keyword_serializes_as_the_seed_does() {
    let k = Keyword {
        name: "华为".into(),
        similarity: 0.8273,
    };
    assert_eq!(
        serde_json::to_string(&k).unwrap(),
        r#"{"name":"华为","similarity":0.8273}"#
    );
}
