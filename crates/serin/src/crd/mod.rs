//! Custom resource types (`serin.dev/v1alpha1`): Rollout, AnalysisTemplate, ClusterAnalysisTemplate, AnalysisRun.

pub mod analysis;
pub mod duration;
pub mod rollout;
pub mod template;

pub use analysis::{
    AnalysisPhase, AnalysisRun, AnalysisRunSpec, AnalysisRunStatus, AnalysisTemplate,
    AnalysisTemplateSpec, ClusterAnalysisTemplate, ClusterAnalysisTemplateSpec, Measurement,
    Metric, MetricResult,
};
pub use duration::{parse_duration, DurationError, ManifestDuration};
pub use rollout::{
    BlueGreenStrategy, CanaryStep, CanaryStrategy, Rollout, RolloutPhase, RolloutSpec,
    RolloutStatus, RolloutStrategy, TrafficRouting,
};
pub use template::PodTemplate;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every Serin resource.
pub const GROUP: &str = "serin.dev";
/// API version of every Serin resource.
pub const VERSION: &str = "v1alpha1";

/// Most canary steps a Rollout may have: far more than any real rollout, few enough that a message per
/// step fits in a status and the API server's CEL cost budget for the step rules holds.
pub const MAX_STEPS: usize = 100;
/// Most pods a Rollout may ask for (a Kubernetes cluster supports 150,000 in all): keeps every replica sum
/// far from `i32::MAX`.
pub const MAX_REPLICAS: i32 = 100_000;

/// The field manager Serin writes with (`serin-cli` for the CLI's writes).
pub const FIELD_MANAGER: &str = "serin";

/// Labels and annotations Serin puts on the objects it manages.
pub mod labels {
    /// Pod-template hash of a ReplicaSet and its pods; Services' selectors are pinned to it.
    pub const POD_TEMPLATE_HASH: &str = "serin.dev/pod-template-hash";
    /// Revision number of a ReplicaSet (1, 2, ...), an annotation.
    pub const REVISION: &str = "serin.dev/revision";
    /// Name of the Rollout that manages an object.
    pub const ROLLOUT_NAME: &str = "serin.dev/rollout";
    /// Which analysis an AnalysisRun belongs to: step, background, pre-promotion, post-promotion.
    pub const ANALYSIS_KIND: &str = "serin.dev/analysis";
    /// Index of the canary step an AnalysisRun belongs to.
    pub const STEP_INDEX: &str = "serin.dev/step-index";
    /// Annotation on a Service: the selector it had before Serin pinned it.
    pub const ORIGINAL_SELECTOR: &str = "serin.dev/original-selector";
}

/// Condition types in `status.conditions`.
pub mod condition {
    /// The current template is fully rolled out, available, and nothing is pending (kstatus: Current).
    pub const READY: &str = "Ready";
    /// A rollout is under way and moving.
    pub const PROGRESSING: &str = "Progressing";
    /// The Rollout has at least its minimum of available pods.
    pub const AVAILABLE: &str = "Available";
    /// The rollout waits at a pause, a gate, or for a human.
    pub const PAUSED: &str = "Paused";
    /// Something is wrong and needs attention.
    pub const DEGRADED: &str = "Degraded";
    /// The spec cannot be carried out; nothing was changed in the cluster.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// kstatus: the controller is still working towards the desired state.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the controller cannot make progress without a change.
    pub const STALLED: &str = "Stalled";
}

/// Reasons in conditions and events.
pub mod reason {
    pub const ROLLOUT_COMPLETED: &str = "RolloutCompleted";
    pub const NEW_REVISION: &str = "NewRevision";
    pub const STEP_REACHED: &str = "StepReached";
    pub const WEIGHT_CHANGED: &str = "WeightChanged";
    pub const PAUSED_STEP: &str = "CanaryPauseStep";
    pub const PAUSED_BLUE_GREEN: &str = "BlueGreenPause";
    pub const PAUSED_BY_USER: &str = "UserPause";
    pub const PAUSED_INCONCLUSIVE: &str = "InconclusiveAnalysis";
    pub const RESUMED: &str = "Resumed";
    pub const PROMOTED: &str = "Promoted";
    pub const PROMOTED_FULL: &str = "PromotedFull";
    pub const ABORTED: &str = "Aborted";
    pub const ANALYSIS_FAILED: &str = "AnalysisFailed";
    pub const RETRIED: &str = "Retried";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    pub const WAITING_FOR_PODS: &str = "WaitingForPods";
    pub const AVAILABLE: &str = "AvailableReplicas";
    pub const UNAVAILABLE: &str = "NotEnoughAvailableReplicas";
    pub const SWITCHED_ACTIVE: &str = "ActiveSwitched";
    pub const SCALED_DOWN: &str = "ScaledDown";
    pub const FAST_ROLLBACK: &str = "FastRollback";
    pub const TRAFFIC_DRIFT: &str = "TrafficDriftReverted";
    pub const ROUTE_MISSING: &str = "RouteMissing";
    /// The routing objects could not be read (an API error): the rollout holds where it is, not Degraded.
    pub const ROUTE_UNREADABLE: &str = "RouteUnreadable";
    pub const SERVICE_MISSING: &str = "ServiceMissing";
    /// The recorded stable version has no ReplicaSet; the rollout holds.
    pub const STABLE_MISSING: &str = "StableReplicaSetMissing";
    /// The canary steps changed while a revision was in flight; its steps start again.
    pub const STEPS_CHANGED: &str = "StepsChanged";
}

/// Every CustomResourceDefinition Serin needs, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        Rollout::crd(),
        AnalysisTemplate::crd(),
        ClusterAnalysisTemplate::crd(),
        AnalysisRun::crd(),
    ]
}

/// File name in `crds/` for each CRD, paired with its YAML.
pub fn all_as_yaml() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    all()
        .into_iter()
        .map(|crd| {
            let file = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            serde_yaml::to_string(&crd).map(|yaml| (file, yaml))
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream, as `serin crd` prints it.
pub fn render_all() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for (_, yaml) in all_as_yaml()? {
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}
