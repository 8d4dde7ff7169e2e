//! The user operations behind the CLI: send a manual command to a Rollout, describe a Rollout, undo to an
//! earlier revision. Each talks to the API server through a client it is given.

pub mod commands;
pub mod describe;
pub mod undo;

pub use commands::{ManualCommand, RejectedCommand};

/// Why a user operation failed; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("rollout {name} not found in namespace {namespace}")]
    RolloutNotFound { name: String, namespace: String },
    #[error("{0}")]
    Rejected(#[from] RejectedCommand),
    #[error("{0}")]
    Undo(#[from] undo::UndoError),
    #[error("the API server refused: {0}")]
    Api(#[source] kube::Error),
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
}

impl OpsError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            OpsError::RolloutNotFound { .. } => "rollout_not_found",
            OpsError::Rejected(_) => "rejected",
            OpsError::Undo(error) => error.category(),
            OpsError::Api(_) => "api",
            OpsError::Output(_) => "output",
        }
    }
}
