//! The controller's Prometheus metrics and its `/metrics`, `/healthz`, `/readyz` HTTP endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::crd::RolloutPhase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    namespace: String,
    rollout: String,
}

/// Counters and gauges the controller updates on every reconcile.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    reconcile_seconds: Histogram,
    rollouts_by_phase: Family<PhaseLabels, Gauge>,
    canary_weight: Family<RolloutLabels, Gauge>,
    decisions: Family<DecisionLabels, Counter>,
    measurements: Family<PhaseLabels, Counter>,
    leader: Gauge,
    phases: Mutex<BTreeMap<(String, String), &'static str>>,
    total_reconciles: AtomicU64,
    total_writes: AtomicU64,
    ready: AtomicBool,
    /// With leader election every replica answers ready, so the metrics Service reaches the leader too.
    ready_as_standby: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("serin");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let rollouts_by_phase = Family::<PhaseLabels, Gauge>::default();
        let canary_weight = Family::<RolloutLabels, Gauge>::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let measurements = Family::<PhaseLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by result (ok or an error category)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_seconds.clone(),
        );
        registry.register("rollouts", "Rollouts by phase", rollouts_by_phase.clone());
        for phase in [
            "Progressing",
            "Paused",
            "Healthy",
            "Degraded",
            "Aborted",
            "Unknown",
        ] {
            rollouts_by_phase
                .get_or_create(&PhaseLabels { phase })
                .set(0);
        }
        registry.register(
            "canary_weight_percent",
            "Traffic weight the canary receives, per Rollout",
            canary_weight.clone(),
        );
        registry.register(
            "decisions",
            "Decisions the controller made, by event reason (Promoted, Aborted, StepReached, ...)",
            decisions.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election), else 0",
            leader.clone(),
        );
        registry.register(
            "analysis_measurements",
            "Analysis measurements taken, by verdict (Successful, Failed, Inconclusive, Error)",
            measurements.clone(),
        );
        Metrics {
            registry,
            decisions,
            measurements,
            leader,
            reconciles,
            reconcile_seconds,
            rollouts_by_phase,
            canary_weight,
            phases: Mutex::new(BTreeMap::new()),
            total_reconciles: AtomicU64::new(0),
            total_writes: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            ready_as_standby: AtomicBool::new(false),
        }
    }

    /// Records one finished reconcile.
    pub fn reconciled(&self, result: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.total_reconciles.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a decision (the reason of the event it was announced with; a bounded set of constants).
    pub fn decided(&self, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels { reason })
            .inc();
    }

    /// Records one analysis measurement by its verdict.
    pub fn measured(&self, phase: crate::crd::AnalysisPhase) {
        self.measurements
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Whether this replica leads (or runs without leader election), as last recorded.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Records the writes one reconcile made.
    pub fn wrote(&self, writes: u64) {
        self.total_writes.fetch_add(writes, Ordering::Relaxed);
    }

    /// Records where a Rollout stands after a reconcile, if `still_there` says it was not deleted
    /// meanwhile. It is asked under the lock [`Metrics::forget_rollout`] takes, so a Rollout deleted while
    /// its reconcile ran does not leave a series behind.
    pub fn rollout_state(
        &self,
        namespace: &str,
        name: &str,
        phase: Option<RolloutPhase>,
        weight: Option<i32>,
        still_there: impl FnOnce() -> bool,
    ) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        if !still_there() {
            return;
        }
        self.canary_weight
            .get_or_create(&RolloutLabels {
                namespace: namespace.to_string(),
                rollout: name.to_string(),
            })
            .set(i64::from(weight.unwrap_or(0)));
        let phase = phase.map(|p| p.as_str()).unwrap_or("Unknown");
        let before = phases.insert((namespace.to_string(), name.to_string()), phase);
        // Only the two phases involved move: recounting every Rollout here would make each reconcile cost
        // as much as the number of Rollouts.
        if before == Some(phase) {
            return;
        }
        if let Some(before) = before {
            self.rollouts_by_phase
                .get_or_create(&PhaseLabels { phase: before })
                .dec();
        }
        self.rollouts_by_phase
            .get_or_create(&PhaseLabels { phase })
            .inc();
    }

    /// Drops the series of a Rollout that was deleted and takes it out of the phase counts.
    pub fn forget_rollout(&self, namespace: &str, name: &str) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        self.canary_weight.remove(&RolloutLabels {
            namespace: namespace.to_string(),
            rollout: name.to_string(),
        });
        if let Some(phase) = phases.remove(&(namespace.to_string(), name.to_string())) {
            self.rollouts_by_phase
                .get_or_create(&PhaseLabels { phase })
                .dec();
        }
    }

    /// How many Rollouts have series of their own.
    pub fn rollout_series(&self) -> usize {
        self.phases.lock().map(|phases| phases.len()).unwrap_or(0)
    }

    /// Reconciles finished since start.
    pub fn total_reconciles(&self) -> u64 {
        self.total_reconciles.load(Ordering::Relaxed)
    }

    /// Writes made by reconciles since start.
    pub fn total_writes(&self) -> u64 {
        self.total_writes.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The caches have synced.
    /// Makes `/readyz` answer ready whether or not this replica leads (leader election).
    pub fn set_ready_as_standby(&self) {
        self.ready_as_standby.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail for lack of space; an error here would only drop the scrape.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `cancel` fires.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

async fn metrics_text(
    State(metrics): State<Arc<Metrics>>,
) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        metrics.encode(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if metrics.is_ready() || metrics.ready_as_standby.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_and_leadership_are_exported() {
        let metrics = Metrics::new();
        metrics.decided(crate::crd::reason::ABORTED);
        metrics.decided(crate::crd::reason::ABORTED);
        metrics.decided(crate::crd::reason::PROMOTED);
        metrics.set_leader(true);
        metrics.measured(crate::crd::AnalysisPhase::Failed);
        let text = metrics.encode();
        assert!(
            text.contains("serin_analysis_measurements_total{phase=\"Failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("serin_decisions_total{reason=\"Aborted\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("serin_decisions_total{reason=\"Promoted\"} 1"),
            "{text}"
        );
        assert!(text.contains("serin_leader 1"), "{text}");
    }

    #[tokio::test]
    async fn readyz_waits_for_the_caches_unless_standbys_are_ready_too() {
        let metrics = Arc::new(Metrics::new());
        assert_eq!(
            readyz(State(metrics.clone())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        metrics.set_ready_as_standby();
        assert_eq!(readyz(State(metrics.clone())).await.0, StatusCode::OK);
        let synced = Arc::new(Metrics::new());
        synced.set_ready();
        assert_eq!(readyz(State(synced)).await.0, StatusCode::OK);
    }

    #[test]
    fn phase_gauges_count_each_rollout_once_in_its_latest_phase() {
        let metrics = Metrics::new();
        metrics.rollout_state("ns", "a", Some(RolloutPhase::Progressing), Some(20), || {
            true
        });
        metrics.rollout_state("ns", "b", Some(RolloutPhase::Progressing), None, || true);
        metrics.rollout_state("ns", "a", Some(RolloutPhase::Healthy), Some(0), || true);
        let text = metrics.encode();
        assert!(
            text.contains("serin_rollouts{phase=\"Progressing\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("serin_rollouts{phase=\"Healthy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("serin_rollouts{phase=\"Paused\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("serin_canary_weight_percent{namespace=\"ns\",rollout=\"a\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn a_deleted_rollout_leaves_no_series_and_no_phase_count() {
        let metrics = Metrics::new();
        metrics.rollout_state("ns", "a", Some(RolloutPhase::Healthy), Some(0), || true);
        metrics.rollout_state("ns", "b", Some(RolloutPhase::Healthy), Some(0), || true);
        metrics.forget_rollout("ns", "a");
        // Its reconcile finished after the deletion: nothing comes back.
        metrics.rollout_state("ns", "a", Some(RolloutPhase::Paused), Some(50), || false);
        let text = metrics.encode();
        assert!(!text.contains("rollout=\"a\""), "{text}");
        assert!(text.contains("rollout=\"b\""), "{text}");
        assert!(
            text.contains("serin_rollouts{phase=\"Healthy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("serin_rollouts{phase=\"Paused\"} 0"),
            "{text}"
        );
        assert_eq!(metrics.rollout_series(), 1);
    }

    #[test]
    fn reconciles_are_counted_by_result() {
        let metrics = Metrics::new();
        metrics.reconciled("ok", Duration::from_millis(2));
        metrics.reconciled("scale_replicaset", Duration::from_millis(2));
        metrics.reconciled("ok", Duration::from_millis(2));
        assert_eq!(metrics.total_reconciles(), 3);
        let text = metrics.encode();
        assert!(
            text.contains("serin_reconciles_total{result=\"ok\"} 2"),
            "{text}"
        );
    }
}
