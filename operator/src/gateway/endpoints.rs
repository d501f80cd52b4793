//! Which pods serve each model: a watch-backed reflector over EndpointSlices (label
//! `kubernetes.io/service-name`), reduced to the ready, not terminating addresses of each Service.
//! Requests read the latest [`EndpointIndex`] from a `watch` channel: no API call per request.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{runtime::watcher, Api, ResourceExt};
use tokio::sync::watch;

use super::{lifecycle::Readiness, metrics::GatewayMetrics};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The model Services' port name (see the operator's Service builder).
pub const PORT_NAME: &str = "http";

/// `(namespace, service)` -> ready pod addresses (`host:port`), sorted and deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointIndex(BTreeMap<(String, String), Vec<String>>);

impl EndpointIndex {
    pub fn build<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Self {
        let mut index: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for slice in slices {
            let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) else {
                continue;
            };
            let key = (slice.namespace().unwrap_or_default(), service.clone());
            let addresses = index.entry(key).or_default();
            addresses.extend(ready_addresses(slice));
        }
        for addresses in index.values_mut() {
            addresses.sort();
            addresses.dedup();
        }
        index.retain(|_, addresses| !addresses.is_empty());
        Self(index)
    }

    /// Test and bench tables: `(namespace, service)` -> addresses.
    pub fn from_map(map: BTreeMap<(String, String), Vec<String>>) -> Self {
        Self(map)
    }

    /// The ready addresses of a Service; empty when it has none.
    pub fn ready(&self, key: &(String, String)) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }
}

/// `host:port` of each ready, not terminating endpoint of the slice, on the Service's `http` port
/// (or its only port). Only the first address of an endpoint is used, as the API asks of
/// consumers; FQDN slices are skipped (the operator's Services select pods).
fn ready_addresses(slice: &EndpointSlice) -> Vec<String> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
        .and_then(|p| p.port);
    let Some(port) = port else {
        return Vec::new();
    };
    let bracket = slice.address_type == "IPv6";
    if !bracket && slice.address_type != "IPv4" {
        return Vec::new();
    }
    slice
        .endpoints
        .iter()
        .filter(|e| {
            let conditions = e.conditions.as_ref();
            // Unset `ready` means ready; unset `terminating` means not terminating.
            conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false)
        })
        .filter_map(|e| e.addresses.first())
        .map(|address| {
            if bracket {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            }
        })
        .collect()
}

/// Watches EndpointSlices, publishing the index after every change; marks `readiness` once the
/// first full list is in.
pub async fn maintain_index(
    api: Api<EndpointSlice>,
    index: watch::Sender<Arc<EndpointIndex>>,
    metrics: GatewayMetrics,
    readiness: Readiness,
) {
    super::watch::reflect(
        api,
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        metrics,
        |slices| {
            let next = EndpointIndex::build(slices.iter().map(Arc::as_ref));
            index.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    *current = Arc::new(next);
                }
                changed
            });
        },
        || readiness.mark_endpoints_synced(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test slice does not parse: {e}"))
    }

    const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: glm4-abc, namespace: ml, labels: {kubernetes.io/service-name: glm4}}
addressType: IPv4
ports: [{name: metrics, port: 9090}, {name: http, port: 8200}]
endpoints:
- {addresses: [10.0.0.2], conditions: {ready: true}}
- {addresses: [10.0.0.1, 10.9.9.9]}
- {addresses: [10.0.0.3], conditions: {ready: false}}
- {addresses: [10.0.0.4], conditions: {ready: true, terminating: true}}
"#;

    fn key(ns: &str, svc: &str) -> (String, String) {
        (ns.to_owned(), svc.to_owned())
    }

    #[test]
    fn ready_not_terminating_endpoints_on_the_http_port() {
        let index = EndpointIndex::build([&slice(SLICE)]);
        assert_eq!(
            index.ready(&key("ml", "glm4")),
            ["10.0.0.1:8200", "10.0.0.2:8200"]
        );
        assert!(index.ready(&key("other", "glm4")).is_empty());
    }

    #[test]
    fn slices_of_one_service_are_merged_and_an_only_port_is_used() {
        let second = slice(
            &SLICE
                .replace("glm4-abc", "glm4-def")
                .replace(
                    "[{name: metrics, port: 9090}, {name: http, port: 8200}]",
                    "[{port: 8300}]",
                )
                .replace("10.0.0.2]", "10.0.0.7]"),
        );
        let index = EndpointIndex::build([&slice(SLICE), &second]);
        assert_eq!(
            index.ready(&key("ml", "glm4")),
            [
                "10.0.0.1:8200",
                "10.0.0.1:8300",
                "10.0.0.2:8200",
                "10.0.0.7:8300"
            ]
        );
    }

    #[test]
    fn ipv6_is_bracketed_and_unlabelled_or_portless_slices_are_skipped() {
        let v6 = slice(
            &SLICE
                .replace("IPv4", "IPv6")
                .replace("10.0.0.2", "fd00::2")
                .replace("10.0.0.1, 10.9.9.9", "fd00::1"),
        );
        assert_eq!(
            EndpointIndex::build([&v6]).ready(&key("ml", "glm4")),
            ["[fd00::1]:8200", "[fd00::2]:8200"]
        );
        let unlabelled =
            slice(&SLICE.replace("labels: {kubernetes.io/service-name: glm4}", "labels: {}"));
        let portless = slice(&SLICE.replace(
            "[{name: metrics, port: 9090}, {name: http, port: 8200}]",
            "[{name: a, port: 1}, {name: b, port: 2}]",
        ));
        let fqdn = slice(&SLICE.replace("IPv4", "FQDN"));
        for s in [unlabelled, portless, fqdn] {
            assert_eq!(EndpointIndex::build([&s]), EndpointIndex::default());
        }
    }
}
