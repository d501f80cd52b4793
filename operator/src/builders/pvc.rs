//! The PVC caching downloaded weights (only for `hf://` sources with `spec.cache`).

use std::collections::BTreeMap;

use glm_crds::GLMModel;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{stamp_hash, BuildError, Names, Source};

pub fn pvc_name(model_name: &str) -> String {
    format!("{model_name}-weights")
}

/// `None` when nothing is downloaded or no cache is asked for.
pub fn pvc(model: &GLMModel) -> Result<Option<PersistentVolumeClaim>, BuildError> {
    let names = Names::of(model)?;
    let Some(cache) = &model.spec.cache else {
        return Ok(None);
    };
    if !matches!(
        Source::parse(&model.spec.source)?,
        Source::HuggingFace { .. }
    ) {
        return Ok(None);
    }
    let access_modes = cache.effective_access_modes();
    Ok(Some(stamp_hash(PersistentVolumeClaim {
        metadata: names.meta(pvc_name(&names.name)),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access_modes),
            storage_class_name: cache.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(cache.size.clone()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })))
}
