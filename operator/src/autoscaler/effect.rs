//! Applying a decision: the scale subresource, an Event, `status.autoscaling`.

use glm_crds::{AutoscalingStatus, GLMModel};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::decide::Decision;
use crate::metrics::Metrics;

/// Field manager of the autoscaler's writes (`spec.replicas` through the scale subresource and
/// `status.autoscaling`), apart from the controller's.
pub const MANAGER: &str = "glm-operator-autoscaler";

pub struct Effect {
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
}

impl Effect {
    pub fn new(client: Client, reporter: Reporter, metrics: Metrics) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }

    /// Scales (when the decision changes replicas), then records the decision. Failures are
    /// logged and counted: the next tick decides again.
    pub async fn apply(&self, model: &GLMModel, decision: &Decision) {
        let ns = model.namespace().unwrap_or_default();
        let api: Api<GLMModel> = Api::namespaced(self.client.clone(), &ns);
        let current = model.spec.replicas;
        let scaled = decision.desired != current;
        if scaled {
            match self.scale(&api, model, decision.desired).await {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(model = %model.name_any(), "replicas changed meanwhile; deciding again next tick");
                    return;
                }
                Err(e) => {
                    warn!(model = %model.name_any(), error = %e, "scaling failed");
                    self.metrics.autoscaler_scale_errors.inc();
                    return;
                }
            }
            let reason = if decision.desired > current {
                "ScaledUp"
            } else {
                "ScaledDown"
            };
            let note = format!(
                "Scaled from {current} to {} replicas ({}): {}",
                decision.desired,
                decision.reason.as_str(),
                decision.message
            );
            info!(model = %model.name_any(), ns = %ns, reason, note = %note, "autoscaler event");
            self.event(model, reason, note).await;
        }
        if let Some(status) = next_status(model, decision, scaled, Timestamp::now()) {
            let body = json!({
                "apiVersion": GLMModel::api_version(&()),
                "kind": GLMModel::kind(&()),
                "status": { "autoscaling": status },
            });
            let params = PatchParams::apply(MANAGER).force();
            if let Err(e) = api
                .patch_status(&model.name_any(), &params, &Patch::Apply(&body))
                .await
            {
                warn!(model = %model.name_any(), error = %e, "writing status.autoscaling failed");
            }
        }
    }

    /// Drops `status.autoscaling` of a model whose `spec.autoscaling` was removed: applying a
    /// status without it releases the fields this manager owned.
    pub async fn clear_status(&self, model: &GLMModel) {
        let api: Api<GLMModel> =
            Api::namespaced(self.client.clone(), &model.namespace().unwrap_or_default());
        let body = json!({
            "apiVersion": GLMModel::api_version(&()),
            "kind": GLMModel::kind(&()),
            "status": {},
        });
        let params = PatchParams::apply(MANAGER).force();
        match api
            .patch_status(&model.name_any(), &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                info!(model = %model.name_any(), "autoscaling removed: status.autoscaling cleared")
            }
            Err(e) => {
                warn!(model = %model.name_any(), error = %e, "clearing status.autoscaling failed")
            }
        }
    }

    /// `spec.replicas` through the scale subresource, on condition that the model is still the
    /// version the decision read.
    async fn scale(
        &self,
        api: &Api<GLMModel>,
        model: &GLMModel,
        replicas: i32,
    ) -> kube::Result<()> {
        let patch = json!({
            "metadata": { "resourceVersion": model.resource_version() },
            "spec": { "replicas": replicas },
        });
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch_scale(&model.name_any(), &params, &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    async fn event(&self, model: &GLMModel, reason: &str, note: String) {
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Autoscale".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &model.object_ref(&())).await {
            warn!(error = %e, "publishing event failed");
        }
    }
}

/// The `status.autoscaling` to write, or `None` when the stored one already says the same
/// (desired replicas and reason; the message's figures alone do not cost a write per tick).
pub fn next_status(
    model: &GLMModel,
    decision: &Decision,
    scaled: bool,
    now: Timestamp,
) -> Option<AutoscalingStatus> {
    let old = model.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    // The API server keeps whole seconds.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let last_scale_time = if scaled {
        Some(Time(now))
    } else {
        old.and_then(|o| o.last_scale_time.clone())
    };
    let new = AutoscalingStatus {
        desired_replicas: decision.desired,
        last_scale_time,
        reason: decision.reason.as_str().to_owned(),
        message: decision.message.clone(),
    };
    let same = old.is_some_and(|o| {
        o.desired_replicas == new.desired_replicas
            && o.reason == new.reason
            && o.last_scale_time == new.last_scale_time
    });
    (!same).then_some(new)
}
