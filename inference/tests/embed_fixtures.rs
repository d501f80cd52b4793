//! Embedding families against the reference fixtures computed with transformers /
//! sentence-transformers / FlagEmbedding (`/work/shared/fixtures`, tolerances from its README).
use std::path::{Path, PathBuf};

use glm_inference::models::embed::{self, bge_m3, EncoderKernels};
use glm_inference::models::{
    detect_family, Device, EmbedOutputs, Embedding, LoadedEmbedder, ModelError,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(
        dir.join("README.md").is_file(),
        "fixtures not found at {} (set GLM_FIXTURES_DIR)",
        dir.display()
    );
    dir
}

fn models_dir() -> PathBuf {
    std::env::var_os("GLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.models"))
}

fn reference(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Both ways the encoder layers run on the CPU; each must match the references.
const KERNELS: [EncoderKernels; 2] = [EncoderKernels::Packed, EncoderKernels::Candle];

fn load_with(dir: &Path, kernels: EncoderKernels) -> LoadedEmbedder {
    let family = detect_family(dir).unwrap();
    embed::load_with(dir, family, &Device::Cpu, kernels).unwrap_or_else(|e| panic!("{e}"))
}

fn tiny(name: &str) -> (PathBuf, LoadedEmbedder, Value) {
    tiny_with(name, EncoderKernels::default())
}

fn tiny_with(name: &str, kernels: EncoderKernels) -> (PathBuf, LoadedEmbedder, Value) {
    let dir = fixtures().join("tiny").join(name);
    let model = load_with(&dir, kernels);
    let reference = reference(&dir.join("reference.json"));
    (dir, model, reference)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn texts(reference: &Value, key: &str) -> Vec<String> {
    reference[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Each row: cosine >= 0.99999 and max abs diff <= `abs`.
fn assert_rows_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (cos, diff) = (cosine(g, w), max_abs_diff(g, w));
        assert!(
            cos >= 0.99999 && diff <= abs,
            "{what} row {i}: cosine {cos}, max abs diff {diff} (limit {abs})"
        );
    }
}

/// Token ids as the model's tokenizer gives them, special tokens added.
fn tokenize(model: &LoadedEmbedder, texts: &[String]) -> Vec<Vec<u32>> {
    texts
        .iter()
        .map(|t| {
            model
                .tokenizer
                .encode(t.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect()
}

fn embed(model: &LoadedEmbedder, inputs: &[Vec<u32>], outputs: EmbedOutputs) -> Vec<Embedding> {
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    model.embedder.embed(&refs, outputs).unwrap()
}

fn check_tokenization(model: &LoadedEmbedder, reference: &Value) {
    for case in reference["tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = model
            .tokenizer
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, ids(&case["ids"]), "tokenization of {text:?}");
    }
}

fn check_last_hidden_state(dir: &Path, reference: &Value, kernels: EncoderKernels) {
    let lhs = &reference["last_hidden_state"];
    let input = ids(&lhs["input_ids"]);
    let family = detect_family(dir).unwrap();
    let encoder = embed::load_encoder(dir, family, &Device::Cpu, kernels).unwrap();
    let (states, _) = encoder.forward(&[&input]).unwrap();
    let got = states.get(0).unwrap().to_vec2::<f32>().unwrap();
    let want = matrix(&lhs["values"]);
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(&want)
        .map(|(g, w)| max_abs_diff(g, w))
        .fold(0.0, f32::max);
    assert!(
        diff <= 1e-4,
        "{} ({kernels:?}): last_hidden_state max abs diff {diff}",
        dir.display()
    );
}

/// All texts in one padded batch, as the reference did.
fn check_embeddings(model: &LoadedEmbedder, reference: &Value) {
    let inputs = tokenize(model, &texts(reference, "texts"));
    let got: Vec<Vec<f32>> = embed(model, &inputs, EmbedOutputs::default())
        .into_iter()
        .map(|e| e.dense)
        .collect();
    let normalized = reference["normalize"].as_bool().unwrap();
    assert_eq!(model.embedder.info().dimensions, got[0].len());
    assert_rows_close(
        "embeddings",
        &got,
        &matrix(&reference["embeddings"]),
        if normalized { 1e-5 } else { 1e-4 },
    );
}

/// Every row of a padded batch matches the same input embedded alone.
fn check_batch_equals_single(model: &LoadedEmbedder, inputs: &[Vec<u32>], outputs: EmbedOutputs) {
    let batched = embed(model, inputs, outputs);
    for (i, input) in inputs.iter().enumerate() {
        let alone = embed(model, std::slice::from_ref(input), outputs).remove(0);
        let b = &batched[i];
        let diff = max_abs_diff(&b.dense, &alone.dense);
        assert!(diff <= 1e-5, "row {i}: batched vs alone dense diff {diff}");
        if let (Some(bs), Some(s)) = (&b.sparse, &alone.sparse) {
            let ids = |v: &[(u32, f32)]| {
                v.iter()
                    .filter(|(_, w)| *w >= 1e-4)
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(bs), ids(s), "row {i}: sparse ids");
        }
        if let (Some(bc), Some(c)) = (&b.colbert, &alone.colbert) {
            assert_eq!(bc.len(), c.len(), "row {i}: colbert vectors");
            assert_rows_close("colbert batched vs alone", bc, c, 1e-5);
        }
    }
}

#[test]
fn bert_matches_transformers_and_sentence_transformers() {
    for kernels in KERNELS {
        let (dir, model, reference) = tiny_with("bert", kernels);
        check_last_hidden_state(&dir, &reference, kernels);
        check_embeddings(&model, &reference);
    }
    let (_, model, reference) = tiny("bert");
    check_tokenization(&model, &reference);
    let info = model.embedder.info();
    assert_eq!(
        (info.family, info.dimensions, info.max_input_tokens),
        ("bert", 64, 128)
    );
    assert!(!info.sparse && !info.colbert);
}

#[test]
fn ernie_adds_task_type_row_and_matches_reference() {
    for kernels in KERNELS {
        let (dir, model, reference) = tiny_with("ernie", kernels);
        check_tokenization(&model, &reference);
        check_last_hidden_state(&dir, &reference, kernels);
        check_embeddings(&model, &reference);
    }
}

#[test]
fn xlm_roberta_matches_transformers_and_sentence_transformers() {
    for kernels in KERNELS {
        let (dir, model, reference) = tiny_with("xlm-roberta", kernels);
        check_last_hidden_state(&dir, &reference, kernels);
        check_embeddings(&model, &reference);
    }
    let (_, model, reference) = tiny("xlm-roberta");
    check_tokenization(&model, &reference);
    let info = model.embedder.info();
    // 514 positions minus pad_token_id 1 minus one: 512, above max_seq_length 128.
    assert_eq!((info.family, info.max_input_tokens), ("xlm-roberta", 128));
    assert!(info.sparse && info.colbert);
}

#[test]
fn bge_m3_dense_sparse_colbert_and_scores_match_flagembedding() {
    let (_, model, reference) = tiny("xlm-roberta");
    let inputs = tokenize(&model, &texts(&reference, "texts"));
    let out = embed(
        &model,
        &inputs,
        EmbedOutputs {
            sparse: true,
            colbert: true,
        },
    );

    let dense: Vec<Vec<f32>> = out.iter().map(|e| e.dense.clone()).collect();
    assert_rows_close("dense", &dense, &matrix(&reference["dense"]), 1e-5);

    for (i, (e, want)) in out
        .iter()
        .zip(reference["sparse"].as_array().unwrap())
        .enumerate()
    {
        let got = e.sparse.as_ref().unwrap();
        let want: Vec<(u32, f32)> = want
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, w)| (id.parse().unwrap(), w.as_f64().unwrap() as f32))
            .collect();
        let significant = |v: &[(u32, f32)]| {
            let mut ids: Vec<u32> = v
                .iter()
                .filter(|(_, w)| *w >= 1e-4)
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(
            significant(got),
            significant(&want),
            "sparse ids of text {i}"
        );
        for (id, w) in &want {
            let g = got
                .iter()
                .find(|(gid, _)| gid == id)
                .map_or(0.0, |(_, gw)| *gw);
            assert!(
                (g - w).abs() <= 1e-4,
                "text {i} token {id}: sparse weight {g} vs {w}"
            );
        }
    }

    for (i, (e, want)) in out
        .iter()
        .zip(reference["colbert"].as_array().unwrap())
        .enumerate()
    {
        let got = e.colbert.as_ref().unwrap();
        let want = matrix(want);
        assert_eq!(got.len(), inputs[i].len() - 1, "CLS dropped, </s> kept");
        assert_rows_close(&format!("colbert text {i}"), got, &want, 1e-5);
    }

    let scores = &reference["scores_text0_vs_text1"];
    let (a, b) = (&out[0], &out[1]);
    let dense_score: f32 = a.dense.iter().zip(&b.dense).map(|(x, y)| x * y).sum();
    let lexical = bge_m3::lexical_score(a.sparse.as_ref().unwrap(), b.sparse.as_ref().unwrap());
    let colbert = bge_m3::colbert_score(a.colbert.as_ref().unwrap(), b.colbert.as_ref().unwrap());
    let want = |k: &str| scores[k].as_f64().unwrap() as f32;
    assert!(
        (dense_score - want("dense")).abs() <= 1e-5,
        "dense score {dense_score}"
    );
    assert!(
        (lexical - want("sparse")).abs() <= 1e-3,
        "lexical score {lexical}"
    );
    assert!(
        (colbert - want("colbert")).abs() <= 1e-5,
        "colbert score {colbert}"
    );
}

#[test]
fn padded_batch_rows_equal_single_inputs() {
    for (name, kernels) in ["bert", "ernie", "xlm-roberta"]
        .into_iter()
        .flat_map(|n| KERNELS.map(|k| (n, k)))
    {
        let (_, model, reference) = tiny_with(name, kernels);
        let inputs = tokenize(&model, &texts(&reference, "texts"));
        let outputs = EmbedOutputs {
            sparse: model.embedder.info().sparse,
            colbert: model.embedder.info().colbert,
        };
        check_batch_equals_single(&model, &inputs, outputs);
    }
}

#[test]
fn heads_requested_from_a_model_without_them_are_unsupported() {
    let (_, model, reference) = tiny("bert");
    let inputs = tokenize(&model, &texts(&reference, "texts")[..1]);
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    for outputs in [
        EmbedOutputs {
            sparse: true,
            colbert: false,
        },
        EmbedOutputs {
            sparse: false,
            colbert: true,
        },
    ] {
        let err = model.embedder.embed(&refs, outputs).unwrap_err();
        assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    }
}

#[test]
fn inputs_beyond_the_position_table_are_refused() {
    let (_, model, _) = tiny("bert");
    let too_long = vec![11u32; 129];
    let err = model
        .embedder
        .embed(&[&too_long], EmbedOutputs::default())
        .unwrap_err();
    assert!(err.to_string().contains("129 tokens"), "{err}");
}

#[test]
fn real_minilm_matches_sentence_transformers() {
    for kernels in KERNELS {
        check_real_minilm(kernels);
    }
}

fn check_real_minilm(kernels: EncoderKernels) {
    let dir = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run scripts/fetch-models.sh (or set GLM_MODELS_DIR)",
        dir.display()
    );
    let model = load_with(&dir, kernels);
    let reference = reference(&fixtures().join("real/minilm/reference.json"));
    assert_eq!(model.embedder.info().max_input_tokens, 256);
    assert_eq!(model.embedder.info().dimensions, 384);
    // sentence-transformers truncates at max_seq_length and never pads a single input; the
    // package's tokenizer.json would pad/truncate to 128.
    let mut tokenizer = model.tokenizer.clone();
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 256,
            ..Default::default()
        }))
        .unwrap();
    let sentences = texts(&reference, "sentences");
    let inputs: Vec<Vec<u32>> = sentences
        .iter()
        .map(|t| {
            tokenizer
                .encode(t.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    for (case, got) in reference["tokenization"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&inputs)
    {
        assert_eq!(got, &ids(&case["ids"]), "tokenization of {}", case["text"]);
    }
    // One batch of 32 (all sentences), as the reference encoded them.
    assert!(inputs.len() <= 32);
    let got: Vec<Vec<f32>> = embed(&model, &inputs, EmbedOutputs::default())
        .into_iter()
        .map(|e| e.dense)
        .collect();
    assert_rows_close(
        "minilm embeddings",
        &got,
        &matrix(&reference["embeddings"]),
        1e-5,
    );
    check_batch_equals_single(&model, &inputs[..8], EmbedOutputs::default());
}

/// A copy of the tiny BERT fixture in a temporary folder, to break.
fn broken_copy() -> tempfile::TempDir {
    let src = fixtures().join("tiny/bert");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        src.join("1_Pooling/config.json"),
        tmp.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    tmp
}

fn load_error(dir: &Path) -> String {
    match embed::load(dir, glm_inference::models::Family::Bert, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_folders_fail_at_load_naming_file_and_problem() {
    // A missing tensor.
    let tmp = broken_copy();
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors
        .remove("encoder.layer.1.attention.self.key.weight")
        .unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load_error(tmp.path());
    assert!(err.contains(&weights.display().to_string()), "{err}");
    assert!(
        err.contains("missing tensor `encoder.layer.1.attention.self.key.weight`"),
        "{err}"
    );

    // A config the encoder cannot run.
    let tmp = broken_copy();
    let config = tmp.path().join("config.json");
    let mut cfg = reference(&config);
    cfg["hidden_act"] = "gelu_10".into();
    std::fs::write(&config, cfg.to_string()).unwrap();
    let err = load_error(tmp.path());
    assert!(
        err.contains(&config.display().to_string())
            && err.contains("unsupported hidden_act `gelu_10`"),
        "{err}"
    );

    // A config missing a field.
    cfg.as_object_mut().unwrap().remove("hidden_size");
    cfg["hidden_act"] = "gelu".into();
    std::fs::write(&config, cfg.to_string()).unwrap();
    let err = load_error(tmp.path());
    assert!(
        err.contains(&config.display().to_string()) && err.contains("missing field `hidden_size`"),
        "{err}"
    );
}

#[test]
fn checkpoints_with_a_model_prefix_load_the_same() {
    // Real BERT checkpoints often store `bert.embeddings...`; the same tensors renamed must give the
    // same vectors.
    let (_, model, reference) = tiny("bert");
    let tmp = broken_copy();
    let weights = tmp.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let prefixed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    candle_core::safetensors::save(&prefixed, &weights).unwrap();
    let renamed = load_with(tmp.path(), EncoderKernels::default());
    let inputs = tokenize(&model, &texts(&reference, "texts"));
    let a = embed(&model, &inputs, EmbedOutputs::default());
    let b = embed(&renamed, &inputs, EmbedOutputs::default());
    assert_eq!(a, b);
}

#[test]
fn bge_m3_heads_load_from_torch_pt_files() {
    // BAAI/bge-m3 ships its heads as torch pickles; tests/data/bge-m3-pt holds the fixture's two
    // heads re-saved in that format (tests/data/make_torch_heads.py).
    let src = fixtures().join("tiny/xlm-roberta");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_file()
            && !name.to_string_lossy().ends_with("_linear.safetensors")
        {
            std::fs::copy(entry.path(), tmp.path().join(&name)).unwrap();
        }
    }
    std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        src.join("1_Pooling/config.json"),
        tmp.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    let pt = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bge-m3-pt");
    for head in ["sparse_linear.pt", "colbert_linear.pt"] {
        std::fs::copy(pt.join(head), tmp.path().join(head)).unwrap();
    }
    let model = load_with(tmp.path(), EncoderKernels::default());
    assert!(model.embedder.info().sparse && model.embedder.info().colbert);
    let reference = reference(&src.join("reference.json"));
    let inputs = tokenize(&model, &texts(&reference, "texts")[..2]);
    let out = embed(
        &model,
        &inputs,
        EmbedOutputs {
            sparse: true,
            colbert: true,
        },
    );
    for (i, e) in out.iter().enumerate() {
        let want = reference["sparse"][i].as_object().unwrap();
        let got = e.sparse.as_ref().unwrap();
        let significant = want
            .values()
            .filter(|w| w.as_f64().unwrap() >= 1e-4)
            .count();
        assert_eq!(
            got.iter().filter(|(_, w)| *w >= 1e-4).count(),
            significant,
            "text {i}: sparse entries"
        );
        for (id, w) in got {
            let w_ref = want
                .get(&id.to_string())
                .map_or(0.0, |w| w.as_f64().unwrap() as f32);
            assert!(
                (w - w_ref).abs() <= 1e-4,
                "text {i} token {id}: {w} vs {w_ref}"
            );
        }
        assert_rows_close(
            "colbert from .pt",
            e.colbert.as_ref().unwrap(),
            &matrix(&reference["colbert"][i]),
            1e-5,
        );
    }
}
