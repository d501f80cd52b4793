//! Image choice for GPU models, the weights cache (markers, affinity, fsGroup policy) and the
//! downloader script itself, run with a stub `python3`.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::PodAffinityTerm;

use super::tests::model;
use super::*;

fn pod_of(spec: &str) -> k8s_openapi::api::core::v1::PodSpec {
    deployment(&model(spec), &BuildConfig::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .spec
        .and_then(|s| s.template.spec)
        .unwrap_or_else(|| panic!("no pod spec"))
}

#[test]
fn gpu_models_default_to_the_cuda_image() {
    let cfg = BuildConfig::default();
    let image_of = |spec: &str| pod_of(spec).containers[0].image.clone();
    assert_eq!(
        image_of("task: chat\nsource: /m\ngpus: 1\n"),
        Some(cfg.default_cuda_image.clone())
    );
    assert_eq!(
        image_of("task: chat\nsource: /m\n"),
        Some(cfg.default_image.clone())
    );
    assert_eq!(
        image_of("task: chat\nsource: /m\ngpus: 1\nimage: r.local/glm:1-cuda\n").as_deref(),
        Some("r.local/glm:1-cuda")
    );
    assert_ne!(cfg.default_image, cfg.default_cuda_image);
}

#[test]
fn the_kubelet_chowns_the_cache_only_on_a_root_mismatch() {
    let security = pod_of("task: chat\nsource: hf://a/b\ncache: {size: 1Gi}\n").security_context;
    let policy = security.and_then(|s| s.fs_group_change_policy);
    assert_eq!(policy.as_deref(), Some("OnRootMismatch"));
}

fn hostname_terms(spec: &str) -> Vec<PodAffinityTerm> {
    pod_of(spec)
        .affinity
        .and_then(|a| a.pod_affinity)
        .and_then(|p| p.required_during_scheduling_ignored_during_execution)
        .unwrap_or_default()
}

#[test]
fn a_read_write_once_cache_keeps_replicas_on_one_node() {
    let terms = hostname_terms("task: chat\nsource: hf://a/b\nreplicas: 3\ncache: {size: 1Gi}\n");
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
    let selector = terms[0]
        .label_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone());
    assert_eq!(selector, Some(selector_labels("qwen")));
    // Shared storage, no cache or no download: pods may spread.
    for spec in [
        "task: chat\nsource: hf://a/b\nreplicas: 3\ncache: {size: 1Gi, accessModes: [ReadWriteMany]}\n",
        "task: chat\nsource: hf://a/b\nreplicas: 3\n",
        "task: chat\nsource: /m\nreplicas: 3\n",
    ] {
        assert!(hostname_terms(spec).is_empty(), "{spec}");
    }
}

#[test]
fn the_cache_affinity_adds_to_the_users_own() {
    let pod = pod_of("task: chat\nsource: hf://a/b\ncache: {size: 1Gi}\naffinity:\n  nodeAffinity:\n    requiredDuringSchedulingIgnoredDuringExecution:\n      nodeSelectorTerms:\n      - matchExpressions: [{key: zone, operator: In, values: [a]}]\n  podAffinity:\n    requiredDuringSchedulingIgnoredDuringExecution:\n    - {topologyKey: zone, labelSelector: {matchLabels: {app: cache}}}\n");
    let affinity = pod.affinity.unwrap_or_default();
    assert!(affinity.node_affinity.is_some());
    let terms = affinity
        .pod_affinity
        .and_then(|p| p.required_during_scheduling_ignored_during_execution)
        .unwrap_or_default();
    let keys: Vec<&str> = terms.iter().map(|t| t.topology_key.as_str()).collect();
    assert_eq!(keys, ["zone", "kubernetes.io/hostname"]);
}

#[test]
fn a_single_pod_cache_rolls_out_by_recreate() {
    let strategy = |spec: &str| {
        deployment(&model(spec), &BuildConfig::default())
            .ok()
            .and_then(|d| d.spec?.strategy?.type_)
    };
    assert_eq!(
        strategy(
            "task: chat\nsource: hf://a/b\ncache: {size: 1Gi, accessModes: [ReadWriteOncePod]}\n"
        )
        .as_deref(),
        Some("Recreate")
    );
    assert_eq!(
        strategy("task: chat\nsource: hf://a/b\ncache: {size: 1Gi}\n").as_deref(),
        Some("RollingUpdate")
    );
}

#[test]
fn markers_name_what_was_downloaded() {
    assert_eq!(download_marker(None), ".glm-complete");
    assert_ne!(
        download_marker(Some("a-q4.gguf")),
        download_marker(Some("a-q8.gguf"))
    );
    assert_eq!(
        download_marker(Some("q4/model.gguf")),
        ".glm-complete-gguf-q4__model.gguf"
    );
    assert!(HUB_PACKAGE.contains("=="), "unpinned: {HUB_PACKAGE}");
}

/// Runs the init container's command with `python3` replaced by a stub that logs its arguments.
fn run_downloader(dir: &Path, gguf: Option<&str>) -> Vec<String> {
    let spec = match gguf {
        Some(file) => format!("task: chat\nsource: hf://org/repo@rev1\ngguf: {file}\n"),
        None => "task: chat\nsource: hf://org/repo@rev1\n".to_owned(),
    };
    let init = pod_of(&spec).init_containers.unwrap_or_default().remove(0);
    let mut args = init.args.unwrap_or_default();
    // The script downloads into $1: point it at the test's directory.
    args[1] = dir.join("weights").display().to_string();
    let command = init.command.unwrap_or_default();
    let log = dir.join("python.log");
    let _ = std::fs::remove_file(&log);
    let status = Command::new(&command[0])
        .args(&command[1..])
        .args(&args)
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", dir.join("bin").display()),
        )
        .env("STUB_LOG", &log)
        .status()
        .unwrap_or_else(|e| panic!("running the download script: {e}"));
    assert!(status.success());
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_download_script_skips_only_what_it_already_has() {
    let dir = std::env::temp_dir().join(format!("glm-downloader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap_or_else(|e| panic!("{e}"));
    let stub = dir.join("bin/python3");
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"$*\" >> \"$STUB_LOG\"\ncat >/dev/null\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    let first = run_downloader(&dir, Some("m-q4.gguf"));
    assert_eq!(first.len(), 2, "pip install, then the download: {first:?}");
    assert!(
        first[0].contains(&format!(
            "--timeout 60 --retries 5 --target /tmp/pip {HUB_PACKAGE}"
        )),
        "{first:?}"
    );
    assert!(
        first[1].contains("org/repo rev1") && first[1].contains("m-q4.gguf"),
        "{first:?}"
    );
    // Same file again: the marker skips pip and the Hub entirely.
    assert!(run_downloader(&dir, Some("m-q4.gguf")).is_empty());
    // Another GGUF of the same repo@revision is downloaded, not skipped.
    let other = run_downloader(&dir, Some("m-q8.gguf"));
    assert!(
        other.len() == 2 && other[1].contains("m-q8.gguf"),
        "{other:?}"
    );
    // The whole snapshot is yet another selection.
    assert_eq!(run_downloader(&dir, None).len(), 2);
    assert!(run_downloader(&dir, None).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
