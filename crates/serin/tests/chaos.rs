//! The chaos test: seeded random schedules of the faults the fault campaign meets one at a time (controller
//! restarts with a lagging ReplicaSet cache, leader failovers between replicas that are different users, API
//! errors and timeouts on every kind of write, closed, expired, held and dropped watches, canary pods turning
//! unready, the workload simulator stopped, Git re-applies, scaling through the scale subresource, manual
//! commands, Prometheus stopped and started), played against a routed canary whose analysis measures its
//! error rate on a real Prometheus. The invariants of `support::invariants` are checked at every poll, and once
//! the faults stop the Rollout must converge: Healthy on the new revision when the canary was good and
//! nothing aborted it, Aborted otherwise.
//!
//! `cargo nextest run --test chaos` runs the seeds of `crates/serin/tests/chaos.regressions`, then seeds 1 to 20, each in
//! a cluster of its own, four at a time (under three minutes on two cores). `SERIN_CHAOS_SEEDS=N` runs N
//! seeds (from `SERIN_CHAOS_FIRST_SEED`, default 1), `SERIN_CHAOS_SEED=S` only seed S,
//! `SERIN_CHAOS_PARALLEL=K` K seeds at once; beyond about 30 seeds use `cargo test --test chaos -- --nocapture`,
//! since nextest stops a test after 300 s. A failing seed is printed with its schedule, what was done and the
//! command that runs it again; keep it in `crates/serin/tests/chaos.regressions`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::collections::BTreeSet;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use serin::crd::{
    labels, reason, AnalysisRun, AnalysisTemplate, CanaryStep, Rollout, RolloutPhase,
};
use serin::ops::ManualCommand;
use serin_sim::load::TrafficConfig;
use serin_sim::prometheus::{find_binary, scrape_config, ScrapeTarget};
use serin_sim::workload::WorkloadConfig;
use serin_sim::{FaultAction, FaultRule, SimCluster, SimConfig, WatchScope};
use support::invariants::{
    assert_abort_order, http_routes, managed_weights, AbortMark, Invariants, RunSummary, Snapshot,
    Target, CONVERGENCE, MAX_POLLS, REACTION,
};
use support::{
    is_write, lease_holder, LeaseTiming, Replica, State, World, CONTROLLER_USER, NS,
    POD_READY_DELAY,
};

/// The Rollout every seed rolls out (each seed has a cluster of its own).
const APP: &str = "chaos";
/// Seeds CI runs after the regressions.
const CI_SEEDS: u64 = 20;
/// Seeds run at once unless `SERIN_CHAOS_PARALLEL` says otherwise.
const DEFAULT_PARALLEL: usize = 4;
/// Faults begin within this long after the new revision started.
const WINDOW_MS: u64 = 16_000;
/// Time between two polls of a seed: every step is seen, and four seeds leave the machine some CPU.
const POLL: Duration = Duration::from_millis(100);
/// Once the faults stop, the Rollout is Healthy or Aborted within this long (promoting at each pause).
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);
/// How long a command of the schedule waits for the moment a human would send it (the schedule goes on
/// meanwhile), and a command of the final convergence.
const COMMAND_PATIENCE: Duration = Duration::from_secs(10);
/// How long a disruption waits for Serin to stop changing traffic (the schedule waits with it).
const SETTLE_PATIENCE: Duration = Duration::from_secs(5);
/// An abort, a scale or pods turning unready come once Serin has not changed traffic for this long, so
/// that no decision of Serin's is in flight when they land.
const TRAFFIC_QUIET: Duration = Duration::from_millis(1_500);
/// Everything one seed may take, setup and teardown included.
const SEED_BOUND: Duration = Duration::from_secs(200);
/// The replicas of a seed that runs two controllers under leader election.
const REPLICA_IDS: [&str; 2] = ["serin-a", "serin-b"];
/// Analysis templates: one for the analysis step, one for background analysis.
const STEP_TEMPLATE: &str = "chaos-step";
const BACKGROUND_TEMPLATE: &str = "chaos-background";
/// The error rate a bad canary answers with; the analysis accepts below 5%.
const BAD_ERROR_RATE: &str = "0.5";
/// A Prometheus outage at least this long may end an analysis in Error (5 errors in a row, 1 s apart for
/// the analysis step), which aborts even a good canary.
const OUTAGE_THAT_MAY_ABORT: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------------------------------------------------
// The seeded generator.

/// SplitMix64: a fixed algorithm, so a seed means the same schedule on every machine and with every version
/// of every crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (the modulo bias is far below what a schedule could notice).
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next_u64() % items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------------------
// Schedules.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Good,
    Bad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Controllers {
    /// One controller, no leader election.
    Single,
    /// Two replicas under leader election, each its own user.
    Pair,
}

/// Which steps Git holds: a re-apply with new steps switches to the other list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Steps {
    First,
    Second,
}

impl Steps {
    fn other(self) -> Steps {
        match self {
            Steps::First => Steps::Second,
            Steps::Second => Steps::First,
        }
    }
}

/// What a seed draws before its faults.
#[derive(Clone, Debug)]
struct Setup {
    health: Health,
    controllers: Controllers,
    background_analysis: bool,
    replicas: i32,
}

/// The kinds of write Serin makes, as the sim's fault rules name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    CreateReplicaSet,
    ScaleReplicaSet,
    PatchService,
    PatchRoute,
    WriteStatus,
    CreateAnalysisRun,
    PatchAnalysisRun,
}

impl WriteKind {
    const ALL: [WriteKind; 7] = [
        WriteKind::CreateReplicaSet,
        WriteKind::ScaleReplicaSet,
        WriteKind::PatchService,
        WriteKind::PatchRoute,
        WriteKind::WriteStatus,
        WriteKind::CreateAnalysisRun,
        WriteKind::PatchAnalysisRun,
    ];

    /// Verb, resource and subresource (`Some("")`: the main resource only).
    fn request(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            WriteKind::CreateReplicaSet => ("create", "replicasets", None),
            WriteKind::ScaleReplicaSet => ("patch", "replicasets", Some("")),
            WriteKind::PatchService => ("patch", "services", None),
            WriteKind::PatchRoute => ("patch", "httproutes", None),
            WriteKind::WriteStatus => ("update", "rollouts", Some("status")),
            WriteKind::CreateAnalysisRun => ("create", "analysisruns", None),
            WriteKind::PatchAnalysisRun => ("patch", "analysisruns", None),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteError {
    Conflict,
    Internal,
    /// Not executed, answered 504 after this long (kube retries it).
    Timeout(u64),
    /// Executed, then answered 504 after this long (kube retries it: the write is sent again).
    TimeoutAfterApply(u64),
}

impl WriteError {
    fn action(self) -> FaultAction {
        match self {
            WriteError::Conflict => FaultAction::Fail(409),
            WriteError::Internal => FaultAction::Fail(500),
            WriteError::Timeout(ms) => FaultAction::Timeout(Duration::from_millis(ms)),
            WriteError::TimeoutAfterApply(ms) => {
                FaultAction::TimeoutAfterApply(Duration::from_millis(ms))
            }
        }
    }

    fn hold_ms(self) -> u64 {
        match self {
            WriteError::Timeout(ms) | WriteError::TimeoutAfterApply(ms) => ms,
            WriteError::Conflict | WriteError::Internal => 0,
        }
    }
}

/// The watches Serin's caches keep (routes and templates are read at each reconcile, not watched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watched {
    Rollouts,
    ReplicaSets,
    Services,
    AnalysisRuns,
}

impl Watched {
    const ALL: [Watched; 4] = [
        Watched::Rollouts,
        Watched::ReplicaSets,
        Watched::Services,
        Watched::AnalysisRuns,
    ];

    fn scope(self, user: &str) -> WatchScope {
        let (group, resource) = match self {
            Watched::Rollouts => ("serin.dev", "rollouts"),
            Watched::ReplicaSets => ("apps", "replicasets"),
            Watched::Services => ("", "services"),
            Watched::AnalysisRuns => ("serin.dev", "analysisruns"),
        };
        WatchScope::new(group, resource).user(user)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WatchFault {
    /// Every open watch of the cluster (the simulators' too) ends; clients resume.
    CloseAll,
    /// Serin's watches of the resource end and resuming answers 410 Gone: they relist.
    Expire,
    /// Events reach Serin this late (a lagging cache).
    Hold(u64),
    /// Events of this window never arrive; the watches then close and relist.
    Drop(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GitChange {
    /// A sync that adds an annotation: no new generation.
    Annotation,
    /// An unrelated spec field (revisionHistoryLimit): a new generation with nothing for Serin to do.
    UnrelatedField,
    /// The other list of steps: the steps start again from the first.
    NewSteps,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Manual {
    Promote,
    Abort,
    Retry,
}

impl Manual {
    fn command(self) -> ManualCommand {
        match self {
            Manual::Promote => ManualCommand::Promote,
            Manual::Abort => ManualCommand::Abort,
            Manual::Retry => ManualCommand::Retry,
        }
    }
}

/// One thing the schedule does at its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Every controller killed like `kill -9`.
    KillControllers,
    /// The dead controllers started again; their ReplicaSet watch lags this long when set.
    StartControllers {
        lagging_replica_sets_ms: Option<u64>,
    },
    /// The replica holding the Lease killed.
    KillLeader,
    /// The leader's Lease writes fail (500) this many times: it loses the Lease mid-work.
    LoseLease {
        renewals: usize,
    },
    /// The next `count` writes of a kind by Serin fail.
    FailWrites {
        kind: WriteKind,
        error: WriteError,
        count: usize,
    },
    Watch {
        resource: Watched,
        fault: WatchFault,
    },
    /// This many ready canary pods turn unready (a failing readiness probe).
    CanaryUnready {
        pods: usize,
    },
    /// The canary pods forced unready are given their readiness back.
    CanaryReady,
    StopWorkload,
    StartWorkload,
    Git(GitChange),
    /// `spec.replicas` set through the scale subresource, as an HPA does.
    Scale(i32),
    Command(Manual),
    StopPrometheus,
    StartPrometheus,
    /// A fault that kept Serin from reacting is over (the fault began at `since_ms`): a disruption it could
    /// not answer meanwhile gets Serin's full reaction time again.
    ReactionRestarts {
        since_ms: u64,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::KillControllers => write!(f, "kill every controller"),
            Action::StartControllers {
                lagging_replica_sets_ms: Some(ms),
            } => write!(
                f,
                "start the dead controllers, their ReplicaSet watch {ms} ms late"
            ),
            Action::StartControllers { .. } => write!(f, "start the dead controllers"),
            Action::KillLeader => write!(f, "kill the replica holding the Lease"),
            Action::LoseLease { renewals } => {
                write!(f, "the leader's next {renewals} Lease writes fail (500)")
            }
            Action::FailWrites { kind, error, count } => {
                let (verb, resource, subresource) = kind.request();
                let what = match error {
                    WriteError::Conflict => "409".to_string(),
                    WriteError::Internal => "500".to_string(),
                    WriteError::Timeout(ms) => format!("a {ms} ms timeout"),
                    WriteError::TimeoutAfterApply(ms) => {
                        format!("a {ms} ms timeout after applying")
                    }
                };
                let sub = match subresource {
                    Some("") | None => String::new(),
                    Some(sub) => format!("/{sub}"),
                };
                write!(f, "{what} on Serin's next {count} {verb} {resource}{sub}")
            }
            Action::Watch { resource, fault } => match fault {
                WatchFault::CloseAll => write!(f, "close every watch"),
                WatchFault::Expire => write!(
                    f,
                    "Serin's {resource:?} watches closed, resuming answers 410"
                ),
                WatchFault::Hold(ms) => write!(f, "Serin's {resource:?} watch events held {ms} ms"),
                WatchFault::Drop(ms) => {
                    write!(f, "Serin's {resource:?} watch events dropped for {ms} ms")
                }
            },
            Action::CanaryUnready { pods } => write!(f, "{pods} ready canary pods turn unready"),
            Action::CanaryReady => write!(f, "the canary pods turn ready again"),
            Action::StopWorkload => write!(f, "stop the workload simulator"),
            Action::StartWorkload => write!(f, "start the workload simulator"),
            Action::Git(change) => write!(f, "Git re-apply: {change:?}"),
            Action::Scale(replicas) => write!(f, "scale subresource: spec.replicas = {replicas}"),
            Action::Command(manual) => write!(f, "serin {manual:?}"),
            Action::StopPrometheus => write!(f, "stop Prometheus"),
            Action::StartPrometheus => write!(f, "start Prometheus"),
            Action::ReactionRestarts { since_ms } => write!(
                f,
                "the fault from +{:.1}s is over: Serin's reaction time restarts",
                *since_ms as f64 / 1000.0
            ),
        }
    }
}

#[derive(Clone, Debug)]
struct Timed {
    at_ms: u64,
    action: Action,
}

#[derive(Clone, Debug)]
struct Schedule {
    seed: u64,
    setup: Setup,
    timeline: Vec<Timed>,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.setup;
        writeln!(
            f,
            "seed {}: {:?} canary, {:?} controller{}, {} replicas, {}",
            self.seed,
            s.health,
            s.controllers,
            if s.controllers == Controllers::Pair {
                "s"
            } else {
                ""
            },
            s.replicas,
            if s.background_analysis {
                "step and background analysis"
            } else {
                "step analysis"
            }
        )?;
        for timed in &self.timeline {
            writeln!(
                f,
                "  +{:>5.1}s  {}",
                timed.at_ms as f64 / 1000.0,
                timed.action
            )?;
        }
        Ok(())
    }
}

/// The kinds of fault a schedule draws from, with their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    Restart,
    Failover,
    Writes,
    Watch,
    Unready,
    Workload,
    Git,
    Scale,
    Command,
    Prometheus,
}

const MENU: [(FaultKind, u64); 10] = [
    (FaultKind::Restart, 2),
    (FaultKind::Failover, 2),
    (FaultKind::Writes, 4),
    (FaultKind::Watch, 3),
    (FaultKind::Unready, 2),
    (FaultKind::Workload, 1),
    (FaultKind::Git, 3),
    (FaultKind::Scale, 1),
    (FaultKind::Command, 4),
    (FaultKind::Prometheus, 1),
];

/// The schedule of `seed`: the setup, then 5 to 9 faults at random times in the window, each expanded into
/// what starts it, what ends it and when Serin may react again.
fn schedule(seed: u64) -> Schedule {
    let mut rng = SplitMix64(seed);
    let setup = Setup {
        health: if rng.chance(30) {
            Health::Bad
        } else {
            Health::Good
        },
        controllers: if rng.chance(50) {
            Controllers::Pair
        } else {
            Controllers::Single
        },
        background_analysis: rng.chance(50),
        replicas: rng.between(3, 5) as i32,
    };
    let menu: Vec<(FaultKind, u64)> = MENU
        .iter()
        .copied()
        .filter(|(kind, _)| *kind != FaultKind::Failover || setup.controllers == Controllers::Pair)
        .collect();
    let total: u64 = menu.iter().map(|(_, weight)| weight).sum();
    let mut timeline = Vec::new();
    let mut push = |at_ms: u64, action: Action| timeline.push(Timed { at_ms, action });
    for _ in 0..rng.between(5, 9) {
        let at = rng.between(0, WINDOW_MS);
        let mut ticket = rng.between(0, total - 1);
        let kind = menu
            .iter()
            .find(|(_, weight)| {
                let hit = ticket < *weight;
                ticket = ticket.saturating_sub(*weight);
                hit
            })
            .map_or(FaultKind::Command, |(kind, _)| *kind);
        match kind {
            FaultKind::Restart => {
                let down = rng.between(200, 2_000);
                let lag = rng.chance(40).then(|| rng.between(1_000, 2_500));
                push(at, Action::KillControllers);
                push(
                    at + down,
                    Action::StartControllers {
                        lagging_replica_sets_ms: lag,
                    },
                );
                push(
                    at + down + lag.unwrap_or(0) + 1_500,
                    Action::ReactionRestarts { since_ms: at },
                );
            }
            FaultKind::Failover => {
                if rng.chance(50) {
                    let down = rng.between(1_000, 5_000);
                    push(at, Action::KillLeader);
                    push(
                        at + down,
                        Action::StartControllers {
                            lagging_replica_sets_ms: None,
                        },
                    );
                    push(
                        at + down.max(3_000) + 2_500,
                        Action::ReactionRestarts { since_ms: at },
                    );
                } else {
                    push(at, Action::LoseLease { renewals: 15 });
                    push(at + 8_000, Action::ReactionRestarts { since_ms: at });
                }
            }
            FaultKind::Writes => {
                let kind = rng.pick(&WriteKind::ALL);
                let error = match rng.between(0, 3) {
                    0 => WriteError::Conflict,
                    1 => WriteError::Internal,
                    2 => WriteError::Timeout(rng.between(300, 1_500)),
                    _ => WriteError::TimeoutAfterApply(rng.between(300, 1_500)),
                };
                let count = rng.between(1, 3) as usize;
                push(at, Action::FailWrites { kind, error, count });
                push(
                    at + count as u64 * (error.hold_ms() + 500) + 1_000,
                    Action::ReactionRestarts { since_ms: at },
                );
            }
            FaultKind::Watch => {
                let resource = rng.pick(&Watched::ALL);
                let fault = match rng.between(0, 3) {
                    0 => WatchFault::CloseAll,
                    1 => WatchFault::Expire,
                    2 => WatchFault::Hold(rng.between(500, 2_000)),
                    _ => WatchFault::Drop(rng.between(500, 1_500)),
                };
                let lasts = match fault {
                    WatchFault::Hold(ms) | WatchFault::Drop(ms) => ms,
                    WatchFault::CloseAll | WatchFault::Expire => 0,
                };
                push(at, Action::Watch { resource, fault });
                push(
                    at + lasts + 1_000,
                    Action::ReactionRestarts { since_ms: at },
                );
            }
            FaultKind::Unready => {
                let pods = if rng.chance(30) { 2 } else { 1 };
                push(at, Action::CanaryUnready { pods });
                push(at + rng.between(1_000, 8_000), Action::CanaryReady);
            }
            FaultKind::Workload => {
                let down = rng.between(1_000, 3_000);
                push(at, Action::StopWorkload);
                push(at + down, Action::StartWorkload);
                push(at + down + 1_000, Action::ReactionRestarts { since_ms: at });
            }
            FaultKind::Git => {
                let change = rng.pick(&[
                    GitChange::Annotation,
                    GitChange::UnrelatedField,
                    GitChange::NewSteps,
                    GitChange::NewSteps,
                ]);
                push(at, Action::Git(change));
            }
            FaultKind::Scale => push(at, Action::Scale(rng.between(2, 6) as i32)),
            FaultKind::Command => {
                let manual = match rng.between(0, 9) {
                    0..=5 => Manual::Promote,
                    6..=7 => Manual::Abort,
                    _ => Manual::Retry,
                };
                push(at, Action::Command(manual));
                if manual == Manual::Abort && rng.chance(50) {
                    push(
                        at + rng.between(1_000, 4_000),
                        Action::Command(Manual::Retry),
                    );
                }
            }
            FaultKind::Prometheus => {
                push(at, Action::StopPrometheus);
                push(at + rng.between(1_000, 10_000), Action::StartPrometheus);
            }
        }
    }
    // Stable: actions drawn for the same time keep the order they were drawn in.
    timeline.sort_by_key(|timed| timed.at_ms);
    Schedule {
        seed,
        setup,
        timeline,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Manifests.

fn canary_service() -> String {
    format!("{APP}-canary")
}

fn analysis_args() -> Value {
    json!([
        {"name": "service", "value": APP},
        {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
    ])
}

fn steps_json(steps: Steps) -> Value {
    let analysis = json!({"analysis": {
        "templates": [{"templateName": STEP_TEMPLATE}],
        "args": analysis_args()
    }});
    match steps {
        Steps::First => json!([
            {"setWeight": 20}, analysis, {"setWeight": 40}, {"pause": {}}, {"setWeight": 70}, {"pause": {}}
        ]),
        Steps::Second => json!([
            {"setWeight": 10}, analysis, {"setWeight": 30}, {"pause": {}},
            {"setWeight": 60}, {"pause": {"duration": "1s"}}, {"setWeight": 80}, {"pause": {}}
        ]),
    }
}

/// What Git holds for the Rollout.
#[derive(Clone, Debug)]
struct GitRollout {
    revision: u8,
    steps: Steps,
    replicas: i32,
    /// Syncs so far; each leaves an annotation.
    syncs: u32,
    revision_history_limit: i32,
}

fn rollout_manifest(setup: &Setup, git: &GitRollout) -> Value {
    let annotations = if git.revision > 1 && setup.health == Health::Bad {
        json!({"sim.serin.dev/error-rate": BAD_ERROR_RATE})
    } else {
        json!({})
    };
    let mut canary = json!({
        "stableService": APP,
        "canaryService": canary_service(),
        "trafficRouting": {"gatewayAPI": {"httpRoute": APP}},
        "steps": steps_json(git.steps),
        "abortScaleDownDelaySeconds": 1,
        "scaleDownDelaySeconds": 1
    });
    if setup.background_analysis {
        canary["analysis"] = json!({
            "templates": [{"templateName": BACKGROUND_TEMPLATE}],
            "args": analysis_args(),
            "startingStep": 1
        });
    }
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {
            "name": APP, "namespace": NS,
            "annotations": {"chaos.serin.dev/sync": git.syncs.to_string()}
        },
        "spec": {
            "replicas": git.replicas,
            "revisionHistoryLimit": git.revision_history_limit,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": format!("{APP}:{}", git.revision)}]}
            },
            "strategy": {"canary": canary}
        }
    })
}

/// The canary's error rate over 20 s, measured by the built-in check every `interval` from 2 s on: `count`
/// answers for the analysis step, until terminated for background analysis. The window outlasts most
/// outages, so a Prometheus that comes back with its data answers at once.
fn template_manifest(
    name: &str,
    prometheus: &str,
    interval: &str,
    count: Option<u32>,
    inconclusive: u32,
) -> Value {
    let mut metric = json!({
        "name": "error-rate",
        "initialDelay": "2s",
        "interval": interval,
        "inconclusiveLimit": inconclusive,
        "successCondition": "result < 0.05",
        "provider": {"prometheus": {
            "address": prometheus,
            "timeout": "2s",
            "check": {
                "kind": "ErrorRate",
                "service": "{{args.service}}",
                "podTemplateHash": "{{args.canary-hash}}",
                "window": "20s"
            }
        }}
    });
    if let Some(count) = count {
        metric["count"] = json!(count);
    }
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"args": [{"name": "service"}, {"name": "canary-hash"}], "metrics": [metric]}
    })
}

fn route_manifest() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": APP, "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [
                {"name": APP, "port": 80, "weight": 100},
                {"name": canary_service(), "port": 80, "weight": 0}
            ]}]
        }
    })
}

// ---------------------------------------------------------------------------------------------------------
// A Prometheus that can be stopped and started again on the same address with the same data.

/// A `prometheus` process scraping the sim; `stop` kills it, `start` brings it back on the same port with
/// the data it had (what an outage of a real Prometheus looks like to Serin).
struct Prometheus {
    binary: PathBuf,
    dir: tempfile::TempDir,
    listen: String,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts it and waits (bounded) until it has scraped `target` once.
    async fn start(target: ScrapeTarget) -> Prometheus {
        let binary =
            find_binary().expect("prometheus installed (Debian/Ubuntu package `prometheus`)");
        let dir = tempfile::tempdir().expect("a working directory for prometheus");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            scrape_config(std::slice::from_ref(&target)),
        )
        .expect("prometheus config written");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut prometheus = Prometheus {
            binary,
            dir,
            listen: format!("127.0.0.1:{port}"),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
        };
        prometheus.spawn();
        let query = format!("up{{instance=\"{}\"}} == 1", target.address);
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..600 {
            if prometheus.series(&query).await > 0 {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus at {} never scraped {}; log: {}",
                prometheus.url(),
                target.address,
                prometheus.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus never scraped {}", target.address);
    }

    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process (without waiting for it to answer, as after a crash-loop restart).
    fn spawn(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("prometheus.log"))
            .expect("prometheus log");
        let child = Command::new(&self.binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", self.data().display()))
            .arg(format!("--web.listen-address={}", self.listen))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("prometheus starts");
        self.child = Some(child);
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the process as an operator does (SIGTERM: it writes out what it holds, so it comes back with
    /// its data), killing it if it has not exited within 10 s.
    async fn shut_down(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The shell's own `kill`: a minimal image may have no kill binary, and std sends only SIGKILL.
        let terminated = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -TERM {}", child.id()))
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..200 {
            if !terminated || Instant::now() >= deadline {
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the process and reaps it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn series(&self, query: &str) -> usize {
        let Ok(response) = self
            .http
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", query)])
            .send()
            .await
        else {
            return 0;
        };
        let Ok(body) = response.json::<Value>().await else {
            return 0;
        };
        body["data"]["result"].as_array().map_or(0, Vec::len)
    }

    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        log.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------
// One seed's cluster.

/// The upstream Gateway API CRDs: `SERIN_UPSTREAM_CRDS`, else `../shared/fixtures/upstream-crds`.
/// A replica under leader election: dead (killed) or running.
struct Slot {
    identity: String,
    replica: Option<Replica>,
}

/// The sim (workload and traffic simulators), Serin's CRDs and the HTTPRoute CRD, a Prometheus scraping the
/// simulated traffic, and the controller(s) of the seed (started once the app's Services exist).
struct Bed {
    world: World,
    prometheus: Prometheus,
    controllers: Controllers,
    /// Single: whether the controller runs.
    single_running: bool,
    /// Pair: the replicas.
    slots: Vec<Slot>,
    timing: LeaseTiming,
}

impl Bed {
    async fn start(setup: &Setup, crds: &Path) -> Bed {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sim = SimCluster::start(SimConfig {
            workload: Some(WorkloadConfig {
                default_ready_delay: POD_READY_DELAY,
                resync: Duration::from_secs(2),
            }),
            traffic: Some(TrafficConfig::default()),
            ..SimConfig::default()
        })
        .await
        .expect("sim starts");
        let admin = sim.client().await.expect("admin client");
        let definitions: Api<CustomResourceDefinition> = Api::all(admin.clone());
        let text = std::fs::read_to_string(crds.join("gateway-api-httproutes.yaml"))
            .expect("HTTPRoute CRD readable");
        let route_crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).expect("HTTPRoute CRD parses");
        for crd in serin::crd::all().into_iter().chain([route_crd]) {
            definitions
                .create(&PostParams::default(), &crd)
                .await
                .expect("CRD accepted");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..500 {
            let servable = Api::<Rollout>::namespaced(admin.clone(), NS)
                .list(&ListParams::default())
                .await
                .is_ok()
                && Api::<AnalysisTemplate>::namespaced(admin.clone(), NS)
                    .list(&ListParams::default())
                    .await
                    .is_ok()
                && http_routes(&admin)
                    .list(&ListParams::default())
                    .await
                    .is_ok();
            if servable {
                break;
            }
            assert!(Instant::now() < deadline, "the CRDs never became servable");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let target = ScrapeTarget::from_url(&sim.metrics_url()).expect("the sim's metrics URL");
        let prometheus = Prometheus::start(target).await;
        let bed = Bed {
            world: World::from_parts(sim, admin),
            prometheus,
            controllers: setup.controllers,
            single_running: false,
            slots: REPLICA_IDS
                .iter()
                .map(|id| Slot {
                    identity: id.to_string(),
                    replica: None,
                })
                .collect(),
            timing: LeaseTiming::default(),
        };
        bed
    }

    /// Starts the seed's controller(s) and waits (bounded) until they serve.
    async fn start_controllers(&mut self) {
        match self.controllers {
            Controllers::Single => {
                self.world.start_controller().await;
                self.single_running = true;
            }
            Controllers::Pair => {
                self.start_dead(None).await;
            }
        }
    }

    /// The users Serin writes as.
    fn writers(&self) -> Vec<String> {
        match self.controllers {
            Controllers::Single => vec![CONTROLLER_USER.to_string()],
            Controllers::Pair => REPLICA_IDS.iter().map(|id| id.to_string()).collect(),
        }
    }

    /// Starts every dead controller; their ReplicaSet watch lags `lag` when set. Returns who started.
    async fn start_dead(&mut self, lag: Option<Duration>) -> Vec<String> {
        let mut started = Vec::new();
        match self.controllers {
            Controllers::Single => {
                if !self.single_running {
                    if let Some(lag) = lag {
                        self.world
                            .sim
                            .faults()
                            .hold_watch_events(Watched::ReplicaSets.scope(CONTROLLER_USER), lag);
                    }
                    self.world.start_controller_unsynced().await;
                    self.single_running = true;
                    started.push(CONTROLLER_USER.to_string());
                }
            }
            Controllers::Pair => {
                for slot in self.slots.iter_mut().filter(|s| s.replica.is_none()) {
                    if let Some(lag) = lag {
                        self.world
                            .sim
                            .faults()
                            .hold_watch_events(Watched::ReplicaSets.scope(&slot.identity), lag);
                    }
                    slot.replica =
                        Some(Replica::start(&self.world, &slot.identity, self.timing).await);
                    started.push(slot.identity.clone());
                }
            }
        }
        started
    }

    /// Kills every controller; returns who was killed.
    fn kill_all(&mut self) -> Vec<String> {
        match self.controllers {
            Controllers::Single => {
                self.world.kill_controllers();
                let killed = self.single_running;
                self.single_running = false;
                if killed {
                    vec![CONTROLLER_USER.to_string()]
                } else {
                    Vec::new()
                }
            }
            Controllers::Pair => self
                .slots
                .iter_mut()
                .filter_map(|slot| {
                    let mut replica = slot.replica.take()?;
                    replica.kill();
                    Some(slot.identity.clone())
                })
                .collect(),
        }
    }

    async fn stop(mut self) {
        for slot in &mut self.slots {
            if let Some(mut replica) = slot.replica.take() {
                replica.kill();
            }
        }
        self.prometheus.stop();
        self.world.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Playing a schedule.

/// A command of the schedule waiting for the moment a human would send it.
#[derive(Clone, Debug)]
struct Armed {
    manual: Manual,
    /// Seconds after the new revision started.
    armed_at: f64,
    until: Instant,
}

/// What the abort-order check needs of the previous poll.
#[derive(Clone, Debug)]
struct PollMemo {
    started: SystemTime,
    at_analysis: bool,
    aborted: bool,
    route_canary: Option<i64>,
    canary: String,
}

/// A command sent and not yet seen taking effect.
#[derive(Clone, Debug)]
struct Pending {
    manual: Manual,
    /// Seconds after the new revision started.
    sent_at: f64,
    step: i32,
    steps: Vec<CanaryStep>,
    canary: Option<String>,
}

struct Runner<'a> {
    bed: &'a mut Bed,
    schedule: &'a Schedule,
    inv: Invariants,
    journal: Arc<Mutex<Vec<String>>>,
    t0: Instant,
    git: GitRollout,
    stable: String,
    canary: String,
    /// AnalysisRuns whose verdict Serin rightly set aside: runs of an attempt a retry replaced, step runs
    /// of steps that changed (those that existed then, and those started for the old steps that Serin
    /// released).
    superseded: BTreeSet<String>,
    /// The generation of new steps until a status about them is seen.
    steps_change: Option<i64>,
    armed: Vec<Armed>,
    pending: Vec<Pending>,
    previous: Option<PollMemo>,
    /// New steps came for the canary in flight, and no step analysis of them has started yet.
    analysis_owed: bool,
    /// Step runs listed between new steps and Serin's status about them.
    step_change_candidates: BTreeSet<String>,
    /// Aborts Serin decided at an analysis step, for the abort-order check.
    analysis_aborts: Vec<AbortMark>,
    /// The last abort or retry sent.
    last_manual: Option<Manual>,
    last_disruption: Option<Instant>,
    forced_unready: BTreeSet<String>,
    prometheus_down_since: Option<Instant>,
    prometheus_down: Duration,
}

impl Runner<'_> {
    fn elapsed(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn record(&self, line: String) {
        if let Ok(mut journal) = self.journal.lock() {
            journal.push(line);
        }
    }

    fn disrupt(&mut self, what: &str) {
        self.inv.disrupt(what);
        self.last_disruption = Some(Instant::now());
    }

    /// Route first (as `support::invariants::snapshot` reads it), then the Rollout with its ReplicaSets and
    /// Services, then the AnalysisRuns, leaving out those whose verdict no longer counts.
    async fn snapshot(&mut self) -> Snapshot {
        let world = &self.bed.world;
        let route = http_routes(&world.admin)
            .get_opt(APP)
            .await
            .expect("read the HTTPRoute")
            .and_then(|route| managed_weights(&route, APP, &canary_service()));
        let mut state = world.state(APP).await;
        state.rollout.metadata.managed_fields = None;
        let runs = Api::<AnalysisRun>::namespaced(world.admin.clone(), NS)
            .list(&ListParams::default().labels(&format!("{}={APP}", labels::ROLLOUT_NAME)))
            .await
            .expect("list AnalysisRuns")
            .items;
        if let Some(generation) = self.steps_change {
            let observed = state
                .rollout
                .status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .is_some_and(|g| g >= generation);
            if observed {
                self.steps_change = None;
            } else {
                // A step run listed before Serin wrote a status about the new steps may have been started
                // for the old ones: if Serin then releases (terminates) it, its verdict does not count.
                self.step_change_candidates.extend(
                    runs.iter()
                        .filter(|r| is_step_run(r) && !self.superseded.contains(&r.name_any()))
                        .map(|r| r.name_any()),
                );
            }
        }
        for run in &runs {
            let name = run.name_any();
            if run.spec.terminate && self.step_change_candidates.contains(&name) {
                self.superseded.insert(name);
            } else if is_step_run(run)
                && !run.spec.terminate
                && self.steps_change.is_none()
                && !self.superseded.contains(&name)
            {
                // A step analysis of the new steps started: what they owe before the promotion.
                self.analysis_owed = false;
            }
        }
        let runs = runs
            .iter()
            .filter(|run| !self.superseded.contains(&run.name_any()))
            .map(run_summary)
            .collect();
        Snapshot { route, state, runs }
    }

    /// One poll: the invariants, and which commands took effect.
    async fn poll(&mut self) -> Snapshot {
        let started = SystemTime::now();
        let snap = self.snapshot().await;
        self.note_analysis_abort(started, &snap);
        let state = &snap.state;
        if state.observed() {
            let aborted = is_aborted(state);
            let step = state.step().unwrap_or(0);
            let steps = steps_of(state);
            let canary = state.canary_hash();
            let mut retried = false;
            self.pending.retain(|p| {
                let done = match p.manual {
                    Manual::Promote => {
                        aborted || step > p.step || steps != p.steps || canary != p.canary
                    }
                    Manual::Abort => {
                        state.phase() == Some(RolloutPhase::Aborted) || canary != p.canary
                    }
                    Manual::Retry => !aborted,
                };
                retried |= done && p.manual == Manual::Retry;
                !done
            });
            if retried {
                // The polls between the retry and its effect saw the aborted attempt's step again, which
                // `Invariants::note` had already forgotten: the steps start over from here.
                self.inv.note(ManualCommand::Retry, &snap);
            }
        }
        self.inv.check(&snap);
        assert!(
            !(self.analysis_owed
                && snap.state.stable_hash().as_deref() == Some(self.canary.as_str())),
            "invariant 3: promoted after new steps without running their analysis step\nruns: {:#?}\nstate: {:#?}",
            snap.runs,
            snap.state
        );
        // The schedules delete no ReplicaSet, route or template and push no invalid spec: a Degraded
        // status (a stable "missing", an unreadable route, an invalid spec) can only come from planning on
        // a view of the cluster that is incomplete.
        assert!(
            snap.state.phase() != Some(RolloutPhase::Degraded),
            "Degraded with no fault that explains it: {}\nroute: {:?}\nruns: {:#?}\nstate: {:#?}",
            snap.state.message(),
            snap.route,
            snap.runs,
            snap.state
        );
        snap
    }

    /// An abort Serin decided itself at an analysis step (its analysis failed or errored) is held to the
    /// abort order (invariant 4) like a human's: at the analysis step nothing else of Serin's moves traffic,
    /// so every write to the route, the Services and the canary after the previous poll began is the
    /// abort's.
    fn note_analysis_abort(&mut self, started: SystemTime, snap: &Snapshot) {
        let state = &snap.state;
        let aborted = is_aborted(state);
        let steps = steps_of(state);
        let at_analysis = state
            .step()
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| steps.get(i))
            .is_some_and(|step| step.analysis.is_some());
        let manual_abort = self.pending.iter().any(|p| p.manual == Manual::Abort);
        if let Some(previous) = &self.previous {
            if previous.at_analysis && !previous.aborted && aborted && !manual_abort {
                self.analysis_aborts.push(AbortMark {
                    since: previous.started,
                    route_canary_weight: previous.route_canary,
                    stable_service_pinned: true,
                    canary_rs: format!("{APP}-{}", previous.canary),
                });
            }
        }
        self.previous = state.canary_hash().map(|canary| PollMemo {
            started,
            at_analysis: at_analysis && state.observed(),
            aborted,
            route_canary: snap.route.map(|w| w.canary),
            canary,
        });
    }

    /// Polls until `condition` holds; bounded by `timeout` and [`MAX_POLLS`].
    async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + timeout;
        for _ in 0..MAX_POLLS {
            let snap = self.poll().await;
            if condition(&snap) {
                return snap;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nroute: {:?}\nruns: {:#?}\nstate: {:#?}",
                    snap.route, snap.runs, snap.state
                );
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("{what}: still not there after {MAX_POLLS} polls");
    }

    /// The Services, the route and the templates, then the controllers, then the first revision, Healthy
    /// with every pod ready. The controllers start after the Services exist: a Rollout that reaches Serin
    /// before its Services reached Serin's watch cache is reported `InvalidSpec` for a moment, which is not
    /// what the schedules are about.
    async fn given_app(&mut self) {
        let world = &self.bed.world;
        world.given_services(APP, &[APP, &canary_service()]).await;
        let route: DynamicObject = serde_json::from_value(route_manifest()).expect("route decodes");
        http_routes(&world.admin)
            .create(&PostParams::default(), &route)
            .await
            .expect("route created");
        let address = self.bed.prometheus.url();
        let templates = Api::<AnalysisTemplate>::namespaced(world.admin.clone(), NS);
        for manifest in [
            // Three answers, one of them successful, pass: a Prometheus that comes back without the
            // window's data answers nothing for a few seconds.
            template_manifest(STEP_TEMPLATE, &address, "1s", Some(3), 3),
            template_manifest(BACKGROUND_TEMPLATE, &address, "2s", None, 20),
        ] {
            let template: AnalysisTemplate =
                serde_json::from_value(manifest).expect("template decodes");
            templates
                .create(&PostParams::default(), &template)
                .await
                .expect("AnalysisTemplate accepted");
        }
        self.bed.start_controllers().await;
        self.record(format!(
            "setup: controllers {:?} started, Prometheus at {address}",
            self.bed.writers()
        ));
        self.bed
            .world
            .given_rollout(rollout_manifest(&self.schedule.setup, &self.git))
            .await
            .expect("Rollout accepted");
        let replicas = self.git.replicas;
        let healthy = self
            .until("the first revision Healthy", Duration::from_secs(30), |s| {
                let state = &s.state;
                state.is(RolloutPhase::Healthy)
                    && state
                        .stable_hash()
                        .is_some_and(|h| state.ready_of(&h) == replicas)
            })
            .await;
        self.stable = healthy.state.stable_hash().unwrap_or_default();
    }

    /// Git brings the second revision; the schedule's clock starts once Serin recorded it as the canary.
    async fn release(&mut self) {
        self.git.revision = 2;
        self.git_apply().await;
        let stable = self.stable.clone();
        let started = self
            .until(
                "the second revision recorded as canary",
                Duration::from_secs(30),
                |s| s.state.observed() && s.state.canary_hash().is_some_and(|c| c != stable),
            )
            .await;
        self.canary = started.state.canary_hash().unwrap_or_default();
        self.t0 = Instant::now();
        self.record(format!(
            "stable {} canary {} ({:?})",
            self.stable, self.canary, self.schedule.setup.health
        ));
    }

    /// A server-side apply of what Git holds, forced, as Argo CD or Flux does it; returns the generation.
    async fn git_apply(&mut self) -> i64 {
        let current = self.bed.world.state(APP).await;
        // Like Argo CD's ignoreDifferences on spec.replicas: Git does not undo what the scale subresource set.
        if let Some(replicas) = current.rollout.spec.replicas {
            self.git.replicas = replicas;
        }
        let manifest = rollout_manifest(&self.schedule.setup, &self.git);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.bed.world.admin.clone(),
            NS,
            &ApiResource::erase::<Rollout>(&()),
        );
        let applied = api
            .patch(
                APP,
                &PatchParams::apply("argocd-controller").force(),
                &Patch::Apply(manifest),
            )
            .await
            .expect("Git manifest applied");
        applied.metadata.generation.unwrap_or_default()
    }

    /// Plays the timeline, polling between actions.
    async fn play(&mut self) {
        let timeline = self.schedule.timeline.clone();
        for timed in &timeline {
            let when = self.t0 + Duration::from_millis(timed.at_ms);
            for _ in 0..MAX_POLLS {
                if Instant::now() >= when {
                    break;
                }
                self.poll_and_command().await;
                let left = when.saturating_duration_since(Instant::now());
                tokio::time::sleep(left.min(POLL)).await;
            }
            let line = match self.act(timed.action).await {
                Ok(done) => format!("+{:>5.1}s  {}: {done}", self.elapsed(), timed.action),
                Err(skipped) => {
                    format!(
                        "+{:>5.1}s  {}: skipped, {skipped}",
                        self.elapsed(),
                        timed.action
                    )
                }
            };
            self.record(line);
        }
        // The commands still waiting for their moment get it (each waits a bounded time).
        for _ in 0..MAX_POLLS {
            if self.armed.is_empty() {
                break;
            }
            self.poll_and_command().await;
            tokio::time::sleep(POLL).await;
        }
    }

    /// One poll, then the first armed command a human would send now is sent; armed commands whose time
    /// ran out are dropped.
    async fn poll_and_command(&mut self) {
        let snap = self.poll().await;
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut ready = None;
        for (index, armed) in self.armed.iter().enumerate() {
            match self.command_makes_sense(armed.manual, &snap.state) {
                Ok(()) => {
                    ready = Some(index);
                    break;
                }
                Err(why) if now >= armed.until => expired.push((index, why)),
                Err(_) => {}
            }
        }
        if let Some(index) = ready {
            let armed = self.armed.remove(index);
            let sent = self.send(armed.manual, &snap).await;
            self.record(format!(
                "+{:>5.1}s  serin {:?} (armed at +{:.1}s): {}",
                self.elapsed(),
                armed.manual,
                armed.armed_at,
                sent.unwrap_or_else(|error| format!("refused: {error}"))
            ));
            return;
        }
        for (index, why) in expired.into_iter().rev() {
            let armed = self.armed.remove(index);
            self.record(format!(
                "+{:>5.1}s  serin {:?} (armed at +{:.1}s): not sent, {why}",
                self.elapsed(),
                armed.manual,
                armed.armed_at
            ));
        }
    }

    /// Carries out one action; Err says why it was skipped.
    async fn act(&mut self, action: Action) -> Result<String, String> {
        match action {
            Action::KillControllers => {
                let killed = self.bed.kill_all();
                Ok(format!("killed {killed:?}"))
            }
            Action::StartControllers {
                lagging_replica_sets_ms,
            } => {
                let started = self
                    .bed
                    .start_dead(lagging_replica_sets_ms.map(Duration::from_millis))
                    .await;
                if started.is_empty() {
                    Err("every controller runs".into())
                } else {
                    Ok(format!("started {started:?}"))
                }
            }
            Action::KillLeader => {
                let holder = lease_holder(&self.bed.world).await;
                let slot =
                    self.bed.slots.iter_mut().find(|slot| {
                        Some(&slot.identity) == holder.as_ref() && slot.replica.is_some()
                    });
                match slot.and_then(|slot| slot.replica.take().map(|r| (slot.identity.clone(), r)))
                {
                    Some((identity, mut replica)) => {
                        replica.kill();
                        Ok(format!("killed {identity}"))
                    }
                    None => Err(format!("the holder {holder:?} is not running")),
                }
            }
            Action::LoseLease { renewals } => {
                let Some(holder) = lease_holder(&self.bed.world).await else {
                    return Err("nobody holds the Lease".into());
                };
                self.bed
                    .world
                    .sim
                    .faults()
                    .add_rule(
                        FaultRule::fail("update", "leases", 500)
                            .user(&holder)
                            .times(renewals),
                    )
                    .expect("valid rule");
                Ok(format!("{holder} loses it"))
            }
            Action::FailWrites { kind, error, count } => {
                let (verb, resource, subresource) = kind.request();
                for user in self.bed.writers() {
                    let mut rule = FaultRule {
                        action: error.action(),
                        ..FaultRule::fail(verb, resource, 500)
                    }
                    .user(&user)
                    .times(count);
                    if let Some(subresource) = subresource {
                        rule = rule.subresource(subresource);
                    }
                    self.bed
                        .world
                        .sim
                        .faults()
                        .add_rule(rule)
                        .expect("valid rule");
                }
                Ok("armed".into())
            }
            Action::Watch { resource, fault } => {
                let faults = self.bed.world.sim.faults();
                if fault == WatchFault::CloseAll {
                    faults.close_watches();
                    return Ok("closed".into());
                }
                for user in self.bed.writers() {
                    let scope = resource.scope(&user);
                    match fault {
                        WatchFault::CloseAll => {}
                        WatchFault::Expire => {
                            faults.expire_next_watches(scope.clone(), 1);
                            faults.close_watches_of(scope);
                        }
                        WatchFault::Hold(ms) => {
                            faults.hold_watch_events(scope, Duration::from_millis(ms))
                        }
                        WatchFault::Drop(ms) => {
                            faults.drop_watch_events(scope, Duration::from_millis(ms))
                        }
                    }
                }
                Ok("done".into())
            }
            Action::CanaryUnready { pods } => {
                if !self.bed.world.sim.workload_running() {
                    return Err("the workload simulator is stopped".into());
                }
                self.traffic_settled().await?;
                let replica_set = format!("{APP}-{}", self.canary);
                match self
                    .bed
                    .world
                    .sim
                    .make_pods_unready(NS, &replica_set, pods)
                    .await
                {
                    Ok(names) => {
                        self.forced_unready.insert(replica_set);
                        self.disrupt(&format!("{names:?} unready"));
                        Ok(format!("{names:?}"))
                    }
                    Err(error) => Err(error.to_string()),
                }
            }
            Action::CanaryReady => {
                let mut names = Vec::new();
                for replica_set in std::mem::take(&mut self.forced_unready) {
                    match self.bed.world.sim.make_pods_ready(NS, &replica_set).await {
                        Ok(ready) => names.extend(ready),
                        Err(error) => return Err(error.to_string()),
                    }
                }
                if names.is_empty() {
                    Err("no pod was forced unready".into())
                } else {
                    Ok(format!("{names:?}"))
                }
            }
            Action::StopWorkload => match self.bed.world.sim.stop_workload().await {
                Ok(true) => Ok("stopped".into()),
                Ok(false) => Err("already stopped".into()),
                Err(error) => Err(error.to_string()),
            },
            Action::StartWorkload => match self.bed.world.sim.start_workload().await {
                Ok(true) => Ok("started".into()),
                Ok(false) => Err("already running".into()),
                Err(error) => Err(error.to_string()),
            },
            Action::Git(change) => {
                self.git.syncs += 1;
                match change {
                    GitChange::Annotation => {}
                    GitChange::UnrelatedField => self.git.revision_history_limit += 1,
                    GitChange::NewSteps => {
                        self.git.steps = self.git.steps.other();
                        let before = self.poll().await;
                        let state = &before.state;
                        // New steps for a canary in flight start again with their analysis step; only a
                        // promote already on its way may still promote it on the old steps.
                        self.analysis_owed = state.observed()
                            && state.canary_hash().is_some()
                            && !is_aborted(state)
                            && !self.pending.iter().any(|p| p.manual == Manual::Promote);
                        self.supersede_step_runs().await;
                    }
                }
                let generation = self.git_apply().await;
                if change == GitChange::NewSteps {
                    self.steps_change = Some(generation);
                    self.disrupt("new steps ask less than the weight in place");
                }
                Ok(format!("generation {generation}"))
            }
            Action::Scale(replicas) => {
                self.traffic_settled().await?;
                let rollouts: Api<Rollout> = Api::namespaced(self.bed.world.admin.clone(), NS);
                rollouts
                    .patch_scale(
                        APP,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
                    )
                    .await
                    .expect("scaled");
                let before = self.git.replicas;
                self.git.replicas = replicas;
                self.disrupt(&format!("scaled to {replicas}"));
                if replicas > before {
                    self.inv.scaled_up_from(before);
                }
                Ok("scaled".into())
            }
            Action::Command(manual) => {
                self.armed.push(Armed {
                    manual,
                    armed_at: self.elapsed(),
                    until: Instant::now() + COMMAND_PATIENCE,
                });
                Ok(format!(
                    "armed: sent when a human would, within {COMMAND_PATIENCE:?}"
                ))
            }
            Action::StopPrometheus => {
                if !self.bed.prometheus.running() {
                    return Err("already stopped".into());
                }
                self.bed.prometheus.shut_down().await;
                self.prometheus_down_since = Some(Instant::now());
                Ok("stopped".into())
            }
            Action::StartPrometheus => {
                if self.bed.prometheus.running() {
                    return Err("already running".into());
                }
                self.bed.prometheus.spawn();
                if let Some(since) = self.prometheus_down_since.take() {
                    self.prometheus_down += since.elapsed();
                }
                Ok("started".into())
            }
            Action::ReactionRestarts { since_ms } => {
                let began = self.t0 + Duration::from_millis(since_ms);
                let disrupted_meanwhile = self
                    .last_disruption
                    .is_some_and(|at| at + REACTION >= began);
                if disrupted_meanwhile {
                    self.disrupt(&format!(
                        "reaction time restarts at +{:.1}s",
                        self.elapsed()
                    ));
                    Ok("a disruption was pending".into())
                } else {
                    Err("no disruption was pending".into())
                }
            }
        }
    }

    /// Waits (up to [`SETTLE_PATIENCE`]) until Serin has not changed traffic for [`TRAFFIC_QUIET`],
    /// and polls once more. A disruption comes after that poll: the invariants hold Serin strictly to a
    /// weight it raises between two polls, and a raise it made on ready pods just before the disruption
    /// would otherwise look like a raise onto the disrupted pods.
    async fn traffic_settled(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_PATIENCE;
        for _ in 0..MAX_POLLS {
            self.poll().await;
            let quiet = self
                .last_object_write()
                .is_none_or(|at| at.elapsed().unwrap_or_default() >= TRAFFIC_QUIET);
            if quiet {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Serin kept changing traffic for {SETTLE_PATIENCE:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        Err("never quiet".into())
    }

    /// Marks the step runs that exist now: new steps set their verdicts aside.
    async fn supersede_step_runs(&mut self) {
        let runs = Api::<AnalysisRun>::namespaced(self.bed.world.admin.clone(), NS)
            .list(&ListParams::default().labels(&format!("{}={APP}", labels::ROLLOUT_NAME)))
            .await
            .expect("list AnalysisRuns")
            .items;
        self.superseded
            .extend(runs.iter().filter(|r| is_step_run(r)).map(|r| r.name_any()));
    }

    /// A human's command, sent once it makes sense (see [`Runner::command_makes_sense`]), waiting up to
    /// [`COMMAND_PATIENCE`] for that.
    async fn command(&mut self, manual: Manual) -> Result<String, String> {
        let deadline = Instant::now() + COMMAND_PATIENCE;
        let mut snap = self.poll().await;
        for _ in 0..MAX_POLLS {
            match self.command_makes_sense(manual, &snap.state) {
                Ok(()) => break,
                Err(why) if Instant::now() >= deadline => return Err(why),
                Err(_) => {}
            }
            tokio::time::sleep(POLL).await;
            snap = self.poll().await;
        }
        self.send(manual, &snap).await
    }

    /// Sends `manual`, which makes sense in `snap`, noting it for the invariants first.
    async fn send(&mut self, manual: Manual, snap: &Snapshot) -> Result<String, String> {
        let state = &snap.state;
        if manual == Manual::Retry {
            // The runs of the aborted attempt: the retry sets their verdicts aside.
            let runs = Api::<AnalysisRun>::namespaced(self.bed.world.admin.clone(), NS)
                .list(&ListParams::default().labels(&format!("{}={APP}", labels::ROLLOUT_NAME)))
                .await
                .expect("list AnalysisRuns")
                .items;
            self.superseded.extend(runs.iter().map(|r| r.name_any()));
        }
        self.inv.note(manual.command(), snap);
        let pending = Pending {
            manual,
            sent_at: self.elapsed(),
            step: state.step().unwrap_or(0),
            steps: steps_of(state),
            canary: state.canary_hash(),
        };
        serin::ops::commands::send(&self.bed.world.admin, NS, APP, manual.command())
            .await
            .map_err(|error| error.to_string())?;
        if manual != Manual::Promote {
            self.last_manual = Some(manual);
        }
        let at = pending.step;
        self.pending.push(pending);
        Ok(format!("sent at step {at}"))
    }

    /// Whether a human would send `manual` now: promote while the canary waits at an indefinite pause,
    /// abort then or when its analysis is inconclusive (once Serin has been quiet a while, so that no
    /// decision is in flight), retry once it is aborted.
    fn command_makes_sense(&self, manual: Manual, state: &State) -> Result<(), String> {
        if !state.observed() {
            return Err("the status is not about the current spec yet".into());
        }
        if state.canary_hash().is_none() {
            return Err("no canary".into());
        }
        match manual {
            Manual::Promote if !waits_for_promote(state) => Err(format!(
                "not waiting at an indefinite pause ({:?} at step {:?})",
                state.phase(),
                state.step()
            )),
            Manual::Abort if !(waits_for_promote(state) || paused_inconclusive(state)) => {
                Err(format!(
                    "not waiting for a human ({:?} at step {:?})",
                    state.phase(),
                    state.step()
                ))
            }
            Manual::Abort
                if self
                    .last_object_write()
                    .is_some_and(|at| at.elapsed().unwrap_or_default() < TRAFFIC_QUIET) =>
            {
                Err(format!(
                    "Serin changed traffic less than {TRAFFIC_QUIET:?} ago"
                ))
            }
            Manual::Retry if !state.is(RolloutPhase::Aborted) => {
                Err(format!("not aborted ({:?})", state.phase()))
            }
            _ => Ok(()),
        }
    }

    /// When Serin last changed an object that carries traffic (the route, a Service, a ReplicaSet).
    fn last_object_write(&self) -> Option<SystemTime> {
        let writers = self.bed.writers();
        self.bed
            .world
            .sim
            .request_log()
            .filter(|r| {
                writers.contains(&r.user)
                    && is_write(r)
                    && r.status < 300
                    && matches!(
                        r.resource.as_str(),
                        "httproutes" | "services" | "replicasets"
                    )
            })
            .iter()
            .map(|r| r.time)
            .max()
    }

    /// Ends every fault still in force: rules and watch faults cleared, the workload simulator, Prometheus
    /// and every controller running, forced pods ready.
    async fn restore(&mut self) {
        self.bed.world.sim.faults().clear();
        let mut ended = Vec::new();
        if let Ok(true) = self.bed.world.sim.start_workload().await {
            ended.push("workload simulator started");
        }
        if !self.forced_unready.is_empty() {
            let _ = self.act(Action::CanaryReady).await;
            ended.push("canary pods ready");
        }
        if !self.bed.prometheus.running() {
            let _ = self.act(Action::StartPrometheus).await;
            ended.push("Prometheus started");
        }
        if !self.bed.start_dead(None).await.is_empty() {
            ended.push("controllers started");
        }
        let pending_disruption = self
            .last_disruption
            .is_some_and(|at| at.elapsed() < REACTION + Duration::from_secs(10));
        if pending_disruption {
            self.disrupt("the faults stopped");
        }
        self.record(format!(
            "+{:>5.1}s  faults stopped: {ended:?}",
            self.elapsed()
        ));
    }

    /// Polls (bounded) until every command sent took effect.
    async fn commands_took_effect(&mut self) {
        let deadline = Instant::now() + CONVERGENCE;
        for _ in 0..MAX_POLLS {
            let snap = self.poll().await;
            if self.pending.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "commands without effect {CONVERGENCE:?} after they were sent: {:?}\nroute: {:?}\nruns: {:#?}\n\
                     state: {:#?}",
                    self.pending, snap.route, snap.runs, snap.state
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Invariant 7: with the faults stopped, Healthy (promoted at every pause on the way) or Aborted.
    async fn converge(&mut self) -> Snapshot {
        let deadline = Instant::now() + CONVERGE_WITHIN;
        for _ in 0..MAX_POLLS {
            let snap = self.poll().await;
            let state = &snap.state;
            let settled_healthy = state.is(RolloutPhase::Healthy)
                && state.stable_hash().is_some()
                && state.stable_hash() == state.current_hash();
            // A command still on its way (a retry of the aborted attempt) moves it on again.
            if (settled_healthy || state.is(RolloutPhase::Aborted)) && self.pending.is_empty() {
                return snap;
            }
            if waits_for_promote(state) {
                let sent = self.command(Manual::Promote).await;
                self.record(format!(
                    "+{:>5.1}s  converge: promote: {sent:?}",
                    self.elapsed()
                ));
                self.commands_took_effect().await;
                continue;
            }
            if paused_inconclusive(state) {
                // An analysis that got no answer from a Prometheus that lost its data waits for a human; one
                // that aborts is the safe answer. Without an outage nothing should have left it inconclusive.
                assert!(
                    self.prometheus_down > Duration::ZERO,
                    "inconclusive analysis without a Prometheus outage\nruns: {:#?}\nstate: {:#?}",
                    snap.runs,
                    snap.state
                );
                let sent = self.command(Manual::Abort).await;
                self.record(format!(
                    "+{:>5.1}s  converge: abort the inconclusive analysis: {sent:?}",
                    self.elapsed()
                ));
                self.commands_took_effect().await;
                continue;
            }
            if Instant::now() >= deadline {
                panic!(
                    "invariant 7: not Healthy or Aborted {CONVERGE_WITHIN:?} after the faults stopped\nroute: {:?}\n\
                     runs: {:#?}\nstate: {:#?}",
                    snap.route, snap.runs, snap.state
                );
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("invariant 7: not converged after {MAX_POLLS} polls");
    }

    /// The end the seed must reach: a bad canary Aborted with the first revision still stable; a good one
    /// Healthy on the new revision, unless a human aborted it last or a Prometheus outage long enough to
    /// error its analysis did.
    fn expect_outcome(&self, end: &Snapshot) {
        let state = &end.state;
        let healthy_on_canary = state.is(RolloutPhase::Healthy)
            && state.stable_hash().as_deref() == Some(self.canary.as_str());
        let aborted = state.is(RolloutPhase::Aborted);
        match self.schedule.setup.health {
            Health::Bad => {
                assert!(
                    aborted && state.stable_hash().as_deref() == Some(self.stable.as_str()),
                    "a canary answering {BAD_ERROR_RATE} errors ended {:?} with stable {:?}: {}",
                    state.phase(),
                    state.stable_hash(),
                    state.message()
                );
            }
            Health::Good if healthy_on_canary => {}
            Health::Good => {
                let by_human = self.last_manual == Some(Manual::Abort);
                let by_outage = self.prometheus_down >= OUTAGE_THAT_MAY_ABORT
                    && state.message().contains("errors in a row");
                assert!(
                    aborted && (by_human || by_outage),
                    "a good canary ended {:?} (stable {:?}, last abort or retry {:?}, Prometheus down {:?}): {}",
                    state.phase(),
                    state.stable_hash(),
                    self.last_manual,
                    self.prometheus_down,
                    state.message()
                );
            }
        }
    }

    /// Invariant 6, the other half: every command sent took effect, and none is left in the status.
    fn expect_commands_done(&self, end: &Snapshot) {
        let never: Vec<String> = self
            .pending
            .iter()
            .map(|p| {
                format!(
                    "{:?} sent at +{:.1}s at step {} of canary {:?}",
                    p.manual, p.sent_at, p.step, p.canary
                )
            })
            .collect();
        assert!(
            never.is_empty(),
            "commands that never took effect: {never:#?}"
        );
        let left = end
            .state
            .rollout
            .status
            .as_ref()
            .and_then(|s| s.commands.clone())
            .unwrap_or_default();
        assert!(
            left.promote.is_none() && !left.abort && !left.retry,
            "commands left in the status: {left:?}"
        );
    }
}

fn is_step_run(run: &AnalysisRun) -> bool {
    run.labels().contains_key(labels::STEP_INDEX)
}

/// What invariant 3 needs of a run, by the verdict rules: a run still measuring blocks a promotion only
/// with a failed measurement (an error or an inconclusive answer within its limits is not a verdict).
fn run_summary(run: &AnalysisRun) -> RunSummary {
    let status = run.status.clone().unwrap_or_default();
    RunSummary {
        name: run.name_any(),
        hash: run
            .labels()
            .get(labels::POD_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        phase: status.phase,
        terminated: run.spec.terminate,
        successful: status.metric_results.iter().map(|r| r.successful).sum(),
        unsuccessful: status.metric_results.iter().map(|r| r.failed).sum(),
        message: status.message.clone(),
    }
}

fn steps_of(state: &State) -> Vec<CanaryStep> {
    state
        .rollout
        .spec
        .strategy
        .canary
        .as_ref()
        .map(|c| c.steps.clone())
        .unwrap_or_default()
}

fn is_aborted(state: &State) -> bool {
    state.phase() == Some(RolloutPhase::Aborted)
        || state.rollout.status.as_ref().is_some_and(|s| s.abort)
}

/// The canary waits for a human because its analysis was inconclusive.
fn paused_inconclusive(state: &State) -> bool {
    state.is(RolloutPhase::Paused)
        && !is_aborted(state)
        && state.rollout.status.as_ref().is_some_and(|s| {
            s.pause_conditions
                .iter()
                .any(|c| c.reason == reason::PAUSED_INCONCLUSIVE)
        })
}

/// The canary waits for a human at an indefinite pause (and for nothing else, such as an inconclusive
/// analysis).
fn waits_for_promote(state: &State) -> bool {
    let steps = steps_of(state);
    let at_pause = state
        .step()
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| steps.get(i))
        .is_some_and(|step| step.pause.as_ref().is_some_and(|p| p.duration.is_none()));
    let inconclusive = state.rollout.status.as_ref().is_some_and(|s| {
        s.pause_conditions
            .iter()
            .any(|c| c.reason == reason::PAUSED_INCONCLUSIVE)
    });
    state.is(RolloutPhase::Paused) && at_pause && !inconclusive && !is_aborted(state)
}

/// Runs one seed in a cluster of its own; Err carries what failed.
async fn scenario(bed: &mut Bed, schedule: &Schedule, journal: Arc<Mutex<Vec<String>>>) -> String {
    let started = Instant::now();
    let mut inv = Invariants::new(Target::routed(APP));
    if schedule.setup.controllers == Controllers::Pair {
        inv = inv.with_replicas(&REPLICA_IDS, bed.timing.lease_duration);
    }
    let mut runner = Runner {
        git: GitRollout {
            revision: 1,
            steps: Steps::First,
            replicas: schedule.setup.replicas,
            syncs: 0,
            revision_history_limit: 3,
        },
        bed,
        schedule,
        inv,
        journal,
        t0: Instant::now(),
        stable: String::new(),
        canary: String::new(),
        superseded: BTreeSet::new(),
        steps_change: None,
        armed: Vec::new(),
        pending: Vec::new(),
        previous: None,
        analysis_owed: false,
        step_change_candidates: BTreeSet::new(),
        analysis_aborts: Vec::new(),
        last_manual: None,
        last_disruption: None,
        forced_unready: BTreeSet::new(),
        prometheus_down_since: None,
        prometheus_down: Duration::ZERO,
    };
    runner.given_app().await;
    runner.release().await;
    runner.play().await;
    runner.restore().await;
    let end = runner.converge().await;
    // Still there a moment later: nothing flaps once converged.
    let held = runner
        .until("a second poll of the converged state", CONVERGENCE, |_| {
            true
        })
        .await;
    runner.expect_outcome(&held);
    runner.expect_commands_done(&held);
    let summary = runner.inv.finish(&runner.bed.world);
    let records = runner.bed.world.sim.request_log().snapshot();
    let writers = runner.bed.writers();
    let writers: Vec<&str> = writers.iter().map(String::as_str).collect();
    for mark in &runner.analysis_aborts {
        assert_abort_order(&records, &writers, &runner.inv.target, mark);
    }
    format!(
        "seed {}: {:?} in {:.1}s ({:.1}s after the new revision); {summary}; {} aborts by analysis checked",
        schedule.seed,
        end.state.phase(),
        started.elapsed().as_secs_f64(),
        runner.elapsed(),
        runner.analysis_aborts.len()
    )
}

/// What became of one seed.
struct Verdict {
    seed: u64,
    outcome: Result<String, String>,
    journal: Vec<String>,
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

async fn run_seed(seed: u64, crds: PathBuf) -> Verdict {
    let schedule = schedule(seed);
    let journal = Arc::new(Mutex::new(Vec::new()));
    let outcome = match AssertUnwindSafe(Bed::start(&schedule.setup, &crds))
        .catch_unwind()
        .await
    {
        Err(payload) => Err(format!(
            "the cluster did not start: {}",
            panic_text(&*payload)
        )),
        Ok(mut bed) => {
            let played = AssertUnwindSafe(tokio::time::timeout(
                SEED_BOUND,
                scenario(&mut bed, &schedule, journal.clone()),
            ))
            .catch_unwind()
            .await;
            bed.stop().await;
            match played {
                Ok(Ok(summary)) => Ok(summary),
                Ok(Err(_)) => Err(format!("the seed ran longer than {SEED_BOUND:?}")),
                Err(payload) => Err(panic_text(&*payload)),
            }
        }
    };
    let journal = journal.lock().map(|j| j.clone()).unwrap_or_default();
    Verdict {
        seed,
        outcome,
        journal,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Which seeds.

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chaos.regressions");

/// The seeds of `crates/serin/tests/chaos.regressions`: one per line, `#` starts a comment.
fn parse_regressions(text: &str) -> Result<Vec<u64>, String> {
    let mut seeds = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let seed = content.parse::<u64>().map_err(|error| {
            format!(
                "crates/serin/tests/chaos.regressions line {}: {content:?} is not a seed ({error})",
                index + 1
            )
        })?;
        seeds.push(seed);
    }
    Ok(seeds)
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse::<u64>() {
        Ok(number) => Some(number),
        Err(error) => panic!("{name}={value:?} is not a number: {error}"),
    }
}

/// The regressions, then the CI seeds (or `SERIN_CHAOS_SEEDS` from `SERIN_CHAOS_FIRST_SEED`); only
/// `SERIN_CHAOS_SEED` when it is set.
fn seeds_to_run() -> Vec<u64> {
    if let Some(seed) = env_number("SERIN_CHAOS_SEED") {
        return vec![seed];
    }
    let text = std::fs::read_to_string(REGRESSIONS)
        .unwrap_or_else(|error| panic!("cannot read {REGRESSIONS}: {error}"));
    let mut seeds = parse_regressions(&text).unwrap_or_else(|error| panic!("{error}"));
    let count = env_number("SERIN_CHAOS_SEEDS").unwrap_or(CI_SEEDS);
    let first = env_number("SERIN_CHAOS_FIRST_SEED").unwrap_or(1);
    for seed in first..first.saturating_add(count) {
        if !seeds.contains(&seed) {
            seeds.push(seed);
        }
    }
    seeds
}

#[test]
fn the_regressions_file_names_one_seed_per_line() {
    let text =
        std::fs::read_to_string(REGRESSIONS).expect("crates/serin/tests/chaos.regressions exists");
    parse_regressions(&text).expect("every line is a seed or a comment");
    assert_eq!(
        parse_regressions("# header\n\n42  # why\n7\n"),
        Ok(vec![42, 7])
    );
    let error = parse_regressions("1\nforty-two # oops\n").expect_err("not a seed");
    assert!(
        error.contains("line 2") && error.contains("forty-two"),
        "{error}"
    );
}

#[test]
fn a_seed_always_means_the_same_schedule() {
    let first = schedule(7);
    let again = schedule(7);
    assert_eq!(first.to_string(), again.to_string());
    assert_ne!(first.to_string(), schedule(8).to_string());
    // The generator is SplitMix64 (reference values for seed 0), not a library's StdRng that may change.
    let mut rng = SplitMix64(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    // Every schedule draws its faults inside the window, in time order, and the faults that need two
    // replicas only when there are two.
    for seed in 1..=200 {
        let schedule = schedule(seed);
        let times: Vec<u64> = schedule.timeline.iter().map(|t| t.at_ms).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{schedule}");
        let starts = schedule
            .timeline
            .iter()
            .filter(|t| !matches!(t.action, Action::ReactionRestarts { .. }))
            .count();
        assert!(starts >= 5, "{schedule}");
        if schedule.setup.controllers == Controllers::Single {
            assert!(
                schedule
                    .timeline
                    .iter()
                    .all(|t| !matches!(t.action, Action::KillLeader | Action::LoseLease { .. })),
                "{schedule}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_never_break_an_invariant() {
    let Some(crds) =
        support::fixtures::upstream_crds_or_skip("seeded_fault_schedules_never_break_an_invariant")
    else {
        return;
    };
    let seeds = seeds_to_run();
    let parallel = env_number("SERIN_CHAOS_PARALLEL")
        .map_or(DEFAULT_PARALLEL, |n| usize::try_from(n.max(1)).unwrap_or(1));
    let started = Instant::now();
    let mut queue = seeds.iter().copied();
    let mut running = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    let mut passed = 0;
    loop {
        while running.len() < parallel {
            let Some(seed) = queue.next() else { break };
            running.spawn(run_seed(seed, crds.clone()));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let verdict = joined.expect("run_seed catches its panics");
        match &verdict.outcome {
            Ok(summary) => {
                passed += 1;
                println!(
                    "{summary}\n{}{}",
                    schedule(verdict.seed),
                    verdict.journal.join("\n")
                );
            }
            Err(error) => {
                println!("seed {} FAILED: {}", verdict.seed, first_lines(error, 6));
                failures.push(verdict);
            }
        }
    }
    println!(
        "{passed} of {} seeds passed in {:.0}s ({parallel} at once)",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        return;
    }
    let mut report = String::new();
    for failure in &failures {
        let error = failure.outcome.as_ref().err().cloned().unwrap_or_default();
        report.push_str(&format!(
            "\n==== seed {} failed:\n{}\n---- schedule:\n{}---- what was done:\n{}\n---- run it again:\n  \
             SERIN_CHAOS_SEED={} cargo nextest run --test chaos --no-capture\n---- keep it: add a line \
             `{}  # <what broke>` to crates/serin/tests/chaos.regressions\n",
            failure.seed,
            error,
            schedule(failure.seed),
            failure.journal.join("\n"),
            failure.seed,
            failure.seed
        ));
    }
    // CI keeps the end of a failing test's output: the seeds and what broke come last, after the dumps.
    for failure in &failures {
        let error = failure.outcome.as_ref().err().cloned().unwrap_or_default();
        let first_lines: Vec<&str> = error.lines().take(3).collect();
        report.push_str(&format!(
            "\n==== seed {} (SERIN_CHAOS_SEED={}): {}",
            failure.seed,
            failure.seed,
            first_lines.join(" / ")
        ));
    }
    panic!(
        "{} of {} chaos seeds failed: {:?}{report}",
        failures.len(),
        seeds.len(),
        failures.iter().map(|f| f.seed).collect::<Vec<_>>()
    );
}

fn first_lines(text: &str, count: usize) -> String {
    text.lines().take(count).collect::<Vec<_>>().join("\n")
}
