//! `/keyword` extraction against KeyBERT 0.9.0 (`shared/fixtures/keyword/reference.json`, made by
//! `make_fixtures.py`): candidates, jieba segmentation, and the keywords themselves with the real
//! all-MiniLM-L6-v2 embedder.
use std::path::PathBuf;

use glm_inference::keyword::{self, KeywordError, KeywordLimits, KeywordOptions, Plan, StopWords};
use glm_inference::models::{self, detect_family, Device, EmbedOutputs, LoadedEmbedder};
use serde_json::Value;

/// `keyword::plan` within the server's default limits, for all-MiniLM-L6-v2's 384 dimensions.
fn plan(doc: &str, opts: &KeywordOptions) -> Result<Plan, KeywordError> {
    keyword::plan(doc, opts, &KeywordLimits::default(), 384)
}

fn fixtures_dir() -> PathBuf {
    std::env::var_os("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

fn models_dir() -> PathBuf {
    std::env::var_os("GLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.models")))
}

fn reference() -> Value {
    let path = fixtures_dir().join("keyword/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; set GLM_FIXTURES_DIR to the shared fixtures folder",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("reference.json is JSON")
}

/// The document a case runs on, before segmentation (the zh cases give the original text to
/// `plan`, which must segment it as the generator did).
fn document<'a>(reference: &'a Value, case: &Value) -> &'a str {
    let name = case["doc"].as_str().expect("case doc name");
    let doc = &reference["docs"][name];
    doc.get("original")
        .unwrap_or(doc)
        .as_str()
        .expect("document text")
}

/// KeyBERT call parameters to options; unlisted ones keep KeyBERT's defaults.
fn options(params: &Value) -> KeywordOptions {
    let mut o = KeywordOptions::default();
    let usize_of = |v: &Value| v.as_u64().expect("integer parameter") as usize;
    if let Some(v) = params.get("top_n") {
        o.top_n = usize_of(v);
    }
    if let Some(v) = params.get("nr_candidates") {
        o.nr_candidates = usize_of(v);
    }
    if let Some(v) = params.get("diversity") {
        o.diversity = v.as_f64().expect("diversity") as f32;
    }
    o.use_mmr = params
        .get("use_mmr")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    o.use_maxsum = params
        .get("use_maxsum")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(r) = params.get("keyphrase_ngram_range") {
        o.ngram_range = (usize_of(&r[0]), usize_of(&r[1]));
    }
    match params.get("stop_words") {
        None => {}
        Some(Value::Null) => o.stop_words = StopWords::None,
        Some(Value::String(s)) if s == "english" => o.stop_words = StopWords::English,
        Some(other) => panic!("unexpected stop_words {other}"),
    }
    if let Some(Value::Array(words)) = params.get("candidates") {
        o.vocab = Some(
            words
                .iter()
                .map(|w| w.as_str().expect("candidate").to_owned())
                .collect(),
        );
    }
    o
}

fn cases(reference: &Value) -> &[Value] {
    reference["cases"].as_array().expect("cases")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

#[test]
fn candidates_equal_countvectorizer_features() {
    let reference = reference();
    let names: Vec<&str> = cases(&reference)
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("zh")) && names.iter().any(|n| n.starts_with("en")),
        "expected Chinese and English cases, got {names:?}"
    );
    for case in cases(&reference) {
        let plan = plan(document(&reference, case), &options(&case["params"]))
            .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        assert_eq!(
            plan.candidates,
            strings(&case["candidates_in_doc"]),
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn chinese_document_is_segmented_like_jieba() {
    let reference = reference();
    let zh = &reference["docs"]["zh"];
    let plan = plan(
        zh["original"].as_str().expect("original"),
        &KeywordOptions::default(),
    )
    .expect("plan");
    assert_eq!(plan.doc, zh["segmented"].as_str().expect("segmented"));
}

#[test]
fn english_documents_are_embedded_as_given() {
    let reference = reference();
    for i in 0..5 {
        let doc = reference["docs"][format!("en{i}")]
            .as_str()
            .expect("en doc");
        assert_eq!(
            plan(doc, &KeywordOptions::default()).expect("plan").doc,
            doc
        );
    }
}

fn load_minilm() -> LoadedEmbedder {
    let dir = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set GLM_MODELS_DIR)",
        dir.display()
    );
    let family = detect_family(&dir).expect("detect all-MiniLM-L6-v2");
    models::embed::load(&dir, family, &Device::Cpu).expect("load all-MiniLM-L6-v2")
}

/// Dense sentence embeddings, one per text, as sentence-transformers computes them.
fn embed(model: &LoadedEmbedder, texts: &[String]) -> Vec<Vec<f32>> {
    let max = model.embedder.info().max_input_tokens;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let enc = model.tokenizer.encode(t.as_str(), true).expect("tokenize");
            assert!(
                enc.get_ids().len() <= max,
                "fixture text longer than the model's input"
            );
            enc.get_ids().to_vec()
        })
        .collect();
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let out = model
        .embedder
        .embed(&batch, EmbedOutputs::default())
        .expect("embed");
    out.into_iter().map(|e| e.dense).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn keywords_equal_keybert_with_minilm() {
    let reference = reference();
    let model = load_minilm();
    for case in cases(&reference) {
        let name = &case["name"];
        let opts = options(&case["params"]);
        let plan = plan(document(&reference, case), &opts).expect("plan");
        let doc = embed(&model, std::slice::from_ref(&plan.doc)).remove(0);
        let cands = embed(&model, &plan.candidates);

        for (word, emb) in plan.candidates.iter().zip(&cands) {
            let want = case["candidate_similarity"][word]
                .as_f64()
                .expect("similarity");
            let got = cosine(&doc, emb);
            assert!(
                (got - want).abs() <= 1e-5,
                "{name} {word}: cosine {got} vs {want}"
            );
        }

        let got = keyword::select(&plan, &doc, &cands, &opts);
        let want = case["expected"].as_array().expect("expected");
        let got_names: Vec<&str> = got.iter().map(|k| k.name.as_str()).collect();
        let want_names: Vec<&str> = want.iter().map(|k| k[0].as_str().expect("name")).collect();
        assert_eq!(got_names, want_names, "case {name}");
        for (k, w) in got.iter().zip(want) {
            let w = w[1].as_f64().expect("score");
            assert!(
                (f64::from(k.similarity) - w).abs() <= 1e-4 + 1e-9,
                "{name} {}: {} vs {w}",
                k.name,
                k.similarity
            );
        }
    }
}
