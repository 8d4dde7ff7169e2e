//! Simulated kube-controller-manager and kubelet: turns ReplicaSets (and Deployments) into Pods and walks
//! each Pod through its lifecycle, talking to the API server only through `kube::Client`.
//!
//! Pod templates steer the simulated kubelet with these annotations (also documented in `docs/sim.md`):
//!
//! | annotation                          | example   | effect                                                          |
//! |-------------------------------------|-----------|-----------------------------------------------------------------|
//! | `sim.serin.dev/ready-after`         | `"2s"`    | the pod turns Ready this long after it started (default 300ms)  |
//! | `sim.serin.dev/never-ready`         | `"true"`  | the pod runs but never turns Ready                              |
//! | `sim.serin.dev/crash-loop`          | `"true"`  | restartCount grows, waiting reason `CrashLoopBackOff`, never Ready |
//! | `sim.serin.dev/error-rate`          | `"0.2"`   | traffic simulator: fraction of requests answered 500            |
//! | `sim.serin.dev/latency-p50`         | `"20ms"`  | traffic simulator: median response time (default 10ms)          |
//! | `sim.serin.dev/latency-p99`         | `"300ms"` | traffic simulator: 99th percentile response time (default 50ms) |
//! | `sim.serin.dev/requests-per-second` | `"50"`    | on a Service or routing object: its request rate                |

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Pod-template annotation: how long after start the pod turns Ready (e.g. `"2s"`).
pub const ANNOTATION_READY_AFTER: &str = "sim.serin.dev/ready-after";
/// Pod-template annotation: `"true"` keeps the pod running but never Ready.
pub const ANNOTATION_NEVER_READY: &str = "sim.serin.dev/never-ready";
/// Pod-template annotation: `"true"` makes the containers crash-loop (never Ready).
pub const ANNOTATION_CRASH_LOOP: &str = "sim.serin.dev/crash-loop";

/// Label the Deployment controller puts on its ReplicaSets and their Pods.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Expectations older than this are forgotten, so a lost watch event cannot wedge a ReplicaSet.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Real kubelets cap the crash-loop back-off at five minutes.
const MAX_CRASH_BACKOFF: Duration = Duration::from_secs(300);
/// A fast crash loop would flood the API server with status writes.
const MIN_CRASH_BACKOFF: Duration = Duration::from_millis(200);
/// At most this many pods are created or deleted per ReplicaSet reconcile (like the real slow start).
const MAX_BURST: usize = 500;

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// How long a pod takes to turn Ready unless its template says otherwise.
    pub default_ready_delay: Duration,
    /// Every object is reconciled at least this often, even without events.
    pub resync: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            default_ready_delay: Duration::from_millis(300),
            resync: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("object {0} has no namespace, name or uid")]
    MissingMetadata(String),
    #[error("pod cache is gone")]
    CacheClosed,
    #[error("creating pod {name}: {source}")]
    CreatePod { name: String, source: kube::Error },
    #[error("deleting pod {name}: {source}")]
    DeletePod { name: String, source: kube::Error },
    #[error("writing status of pod {name}: {source}")]
    WritePodStatus { name: String, source: kube::Error },
    #[error("writing status of replicaset {name}: {source}")]
    WriteReplicaSetStatus { name: String, source: kube::Error },
    #[error("writing replicaset {name}: {source}")]
    WriteReplicaSet { name: String, source: kube::Error },
    #[error("writing status of deployment {name}: {source}")]
    WriteDeploymentStatus { name: String, source: kube::Error },
    #[error("a reconcile panicked")]
    ReconcilePanicked,
    #[error("encoding {0}: {1}")]
    Encode(&'static str, serde_json::Error),
    #[error("building the simulator's client: {0}")]
    Client(String),
}

impl WorkloadError {
    pub fn category(&self) -> &'static str {
        match self {
            WorkloadError::MissingMetadata(_) => "missing_metadata",
            WorkloadError::CacheClosed => "cache_closed",
            WorkloadError::CreatePod { .. } => "create_pod",
            WorkloadError::DeletePod { .. } => "delete_pod",
            WorkloadError::WritePodStatus { .. } => "write_pod_status",
            WorkloadError::WriteReplicaSetStatus { .. } => "write_replicaset_status",
            WorkloadError::WriteReplicaSet { .. } => "write_replicaset",
            WorkloadError::WriteDeploymentStatus { .. } => "write_deployment_status",
            WorkloadError::ReconcilePanicked => "reconcile_panicked",
            WorkloadError::Encode(..) => "encode",
            WorkloadError::Client(_) => "client",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?} (expected e.g. \"300ms\", \"2s\", \"1.5m\")")]
pub struct InvalidDuration(pub String);

/// Parses the Go-style durations used in annotations, as Go's `time.ParseDuration` does: numbers (with an
/// optional fraction) each followed by `ns`, `us`/`µs`, `ms`, `s`, `m` or `h`; sums like `"1m30s"` are
/// accepted; a bare number has no unit and is refused. The sim parses its own annotations so that it shares
/// no code with the operator it tests.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration(text.to_string());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut seconds = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let value: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        seconds += value * unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

fn annotation_is_true(annotations: &BTreeMap<String, String>, key: &str) -> bool {
    annotations
        .get(key)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// What the simulated kubelet does with a pod, read from its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodBehaviour {
    pub ready_after: Duration,
    pub never_ready: bool,
    pub crash_loop: bool,
}

impl PodBehaviour {
    /// Unparseable values fall back to the defaults: a typo must not crash the simulator.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        default_ready_delay: Duration,
    ) -> Self {
        let ready_after = annotations
            .get(ANNOTATION_READY_AFTER)
            .and_then(|text| match parse_duration(text) {
                Ok(d) => Some(d),
                Err(error) => {
                    tracing::warn!(%error, "ignoring {ANNOTATION_READY_AFTER}");
                    None
                }
            })
            .unwrap_or(default_ready_delay);
        PodBehaviour {
            ready_after,
            never_ready: annotation_is_true(annotations, ANNOTATION_NEVER_READY),
            crash_loop: annotation_is_true(annotations, ANNOTATION_CRASH_LOOP),
        }
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(signed(d)).unwrap_or(t)
}

/// The API stores times with one-second precision; compare what it will give back.
fn to_api_time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn until(now: Timestamp, later: Timestamp) -> Duration {
    Duration::try_from(later.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// Restarts a crash-looping container has had `elapsed` after start, and when the next one comes.
/// Back-off doubles from `base` up to [`MAX_CRASH_BACKOFF`], like the kubelet's.
pub fn crash_loop_progress(base: Duration, elapsed: Duration) -> (i32, Duration) {
    let mut backoff = base.max(MIN_CRASH_BACKOFF);
    let mut next_crash = backoff;
    let mut restarts: i64 = 0;
    while next_crash <= elapsed && backoff < MAX_CRASH_BACKOFF {
        restarts += 1;
        backoff = (backoff * 2).min(MAX_CRASH_BACKOFF);
        next_crash += backoff;
    }
    if next_crash <= elapsed {
        // Capped back-off: the rest is arithmetic, so a pod crashing for days costs no loop.
        let more = (elapsed - next_crash).as_secs_f64() / MAX_CRASH_BACKOFF.as_secs_f64();
        let more = more.floor() as i64 + 1;
        restarts += more;
        next_crash += MAX_CRASH_BACKOFF * u32::try_from(more).unwrap_or(u32::MAX);
    }
    (
        i32::try_from(restarts).unwrap_or(i32::MAX),
        next_crash - elapsed.min(next_crash),
    )
}

fn condition(type_: &str, status: bool, since: Timestamp) -> PodCondition {
    PodCondition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        last_transition_time: Some(to_api_time(since)),
        ..Default::default()
    }
}

/// The status the kubelet reports for `pod` at `now`, and how long until it changes by itself.
pub fn desired_pod_status(
    pod: &Pod,
    behaviour: &PodBehaviour,
    started_at: Timestamp,
    now: Timestamp,
    pod_ip: &str,
) -> (PodStatus, Option<Duration>) {
    let elapsed = until(started_at, now);
    let (ready, ready_since, restarts, next_change) = if behaviour.crash_loop {
        let (restarts, next) = crash_loop_progress(behaviour.ready_after, elapsed);
        (false, started_at, restarts, Some(next))
    } else if behaviour.never_ready {
        (false, started_at, 0, None)
    } else {
        let ready_at = plus(started_at, behaviour.ready_after);
        if now >= ready_at {
            (true, ready_at, 0, None)
        } else {
            (false, started_at, 0, Some(until(now, ready_at)))
        }
    };
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let container_statuses = containers
        .iter()
        .map(|c| {
            let (state, last_state) = if behaviour.crash_loop {
                let waiting = ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".to_string()),
                        message: Some(format!("back-off restarting failed container {}", c.name)),
                    }),
                    ..Default::default()
                };
                let terminated = (restarts > 0).then(|| ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 1,
                        reason: Some("Error".to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                (waiting, terminated)
            } else {
                let running = ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(to_api_time(started_at)),
                    }),
                    ..Default::default()
                };
                (running, None)
            };
            ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                ready,
                restart_count: restarts,
                started: Some(!behaviour.crash_loop),
                state: Some(state),
                last_state,
                ..Default::default()
            }
        })
        .collect::<Vec<_>>();
    let status = PodStatus {
        phase: Some("Running".to_string()),
        host_ip: Some("10.0.0.1".to_string()),
        host_ips: Some(vec![HostIP {
            ip: "10.0.0.1".to_string(),
        }]),
        pod_ip: Some(pod_ip.to_string()),
        pod_ips: Some(vec![PodIP {
            ip: pod_ip.to_string(),
        }]),
        start_time: Some(to_api_time(started_at)),
        qos_class: Some("BestEffort".to_string()),
        conditions: Some(vec![
            condition("PodScheduled", true, started_at),
            condition("Initialized", true, started_at),
            condition("ContainersReady", ready, ready_since),
            condition("Ready", ready, ready_since),
        ]),
        container_statuses: Some(container_statuses),
        ..Default::default()
    };
    (status, next_change)
}

/// True when the fields the simulated kubelet owns already say what `desired` says.
pub fn pod_status_matches(current: Option<&PodStatus>, desired: &PodStatus) -> bool {
    let Some(current) = current else { return false };
    current.phase == desired.phase
        && current.pod_ip == desired.pod_ip
        && current.host_ip == desired.host_ip
        && current.start_time == desired.start_time
        && current.conditions == desired.conditions
        && current.container_statuses == desired.container_statuses
}

/// A readiness forced on a pod over what its template says (a failing, then passing readiness probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadinessOverride {
    /// Not ready since this time, whatever the template says; `was_ready`: whether it was Ready when
    /// forced (so giving its readiness back should make it Ready again).
    Unready { since: Timestamp, was_ready: bool },
    /// Back to what the template says since this time: if Ready, then Ready since no earlier than this.
    Restored { since: Timestamp },
}

/// Forced readiness per pod uid; shared by every run of the workload simulator.
#[derive(Debug, Default)]
pub struct ReadinessOverrides {
    by_uid: Mutex<HashMap<String, ReadinessOverride>>,
}

impl ReadinessOverrides {
    pub fn get(&self, uid: &str) -> Option<ReadinessOverride> {
        lock(&self.by_uid).get(uid).copied()
    }

    pub fn set(&self, uid: &str, forced: ReadinessOverride) {
        lock(&self.by_uid).insert(uid.to_string(), forced);
    }

    pub fn is_forced_unready(&self, uid: &str) -> bool {
        matches!(self.get(uid), Some(ReadinessOverride::Unready { .. }))
    }

    /// Forgets pods that no longer exist.
    fn retain(&self, live: &HashSet<String>) {
        lock(&self.by_uid).retain(|uid, _| live.contains(uid));
    }
}

/// Applies a forced readiness to the status the template asks for; returns when the status changes
/// by itself next. A forced-unready pod never turns ready by itself.
pub fn apply_readiness_override(
    status: &mut PodStatus,
    next_change: Option<Duration>,
    forced: Option<ReadinessOverride>,
) -> Option<Duration> {
    let Some(forced) = forced else {
        return next_change;
    };
    let naturally_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let retime = |status: &mut PodStatus, ready: bool, since: Timestamp| {
        for condition in status.conditions.iter_mut().flatten() {
            if condition.type_ == "Ready" || condition.type_ == "ContainersReady" {
                condition.status = if ready { "True" } else { "False" }.to_string();
                condition.last_transition_time = Some(to_api_time(since));
            }
        }
        for container in status.container_statuses.iter_mut().flatten() {
            container.ready = ready;
        }
    };
    match forced {
        ReadinessOverride::Unready { since, .. } => {
            if naturally_ready {
                retime(status, false, since);
            }
            None
        }
        ReadinessOverride::Restored { since } => {
            let ready_since = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0);
            if naturally_ready && ready_since.is_some_and(|t| t < to_api_time(since).0) {
                retime(status, true, since);
            }
            next_change
        }
    }
}

/// The Ready condition's transition time when the pod is Ready, else None.
pub fn ready_since(pod: &Pod) -> Option<Timestamp> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
    if ready.status != "True" {
        return None;
    }
    Some(
        ready
            .last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

pub fn is_pod_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Pods that count for a ReplicaSet: not being deleted and not finished.
pub fn is_pod_active(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

/// Which of `pods` to delete first when scaling down: not ready before ready, pending before running,
/// then the most recently ready, the most restarted and the newest (like the real controller).
pub fn scale_down_order(pods: &[&Pod]) -> Vec<String> {
    let mut ranked: Vec<&Pod> = pods.to_vec();
    let rank = |p: &Pod| {
        let ready_since = ready_since(p);
        let pending = p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running");
        let restarts: i32 = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (
            ready_since.is_some(),
            !pending,
            std::cmp::Reverse(ready_since),
            std::cmp::Reverse(restarts),
            std::cmp::Reverse(created),
            p.name_any(),
        )
    };
    ranked.sort_by_cached_key(|p| rank(p));
    ranked.into_iter().map(|p| p.name_any()).collect()
}

/// The ReplicaSet status fields the simulated controller owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaCounts {
    pub replicas: i32,
    pub fully_labeled_replicas: i32,
    pub ready_replicas: i32,
    pub available_replicas: i32,
    pub observed_generation: i64,
}

impl ReplicaCounts {
    pub fn of(rs: &ReplicaSet) -> Option<ReplicaCounts> {
        let s = rs.status.as_ref()?;
        Some(ReplicaCounts {
            replicas: s.replicas,
            fully_labeled_replicas: s.fully_labeled_replicas.unwrap_or(0),
            ready_replicas: s.ready_replicas.unwrap_or(0),
            available_replicas: s.available_replicas.unwrap_or(0),
            observed_generation: s.observed_generation.unwrap_or(0),
        })
    }
}

/// What one ReplicaSet reconcile must do.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSetPlan {
    pub create: Vec<Pod>,
    pub delete: Vec<String>,
    /// New status, only when it differs from the current one.
    pub status: Option<ReplicaCounts>,
    /// When a pod becomes available by the passage of time (minReadySeconds).
    pub requeue_after: Option<Duration>,
}

/// The Pod the ReplicaSet controller creates for `rs`.
pub fn pod_from_replicaset(rs: &ReplicaSet, name: String) -> Pod {
    let template: PodTemplateSpec = rs.spec.template.clone().unwrap_or_default();
    let template_meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: rs.metadata.namespace.clone(),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".to_string(),
                kind: "ReplicaSet".to_string(),
                name: rs.name_any(),
                uid: rs.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(template.spec.unwrap_or_default()),
        // What kube-apiserver sets on create; the simulated kubelet takes it from there.
        status: Some(PodStatus {
            phase: Some("Pending".to_string()),
            ..Default::default()
        }),
    }
}

/// Pod names use the same alphabet as Kubernetes' generateName (no vowels, no confusable digits).
pub fn random_suffix(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Decides creates, deletes and status for `rs` from the pods it controls.
/// `pending_creates`/`pending_deletes` are names written but not yet seen in the cache.
pub fn plan_replicaset(
    rs: &ReplicaSet,
    owned: &[&Pod],
    pending_creates: usize,
    pending_deletes: &[String],
    now: Timestamp,
    mut new_name: impl FnMut() -> String,
) -> ReplicaSetPlan {
    let spec = &rs.spec;
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let min_ready = Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let active: Vec<&Pod> = owned.iter().copied().filter(|p| is_pod_active(p)).collect();
    let remaining: Vec<&Pod> = active
        .iter()
        .copied()
        .filter(|p| !pending_deletes.contains(&p.name_any()))
        .collect();
    let effective = remaining.len() + pending_creates;

    let mut create = Vec::new();
    let mut delete = Vec::new();
    if effective < desired {
        create = (0..(desired - effective).min(MAX_BURST))
            .map(|_| pod_from_replicaset(rs, format!("{}-{}", rs.name_any(), new_name())))
            .collect();
    } else if effective > desired && !remaining.is_empty() {
        let excess = (effective - desired).min(remaining.len()).min(MAX_BURST);
        delete = scale_down_order(&remaining)
            .into_iter()
            .take(excess)
            .collect();
    }

    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let mut counts = ReplicaCounts {
        replicas: active.len() as i32,
        observed_generation: rs.metadata.generation.unwrap_or(0),
        ..Default::default()
    };
    let mut requeue_after: Option<Duration> = None;
    for pod in &active {
        let labels = pod.labels();
        if template_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            counts.fully_labeled_replicas += 1;
        }
        if let Some(since) = ready_since(pod) {
            counts.ready_replicas += 1;
            let available_at = plus(since, min_ready);
            if now >= available_at {
                counts.available_replicas += 1;
            } else {
                let wait = until(now, available_at);
                requeue_after = Some(requeue_after.map_or(wait, |w| w.min(wait)));
            }
        }
    }
    let status = (ReplicaCounts::of(rs) != Some(counts)).then_some(counts);
    ReplicaSetPlan {
        create,
        delete,
        status,
        requeue_after,
    }
}

/// Writes made by this simulator that its caches have not shown yet, per ReplicaSet uid.
#[derive(Debug, Default)]
struct Expectations {
    creates: HashMap<String, Instant>,
    deletes: HashMap<String, Instant>,
}

impl Expectations {
    /// Forgets what the cache now shows (or what is too old to wait for).
    fn settle(&mut self, owned: &[&Pod], now: Instant) {
        let present = |name: &String| owned.iter().any(|p| p.metadata.name.as_ref() == Some(name));
        let fresh = |at: &Instant| now.duration_since(*at) < EXPECTATION_TIMEOUT;
        self.creates.retain(|name, at| !present(name) && fresh(at));
        self.deletes.retain(|name, at| {
            let still_active = owned.iter().any(|p| {
                p.metadata.name.as_ref() == Some(name) && p.metadata.deletion_timestamp.is_none()
            });
            still_active && fresh(at)
        });
    }
}

/// Pods by the uid of the object that controls them, so a ReplicaSet reconcile looks at its own pods
/// rather than at every pod in the cluster. Entries are hints: a missed delete (a relist drops objects
/// without events) leaves a stale key that the reconcile checks against the cache and forgets.
#[derive(Debug, Default)]
struct OwnerIndex {
    by_owner: HashMap<String, HashSet<Key>>,
}

impl OwnerIndex {
    fn note(&mut self, owner_uid: &str, key: Key) {
        self.by_owner
            .entry(owner_uid.to_string())
            .or_default()
            .insert(key);
    }

    fn candidates(&self, owner_uid: &str) -> Vec<Key> {
        self.by_owner
            .get(owner_uid)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn forget(&mut self, owner_uid: &str, stale: &[Key]) {
        if let Some(keys) = self.by_owner.get_mut(owner_uid) {
            for key in stale {
                keys.remove(key);
            }
            if keys.is_empty() {
                self.by_owner.remove(owner_uid);
            }
        }
    }

    fn retain_owners(&mut self, live: &HashSet<String>) {
        self.by_owner.retain(|uid, _| live.contains(uid));
    }
}

/// The pods of `owner_uid` in namespace `ns` that the cache holds, found through `index`; keys the cache
/// no longer shows as owned by it are dropped from the index.
fn owned_pods(
    index: &Mutex<OwnerIndex>,
    pods: &Store<Pod>,
    ns: &str,
    owner_uid: &str,
) -> Vec<Arc<Pod>> {
    let mut owned = Vec::new();
    let mut stale = Vec::new();
    for key in lock(index).candidates(owner_uid) {
        let pod = pods.get(&ObjectRef::new(&key.1).within(&key.0));
        match pod {
            Some(pod)
                if pod.metadata.namespace.as_deref() == Some(ns)
                    && controller_uid(&pod) == Some(owner_uid) =>
            {
                owned.push(pod)
            }
            _ => stale.push(key),
        }
    }
    if !stale.is_empty() {
        lock(index).forget(owner_uid, &stale);
    }
    owned
}

/// What the simulated kubelet remembers about a pod it runs.
#[derive(Debug, Clone)]
struct PodRuntime {
    started_at: Timestamp,
    ip: String,
}

struct Context {
    client: Client,
    config: WorkloadConfig,
    pods: Store<Pod>,
    replicasets: Store<ReplicaSet>,
    deployments: Store<Deployment>,
    expectations: Mutex<HashMap<String, Expectations>>,
    /// Pod keys by controlling ReplicaSet uid, fed by the pod watch.
    pods_by_owner: Arc<Mutex<OwnerIndex>>,
    runtimes: Mutex<HashMap<String, PodRuntime>>,
    readiness: Arc<ReadinessOverrides>,
    next_ip: AtomicU32,
    kubelet_reconciles: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fake pod IPs in 10.0.0.0/8, unique per simulator.
fn ip_from_counter(n: u32) -> String {
    let n = n % (1 << 24);
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

fn missing(kind: &str, meta: &ObjectMeta) -> WorkloadError {
    WorkloadError::MissingMetadata(format!("{kind} {}", meta.name.clone().unwrap_or_default()))
}

async fn reconcile_pod(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Requeue, WorkloadError> {
    let (Some(ns), Some(name), Some(uid)) = (
        pod.metadata.namespace.clone(),
        pod.metadata.name.clone(),
        pod.metadata.uid.clone(),
    ) else {
        return Err(missing("pod", &pod.metadata));
    };
    forget_departed_pods(&ctx);
    if !is_pod_active(&pod) {
        lock(&ctx.runtimes).remove(&uid);
        return Ok(None);
    }
    let now = Timestamp::now();
    let forced = ctx.readiness.get(&uid);
    let runtime = {
        let mut runtimes = lock(&ctx.runtimes);
        runtimes
            .entry(uid)
            .or_insert_with(|| {
                let status = pod.status.as_ref();
                PodRuntime {
                    started_at: status
                        .and_then(|s| s.start_time.as_ref())
                        .map(|t| t.0)
                        .unwrap_or(now),
                    ip: status.and_then(|s| s.pod_ip.clone()).unwrap_or_else(|| {
                        ip_from_counter(ctx.next_ip.fetch_add(1, Ordering::Relaxed) + 2)
                    }),
                }
            })
            .clone()
    };
    let behaviour =
        PodBehaviour::from_annotations(pod.annotations(), ctx.config.default_ready_delay);
    let (mut status, next_change) =
        desired_pod_status(&pod, &behaviour, runtime.started_at, now, &runtime.ip);
    let next_change = apply_readiness_override(&mut status, next_change, forced);
    if !pod_status_matches(pod.status.as_ref(), &status) {
        let body = json!({ "status": status });
        Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(|source| WorkloadError::WritePodStatus { name, source })?;
    }
    Ok(Some(next_change.map_or(ctx.config.resync, |d| {
        d.min(ctx.config.resync) + Duration::from_millis(5)
    })))
}

/// Deleted pods never get another reconcile, so their runtime entries are swept now and then.
fn forget_departed_pods(ctx: &Context) {
    if !ctx
        .kubelet_reconciles
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(1024)
    {
        return;
    }
    let live: HashSet<String> = ctx
        .pods
        .state()
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    lock(&ctx.runtimes).retain(|uid, _| live.contains(uid));
    ctx.readiness.retain(&live);
    let live_rs: std::collections::HashSet<String> = ctx
        .replicasets
        .state()
        .iter()
        .filter_map(|r| r.metadata.uid.clone())
        .collect();
    lock(&ctx.expectations).retain(|uid, _| live_rs.contains(uid));
    lock(&ctx.pods_by_owner).retain_owners(&live_rs);
}

async fn reconcile_replicaset(
    rs: Arc<ReplicaSet>,
    ctx: Arc<Context>,
) -> Result<Requeue, WorkloadError> {
    let (Some(ns), Some(uid)) = (rs.metadata.namespace.clone(), rs.metadata.uid.clone()) else {
        return Err(missing("replicaset", &rs.metadata));
    };
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    ctx.pods
        .wait_until_ready()
        .await
        .map_err(|_| WorkloadError::CacheClosed)?;
    let pods = owned_pods(&ctx.pods_by_owner, &ctx.pods, &ns, &uid);
    let owned: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
    let (pending_creates, pending_deletes) = {
        let mut all = lock(&ctx.expectations);
        let expectations = all.entry(uid.clone()).or_default();
        expectations.settle(&owned, Instant::now());
        (
            expectations.creates.len(),
            expectations.deletes.keys().cloned().collect::<Vec<_>>(),
        )
    };
    let plan = {
        let mut rng = rand::rng();
        plan_replicaset(
            &rs,
            &owned,
            pending_creates,
            &pending_deletes,
            Timestamp::now(),
            || random_suffix(&mut rng),
        )
    };
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let mut first_error = None;
    for pod in &plan.create {
        let name = pod.name_any();
        lock(&ctx.expectations)
            .entry(uid.clone())
            .or_default()
            .creates
            .insert(name.clone(), Instant::now());
        if let Err(source) = pods_api.create(&PostParams::default(), pod).await {
            if let Some(e) = lock(&ctx.expectations).get_mut(&uid) {
                e.creates.remove(&name);
            }
            first_error.get_or_insert(WorkloadError::CreatePod { name, source });
        }
    }
    for name in &plan.delete {
        lock(&ctx.expectations)
            .entry(uid.clone())
            .or_default()
            .deletes
            .insert(name.clone(), Instant::now());
        match pods_api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                if let Some(e) = lock(&ctx.expectations).get_mut(&uid) {
                    e.deletes.remove(name);
                }
                first_error.get_or_insert(WorkloadError::DeletePod {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    if let Some(counts) = plan.status {
        let body = json!({ "status": {
            "replicas": counts.replicas,
            "fullyLabeledReplicas": counts.fully_labeled_replicas,
            "readyReplicas": counts.ready_replicas,
            "availableReplicas": counts.available_replicas,
            "observedGeneration": counts.observed_generation,
        }});
        Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
            .map_err(|source| WorkloadError::WriteReplicaSetStatus {
                name: rs.name_any(),
                source,
            })?;
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let resync = ctx.config.resync;
    Ok(Some(plan.requeue_after.map_or(resync, |d| {
        (d + Duration::from_millis(5)).min(resync)
    })))
}

/// The hash the Deployment controller puts in `pod-template-hash` (stable over equal templates).
pub fn pod_template_hash(template: &PodTemplateSpec) -> String {
    use sha2::{Digest, Sha256};
    let encoded = serde_json::to_vec(template).unwrap_or_default();
    let digest = Sha256::digest(&encoded);
    // Same safe alphabet as generated names, so the hash is a valid label value.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    digest
        .iter()
        .take(10)
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// The ReplicaSet a Deployment wants for its current template (with `replicas` set to the Deployment's).
pub fn replicaset_for_deployment(deployment: &Deployment) -> Option<ReplicaSet> {
    let spec = &deployment.spec;
    let hash = pod_template_hash(&spec.template);
    let mut template = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(POD_TEMPLATE_HASH_LABEL.to_string(), hash.clone());
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(POD_TEMPLATE_HASH_LABEL.to_string(), hash.clone());
    let mut labels = meta.labels.clone().unwrap_or_default();
    labels.insert(POD_TEMPLATE_HASH_LABEL.to_string(), hash.clone());
    Some(ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", deployment.name_any(), hash)),
            namespace: deployment.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".to_string(),
                kind: "Deployment".to_string(),
                name: deployment.name_any(),
                uid: deployment.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(spec.replicas.unwrap_or(1)),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    })
}

async fn reconcile_deployment(
    deployment: Arc<Deployment>,
    ctx: Arc<Context>,
) -> Result<Requeue, WorkloadError> {
    let (Some(ns), Some(uid)) = (
        deployment.metadata.namespace.clone(),
        deployment.metadata.uid.clone(),
    ) else {
        return Err(missing("deployment", &deployment.metadata));
    };
    if deployment.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let Some(wanted) = replicaset_for_deployment(&deployment) else {
        return Ok(None);
    };
    ctx.replicasets
        .wait_until_ready()
        .await
        .map_err(|_| WorkloadError::CacheClosed)?;
    let owned: Vec<Arc<ReplicaSet>> = ctx.replicasets.state_filter(|rs| {
        rs.metadata.namespace.as_deref() == Some(ns.as_str())
            && rs
                .owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && r.uid == uid)
    });
    let rs_api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns);
    let wanted_name = wanted.name_any();
    let wanted_replicas = wanted.spec.replicas.unwrap_or(1);
    let current = owned.iter().find(|rs| rs.name_any() == wanted_name);
    match current {
        None => match rs_api.create(&PostParams::default(), &wanted).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(WorkloadError::WriteReplicaSet {
                    name: wanted_name,
                    source,
                })
            }
        },
        Some(rs) if rs.spec.replicas != Some(wanted_replicas) => {
            scale_replicaset(&rs_api, &wanted_name, wanted_replicas).await?;
        }
        Some(_) => {}
    }
    // Old templates go away at once (Recreate-like): enough for the kubectl tests this serves.
    for old in owned.iter().filter(|rs| rs.name_any() != wanted_name) {
        if old.spec.replicas != Some(0) {
            scale_replicaset(&rs_api, &old.name_any(), 0).await?;
        }
    }
    let sum = |f: fn(&ReplicaSet) -> i32| owned.iter().map(|rs| f(rs)).sum::<i32>();
    let replicas = sum(|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let ready = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let available = sum(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
    });
    let updated = current
        .and_then(|rs| rs.status.as_ref())
        .map_or(0, |s| s.replicas);
    let desired = json!({
        "replicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": available,
        "updatedReplicas": updated,
        "unavailableReplicas": (wanted_replicas - available).max(0),
        "observedGeneration": deployment.metadata.generation.unwrap_or(0),
    });
    let current_status = deployment
        .status
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| WorkloadError::Encode("deployment status", e))?
        .unwrap_or_default();
    let differs = desired
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| current_status.get(k).unwrap_or(&json!(0)) != v);
    if differs {
        Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &deployment.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": desired })),
            )
            .await
            .map_err(|source| WorkloadError::WriteDeploymentStatus {
                name: deployment.name_any(),
                source,
            })?;
    }
    Ok(Some(ctx.config.resync))
}

async fn scale_replicaset(
    api: &Api<ReplicaSet>,
    name: &str,
    replicas: i32,
) -> Result<(), WorkloadError> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "spec": { "replicas": replicas } })),
    )
    .await
    .map(|_| ())
    .map_err(|source| WorkloadError::WriteReplicaSet {
        name: name.to_string(),
        source,
    })
}

/// When to look at an object again by itself; None: only when it changes.
type Requeue = Option<Duration>;
/// (namespace, name) of an object.
type Key = (String, String);

/// Reconciles at most this many objects of one kind at once.
const CONCURRENCY: usize = 32;
/// A failed reconcile is retried this soon.
const RETRY: Duration = Duration::from_millis(500);

fn key_of(meta: &ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn controller_key(meta: &ObjectMeta, kind: &str) -> Option<Key> {
    let owner = meta
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == kind)?;
    Some((meta.namespace.clone()?, owner.name.clone()))
}

/// Mirrors a watch into a store and calls `route` with every object it changes, after the store
/// has it: a reconcile triggered from here always reads at least that version.
async fn feed<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    route: impl Fn(&K) + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|event| {
            if let Ok(
                watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o),
            ) = &event
            {
                route(o);
            }
            futures::future::ready(())
        })
        .await;
}

/// A work queue like controller-runtime's: a key runs at most once at a time (a key sent while it runs
/// runs again afterwards), each reconcile's requeue replaces the key's previous timer, errors retry.
async fn run_queue<F, Fut>(mut keys: mpsc::UnboundedReceiver<Key>, reconcile: F)
where
    F: Fn(Key) -> Fut,
    Fut: std::future::Future<Output = Result<Requeue, WorkloadError>> + Send + 'static,
{
    let mut queued: VecDeque<Key> = VecDeque::new();
    let mut waiting: HashSet<Key> = HashSet::new();
    let mut running: HashSet<Key> = HashSet::new();
    let mut dirty_while_running: HashSet<Key> = HashSet::new();
    let mut timers: BTreeSet<(tokio::time::Instant, Key)> = BTreeSet::new();
    let mut deadline: HashMap<Key, tokio::time::Instant> = HashMap::new();
    let mut tasks: JoinSet<(Key, Result<Requeue, WorkloadError>)> = JoinSet::new();
    let mut open = true;
    loop {
        while tasks.len() < CONCURRENCY {
            let Some(key) = queued.pop_front() else { break };
            waiting.remove(&key);
            running.insert(key.clone());
            let run = reconcile(key.clone());
            tasks.spawn(async move {
                let outcome = std::panic::AssertUnwindSafe(run).catch_unwind().await;
                (
                    key,
                    outcome.unwrap_or(Err(WorkloadError::ReconcilePanicked)),
                )
            });
        }
        if !open && tasks.is_empty() && queued.is_empty() && timers.is_empty() {
            return;
        }
        let next_timer = timers.first().map(|(at, _)| *at);
        let mut ready: Vec<Key> = Vec::new();
        tokio::select! {
            key = keys.recv(), if open => match key {
                Some(key) => ready.push(key),
                None => open = false,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((key, result)) = done else { continue };
                running.remove(&key);
                let after = match result {
                    Ok(after) => after,
                    Err(error) => {
                        tracing::debug!(%error, category = error.category(), "workload simulator will retry");
                        Some(RETRY)
                    }
                };
                if let Some(old) = deadline.remove(&key) {
                    timers.remove(&(old, key.clone()));
                }
                if let Some(after) = after {
                    let at = tokio::time::Instant::now() + after;
                    deadline.insert(key.clone(), at);
                    timers.insert((at, key.clone()));
                }
                if dirty_while_running.remove(&key) {
                    ready.push(key);
                }
            },
            _ = tokio::time::sleep_until(next_timer.unwrap_or_else(tokio::time::Instant::now)), if next_timer.is_some() => {
                let now = tokio::time::Instant::now();
                while let Some((at, key)) = timers.first().cloned() {
                    if at > now {
                        break;
                    }
                    timers.remove(&(at, key.clone()));
                    deadline.remove(&key);
                    ready.push(key);
                }
            },
        }
        for key in ready {
            if running.contains(&key) {
                dirty_while_running.insert(key);
            } else if waiting.insert(key.clone()) {
                queued.push_back(key);
            }
        }
    }
}

/// The simulated ReplicaSet and Deployment controllers plus kubelet, running until [`shutdown`](Self::shutdown).
pub struct WorkloadSimulator {
    tasks: Vec<JoinHandle<()>>,
    kubelet: mpsc::UnboundedSender<Key>,
}

impl WorkloadSimulator {
    pub fn spawn(client: Client, config: WorkloadConfig) -> WorkloadSimulator {
        WorkloadSimulator::spawn_with(client, config, Arc::default())
    }

    /// Like [`spawn`](Self::spawn), with pod readiness forced from outside through `readiness`.
    pub fn spawn_with(
        client: Client,
        config: WorkloadConfig,
        readiness: Arc<ReadinessOverrides>,
    ) -> WorkloadSimulator {
        let (pods, pod_writer) = reflector::store::<Pod>();
        let (replicasets, rs_writer) = reflector::store::<ReplicaSet>();
        let (deployments, deployment_writer) = reflector::store::<Deployment>();
        let (pod_keys, pod_queue) = mpsc::unbounded_channel::<Key>();
        let (rs_keys, rs_queue) = mpsc::unbounded_channel::<Key>();
        let (deployment_keys, deployment_queue) = mpsc::unbounded_channel::<Key>();
        let pods_by_owner = Arc::new(Mutex::new(OwnerIndex::default()));
        let ctx = Arc::new(Context {
            client: client.clone(),
            config,
            pods,
            replicasets,
            deployments,
            expectations: Mutex::default(),
            pods_by_owner: pods_by_owner.clone(),
            runtimes: Mutex::default(),
            readiness,
            next_ip: AtomicU32::new(0),
            kubelet_reconciles: AtomicU64::new(1),
        });
        let to_rs = rs_keys.clone();
        let kubelet = pod_keys.clone();
        let pod_feed = feed(
            Api::<Pod>::all(client.clone()),
            pod_writer,
            move |pod: &Pod| {
                if let Some(key) = key_of(&pod.metadata) {
                    // Indexed before the ReplicaSet is queued, so its reconcile finds this pod.
                    if let Some(owner) = controller_uid(pod) {
                        lock(&pods_by_owner).note(owner, key.clone());
                    }
                    let _ = pod_keys.send(key);
                }
                if let Some(owner) = controller_key(&pod.metadata, "ReplicaSet") {
                    let _ = to_rs.send(owner);
                }
            },
        );
        let to_deployments = deployment_keys.clone();
        let rs_feed = feed(
            Api::<ReplicaSet>::all(client.clone()),
            rs_writer,
            move |rs: &ReplicaSet| {
                if let Some(key) = key_of(&rs.metadata) {
                    let _ = rs_keys.send(key);
                }
                if let Some(owner) = controller_key(&rs.metadata, "Deployment") {
                    let _ = to_deployments.send(owner);
                }
            },
        );
        let deployment_feed = feed(
            Api::<Deployment>::all(client),
            deployment_writer,
            move |d: &Deployment| {
                if let Some(key) = key_of(&d.metadata) {
                    let _ = deployment_keys.send(key);
                }
            },
        );
        let (kubelet_ctx, rs_ctx, deployment_ctx) = (ctx.clone(), ctx.clone(), ctx);
        let tasks = vec![
            tokio::spawn(pod_feed),
            tokio::spawn(rs_feed),
            tokio::spawn(deployment_feed),
            tokio::spawn(run_queue(pod_queue, move |key| {
                let ctx = kubelet_ctx.clone();
                async move {
                    match ctx.pods.get(&ObjectRef::new(&key.1).within(&key.0)) {
                        Some(pod) => reconcile_pod(pod, ctx).await,
                        None => Ok(None),
                    }
                }
            })),
            tokio::spawn(run_queue(rs_queue, move |key| {
                let ctx = rs_ctx.clone();
                async move {
                    match ctx.replicasets.get(&ObjectRef::new(&key.1).within(&key.0)) {
                        Some(rs) => reconcile_replicaset(rs, ctx).await,
                        None => Ok(None),
                    }
                }
            })),
            tokio::spawn(run_queue(deployment_queue, move |key| {
                let ctx = deployment_ctx.clone();
                async move {
                    match ctx.deployments.get(&ObjectRef::new(&key.1).within(&key.0)) {
                        Some(d) => reconcile_deployment(d, ctx).await,
                        None => Ok(None),
                    }
                }
            })),
        ];
        WorkloadSimulator { tasks, kubelet }
    }

    /// Makes the kubelet look at a pod now (its forced readiness changed).
    pub fn poke_pod(&self, namespace: &str, name: &str) {
        let _ = self.kubelet.send((namespace.to_string(), name.to_string()));
    }

    pub async fn shutdown(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for WorkloadSimulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Header carrying the workload-simulator run a request comes from (see [`RunFence`]).
pub const RUN_HEADER: &str = "x-serin-sim-run";

/// Which run of the workload simulator the API server accepts requests from. Stopping a run aborts
/// its tasks, but a request already on the wire would still land; the server refuses requests of any
/// run but the current one, so nothing a stopped simulator sent can change the cluster.
#[derive(Debug, Default)]
pub struct RunFence {
    current: AtomicU64,
}

impl RunFence {
    /// True when requests of `run` may change the cluster.
    pub fn admits(&self, run: u64) -> bool {
        run != 0 && self.current.load(Ordering::SeqCst) == run
    }

    /// The running run, 0 when the simulator is stopped.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    fn set(&self, run: u64) {
        self.current.store(run, Ordering::SeqCst);
    }
}

/// Starts and stops the workload simulator of a running sim; forced pod readiness survives restarts.
pub struct WorkloadControl {
    client_config: kube::Config,
    config: WorkloadConfig,
    readiness: Arc<ReadinessOverrides>,
    fence: Arc<RunFence>,
    running: tokio::sync::Mutex<Option<WorkloadSimulator>>,
    kubelet: Mutex<Option<mpsc::UnboundedSender<Key>>>,
    runs: AtomicU64,
}

impl WorkloadControl {
    /// `client_config`: how the simulator reaches the API server (each run adds its [`RUN_HEADER`]).
    pub fn new(
        client_config: kube::Config,
        config: WorkloadConfig,
        fence: Arc<RunFence>,
    ) -> WorkloadControl {
        WorkloadControl {
            client_config,
            config,
            readiness: Arc::default(),
            fence,
            running: tokio::sync::Mutex::new(None),
            kubelet: Mutex::new(None),
            runs: AtomicU64::new(0),
        }
    }

    /// Starts a new run; false when one is already running.
    pub async fn start(&self) -> Result<bool, WorkloadError> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(false);
        }
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let mut client_config = self.client_config.clone();
        client_config.headers.push((
            http::HeaderName::from_static(RUN_HEADER),
            http::HeaderValue::from(run),
        ));
        let client =
            Client::try_from(client_config).map_err(|e| WorkloadError::Client(e.to_string()))?;
        self.fence.set(run);
        let simulator =
            WorkloadSimulator::spawn_with(client, self.config.clone(), self.readiness.clone());
        *lock(&self.kubelet) = Some(simulator.kubelet.clone());
        *running = Some(simulator);
        tracing::info!(run, "workload simulator started");
        Ok(true)
    }

    /// Stops the running run: when this returns, nothing it sent can change the cluster any more.
    /// False when it was not running.
    pub async fn stop(&self) -> bool {
        let mut running = self.running.lock().await;
        let Some(simulator) = running.take() else {
            return false;
        };
        self.fence.set(0);
        *lock(&self.kubelet) = None;
        simulator.shutdown().await;
        tracing::info!("workload simulator stopped");
        true
    }

    pub fn is_running(&self) -> bool {
        self.fence.current() != 0
    }

    pub fn readiness(&self) -> &ReadinessOverrides {
        &self.readiness
    }

    /// Makes the running kubelet look at a pod now; nothing when stopped (it looks at every pod on start).
    pub fn poke_pod(&self, namespace: &str, name: &str) {
        if let Some(kubelet) = lock(&self.kubelet).as_ref() {
            let _ = kubelet.send((namespace.to_string(), name.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn ts(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn replicaset(replicas: i32, min_ready_seconds: i32) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("shop".into()),
                uid: Some("rs-uid".into()),
                generation: Some(3),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: Some(min_ready_seconds),
                selector: LabelSelector::default(),
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                        annotations: Some(BTreeMap::from([(
                            ANNOTATION_READY_AFTER.into(),
                            "2s".into(),
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "app".into(),
                            image: Some("web:1".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
            },
            status: None,
        }
    }

    fn pod(name: &str, created: i64, ready_at: Option<i64>, running: bool) -> Pod {
        let mut p = pod_from_replicaset(&replicaset(1, 0), name.into());
        p.metadata.creation_timestamp = Some(Time(ts(created)));
        p.status = Some(PodStatus {
            phase: Some(if running { "Running" } else { "Pending" }.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready_at.is_some() { "True" } else { "False" }.into(),
                last_transition_time: ready_at.map(|s| Time(ts(s))),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn owner_index_finds_only_cached_pods_still_owned_and_forgets_the_rest() {
        let rs = replicaset(3, 0);
        let (store, mut writer) = reflector::store::<Pod>();
        let mut owned = pod_from_replicaset(&rs, "web-abc-1".into());
        owned.metadata.uid = Some("p1".into());
        let mut adopted_elsewhere = pod_from_replicaset(&rs, "web-abc-2".into());
        if let Some(refs) = adopted_elsewhere.metadata.owner_references.as_mut() {
            refs[0].uid = "other-rs".into();
        }
        let mut other_namespace = pod_from_replicaset(&rs, "web-abc-3".into());
        other_namespace.metadata.namespace = Some("elsewhere".into());
        for pod in [&owned, &adopted_elsewhere, &other_namespace] {
            writer.apply_watcher_event(&watcher::Event::Apply(pod.clone()));
        }
        let index = Mutex::new(OwnerIndex::default());
        for name in ["web-abc-1", "web-abc-2", "web-abc-4"] {
            lock(&index).note("rs-uid", ("shop".into(), name.into()));
        }
        lock(&index).note("rs-uid", ("elsewhere".into(), "web-abc-3".into()));

        let found = owned_pods(&index, &store, "shop", "rs-uid");
        let names: Vec<String> = found.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, vec!["web-abc-1".to_string()]);
        assert_eq!(
            lock(&index).candidates("rs-uid"),
            vec![("shop".to_string(), "web-abc-1".to_string())],
            "keys the cache does not show as owned here are forgotten"
        );

        writer.apply_watcher_event(&watcher::Event::Delete(owned));
        assert!(owned_pods(&index, &store, "shop", "rs-uid").is_empty());
        assert!(
            lock(&index).by_owner.is_empty(),
            "an owner with no pods left is dropped"
        );

        lock(&index).note("gone-rs", ("shop".into(), "x".into()));
        lock(&index).retain_owners(&HashSet::from(["rs-uid".to_string()]));
        assert!(lock(&index).candidates("gone-rs").is_empty());
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "s", "2", "2x", "-1s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn behaviour_comes_from_annotations_and_ignores_garbage() {
        let a = BTreeMap::from([
            (ANNOTATION_READY_AFTER.to_string(), "soon".to_string()),
            (ANNOTATION_CRASH_LOOP.to_string(), "True".to_string()),
        ]);
        let b = PodBehaviour::from_annotations(&a, Duration::from_millis(300));
        assert_eq!(b.ready_after, Duration::from_millis(300));
        assert!(b.crash_loop && !b.never_ready);
    }

    #[test]
    fn pod_copies_template_and_points_at_its_owner() {
        let p = pod_from_replicaset(&replicaset(1, 0), "web-abc-xyz12".into());
        assert_eq!(p.labels().get("app").map(String::as_str), Some("web"));
        assert_eq!(
            p.annotations()
                .get(ANNOTATION_READY_AFTER)
                .map(String::as_str),
            Some("2s")
        );
        let owner = &p.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ReplicaSet", "rs-uid")
        );
        assert_eq!(
            (owner.controller, owner.block_owner_deletion),
            (Some(true), Some(true))
        );
        assert_eq!(p.spec.map(|s| s.containers.len()), Some(1));
    }

    #[test]
    fn pod_turns_ready_after_its_delay() {
        let p = pod_from_replicaset(&replicaset(1, 0), "p".into());
        let b = PodBehaviour::from_annotations(p.annotations(), Duration::from_millis(300));
        let (early, next) = desired_pod_status(&p, &b, ts(100), ts(101), "10.0.0.2");
        assert!(!is_ready_status(&early));
        assert_eq!(next, Some(Duration::from_secs(1)));
        let (late, next) = desired_pod_status(&p, &b, ts(100), ts(102), "10.0.0.2");
        assert!(is_ready_status(&late));
        assert_eq!(next, None);
        assert_eq!(late.phase.as_deref(), Some("Running"));
        assert_eq!(late.pod_ip.as_deref(), Some("10.0.0.2"));
        let containers = late.container_statuses.unwrap_or_default();
        assert!(containers.iter().all(|c| c.ready && c.name == "app"));
    }

    fn is_ready_status(s: &PodStatus) -> bool {
        s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }

    #[test]
    fn never_ready_and_crash_loop_pods_stay_unready() {
        let p = pod_from_replicaset(&replicaset(1, 0), "p".into());
        let never = PodBehaviour {
            ready_after: Duration::ZERO,
            never_ready: true,
            crash_loop: false,
        };
        let (s, next) = desired_pod_status(&p, &never, ts(0), ts(1000), "10.0.0.2");
        assert!(!is_ready_status(&s));
        assert_eq!(next, None);
        let crash = PodBehaviour {
            ready_after: Duration::from_secs(1),
            never_ready: false,
            crash_loop: true,
        };
        let (s, next) = desired_pod_status(&p, &crash, ts(0), ts(4), "10.0.0.2");
        assert!(!is_ready_status(&s));
        let c = &s.container_statuses.unwrap_or_default()[0];
        assert_eq!(c.restart_count, 2); // crashes at 1s and 3s, the next at 7s
        assert_eq!(next, Some(Duration::from_secs(3)));
        let reason = c
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref());
        assert_eq!(reason, Some("CrashLoopBackOff"));
    }

    #[test]
    fn forced_unready_wins_and_restored_pods_are_ready_from_the_restore() {
        let p = pod_from_replicaset(&replicaset(1, 0), "p".into());
        let b = PodBehaviour::from_annotations(p.annotations(), Duration::from_millis(300));
        let (natural, _) = desired_pod_status(&p, &b, ts(100), ts(200), "10.0.0.2");
        assert!(is_ready_status(&natural));

        let mut forced = natural.clone();
        let unready = ReadinessOverride::Unready {
            since: ts(150),
            was_ready: true,
        };
        assert_eq!(
            apply_readiness_override(&mut forced, None, Some(unready)),
            None
        );
        assert!(!is_ready_status(&forced));
        let ready = forced
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready");
        assert_eq!(
            ready
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            Some(ts(150))
        );
        assert!(forced.container_statuses.iter().flatten().all(|c| !c.ready));

        // A pod still starting stays unready past its delay while forced.
        let (starting, next) = desired_pod_status(&p, &b, ts(100), ts(101), "10.0.0.2");
        let mut starting_forced = starting.clone();
        assert_eq!(
            apply_readiness_override(&mut starting_forced, next, Some(unready)),
            None
        );
        assert_eq!(starting_forced, starting);

        let mut restored = natural.clone();
        let back = ReadinessOverride::Restored { since: ts(180) };
        apply_readiness_override(&mut restored, None, Some(back));
        assert!(is_ready_status(&restored));
        let ready = restored
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready");
        assert_eq!(
            ready
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            Some(ts(180)),
            "minReadySeconds counts from the restore"
        );
        let mut untouched = natural.clone();
        assert_eq!(
            apply_readiness_override(&mut untouched, Some(Duration::from_secs(1)), None),
            Some(Duration::from_secs(1))
        );
        assert_eq!(untouched, natural);
    }

    #[test]
    fn run_fence_admits_only_the_current_run() {
        let fence = RunFence::default();
        assert!(!fence.admits(0) && !fence.admits(1));
        fence.set(2);
        assert!(fence.admits(2) && !fence.admits(1));
        fence.set(0);
        assert!(!fence.admits(2) && fence.current() == 0);
    }

    #[test]
    fn crash_loop_back_off_is_capped_without_looping_forever() {
        let (restarts, next) =
            crash_loop_progress(Duration::from_secs(10), Duration::from_secs(86_400 * 365));
        assert!(restarts > 100_000);
        assert!(next <= MAX_CRASH_BACKOFF && next > Duration::ZERO);
    }

    #[test]
    fn scale_up_creates_named_pods_and_counts_pending_ones() {
        let rs = replicaset(3, 0);
        let existing = pod("web-abc-aaaaa", 1, Some(2), true);
        let mut n = 0;
        let plan = plan_replicaset(&rs, &[&existing], 1, &[], ts(10), || {
            n += 1;
            format!("n{n}")
        });
        assert_eq!(
            plan.create.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
            vec!["web-abc-n1"]
        );
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn scale_down_deletes_unready_first_then_newest() {
        let rs = replicaset(1, 0);
        let old_ready = pod("old", 1, Some(5), true);
        let new_ready = pod("new", 3, Some(6), true);
        let unready = pod("unready", 2, None, true);
        let pending = pod("pending", 0, None, false);
        let plan = plan_replicaset(
            &rs,
            &[&old_ready, &new_ready, &unready, &pending],
            0,
            &[],
            ts(10),
            String::new,
        );
        assert_eq!(plan.delete, vec!["pending", "unready", "new"]);
        let plan = plan_replicaset(
            &rs,
            &[&old_ready, &new_ready],
            0,
            &["new".into()],
            ts(10),
            String::new,
        );
        assert!(
            plan.delete.is_empty(),
            "a pod already being deleted counts as gone"
        );
    }

    #[test]
    fn status_honours_min_ready_seconds_and_is_written_only_on_change() {
        let mut rs = replicaset(2, 10);
        let a = pod("a", 1, Some(100), true);
        let b = pod("b", 1, Some(105), true);
        let plan = plan_replicaset(&rs, &[&a, &b], 0, &[], ts(111), String::new);
        let counts = plan.status.unwrap_or_default();
        assert_eq!(
            (
                counts.replicas,
                counts.ready_replicas,
                counts.available_replicas
            ),
            (2, 2, 1)
        );
        assert_eq!(
            (counts.fully_labeled_replicas, counts.observed_generation),
            (2, 3)
        );
        assert_eq!(plan.requeue_after, Some(Duration::from_secs(4)));
        rs.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: 2,
            fully_labeled_replicas: Some(2),
            ready_replicas: Some(2),
            available_replicas: Some(1),
            observed_generation: Some(3),
            ..Default::default()
        });
        assert_eq!(
            plan_replicaset(&rs, &[&a, &b], 0, &[], ts(111), String::new).status,
            None
        );
    }

    #[test]
    fn deployment_replicaset_carries_the_template_hash() {
        let rs = replicaset(2, 0);
        let template = rs.spec.template.clone().unwrap_or_default();
        let d = Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: k8s_openapi::api::apps::v1::DeploymentSpec {
                replicas: Some(2),
                selector: LabelSelector::default(),
                template: template.clone(),
                ..Default::default()
            },
            status: None,
        };
        let out = replicaset_for_deployment(&d).unwrap_or_default();
        let hash = pod_template_hash(&template);
        assert_eq!(out.name_any(), format!("web-{hash}"));
        let labels = out
            .spec
            .template
            .and_then(|t| t.metadata)
            .and_then(|m| m.labels)
            .unwrap_or_default();
        assert_eq!(labels.get(POD_TEMPLATE_HASH_LABEL), Some(&hash));
        assert_eq!(hash, pod_template_hash(&template));
    }

    #[tokio::test]
    async fn work_queue_runs_a_key_once_at_a_time_and_honours_requeues() {
        let runs = Arc::new(AtomicU64::new(0));
        let (keys, queue) = mpsc::unbounded_channel::<Key>();
        let counted = runs.clone();
        let worker = tokio::spawn(run_queue(queue, move |_key| {
            let runs = counted.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // The second run asks to come back once more, then waits for changes.
                Ok(if n == 2 {
                    Some(Duration::from_millis(10))
                } else {
                    None
                })
            }
        }));
        let key: Key = ("ns".into(), "a".into());
        for _ in 0..5 {
            assert!(keys.send(key.clone()).is_ok());
        }
        // One run, then one more for the events that arrived while it ran, then the requeue.
        let settled = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..200 {
                if runs.load(Ordering::SeqCst) >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(settled.is_ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        drop(keys);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), worker)
                .await
                .is_ok(),
            "queue ends when its senders are gone"
        );
    }

    #[test]
    fn fake_ips_are_unique_and_well_formed() {
        let ips: std::collections::HashSet<String> = (0..70_000).map(ip_from_counter).collect();
        assert_eq!(ips.len(), 70_000);
        assert_eq!(ip_from_counter(258), "10.0.1.2");
    }
}
