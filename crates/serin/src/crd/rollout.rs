//! The `Rollout` resource: what the user asks for (spec) and where the rollout stands (status).

// Several `printcolumn(...)` entries with the same keys are how kube-derive spells a list of columns.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::duration::ManifestDuration;
use super::template::PodTemplate;

/// A Rollout replaces a Deployment: it runs the pods of `template` and, when the template changes, brings
/// the new version up beside the old one and shifts traffic to it step by step (canary) or after a preview
/// (blue-green), checking its health with analysis and rolling back by itself when it is not healthy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "ro",
    category = "serin",
    doc = "A Rollout runs the pods of its template and moves traffic from one version to the next by canary or blue-green steps, with automatic rollback.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableReplicas"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Step",
        type_ = "integer",
        json_path = ".status.currentStepIndex"
    ),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        json_path = ".status.currentWeight"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Number of pods the Rollout runs when it is not in the middle of an update. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = super::MAX_REPLICAS))]
    pub replicas: Option<i32>,

    /// Label selector for the pods of this Rollout. It must match the labels of `template`.
    pub selector: LabelSelector,

    /// The pod template, exactly as in a Deployment. Changing it starts a new rollout.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplate,

    /// How many old ReplicaSets are kept (scaled to zero) so that `serin undo` can return to them. Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub revision_history_limit: Option<i32>,

    /// Seconds a step may go without progress (paused time does not count) before the Rollout reports
    /// ProgressDeadlineExceeded. Defaults to 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,

    /// Abort the rollout (all traffic back on the stable version) when the progress deadline is exceeded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub progress_deadline_abort: bool,

    /// Seconds a new pod must be ready, without crashing, before it counts as available. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_ready_seconds: Option<i32>,

    /// Holds the rollout where it is: no step advances while true. Prefer `serin pause`, which does not
    /// change the spec that Git owns.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,

    /// How a new version replaces the old one: exactly one of `canary` or `blueGreen`.
    pub strategy: RolloutStrategy,
}

/// How a new version replaces the old one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.canary) != has(self.blueGreen)", "message": "exactly one of strategy.canary or strategy.blueGreen must be set"}
]))]
pub struct RolloutStrategy {
    /// Move traffic to the new version step by step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStrategy>,

    /// Run the new version beside the old one behind a preview Service, then switch the active Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreenStrategy>,
}

/// Canary: the new version takes a growing share of traffic, one step at a time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.stableService) || !has(self.canaryService) || self.stableService != self.canaryService", "message": "stableService and canaryService must be different Services", "fieldPath": ".canaryService"}
]))]
pub struct CanaryStrategy {
    /// Service whose selector Serin pins to the stable version's pods (the one users' traffic goes to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_service: Option<String>,

    /// Service whose selector Serin pins to the canary version's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_service: Option<String>,

    /// A traffic router that splits traffic exactly. Without one, the weight is approximated by the ratio
    /// of ready canary and stable pods behind the stable Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<TrafficRouting>,

    /// The steps, in order. After the last step the canary is promoted to stable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = super::MAX_STEPS))]
    pub steps: Vec<CanaryStep>,

    /// Analysis that runs in the background from `startingStep` until the rollout is promoted; its failure
    /// aborts the rollout at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<BackgroundAnalysis>,

    /// Pods above the desired count allowed during the update (number or percentage). Defaults to 25%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pods_or_percent_schema")]
    pub max_surge: Option<IntOrString>,

    /// Pods below the desired count allowed to be unavailable during the update (number or percentage).
    /// Defaults to 0, so the stable version never shrinks below what its traffic needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pods_or_percent_schema")]
    pub max_unavailable: Option<IntOrString>,

    /// Seconds the canary pods are kept after an abort (traffic is already back on stable). Defaults to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub abort_scale_down_delay_seconds: Option<i32>,

    /// Seconds the old stable pods are kept after a promotion with a traffic router, for an instant
    /// rollback. Defaults to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub scale_down_delay_seconds: Option<i32>,
}

/// One canary step. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.setCanaryScale) ? 1 : 0) + (has(self.analysis) ? 1 : 0) + (has(self.setHeaderRoute) ? 1 : 0) + (has(self.setMirrorRoute) ? 1 : 0) == 1", "message": "a step sets exactly one of setWeight, pause, setCanaryScale, analysis, setHeaderRoute, setMirrorRoute"}
]))]
pub struct CanaryStep {
    /// Percentage of traffic (0 to 100) the canary gets from this step on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub set_weight: Option<i32>,

    /// Wait: for `duration`, or, without it, until `serin promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,

    /// Size the canary independently of its traffic weight (with a traffic router).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_canary_scale: Option<SetCanaryScale>,

    /// Run an analysis and wait for its verdict: success moves on, failure aborts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<RolloutAnalysis>,

    /// Send requests that carry a header to the canary (Gateway API and Istio routers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_header_route: Option<SetHeaderRoute>,

    /// Copy a share of requests to the canary; its answers are discarded (routers that support mirroring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_mirror_route: Option<SetMirrorRoute>,
}

/// A pause step.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long to wait (`30`, `30s`, `5m`, `1h`). Without it the rollout waits for `serin promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<ManifestDuration>,
}

/// Canary size that does not follow the traffic weight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.replicas) ? 1 : 0) + (has(self.weight) ? 1 : 0) + (has(self.matchTrafficWeight) && self.matchTrafficWeight ? 1 : 0) == 1", "message": "setCanaryScale sets exactly one of replicas, weight, matchTrafficWeight"}
]))]
pub struct SetCanaryScale {
    /// An exact number of canary pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = super::MAX_REPLICAS))]
    pub replicas: Option<i32>,

    /// Canary pods as a percentage (0 to 100) of `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,

    /// Go back to sizing the canary by its traffic weight.
    #[serde(default, skip_serializing_if = "is_false")]
    pub match_traffic_weight: bool,
}

/// Route requests that match headers to the canary.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetHeaderRoute {
    /// Name of the managed route; the same name in a later step replaces it.
    pub name: String,

    /// Header conditions, all of which must hold. Empty removes the route.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HeaderMatch>,
}

/// A header condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, for example `X-Canary`.
    #[schemars(length(min = 1))]
    pub header_name: String,

    /// How the header value must match.
    pub header_value: StringMatch,
}

/// How a string must match. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1", "message": "set exactly one of exact, prefix, regex"}
]))]
pub struct StringMatch {
    /// The value must be exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value must start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value must match this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Mirror a share of matching requests to the canary.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetMirrorRoute {
    /// Name of the managed mirror route; the same name in a later step replaces it.
    pub name: String,

    /// Percentage (0 to 100) of requests copied to the canary. Absent or 0 removes the mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: Option<i32>,
}

/// Traffic routers. Exactly one is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.gatewayAPI) ? 1 : 0) + (has(self.istio) ? 1 : 0) + (has(self.nginx) ? 1 : 0) == 1", "message": "set exactly one of gatewayAPI, istio, nginx"}
]))]
pub struct TrafficRouting {
    /// Gateway API: weights on the stable and canary backendRefs of an HTTPRoute.
    #[serde(
        default,
        rename = "gatewayAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApiRouting>,

    /// Istio: weights on the destinations of named HTTP routes of a VirtualService.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioRouting>,

    /// NGINX Ingress: a managed canary copy of the stable Ingress with a canary weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx: Option<NginxRouting>,
}

/// Gateway API router settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiRouting {
    /// Name of the HTTPRoute (in the Rollout's namespace) whose rule references the stable and canary Services.
    #[schemars(length(min = 1))]
    pub http_route: String,
}

/// Istio router settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IstioRouting {
    /// The VirtualService and the HTTP routes in it whose weights Serin manages.
    pub virtual_service: IstioVirtualService,

    /// Route by DestinationRule subsets instead of by the stable and canary Service hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<IstioDestinationRule>,
}

/// A VirtualService and its routes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IstioVirtualService {
    /// Name of the VirtualService in the Rollout's namespace.
    #[schemars(length(min = 1))]
    pub name: String,

    /// Names of the HTTP routes whose destination weights Serin manages. May be empty when the
    /// VirtualService has exactly one HTTP route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

/// Subsets of a DestinationRule whose labels Serin pins to the stable and canary pod-template hashes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IstioDestinationRule {
    /// Name of the DestinationRule in the Rollout's namespace.
    pub name: String,
    /// Subset that serves the canary.
    pub canary_subset_name: String,
    /// Subset that serves the stable version.
    pub stable_subset_name: String,
}

/// NGINX Ingress router settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NginxRouting {
    /// Name of the Ingress (in the Rollout's namespace) that routes to the stable Service.
    #[schemars(length(min = 1))]
    pub stable_ingress: String,

    /// Annotation prefix of the ingress controller. Defaults to `nginx.ingress.kubernetes.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation_prefix: Option<String>,

    /// Extra annotations put on the managed canary Ingress.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub additional_ingress_annotations: BTreeMap<String, String>,
}

/// Blue-green: the new version runs behind `previewService` until promotion switches `activeService` to it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.previewService) || self.previewService != self.activeService", "message": "activeService and previewService must be different Services", "fieldPath": ".previewService"}
]))]
pub struct BlueGreenStrategy {
    /// Service that carries users' traffic; Serin pins its selector to the active version.
    #[schemars(length(min = 1))]
    pub active_service: String,

    /// Service pinned to the new version before promotion, for testing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_service: Option<String>,

    /// Promote by itself once the new version is ready (after `autoPromotionSeconds`). Defaults to true;
    /// when false the rollout waits for `serin promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promotion_enabled: Option<bool>,

    /// Seconds to wait, once the new version is fully ready, before promoting it by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub auto_promotion_seconds: Option<i32>,

    /// Pods of the new version before promotion. Defaults to `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = super::MAX_REPLICAS))]
    pub preview_replica_count: Option<i32>,

    /// Seconds the old version is kept running after the switch, for an instant rollback. Defaults to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub scale_down_delay_seconds: Option<i32>,

    /// Seconds the new version is kept after an abort. Defaults to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub abort_scale_down_delay_seconds: Option<i32>,

    /// Analysis that must succeed before the active Service is switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_promotion_analysis: Option<RolloutAnalysis>,

    /// Analysis that runs after the switch; its failure switches the active Service back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_promotion_analysis: Option<RolloutAnalysis>,
}

/// Which analysis templates to run, with which arguments.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutAnalysis {
    /// Templates whose metrics are measured together in one AnalysisRun.
    #[schemars(length(min = 1))]
    pub templates: Vec<AnalysisTemplateRef>,

    /// Values for the templates' arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<AnalysisArgument>,
}

/// Background analysis: runs from a step until promotion.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundAnalysis {
    /// Templates whose metrics are measured together in one AnalysisRun.
    #[schemars(length(min = 1))]
    pub templates: Vec<AnalysisTemplateRef>,

    /// Values for the templates' arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<AnalysisArgument>,

    /// Index of the step from which the analysis runs. Defaults to 0 (from the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_step: Option<i32>,
}

/// A reference to an AnalysisTemplate or ClusterAnalysisTemplate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisTemplateRef {
    /// Name of the template.
    #[schemars(length(min = 1))]
    pub template_name: String,

    /// The template is a ClusterAnalysisTemplate rather than an AnalysisTemplate in the Rollout's namespace.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cluster_scope: bool,
}

/// A value for a template argument.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.value) && has(self.valueFrom))", "message": "set value or valueFrom, not both"}
]))]
pub struct AnalysisArgument {
    /// Argument name, as declared by the template.
    #[schemars(length(min = 1))]
    pub name: String,

    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,

    /// Where to read the value from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ArgumentValueFrom>,
}

/// A value read from the cluster or from the Rollout itself. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.secretKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) + (has(self.podTemplateHashValue) ? 1 : 0) == 1", "message": "set exactly one of secretKeyRef, fieldRef, podTemplateHashValue"}
]))]
pub struct ArgumentValueFrom {
    /// A key of a Secret in the Rollout's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,

    /// A field of the Rollout, as a dotted path such as `metadata.name` or `metadata.labels['app']`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_ref: Option<FieldRef>,

    /// The pod-template hash of the `Stable` or the `Latest` (canary) version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_hash_value: Option<PodTemplateHashValue>,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A field of the Rollout.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    /// Dotted path, for example `metadata.name`, `metadata.namespace`, `metadata.labels['app']`.
    #[schemars(length(min = 1))]
    pub field_path: String,
}

/// Which version's pod-template hash to use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PodTemplateHashValue {
    /// The stable version.
    Stable,
    /// The newest version (the canary, or the preview).
    Latest,
}

/// Where the rollout stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Progressing, Paused, Healthy, Degraded or Aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,

    /// What is happening, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Index of the canary step being carried out; equal to the number of steps when all are done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step_index: Option<i32>,

    /// The version that serves users' traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<RevisionRef>,

    /// The newest version (canary or preview), when it differs from stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<RevisionRef>,

    /// Pod-template hash of the current template (`spec.template`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_pod_hash: Option<String>,

    /// Percentage of traffic the canary receives now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_weight: Option<i32>,

    /// Percentage of traffic the canary should receive at the current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_weight: Option<i32>,

    /// Pods of all versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Pods of the current template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,

    /// Ready pods of all versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Available pods of all versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,

    /// Label selector of the pods, as a string (for the scale subresource and HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Standard conditions: Ready, Progressing, Available, Paused, Degraded, InvalidSpec, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Why the rollout is paused, when it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pause_conditions: Vec<PauseCondition>,

    /// When the current step started (pause durations and progress deadlines count from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,

    /// When the rollout last made progress (a pod became ready, a step advanced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at: Option<Time>,

    /// Seconds spent paused during the current step, which do not count against the progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_seconds_in_step: Option<i64>,

    /// Hash of `spec.strategy.canary.steps` the current step index refers to. When the steps change while a
    /// revision is in flight, its steps start again from the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_hash: Option<String>,

    /// True once the rollout of the current template was aborted; `serin retry` clears it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub abort: bool,

    /// When the rollout was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_at: Option<Time>,

    /// Manual commands waiting for the controller (`serin promote`, `serin pause`, ...). They live in the
    /// status so that GitOps tools, which own the spec, see no drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<ManualCommands>,

    /// Pod-template hashes that are to be scaled down, with the time when that may happen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_down_deadlines: Vec<ScaleDownDeadline>,

    /// Blue-green state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreenStatus>,

    /// Traffic router state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficStatus>,

    /// Analysis runs of the current revision and what they found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStatus>,
}

/// Manual commands for the controller, written by `serin` into the status subresource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualCommands {
    /// Promote: `Step` ends the current pause or gate, `Full` skips all remaining steps and analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<PromoteCommand>,

    /// Abort the rollout: all traffic back to stable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub abort: bool,

    /// Retry an aborted rollout from its first step.
    #[serde(default, skip_serializing_if = "is_false")]
    pub retry: bool,

    /// Hold the rollout where it is until `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// Kinds of promotion.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PromoteCommand {
    /// End the current pause or gate and go on with the next step.
    Step,
    /// Skip all remaining steps and analysis and make the new version stable.
    Full,
}

/// A version of the pod template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRef {
    /// Pod-template hash: the name suffix and `serin.dev/pod-template-hash` label of its ReplicaSet.
    pub pod_template_hash: String,
    /// Revision number: 1 for the first template, growing with every new one.
    pub revision: i64,
}

/// Why the rollout is paused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseCondition {
    /// CanaryPauseStep, BlueGreenPause, InconclusiveAnalysis or UserPause.
    pub reason: String,
    /// When the pause began.
    pub start_time: Time,
}

/// A ReplicaSet to scale down once its delay has passed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownDeadline {
    /// Pod-template hash of the ReplicaSet.
    pub pod_template_hash: String,
    /// Time after which it is scaled to zero.
    pub after: Time,
}

/// Blue-green state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenStatus {
    /// Pod-template hash the active Service selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,
    /// Pod-template hash the preview Service selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_selector: Option<String>,
    /// When the new version became fully ready behind the preview Service (auto-promotion counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_ready_at: Option<Time>,
    /// Hash that was active before the last switch (kept for the scale-down delay and post-promotion rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_active_selector: Option<String>,
    /// True after the switch while post-promotion analysis is still deciding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub post_promotion_pending: bool,
}

/// What the traffic router reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficStatus {
    /// The router in use: replicas, gatewayAPI, istio or nginx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// Header routes currently in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_routes: Vec<String>,
    /// Mirror routes currently in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_routes: Vec<String>,
}

/// Analysis runs of the current revision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// The AnalysisRun of the current analysis step or blue-green gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_run: Option<AnalysisRunRef>,
    /// The background AnalysisRun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_run: Option<AnalysisRunRef>,
    /// What made the last analysis fail: metric, value and condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An AnalysisRun and where it stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRunRef {
    /// Name of the AnalysisRun.
    pub name: String,
    /// Its phase: Pending, Running, Successful, Failed, Error or Inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// The phases of a rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Moving towards the desired state.
    Progressing,
    /// Waiting at a pause step, a gate, or for a human.
    Paused,
    /// The current template is fully rolled out and available.
    Healthy,
    /// Something is wrong: invalid spec, deadline exceeded, pods not available.
    Degraded,
    /// The rollout was aborted; all traffic is on the stable version.
    Aborted,
}

impl RolloutPhase {
    /// The phase as written in status.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Paused => "Paused",
            RolloutPhase::Healthy => "Healthy",
            RolloutPhase::Degraded => "Degraded",
            RolloutPhase::Aborted => "Aborted",
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The full PodTemplateSpec schema is several hundred kilobytes and would push the CRD past the
/// annotation limit of client-side `kubectl apply`; the API server checks labels and annotations, and the
/// controller checks the pod spec when it decodes the template.
fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "The pod template, exactly as in a Deployment.",
        "properties": {
            "metadata": {
                "type": "object",
                "properties": {
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
                },
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true
            }
        }
    })
}

/// A number of pods (at most [`super::MAX_REPLICAS`]) or a percentage (at most 100%). As for durations,
/// allOf and not anyOf: `maximum` then constrains only integers and `pattern` only strings.
fn pods_or_percent_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "allOf": [
            {"minimum": 0, "maximum": super::MAX_REPLICAS},
            {"pattern": PODS_OR_PERCENT_PATTERN}
        ]
    })
}

/// A percentage from 0% to 100%, or a number of pods written as a string.
pub const PODS_OR_PERCENT_PATTERN: &str = r"^(100|[1-9]?[0-9])%$|^[0-9]{1,6}$";
