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

/// Expiry is measured on the local monotonic clock from when the record was first seen, never
/// from `renewTime` (which another node's clock wrote): a renewTime far in the past (or in the
/// future) changes nothing.
#[tokio::test]
async fn a_lease_is_taken_over_only_after_going_unchanged_for_its_duration() {
    let (e, mut h) = elector("pod-b");
    let now = Timestamp::now();
    let skewed = Timestamp::from_second(now.as_second() - 3600).unwrap_or(now);
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (_, send) = next(&mut h, Method::GET, LEASE).await;
            reply(send, 200, &lease(Some("pod-a"), skewed, 3));
        }
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), skewed, 3));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        assert_eq!(body["spec"]["holderIdentity"], "pod-b");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        reply(send, 200, &body);
    });
    let t0 = Instant::now();
    let at = |secs| t0 + Duration::from_secs(secs);
    assert!(
        !e.try_acquire_or_renew_at(now, at(0)).await.unwrap_or(true),
        "first sight"
    );
    assert!(
        !e.try_acquire_or_renew_at(now, at(14)).await.unwrap_or(true),
        "14 s < 15 s"
    );
    assert!(
        e.try_acquire_or_renew_at(now, at(16))
            .await
            .unwrap_or(false),
        "16 s unchanged"
    );
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_renewal_seen_restarts_the_clock() {
    let (e, mut h) = elector("pod-b");
    let t0 = Timestamp::now();
    let t1 = Timestamp::from_second(t0.as_second() + 10).unwrap_or(t0);
    let server = tokio::spawn(async move {
        let records = [t0, t1, t1];
        for renewed in records {
            let (_, send) = next(&mut h, Method::GET, LEASE).await;
            reply(send, 200, &lease(Some("pod-a"), renewed, 3));
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), h.next_request()).await;
        assert!(
            matches!(extra, Err(_) | Ok(None)),
            "standby wrote the lease"
        );
    });
    let start = Instant::now();
    let at = |secs| start + Duration::from_secs(secs);
    assert!(!e.try_acquire_or_renew_at(t0, at(0)).await.unwrap_or(true));
    // pod-a renewed: 12 s since the first record, 0 s since this one.
    assert!(!e.try_acquire_or_renew_at(t0, at(12)).await.unwrap_or(true));
    assert!(
        !e.try_acquire_or_renew_at(t0, at(24)).await.unwrap_or(true),
        "12 s since the renewal"
    );
    drop(e);
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let (e, mut h) = elector("pod-b");
    let now = Timestamp::now();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(None, now, 3));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert_eq!(body["spec"]["holderIdentity"], "pod-b");
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

/// Sets its flag when dropped: tells whether the leader's work was stopped.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn fast(e: LeaderElector) -> LeaderElector {
    let mut cfg = e.cfg.clone();
    cfg.retry_period = Duration::from_millis(20);
    cfg.renew_deadline = Duration::from_millis(500);
    LeaderElector::new_with_api(e.api, cfg)
}

#[tokio::test]
async fn a_leader_that_loses_the_lease_stops_work_and_campaigns_again() {
    let (e, mut h) = elector("pod-a");
    let e = fast(e);
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let flag = stopped.clone();
    let server = tokio::spawn(async move {
        // campaign: acquire
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 404, &status(404, "NotFound"));
        let (body, send) = next(&mut h, Method::POST, LEASES).await;
        reply(send, 201, &body);
        // renewal finds another holder: the work must stop before the next request
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-z"), Timestamp::now(), 5));
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        assert!(
            flag.load(std::sync::atomic::Ordering::SeqCst),
            "work still running"
        );
        reply(send, 200, &lease(Some("pod-z"), Timestamp::now(), 5));
        let _ = shutdown_tx.send(());
    });
    let metrics = Metrics::default();
    let mut starts = 0;
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        run_as_leader(
            e,
            metrics.clone(),
            async {
                let _ = shutdown_rx.await;
            },
            || {
                starts += 1;
                let guard = DropFlag(stopped.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<anyhow::Result<()>>().await
                }
            },
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the standby did not stop on shutdown"));
    res.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(starts, 1);
    assert_eq!(metrics.leader.get(), 0);
    server.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_hung_renewal_ends_leadership_at_the_renew_deadline() {
    let (e, mut h) = elector("pod-a");
    let e = fast(e);
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopped.clone();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 404, &status(404, "NotFound"));
        let (body, send) = next(&mut h, Method::POST, LEASES).await;
        reply(send, 201, &body);
        // The renewal is accepted and never answered ...
        let held = h.next_request().await;
        let asked = std::time::Instant::now();
        // ... and the next request is a campaign, after the work stopped.
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        assert!(
            flag.load(std::sync::atomic::Ordering::SeqCst),
            "work still running"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
        drop(held);
        reply(send, 200, &lease(Some("pod-z"), Timestamp::now(), 5));
    });
    let campaign = run_as_leader(e, Metrics::default(), std::future::pending(), || {
        let guard = DropFlag(stopped.clone());
        async move {
            let _guard = guard;
            std::future::pending::<anyhow::Result<()>>().await
        }
    });
    // The campaign never ends by itself: stop it once the server saw what it expected.
    tokio::select! {
        _ = campaign => panic!("campaign ended"),
        res = server => res.unwrap_or_else(|e| panic!("{e}")),
    }
}

#[tokio::test]
async fn work_that_fails_releases_the_lease_and_returns_the_error() {
    let (e, mut h) = elector("pod-a");
    let e = fast(e);
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 404, &status(404, "NotFound"));
        let (body, send) = next(&mut h, Method::POST, LEASES).await;
        reply(send, 201, &body);
        let (_, send) = next(&mut h, Method::GET, LEASE).await;
        reply(send, 200, &lease(Some("pod-a"), Timestamp::now(), 0));
        let (body, send) = next(&mut h, Method::PUT, LEASE).await;
        assert!(body["spec"]["holderIdentity"].is_null(), "released");
        reply(send, 200, &body);
    });
    let res = run_as_leader(e, Metrics::default(), std::future::pending(), || async {
        anyhow::bail!("no CRD")
    })
    .await;
    assert!(res.is_err_and(|e| e.to_string() == "no CRD"));
    server.await.unwrap_or_else(|e| panic!("{e}"));
}
