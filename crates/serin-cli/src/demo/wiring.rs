//! Starts and stops the operators the demo runs in-process: the Rollout controller and the AnalysisRun
//! runner (the demo's only calls into them, kept here so their names change in one place).

use std::time::Duration;

use kube::Client;

use serin::analysis::outbound::OutboundConfig;
use serin::analysis::{RunnerConfig, RunnerHandle};
use serin::controller::{ControllerConfig, ControllerError, ControllerHandle};

/// The controller and the analysis runner, both watching one namespace.
pub struct Operators {
    controller: ControllerHandle,
    runner: RunnerHandle,
}

/// Why the operators could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorsError {
    #[error("the controller did not start: {0}")]
    Controller(#[from] ControllerError),
    #[error("the controller's caches did not sync within {0:?}")]
    NotReady(Duration),
}

impl OperatorsError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            OperatorsError::Controller(error) => error.category(),
            OperatorsError::NotReady(_) => "controller_not_ready",
        }
    }
}

impl Operators {
    /// Starts both on `namespace` and waits until the controller's caches have synced.
    pub async fn start(client: Client, namespace: &str) -> Result<Operators, OperatorsError> {
        let config = ControllerConfig {
            namespaces: vec![namespace.to_string()],
            error_backoff: Duration::from_millis(500),
            instance: Some("serin-demo".into()),
            // The demo runs the analysis runner itself, to count the queries it sends to Prometheus.
            measure_analysis: false,
            ..ControllerConfig::default()
        };
        let controller = ControllerHandle::start(client.clone(), config).await?;
        let ready_within = Duration::from_secs(30);
        if !controller.wait_ready(ready_within).await {
            controller.kill();
            return Err(OperatorsError::NotReady(ready_within));
        }
        // The demo's Prometheus listens on loopback, which the outbound policy opens only when listed.
        let outbound = OutboundConfig::allowing(["127.0.0.1"]).unwrap_or_default();
        let runner = serin::analysis::spawn(
            client,
            RunnerConfig::allowing(Some(namespace.to_string()), outbound),
        );
        Ok(Operators { controller, runner })
    }

    /// Queries the runner has sent to Prometheus.
    pub fn queries_sent(&self) -> u64 {
        self.runner.queries_sent()
    }

    /// Stops both, each within a bounded time.
    pub async fn stop(self) {
        let limit = Duration::from_secs(5);
        if let Err(error) = tokio::time::timeout(limit, self.runner.shutdown())
            .await
            .unwrap_or(Ok(()))
        {
            tracing::warn!(error = %error, "the analysis runner stopped with an error");
        }
        if let Ok(Err(error)) = tokio::time::timeout(limit, self.controller.stop()).await {
            tracing::warn!(error = %error, "the controller stopped with an error");
        }
    }
}
