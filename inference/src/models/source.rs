//! Where a `--model NAME=PATH` points: a local snapshot folder or `.gguf` file, or a Hugging Face
//! hub repository `hf://ORG/REPO[@REVISION][/FILE]`, fetched into the Hugging Face cache at start-up
//! when the binary is built with the cargo feature `hub` (the cache is shared with Python's
//! `huggingface_hub`, so a folder already downloaded there is not fetched again).
use std::path::{Path, PathBuf};

use super::ModelError;

const SCHEME: &str = "hf://";

/// A parsed `hf://` model location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit; `main` when the URL names none.
    pub revision: String,
    /// One file of the repository (a `.gguf` among many quantizations); `None`: the snapshot folder.
    pub file: Option<String>,
}

impl HubSource {
    /// `None` when `spec` is not an `hf://` URL, so that local paths pass through untouched.
    pub fn parse(spec: &str) -> Option<Result<Self, String>> {
        let rest = spec.strip_prefix(SCHEME)?;
        Some(Self::parse_rest(rest).ok_or_else(|| {
            format!("`{spec}` is not a hub location: expected hf://ORG/REPO[@REVISION][/FILE]")
        }))
    }

    fn parse_rest(rest: &str) -> Option<Self> {
        let mut parts = rest.splitn(3, '/');
        let org = parts.next()?;
        let repo = parts.next()?;
        let (name, revision) = repo.split_once('@').unwrap_or((repo, "main"));
        if org.is_empty() || name.is_empty() || revision.is_empty() {
            return None;
        }
        let file = match parts.next() {
            Some(f) if f.split('/').any(|s| s.is_empty() || s == "..") => return None,
            other => other.map(str::to_string),
        };
        Some(HubSource {
            repo: format!("{org}/{name}"),
            revision: revision.to_string(),
            file,
        })
    }
}

/// Whether a snapshot download needs this repository file: configs, tokenizers and the weight
/// formats the loaders read (safetensors; a torch pickle only where no safetensors exist; bge-m3's
/// sparse and ColBERT heads). ONNX/OpenVINO exports and other frameworks' weights are skipped.
pub fn wanted_in_snapshot(file: &str, repo_has_safetensors: bool) -> bool {
    if file.starts_with("onnx/") || file.starts_with("openvino/") {
        return false;
    }
    let base = file.rsplit('/').next().unwrap_or(file);
    matches!(
        base,
        "tokenizer.model" | "colbert_linear.pt" | "sparse_linear.pt"
    ) || (base == "pytorch_model.bin" && !repo_has_safetensors)
        || [".json", ".safetensors", ".txt", ".tiktoken"]
            .iter()
            .any(|ext| base.ends_with(ext))
}

/// The local path to load: `path` itself, or the hub snapshot it names once it is in the cache.
pub fn resolve(path: &Path) -> Result<PathBuf, ModelError> {
    let Some(spec) = path.to_str() else {
        return Ok(path.to_path_buf());
    };
    match HubSource::parse(spec) {
        None => Ok(path.to_path_buf()),
        Some(Err(msg)) => Err(ModelError::load(path, msg)),
        Some(Ok(source)) => fetch(&source).map_err(|msg| ModelError::load(path, msg)),
    }
}

#[cfg(not(feature = "hub"))]
fn fetch(source: &HubSource) -> Result<PathBuf, String> {
    Err(format!(
        "this glm-inference was built without the `hub` feature; download the model first \
         (e.g. `huggingface-cli download {} --revision {} --local-dir DIR`) and pass DIR, \
         or rebuild with `--features hub`",
        source.repo, source.revision
    ))
}

#[cfg(feature = "hub")]
fn fetch(source: &HubSource) -> Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    // HF_HOME, HF_ENDPOINT and the stored token are honoured as huggingface_hub does.
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| format!("cannot reach the hub: {e}"))?;
    let repo = api.repo(Repo::with_revision(
        source.repo.clone(),
        RepoType::Model,
        source.revision.clone(),
    ));
    let get = |file: &str| {
        tracing::info!(repo = %source.repo, revision = %source.revision, file, "fetching from the hub");
        repo.get(file).map_err(|e| {
            format!(
                "cannot fetch {file} of {}@{}: {e}",
                source.repo, source.revision
            )
        })
    };
    if let Some(file) = &source.file {
        return get(file);
    }
    let info = repo
        .info()
        .map_err(|e| format!("cannot list {}@{}: {e}", source.repo, source.revision))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has_safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
    let mut config = None;
    for file in files
        .iter()
        .filter(|f| wanted_in_snapshot(f, has_safetensors))
    {
        let local = get(file)?;
        if *file == "config.json" {
            config = Some(local);
        }
    }
    config
        .and_then(|c| c.parent().map(Path::to_path_buf))
        .ok_or_else(|| format!("{}@{} has no config.json", source.repo, source.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<HubSource, String> {
        HubSource::parse(s).expect("an hf:// URL")
    }

    #[test]
    fn hub_urls_parse_with_revision_and_file() {
        assert_eq!(
            parse("hf://THUDM/glm-4-9b-chat-hf").unwrap(),
            HubSource {
                repo: "THUDM/glm-4-9b-chat-hf".into(),
                revision: "main".into(),
                file: None
            }
        );
        assert_eq!(
            parse("hf://BAAI/bge-m3@5617a9f").unwrap(),
            HubSource {
                repo: "BAAI/bge-m3".into(),
                revision: "5617a9f".into(),
                file: None
            }
        );
        assert_eq!(
            parse("hf://org/r1-gguf@v2/q4/model-Q4_K_M.gguf").unwrap(),
            HubSource {
                repo: "org/r1-gguf".into(),
                revision: "v2".into(),
                file: Some("q4/model-Q4_K_M.gguf".into())
            }
        );
        assert_eq!(
            parse("hf://org/r1-gguf/model.gguf")
                .unwrap()
                .file
                .as_deref(),
            Some("model.gguf")
        );
    }

    #[test]
    fn malformed_hub_urls_and_local_paths() {
        for bad in [
            "hf://",
            "hf://org",
            "hf://org/",
            "hf:///repo",
            "hf://org/repo@",
            "hf://org/repo/",
            "hf://o/r/../x",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("hf://ORG/REPO"), "{bad}: {err}");
        }
        assert!(HubSource::parse("/models/glm-4-9b-chat-hf").is_none());
        assert!(HubSource::parse("models/hf:/x").is_none());
        assert_eq!(
            resolve(Path::new("/models/x")).unwrap(),
            PathBuf::from("/models/x")
        );
    }

    #[test]
    fn snapshot_downloads_take_only_what_the_loaders_read() {
        for f in [
            "config.json",
            "1_Pooling/config.json",
            "model-00001-of-00004.safetensors",
            "vocab.txt",
            "tokenizer.model",
            "sparse_linear.pt",
            "colbert_linear.pt",
            "generation_config.json",
        ] {
            assert!(wanted_in_snapshot(f, true), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "onnx/model.onnx",
            "onnx/config.json",
            "tf_model.h5",
            "README.md",
            "flax_model.msgpack",
            "imgs/a.png",
            "model-Q4_K_M.gguf",
        ] {
            assert!(!wanted_in_snapshot(f, true), "{f}");
        }
        assert!(wanted_in_snapshot("pytorch_model.bin", false));
    }

    #[cfg(not(feature = "hub"))]
    #[test]
    fn without_the_hub_feature_the_error_says_how_to_get_the_model() {
        let err = resolve(Path::new("hf://BAAI/bge-m3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hf://BAAI/bge-m3"), "{err}");
        assert!(
            err.contains("huggingface-cli download BAAI/bge-m3"),
            "{err}"
        );
        assert!(err.contains("--features hub"), "{err}");
    }
}
