//! The init container that downloads `hf://` weights into the models volume.

use glm_crds::GLMModel;
use k8s_openapi::api::core::v1::Container;

use super::deployment::{container_security, env, merge_env, mount, MODELS_DIR, MODELS_VOLUME};

/// Version of `huggingface_hub` the downloader installs: pinned, so a new release cannot change
/// (or break) what a restart downloads.
pub const HUB_PACKAGE: &str = "huggingface_hub==2.4.0";

/// Downloads an HF snapshot with `huggingface_hub.snapshot_download`, installed at start into
/// /tmp so any python image works. A marker file per downloaded selection (the whole snapshot,
/// or one GGUF file) makes restarts with a cache skip the work, while asking for another GGUF
/// file of the same revision downloads it; snapshot_download itself resumes partial downloads.
/// pip and the Hub calls have timeouts and bounded retries, so a broken network fails the init
/// container (visible in status) instead of hanging it. Arguments are positional (`$1`..), never
/// spliced into the script, so spec values cannot inject shell.
const DOWNLOAD_SCRIPT: &str = r#"set -eu
dest="$1"; repo="$2"; rev="$3"; gguf="$4"; marker="$5"; package="$6"
if [ -f "$dest/$marker" ]; then echo "weights for $repo@$rev ${gguf:+($gguf) }already in $dest"; exit 0; fi
mkdir -p "$dest"
python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --timeout 60 --retries 5 --target /tmp/pip "$package"
PYTHONPATH=/tmp/pip python3 - "$repo" "$rev" "$dest" "$gguf" <<'PY'
import sys, time
from huggingface_hub import snapshot_download
repo, rev, dest, gguf = sys.argv[1:5]
# With a GGUF file only that file and the small metadata files are needed, not every quantization.
patterns = [gguf, "*.json", "*.txt", "*.model", "*.jinja"] if gguf else None
for attempt in range(1, 6):
    try:
        snapshot_download(repo_id=repo, revision=rev, local_dir=dest, allow_patterns=patterns)
        break
    except Exception as err:  # network errors of every kind; a retry resumes the download
        if attempt == 5:
            raise
        print(f"download attempt {attempt} failed: {err}; retrying", file=sys.stderr)
        time.sleep(10 * attempt)
PY
touch "$dest/$marker"
"#;

/// Name of the marker written once `gguf` (or the whole snapshot) is in the cache. GGUF paths may
/// hold `/`, which a file name cannot.
pub fn download_marker(gguf: Option<&str>) -> String {
    match gguf {
        None => ".glm-complete".to_owned(),
        Some(file) => format!(".glm-complete-gguf-{}", file.replace('/', "__")),
    }
}

pub(super) fn downloader(model: &GLMModel, repo: &str, revision: &str, dest: &str) -> Container {
    let mut env = vec![
        env("HOME", "/tmp"),
        env("HF_HOME", "/tmp/hf-home"),
        env("HF_HUB_DISABLE_TELEMETRY", "1"),
        // Seconds per Hub request (metadata / file chunks) before it counts as failed.
        env("HF_HUB_ETAG_TIMEOUT", "30"),
        env("HF_HUB_DOWNLOAD_TIMEOUT", "60"),
    ];
    // The user's env (e.g. HF_TOKEN from a Secret, HF_ENDPOINT for a mirror, PIP_INDEX_URL)
    // applies here too.
    env = merge_env(env, &model.spec.env);
    let gguf = model.spec.gguf.as_deref();
    Container {
        name: "download".into(),
        image: None, // filled by pod_spec from the operator config
        command: Some(vec!["sh".into(), "-c".into(), DOWNLOAD_SCRIPT.into()]),
        args: Some(vec![
            "download".into(), // $0
            dest.into(),
            repo.into(),
            revision.into(),
            gguf.unwrap_or_default().into(),
            download_marker(gguf),
            HUB_PACKAGE.into(),
        ]),
        env: Some(env),
        volume_mounts: Some(vec![
            mount(MODELS_VOLUME, MODELS_DIR, false),
            mount("tmp", "/tmp", false),
        ]),
        security_context: Some(container_security()),
        ..Container::default()
    }
}
