//! glm-inference: load every `--model`, warm them up, then serve until SIGTERM/Ctrl-C.
//! A model that cannot be loaded stops the start with one line on stderr naming its folder.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use glm_inference::config::Args;
use glm_inference::http::{self, AppState};
use glm_inference::metrics::Metrics;
use glm_inference::registry::{LoadOptions, Registry};
use glm_inference::server;

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

/// Hands the heap pages freed while loading (file buffers, weights before repacking or joining,
/// warm-up activations) back to the kernel: glibc keeps them in its arenas otherwise, and they
/// count in the resident set the pod's memory limit is checked against.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
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
        batching: args.batcher_config(),
        engine: args.engine_config(),
        chat: args.chat_load_options(glm_inference::config::all_devices(&device)?),
        embed_kernels: args.embed_kernels,
    };

    let (specs, default_chat, m) = (
        args.models.clone(),
        args.default_chat_model.clone(),
        metrics.clone(),
    );
    let registry = tokio::task::spawn_blocking(move || {
        Registry::load(&specs, default_chat, &device, &options, &m).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("model loading panicked: {e}"))??;
    registry.warm_up().await.map_err(|e| e.to_string())?;
    release_freed_memory();
    let registry = Arc::new(registry);

    let state = AppState::new(
        registry.clone(),
        metrics,
        args.limits(),
        args.api_key.clone(),
        args.max_concurrent_requests,
    );
    let app = http::router(state.clone());
    let shutdown = shutdown_signal(state.clone(), Duration::from_secs(args.shutdown_delay_secs));

    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    state.set_ready(true);
    tracing::info!(models = ?registry.names(), "listening on http://{local}");

    server::serve(listener, app, args.serve_config(), shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolve on SIGTERM or Ctrl-C: turn `/ready` to 503 at once, wait `delay` so that load balancers
/// notice, then let the server stop accepting and drain in-flight requests (within
/// `--shutdown-timeout-secs`). The handlers are installed here, before the server listens, not
/// when the future is first polled: a SIGTERM that came first would otherwise kill the process
/// with the default action and cut every open stream (seen on a loaded machine).
fn shutdown_signal(state: AppState, delay: Duration) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        [SignalKind::terminate(), SignalKind::interrupt()].map(|kind| {
            signal(kind)
                .map_err(|e| tracing::error!("cannot listen for signal {kind:?}: {e}"))
                .ok()
        })
    };
    async move {
        #[cfg(unix)]
        {
            async fn recv(signal: Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            let [term, interrupt] = signals;
            tokio::select! {
                () = recv(term) => {},
                () = recv(interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
        state.set_ready(false);
        tracing::info!(
            delay_secs = delay.as_secs(),
            "shutting down: /ready is now 503, draining requests"
        );
        tokio::time::sleep(delay).await;
    }
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
