use super::*;
use serde_json::Value;

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/glmmodel.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let generated = crd_yaml().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        committed == generated,
        "crds/glmmodel.yaml is stale: run `cargo run -p glm-crds --bin crdgen > crds/glmmodel.yaml`"
    );
}

fn crd() -> Value {
    serde_json::to_value(GLMModel::crd()).unwrap_or_else(|e| panic!("{e}"))
}

fn spec_prop(field: &str) -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        [field]
        .clone()
}

pub(crate) fn rules(v: &Value) -> Vec<String> {
    v["x-kubernetes-validations"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["rule"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_scope_and_subresources() {
    let crd = crd();
    assert_eq!(crd["metadata"]["name"], "glmmodels.kubeglm.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "glm");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    let scale = &v["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(columns, ["Task", "GPUs", "Ready", "Age", "Endpoint"]);
}

#[test]
fn schema_carries_the_validation_rules() {
    assert_eq!(spec_prop("gpus")["minimum"], 0.0);
    assert_eq!(spec_prop("replicas")["minimum"], 0.0);
    assert_eq!(
        spec_prop("task")["enum"],
        serde_json::json!(["chat", "embedding"])
    );
    assert!(rules(&spec_prop("source"))[0].contains("hf://"));
    assert!(rules(&spec_prop("name"))[0].contains("matches"));
    let cache = spec_prop("cache");
    assert!(rules(&cache["properties"]["size"])[0].contains("matches"));
    // Every CEL-checked string has a bound, or the API server refuses the CRD for cost.
    for field in ["name", "source", "gguf", "gpuResourceName", "image"] {
        assert!(
            spec_prop(field)["maxLength"].is_number(),
            "{field} has no maxLength"
        );
    }
    let root = &crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    assert!(rules(root)[0].contains("self.metadata.name"));
    let conditions = &root["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}

#[test]
fn defaults_and_helpers() {
    let m: GLMModel = serde_yaml::from_str(
        "apiVersion: kubeglm.io/v1alpha1\nkind: GLMModel\nmetadata: {name: m}\nspec: {task: chat, source: /m}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.spec.replicas, 1);
    assert_eq!(m.spec.gpus, 0);
    assert_eq!(m.served_name(), "m");
    assert_eq!(m.spec.gpu_resource_name(), "nvidia.com/gpu");
    assert_eq!(m.spec.rollout_strategy(), RolloutStrategy::RollingUpdate);
    assert!(!m.is_ready());
}

#[test]
fn autoscaling_schema_bounds_and_rules() {
    let a = spec_prop("autoscaling");
    let props = &a["properties"];
    assert_eq!(props["minReplicas"]["minimum"], 0.0);
    assert_eq!(props["minReplicas"]["default"], 1);
    assert_eq!(props["maxReplicas"]["minimum"], 1.0);
    assert_eq!(
        a["required"],
        serde_json::json!(["maxReplicas", "targetInFlight"])
    );
    assert_eq!(rules(&a), ["self.minReplicas <= self.maxReplicas"]);
    assert_eq!(rules(&props["targetInFlight"]), ["self > 0"]);
    assert!(rules(&props["scaleDownDelay"])[0].contains("matches"));
    assert!(props["scaleDownDelay"]["maxLength"].is_number());
    // The status block the autoscaler writes.
    let root = &crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let status = &root["properties"]["status"]["properties"]["autoscaling"]["properties"];
    for field in ["desiredReplicas", "lastScaleTime", "reason", "message"] {
        assert!(
            status[field].is_object(),
            "status.autoscaling.{field} missing"
        );
    }
    // A single-pod cache caps maxReplicas too, not only replicas.
    assert!(rules(
        &crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    )
    .iter()
    .any(|r| r.contains("self.autoscaling.maxReplicas <= 1")));
}

#[test]
fn scale_down_delay_parses_hours_minutes_seconds() {
    use std::time::Duration;
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
    assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
    for bad in ["", "5", "m", "5x", "1m1h", "1m1m", "-1s", "1.5h", " 5m"] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
    let spec: AutoscalingSpec =
        serde_json::from_value(serde_json::json!({"maxReplicas": 3, "targetInFlight": 4}))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.min_replicas, 1);
    assert_eq!(spec.scale_down_delay(), Some(Duration::from_secs(300)));
}
