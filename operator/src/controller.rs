//! The GLMModel controller: watch GLMModels (and the objects they own), apply the children the
//! builders describe, publish status and Events. Shaped after kube-rs `controller-rs`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use glm_crds::{GLMModel, GLMModelStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::builders::{self, BuildConfig, BuildError, MANAGER, MODEL_LABEL};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::scope::Scope;
use crate::status::{self, Notice, Problem};

/// Requeue of a settled model: a safety net, watches deliver the real changes.
const SETTLED_REQUEUE: Duration = Duration::from_secs(300);
/// Requeue while pods start or stay unschedulable.
const UNSETTLED_REQUEUE: Duration = Duration::from_secs(30);
/// First retry after an error; doubles per consecutive failure up to `BACKOFF_MAX`.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What the controller reads and shares across reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: BuildConfig,
    /// Apply a ServiceMonitor per model (the monitoring.coreos.com CRD is installed).
    pub service_monitors: bool,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<GLMModel>, u32>>,
    /// resourceVersion of each child as our last apply left it (key: resource URL + name). A
    /// live object with another version was written since (a hand edit, a controller's status):
    /// it is re-applied, which restores owned fields and is a no-op write otherwise.
    applied: Mutex<HashMap<String, String>>,
}

/// Children remembered in `Context::applied` before the map is reset (it only saves no-op
/// applies, so forgetting is cheap, and deleted models' entries must not pile up).
const APPLIED_CAPACITY: usize = 10_000;

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Metrics, config: BuildConfig) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            service_monitors: false,
            failures: Mutex::default(),
            applied: Mutex::default(),
        }
    }

    fn applied_version(&self, key: &str) -> Option<String> {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.get(key).cloned()
    }

    fn remember_applied(&self, key: String, version: Option<String>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.len() >= APPLIED_CAPACITY {
            applied.clear();
        }
        match version {
            Some(v) => applied.insert(key, v),
            None => applied.remove(&key),
        };
    }

    /// Next retry delay for `obj`, counting this failure.
    pub fn next_backoff(&self, obj: ObjectRef<GLMModel>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(obj).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    fn reset_backoff(&self, obj: &ObjectRef<GLMModel>) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(obj);
    }
}

/// `BACKOFF_BASE * 2^(attempt-1)`, capped at `BACKOFF_MAX`.
pub fn backoff_delay(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

#[instrument(skip(model, ctx), fields(model = %model.name_any(), ns = model.namespace()))]
pub async fn reconcile(model: Arc<GLMModel>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.reconcile_timer();
    let result = reconcile_inner(&model, &ctx).await;
    timer.finish(&result);
    if result.is_ok() {
        ctx.reset_backoff(&ObjectRef::from_obj(&*model));
    }
    result
}

/// Errors retry with exponential backoff per object: a failing API never turns into a hot loop.
pub fn error_policy(model: Arc<GLMModel>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(ObjectRef::from_obj(&*model));
    warn!(model = %model.name_any(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(model: &GLMModel, ctx: &Context) -> Result<Action> {
    if model.metadata.deletion_timestamp.is_some() {
        // Children carry ownerReferences: the garbage collector deletes them with the model.
        return Ok(Action::await_change());
    }
    let ns = model.namespace().ok_or(BuildError::MissingNamespace)?;
    let children = match Children::build(model, &ctx.config, ctx.service_monitors) {
        Ok(c) => c,
        Err(e @ (BuildError::InvalidSource(_) | BuildError::NegativeGpus(_))) => {
            // A spec fix is needed, not a retry: report it and wait for the next change.
            let problem = Problem::InvalidSpec(e.to_string());
            publish_status(model, ctx, None, Some(&problem), Vec::new()).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e.into()),
    };

    let (deployment, notices) = match apply_children(&children, &ns, ctx).await {
        Ok(applied) => applied,
        Err(Error::Kube(kube::Error::Api(status))) if refused(&status) => {
            // A spec the API server refuses (422), a quota or policy denial (403): retrying
            // alone will not fix it, so say it where `kubectl describe glm` shows it.
            let dep_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            let live = dep_api.get_opt(&model.name_any()).await?;
            let problem = Problem::ApplyFailed(status.message.clone());
            publish_status(model, ctx, live.as_ref(), Some(&problem), Vec::new()).await?;
            return Err(Error::Kube(kube::Error::Api(status)));
        }
        Err(e) => return Err(e),
    };

    let problem = if needs_pod_check(model, &deployment.current) {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let selector = builders::selector_string(&model.name_any());
        let pods = pods.list(&ListParams::default().labels(&selector)).await?;
        status::find_problem(Some(&deployment.current), &pods.items)
    } else {
        None
    };
    let settled = publish_status(
        model,
        ctx,
        Some(&deployment.current),
        problem.as_ref(),
        notices,
    )
    .await?;
    Ok(Action::requeue(if settled {
        SETTLED_REQUEUE
    } else {
        UNSETTLED_REQUEUE
    }))
}

/// API answers that mean "this object is refused as it is", as opposed to transient failures
/// (and to a namespace being deleted, where nothing is worth reporting).
fn refused(status: &kube::core::Status) -> bool {
    let terminating = status
        .details
        .as_ref()
        .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"));
    matches!(status.code, 400 | 403 | 422) && !terminating
}

/// Applies every child; returns the live Deployment and the Events the changes deserve.
async fn apply_children(
    children: &Children,
    ns: &str,
    ctx: &Context,
) -> Result<(Applied<Deployment>, Vec<Notice>)> {
    let mut notices = Vec::new();
    let mut created = Vec::new();
    if let Some(pvc) = &children.pvc {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        if apply(&api, pvc, ctx).await?.previous.is_none() {
            created.push("PersistentVolumeClaim");
        }
    }
    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    if apply(&svc_api, &children.service, ctx)
        .await?
        .previous
        .is_none()
    {
        created.push("Service");
    }
    let dep_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let deployment = apply(&dep_api, &children.deployment, ctx).await?;
    if let Some(monitor) = &children.service_monitor {
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            ns,
            &builders::service_monitor_resource(),
        );
        apply(&api, monitor, ctx).await?;
    }
    match &deployment.previous {
        None => {
            created.insert(0, "Deployment");
            notices.push(Notice::normal(
                "Created",
                format!("Created {}", created.join(", ")),
            ));
        }
        Some(previous) => notices.extend(deployment_changes(previous, &children.deployment)),
    }
    Ok((deployment, notices))
}

/// Desired children of one model.
pub struct Children {
    pub deployment: Deployment,
    pub service: Service,
    pub pvc: Option<PersistentVolumeClaim>,
    pub service_monitor: Option<DynamicObject>,
}

impl Children {
    pub fn build(
        model: &GLMModel,
        cfg: &BuildConfig,
        service_monitor: bool,
    ) -> Result<Self, BuildError> {
        Ok(Self {
            deployment: builders::deployment(model, cfg)?,
            service: builders::service(model, cfg)?,
            pvc: builders::pvc(model)?,
            service_monitor: if service_monitor {
                Some(builders::service_monitor(model)?)
            } else {
                None
            },
        })
    }
}

struct Applied<K> {
    previous: Option<K>,
    current: K,
}

/// Server-side apply `desired` unless the live object carries its hash and is still the
/// version our last apply left. Fields other managers own (a user's annotations, the
/// Deployment controller's revision) survive; fields we own that someone edited are put back.
async fn apply<K>(api: &Api<K>, desired: &K, ctx: &Context) -> Result<Applied<K>>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let key = format!("{}/{name}", api.resource_url());
    let live = api.get_opt(&name).await?;
    let wanted = builders::annotation(desired, builders::SPEC_HASH_ANNOTATION);
    if let Some(live) = &live {
        let same_spec = wanted.is_some()
            && builders::annotation(live, builders::SPEC_HASH_ANNOTATION) == wanted;
        let untouched = live.meta().resource_version.is_some()
            && live.meta().resource_version == ctx.applied_version(&key);
        if same_spec && untouched {
            return Ok(Applied {
                previous: Some(live.clone()),
                current: live.clone(),
            });
        }
    }
    let current = patch(api, &name, desired).await?;
    ctx.remember_applied(key, current.meta().resource_version.clone());
    ctx.metrics
        .applies
        .with_label_values(&[kind_of(api.resource_url())])
        .inc();
    Ok(Applied {
        previous: live,
        current,
    })
}

async fn patch<K>(api: &Api<K>, name: &str, desired: &K) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    debug!(name, "applying");
    Ok(api
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await?)
}

/// The metric label of the kind an API serves, from its URL's resource (plural) name: the
/// applied types include a dynamic one (ServiceMonitor), whose kind no static type carries.
fn kind_of(resource_url: &str) -> &'static str {
    match resource_url.rsplit('/').next() {
        Some("deployments") => "Deployment",
        Some("services") => "Service",
        Some("persistentvolumeclaims") => "PersistentVolumeClaim",
        Some("servicemonitors") => "ServiceMonitor",
        _ => "other",
    }
}

/// Events for an update of an existing Deployment: scale and/or rollout.
fn deployment_changes(previous: &Deployment, desired: &Deployment) -> Vec<Notice> {
    let mut notices = Vec::new();
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    let (from, to) = (replicas(previous), replicas(desired));
    if from != to {
        notices.push(Notice::normal(
            "Scaled",
            format!(
                "Scaled from {} to {} replicas",
                from.unwrap_or(1),
                to.unwrap_or(1)
            ),
        ));
    }
    let template = |d| builders::annotation(d, builders::TEMPLATE_HASH_ANNOTATION);
    if template(previous).is_some() && template(previous) != template(desired) {
        notices.push(Notice::normal(
            "RollingOut",
            "Pod template changed: rolling out new pods",
        ));
    }
    notices
}

/// Pods are only listed while something is off, keeping a settled model's pass to GETs.
fn needs_pod_check(model: &GLMModel, deployment: &Deployment) -> bool {
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    model.spec.replicas > 0 && ready < model.spec.replicas
}

/// Write the status if it changed and publish Events. Returns whether the model is settled
/// (ready, rolled out, not degraded).
async fn publish_status(
    model: &GLMModel,
    ctx: &Context,
    deployment: Option<&Deployment>,
    problem: Option<&Problem>,
    mut notices: Vec<Notice>,
) -> Result<bool> {
    let new = status::compute(model, deployment, problem, &ctx.config, Timestamp::now());
    let old = model.status.as_ref();
    if old != Some(&new) {
        let api: Api<GLMModel> =
            Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
        let body = json!({
            "apiVersion": GLMModel::api_version(&()),
            "kind": GLMModel::kind(&()),
            "status": GLMModelStatus { autoscaling: None, ..new.clone() },
        });
        api.patch_status(
            &model.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    }
    notices.extend(status::transitions(old, &new));
    let reference = model.object_ref(&());
    for notice in notices {
        info!(reason = notice.reason, note = %notice.note, "event");
        let event = Event {
            type_: notice.type_,
            reason: notice.reason.into(),
            note: Some(truncate(notice.note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event that cannot be written must not fail (and so repeat) the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "publishing event failed");
        }
    }
    let is = |t: &str, s: &str| new.conditions.iter().any(|c| c.type_ == t && c.status == s);
    Ok(is(glm_crds::condition::READY, "True")
        && is(glm_crds::condition::PROGRESSING, "False")
        && is(glm_crds::condition::DEGRADED, "False"))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Whether the Prometheus Operator's ServiceMonitor kind is served by this cluster.
pub async fn service_monitors_available(client: &Client) -> bool {
    match client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.kind == "ServiceMonitor"),
        Err(_) => false,
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let models: Api<GLMModel> = scope.api(&client);
    if let Err(e) = models.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list GLMModels ({e}); is the CRD installed? `glm-operator crd | kubectl apply -f -`"
        );
    }
    let owned = watcher::Config::default().labels(&builders::managed_selector());
    let pods = watcher::Config::default().labels(&builders::managed_selector());
    info!(namespace = ?scope.namespace, service_monitors = ctx.service_monitors, "controller starting");
    Controller::new(models, watcher::Config::default().any_semantic())
        .owns(scope.api::<Deployment>(&client), owned.clone())
        .owns(scope.api::<Service>(&client), owned.clone())
        .owns(scope.api::<PersistentVolumeClaim>(&client), owned)
        // Pod conditions (unschedulable, crash loops) do not always touch the Deployment.
        .watches(scope.api::<Pod>(&client), pods, |pod| {
            let model = pod.labels().get(MODEL_LABEL)?.clone();
            Some(ObjectRef::new(&model).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, action)) => debug!(%obj, ?action, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
