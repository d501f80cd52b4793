//! Every spec field lands where it should in the Deployment, Service and PVC.

use std::collections::BTreeMap;

use glm_crds::GLMModel;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::*;

/// A GLMModel as the API server would hand it over (namespace, uid, generation set).
pub(crate) fn model(spec_yaml: &str) -> GLMModel {
    let yaml = format!(
        "apiVersion: kubeglm.io/v1alpha1\nkind: GLMModel\nmetadata:\n  name: qwen\n  namespace: ai\n  uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\n  generation: 1\nspec:\n{}",
        spec_yaml
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    match serde_yaml::from_str(&yaml) {
        Ok(m) => m,
        Err(e) => panic!("test model YAML is invalid: {e}\n{yaml}"),
    }
}

fn cfg() -> BuildConfig {
    BuildConfig::default()
}

fn build(spec_yaml: &str) -> Deployment {
    deployment(&model(spec_yaml), &cfg()).unwrap_or_else(|e| panic!("build failed: {e}"))
}

fn pod(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap_or_else(|| panic!("deployment has no pod spec"))
}

fn server(d: &Deployment) -> &Container {
    pod(d)
        .containers
        .iter()
        .find(|c| c.name == "inference")
        .unwrap_or_else(|| panic!("no inference container"))
}

fn env_of(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

const CHAT_GPU: &str =
    "task: chat\nsource: hf://Qwen/Qwen2.5-7B-Instruct@v1.0\ngpus: 2\nreplicas: 3\n";

#[test]
fn deployment_identity_labels_and_owner() {
    let d = build(CHAT_GPU);
    assert_eq!(d.metadata.name.as_deref(), Some("qwen"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("ai"));
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "GLMModel");
    assert_eq!(owner.api_version, "kubeglm.io/v1alpha1");
    assert_eq!(owner.name, "qwen");
    assert_eq!(owner.uid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    assert_eq!(owner.controller, Some(true));
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.selector.match_labels, Some(selector_labels("qwen")));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in selector_labels("qwen") {
        assert_eq!(pod_labels.get(&k), Some(&v), "pod label {k}");
    }
    assert_eq!(
        pod_labels.get(MODEL_LABEL).map(String::as_str),
        Some("qwen")
    );
}

#[test]
fn gpus_land_in_requests_and_limits_and_cuda_visible_devices() {
    let d = build(CHAT_GPU);
    let c = server(&d);
    let res = c.resources.as_ref().unwrap();
    let gpu = Some(&Quantity("2".into()));
    assert_eq!(res.requests.as_ref().unwrap().get("nvidia.com/gpu"), gpu);
    assert_eq!(res.limits.as_ref().unwrap().get("nvidia.com/gpu"), gpu);
    assert_eq!(env_of(c, "CUDA_VISIBLE_DEVICES").as_deref(), Some("0,1"));
    assert_eq!(env_of(c, "GLM_DEVICE").as_deref(), Some("cuda"));
}

#[test]
fn custom_gpu_resource_name_and_user_resources_are_merged() {
    let d = build(
        "task: chat\nsource: /models/x\ngpus: 1\ngpuResourceName: amd.com/gpu\nresources:\n  requests: {cpu: '4', memory: 16Gi}\n  limits: {memory: 20Gi}\n",
    );
    let res = server(&d).resources.clone().unwrap();
    let req = res.requests.unwrap();
    let lim = res.limits.unwrap();
    assert_eq!(req.get("amd.com/gpu"), Some(&Quantity("1".into())));
    assert_eq!(lim.get("amd.com/gpu"), Some(&Quantity("1".into())));
    assert!(!req.contains_key("nvidia.com/gpu"));
    assert_eq!(req.get("cpu"), Some(&Quantity("4".into())));
    assert_eq!(req.get("memory"), Some(&Quantity("16Gi".into())));
    assert_eq!(lim.get("memory"), Some(&Quantity("20Gi".into())));
}

#[test]
fn cpu_model_has_no_gpu_resources_or_cuda_env() {
    let d = build("task: embedding\nsource: /models/minilm\n");
    let c = server(&d);
    let res = c.resources.clone().unwrap_or_default();
    assert!(res.requests.unwrap_or_default().is_empty());
    assert!(res.limits.unwrap_or_default().is_empty());
    assert_eq!(env_of(c, "CUDA_VISIBLE_DEVICES"), None);
    assert_eq!(env_of(c, "GLM_DEVICE"), None);
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(1),
        "replicas default"
    );
}

#[test]
fn rollout_is_recreate_with_gpus_and_rolling_without() {
    let strategy = |d: &Deployment| d.spec.as_ref().unwrap().strategy.clone().unwrap();
    let gpu = strategy(&build(CHAT_GPU));
    assert_eq!(gpu.type_.as_deref(), Some("Recreate"));
    assert!(gpu.rolling_update.is_none());
    let cpu = strategy(&build("task: embedding\nsource: /m\n"));
    assert_eq!(cpu.type_.as_deref(), Some("RollingUpdate"));
    let explicit = strategy(&build(
        "task: chat\nsource: /m\ngpus: 1\nrollout: {strategy: RollingUpdate}\n",
    ));
    assert_eq!(explicit.type_.as_deref(), Some("RollingUpdate"));
}

#[test]
fn server_command_args_and_env() {
    let d = build(
        "name: qwen2.5-7b\ntask: chat\nsource: /models/qwen\nargs: [--max-batch, '8']\nenv:\n- {name: RUST_LOG, value: debug}\n- {name: API_PORT, value: '9000'}\n",
    );
    let c = server(&d);
    assert_eq!(c.command, Some(vec!["glm-inference".to_owned()]));
    assert_eq!(
        c.args,
        Some(vec![
            "--model".to_owned(),
            "qwen2.5-7b=/models/qwen".to_owned(),
            "--max-batch".to_owned(),
            "8".to_owned()
        ])
    );
    assert_eq!(env_of(c, "GLM_MODEL").as_deref(), Some("qwen2.5-7b"));
    assert_eq!(env_of(c, "RUST_LOG").as_deref(), Some("debug"));
    let shutdown_delay: i64 = env_of(c, "GLM_SHUTDOWN_DELAY_SECS")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no GLM_SHUTDOWN_DELAY_SECS"));
    let grace = pod(&d).termination_grace_period_seconds.unwrap_or(30);
    assert!(shutdown_delay > 0 && shutdown_delay < grace);
    // The user's value wins, and no duplicate names (SSA would refuse them).
    assert_eq!(env_of(c, "API_PORT").as_deref(), Some("9000"));
    let env = c.env.as_ref().unwrap();
    assert_eq!(env.iter().filter(|e| e.name == "API_PORT").count(), 1);
}

#[test]
fn served_name_defaults_to_metadata_name_and_port_from_config() {
    let d = build("task: embedding\nsource: /models/m\n");
    let c = server(&d);
    assert_eq!(c.args.as_ref().unwrap()[1], "qwen=/models/m");
    assert_eq!(env_of(c, "API_PORT").as_deref(), Some("8200"));
    // GLM_MODEL names the default *chat* model: glm-inference refuses an embedder there.
    assert_eq!(env_of(c, "GLM_MODEL"), None);
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("http"), 8200)
    );
}

#[test]
fn image_from_spec_or_operator_default() {
    assert_eq!(
        server(&build("task: chat\nsource: /m\n")).image.as_deref(),
        Some(cfg().default_image.as_str())
    );
    assert_eq!(
        server(&build(
            "task: chat\nsource: /m\nimage: registry.local/glm:1.2\n"
        ))
        .image
        .as_deref(),
        Some("registry.local/glm:1.2")
    );
}

#[test]
fn probes_tolerate_long_loads() {
    let d = build(CHAT_GPU);
    let c = server(&d);
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/health"));
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/ready"));
    assert_eq!(path(&c.startup_probe).as_deref(), Some("/health"));
    let startup = c.startup_probe.as_ref().unwrap();
    let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(
        budget >= 30 * 60,
        "startup budget {budget}s is too short for big models"
    );
    let deadline = d.spec.as_ref().unwrap().progress_deadline_seconds.unwrap();
    assert!(
        deadline >= budget,
        "rollout deadline shorter than the startup budget"
    );
}

#[test]
fn security_context_is_locked_down() {
    let d = build(CHAT_GPU);
    let p = pod(&d);
    let psc = p.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(p.automount_service_account_token, Some(false));
    assert_eq!(p.enable_service_links, Some(false));
    let all = p
        .containers
        .iter()
        .chain(p.init_containers.iter().flatten());
    for c in all {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()]),
            "{}",
            c.name
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
    }
}

#[test]
fn shm_is_memory_backed_and_tmp_writable() {
    let d = build(CHAT_GPU);
    let p = pod(&d);
    let vols = p.volumes.as_ref().unwrap();
    let shm = vols.iter().find(|v| v.name == "dshm").unwrap();
    assert_eq!(
        shm.empty_dir.as_ref().and_then(|e| e.medium.as_deref()),
        Some("Memory")
    );
    let mounts = server(&d).volume_mounts.clone().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.name == "dshm" && m.mount_path == "/dev/shm"));
    assert!(mounts
        .iter()
        .any(|m| m.name == "tmp" && m.mount_path == "/tmp"));
}

#[test]
fn scheduling_fields_are_passed_through() {
    let d = build(
        "task: chat\nsource: /m\nnodeSelector: {gpu: a100}\ntolerations:\n- {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}\naffinity:\n  nodeAffinity:\n    requiredDuringSchedulingIgnoredDuringExecution:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - {key: zone, operator: In, values: [a]}\nruntimeClassName: nvidia\npriorityClassName: inference-high\n",
    );
    let p = pod(&d);
    assert_eq!(
        p.node_selector,
        Some(BTreeMap::from([("gpu".to_owned(), "a100".to_owned())]))
    );
    let tol = &p.tolerations.as_ref().unwrap()[0];
    assert_eq!(tol.key.as_deref(), Some("nvidia.com/gpu"));
    assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));
    let terms = &p
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms[0].match_expressions.as_ref().unwrap()[0].key, "zone");
    assert_eq!(p.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(p.priority_class_name.as_deref(), Some("inference-high"));
}

#[test]
fn prometheus_scrape_annotations_on_pods() {
    let d = build(CHAT_GPU);
    let ann = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        ann.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        ann.get("prometheus.io/port").map(String::as_str),
        Some("8200")
    );
    assert_eq!(
        ann.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
}

#[test]
fn hf_source_with_cache_downloads_into_the_pvc() {
    let m = model("task: chat\nsource: hf://Qwen/Qwen2.5-0.5B@abc123\ncache: {size: 20Gi, storageClassName: fast}\nenv:\n- {name: HF_ENDPOINT, value: 'https://mirror'}\n");
    let d = deployment(&m, &cfg()).unwrap();
    let p = pod(&d);
    let models = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "models")
        .unwrap();
    assert_eq!(
        models
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("qwen-weights")
    );
    let init = &p.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.image.as_deref(), Some(cfg().downloader_image.as_str()));
    let args = init.args.clone().unwrap();
    let dir = "/models/hf/Qwen/Qwen2.5-0.5B/abc123";
    assert_eq!(
        &args[1..4],
        &[dir.to_owned(), "Qwen/Qwen2.5-0.5B".into(), "abc123".into()]
    );
    assert_eq!(
        env_of(init, "HF_ENDPOINT").as_deref(),
        Some("https://mirror")
    );
    // Server reads the same directory, read-only.
    let c = server(&d);
    assert_eq!(c.args.as_ref().unwrap()[1], format!("qwen={dir}"));
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "models")
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/models", Some(true))
    );

    let claim = pvc(&m).unwrap().unwrap();
    assert_eq!(claim.metadata.name.as_deref(), Some("qwen-weights"));
    assert_eq!(
        claim.metadata.owner_references.as_ref().unwrap()[0].name,
        "qwen"
    );
    let spec = claim.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap().get("storage"),
        Some(&Quantity("20Gi".into()))
    );
}

#[test]
fn hf_source_without_cache_uses_scratch_space_and_main_revision() {
    let m = model(
        "task: chat\nsource: hf://HuggingFaceTB/SmolLM2-135M-Instruct\ngguf: smollm2-q8.gguf\n",
    );
    assert!(pvc(&m).unwrap().is_none());
    let d = deployment(&m, &cfg()).unwrap();
    let p = pod(&d);
    let models = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "models")
        .unwrap();
    assert!(models.empty_dir.is_some());
    let args = p.init_containers.as_ref().unwrap()[0].args.clone().unwrap();
    assert_eq!(args[3], "main");
    assert_eq!(args[4], "smollm2-q8.gguf");
    assert_eq!(
        server(&d).args.as_ref().unwrap()[1],
        "qwen=/models/hf/HuggingFaceTB/SmolLM2-135M-Instruct/main/smollm2-q8.gguf"
    );
}

#[test]
fn pvc_source_mounts_the_claim_read_only() {
    let m = model("task: chat\nsource: pvc://model-store/glm4/9b\n");
    let d = deployment(&m, &cfg()).unwrap();
    let p = pod(&d);
    assert!(p.init_containers.is_none());
    let v = p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "models")
        .unwrap();
    let claim = v.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("model-store", Some(true))
    );
    assert_eq!(server(&d).args.as_ref().unwrap()[1], "qwen=/models/glm4/9b");
    assert!(
        pvc(&m).unwrap().is_none(),
        "no cache PVC for pvc:// sources"
    );
}

#[test]
fn local_source_needs_no_volume() {
    let d = build("task: embedding\nsource: /opt/models/minilm/\n");
    let p = pod(&d);
    assert!(p
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .all(|v| v.name != "models"));
    assert_eq!(
        server(&d).args.as_ref().unwrap()[1],
        "qwen=/opt/models/minilm"
    );
}

#[test]
fn service_selects_the_pods_on_the_api_port() {
    let s = service(&model(CHAT_GPU), &cfg()).unwrap();
    assert_eq!(s.metadata.name.as_deref(), Some("qwen"));
    assert_eq!(
        s.metadata.owner_references.as_ref().unwrap()[0].name,
        "qwen"
    );
    let spec = s.spec.unwrap();
    assert_eq!(spec.selector, Some(selector_labels("qwen")));
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.port, 8200);
    assert_eq!(port.name.as_deref(), Some("http"));
    assert_eq!(
        endpoint(&model(CHAT_GPU), &cfg()).as_deref(),
        Some("http://qwen.ai.svc.cluster.local:8200")
    );
}

#[test]
fn service_monitor_targets_the_http_port() {
    let sm = service_monitor(&model(CHAT_GPU)).unwrap();
    assert_eq!(
        sm.types.as_ref().map(|t| t.kind.as_str()),
        Some("ServiceMonitor")
    );
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(
        sm.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "qwen"
    );
}

#[test]
fn hashes_are_stable_and_track_changes() {
    let a = build(CHAT_GPU);
    let b = build(CHAT_GPU);
    let hash = |d: &Deployment, k| annotation(d, k).map(str::to_owned);
    assert!(hash(&a, SPEC_HASH_ANNOTATION).is_some());
    assert_eq!(
        hash(&a, SPEC_HASH_ANNOTATION),
        hash(&b, SPEC_HASH_ANNOTATION)
    );
    // Scaling changes the object but not the pod template.
    let scaled = build(&CHAT_GPU.replace("replicas: 3", "replicas: 4"));
    assert_ne!(
        hash(&a, SPEC_HASH_ANNOTATION),
        hash(&scaled, SPEC_HASH_ANNOTATION)
    );
    assert_eq!(
        hash(&a, TEMPLATE_HASH_ANNOTATION),
        hash(&scaled, TEMPLATE_HASH_ANNOTATION)
    );
    // A new image changes both.
    let new_image = build(&format!("{CHAT_GPU}image: glm:2\n"));
    assert_ne!(
        hash(&a, TEMPLATE_HASH_ANNOTATION),
        hash(&new_image, TEMPLATE_HASH_ANNOTATION)
    );
}

#[test]
fn source_parsing() {
    assert_eq!(
        Source::parse("hf://org/repo@v2").unwrap(),
        Source::HuggingFace {
            repo: "org/repo".into(),
            revision: Some("v2".into())
        }
    );
    assert_eq!(
        Source::parse("pvc://claim").unwrap(),
        Source::Pvc {
            claim: "claim".into(),
            path: String::new()
        }
    );
    for bad in [
        "hf://repo",
        "hf://org/repo@",
        "pvc://Bad_Claim/x",
        "pvc://c/../etc",
        "models/x",
        "s3://b/k",
        "/a/../b",
    ] {
        assert!(Source::parse(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn invalid_source_and_missing_uid_are_errors() {
    let bad = model("task: chat\nsource: /m\n");
    let mut bad_src = bad.clone();
    bad_src.spec.source = "ftp://x".into();
    assert!(matches!(
        deployment(&bad_src, &cfg()),
        Err(BuildError::InvalidSource(_))
    ));
    let mut no_uid = bad;
    no_uid.metadata.uid = None;
    assert_eq!(
        deployment(&no_uid, &cfg()).unwrap_err(),
        BuildError::MissingUid
    );
}
