//! `spec.routing`: how the gateway spreads one model's requests over its pods and how long it
//! holds a request while no pod is ready (scale from zero, rollouts).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Characters of the chat prompt hashed by `PrefixHash` when `prefixChars` is unset.
pub const DEFAULT_PREFIX_CHARS: i32 = 100;

/// Per-model routing settings of the gateway. Every field is optional; the gateway's flags give
/// the defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.prefixChars) || (has(self.strategy) && self.strategy == 'PrefixHash')").message("routing.prefixChars applies only to strategy PrefixHash").field_path(".prefixChars"))]
pub struct RoutingSpec {
    /// `LeastLoad` (default): the ready pod with the fewest requests in flight from this
    /// gateway replica, ties broken at random. `PrefixHash` (chat models only): chat requests
    /// whose prompts start alike go to the same pod (consistent hashing with bounded load), so
    /// its prefix cache is reused; other requests use `LeastLoad`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<RoutingStrategy>,

    /// `PrefixHash`: characters of the chat prompt (message contents in order) that are hashed.
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub prefix_chars: Option<i32>,

    /// Longest a request waits for a ready pod (e.g. while the model scales from zero) before
    /// the gateway answers 503 with Retry-After. Default: the gateway's `--gateway-hold-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub hold_timeout_seconds: Option<i32>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum RoutingStrategy {
    /// The ready pod with the fewest in-flight requests (ties at random).
    #[default]
    LeastLoad,
    /// Consistent hash of the chat prompt's first `prefixChars` characters, with bounded load.
    PrefixHash,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::Value;

    use crate::tests::rules;
    use crate::GLMModel;

    fn schema() -> Value {
        serde_json::to_value(GLMModel::crd()).unwrap_or_else(|e| panic!("{e}"))["spec"]["versions"]
            [0]["schema"]["openAPIV3Schema"]
            .clone()
    }

    #[test]
    fn routing_schema_bounds_and_rules() {
        let spec = &schema()["properties"]["spec"];
        let routing = &spec["properties"]["routing"];
        assert_eq!(
            routing["properties"]["strategy"]["enum"],
            serde_json::json!(["LeastLoad", "PrefixHash"])
        );
        assert_eq!(routing["properties"]["prefixChars"]["minimum"], 1.0);
        assert_eq!(
            routing["properties"]["holdTimeoutSeconds"]["maximum"],
            3600.0
        );
        assert!(rules(routing)[0].contains("prefixChars"));
        assert!(rules(spec)
            .iter()
            .any(|r| r.contains("PrefixHash") && r.contains("self.task == 'chat'")));
    }

    #[test]
    fn routing_is_optional_and_camel_case() {
        let m: GLMModel = serde_yaml::from_str(
            "apiVersion: kubeglm.io/v1alpha1\nkind: GLMModel\nmetadata: {name: m}\nspec: {task: chat, source: /m, routing: {strategy: PrefixHash, prefixChars: 64, holdTimeoutSeconds: 30}}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let routing = m.spec.routing.unwrap_or_default();
        assert_eq!(routing.strategy, Some(super::RoutingStrategy::PrefixHash));
        assert_eq!(
            (routing.prefix_chars, routing.hold_timeout_seconds),
            (Some(64), Some(30))
        );
    }
}
