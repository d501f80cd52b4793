//! Lease protocol against a mocked API server.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/glm-operator";

fn elector(identity: &str) -> (LeaderElector, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cfg = LeaseConfig {
        name: "glm-operator".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };
    (LeaderElector::new(Client::new(service, "ops"), cfg), handle)
}

fn lease(holder: Option<&str>, renewed: Timestamp, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "glm-operator", "namespace": "ops", "resourceVersion": "42"},
        "spec": {
            "holderIdentity": holder, "leaseDurationSeconds": 15,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": MicroTime(renewed), "leaseTransitions": transitions
        }
    })
}

async fn next(
    handle: &mut Handle,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
    else {
        panic!("expected {method} {path}");
    };
    assert_eq!((req.method(), req.uri().path()), (&method, path));
    let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
    (serde_json::from_slice(&bytes).unwrap_or(Value::Null), send)
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: &Value) {
    let resp = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()));
    match resp {
        Ok(r) => send.send_response(r),
        Err(e) => panic!("{e}"),
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

#[tokio::test]
async fn creates_a_missing_lease() {
    let (e, mut h) = elector("pod-a");
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 404, &status(404, "NotFound"));
        let (body, send) = next(&mut h, Method::POST, LEASES).await;
        assert_eq!(body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        reply(send, 201, &body);
    });
    assert!(e
        .try_acquire_or_renew(Timestamp::now())
        .await
        .unwrap_or(false));
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_fresh_lease_held_by_another_is_left_alone() {
    let (e, mut h) = elector("pod-b");
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), now, 3));
        // No write may follow.
        let extra = tokio::time::timeout(Duration::from_millis(300), h.next_request()).await;
        assert!(
            matches!(extra, Err(_) | Ok(None)),
            "standby wrote the lease"
        );
    });
    assert!(!e.try_acquire_or_renew(now).await.unwrap_or(true));
    drop(e);
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_optimistic_concurrency() {
    let (e, mut h) = elector("pod-b");
    let now = Timestamp::now();
    let stale = Timestamp::from_second(now.as_second() - 60).unwrap_or(now);
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), stale, 3));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        assert_eq!(body["spec"]["holderIdentity"], "pod-b");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        reply(send, 200, &body);
    });
    assert!(e.try_acquire_or_renew(now).await.unwrap_or(false));
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn losing_the_race_is_not_an_error() {
    let (e, mut h) = elector("pod-b");
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(None, now, 1));
        let (_, send) = next(&mut h, Method::PUT, LEASE).await;
        reply(send, 409, &status(409, "Conflict"));
    });
    assert!(!e.try_acquire_or_renew(now).await.unwrap_or(true));
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn the_holder_renews_and_releases() {
    let (e, mut h) = elector("pod-a");
    let before = Timestamp::now();
    let now = Timestamp::from_second(before.as_second() + 5).unwrap_or(before);
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), before, 2));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert_eq!(
            body["spec"]["leaseTransitions"], 2,
            "a renewal is no transition"
        );
        let acquired: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap_or(before);
        assert_eq!(
            body["spec"]["acquireTime"],
            json!(MicroTime(acquired)),
            "acquireTime kept"
        );
        assert_ne!(body["spec"]["renewTime"], json!(MicroTime(before)));
        reply(send, 200, &body);
        // release
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), now, 2));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert!(body["spec"]["holderIdentity"].is_null());
        reply(send, 200, &body);
    });
    assert!(e.try_acquire_or_renew(now).await.unwrap_or(false));
    e.release().await.unwrap_or_else(|e| panic!("{e}"));
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn leader_that_loses_the_lease_stops_work() {
    let (e, mut h) = elector("pod-a");
    let mut cfg = e.cfg.clone();
    cfg.retry_period = Duration::from_millis(20);
    let e = LeaderElector { api: e.api, cfg };
    let server = tokio::spawn(async move {
        // campaign: acquire
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 404, &status(404, "NotFound"));
        let (body, send) = next(&mut h, Method::POST, LEASES).await;
        reply(send, 201, &body);
        // renewal finds another holder
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-z"), Timestamp::now(), 5));
    });
    let metrics = Metrics::default();
    let work = std::future::pending::<anyhow::Result<()>>();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        run_as_leader(e, metrics.clone(), std::future::pending(), work),
    )
    .await
    .unwrap_or_else(|_| panic!("leader kept working after losing the lease"));
    let err = res.expect_err("losing the lease must end the work with an error");
    assert!(
        err.to_string().contains("taken by another replica"),
        "{err}"
    );
    assert_eq!(metrics.leader.get(), 0);
    server.await.unwrap_or_else(|e| panic!("{e}"));
}
