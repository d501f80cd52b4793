//! Command line: `run` (default), `crd`, `render -f FILE`. Every flag has an env twin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::future::{BoxFuture, FutureExt, Shared};
use kube::runtime::events::Reporter;
use kube::Client;
use tracing::{error, info};

use crate::builders::BuildConfig;
use crate::controller::{self, Context, Scope};
use crate::gateway::{self, GatewayConfig};
use crate::leader::{self, LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
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
    /// `run` flags, accepted without the subcommand too.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller (leader-elected), the gateway and the metrics endpoint (default).
    Run(RunArgs),
    /// Print the GLMModel CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would create for GLMModel YAML (multi-document).
    Render(RenderArgs),
}

/// Settings the child-object builders use.
#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    /// Inference image when a GLMModel sets no `spec.image`.
    #[arg(
        long,
        env = "GLM_DEFAULT_IMAGE",
        default_value = "ghcr.io/kubeglm/glm-inference:latest"
    )]
    pub default_image: String,
    /// Image of the init container downloading hf:// weights (any image with python3 + pip).
    #[arg(
        long,
        env = "GLM_DOWNLOADER_IMAGE",
        default_value = "docker.io/library/python:3.12-slim"
    )]
    pub downloader_image: String,
    /// Port glm-inference listens on (API_PORT) and the per-model Service port.
    #[arg(long, env = "GLM_API_PORT", default_value_t = 8200)]
    pub api_port: u16,
    /// Cluster DNS domain used in status.endpoint.
    #[arg(long, env = "GLM_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// UID and GID the inference pods run as.
    #[arg(long, env = "GLM_RUN_AS_USER", default_value_t = 65532)]
    pub run_as_user: i64,
}

impl From<BuildArgs> for BuildConfig {
    fn from(a: BuildArgs) -> Self {
        BuildConfig {
            default_image: a.default_image,
            downloader_image: a.downloader_image,
            api_port: a.api_port,
            cluster_domain: a.cluster_domain,
            run_as_user: a.run_as_user,
        }
    }
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
    pub build: BuildArgs,

    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "GLM_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Port of the operator's /metrics and /health (all interfaces).
    #[arg(long, env = "GLM_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,

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
    pub gateway: GatewayConfig,
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
    pub build: BuildArgs,
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
    match cli.command.unwrap_or(Command::Run(cli.run)) {
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
            print!("{}", render::render(&input, &args.build.into(), &opts)?);
            Ok(())
        }
        Command::Run(args) => {
            init_tracing(args.log_json);
            run(args).await
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let shutdown = shutdown_signal();
    let metrics = Metrics::default();
    let identity = args
        .identity
        .clone()
        .or_else(hostname_env)
        .unwrap_or_else(|| "glm-operator".into());

    let http = tokio::spawn(server::serve(
        SocketAddr::from(([0, 0, 0, 0], args.metrics_port)),
        metrics.clone(),
        shutdown.clone(),
    ));

    // ---- GATEWAY HOOK -------------------------------------------------------------------
    // The gateway (operator/src/gateway, helper branch `gateway`) serves on every replica:
    // it only reads GLMModels. Only the controller below needs the leader Lease.
    let gateway = tokio::spawn(gateway::run(
        client.clone(),
        args.gateway.clone(),
        shutdown.clone(),
    ));
    // -------------------------------------------------------------------------------------

    let mut ctx = Context::new(
        client.clone(),
        Reporter {
            controller: "glm-operator".into(),
            instance: Some(identity.clone()),
        },
        metrics.clone(),
        args.build.clone().into(),
    );
    ctx.service_monitors = match args.service_monitor {
        ServiceMonitorMode::Always => true,
        ServiceMonitorMode::Never => false,
        ServiceMonitorMode::Auto => controller::service_monitors_available(&client).await,
    };
    let scope = Scope {
        // The chart passes an empty string for "all namespaces".
        namespace: args.watch_namespace.clone().filter(|ns| !ns.is_empty()),
    };
    let work = controller::run(Arc::new(ctx), scope, shutdown.clone());
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
        leader::run_as_leader(elector, metrics.clone(), shutdown.clone(), work).await
    } else {
        work.await
    };
    if let Err(e) = controller_result {
        // Losing the Lease ends the process: a restart campaigns again from a clean state.
        error!(error = %e, "controller stopped");
        return Err(e);
    }
    shutdown.await;
    gateway.await??;
    http.await??;
    Ok(())
}

fn hostname_env() -> Option<String> {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;
    use k8s_openapi::api::apps::v1::Deployment;
    use serde::Deserialize;

    use super::*;

    /// Env twins of every flag of `glm-operator run`.
    fn run_envs() -> BTreeSet<String> {
        let cmd = Cli::command();
        let run = cmd
            .find_subcommand("run")
            .unwrap_or_else(|| panic!("no run subcommand"));
        run.get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn every_run_flag_has_an_env_twin() {
        let cmd = Cli::command();
        let run = cmd
            .find_subcommand("run")
            .unwrap_or_else(|| panic!("no run subcommand"));
        let missing: Vec<_> = run
            .get_arguments()
            .filter(|a| a.get_long().is_some() && a.get_env().is_none())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(missing.is_empty(), "flags without env twin: {missing:?}");
    }

    #[test]
    fn the_chart_sets_only_env_vars_the_operator_reads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/glm-operator.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let deployment = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
            .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Deployment"))
            .find_map(|v| serde_yaml::from_value::<Deployment>(v).ok())
            .unwrap_or_else(|| panic!("no Deployment in {path}"));
        let known = run_envs();
        let containers = deployment
            .spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers)
            .unwrap_or_default();
        let names: Vec<String> = containers
            .iter()
            .flat_map(|c| c.env.iter().flatten())
            .map(|e| e.name.clone())
            .collect();
        assert!(names.len() > 5, "{names:?}");
        for name in names {
            // RUST_LOG is read by tracing's EnvFilter, not by clap.
            assert!(
                name == "RUST_LOG" || known.contains(&name),
                "the chart sets {name}, which no `glm-operator run` flag reads"
            );
        }
    }

    #[test]
    fn run_is_the_default_and_env_fills_flags() {
        let cli = Cli::try_parse_from([
            "glm-operator",
            "--leader-election",
            "false",
            "--api-port",
            "9000",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(cli.command.is_none());
        assert!(!cli.run.leader_election);
        assert_eq!(cli.run.build.api_port, 9000);
        let render = Cli::try_parse_from(["glm-operator", "render", "-f", "m.yaml", "-n", "ai"])
            .unwrap_or_else(|e| panic!("{e}"));
        match render.command {
            Some(Command::Render(args)) => assert_eq!(args.namespace, "ai"),
            other => panic!("parsed {other:?}"),
        }
    }
}
