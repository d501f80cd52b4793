//! Pure builders: a `GLMModel` (plus operator settings) in, the child objects out.
//!
//! No I/O here, so every field mapping is unit-tested and `glm-operator render` prints exactly
//! what the controller would apply.

mod deployment;
mod download;
mod pvc;
mod service;
mod source;

pub use deployment::{deployment, image};
pub use download::{download_marker, HUB_PACKAGE};
pub use pvc::{pvc, pvc_name};
pub use service::{service, service_monitor, service_monitor_resource};
pub use source::Source;

use std::collections::BTreeMap;

use glm_crds::GLMModel;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

/// Field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "glm-operator";
/// `app.kubernetes.io/name` of every inference pod.
pub const APP_NAME: &str = "glm-inference";
/// Hash of the whole desired object: equal hash on the live object means nothing to apply.
pub const SPEC_HASH_ANNOTATION: &str = "kubeglm.io/spec-hash";
/// Hash of the pod template alone: a change means a rollout (rather than a scale).
pub const TEMPLATE_HASH_ANNOTATION: &str = "kubeglm.io/template-hash";
pub const MODEL_LABEL: &str = "kubeglm.io/model";

/// Operator-wide settings the builders need: flags of `controller` and `render`, each with an
/// environment twin.
#[derive(clap::Args, Clone, Debug)]
pub struct BuildConfig {
    /// Inference image (a CPU build) of models that set no `spec.image` and no GPUs.
    #[arg(long, env = "GLM_DEFAULT_IMAGE", default_value_t = BuildConfig::default().default_image)]
    pub default_image: String,
    /// Inference image (a CUDA build) of models that set no `spec.image` and `gpus > 0`.
    #[arg(long, env = "GLM_DEFAULT_CUDA_IMAGE", default_value_t = BuildConfig::default().default_cuda_image)]
    pub default_cuda_image: String,
    /// Image of the init container downloading hf:// weights (any image with python3 + pip).
    #[arg(long, env = "GLM_DOWNLOADER_IMAGE", default_value_t = BuildConfig::default().downloader_image)]
    pub downloader_image: String,
    /// Port glm-inference listens on (API_PORT) and the per-model Service port.
    #[arg(long, env = "GLM_API_PORT", default_value_t = BuildConfig::default().api_port)]
    pub api_port: u16,
    /// Cluster DNS domain used in status.endpoint.
    #[arg(long, env = "GLM_CLUSTER_DOMAIN", default_value_t = BuildConfig::default().cluster_domain)]
    pub cluster_domain: String,
    /// UID and GID the inference pods run as.
    #[arg(long, env = "GLM_RUN_AS_USER", default_value_t = BuildConfig::default().run_as_user)]
    pub run_as_user: i64,
}

/// The one place these defaults are written: the flags above read them.
impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            default_image: "ghcr.io/kubeglm/glm-inference:latest".into(),
            // The CUDA build of the same version.
            default_cuda_image: "ghcr.io/kubeglm/glm-inference:latest-cuda".into(),
            downloader_image: "docker.io/library/python:3.12-slim".into(),
            api_port: 8200,
            cluster_domain: "cluster.local".into(),
            run_as_user: 65532,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("GLMModel has no namespace")]
    MissingNamespace,
    #[error("GLMModel has no name")]
    MissingName,
    #[error("GLMModel has no uid (not read from the API server)")]
    MissingUid,
    #[error("spec.source {0:?}: must be hf://org/repo[@revision], pvc://claim[/path] or an absolute path")]
    InvalidSource(String),
    #[error("spec.gpus must be >= 0, got {0}")]
    NegativeGpus(i32),
}

/// Identity of a model's children, computed once per reconcile.
pub(crate) struct Names {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
}

impl Names {
    pub fn of(model: &GLMModel) -> Result<Self, BuildError> {
        let name = model.metadata.name.clone().ok_or(BuildError::MissingName)?;
        let namespace = model
            .metadata
            .namespace
            .clone()
            .ok_or(BuildError::MissingNamespace)?;
        let owner = model
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingUid)?;
        Ok(Self {
            name,
            namespace,
            owner,
        })
    }

    pub fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Labels selecting a model's pods (Deployment selector, Service selector, scale selector).
pub fn selector_labels(model_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            model_name.to_owned(),
        ),
    ])
}

/// Labels on every child object and pod.
pub fn labels(model_name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(model_name);
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    labels.insert("app.kubernetes.io/component".into(), "model-server".into());
    labels.insert(MODEL_LABEL.into(), model_name.into());
    labels
}

/// `k=v,k=v` form of [`selector_labels`], as `status.selector` and list calls want it.
pub fn selector_string(model_name: &str) -> String {
    selector_labels(model_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label selector matching every child the operator manages (for watches).
pub fn managed_selector() -> String {
    format!("app.kubernetes.io/managed-by={MANAGER}")
}

/// In-cluster URL of the model's Service, as published in `status.endpoint`.
pub fn endpoint(model: &GLMModel, cfg: &BuildConfig) -> Option<String> {
    Some(format!(
        "http://{}.{}.svc.{}:{}",
        model.metadata.name.as_deref()?,
        model.metadata.namespace.as_deref()?,
        cfg.cluster_domain,
        cfg.api_port
    ))
}

/// Stamp `SPEC_HASH_ANNOTATION` with a hash of the object as built (before the stamp).
pub(crate) fn stamp_hash<T: serde::Serialize + Resource>(mut obj: T) -> T {
    let hash = hash_of(&obj);
    obj.annotations_mut()
        .insert(SPEC_HASH_ANNOTATION.into(), hash);
    obj
}

/// Stable 64-bit FNV-1a of the JSON form: stable across Rust releases and processes, unlike
/// `DefaultHasher`, so an operator restart does not re-apply every child.
pub(crate) fn hash_of<T: serde::Serialize>(value: &T) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    // Serializing our own k8s-openapi structs cannot fail (no non-string map keys).
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let hash = bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

/// Annotation value on a live object, if present.
pub fn annotation<'a, T: Resource>(obj: &'a T, key: &str) -> Option<&'a str> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod weights_tests;
