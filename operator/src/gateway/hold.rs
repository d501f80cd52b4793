//! Holding requests while a model has no ready pod, and scaling a model from zero.
//!
//! A request for a model without a ready pod waits here until the EndpointSlice index shows one,
//! up to the model's hold timeout. If the model is scaled to zero (`spec.replicas == 0`) the
//! first such request patches its `scale` subresource 0 -> 1. Held requests are bounded in number
//! (`--gateway-max-held`); a client that disconnects drops its handler future, which releases
//! its slot and the held gauge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use glm_crds::GLMModel;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::{
    endpoints::EndpointIndex,
    error::GatewayError,
    metrics::{GatewayMetrics, ModelLabels},
    routing::Route,
};

/// Scale patches for one model are at least this far apart, however many requests wait.
const SCALE_PATCH_INTERVAL: Duration = Duration::from_secs(10);

/// Scales a GLMModel from zero to one replica.
pub trait Scaler: Send + Sync {
    fn scale_from_zero(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// The `scale` subresource through the API server: read it, and only if it says 0 replicas
/// (`autoscaling/v1` omits a zero `spec.replicas`) write 1 with its `resourceVersion` as a
/// precondition, so it never undoes a larger value an autoscaler or a user set meanwhile
/// (that write fails with 409, which is fine: the model is being scaled anyway).
pub struct KubeScaler(pub kube::Client);

impl Scaler for KubeScaler {
    fn scale_from_zero(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<(), String>> {
        let api: Api<GLMModel> = Api::namespaced(self.0.clone(), namespace);
        let name = name.to_owned();
        Box::pin(async move {
            let scale = api.get_scale(&name).await.map_err(|e| e.to_string())?;
            if scale.spec.and_then(|s| s.replicas).unwrap_or(0) != 0 {
                return Ok(());
            }
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": scale.metadata.resource_version},
                "spec": {"replicas": 1},
            });
            match api
                .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                Err(err) => Err(err.to_string()),
            }
        })
    }
}

/// Where requests wait for pods.
#[derive(Clone)]
pub struct Holder {
    slots: Arc<Semaphore>,
    max_held: usize,
    default_timeout: Duration,
    scaler: Option<Arc<dyn Scaler>>,
    last_patch: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Holder {
    pub fn new(
        max_held: usize,
        default_timeout: Duration,
        scaler: Option<Arc<dyn Scaler>>,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_held)),
            max_held,
            default_timeout,
            scaler,
            last_patch: Arc::default(),
        }
    }

    /// Waits until `route` has a ready pod and returns the addresses, or fails with 429 (too
    /// many held) or 503 (hold timeout).
    pub async fn wait_for_pods(
        &self,
        route: &Route,
        index: &mut watch::Receiver<Arc<EndpointIndex>>,
        metrics: &GatewayMetrics,
    ) -> Result<Vec<String>, GatewayError> {
        let key = route.service_key();
        let ready = index.borrow_and_update().ready(&key).to_vec();
        if !ready.is_empty() {
            return Ok(ready);
        }
        let _slot = self.slot()?;
        let labels = labels(route);
        let _held = metrics.held(&labels);
        if route.replicas == 0 {
            self.trigger_scale(route, metrics);
        }
        let timeout = route.settings.hold_timeout.unwrap_or(self.default_timeout);
        tracing::debug!(model = %route.source, ?timeout, "no ready pod: holding the request");
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if index.changed().await.is_err() {
                    // The index is gone (shutdown): nothing will ever become ready.
                    std::future::pending::<()>().await;
                }
                let ready = index.borrow_and_update().ready(&key).to_vec();
                if !ready.is_empty() {
                    return ready;
                }
            }
        })
        .await;
        waited.map_err(|_| GatewayError::HoldTimeout {
            model: route.served_name.clone(),
            waited: timeout,
        })
    }

    fn slot(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| GatewayError::TooManyHeld(self.max_held))
    }

    /// Patches the scale in a task of its own: a held client that leaves must not abort it.
    fn trigger_scale(&self, route: &Route, metrics: &GatewayMetrics) {
        let Some(scaler) = self.scaler.clone() else {
            return;
        };
        {
            let mut last = self
                .last_patch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if last
                .get(&route.source)
                .is_some_and(|at| now.duration_since(*at) < SCALE_PATCH_INTERVAL)
            {
                return;
            }
            last.insert(route.source.clone(), now);
        }
        let labels = labels(route);
        let metrics = metrics.clone();
        let source = route.source.clone();
        let patch = scaler.scale_from_zero(&route.namespace, &route.name);
        tokio::spawn(async move {
            match patch.await {
                Ok(()) => {
                    tracing::info!(model = %source, "scaled from zero to 1 replica");
                    metrics.scale_up(&labels, "ok");
                }
                Err(err) => {
                    tracing::warn!(model = %source, error = %err, "scaling from zero failed");
                    metrics.scale_up(&labels, "error");
                }
            }
        });
    }
}

pub fn labels(route: &Route) -> ModelLabels {
    ModelLabels {
        namespace: route.namespace.clone(),
        model: route.name.clone(),
    }
}
