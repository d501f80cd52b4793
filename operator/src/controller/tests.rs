//! Reconcile against a mocked API server (tower-test), as kube-rs `controller-rs` does: each
//! test scripts the requests the reconcile must make, answers them, and then checks that no
//! further request arrives.

use std::sync::Arc;
use std::time::Duration;

use glm_crds::{GLMModel, GLMModelStatus};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};

use super::*;
use crate::builders::tests::model;
use crate::builders::BuildConfig;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

const NS: &str = "ai";
const NAME: &str = "qwen";
const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/ai/deployments/qwen";
const SVC_PATH: &str = "/api/v1/namespaces/ai/services/qwen";
const PVC_PATH: &str = "/api/v1/namespaces/ai/persistentvolumeclaims/qwen-weights";
const PODS_PATH: &str = "/api/v1/namespaces/ai/pods";
const STATUS_PATH: &str = "/apis/kubeglm.io/v1alpha1/namespaces/ai/glmmodels/qwen/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ai/events";
const GPU_SPEC: &str = "task: chat\nsource: /models/qwen\ngpus: 1\nreplicas: 3\n";

/// The fake API server side of a test.
struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    /// Next request, which must have this method and path (query ignored).
    async fn expect(&mut self, method: Method, path: &str) -> (Request<Body>, Responder) {
        let next = tokio::time::timeout(Duration::from_secs(5), self.0.next_request()).await;
        let Ok(Some((req, send))) = next else {
            panic!("expected {method} {path}, but no request came");
        };
        assert_eq!(
            (req.method(), req.uri().path()),
            (&method, path),
            "unexpected request {} {}",
            req.method(),
            req.uri()
        );
        (req, send)
    }

    async fn get(&mut self, path: &str, obj: Option<Value>) {
        let (_, send) = self.expect(Method::GET, path).await;
        match obj {
            Some(o) => reply(send, StatusCode::OK, &o),
            None => reply(send, StatusCode::NOT_FOUND, &not_found()),
        }
    }

    /// A server-side apply; answers with the applied body merged over `extra` (e.g. a status).
    async fn apply(&mut self, path: &str, extra: Value) -> Value {
        let (req, send) = self.expect(Method::PATCH, path).await;
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(query.contains("fieldManager=glm-operator"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            req.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/apply-patch+yaml")
        );
        let body = body_json(req).await;
        let mut answer = body.clone();
        // A status apply sends only the status; the API server answers with the whole object
        // (whose spec the operator ignores, so any valid one does).
        if answer.get("metadata").is_none() {
            let whole = json!({"metadata": {"name": NAME, "namespace": NS},
                "spec": {"task": "chat", "source": "/models/qwen"}});
            merge(&mut answer, whole);
        }
        merge(&mut answer, extra);
        reply(send, StatusCode::OK, &answer);
        body
    }

    /// A server-side apply answered with `live` (the object as stored, resourceVersion included).
    async fn apply_answering(&mut self, path: &str, live: &Value) -> Value {
        let (req, send) = self.expect(Method::PATCH, path).await;
        assert!(req
            .uri()
            .query()
            .unwrap_or_default()
            .contains("fieldManager=glm-operator"));
        let body = body_json(req).await;
        reply(send, StatusCode::OK, live);
        body
    }

    async fn fail(&mut self, method: Method, path: &str, code: StatusCode) {
        self.fail_with(method, path, code, "injected failure").await;
    }

    async fn fail_with(&mut self, method: Method, path: &str, code: StatusCode, message: &str) {
        let (_, send) = self.expect(method, path).await;
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": code.canonical_reason().unwrap_or(""),
            "code": code.as_u16()
        });
        reply(send, code, &status);
    }

    async fn pods(&mut self, pods: Vec<Value>) -> String {
        let (req, send) = self.expect(Method::GET, PODS_PATH).await;
        let query = req.uri().query().unwrap_or_default().to_owned();
        reply(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
        );
        query
    }

    async fn event(&mut self) -> Value {
        let (req, send) = self.expect(Method::POST, EVENTS_PATH).await;
        let body = body_json(req).await;
        reply(send, StatusCode::CREATED, &body);
        body
    }

    /// Once the client is gone, no request may be left over.
    async fn done(mut self) {
        if let Some((req, _)) = self.0.next_request().await {
            panic!("unexpected extra request {} {}", req.method(), req.uri());
        }
    }
}

fn reply(send: Responder, code: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    match Response::builder().status(code).body(Body::from(bytes)) {
        Ok(resp) => send.send_response(resp),
        Err(e) => panic!("building response: {e}"),
    }
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req
        .into_body()
        .collect_bytes()
        .await
        .unwrap_or_else(|e| panic!("reading request body: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("request body is not JSON: {e}"))
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), extra) {
        a.extend(b);
    }
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or_else(|e| panic!("serialize: {e}"))
}

/// An operator that applied the live children itself (their resourceVersions are known).
fn context() -> (Arc<Context>, ApiServerVerifier) {
    let (ctx, api) = fresh_context();
    for (path, version) in [(DEPLOY_PATH, "100"), (SVC_PATH, "200"), (PVC_PATH, "300")] {
        ctx.remember_applied(path.to_owned(), Some(version.to_owned()));
    }
    (ctx, api)
}

/// An operator just started: it has applied nothing yet.
fn fresh_context() -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let ctx = Context::new(
        client,
        "glm-operator-test".into(),
        Metrics::default(),
        BuildConfig::default(),
    );
    (Arc::new(ctx), ApiServerVerifier(handle))
}

fn deploy_status(replicas: i32, ready: i32, updated: i32) -> Value {
    json!({"status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
        "updatedReplicas": updated, "availableReplicas": ready}})
}

/// The Deployment as it would live in the cluster once built for `m` and rolled out.
fn live_deployment(m: &GLMModel, ready: i32) -> Deployment {
    let mut d = builders::deployment(m, &BuildConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    d.metadata.generation = Some(1);
    d.metadata.resource_version = Some("100".into());
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(m.spec.replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(m.spec.replicas),
        available_replicas: Some(ready),
        ..DeploymentStatus::default()
    });
    d
}

fn live_service(m: &GLMModel) -> Value {
    let mut svc = builders::service(m, &BuildConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    svc.metadata.resource_version = Some("200".into());
    to_value(&svc)
}

/// A model whose stored status is what the operator wrote for `deployment`.
fn settled(spec: &str, deployment: &Deployment) -> GLMModel {
    let mut m = model(spec);
    let status = status::compute(
        &m,
        Some(deployment),
        None,
        &BuildConfig::default(),
        Timestamp::now(),
    );
    m.status = Some(status);
    m
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

async fn run_reconcile(m: GLMModel, ctx: Arc<Context>) -> Result<Action> {
    tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(m), ctx))
        .await
        .unwrap_or_else(|_| panic!("reconcile hung"))
}

#[tokio::test]
async fn create_applies_children_and_reports_status() {
    let (ctx, mut api) = context();
    let m = model("task: chat\nsource: hf://Qwen/Qwen2.5-0.5B\ngpus: 1\ncache: {size: 10Gi}\n");
    let server = tokio::spawn(async move {
        api.get(PVC_PATH, None).await;
        let pvc = api.apply(PVC_PATH, json!({})).await;
        assert_eq!(pvc["kind"], "PersistentVolumeClaim");
        api.get(SVC_PATH, None).await;
        let svc = api.apply(SVC_PATH, json!({})).await;
        api.get(DEPLOY_PATH, None).await;
        let dep = api.apply(DEPLOY_PATH, json!({})).await;
        assert_eq!(dep["apiVersion"], "apps/v1");
        // Deleting the model cascades: every child names it as its controlling owner.
        for child in [&pvc, &svc, &dep] {
            let owner = &child["metadata"]["ownerReferences"][0];
            assert_eq!(
                (&owner["kind"], &owner["name"], &owner["uid"]),
                (
                    &json!("GLMModel"),
                    &json!(NAME),
                    &json!("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
                )
            );
            assert_eq!(owner["controller"], true);
            // Without blockOwnerDeletion the operator needs no grant on glmmodels/finalizers.
            assert_eq!(owner.get("blockOwnerDeletion"), None);
        }
        // Fresh Deployment: no ready pods yet, so the operator looks at them.
        let query = api.pods(vec![]).await;
        assert!(query.contains("labelSelector="), "{query}");
        let status = api.apply(STATUS_PATH, json!({})).await;
        assert_eq!(
            status["status"]["endpoint"],
            "http://qwen.ai.svc.cluster.local:8200"
        );
        assert_eq!(
            status["status"]["selector"],
            "app.kubernetes.io/instance=qwen,app.kubernetes.io/name=glm-inference"
        );
        assert_eq!(status["status"]["observedGeneration"], 1);
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(condition(&status, "Progressing")["status"], "True");
        assert_eq!(condition(&status, "Degraded")["status"], "False");
        let event = api.event().await;
        assert_eq!(event["reason"], "Created");
        assert_eq!(
            event["note"],
            "Created Deployment, PersistentVolumeClaim, Service"
        );
        assert_eq!(event["regarding"]["kind"], "GLMModel");
        api
    });
    let action = run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(action, Action::requeue(UNSETTLED_REQUEUE));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn second_pass_with_nothing_changed_writes_nothing() {
    let (ctx, mut api) = fresh_context();
    let live = to_value(&live_deployment(&model(GPU_SPEC), 3));
    let m = settled(GPU_SPEC, &live_deployment(&model(GPU_SPEC), 3));
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        // A fresh operator does not know who wrote the live versions: one apply each (a no-op
        // for the API server) records them.
        api.get(SVC_PATH, Some(svc.clone())).await;
        api.apply_answering(SVC_PATH, &svc).await;
        api.get(DEPLOY_PATH, Some(live.clone())).await;
        api.apply_answering(DEPLOY_PATH, &live).await;
        // All replicas ready, status unchanged: no pod list, no patch, no event; and the
        // next pass only reads.
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(live)).await;
        api
    });
    for _ in 0..2 {
        let action = run_reconcile(m.clone(), ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(action, Action::requeue(SETTLED_REQUEUE));
    }
    let api = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn becoming_ready_patches_status_and_emits_ready() {
    let (ctx, mut api) = context();
    let starting = live_deployment(&model(GPU_SPEC), 0);
    let m = settled(GPU_SPEC, &starting);
    let ready = live_deployment(&m, 3);
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&ready))).await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        assert_eq!(status["status"]["readyReplicas"], 3);
        let ready = condition(&status, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("True"), &json!("ReplicasReady"))
        );
        assert_eq!(ready["message"], "3/3 replicas ready");
        assert_eq!(condition(&status, "Progressing")["reason"], "Complete");
        let reasons = [
            api.event().await["reason"].clone(),
            api.event().await["reason"].clone(),
        ];
        assert_eq!(reasons, [json!("Ready"), json!("RolledOut")]);
        api
    });
    run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn scale_reapplies_the_deployment_and_emits_scaled() {
    let (ctx, mut api) = context();
    let live = live_deployment(&model(GPU_SPEC), 3);
    let mut m = settled(GPU_SPEC, &live);
    m.spec.replicas = 5; // e.g. `kubectl scale glm qwen --replicas 5` or an HPA
    m.metadata.generation = Some(2);
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&live))).await;
        let dep = api.apply(DEPLOY_PATH, deploy_status(3, 3, 3)).await;
        assert_eq!(dep["spec"]["replicas"], 5);
        api.pods(vec![]).await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        assert_eq!(condition(&status, "Ready")["reason"], "PartiallyReady");
        assert_eq!(condition(&status, "Ready")["message"], "3/5 replicas ready");
        assert_eq!(condition(&status, "Progressing")["status"], "True");
        let event = api.event().await;
        assert_eq!(event["reason"], "Scaled");
        assert_eq!(event["note"], "Scaled from 3 to 5 replicas");
        api
    });
    run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn spec_update_rolls_out_new_pods() {
    let (ctx, mut api) = context();
    let live = live_deployment(&model(GPU_SPEC), 3);
    let mut m = settled(GPU_SPEC, &live);
    m.spec.image = Some("registry.local/glm:2".into());
    m.metadata.generation = Some(2);
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&live))).await;
        let dep = api.apply(DEPLOY_PATH, deploy_status(3, 0, 0)).await;
        assert_eq!(
            dep["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.local/glm:2"
        );
        assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
        api.pods(vec![]).await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        assert_eq!(condition(&status, "Progressing")["reason"], "RollingOut");
        assert_eq!(api.event().await["reason"], "RollingOut");
        api
    });
    run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

fn unschedulable_pod(name: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}})
}

#[tokio::test]
async fn unschedulable_pods_surface_in_ready_and_degraded() {
    let (ctx, mut api) = context();
    let live = live_deployment(&model(GPU_SPEC), 0);
    let m = settled(GPU_SPEC, &live);
    let svc = live_service(&m);
    let msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.";
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&live))).await;
        api.pods(vec![
            unschedulable_pod("qwen-b", msg),
            unschedulable_pod("qwen-a", msg),
        ])
        .await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        let ready = condition(&status, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("Unschedulable"))
        );
        assert_eq!(ready["message"], msg);
        let degraded = condition(&status, "Degraded");
        assert_eq!(
            (&degraded["status"], &degraded["reason"]),
            (&json!("True"), &json!("Unschedulable"))
        );
        let event = api.event().await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!("Unschedulable"))
        );
        assert_eq!(event["note"], msg);
        api
    });
    let action = run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(action, Action::requeue(UNSETTLED_REQUEUE));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn crash_looping_pods_are_failing() {
    let (ctx, mut api) = context();
    let live = live_deployment(&model(GPU_SPEC), 0);
    let m = settled(GPU_SPEC, &live);
    let svc = live_service(&m);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "qwen-x"}, "status": {"phase": "Running",
        "containerStatuses": [{"name": "inference", "image": "i", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}}}]}}))
    .unwrap_or_else(|e| panic!("{e}"));
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&live))).await;
        api.pods(vec![to_value(&pod)]).await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        let degraded = condition(&status, "Degraded");
        assert_eq!(degraded["reason"], "Failing");
        assert_eq!(
            degraded["message"],
            "pod qwen-x: container inference: CrashLoopBackOff: back-off 40s restarting failed container"
        );
        assert_eq!(api.event().await["reason"], "Failing");
        api
    });
    run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn deleted_model_is_left_to_garbage_collection() {
    let (ctx, api) = context();
    let mut m = model(GPU_SPEC);
    m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::now(),
    ));
    let action = run_reconcile(m, ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(action, Action::await_change());
    drop(ctx);
    // Children carry a controller ownerReference (checked in the create test): the API
    // server's garbage collector deletes them, the operator makes no call.
    api.done().await;
}

#[tokio::test]
async fn invalid_spec_is_reported_without_retry() {
    let (ctx, mut api) = context();
    let mut m = model(GPU_SPEC);
    m.spec.source = "s3://bucket/model".into();
    let server = tokio::spawn(async move {
        let status = api.apply(STATUS_PATH, json!({})).await;
        assert_eq!(condition(&status, "Ready")["reason"], "InvalidSpec");
        assert_eq!(condition(&status, "Degraded")["status"], "True");
        let event = api.event().await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!("InvalidSpec"))
        );
        api
    });
    let action = run_reconcile(m, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(action, Action::await_change());
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn conflict_fails_the_reconcile_and_backs_off() {
    let (ctx, mut api) = context();
    let m = model(GPU_SPEC);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, None).await;
        api.fail(Method::PATCH, SVC_PATH, StatusCode::CONFLICT)
            .await;
        api
    });
    let model = Arc::new(m);
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(model.clone(), ctx.clone()),
    )
    .await
    .unwrap_or_else(|_| panic!("hung"))
    .expect_err("409 must fail the reconcile");
    assert_eq!(err.metric_label(), "api_409");
    assert_eq!(
        error_policy(model.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(model.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        error_policy(model, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(20))
    );
    let failures = ctx.metrics.failures.with_label_values(&["api_409"]).get();
    assert_eq!(failures, 1);
    drop(ctx);
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn server_error_fails_the_reconcile() {
    let (ctx, mut api) = context();
    let m = model(GPU_SPEC);
    let server = tokio::spawn(async move {
        api.fail(Method::GET, SVC_PATH, StatusCode::INTERNAL_SERVER_ERROR)
            .await;
        api
    });
    let err = run_reconcile(m, ctx.clone())
        .await
        .expect_err("500 must fail the reconcile");
    assert_eq!(err.metric_label(), "api_500");
    assert_eq!(
        ctx.metrics
            .reconciliations
            .with_label_values(&["error"])
            .get(),
        1
    );
    drop(ctx);
    server.await.unwrap_or_else(|e| panic!("{e}")).done().await;
}

#[tokio::test]
async fn api_timeout_fails_the_reconcile() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let service = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(200))
        .service(service);
    let ctx = Arc::new(Context::new(
        Client::new(service, NS),
        "glm-operator-test".into(),
        Metrics::default(),
        BuildConfig::default(),
    ));
    // Accept the request and never answer it.
    let server = tokio::spawn(async move {
        let held = handle.next_request().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(held);
    });
    let m = Arc::new(model(GPU_SPEC));
    let err = tokio::time::timeout(Duration::from_secs(5), reconcile(m.clone(), ctx.clone()))
        .await
        .unwrap_or_else(|_| panic!("the client timeout did not fire"))
        .expect_err("a timeout must fail the reconcile");
    assert_eq!(err.metric_label(), "transport");
    assert_eq!(error_policy(m, &err, ctx), Action::requeue(BACKOFF_BASE));
    server.abort();
}

#[test]
fn backoff_doubles_and_caps() {
    let secs: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
    assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
}

#[tokio::test]
async fn success_resets_the_backoff() {
    let (ctx, api) = context();
    let mut m = model(GPU_SPEC);
    let key = ObjectRef::from_obj(&m);
    assert_eq!(ctx.next_backoff(key.clone()), Duration::from_secs(5));
    assert_eq!(ctx.next_backoff(key.clone()), Duration::from_secs(10));
    // A deleted model reconciles without API calls: the simplest successful pass.
    m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::now(),
    ));
    run_reconcile(m, ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ctx.next_backoff(key), Duration::from_secs(5));
    drop(ctx);
    api.done().await;
}

#[test]
fn status_status_roundtrips() {
    // The status type must deserialize what the operator writes (the gateway reads it).
    let m = model(GPU_SPEC);
    let s = status::compute(&m, None, None, &BuildConfig::default(), Timestamp::now());
    let back: GLMModelStatus =
        serde_json::from_value(to_value(&s)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, s);
    assert_eq!(back.conditions.len(), 3);
}

#[tokio::test]
async fn second_pass_with_a_cache_writes_nothing_either() {
    const SPEC: &str = "task: chat\nsource: hf://Qwen/Qwen2.5-0.5B\ngpus: 1\ncache: {size: 10Gi}\n";
    let (ctx, mut api) = fresh_context();
    let live = live_deployment(&model(SPEC), 1);
    let m = settled(SPEC, &live);
    let pvc = to_value(
        &builders::pvc(&m)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no pvc")),
    );
    let svc = live_service(&m);
    let live = to_value(&live);
    let mut pvc = pvc;
    pvc["metadata"]["resourceVersion"] = json!("300");
    let server = tokio::spawn(async move {
        api.get(PVC_PATH, Some(pvc.clone())).await;
        api.apply_answering(PVC_PATH, &pvc).await;
        api.get(SVC_PATH, Some(svc.clone())).await;
        api.apply_answering(SVC_PATH, &svc).await;
        api.get(DEPLOY_PATH, Some(live.clone())).await;
        api.apply_answering(DEPLOY_PATH, &live).await;
        api.get(PVC_PATH, Some(pvc)).await;
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(live)).await;
        api
    });
    for _ in 0..2 {
        let action = run_reconcile(m.clone(), ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(action, Action::requeue(SETTLED_REQUEUE));
    }
    assert_eq!(
        ctx.metrics
            .applies
            .with_label_values(&["PersistentVolumeClaim"])
            .get(),
        1,
        "only the first pass applies"
    );
    let api = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn conflict_on_the_status_patch_fails_and_retries_later() {
    let (ctx, mut api) = context();
    let starting = live_deployment(&model(GPU_SPEC), 0);
    let m = settled(GPU_SPEC, &starting);
    let ready = live_deployment(&m, 3);
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&ready))).await;
        api.fail(Method::PATCH, STATUS_PATH, StatusCode::CONFLICT)
            .await;
        // No Event for a transition that was not recorded: the retry will publish it.
        api
    });
    let model = Arc::new(m);
    let err = run_reconcile((*model).clone(), ctx.clone())
        .await
        .expect_err("a 409 on the status must fail the reconcile");
    assert_eq!(err.metric_label(), "api_409");
    assert_eq!(
        error_policy(model, &err, ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );
    let api = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(ctx);
    api.done().await;
}

mod apply;
