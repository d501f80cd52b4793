//! Prints the GLMModel CRD: `cargo run -p glm-crds --bin crdgen > crds/glmmodel.yaml`.

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", glm_crds::crd_yaml()?);
    Ok(())
}
