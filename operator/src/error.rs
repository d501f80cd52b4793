use crate::builders::BuildError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("invalid GLMModel: {0}")]
    Build(#[from] BuildError),
}

impl Error {
    /// Short label for the `error` label of `glm_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) => format!("api_{}", status.code),
            Error::Kube(_) => "transport".into(),
            Error::Build(_) => "invalid_spec".into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
