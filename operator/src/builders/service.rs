//! The Service in front of a model's pods, and the optional Prometheus Operator ServiceMonitor.

use glm_crds::GLMModel;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{labels, selector_labels, stamp_hash, BuildConfig, BuildError, Names};

pub fn service(model: &GLMModel, cfg: &BuildConfig) -> Result<Service, BuildError> {
    let names = Names::of(model)?;
    Ok(stamp_hash(Service {
        metadata: names.meta(names.name.clone()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&names.name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(cfg.api_port),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }))
}

/// `monitoring.coreos.com/v1` ServiceMonitor, applied only when that CRD is installed.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "monitoring.coreos.com",
        "v1",
        "ServiceMonitor",
    ))
}

pub fn service_monitor(model: &GLMModel) -> Result<DynamicObject, BuildError> {
    let names = Names::of(model)?;
    let mut obj = DynamicObject::new(&names.name, &service_monitor_resource())
        .within(&names.namespace)
        .data(json!({
            "spec": {
                "selector": { "matchLabels": selector_labels(&names.name) },
                "endpoints": [{ "port": "http", "path": "/metrics", "interval": "30s" }],
            }
        }));
    obj.metadata.labels = Some(labels(&names.name));
    obj.metadata.owner_references = Some(vec![names.owner.clone()]);
    Ok(stamp_hash(obj))
}
