//! What makes the gateway safe to put behind a Service: it reports ready only once it knows the
//! ready models (a gateway with an empty table would answer 404 to every request of a rollout),
//! and on SIGTERM it reports not ready, keeps serving while endpoints are withdrawn, then drains
//! in-flight requests (streams included) up to a deadline.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

/// What must be listed once before the gateway is ready.
const MODELS: u8 = 1;
const ENDPOINTS: u8 = 2;
const KEYS: u8 = 4;

/// Readiness of one gateway process: synced with the cluster (GLMModels, EndpointSlices and, when
/// API keys are on, their Secret) and not shutting down.
#[derive(Clone, Debug)]
pub struct Readiness {
    required: Arc<AtomicU8>,
    synced: Arc<AtomicU8>,
    draining: Arc<AtomicBool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            required: Arc::new(AtomicU8::new(MODELS | ENDPOINTS)),
            synced: Arc::default(),
            draining: Arc::default(),
        }
    }
}

impl Readiness {
    /// Ready from the start: for routing data that does not come from a watch.
    pub fn synced() -> Self {
        let readiness = Self::default();
        readiness.mark_synced();
        readiness
    }

    /// Everything is listed (tests and static tables).
    pub fn mark_synced(&self) {
        self.synced
            .store(MODELS | ENDPOINTS | KEYS, Ordering::SeqCst);
    }

    /// The first full list of GLMModels is in the routing table.
    pub fn mark_models_synced(&self) {
        self.synced.fetch_or(MODELS, Ordering::SeqCst);
    }

    /// The first full list of EndpointSlices is in the endpoint index.
    pub fn mark_endpoints_synced(&self) {
        self.synced.fetch_or(ENDPOINTS, Ordering::SeqCst);
    }

    pub fn mark_keys_synced(&self) {
        self.synced.fetch_or(KEYS, Ordering::SeqCst);
    }

    /// API keys are on: wait for their Secret too.
    pub fn require_keys(&self) {
        self.required.fetch_or(KEYS, Ordering::SeqCst);
    }

    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        let required = self.required.load(Ordering::SeqCst);
        let missing = required & !self.synced.load(Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            Some("draining")
        } else if missing & MODELS != 0 {
            Some("syncing GLMModels")
        } else if missing & ENDPOINTS != 0 {
            Some("syncing EndpointSlices")
        } else if missing & KEYS != 0 {
            Some("syncing the API key Secret")
        } else {
            None
        }
    }
}

/// How a gateway stops.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    /// Serving on after SIGTERM with readiness failing, while the endpoint is withdrawn from the
    /// Service (kube-proxy and ingress controllers lag behind the pod's deletion).
    pub delay: Duration,
    /// Longest wait for in-flight requests once the listener closed; then they are cut.
    pub timeout: Duration,
}

/// Serves `app` until `shutdown`, then drains as [`Drain`] says.
pub async fn serve_with_drain(
    listener: TcpListener,
    app: Router,
    readiness: Readiness,
    drain: Drain,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (closing_tx, closing_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        readiness.mark_draining();
        tracing::info!(delay = ?drain.delay, "shutdown: readiness failing, still serving");
        tokio::time::sleep(drain.delay).await;
        tracing::info!(timeout = ?drain.timeout, "shutdown: listener closed, draining in-flight requests");
        let _ = closing_tx.send(());
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        if closing_rx.await.is_ok() {
            tokio::time::sleep(drain.timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served,
        () = deadline => {
            tracing::warn!(timeout = ?drain.timeout, "drain deadline passed: cutting the requests still in flight");
            Ok(())
        }
    }
}

/// Test-only or out-of-cluster address overrides, like curl's `--connect-to`: an endpoint whose
/// `host:port` is a key is reached at the value instead (the URL path is kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectTo(Vec<(String, String)>);

impl ConnectTo {
    /// Parses `FROM_HOST:PORT=TO_HOST:PORT` entries.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
            let (from, to) = entry
                .split_once('=')
                .filter(|(f, t)| is_authority(f) && is_authority(t))
                .ok_or_else(|| {
                    format!("--gateway-connect-to {entry:?}: expected HOST:PORT=HOST:PORT")
                })?;
            pairs.push((from.trim().to_owned(), to.trim().to_owned()));
        }
        Ok(Self(pairs))
    }

    /// `endpoint` with its authority replaced when an override names it.
    pub fn apply(&self, endpoint: &str) -> String {
        for (from, to) in &self.0 {
            for scheme in ["http://", "https://"] {
                let prefix = format!("{scheme}{from}");
                if let Some(rest) = endpoint.strip_prefix(&prefix) {
                    if rest.is_empty() || rest.starts_with('/') {
                        return format!("{scheme}{to}{rest}");
                    }
                }
            }
        }
        endpoint.to_owned()
    }
}

fn is_authority(s: &str) -> bool {
    let s = s.trim();
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_to_rewrites_only_the_named_authority() {
        let c = ConnectTo::parse(&["minilm.ai.svc.cluster.local:8200=127.0.0.1:41000".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.apply("http://minilm.ai.svc.cluster.local:8200"),
            "http://127.0.0.1:41000"
        );
        assert_eq!(
            c.apply("http://minilm.ai.svc.cluster.local:8200/v1"),
            "http://127.0.0.1:41000/v1"
        );
        // A longer host or another port is another endpoint.
        for other in [
            "http://minilm.ai.svc.cluster.local:82000",
            "http://minilm.ai.svc.cluster.local:8201",
            "http://xminilm.ai.svc.cluster.local:8200",
        ] {
            assert_eq!(c.apply(other), other);
        }
    }

    #[test]
    fn connect_to_refuses_malformed_entries() {
        for bad in ["a:1", "a=b", "a:1=b", "a:x=b:2", "=b:2"] {
            let err = ConnectTo::parse(&[bad.into()]).expect_err(bad);
            assert!(err.contains("HOST:PORT=HOST:PORT"), "{err}");
        }
        assert_eq!(ConnectTo::parse(&[]), Ok(ConnectTo::default()));
    }

    #[test]
    fn readiness_needs_a_sync_and_ends_with_draining() {
        let r = Readiness::default();
        assert_eq!(r.not_ready_reason(), Some("syncing GLMModels"));
        r.mark_models_synced();
        assert_eq!(r.not_ready_reason(), Some("syncing EndpointSlices"));
        r.mark_endpoints_synced();
        assert_eq!(r.not_ready_reason(), None);
        r.require_keys();
        assert_eq!(r.not_ready_reason(), Some("syncing the API key Secret"));
        r.mark_keys_synced();
        assert_eq!(r.not_ready_reason(), None);
        r.mark_draining();
        assert_eq!(r.not_ready_reason(), Some("draining"));
    }
}
