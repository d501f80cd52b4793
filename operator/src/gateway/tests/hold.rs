//! Scale from zero and request holding, against a fake API server on loopback (a real kube
//! client speaking HTTP to it) and a fake model pod.

use axum::{extract::Path as UrlPath, http::Method};

use super::*;
use crate::gateway::hold::KubeScaler;

/// What the fake API server saw: method, path, content type, body.
type Seen = (Method, String, String, Value);

/// An API server answering the scale subresource; `status` is its answer.
async fn fake_apiserver(status: StatusCode) -> (kube::Client, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/apis/kubeglm.io/v1alpha1/namespaces/{ns}/glmmodels/{name}/scale",
        // A model at zero: autoscaling/v1 omits `spec.replicas` when it is 0.
        axum::routing::get(
            |UrlPath((ns, name)): UrlPath<(String, String)>| async move {
                Json(json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": "41"},
                "spec": {}, "status": {"replicas": 0}}))
            },
        )
        .patch(
            move |UrlPath((ns, name)): UrlPath<(String, String)>,
                  headers: HeaderMap,
                  body: Bytes| {
                let tx = tx.clone();
                async move {
                    let kind = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let _ = tx.send((Method::PATCH, format!("{ns}/{name}"), kind, body));
                    let scale = json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"replicas": 1}, "status": {"replicas": 0}});
                    let answer = if status.is_success() {
                        scale
                    } else {
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": "denied", "reason": "Forbidden", "code": status.as_u16()})
                    };
                    (status, Json(answer))
                }
            },
        ),
    );
    let addr = serve(app).await;
    let url: http::Uri = format!("http://{addr}")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = kube::Client::try_from(kube::Config::new(url)).unwrap_or_else(|e| panic!("{e}"));
    (client, rx)
}

struct Cold {
    gateway: String,
    _table: watch::Sender<Arc<RoutingTable>>,
    index: watch::Sender<Arc<EndpointIndex>>,
    state: GatewayState,
    pod: SocketAddr,
}

/// A gateway where GLMModel ml/cold is scaled to zero (no pod) and ml/warm is not ready with one
/// replica starting; `pod` is where their pods will listen.
async fn cold_gateway(scaler: Option<kube::Client>, hold: Duration, max_held: usize) -> Cold {
    let (pod, _chunks, _seen) = chat_upstream().await;
    let mut cold = record(
        "cold",
        "cold-model",
        &[],
        "http://cold.ml.svc:8200".into(),
        false,
    );
    cold.replicas = 0;
    let warm = record(
        "warm",
        "warm-model",
        &[],
        "http://warm.ml.svc:8200".into(),
        false,
    );
    let (table, table_rx) = watch::channel(Arc::new(RoutingTable::build(&[cold, warm])));
    let (index, index_rx) = watch::channel(Arc::new(EndpointIndex::default()));
    let scaler = scaler.map(|c| Arc::new(KubeScaler(c)) as Arc<dyn crate::gateway::hold::Scaler>);
    let state = GatewayState::new(
        table_rx,
        GatewayConfig::default()
            .upstream_client()
            .unwrap_or_else(|e| panic!("{e}")),
        GatewayMetrics::new().unwrap_or_else(|e| panic!("{e}")),
        1 << 20,
        Readiness::synced(),
    )
    .with_endpoints(index_rx)
    .with_holder(Holder::new(max_held, hold, scaler));
    let addr = serve(router(state.clone())).await;
    Cold {
        gateway: format!("http://{addr}"),
        _table: table,
        index,
        state,
        pod,
    }
}

impl Cold {
    fn chat(
        &self,
        model: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<(u16, HeaderMap, Value)>> {
        let url = format!("{}/v1/chat/completions", self.gateway);
        let body = json!({"model": model, "stream": false, "messages": []});
        tokio::spawn(async move {
            let r = reqwest::Client::new().post(url).json(&body).send().await?;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            Ok((status, headers, r.json().await.unwrap_or_default()))
        })
    }

    fn metric(&self, series: &str) -> f64 {
        let text = self.state.metrics().render().unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    async fn until_metric(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while self.metric(series) != value {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never became {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pod_ready(&self, name: &str) {
        self.index
            .send_replace(Arc::new(pods(&[(name, &[self.pod])])));
    }
}

const COLD_HELD: &str = r#"glm_gateway_model_held{model="cold",namespace="ml"}"#;

#[tokio::test]
async fn a_request_for_a_model_at_zero_scales_it_and_completes_once_a_pod_is_ready() {
    let (client, mut apiserver) = fake_apiserver(StatusCode::OK).await;
    let cold = cold_gateway(Some(client), Duration::from_secs(30), 8).await;
    let request = cold.chat("cold-model");
    let (method, target, kind, body) = tokio::time::timeout(TIMEOUT, apiserver.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no scale patch reached the API server"));
    assert_eq!((method, target.as_str()), (Method::PATCH, "ml/cold"));
    assert_eq!(kind, "application/merge-patch+json");
    // Only 0 -> 1: the read version is a precondition, so the patch fails (harmlessly, 409) if
    // anyone scaled the model meanwhile.
    assert_eq!(
        body,
        json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": 1}})
    );
    cold.until_metric(COLD_HELD, 1.0).await;
    // A second held request does not patch again.
    let second = cold.chat("cold-model");
    cold.until_metric(COLD_HELD, 2.0).await;
    assert!(!request.is_finished());

    cold.pod_ready("cold");
    for request in [request, second] {
        let (status, _, body) = request
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], "cold-model");
    }
    assert_eq!(cold.metric(COLD_HELD), 0.0);
    assert!(apiserver.try_recv().is_err(), "patched twice");
    assert_eq!(
        cold.metric(
            r#"glm_gateway_scale_from_zero_total{model="cold",namespace="ml",outcome="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        cold.metric(r#"glm_gateway_model_requests_total{model="cold",namespace="ml"}"#),
        2.0
    );
}

#[tokio::test]
async fn a_held_request_times_out_with_retry_after_and_a_model_starting_is_not_patched() {
    let (client, mut apiserver) = fake_apiserver(StatusCode::FORBIDDEN).await;
    let cold = cold_gateway(Some(client), Duration::from_millis(300), 8).await;
    let (status, headers, body) = cold
        .chat("warm-model")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "10");
    assert_eq!(body["error"]["code"], "model_not_ready");
    assert!(
        apiserver.try_recv().is_err(),
        "replicas is 1: nothing to scale"
    );

    // A failed patch (RBAC) leaves the request held until its timeout, and is counted.
    let (status, ..) = cold
        .chat("cold-model")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 503);
    assert!(apiserver.recv().await.is_some());
    cold.until_metric(
        r#"glm_gateway_scale_from_zero_total{model="cold",namespace="ml",outcome="error"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn held_requests_are_bounded_and_a_leaving_client_is_dropped() {
    let cold = cold_gateway(None, Duration::from_secs(30), 1).await;
    let held = cold.chat("cold-model");
    cold.until_metric(COLD_HELD, 1.0).await;
    let (status, headers, body) = cold
        .chat("cold-model")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_held_requests");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("--gateway-max-held"));
    assert_eq!(headers["retry-after"], "10");

    // The held client goes away: its slot and the gauge are freed at once.
    held.abort();
    cold.until_metric(COLD_HELD, 0.0).await;
    let again = cold.chat("cold-model");
    cold.until_metric(COLD_HELD, 1.0).await;
    cold.pod_ready("cold");
    let (status, ..) = again
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200);
}
