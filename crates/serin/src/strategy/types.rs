//! The planner's inputs and outputs: the observed snapshot, the actions to apply, and the plan.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub use crate::analysis::TemplateKey;
use crate::crd::analysis::AnalysisRunSpec;
use crate::crd::{AnalysisPhase, RolloutStatus};

/// Everything the planner may look at besides the Rollout itself, read in one pass by the controller.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// ReplicaSets owned by the Rollout (by controller ownerReference), in any order.
    pub replica_sets: Vec<ObservedReplicaSet>,
    /// Services the spec names (stable, canary, active, preview), by name. A name missing from the map
    /// does not exist in the cluster.
    pub services: BTreeMap<String, ObservedService>,
    /// The traffic router's state.
    pub traffic: RouteState,
    /// AnalysisRuns owned by the Rollout.
    pub analysis_runs: Vec<ObservedAnalysisRun>,
    /// Analysis templates the spec references, by reference: the template's spec, or why it cannot be used.
    pub analysis_templates: BTreeMap<TemplateKey, Result<crate::crd::AnalysisTemplateSpec, String>>,
    /// A ReplicaSet named as this Rollout names the ReplicaSet of its current template, which it does not
    /// control (someone else made it): Serin must neither adopt, scale nor delete it.
    pub foreign_replica_set: Option<String>,
    /// The other Rollouts of the namespace, for the Services and pods two Rollouts must not share.
    pub neighbours: Vec<Neighbour>,
}

/// Another Rollout of the same namespace, as far as it can collide with this one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Neighbour {
    pub name: String,
    /// It was created before this Rollout (or at the same second with a smaller name): it keeps what both
    /// claim.
    pub older: bool,
    /// The Services it names (stable, canary, active, preview).
    pub services: Vec<String>,
    /// Its `spec.selector`.
    pub selector: LabelSelector,
    /// The labels of its pod template.
    pub pod_labels: BTreeMap<String, String>,
}

/// A ReplicaSet as the planner needs to see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedReplicaSet {
    pub name: String,
    /// Value of its `serin.dev/pod-template-hash` label.
    pub pod_template_hash: String,
    /// Value of its `serin.dev/revision` annotation.
    pub revision: i64,
    /// `spec.replicas`.
    pub spec_replicas: i32,
    /// `status.replicas`.
    pub replicas: i32,
    /// `status.readyReplicas`.
    pub ready_replicas: i32,
    /// `status.availableReplicas`.
    pub available_replicas: i32,
    /// `status.observedGeneration == metadata.generation`: the counts above describe the current spec.
    pub status_current: bool,
    /// It has a deletionTimestamp.
    pub deleting: bool,
}

/// A Service the spec names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedService {
    pub name: String,
    /// `spec.selector`.
    pub selector: BTreeMap<String, String>,
}

/// What an AnalysisRun is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnalysisPurpose {
    /// A canary `analysis` step, by step index.
    Step(i32),
    /// Background analysis of a canary.
    Background,
    /// Blue-green analysis before the switch.
    PrePromotion,
    /// Blue-green analysis after the switch.
    PostPromotion,
}

/// An AnalysisRun owned by the Rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedAnalysisRun {
    pub name: String,
    pub purpose: AnalysisPurpose,
    /// Pod-template hash of the revision it measures.
    pub pod_template_hash: String,
    /// `status.phase` (Pending when absent).
    pub phase: AnalysisPhase,
    /// `status.message`.
    pub message: Option<String>,
    /// `spec.terminate` is set.
    pub terminating: bool,
    /// Every metric that is not a dry run has been measured and its latest measurement was Successful: the
    /// version is healthy right now (a Running background run may have only errors since its last success).
    pub latest_successful: bool,
}

/// One change to the cluster. The controller applies a plan's actions in order and stops at the first
/// failure, so the planner puts them in the safe order (weight before selectors before scale-down).
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the ReplicaSet of a pod-template hash.
    CreateReplicaSet {
        name: String,
        pod_template_hash: String,
        revision: i64,
        replicas: i32,
        template: Box<PodTemplateSpec>,
    },
    /// Change `spec.replicas` of a ReplicaSet.
    ScaleReplicaSet { name: String, replicas: i32 },
    /// Change the revision annotation of an existing ReplicaSet (a template that comes back).
    SetRevision { name: String, revision: i64 },
    /// Delete an old ReplicaSet (history pruning).
    DeleteReplicaSet { name: String },
    /// Pin a Service's selector to a pod-template hash, or (None) to the Rollout's own selector only.
    SetServiceSelector {
        service: String,
        pod_template_hash: Option<String>,
    },
    /// Make the traffic router carry these weights and routes.
    SetTraffic(DesiredTraffic),
    /// Create an AnalysisRun.
    CreateAnalysisRun {
        name: String,
        purpose: AnalysisPurpose,
        pod_template_hash: String,
        spec: Box<AnalysisRunSpec>,
    },
    /// Ask a running AnalysisRun to stop.
    TerminateAnalysisRun { name: String },
    /// Delete an AnalysisRun of an old revision.
    DeleteAnalysisRun { name: String },
}

/// An event to record about a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning rather than Normal.
    pub warning: bool,
    /// One of [`crate::crd::reason`].
    pub reason: &'static str,
    pub message: String,
}

/// What the planner decided.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// Changes to apply, in order.
    pub actions: Vec<Action>,
    /// The status to write (written only if it differs from the current one).
    pub status: RolloutStatus,
    /// Events to record, one per decision.
    pub events: Vec<PlannedEvent>,
    /// Reconcile again after this long even if nothing changes (pause durations, delays, deadlines).
    pub requeue_after: Option<Duration>,
}

/// A header-based route to the canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRoute {
    /// Name from the `setHeaderRoute` step.
    pub name: String,
    /// All must match.
    pub matches: Vec<crate::crd::rollout::HeaderMatch>,
}

/// A mirror route: a share of requests copied to the canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRoute {
    /// Name from the `setMirrorRoute` step.
    pub name: String,
    /// Percentage of requests copied.
    pub percentage: i32,
}

/// What the router should carry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredTraffic {
    /// Service of the stable version.
    pub stable_service: String,
    /// Service of the canary version.
    pub canary_service: String,
    /// Percentage of traffic (0 to 100) to the canary Service; the rest goes to the stable Service.
    pub canary_weight: i32,
    /// Header routes in place, in step order.
    pub header_routes: Vec<HeaderRoute>,
    /// Mirror routes in place, in step order.
    pub mirror_routes: Vec<MirrorRoute>,
}

impl DesiredTraffic {
    /// Whether any request would reach the canary Service (weight, header route or mirror).
    pub fn sends_to_canary(&self) -> bool {
        self.canary_weight > 0
            || !self.header_routes.is_empty()
            || self
                .mirror_routes
                .iter()
                .any(|mirror| mirror.percentage > 0)
    }
}

/// What the router observes in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ObservedTraffic {
    /// Weight the canary Service receives now.
    pub canary_weight: i32,
    /// Names of the Serin-managed header routes present.
    pub header_routes: Vec<String>,
    /// Names of the Serin-managed mirror routes present.
    pub mirror_routes: Vec<String>,
}

/// What the planner knows of the Rollout's traffic router.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum RouteState {
    /// The Rollout names no traffic router.
    #[default]
    NotConfigured,
    /// The routing objects as read.
    Observed(ObservedTraffic),
    /// The routing objects are missing or not as the router needs them (why): the router cannot route.
    Invalid(String),
    /// The routing objects could not be read (an API error, a cache not synced): nothing is known of them,
    /// which is not the same as their being missing. `category` is bounded, for reasons and metrics.
    Unreadable {
        category: &'static str,
        message: String,
    },
}

impl RouteState {
    /// The routing objects' state, when it was read.
    pub fn observed(&self) -> Option<&ObservedTraffic> {
        match self {
            RouteState::Observed(traffic) => Some(traffic),
            _ => None,
        }
    }
}
