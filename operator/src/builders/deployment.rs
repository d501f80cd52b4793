//! The Deployment running `glm-inference` for one `GLMModel`.

use std::collections::BTreeMap;

use glm_crds::{GLMModel, RolloutStrategy, Task};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodAffinity, PodAffinityTerm, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::download::downloader;
use super::{
    hash_of, labels, pvc_name, selector_labels, stamp_hash, BuildConfig, BuildError, Names, Source,
    TEMPLATE_HASH_ANNOTATION,
};

const CONTAINER: &str = "inference";
pub(super) const MODELS_DIR: &str = "/models";
pub(super) const MODELS_VOLUME: &str = "models";

/// Seconds a model may take to load before the startup probe gives up: big checkpoints read
/// from network storage take many minutes, and a restart would only start over.
const STARTUP_BUDGET_SECS: i32 = 3600;
const STARTUP_PERIOD_SECS: i32 = 10;
/// Seconds glm-inference keeps serving after SIGTERM (well inside the grace period below).
const SHUTDOWN_DELAY_SECS: i32 = 5;
const TERMINATION_GRACE_SECS: i64 = 60;

/// Builds the Deployment. Fails only on a spec the CRD schema should already have refused.
pub fn deployment(model: &GLMModel, cfg: &BuildConfig) -> Result<Deployment, BuildError> {
    let names = Names::of(model)?;
    let spec = &model.spec;
    if spec.gpus < 0 {
        return Err(BuildError::NegativeGpus(spec.gpus));
    }
    let source = Source::parse(&spec.source)?;
    let weights = Weights::plan(model, &names.name, &source);

    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&names.name)),
            annotations: Some(scrape_annotations(cfg.api_port)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec(model, cfg, &weights)),
    };
    let mut meta = names.meta(names.name.clone());
    meta.annotations = Some(BTreeMap::from([(
        TEMPLATE_HASH_ANNOTATION.to_owned(),
        hash_of(&template),
    )]));

    Ok(stamp_hash(Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&names.name)),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(spec.rollout_strategy())),
            // Loading weights can take longer than the 10 minute default before a pod is ready.
            progress_deadline_seconds: Some(STARTUP_BUDGET_SECS),
            revision_history_limit: Some(3),
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }))
}

fn strategy(strategy: RolloutStrategy) -> DeploymentStrategy {
    match strategy {
        RolloutStrategy::Recreate => DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        },
        // One pod at a time, never below the desired count: spare capacity is the user's call.
        RolloutStrategy::RollingUpdate => DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(1)),
                max_unavailable: Some(IntOrString::Int(0)),
            }),
        },
    }
}

fn scrape_annotations(port: u16) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), port.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ])
}

/// Where the weights live inside the pod and how they get there.
struct Weights {
    /// `PATH` of `--model NAME=PATH`.
    model_path: String,
    /// Volume holding them (none for paths baked into the image).
    volume: Option<Volume>,
    /// Init container filling the volume (hf:// only).
    download: Option<Container>,
}

impl Weights {
    fn plan(model: &GLMModel, name: &str, source: &Source) -> Self {
        let gguf = model.spec.gguf.as_deref();
        let with_gguf = |dir: String| match gguf {
            Some(file) => format!("{dir}/{file}"),
            None => dir,
        };
        match source {
            Source::Local(path) => Self {
                model_path: with_gguf(path.clone()),
                volume: None,
                download: None,
            },
            Source::Pvc { claim, path } => Self {
                model_path: with_gguf(join(MODELS_DIR, path)),
                volume: Some(Volume {
                    name: MODELS_VOLUME.into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                }),
                download: None,
            },
            Source::HuggingFace { repo, revision } => {
                let revision = revision.as_deref().unwrap_or("main");
                // Revision in the path: changing it never mixes files of two snapshots.
                let dir = format!("{MODELS_DIR}/hf/{repo}/{revision}");
                let volume = match &model.spec.cache {
                    Some(_) => Volume {
                        name: MODELS_VOLUME.into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: pvc_name(name),
                            read_only: None,
                        }),
                        ..Volume::default()
                    },
                    // No cache: every new pod downloads again into its own scratch space.
                    None => empty_dir(MODELS_VOLUME, None),
                };
                Self {
                    model_path: with_gguf(dir.clone()),
                    volume: Some(volume),
                    download: Some(downloader(model, repo, revision, &dir)),
                }
            }
        }
    }
}

fn join(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_owned()
    } else {
        format!("{base}/{rel}")
    }
}

fn pod_spec(model: &GLMModel, cfg: &BuildConfig, weights: &Weights) -> PodSpec {
    let spec = &model.spec;
    let mut volumes = vec![
        // NCCL and torch-style loaders need a larger /dev/shm than the runtime's 64Mi default.
        empty_dir("dshm", Some("Memory")),
        empty_dir("tmp", None),
    ];
    volumes.extend(weights.volume.clone());
    let init_containers = weights.download.clone().map(|mut c| {
        c.image = Some(cfg.downloader_image.clone());
        vec![c]
    });

    PodSpec {
        containers: vec![server(model, cfg, weights)],
        init_containers,
        volumes: Some(volumes),
        node_selector: non_empty_map(&spec.node_selector),
        tolerations: non_empty(&spec.tolerations),
        affinity: affinity(model),
        runtime_class_name: spec.runtime_class_name.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(cfg.run_as_user),
            run_as_group: Some(cfg.run_as_user),
            // Makes the weights PVC writable by the non-root downloader.
            fs_group: Some(cfg.run_as_user),
            // Without it the kubelet re-chowns every file of the weights cache at each start,
            // minutes for a large model on network storage.
            fs_group_change_policy: Some("OnRootMismatch".into()),
            seccomp_profile: Some(runtime_default()),
            ..PodSecurityContext::default()
        }),
        // The server needs no API access.
        automount_service_account_token: Some(false),
        // Service links would inject `<SVC>_PORT=tcp://...` variables, and a Service named
        // `api` would then clobber glm-inference's API_PORT.
        enable_service_links: Some(false),
        // Lets in-flight streams finish after the endpoint is removed.
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECS),
        ..PodSpec::default()
    }
}

fn server(model: &GLMModel, cfg: &BuildConfig, weights: &Weights) -> Container {
    let spec = &model.spec;
    let served = model.served_name().to_owned();
    let mut args = vec![
        "--model".to_owned(),
        format!("{served}={}", weights.model_path),
    ];
    args.extend(spec.args.iter().cloned());

    let mut env = vec![
        env("API_PORT", &cfg.api_port.to_string()),
        env("HOME", "/tmp"),
        // Keep answering (with /ready failing) while the endpoint is withdrawn, so no request
        // reaches a pod that already stopped listening.
        env("GLM_SHUTDOWN_DELAY_SECS", &SHUTDOWN_DELAY_SECS.to_string()),
    ];
    if spec.task == Task::Chat {
        // The default chat model; glm-inference refuses to start when it names an embedder.
        env.push(self::env("GLM_MODEL", &served));
    }
    if spec.gpus > 0 {
        // The device plugin exposes only the allocated GPUs, renumbered from 0.
        let devices = (0..spec.gpus)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        env.push(self::env("CUDA_VISIBLE_DEVICES", &devices));
        // A pod that was given GPUs must not quietly run on its CPUs when they fail to open.
        env.push(self::env("GLM_DEVICE", "cuda"));
    }
    let env = merge_env(env, &spec.env);

    let mut mounts = vec![
        mount("dshm", "/dev/shm", false),
        mount("tmp", "/tmp", false),
    ];
    if weights.volume.is_some() {
        mounts.push(mount(MODELS_VOLUME, MODELS_DIR, true));
    }

    Container {
        name: CONTAINER.into(),
        image: Some(image(model, cfg)),
        command: Some(vec!["glm-inference".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(cfg.api_port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(
            spec.resources.clone(),
            spec.gpu_resource_name(),
            spec.gpus,
        )),
        startup_probe: Some(probe(
            "/health",
            STARTUP_PERIOD_SECS,
            STARTUP_BUDGET_SECS / STARTUP_PERIOD_SECS,
        )),
        liveness_probe: Some(probe("/health", 10, 3)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// `spec.image`, else the operator's CUDA image for GPU models (they run with `GLM_DEVICE=cuda`,
/// which a CPU build refuses) and its CPU image for the rest.
pub fn image(model: &GLMModel, cfg: &BuildConfig) -> String {
    match &model.spec.image {
        Some(image) => image.clone(),
        None if model.spec.gpus > 0 => cfg.default_cuda_image.clone(),
        None => cfg.default_image.clone(),
    }
}

/// The user's affinity, plus, when the weights cache can be mounted on one node only
/// (ReadWriteOnce), a required affinity to the model's own pods on the same node: replicas and
/// rollouts then never wait on a volume attached elsewhere (Multi-Attach), and a node without
/// room makes them Unschedulable, which status reports with the scheduler's message.
fn affinity(model: &GLMModel) -> Option<Affinity> {
    let mut affinity = model.spec.affinity.clone();
    let name = model.metadata.name.as_deref()?;
    let single_node = model
        .spec
        .cache
        .as_ref()
        .is_some_and(glm_crds::CacheSpec::single_node);
    if !single_node
        || !matches!(
            Source::parse(&model.spec.source),
            Ok(Source::HuggingFace { .. })
        )
    {
        return affinity;
    }
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(name)),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    affinity
        .get_or_insert_with(Affinity::default)
        .pod_affinity
        .get_or_insert_with(PodAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new)
        .push(term);
    affinity
}

/// The user's requests/limits plus `gpus` of the GPU resource in both (extended resources
/// must have requests == limits).
fn resources(
    user: Option<ResourceRequirements>,
    gpu_name: &str,
    gpus: i32,
) -> ResourceRequirements {
    let mut res = user.unwrap_or_default();
    if gpus > 0 {
        let qty = Quantity(gpus.to_string());
        res.requests
            .get_or_insert_with(BTreeMap::new)
            .insert(gpu_name.to_owned(), qty.clone());
        res.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(gpu_name.to_owned(), qty);
    }
    res
}

fn probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

pub(super) fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

fn empty_dir(name: &str, medium: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(Into::into),
            size_limit: None,
        }),
        ..Volume::default()
    }
}

pub(super) fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

pub(super) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// Operator defaults overridden by the user's variables of the same name. Duplicate names would
/// make server-side apply refuse the object (env is a list-map keyed by name).
pub(super) fn merge_env(mut base: Vec<EnvVar>, user: &[EnvVar]) -> Vec<EnvVar> {
    for var in user {
        match base.iter_mut().find(|b| b.name == var.name) {
            Some(existing) => *existing = var.clone(),
            None => base.push(var.clone()),
        }
    }
    base
}

fn non_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

fn non_empty_map(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then(|| m.clone())
}
