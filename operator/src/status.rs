//! Pure status computation: observed Deployment + pods in, `GLMModelStatus` out, plus the
//! Events a status transition deserves. No I/O, so every condition rule is unit-tested.

use glm_crds::{condition, GLMModel, GLMModelStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use crate::builders::{self, BuildConfig};

/// Container waiting reasons that will not fix themselves without a change.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// A problem seen on the pods or the Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Pods Pending with `PodScheduled=False/Unschedulable`; the scheduler's message.
    Unschedulable(String),
    /// Containers in a crash/pull back-off, or the rollout missed its deadline.
    Failing(String),
    /// The spec cannot be turned into objects (should have been refused by the schema).
    InvalidSpec(String),
    /// The ReplicaSet cannot create pods (a ResourceQuota, a LimitRange, an admission webhook):
    /// the Deployment's `ReplicaFailure` condition.
    FailedCreate(String),
    /// The API server refused a child object (422 Invalid, 403 Forbidden, 400): its message.
    ApplyFailed(String),
}

impl Problem {
    fn reason(&self) -> &'static str {
        match self {
            Problem::Unschedulable(_) => "Unschedulable",
            Problem::Failing(_) => "Failing",
            Problem::InvalidSpec(_) => "InvalidSpec",
            Problem::FailedCreate(_) => "FailedCreate",
            Problem::ApplyFailed(_) => "ApplyFailed",
        }
    }

    fn message(&self) -> &str {
        match self {
            Problem::Unschedulable(m)
            | Problem::Failing(m)
            | Problem::InvalidSpec(m)
            | Problem::FailedCreate(m)
            | Problem::ApplyFailed(m) => m,
        }
    }
}

/// Replica counts read from the Deployment.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    desired: i32,
    replicas: i32,
    ready: i32,
    updated: i32,
    /// The Deployment controller has seen the latest Deployment spec.
    observed: bool,
}

impl Counts {
    fn of(desired: i32, deployment: Option<&Deployment>) -> Self {
        let Some(d) = deployment else {
            return Self {
                desired,
                ..Self::default()
            };
        };
        let status = d.status.clone().unwrap_or_default();
        Self {
            desired,
            replicas: status.replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            observed: status.observed_generation.is_some()
                && status.observed_generation >= d.metadata.generation,
        }
    }

    fn rolled_out(&self) -> bool {
        self.observed
            && self.updated >= self.desired
            && self.replicas == self.desired
            && self.ready >= self.desired
    }
}

/// First problem found, pods in name order so the message does not flap between passes.
pub fn find_problem(deployment: Option<&Deployment>, pods: &[Pod]) -> Option<Problem> {
    let mut pods: Vec<&Pod> = pods.iter().collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let unschedulable = pods.iter().find_map(|p| unschedulable_message(p));
    if let Some(msg) = unschedulable {
        return Some(Problem::Unschedulable(msg));
    }
    if let Some(msg) = pods.iter().find_map(|p| failing_message(p)) {
        return Some(Problem::Failing(msg));
    }
    if let Some(msg) = replica_failure(deployment) {
        return Some(Problem::FailedCreate(msg));
    }
    deadline_exceeded(deployment).map(Problem::Failing)
}

/// The Deployment controller copies a ReplicaSet's pod creation failure (quota exceeded,
/// admission denied) into `ReplicaFailure`; no pod exists to show it.
fn replica_failure(deployment: Option<&Deployment>) -> Option<String> {
    deployment_condition(deployment, |c| {
        c.type_ == "ReplicaFailure" && c.status == "True"
    })
    .map(|c| {
        c.message
            .clone()
            .unwrap_or_else(|| "the ReplicaSet cannot create pods".into())
    })
}

fn deployment_condition(
    deployment: Option<&Deployment>,
    matches: impl Fn(&k8s_openapi::api::apps::v1::DeploymentCondition) -> bool,
) -> Option<&k8s_openapi::api::apps::v1::DeploymentCondition> {
    deployment?
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| matches(c))
}

fn unschedulable_message(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Pending") {
        return None;
    }
    status.conditions.as_ref()?.iter().find_map(|c| {
        (c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable"))
        .then(|| {
            c.message
                .clone()
                .unwrap_or_else(|| "pod is unschedulable".into())
        })
    })
}

fn failing_message(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let name = pod.metadata.name.as_deref().unwrap_or("pod");
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    containers
        .filter_map(|c| {
            waiting_failure(c).map(|m| format!("pod {name}: container {}: {m}", c.name))
        })
        .next()
}

fn waiting_failure(c: &ContainerStatus) -> Option<String> {
    let waiting = c.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    FAILING_REASONS
        .contains(&reason)
        .then(|| match &waiting.message {
            Some(msg) if !msg.is_empty() => format!("{reason}: {msg}"),
            _ => reason.to_owned(),
        })
}

fn deadline_exceeded(deployment: Option<&Deployment>) -> Option<String> {
    deployment_condition(deployment, |c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    })
    .map(|c| {
        c.message
            .clone()
            .unwrap_or_else(|| "rollout exceeded its progress deadline".into())
    })
}

/// The status the operator wants written. Conditions keep their `lastTransitionTime` while
/// their `status` stays the same, so an unchanged world yields an equal status (and no write).
pub fn compute(
    model: &GLMModel,
    deployment: Option<&Deployment>,
    problem: Option<&Problem>,
    cfg: &BuildConfig,
    now: Timestamp,
) -> GLMModelStatus {
    // The API server keeps whole seconds: a sub-second time would never compare equal to
    // what it reads back, and every pass after a transition would write again.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let counts = Counts::of(model.spec.replicas, deployment);
    let generation = model.metadata.generation;
    let old = model.status.as_ref();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(old, generation, now, type_, ok, reason, message)
    };

    let (ready, ready_reason, ready_msg) = ready(&counts, deployment.is_some(), problem);
    let progressing = !counts.rolled_out()
        && counts.desired > 0
        && !matches!(problem, Some(Problem::InvalidSpec(_)));
    let (prog_reason, prog_msg) = match problem {
        Some(Problem::InvalidSpec(msg)) => ("InvalidSpec", msg.clone()),
        _ => progressing_reason(&counts),
    };
    let degraded = problem.map_or(("AsExpected", String::new()), |p| {
        (p.reason(), p.message().to_owned())
    });

    GLMModelStatus {
        observed_generation: generation,
        replicas: counts.replicas,
        ready_replicas: counts.ready,
        selector: Some(builders::selector_string(name)),
        endpoint: builders::endpoint(model, cfg),
        conditions: vec![
            cond(condition::READY, ready, ready_reason, ready_msg),
            cond(condition::PROGRESSING, progressing, prog_reason, prog_msg),
            cond(
                condition::DEGRADED,
                problem.is_some(),
                degraded.0,
                degraded.1,
            ),
        ],
        // The autoscaler's (its own field manager): carried so an unchanged world compares
        // equal; the controller's status writes leave it out.
        autoscaling: old.and_then(|s| s.autoscaling.clone()),
    }
}

/// Ready means "can serve": at least one replica ready. The message says how many.
fn ready(
    counts: &Counts,
    has_deployment: bool,
    problem: Option<&Problem>,
) -> (bool, &'static str, String) {
    let of = format!("{}/{} replicas ready", counts.ready, counts.desired);
    if let Some(Problem::InvalidSpec(msg)) = problem {
        return (false, "InvalidSpec", msg.clone());
    }
    if counts.desired == 0 {
        return (false, "ScaledToZero", "spec.replicas is 0".into());
    }
    if counts.ready >= counts.desired {
        return (true, "ReplicasReady", of);
    }
    if counts.ready > 0 {
        return (true, "PartiallyReady", of);
    }
    match problem {
        Some(p) => (false, p.reason(), p.message().to_owned()),
        None if !has_deployment => (false, "Pending", "Deployment not created yet".into()),
        None => (
            false,
            "Starting",
            format!("{of}: pods starting or loading the model"),
        ),
    }
}

fn progressing_reason(c: &Counts) -> (&'static str, String) {
    let msg = format!(
        "{} updated, {} ready, {} total of {} desired",
        c.updated, c.ready, c.replicas, c.desired
    );
    if c.rolled_out() || c.desired == 0 {
        ("Complete", msg)
    } else if !c.observed || c.updated < c.desired {
        ("RollingOut", msg)
    } else if c.replicas != c.desired {
        ("Scaling", msg)
    } else {
        ("WaitingForReady", msg)
    }
}

fn condition(
    old: Option<&GLMModelStatus>,
    generation: Option<i64>,
    now: Timestamp,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// An Event to publish about the GLMModel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

impl Notice {
    pub fn normal(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            note: note.into(),
        }
    }

    pub fn warning(reason: &'static str, note: impl Into<String>) -> Self {
        Self {
            type_: EventType::Warning,
            reason,
            note: note.into(),
        }
    }
}

/// Events for condition transitions between the stored and the new status.
pub fn transitions(old: Option<&GLMModelStatus>, new: &GLMModelStatus) -> Vec<Notice> {
    let get = |s: Option<&GLMModelStatus>, t: &str| -> Option<Condition> {
        s?.conditions.iter().find(|c| c.type_ == t).cloned()
    };
    let mut notices = Vec::new();
    let (old_ready, new_ready) = (get(old, condition::READY), get(Some(new), condition::READY));
    if let Some(n) = &new_ready {
        let was_ready = old_ready.as_ref().is_some_and(|o| o.status == "True");
        if n.status == "True" && !was_ready {
            notices.push(Notice::normal("Ready", n.message.clone()));
        }
    }
    let (old_deg, new_deg) = (
        get(old, condition::DEGRADED),
        get(Some(new), condition::DEGRADED),
    );
    if let Some(n) = &new_deg {
        let same = old_deg
            .as_ref()
            .is_some_and(|o| o.status == n.status && o.reason == n.reason);
        if n.status == "True" && !same {
            let reason = match n.reason.as_str() {
                "Unschedulable" => "Unschedulable",
                "InvalidSpec" => "InvalidSpec",
                "FailedCreate" => "FailedCreate",
                "ApplyFailed" => "ApplyFailed",
                _ => "Failing",
            };
            notices.push(Notice::warning(reason, n.message.clone()));
        }
    }
    let (old_prog, new_prog) = (
        get(old, condition::PROGRESSING),
        get(Some(new), condition::PROGRESSING),
    );
    if let (Some(o), Some(n)) = (&old_prog, &new_prog) {
        if o.status == "True" && n.status == "False" && n.reason == "Complete" {
            notices.push(Notice::normal("RolledOut", n.message.clone()));
        }
    }
    notices
}

#[cfg(test)]
mod tests;
