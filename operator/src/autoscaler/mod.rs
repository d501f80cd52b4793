//! The autoscaler: GLMModels with `spec.autoscaling` get the replicas their request load needs.
//!
//! Runs beside the controller on the leader only. Every `--autoscaler-interval` it reads the
//! models from a watch-backed store, scrapes every gateway replica's `/metrics` ([`scrape`]),
//! decides per model ([`decide`], pure) and applies a change through the scale subresource with
//! the store's resourceVersion as precondition: a scale written meanwhile (the gateway's 0 -> 1
//! for a held request, a user's `kubectl scale`) wins, and the next tick decides again.
//! Decisions become Events (`ScaledUp`, `ScaledDown`) and `status.autoscaling`, written by its
//! own field manager so the controller's status writes leave them alone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use glm_crds::GLMModel;
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::scope::Scope;

pub mod decide;
pub mod discovery;
mod effect;
pub mod scrape;

#[cfg(test)]
mod tests;

use decide::{Bounds, History};
use discovery::{Discovery, Target};
use scrape::{Counters, ModelKey, ScrapeError, Tick};

/// Largest `/metrics` page read from a gateway replica.
const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// Autoscaler flags (`glm-operator controller`); every flag has an environment twin.
#[derive(clap::Args, Clone, Debug)]
pub struct AutoscalerArgs {
    /// Run the autoscaler for GLMModels that set `spec.autoscaling` (on the leader, beside the
    /// controller).
    #[arg(long = "autoscaler", env = "GLM_AUTOSCALER", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Seconds between two scrapes and decisions.
    #[arg(
        long = "autoscaler-interval",
        env = "GLM_AUTOSCALER_INTERVAL",
        default_value_t = 10
    )]
    pub interval_secs: u64,
    /// Seconds of demand samples averaged into a decision.
    #[arg(
        long = "autoscaler-window",
        env = "GLM_AUTOSCALER_WINDOW",
        default_value_t = 60
    )]
    pub window_secs: u64,
    /// Seconds a gateway replica gets to answer a scrape (at most the interval); one that does
    /// not is skipped for that tick and counted in glm_operator_autoscaler_scrape_errors_total.
    #[arg(
        long = "autoscaler-scrape-timeout",
        env = "GLM_AUTOSCALER_SCRAPE_TIMEOUT",
        default_value_t = 5
    )]
    pub scrape_timeout_secs: u64,
    /// The gateway Service whose EndpointSlices list the replicas to scrape; empty: none (use
    /// --autoscaler-gateway-urls).
    #[arg(
        long = "autoscaler-gateway-service",
        env = "GLM_AUTOSCALER_GATEWAY_SERVICE",
        default_value = "glm-gateway"
    )]
    pub gateway_service: String,
    /// Namespace of that Service (default: the operator's own, POD_NAMESPACE).
    #[arg(
        long = "autoscaler-gateway-namespace",
        env = "GLM_AUTOSCALER_GATEWAY_NAMESPACE"
    )]
    pub gateway_namespace: Option<String>,
    /// Further gateway metrics URLs to scrape, comma-separated (`http://host:port/metrics`):
    /// an operator outside the cluster, tests.
    #[arg(
        long = "autoscaler-gateway-urls",
        env = "GLM_AUTOSCALER_GATEWAY_URLS",
        value_delimiter = ','
    )]
    pub gateway_urls: Vec<String>,
}

impl AutoscalerArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.interval_secs >= 1,
            "--autoscaler-interval must be at least 1 second"
        );
        anyhow::ensure!(
            (1..=self.interval_secs).contains(&self.scrape_timeout_secs),
            "--autoscaler-scrape-timeout ({}) must be between 1 and --autoscaler-interval ({})",
            self.scrape_timeout_secs,
            self.interval_secs
        );
        anyhow::ensure!(
            self.window_secs >= 1,
            "--autoscaler-window must be at least 1 second"
        );
        for url in self.gateway_urls.iter().filter(|u| !u.is_empty()) {
            reqwest::Url::parse(url)
                .with_context(|| format!("--autoscaler-gateway-urls: {url:?} is not a URL"))?;
        }
        Ok(())
    }
}

/// Everything one autoscaler run uses.
pub struct Autoscaler {
    client: Client,
    args: AutoscalerArgs,
    discovery: Discovery,
    http: reqwest::Client,
    metrics: Metrics,
    effect: effect::Effect,
    histories: HashMap<ModelKey, History>,
    counters: Counters,
}

impl Autoscaler {
    /// `default_namespace`: where the gateway Service is when the flags name no namespace.
    pub fn new(
        client: Client,
        args: AutoscalerArgs,
        default_namespace: &str,
        reporter: Reporter,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        args.validate()?;
        let mut args = args;
        args.gateway_urls.retain(|u| !u.is_empty());
        let namespace = args
            .gateway_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_owned());
        let discovery = Discovery::new(
            client.clone(),
            &namespace,
            Some(args.gateway_service.as_str()),
            args.gateway_urls.clone(),
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.scrape_timeout_secs))
            .no_proxy()
            .build()
            .context("building the scrape HTTP client")?;
        Ok(Self {
            effect: effect::Effect::new(client.clone(), reporter, metrics.clone()),
            client,
            args,
            discovery,
            http,
            metrics,
            histories: HashMap::new(),
            counters: Counters::default(),
        })
    }

    /// Runs until `shutdown` resolves (or the future is dropped, as on losing the Lease).
    pub async fn run(
        mut self,
        scope: Scope,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        if !self.args.enabled {
            shutdown.await;
            return Ok(());
        }
        let api: Api<GLMModel> = scope.api(&self.client);
        let (store, writer) = reflector::store();
        let feed = reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .applied_objects()
            .for_each(|_| async {});
        tokio::pin!(feed, shutdown);
        let mut ticks = tokio::time::interval(Duration::from_secs(self.args.interval_secs));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(
            interval_secs = self.args.interval_secs,
            window_secs = self.args.window_secs,
            gateway_service = %self.args.gateway_service,
            gateway_urls = ?self.args.gateway_urls,
            "autoscaler starting"
        );
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = &mut feed => anyhow::bail!("the autoscaler's GLMModel watch ended"),
                _ = ticks.tick() => {}
            }
            if store.wait_until_ready().now_or_never().is_none() {
                continue;
            }
            // Read before scraping: a scale the gateway wrote before this snapshot shows up in
            // the scrape as a held request; one written after fails our precondition.
            let (models, released): (Vec<Arc<GLMModel>>, Vec<Arc<GLMModel>>) = store
                .state()
                .into_iter()
                .filter(|m| m.metadata.deletion_timestamp.is_none())
                .partition(|m| m.spec.autoscaling.is_some());
            for model in released.iter().filter(|m| has_autoscaling_status(m)) {
                self.effect.clear_status(model).await;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.tick(models) => {}
            }
        }
        info!("autoscaler stopped");
        Ok(())
    }

    async fn tick(&mut self, models: Vec<Arc<GLMModel>>) {
        self.forget_deleted(&models);
        if models.is_empty() {
            return;
        }
        let tick = self.scrape_all().await;
        self.metrics
            .autoscaler_gateways
            .set(i64::try_from(tick.answers.len()).unwrap_or(i64::MAX));
        let totals = self.counters.observe(&tick);
        let window = Duration::from_secs(self.args.window_secs);
        for model in models {
            let key = (model.namespace().unwrap_or_default(), model.name_any());
            let Some(bounds) = model.spec.autoscaling.as_ref().and_then(Bounds::from_spec) else {
                warn!(model = %key.1, ns = %key.0, "spec.autoscaling is invalid; skipped");
                continue;
            };
            let demand = totals.as_ref().map(|t| t.demand(&key));
            let history = self.histories.entry(key.clone()).or_default();
            let decision =
                history.decide(Instant::now(), model.spec.replicas, &bounds, window, demand);
            debug!(model = %key.1, ns = %key.0, ?decision, "autoscaler decision");
            self.metrics
                .autoscaler_desired
                .with_label_values(&[key.0.as_str(), key.1.as_str()])
                .set(i64::from(decision.desired));
            if let Some(d) = demand {
                self.metrics
                    .autoscaler_demand
                    .with_label_values(&[key.0.as_str(), key.1.as_str()])
                    .set(d.in_flight + d.held);
            }
            self.effect.apply(&model, &decision).await;
        }
    }

    fn forget_deleted(&mut self, models: &[Arc<GLMModel>]) {
        let live: std::collections::HashSet<ModelKey> = models
            .iter()
            .map(|m| (m.namespace().unwrap_or_default(), m.name_any()))
            .collect();
        let gone: Vec<ModelKey> = self
            .histories
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.histories.remove(&key);
            let labels = [key.0.as_str(), key.1.as_str()];
            let _ = self.metrics.autoscaler_desired.remove_label_values(&labels);
            let _ = self.metrics.autoscaler_demand.remove_label_values(&labels);
        }
    }

    async fn scrape_all(&self) -> Tick {
        let targets = match self.discovery.targets().await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "listing the gateway's EndpointSlices failed");
                self.metrics
                    .autoscaler_scrape_errors
                    .with_label_values(&["discovery"])
                    .inc();
                return Tick::default();
            }
        };
        let results =
            futures::future::join_all(targets.iter().map(|t| scrape_one(&self.http, t))).await;
        let mut tick = Tick {
            asked: targets.iter().map(|t| t.url.clone()).collect(),
            ..Tick::default()
        };
        for (target, result) in targets.into_iter().zip(results) {
            match result {
                Ok(report) => tick.answers.push((target.url, report)),
                Err(e) => {
                    debug!(url = %target.url, error = %e, "gateway scrape failed; skipped");
                    self.metrics
                        .autoscaler_scrape_errors
                        .with_label_values(&[e.metric_label()])
                        .inc();
                    if target.terminating {
                        tick.optional_failures += 1;
                    }
                }
            }
        }
        tick
    }
}

/// `status.autoscaling` left from when the model had `spec.autoscaling`.
fn has_autoscaling_status(model: &GLMModel) -> bool {
    model
        .status
        .as_ref()
        .is_some_and(|s| s.autoscaling.is_some())
}

async fn scrape_one(
    http: &reqwest::Client,
    target: &Target,
) -> Result<scrape::Report, ScrapeError> {
    let mut response = http.get(&target.url).send().await.map_err(|e| {
        if e.is_timeout() {
            ScrapeError::Timeout
        } else {
            ScrapeError::Connect(e.to_string())
        }
    })?;
    if !response.status().is_success() {
        return Err(ScrapeError::Status(response.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ScrapeError::Body(e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_METRICS_BYTES {
            return Err(ScrapeError::Body(format!(
                "larger than {MAX_METRICS_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).map_err(|e| ScrapeError::Parse(e.to_string()))?;
    scrape::parse(&text)
}
