//! Command line: `controller` (alias `run`, the default), `gateway`, `crd`, `render -f FILE`.
//! Every flag has an env twin.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::future::{BoxFuture, FutureExt, Shared};
use kube::runtime::events::Reporter;
use kube::Client;
use tracing::{error, info};

use crate::autoscaler::{Autoscaler, AutoscalerArgs};
use crate::builders::{self, BuildConfig};
use crate::controller::{self, Context};
use crate::gateway::{self, GatewayConfig};
use crate::leader::{self, LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
use crate::scope::Scope;
use crate::{render, server};

#[derive(Parser, Debug)]
#[command(
    name = "glm-operator",
    version,
    about = "GLMModel operator and OpenAI gateway"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `controller` flags, accepted without the subcommand too.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller (leader-elected) and its metrics endpoint (default).
    #[command(alias = "run")]
    Controller(RunArgs),
    /// Run the OpenAI gateway: routes requests to ready GLMModels. Not leader-elected: run as
    /// many replicas as traffic needs, apart from the controller.
    Gateway(GatewayArgs),
    /// Print the GLMModel CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would create for GLMModel YAML (multi-document).
    Render(RenderArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServiceMonitorMode {
    /// Apply ServiceMonitors when the monitoring.coreos.com/v1 API is served.
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub build: BuildConfig,

    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "GLM_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Port of the operator's /metrics and /health.
    #[arg(long, env = "GLM_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address the metrics endpoint binds to.
    #[arg(long, env = "GLM_METRICS_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub metrics_bind_address: IpAddr,

    /// Run the controller only while holding the Lease (disable for local development).
    #[arg(long, env = "GLM_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the coordination.k8s.io Lease.
    #[arg(long, env = "GLM_LEASE_NAME", default_value = "glm-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (defaults to the client's namespace: the pod's own in-cluster).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Identity in the Lease and in Events (defaults to the hostname, i.e. the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease is valid without renewal.
    #[arg(long, env = "GLM_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// Seconds a leader keeps trying to renew before it steps down.
    #[arg(long, env = "GLM_LEASE_RENEW_DEADLINE_SECS", default_value_t = 10)]
    pub renew_deadline_secs: u64,
    /// Seconds between acquire/renew attempts.
    #[arg(long, env = "GLM_LEASE_RETRY_SECS", default_value_t = 2)]
    pub retry_period_secs: u64,

    /// ServiceMonitor per model for the Prometheus Operator.
    #[arg(long, env = "GLM_SERVICE_MONITOR", value_enum, default_value_t = ServiceMonitorMode::Auto)]
    pub service_monitor: ServiceMonitorMode,

    /// Log as JSON lines.
    #[arg(long, env = "GLM_LOG_JSON", default_value_t = false)]
    pub log_json: bool,

    #[command(flatten)]
    pub autoscaler: AutoscalerArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub gateway: GatewayConfig,
    /// Log as JSON lines.
    #[arg(long, env = "GLM_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RenderArgs {
    /// GLMModel YAML (one or more documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Namespace for objects that set none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Also render the ServiceMonitor.
    #[arg(long)]
    pub service_monitor: bool,
    #[command(flatten)]
    pub build: BuildConfig,
}

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Controller(cli.run)) {
        Command::Crd => {
            print!("{}", glm_crds::crd_yaml()?);
            Ok(())
        }
        Command::Render(args) => {
            let input = if args.file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&args.file)?
            };
            let opts = render::Options {
                namespace: args.namespace,
                service_monitor: args.service_monitor,
            };
            print!("{}", render::render(&input, &args.build, &opts)?);
            Ok(())
        }
        Command::Controller(args) => {
            init_tracing(args.log_json);
            run(args).await
        }
        Command::Gateway(args) => {
            init_tracing(args.log_json);
            let client = Client::try_default().await?;
            gateway::run(client, args.gateway, shutdown_signal()).await
        }
    }
}

/// SIGTERM or Ctrl-C, awaitable from every task.
fn shutdown_signal() -> Shared<BoxFuture<'static, ()>> {
    async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutdown requested");
    }
    .boxed()
    .shared()
}

/// client-go's rule: the Lease outlives the renew deadline, which outlasts a retry period, or a
/// leader could be replaced while it still believes it leads.
fn lease_timings_valid(lease: u64, renew: u64, retry: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        lease > renew && renew > retry && retry > 0,
        "--lease-duration-secs ({lease}) must exceed --renew-deadline-secs ({renew}), which must \
         exceed --retry-period-secs ({retry}), which must be at least 1"
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.leader_election {
        lease_timings_valid(
            args.lease_duration_secs,
            args.renew_deadline_secs,
            args.retry_period_secs,
        )?;
    }
    args.autoscaler.validate()?;
    let client = Client::try_default().await?;
    let shutdown = shutdown_signal();
    let metrics = Metrics::default();
    let identity = args
        .identity
        .clone()
        .or_else(hostname_env)
        .unwrap_or_else(|| "glm-operator".into());

    let http = tokio::spawn(server::serve(
        SocketAddr::from((args.metrics_bind_address, args.metrics_port)),
        metrics.clone(),
        shutdown.clone(),
    ));

    let reporter = Reporter {
        controller: builders::MANAGER.into(),
        instance: Some(identity.clone()),
    };
    let mut ctx = Context::new(
        client.clone(),
        reporter.clone(),
        metrics.clone(),
        args.build.clone(),
    );
    ctx.service_monitors = match args.service_monitor {
        ServiceMonitorMode::Always => true,
        ServiceMonitorMode::Never => false,
        ServiceMonitorMode::Auto => controller::service_monitors_available(&client).await,
    };
    let ctx = Arc::new(ctx);
    let scope = Scope::new(args.watch_namespace.clone());
    let own_namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    // The autoscaler leads with the controller: a fresh one per term, so a new leader starts
    // from no history and waits a whole scaleDownDelay before it removes replicas.
    let start = || {
        let autoscaler = Autoscaler::new(
            client.clone(),
            args.autoscaler.clone(),
            &own_namespace,
            reporter.clone(),
            metrics.clone(),
        );
        let (ctx, scope, shutdown) = (ctx.clone(), scope.clone(), shutdown.clone());
        async move {
            let autoscaler = autoscaler?;
            tokio::try_join!(
                controller::run(ctx, scope.clone(), shutdown.clone()),
                autoscaler.run(scope, shutdown),
            )?;
            Ok(())
        }
    };
    let controller_result = if args.leader_election {
        let cfg = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned()),
            identity,
            lease_duration: Duration::from_secs(args.lease_duration_secs),
            renew_deadline: Duration::from_secs(args.renew_deadline_secs),
            retry_period: Duration::from_secs(args.retry_period_secs),
        };
        let elector = LeaderElector::new(client.clone(), cfg);
        leader::run_as_leader(elector, metrics.clone(), shutdown.clone(), start).await
    } else {
        start().await
    };
    if let Err(e) = controller_result {
        error!(error = %e, "controller stopped");
        return Err(e);
    }
    shutdown.await;
    http.await??;
    Ok(())
}

fn hostname_env() -> Option<String> {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests;
