//! The `GLMModel` custom resource (`kubeglm.io/v1alpha1`).
//!
//! One `GLMModel` is one served model: the operator turns it into a Deployment of
//! `glm-inference` pods, a Service in front of them and, when `spec.cache` is set, a PVC that
//! keeps downloaded weights across restarts. The gateway routes OpenAI requests by
//! `spec.name` / `spec.aliases` to `status.endpoint` once the `Ready` condition is `True`.
//!
//! Validation lives in the schema (schemars attributes and CEL rules), so the API server refuses
//! a bad spec with a message naming the field instead of the operator failing later.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

mod routing;
pub use routing::{RoutingSpec, RoutingStrategy, DEFAULT_PREFIX_CHARS};

pub const GROUP: &str = "kubeglm.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "GLMModel";

/// Extended resource requested per GPU unless `spec.gpuResourceName` says otherwise.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Condition types written to `status.conditions`.
pub mod condition {
    /// `True` once every desired replica is ready (and at least one exists).
    pub const READY: &str = "Ready";
    /// `True` while a rollout or scale is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// `True` when pods cannot be scheduled or keep failing.
    pub const DEGRADED: &str = "Degraded";
}

/// A model served by `glm-inference` pods behind one Service.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubeglm.io",
    version = "v1alpha1",
    kind = "GLMModel",
    namespaced,
    shortname = "glm",
    category = "kubeglm",
    status = "GLMModelStatus",
    derive = "PartialEq",
    doc = "A model served by glm-inference pods behind one Service (OpenAI-compatible API).",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.task"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpus"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = "1"
    ),
    // The Service is named after the object, and Service names are DNS-1035 labels.
    validation = Rule::new(
        "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    )
    .message("metadata.name must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63 characters): it names the Service")
)]
#[x_kube(validation = Rule::new("!has(self.cache) || self.source.startsWith('hf://')").message("cache applies only to hf:// sources (downloaded weights)").field_path(".cache"))]
#[x_kube(validation = Rule::new("!has(self.gguf) || self.task == 'chat'").message("gguf applies only to chat models").field_path(".gguf"))]
#[x_kube(validation = Rule::new("!has(self.routing) || !has(self.routing.strategy) || self.routing.strategy != 'PrefixHash' || self.task == 'chat'").message("routing.strategy PrefixHash applies only to chat models").field_path(".routing.strategy"))]
#[x_kube(validation = Rule::new("!has(self.cache) || !has(self.cache.accessModes) || !('ReadWriteOncePod' in self.cache.accessModes) || self.replicas <= 1").message("a ReadWriteOncePod cache is mounted by one pod only: replicas must be at most 1 (use ReadWriteMany to share it)").field_path(".replicas"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.cache) || !has(self.cache.accessModes) || !('ReadWriteOncePod' in self.cache.accessModes) || self.autoscaling.maxReplicas <= 1").message("a ReadWriteOncePod cache is mounted by one pod only: autoscaling.maxReplicas must be at most 1 (use ReadWriteMany to share it)").field_path(".autoscaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct GLMModelSpec {
    /// Model name served to clients (the OpenAI `model` field). Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(MODEL_NAME_RULE).message(MODEL_NAME_MESSAGE))]
    #[schemars(length(max = 128))]
    pub name: Option<String>,

    /// Further names the gateway routes to this model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^[A-Za-z0-9]([A-Za-z0-9._:/-]{0,126}[A-Za-z0-9])?$'))").message("every alias must be 1-128 characters of letters, digits, '.', '_', ':', '/', '-', starting and ending with a letter or digit"))]
    #[schemars(length(max = 32), inner(length(max = 128)))]
    pub aliases: Vec<String>,

    /// What the model serves: `chat` (chat completions) or `embedding` (embeddings, keywords).
    pub task: Task,

    /// Where the weights come from: `hf://org/repo[@revision]`, `pvc://claim/path`, or an
    /// absolute path inside the image (`/models/...`).
    #[x_kube(validation = Rule::new(SOURCE_RULE).message(SOURCE_MESSAGE))]
    #[schemars(length(min = 1, max = 1024))]
    pub source: String,

    /// GGUF file inside the source to load (chat models), e.g. `model-q4_k_m.gguf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.endsWith('.gguf') && !self.startsWith('/') && !self.contains('..')").message("gguf must be a relative path inside the source ending in .gguf, without '..'"))]
    #[schemars(length(max = 512))]
    pub gguf: Option<String>,

    /// Pods to run. The scale subresource points here, so HPA and KEDA can drive it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// GPUs per replica, requested and limited as `gpuResourceName`. At most 1: glm-inference
    /// serves a model from one device, so more would be requested and never used.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self <= 1").message("gpus must be 0 or 1: glm-inference serves a model from one GPU (use replicas for more throughput)"))]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,

    /// Extended resource name for GPUs (default `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')").message("gpuResourceName must be a resource name such as nvidia.com/gpu"))]
    #[schemars(length(max = 253))]
    pub gpu_resource_name: Option<String>,

    /// CPU/memory requests and limits of the server container (GPUs come from `gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Server image; defaults to the operator's `--default-cuda-image` when `gpus > 0`, else its
    /// `--default-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0 && !self.contains(' ')").message("image must be a non-empty image reference"))]
    #[schemars(length(max = 1024))]
    pub image: Option<String>,

    /// Extra environment for the server container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Extra command-line arguments for `glm-inference`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// How the gateway balances requests over the pods and holds them while none is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,

    /// Keep downloaded weights on a PVC so restarts do not download again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// How pods are replaced on change. Default: `Recreate` when `gpus > 0` (a new pod never
    /// waits for a GPU the old one holds), `RollingUpdate` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// Replicas that follow the request load the gateways measure (the operator sets
    /// `replicas` through the scale subresource). Leave it out to set `replicas` yourself or
    /// let an HPA/KEDA drive the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

const MODEL_NAME_RULE: &str =
    "size(self) <= 128 && self.matches('^[A-Za-z0-9]([A-Za-z0-9._:/-]{0,126}[A-Za-z0-9])?$')";
const MODEL_NAME_MESSAGE: &str = "name must be 1-128 characters of letters, digits, '.', '_', ':', '/', '-', starting and ending with a letter or digit";
const SOURCE_RULE: &str = "self.matches('^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$') || self.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^ ]*)?$') || (self.startsWith('/') && !self.contains('..'))";
const SOURCE_MESSAGE: &str = "source must be hf://org/repo[@revision], pvc://claim[/path] or an absolute path inside the image";

fn default_replicas() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Chat,
    Embedding,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Chat => "chat",
            Task::Embedding => "embedding",
        }
    }
}

/// PVC for downloaded weights.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Requested capacity, a Kubernetes quantity such as `20Gi`.
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]*)?|\\\\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$')").message("cache.size must be a quantity such as 20Gi"))]
    #[schemars(length(min = 1, max = 64))]
    pub size: String,

    /// Storage class; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Access modes of the claim (default `ReadWriteOnce`); use `ReadWriteMany` when replicas
    /// spread over several nodes share the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(m, m in ['ReadWriteOnce', 'ReadOnlyMany', 'ReadWriteMany', 'ReadWriteOncePod'])").message("cache.accessModes must be ReadWriteOnce, ReadOnlyMany, ReadWriteMany or ReadWriteOncePod"))]
    #[schemars(length(max = 4), inner(length(max = 32)))]
    pub access_modes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<RolloutStrategy>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutStrategy {
    /// Stop old pods before starting new ones (frees their GPUs first).
    Recreate,
    /// Start new pods before stopping old ones (needs spare capacity).
    RollingUpdate,
}

// ---- autoscaling (spec.autoscaling, status.autoscaling) ------------------------------------

/// Default of `spec.autoscaling.scaleDownDelay`.
pub const DEFAULT_SCALE_DOWN_DELAY: &str = "5m";

/// Bounds and target of the operator's autoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas").field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest replicas. 0 allows scale to zero once no request arrived for `scaleDownDelay`
    /// (the gateway scales back to 1 when the next request comes).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,

    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Requests in flight (running or held at the gateway) one replica should carry: replicas
    /// = ceil(average demand / targetInFlight).
    #[x_kube(validation = Rule::new("self > 0").message("autoscaling.targetInFlight must be greater than 0"))]
    #[schemars(range(max = 100000))]
    pub target_in_flight: i32,

    /// How long demand must stay lower before replicas are removed (and, to scale to zero,
    /// how long no request may arrive): a duration of whole hours, minutes and seconds such as
    /// `5m`, `90s` or `1h30m`. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(DURATION_RULE).message("autoscaling.scaleDownDelay must be a duration such as 30s, 5m or 1h30m (whole hours, minutes, seconds)"))]
    #[schemars(length(max = 32))]
    pub scale_down_delay: Option<String>,
}

const DURATION_RULE: &str =
    "self != '' && self.matches('^([0-9]{1,6}h)?([0-9]{1,6}m)?([0-9]{1,6}s)?$')";

fn default_min_replicas() -> i32 {
    1
}

impl AutoscalingSpec {
    /// `scaleDownDelay`, or the default; `None` when it does not parse (the schema refuses
    /// such values, so only an object written before validation could carry one).
    pub fn scale_down_delay(&self) -> Option<std::time::Duration> {
        parse_duration(
            self.scale_down_delay
                .as_deref()
                .unwrap_or(DEFAULT_SCALE_DOWN_DELAY),
        )
    }
}

/// Parses `[Nh][Nm][Ns]` (at least one part, in that order), as the schema admits.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut secs: u64 = 0;
    let mut rest = text;
    let mut last_unit = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let (number, tail) = rest.split_at(digits);
        let mut chars = tail.chars();
        let (unit, rank) = match chars.next()? {
            'h' => (3600, 1),
            'm' => (60, 2),
            's' => (1, 3),
            _ => return None,
        };
        if number.is_empty() || rank <= last_unit {
            return None;
        }
        last_unit = rank;
        secs = secs.checked_add(number.parse::<u64>().ok()?.checked_mul(unit)?)?;
        rest = chars.as_str();
    }
    (last_unit > 0).then(|| std::time::Duration::from_secs(secs))
}

/// The autoscaler's last decision, written by the operator's autoscaler (its own field
/// manager) only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas the autoscaler wants now (it writes them to `spec.replicas`).
    pub desired_replicas: i32,
    /// When the autoscaler last changed `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why: `ScaledUp`, `ScaledDown`, `Steady`, `ScaleDownPending`, `MetricsUnavailable`,
    /// `OutOfBounds`.
    pub reason: String,
    /// The figures behind the decision.
    #[serde(default)]
    pub message: String,
}

// ---- end of autoscaling ---------------------------------------------------------------------

/// Observed state, written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GLMModelStatus {
    /// metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pods of the Deployment (the scale subresource reads this).
    #[serde(default)]
    pub replicas: i32,

    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the pods, for the scale subresource (HPA/KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// In-cluster URL of the model's Service: `http://<svc>.<ns>.svc.cluster.local:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The autoscaler's last decision (models with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

impl GLMModel {
    /// Name clients use: `spec.name`, else `metadata.name`.
    pub fn served_name(&self) -> &str {
        self.spec
            .name
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }

    /// Condition of this type in the status, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }

    /// What the gateway routes on: the `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.condition(condition::READY)
            .is_some_and(|c| c.status == "True")
    }
}

impl GLMModelSpec {
    pub fn gpu_resource_name(&self) -> &str {
        self.gpu_resource_name
            .as_deref()
            .unwrap_or(DEFAULT_GPU_RESOURCE)
    }

    /// Recreate when GPUs are held (or the cache admits one pod only) unless the user asked
    /// otherwise: a new pod never waits for a GPU or a volume the old one holds.
    pub fn rollout_strategy(&self) -> RolloutStrategy {
        match self.rollout.as_ref().and_then(|r| r.strategy) {
            Some(s) => s,
            None if self.gpus > 0 => RolloutStrategy::Recreate,
            None if self.cache.as_ref().is_some_and(CacheSpec::single_pod) => {
                RolloutStrategy::Recreate
            }
            None => RolloutStrategy::RollingUpdate,
        }
    }
}

impl CacheSpec {
    /// Access modes as the PVC gets them (`ReadWriteOnce` when none are given).
    pub fn effective_access_modes(&self) -> Vec<String> {
        if self.access_modes.is_empty() {
            vec!["ReadWriteOnce".to_owned()]
        } else {
            self.access_modes.clone()
        }
    }

    /// Only pods on one node can mount the volume (no `ReadWriteMany`/`ReadOnlyMany`).
    pub fn single_node(&self) -> bool {
        !self
            .effective_access_modes()
            .iter()
            .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany")
    }

    /// Only one pod at all can mount the volume.
    pub fn single_pod(&self) -> bool {
        self.access_modes.iter().any(|m| m == "ReadWriteOncePod") && self.single_node()
    }
}

/// The CRD as YAML, exactly as committed in `crds/glmmodel.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&GLMModel::crd())
}

#[cfg(test)]
mod tests;
