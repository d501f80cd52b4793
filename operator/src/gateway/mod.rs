//! The OpenAI-compatible gateway: one in-cluster address (`Service glm-gateway`) for every ready
//! GLMModel.
//!
//! - [`watch`] keeps a [`routing::RoutingTable`] of models (served name and aliases -> GLMModel)
//!   from a reflector over GLMModel objects; [`endpoints`] keeps the ready pods of each model's
//!   Service from a reflector over EndpointSlices;
//! - [`proxy`] serves `/v1/models` and forwards model requests to a pod of the model named by
//!   their `model` field ([`balancer`]: least load or prefix hash), holding them while no pod is
//!   ready and scaling from zero ([`hold`]), retrying busy or unreachable pods ([`upstream`]),
//!   streaming responses (SSE) through unbuffered; [`auth`] checks optional API keys.

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Context;
use glm_crds::GLMModel;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::scope::Scope;

pub mod auth;
pub mod balancer;
pub mod endpoints;
pub mod error;
pub mod hold;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod upstream;
pub mod watch;

#[cfg(test)]
mod tests;

pub use lifecycle::{ConnectTo, Drain, Readiness};
pub use metrics::GatewayMetrics;
pub use proxy::{router, GatewayState};
pub use routing::RoutingTable;

/// Gateway flags; every flag has an environment twin. Their defaults are [`Default`]'s.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayConfig {
    /// Port of the OpenAI-compatible gateway.
    #[arg(
        long = "gateway-port",
        env = "GLM_GATEWAY_PORT",
        default_value_t = GatewayConfig::default().gateway_port
    )]
    pub gateway_port: u16,

    /// Address the gateway binds to.
    #[arg(
        long = "gateway-bind-address",
        env = "GLM_GATEWAY_BIND_ADDRESS",
        default_value_t = GatewayConfig::default().gateway_bind_address
    )]
    pub gateway_bind_address: IpAddr,

    /// Route only GLMModels of this namespace (default: all namespaces).
    #[arg(long = "gateway-namespace", env = "GLM_GATEWAY_NAMESPACE")]
    pub gateway_namespace: Option<String>,

    /// Seconds to wait for a TCP connection to a model's endpoint.
    #[arg(
        long = "gateway-connect-timeout",
        env = "GLM_GATEWAY_CONNECT_TIMEOUT",
        default_value_t = GatewayConfig::default().gateway_connect_timeout_secs
    )]
    pub gateway_connect_timeout_secs: u64,

    /// Seconds an upstream may stay silent (no header, no byte) before the request fails. Long
    /// generations are fine as long as tokens keep flowing.
    #[arg(
        long = "gateway-read-timeout",
        env = "GLM_GATEWAY_READ_TIMEOUT",
        default_value_t = GatewayConfig::default().gateway_read_timeout_secs
    )]
    pub gateway_read_timeout_secs: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long = "gateway-max-body-bytes", env = "GLM_GATEWAY_MAX_BODY_BYTES", default_value_t = GatewayConfig::default().gateway_max_body_bytes)]
    pub gateway_max_body_bytes: usize,

    /// Seconds to keep serving after SIGTERM with /ready failing, while the Service withdraws
    /// this pod.
    #[arg(
        long = "gateway-shutdown-delay",
        env = "GLM_GATEWAY_SHUTDOWN_DELAY",
        default_value_t = GatewayConfig::default().gateway_shutdown_delay_secs
    )]
    pub gateway_shutdown_delay_secs: u64,

    /// Seconds in-flight requests (streams included) may take to finish once the listener
    /// closed; the rest are cut. Keep the pod's terminationGracePeriodSeconds above
    /// shutdown delay + drain timeout.
    #[arg(
        long = "gateway-drain-timeout",
        env = "GLM_GATEWAY_DRAIN_TIMEOUT",
        default_value_t = GatewayConfig::default().gateway_drain_timeout_secs
    )]
    pub gateway_drain_timeout_secs: u64,

    /// Reach an endpoint at another address: `HOST:PORT=HOST:PORT`, comma-separated (like curl's
    /// --connect-to). For a gateway outside the cluster (tests, port-forwards); empty in-cluster.
    #[arg(
        long = "gateway-connect-to",
        env = "GLM_GATEWAY_CONNECT_TO",
        value_delimiter = ','
    )]
    pub gateway_connect_to: Vec<String>,

    /// Most pods one request is sent to: a failed connection or a 503/429 answer (before any
    /// byte reached the client) moves it to another ready pod, up to this many attempts.
    #[arg(
        long = "gateway-max-attempts",
        env = "GLM_GATEWAY_MAX_ATTEMPTS",
        default_value_t = GatewayConfig::default().gateway_max_attempts,
        value_parser = clap::value_parser!(u16).range(1..=100)
    )]
    pub gateway_max_attempts: u16,

    /// Seconds a request waits for a ready pod of its model (scale from zero, rollouts) before
    /// 503 with Retry-After; a GLMModel's spec.routing.holdTimeoutSeconds overrides it.
    #[arg(
        long = "gateway-hold-timeout",
        env = "GLM_GATEWAY_HOLD_TIMEOUT",
        default_value_t = GatewayConfig::default().gateway_hold_timeout_secs
    )]
    pub gateway_hold_timeout_secs: u64,

    /// Requests held at once waiting for pods, over all models; past it, 429.
    #[arg(
        long = "gateway-max-held",
        env = "GLM_GATEWAY_MAX_HELD",
        default_value_t = GatewayConfig::default().gateway_max_held
    )]
    pub gateway_max_held: usize,

    /// `NAMESPACE/NAME` of a Secret whose data entries are API keys (entry name = key name in
    /// metrics). Unset: no authentication.
    #[arg(long = "gateway-api-keys-secret", env = "GLM_GATEWAY_API_KEYS_SECRET")]
    pub gateway_api_keys_secret: Option<String>,
}

/// The one place the gateway's defaults are written: the flags and [`GatewayState::new`] read them.
impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_port: 8080,
            gateway_bind_address: IpAddr::from([0, 0, 0, 0]),
            gateway_namespace: None,
            gateway_connect_timeout_secs: 5,
            gateway_read_timeout_secs: 600,
            gateway_max_body_bytes: 32 * 1024 * 1024,
            gateway_shutdown_delay_secs: 5,
            gateway_drain_timeout_secs: 300,
            gateway_connect_to: Vec::new(),
            gateway_max_attempts: 3,
            gateway_hold_timeout_secs: 300,
            gateway_max_held: 1024,
            gateway_api_keys_secret: None,
        }
    }
}

impl GatewayConfig {
    /// The HTTP client used towards model endpoints.
    pub fn upstream_client(&self) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(self.gateway_connect_timeout_secs))
            // A read timeout, not a total one: a total timeout would cut long SSE streams.
            .read_timeout(Duration::from_secs(self.gateway_read_timeout_secs))
            // Endpoints are in-cluster Services: a proxy from the environment would be wrong.
            .no_proxy()
            .build()
    }
}

/// Runs the gateway until `shutdown` resolves, then drains in-flight requests (see
/// [`lifecycle`]).
pub async fn run(
    client: kube::Client,
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let connect_to = ConnectTo::parse(&cfg.gateway_connect_to).map_err(anyhow::Error::msg)?;
    let metrics = GatewayMetrics::new().context("registering gateway metrics")?;
    let readiness = Readiness::default();
    let mut watchers = Vec::new();

    let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(RoutingTable::default()));
    let scope = Scope::new(cfg.gateway_namespace.clone());
    let models: Api<GLMModel> = scope.api(&client);
    watchers.push(tokio::spawn(watch::maintain_table(
        models,
        table_tx,
        metrics.clone(),
        readiness.clone(),
    )));
    let (index_tx, index_rx) = tokio::sync::watch::channel(Arc::default());
    let slices: Api<EndpointSlice> = scope.api(&client);
    watchers.push(tokio::spawn(endpoints::maintain_index(
        slices,
        index_tx,
        metrics.clone(),
        readiness.clone(),
    )));
    let api_keys = match cfg.gateway_api_keys_secret.as_deref() {
        None => auth::ApiKeys::disabled(),
        Some(raw) => {
            let (namespace, name) = auth::parse_secret_ref(raw).map_err(anyhow::Error::msg)?;
            readiness.require_keys();
            let (keys_tx, keys_rx) = tokio::sync::watch::channel(Arc::default());
            let secrets = Api::namespaced(client.clone(), &namespace);
            watchers.push(tokio::spawn(auth::maintain_keys(
                secrets,
                name,
                keys_tx,
                metrics.clone(),
                readiness.clone(),
            )));
            auth::ApiKeys::watched(keys_rx)
        }
    };

    let upstream = cfg
        .upstream_client()
        .context("building the upstream HTTP client")?;
    let holder = hold::Holder::new(
        cfg.gateway_max_held,
        Duration::from_secs(cfg.gateway_hold_timeout_secs),
        Some(Arc::new(hold::KubeScaler(client))),
    );
    let state = GatewayState::new(
        table_rx,
        upstream,
        metrics,
        cfg.gateway_max_body_bytes,
        readiness.clone(),
    )
    .with_connect_to(connect_to)
    .with_endpoints(index_rx)
    .with_holder(holder)
    .with_max_attempts(usize::from(cfg.gateway_max_attempts))
    .with_api_keys(api_keys);
    let app = router(state).layer(TraceLayer::new_for_http());

    let address = (cfg.gateway_bind_address, cfg.gateway_port);
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the gateway to {}:{}", address.0, address.1))?;
    tracing::info!(address = %listener.local_addr()?, namespace = ?scope.namespace, "gateway listening");
    let drain = Drain {
        delay: Duration::from_secs(cfg.gateway_shutdown_delay_secs),
        timeout: Duration::from_secs(cfg.gateway_drain_timeout_secs),
    };
    let served = lifecycle::serve_with_drain(listener, app, readiness, drain, shutdown).await;
    for watcher in watchers {
        watcher.abort();
    }
    served.context("gateway server failed")
}
