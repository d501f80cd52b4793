//! Which gateway replicas to scrape: the endpoints of the gateway Service (its EndpointSlices,
//! listed each tick so a new or departed replica counts from the next tick) and/or a static list
//! of URLs (out-of-cluster runs, tests).

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::Client;

/// The Service port whose endpoints serve `/metrics` (the chart names the gateway's port so).
const PORT_NAME: &str = "http";

/// A gateway replica's metrics URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// A terminating replica: scraped for the streams it still drains, but its silence does not
    /// make the tick incomplete.
    pub terminating: bool,
}

pub struct Discovery {
    slices: Option<(Api<EndpointSlice>, String)>,
    urls: Vec<String>,
}

impl Discovery {
    /// `service`: the gateway Service in `namespace` (`None` or empty: no discovery).
    pub fn new(client: Client, namespace: &str, service: Option<&str>, urls: Vec<String>) -> Self {
        let slices = service
            .filter(|s| !s.is_empty())
            .map(|s| (Api::namespaced(client, namespace), s.to_owned()));
        Self { slices, urls }
    }

    pub async fn targets(&self) -> Result<Vec<Target>, kube::Error> {
        let mut targets: Vec<Target> = self
            .urls
            .iter()
            .map(|url| Target {
                url: url.clone(),
                terminating: false,
            })
            .collect();
        if let Some((api, service)) = &self.slices {
            let selector = format!("kubernetes.io/service-name={service}");
            let slices = api.list(&ListParams::default().labels(&selector)).await?;
            targets.extend(targets_from_slices(&slices.items));
        }
        targets.sort_by(|a, b| a.url.cmp(&b.url));
        targets.dedup_by(|a, b| a.url == b.url);
        Ok(targets)
    }
}

/// Metrics URLs of the slices' endpoints: ready ones, and terminating ones still serving.
pub fn targets_from_slices(slices: &[EndpointSlice]) -> Vec<Target> {
    let mut targets = Vec::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(PORT_NAME))
            .or_else(|| (ports.len() == 1).then(|| &ports[0]))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        let ipv6 = slice.address_type == "IPv6";
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let terminating = conditions.terminating == Some(true);
            // An absent `ready` means ready (EndpointConditions' contract).
            let ready = conditions.ready != Some(false);
            if !(ready || terminating && conditions.serving == Some(true)) {
                continue;
            }
            for address in &endpoint.addresses {
                let host = if ipv6 {
                    format!("[{address}]")
                } else {
                    address.clone()
                };
                targets.push(Target {
                    url: format!("http://{host}:{port}/metrics"),
                    terminating,
                });
            }
        }
    }
    targets.sort_by(|a, b| a.url.cmp(&b.url));
    targets.dedup_by(|a, b| a.url == b.url);
    targets
}
