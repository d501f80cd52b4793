//! `/metrics` and `/health` of the operator itself.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

async fn render_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "operator metrics/health listening");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(metrics: &Metrics, path: &str) -> (StatusCode, String) {
        let request = Request::get(path)
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        let response = router(metrics.clone())
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn health_answers_ok() {
        assert_eq!(
            get(&Metrics::default(), "/health").await,
            (StatusCode::OK, "ok".into())
        );
    }

    #[tokio::test]
    async fn metrics_count_reconciles_by_result_and_error() {
        let metrics = Metrics::default();
        metrics.reconcile_timer().finish(&Ok::<(), _>(()));
        let conflict = kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        );
        metrics
            .reconcile_timer()
            .finish(&Err::<(), _>(crate::error::Error::Kube(conflict)));
        metrics.leader.set(1);
        let (status, text) = get(&metrics, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for line in [
            r#"glm_operator_reconciliations_total{result="ok"} 1"#,
            r#"glm_operator_reconciliations_total{result="error"} 1"#,
            r#"glm_operator_reconcile_errors_total{error="api_409"} 1"#,
            r#"glm_operator_reconcile_duration_seconds_count{result="ok"} 1"#,
            "glm_operator_leader 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
