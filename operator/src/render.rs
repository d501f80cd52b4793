//! `glm-operator render`: the children the controller would apply, as multi-document YAML, so
//! manifests can be reviewed and schema-checked (kubernetes-validate) without a cluster.

use glm_crds::GLMModel;
use serde::Deserialize;

use crate::builders::BuildConfig;
use crate::controller::Children;

/// Stand-in uid for objects not read from an API server (ownerReferences require one).
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

pub struct Options {
    /// Namespace for models that set none.
    pub namespace: String,
    pub service_monitor: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("reading GLMModel YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{name}: {source}")]
    Build {
        name: String,
        source: crate::builders::BuildError,
    },
    #[error("input holds no GLMModel")]
    Empty,
}

pub fn render(input: &str, cfg: &BuildConfig, opts: &Options) -> Result<String, RenderError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(input) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let mut model: GLMModel = serde_yaml::from_value(value)?;
        model
            .metadata
            .namespace
            .get_or_insert_with(|| opts.namespace.clone());
        model
            .metadata
            .uid
            .get_or_insert_with(|| PLACEHOLDER_UID.into());
        let children = Children::build(&model, cfg, opts.service_monitor).map_err(|source| {
            RenderError::Build {
                name: model.metadata.name.clone().unwrap_or_default(),
                source,
            }
        })?;
        docs.push(serde_yaml::to_string(&children.deployment)?);
        docs.push(serde_yaml::to_string(&children.service)?);
        if let Some(pvc) = &children.pvc {
            docs.push(serde_yaml::to_string(pvc)?);
        }
        if let Some(monitor) = &children.service_monitor {
            docs.push(serde_yaml::to_string(monitor)?);
        }
    }
    if docs.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(name: &str) -> String {
        let path = format!("{}/../crds/examples/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn kinds(yaml: &str) -> Vec<String> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| {
                let v = serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{e}"));
                v["kind"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    #[test]
    fn renders_every_example() {
        let opts = Options {
            namespace: "default".into(),
            service_monitor: false,
        };
        let cfg = BuildConfig::default();
        let gpu = render(&examples("chat-gpu.yaml"), &cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kinds(&gpu),
            ["Deployment", "Service", "PersistentVolumeClaim"]
        );
        assert!(gpu.contains(PLACEHOLDER_UID));
        assert!(gpu.contains("namespace: default"));
        let cpu =
            render(&examples("embedding-cpu.yaml"), &cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kinds(&cpu), ["Deployment", "Service"]);
        let gguf =
            render(&examples("chat-gguf-pvc.yaml"), &cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kinds(&gguf), ["Deployment", "Service"]);
    }

    #[test]
    fn renders_multi_document_input_and_service_monitor() {
        let input = format!(
            "{}---\n{}",
            examples("embedding-cpu.yaml"),
            examples("chat-gguf-pvc.yaml")
        );
        let opts = Options {
            namespace: "ml".into(),
            service_monitor: true,
        };
        let out = render(&input, &BuildConfig::default(), &opts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kinds(&out),
            [
                "Deployment",
                "Service",
                "ServiceMonitor",
                "Deployment",
                "Service",
                "ServiceMonitor"
            ]
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let opts = Options {
            namespace: "default".into(),
            service_monitor: false,
        };
        assert!(matches!(
            render("", &BuildConfig::default(), &opts),
            Err(RenderError::Empty)
        ));
        let bad = "apiVersion: kubeglm.io/v1alpha1\nkind: GLMModel\nmetadata: {name: x}\nspec: {task: chat, source: 'ftp://x'}\n";
        let err = render(bad, &BuildConfig::default(), &opts).expect_err("bad source");
        assert!(err.to_string().contains("spec.source"), "{err}");
    }
}
