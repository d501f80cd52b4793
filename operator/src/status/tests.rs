//! Condition rules, transitions and problem detection.
use super::*;
use crate::builders::tests::model;
use k8s_openapi::api::apps::v1::DeploymentStatus;

fn deployment(replicas: i32, ready: i32, updated: i32) -> Deployment {
    Deployment {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            generation: Some(2),
            ..Default::default()
        },
        spec: None,
        status: Some(DeploymentStatus {
            observed_generation: Some(2),
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            ..Default::default()
        }),
    }
}

fn cond<'a>(s: &'a GLMModelStatus, t: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t}"))
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn transition_time_moves_only_when_status_flips() {
    let cfg = BuildConfig::default();
    let mut m = model("task: chat\nsource: /m\nreplicas: 2\n");
    let first = compute(&m, Some(&deployment(2, 0, 2)), None, &cfg, at(0));
    assert_eq!(cond(&first, "Ready").status, "False");
    m.status = Some(first.clone());
    let same = compute(&m, Some(&deployment(2, 0, 2)), None, &cfg, at(60));
    assert_eq!(same, first, "an unchanged world must yield an equal status");
    let ready = compute(&m, Some(&deployment(2, 2, 2)), None, &cfg, at(120));
    assert_eq!(cond(&ready, "Ready").last_transition_time, Time(at(120)));
    assert_eq!(cond(&ready, "Degraded").last_transition_time, Time(at(0)));
    assert_eq!(cond(&ready, "Progressing").status, "False");
    let events = transitions(m.status.as_ref(), &ready);
    assert_eq!(
        events.iter().map(|n| n.reason).collect::<Vec<_>>(),
        ["Ready", "RolledOut"]
    );
}

#[test]
fn scaled_to_zero_is_not_ready_and_not_progressing() {
    let m = model("task: chat\nsource: /m\nreplicas: 0\n");
    let s = compute(
        &m,
        Some(&deployment(0, 0, 0)),
        None,
        &BuildConfig::default(),
        at(0),
    );
    assert_eq!(cond(&s, "Ready").reason, "ScaledToZero");
    assert_eq!(cond(&s, "Progressing").status, "False");
    assert_eq!(s.replicas, 0);
}

#[test]
fn partially_ready_still_serves() {
    let m = model("task: chat\nsource: /m\nreplicas: 3\n");
    let s = compute(
        &m,
        Some(&deployment(3, 1, 3)),
        None,
        &BuildConfig::default(),
        at(0),
    );
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "PartiallyReady")
    );
    assert_eq!(cond(&s, "Progressing").reason, "WaitingForReady");
    assert_eq!(s.ready_replicas, 1);
}

fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn unschedulable_wins_over_failing_and_ignores_running_pods() {
    let pending = pod("metadata: {name: b}\nstatus:\n  phase: Pending\n  conditions:\n  - {type: PodScheduled, status: 'False', reason: Unschedulable, message: '0/3 nodes are available: 3 Insufficient nvidia.com/gpu.'}\n");
    let crashing = pod("metadata: {name: a}\nstatus:\n  phase: Running\n  containerStatuses:\n  - {name: inference, image: i, imageID: '', ready: false, restartCount: 3, state: {waiting: {reason: ImagePullBackOff}}}\n");
    let ok = pod("metadata: {name: c}\nstatus: {phase: Running}\n");
    assert_eq!(
        find_problem(None, &[crashing.clone(), pending, ok.clone()]),
        Some(Problem::Unschedulable(
            "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()
        ))
    );
    assert_eq!(
        find_problem(None, &[ok.clone(), crashing]),
        Some(Problem::Failing(
            "pod a: container inference: ImagePullBackOff".into()
        ))
    );
    assert_eq!(find_problem(None, &[ok]), None);
}

#[test]
fn progress_deadline_is_failing() {
    let mut d = deployment(1, 0, 1);
    if let Some(s) = d.status.as_mut() {
        s.conditions = Some(vec![serde_json::from_value(serde_json::json!({
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"qwen-7d\" has timed out progressing."
        }))
        .unwrap_or_else(|e| panic!("{e}"))]);
    }
    assert_eq!(
        find_problem(Some(&d), &[]),
        Some(Problem::Failing(
            "ReplicaSet \"qwen-7d\" has timed out progressing.".into()
        ))
    );
}

#[test]
fn a_replica_failure_is_failed_create_and_warns() {
    let m = model("task: chat\nsource: /m\nreplicas: 1\n");
    let mut d = deployment(0, 0, 0);
    let quota = "pods \"qwen-5d8f-x\" is forbidden: exceeded quota: gpu, requested: pods=1, used: pods=0, limited: pods=0";
    if let Some(s) = d.status.as_mut() {
        s.conditions = Some(vec![serde_json::from_value(serde_json::json!({
            "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": quota
        }))
        .unwrap_or_else(|e| panic!("{e}"))]);
    }
    let problem = find_problem(Some(&d), &[]);
    assert_eq!(problem, Some(Problem::FailedCreate(quota.into())));
    let s = compute(
        &m,
        Some(&d),
        problem.as_ref(),
        &BuildConfig::default(),
        at(0),
    );
    let ready = cond(&s, "Ready");
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.message.as_str()
        ),
        ("False", "FailedCreate", quota)
    );
    assert_eq!(cond(&s, "Degraded").reason, "FailedCreate");
    let events = transitions(None, &s);
    assert_eq!(events, [Notice::warning("FailedCreate", quota)]);
}

#[test]
fn a_refused_apply_degrades_but_old_pods_still_serve() {
    let m = model("task: chat\nsource: /m\nreplicas: 2\n");
    let refused = Problem::ApplyFailed(
        "Deployment ai/qwen: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1".into(),
    );
    let serving = compute(
        &m,
        Some(&deployment(2, 2, 2)),
        Some(&refused),
        &BuildConfig::default(),
        at(0),
    );
    assert_eq!(cond(&serving, "Ready").status, "True");
    let degraded = cond(&serving, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ApplyFailed")
    );
    assert!(degraded.message.contains("must be less than or equal"));
    let fresh = compute(&m, None, Some(&refused), &BuildConfig::default(), at(0));
    assert_eq!(cond(&fresh, "Ready").reason, "ApplyFailed");
    let reasons: Vec<_> = transitions(None, &fresh).iter().map(|n| n.reason).collect();
    assert_eq!(reasons, ["ApplyFailed"]);
}
