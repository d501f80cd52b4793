//! glm-inference: load every `--model`, warm them up, then serve until SIGTERM/Ctrl-C.
//! A model that cannot be loaded stops the start with one line on stderr naming its folder.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use glm_inference::batcher::BatcherConfig;
use glm_inference::config::Args;
use glm_inference::http::{self, AppState, Limits};
use glm_inference::metrics::Metrics;
use glm_inference::registry::{LoadOptions, Registry};

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.json_logs);
    // Before the async runtime starts any thread: it sets RAYON_NUM_THREADS.
    let threads = glm_inference::kernels::init_threads(args.threads);
    tracing::info!(threads, "model maths threads");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => fail(msg),
    }
}

fn fail(msg: String) -> ExitCode {
    eprintln!("glm-inference: error: {msg}");
    ExitCode::FAILURE
}

async fn serve(args: Args) -> Result<(), String> {
    args.validate()?;
    let metrics = Arc::new(Metrics::new().map_err(|e| format!("cannot create metrics: {e}"))?);
    let device = args.device.open()?;
    let options = LoadOptions {
        batching: BatcherConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_queued_inputs: args.max_queued_inputs,
        },
        engine: args.engine_config(),
        gguf_mode: args.gguf_mode,
    };

    let (specs, default_chat, m) = (
        args.models.clone(),
        args.default_chat_model.clone(),
        metrics.clone(),
    );
    let registry = tokio::task::spawn_blocking(move || {
        Registry::load(&specs, default_chat, &device, &options, &m)
    })
    .await
    .map_err(|e| format!("model loading panicked: {e}"))??;
    registry.warm_up().await?;
    let registry = Arc::new(registry);

    let limits = Limits {
        max_client_batch_size: args.max_client_batch_size,
        max_body_bytes: args.max_body_bytes,
        auto_truncate: args.auto_truncate,
    };
    let state = AppState::new(
        registry.clone(),
        metrics,
        limits,
        args.api_key.clone(),
        args.max_concurrent_requests,
    );
    let app = http::router(state.clone());

    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    state.set_ready(true);
    tracing::info!(models = ?registry.names(), "listening on http://{local}");

    let shutdown = shutdown_signal(state, Duration::from_secs(args.shutdown_delay_secs));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

/// With the `cuda` feature the first visible GPU (CUDA renumbers `CUDA_VISIBLE_DEVICES` from 0),
/// else the CPU.
/// Resolve on SIGTERM or Ctrl-C: turn `/ready` to 503 at once, wait `delay` so that load balancers
/// notice, then let axum stop accepting and drain in-flight requests.
async fn shutdown_signal(state: AppState, delay: Duration) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    state.set_ready(false);
    tracing::info!(
        delay_secs = delay.as_secs(),
        "shutting down: /ready is now 503, draining requests"
    );
    tokio::time::sleep(delay).await;
}

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).init();
    }
}
