//! STUB so the operator compiles: the `gateway` branch replaces this file with the real
//! OpenAI gateway. Keep the signature: `run(client, cfg, shutdown)`.

use std::future::Future;

/// Gateway flags (the real module defines `--gateway-port` and friends).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct GatewayConfig {}

pub async fn run(
    _client: kube::Client,
    _cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    shutdown.await;
    Ok(())
}
