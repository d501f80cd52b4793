//! Which namespaces the controller, the autoscaler and the gateway watch.

use std::fmt::Debug;

use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// One namespace, or all of them.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// One namespace, or all when `None`.
    pub namespace: Option<String>,
}

impl Scope {
    /// From a `--*-namespace` flag: unset or empty (what the chart passes) means all namespaces.
    pub fn new(namespace: Option<String>) -> Self {
        Self {
            namespace: namespace.filter(|ns| !ns.is_empty()),
        }
    }

    /// An API over the scope's namespace, or all of them.
    pub fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}
