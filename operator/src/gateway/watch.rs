//! Keeps the routing table in step with the cluster: a reflector over GLMModel objects, and a
//! rebuild of the table from the reflector's store after every change.

use std::sync::Arc;

use futures::StreamExt;
use glm_crds::GLMModel;
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api, ResourceExt,
};
use tokio::sync::watch;

use super::{
    lifecycle::Readiness,
    metrics::GatewayMetrics,
    routing::{ModelRecord, RouteSettings, RoutingTable},
};

/// The gateway's view of one GLMModel.
pub fn record(model: &GLMModel) -> ModelRecord {
    let routing = model.spec.routing.clone().unwrap_or_default();
    ModelRecord {
        namespace: model.namespace().unwrap_or_default(),
        name: model.name_any(),
        served_name: model.served_name().to_owned(),
        aliases: model.spec.aliases.clone(),
        endpoint: model.status.as_ref().and_then(|s| s.endpoint.clone()),
        ready: model.is_ready(),
        replicas: model.spec.replicas,
        settings: RouteSettings {
            strategy: routing.strategy.unwrap_or_default(),
            prefix_chars: usize::try_from(
                routing
                    .prefix_chars
                    .unwrap_or(glm_crds::DEFAULT_PREFIX_CHARS),
            )
            .unwrap_or(1)
            .max(1),
            hold_timeout: routing
                .hold_timeout_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(std::time::Duration::from_secs),
        },
        created: model.creation_timestamp().map_or(0, |t| t.0.as_second()),
    }
}

pub fn table_from_models<'a>(models: impl IntoIterator<Item = &'a GLMModel>) -> RoutingTable {
    let records: Vec<ModelRecord> = models.into_iter().map(record).collect();
    RoutingTable::build(&records)
}

/// Runs a reflector over `api` until the task is dropped. After every change `publish` gets the
/// store's objects, and `synced` runs after each full list; while a (re)list is in flight the
/// store still holds the previous full list, so nothing half-listed is ever published. Watch
/// errors are retried with backoff: the last published state keeps serving meanwhile.
pub async fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    metrics: GatewayMetrics,
    mut publish: impl FnMut(Vec<Arc<K>>),
    synced: impl Fn(),
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store::<K>();
    let events = watcher(api, config.any_semantic())
        .default_backoff()
        .reflect(writer);
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(event) => {
                metrics.watch_event("ok");
                publish(store.state());
                if matches!(event, watcher::Event::InitDone) {
                    synced();
                }
            }
            Err(err) => {
                metrics.watch_event("error");
                tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %err,
                    "watch failed; retrying with backoff");
            }
        }
    }
}

/// Watches GLMModels, publishing a new table whenever routing changes; marks `readiness` once
/// the first full list is in.
pub async fn maintain_table(
    api: Api<GLMModel>,
    table: watch::Sender<Arc<RoutingTable>>,
    metrics: GatewayMetrics,
    readiness: Readiness,
) {
    let m = metrics.clone();
    reflect(
        api,
        watcher::Config::default(),
        metrics,
        |models| {
            publish(
                &table,
                table_from_models(models.iter().map(Arc::as_ref)),
                &m,
            )
        },
        || readiness.mark_models_synced(),
    )
    .await;
}

fn publish(table: &watch::Sender<Arc<RoutingTable>>, next: RoutingTable, metrics: &GatewayMetrics) {
    metrics.set_ready_models(next.len());
    table.send_if_modified(|current| {
        if **current == next {
            return false;
        }
        for conflict in next.conflicts() {
            tracing::warn!(name = %conflict.name, winner = %conflict.winner,
                losers = ?conflict.losers, "several ready GLMModels claim one model name");
        }
        tracing::info!(models = ?next.names().collect::<Vec<_>>(), "routing table updated");
        *current = Arc::new(next);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routing::Lookup;

    fn model(yaml: &str) -> GLMModel {
        match serde_yaml::from_str(yaml) {
            Ok(model) => model,
            Err(err) => panic!("test GLMModel does not parse: {err}"),
        }
    }

    const READY: &str = r#"
apiVersion: kubeglm.io/v1alpha1
kind: GLMModel
metadata: {name: glm4, namespace: ml, creationTimestamp: "2025-01-31T00:00:00Z"}
spec: {name: glm-4-9b-chat, aliases: [glm4, gpt-4o], task: chat, source: "hf://THUDM/glm-4-9b-chat"}
status:
  endpoint: http://glm4.ml.svc.cluster.local:8080
  conditions:
  - {type: Progressing, status: "False", reason: Done, message: "", lastTransitionTime: "2025-01-31T00:00:00Z"}
  - {type: Ready, status: "True", reason: Ready, message: "", lastTransitionTime: "2025-01-31T00:00:00Z"}
"#;

    #[test]
    fn record_reads_names_endpoint_readiness_and_age() {
        let record = record(&model(READY));
        assert_eq!(
            record,
            ModelRecord {
                namespace: "ml".into(),
                name: "glm4".into(),
                served_name: "glm-4-9b-chat".into(),
                aliases: vec!["glm4".into(), "gpt-4o".into()],
                endpoint: Some("http://glm4.ml.svc.cluster.local:8080".into()),
                ready: true,
                replicas: 1,
                settings: RouteSettings {
                    prefix_chars: 100,
                    ..RouteSettings::default()
                },
                created: 1_738_281_600,
            }
        );
    }

    #[test]
    fn served_name_defaults_to_metadata_name() {
        let bge = model(
            r#"
apiVersion: kubeglm.io/v1alpha1
kind: GLMModel
metadata: {name: bge-m3, namespace: ml}
spec: {task: embedding, source: "hf://BAAI/bge-m3"}
status:
  endpoint: http://bge-m3.ml.svc.cluster.local:8080
  conditions:
  - {type: Ready, status: "True", reason: Ready, message: "", lastTransitionTime: "2025-01-31T00:00:00Z"}
"#,
        );
        let table = table_from_models([&bge]);
        assert!(matches!(table.lookup("bge-m3"), Lookup::Found(r) if r.ready));
    }

    #[test]
    fn ready_false_or_missing_status_is_not_routed() {
        let not_ready = model(&READY.replace(
            r#"type: Ready, status: "True""#,
            r#"type: Ready, status: "False""#,
        ));
        let unknown = model(&READY.replace(
            r#"type: Ready, status: "True""#,
            r#"type: Ready, status: "Unknown""#,
        ));
        let mut no_status = model(READY);
        no_status.status = None;
        for model in [not_ready, unknown, no_status] {
            let table = table_from_models([&model]);
            assert!(table.is_empty());
            for name in ["glm-4-9b-chat", "gpt-4o"] {
                assert!(matches!(table.lookup(name), Lookup::Found(r) if !r.ready));
            }
        }
    }

    #[test]
    fn publish_skips_identical_tables() {
        let metrics = GatewayMetrics::new().unwrap_or_else(|e| panic!("metrics: {e}"));
        let (tx, mut rx) = watch::channel(Arc::new(RoutingTable::default()));
        rx.mark_unchanged();
        publish(&tx, table_from_models([&model(READY)]), &metrics);
        assert!(rx.has_changed().unwrap_or(false));
        rx.mark_unchanged();
        publish(&tx, table_from_models([&model(READY)]), &metrics);
        assert!(!rx.has_changed().unwrap_or(true));
        assert_eq!(rx.borrow().len(), 3);
    }
}
