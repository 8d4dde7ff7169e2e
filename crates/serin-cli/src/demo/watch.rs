//! Follows the demo's Rollout through the API server (status, Events, AnalysisRuns, ReplicaSets) and the
//! traffic simulator, and prints each change as one short timestamped line.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;

use super::manifests::{APP, NAMESPACE, ROLLOUT, VERSION_ANNOTATION};
use super::summary::share_line;
use super::{DemoError, VersionNames};
use serin::crd::analysis::{AnalysisPhase, AnalysisRun};
use serin::crd::{labels, Rollout};
use serin_sim::SimCluster;

/// How often the watch looks.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How long after a weight change the traffic split is shown (so the window holds the new split).
const TRAFFIC_SETTLE: Duration = Duration::from_secs(2);

/// Prints lines stamped with the time since the demo started.
pub struct Printer {
    start: Instant,
}

impl Default for Printer {
    fn default() -> Self {
        Printer::new()
    }
}

impl Printer {
    pub fn new() -> Printer {
        Printer {
            start: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// One line stamped with the elapsed time.
    pub fn say(&self, text: &str) {
        self.raw(&format!("{}\n", stamp(self.elapsed(), text)));
    }

    /// A section title.
    pub fn heading(&self, text: &str) {
        self.raw(&format!("\n== {text}\n"));
    }

    /// Text as is.
    pub fn raw(&self, text: &str) {
        let mut out = std::io::stdout();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// `[  12.3s] text`
pub fn stamp(elapsed: Duration, text: &str) -> String {
    format!("[{:>6.1}s] {text}", elapsed.as_secs_f64())
}

/// A measurement value for humans: error rates as percentages, latencies in milliseconds.
pub fn format_measurement(metric: &str, value: &str) -> String {
    match value.parse::<f64>() {
        Ok(number) if !number.is_finite() => value.to_string(),
        Ok(number) if metric.contains("error") => format!("{:.1}%", number * 100.0),
        Ok(number) if metric.contains("latency") => format!("{:.0}ms", number * 1000.0),
        _ => value.to_string(),
    }
}

fn dedup_since(weights: &[(usize, i32)], act: usize) -> Vec<i32> {
    let mut out: Vec<i32> = Vec::new();
    for (_, weight) in weights.iter().filter(|(a, _)| *a >= act) {
        if out.last() != Some(weight) {
            out.push(*weight);
        }
    }
    out
}

/// What the demo remembers of one AnalysisRun.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The act during which it was first seen.
    pub act: usize,
    pub phase: Option<AnalysisPhase>,
    pub step_index: Option<i32>,
    /// The highest error rate measured by its `error-rate` metric.
    pub max_error_rate: Option<f64>,
    printed_measurements: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Snapshot {
    phase: Option<String>,
    weight: Option<i32>,
    message: Option<String>,
}

/// Follows the Rollout and prints what changes.
pub struct RolloutWatch<'a> {
    client: Client,
    sim: &'a SimCluster,
    printer: &'a Printer,
    act: usize,
    last: Snapshot,
    latest: Option<Rollout>,
    events_seen: BTreeSet<String>,
    runs: BTreeMap<String, RunRecord>,
    weights: Vec<(usize, i32)>,
    desired_weights: Vec<(usize, i32)>,
    names: VersionNames,
    traffic_due: Option<Instant>,
}

impl<'a> RolloutWatch<'a> {
    pub fn new(client: Client, sim: &'a SimCluster, printer: &'a Printer) -> Self {
        RolloutWatch {
            client,
            sim,
            printer,
            act: 0,
            last: Snapshot::default(),
            latest: None,
            events_seen: BTreeSet::new(),
            runs: BTreeMap::new(),
            weights: Vec::new(),
            desired_weights: Vec::new(),
            names: VersionNames::new(),
            traffic_due: None,
        }
    }

    /// Starts a new act; returns its number for `weights_since` and `runs_since`.
    pub fn mark_act(&mut self) -> usize {
        self.act += 1;
        self.act
    }

    /// The canary weights the steps asked for since `act` began, without consecutive repeats.
    pub fn desired_weights_since(&self, act: usize) -> Vec<i32> {
        dedup_since(&self.desired_weights, act)
    }

    /// The canary weights seen since `act` began, without consecutive repeats.
    pub fn weights_since(&self, act: usize) -> Vec<i32> {
        dedup_since(&self.weights, act)
    }
    /// The AnalysisRuns first seen since `act` began.
    pub fn runs_since(&self, act: usize) -> Vec<RunRecord> {
        self.runs
            .values()
            .filter(|run| run.act >= act)
            .cloned()
            .collect()
    }

    /// The traffic split over the last `window`, by version.
    pub fn traffic_line(&self, window: Duration) -> String {
        match self.sim.traffic() {
            Some(traffic) => share_line(&traffic.recent_share(NAMESPACE, APP, window), &self.names),
            None => "no traffic simulator".into(),
        }
    }

    /// Waits (bounded) until `hash` has at least `threshold` of the last two seconds' traffic; returns its
    /// last seen share.
    pub async fn wait_for_share(
        &mut self,
        hash: &str,
        threshold: f64,
        within: Duration,
    ) -> Option<f64> {
        let deadline = Instant::now() + within;
        let mut share = None;
        while let Some(traffic) = self.sim.traffic() {
            let shares = traffic.recent_share(NAMESPACE, APP, Duration::from_secs(2));
            share = shares
                .get(hash)
                .copied()
                .or(if shares.is_empty() { None } else { Some(0.0) });
            if share.is_some_and(|s| s >= threshold) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        share
    }

    /// Polls until `done` holds for the Rollout, printing changes; a clean error after `within`.
    pub async fn wait_for(
        &mut self,
        what: &'static str,
        within: Duration,
        done: impl Fn(&Rollout) -> bool,
    ) -> Result<Rollout, DemoError> {
        let deadline = Instant::now() + within;
        loop {
            self.poll().await;
            if let Some(rollout) = self.latest.as_ref().filter(|r| done(r)) {
                return Ok(rollout.clone());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what,
                    waited: within,
                    last: self.describe_last(),
                });
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    fn describe_last(&self) -> String {
        format!(
            "phase {}, canary weight {}, {}",
            self.last.phase.as_deref().unwrap_or("none"),
            self.last.weight.map_or("none".into(), |w| format!("{w}%")),
            self.last.message.as_deref().unwrap_or("no message")
        )
    }

    /// One look at everything; API errors are skipped (the next look tries again).
    async fn poll(&mut self) {
        self.learn_version_names().await;
        self.follow_runs().await;
        self.follow_events().await;
        let rollouts: Api<Rollout> = Api::namespaced(self.client.clone(), NAMESPACE);
        if let Ok(Some(rollout)) = rollouts.get_opt(ROLLOUT).await {
            self.follow_status(&rollout);
            self.latest = Some(rollout);
        }
        if self.traffic_due.is_some_and(|due| Instant::now() >= due) {
            self.traffic_due = None;
            let line = format!("traffic (last 2s): {}", self.traffic_line(TRAFFIC_SETTLE));
            self.printer.say(&line);
        }
    }

    async fn learn_version_names(&mut self) {
        let replica_sets: Api<ReplicaSet> = Api::namespaced(self.client.clone(), NAMESPACE);
        let Ok(list) = replica_sets.list(&ListParams::default()).await else {
            return;
        };
        for replica_set in list {
            let hash = replica_set.labels().get(labels::POD_TEMPLATE_HASH).cloned();
            let version = replica_set
                .spec
                .template
                .as_ref()
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(VERSION_ANNOTATION))
                .cloned();
            if let (Some(hash), Some(version)) = (hash, version) {
                self.names.insert(hash, version);
            }
        }
    }

    fn name_of(&self, hash: Option<&str>) -> String {
        match hash {
            Some(hash) => self
                .names
                .get(hash)
                .cloned()
                .unwrap_or_else(|| format!("new version ({hash})")),
            None => "none".into(),
        }
    }

    fn follow_status(&mut self, rollout: &Rollout) {
        let Some(status) = &rollout.status else {
            return;
        };
        let stable = status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.as_str());
        let canary = status
            .canary_revision
            .as_ref()
            .map(|r| r.pod_template_hash.as_str());
        let now = Snapshot {
            phase: status.phase.map(|p| p.as_str().to_string()),
            weight: canary.and(status.current_weight),
            message: status.message.clone(),
        };
        if let Some(desired) = canary.and(status.desired_weight) {
            self.desired_weights.push((self.act, desired));
        }
        if now.weight != self.last.weight {
            if let Some(weight) = now.weight {
                self.weights.push((self.act, weight));
                let asked = match status.desired_weight {
                    Some(desired) if desired != weight => format!(" (step asks {desired}%)"),
                    _ => String::new(),
                };
                let line = format!(
                    "weight: canary {} {weight}% · stable {} {}%{asked}",
                    self.name_of(canary),
                    self.name_of(stable),
                    100 - weight
                );
                self.printer.say(&line);
                self.traffic_due = Some(Instant::now() + TRAFFIC_SETTLE);
            }
        }
        if now.phase != self.last.phase || now.message != self.last.message {
            let line = format!(
                "phase {:<11} {}",
                now.phase.as_deref().unwrap_or("-"),
                now.message.as_deref().unwrap_or("")
            );
            self.printer.say(&line);
        }
        self.last = now;
    }

    async fn follow_events(&mut self) {
        let events: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let Ok(list) = events.list(&ListParams::default()).await else {
            return;
        };
        let mut fresh: Vec<Event> = list
            .into_iter()
            .filter(|event| !self.events_seen.contains(&event.name_any()))
            .collect();
        fresh.sort_by(|a, b| {
            (
                a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                a.name_any(),
            )
                .cmp(&(
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.name_any(),
                ))
        });
        for event in fresh {
            self.events_seen.insert(event.name_any());
            let line = format!(
                "decision {:<22} {}",
                event.reason.as_deref().unwrap_or("-"),
                event.note.as_deref().unwrap_or("")
            );
            self.printer.say(&line);
        }
    }

    async fn follow_runs(&mut self) {
        let runs: Api<AnalysisRun> = Api::namespaced(self.client.clone(), NAMESPACE);
        let Ok(list) = runs.list(&ListParams::default()).await else {
            return;
        };
        for run in list {
            let name = run.name_any();
            let act = self.act;
            let record = self.runs.entry(name.clone()).or_insert_with(|| RunRecord {
                act,
                phase: None,
                step_index: run
                    .labels()
                    .get(labels::STEP_INDEX)
                    .and_then(|i| i.parse().ok()),
                max_error_rate: None,
                printed_measurements: BTreeMap::new(),
            });
            let Some(status) = &run.status else {
                continue;
            };
            let mut lines = Vec::new();
            for metric in &status.metric_results {
                let printed = record
                    .printed_measurements
                    .entry(metric.name.clone())
                    .or_insert(0);
                for measurement in metric.measurements.iter().skip(*printed) {
                    if measurement.phase == AnalysisPhase::Running {
                        break;
                    }
                    *printed += 1;
                    let value = measurement.value.as_deref().unwrap_or("no value");
                    if metric.name.contains("error") {
                        if let Ok(rate) = value.parse::<f64>() {
                            record.max_error_rate =
                                Some(record.max_error_rate.map_or(rate, |m| m.max(rate)));
                        }
                    }
                    lines.push(format!(
                        "analysis {:<11} Prometheus says {:>7} -> {}",
                        metric.name,
                        format_measurement(&metric.name, value),
                        measurement.phase.as_str()
                    ));
                }
            }
            if status.phase != record.phase {
                if let Some(phase) = status.phase.filter(|p| p.is_completed()) {
                    lines.push(format!(
                        "analysis run {} {}{}",
                        record
                            .step_index
                            .map_or("(background)".into(), |i| format!("at step {i}")),
                        phase.as_str(),
                        status
                            .message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ));
                }
                record.phase = status.phase;
            }
            for line in lines {
                self.printer.say(&line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_align() {
        assert_eq!(stamp(Duration::from_millis(1500), "x"), "[   1.5s] x");
        assert_eq!(stamp(Duration::from_secs(123), "x"), "[ 123.0s] x");
    }

    #[test]
    fn measurements_are_shown_in_their_units() {
        assert_eq!(format_measurement("error-rate", "0.25"), "25.0%");
        assert_eq!(format_measurement("p99-latency", "0.0495"), "50ms");
        assert_eq!(format_measurement("p99-latency", "NaN"), "NaN");
        assert_eq!(format_measurement("other", "[1, 2]"), "[1, 2]");
    }
}
