//! Analysis resources: `AnalysisTemplate`, `ClusterAnalysisTemplate` (what to measure) and `AnalysisRun`
//! (one execution of them for a Rollout, with every measurement).

// Several `printcolumn(...)` entries with the same keys are how kube-derive spells a list of columns.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::ManifestDuration;
use super::rollout::SecretKeyRef;

/// The body shared by AnalysisTemplate and ClusterAnalysisTemplate: arguments and metrics.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "AnalysisTemplate",
    namespaced,
    shortname = "at",
    category = "serin",
    doc = "An AnalysisTemplate says which metrics to measure, how often, and what counts as healthy.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisTemplateSpec {
    /// Arguments the metrics' queries refer to as `{{args.NAME}}`. An argument without a default value must
    /// be given by the Rollout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<TemplateArgument>,

    /// The metrics to measure. All of them run side by side.
    #[schemars(length(min = 1))]
    pub metrics: Vec<Metric>,

    /// Metrics whose failure is recorded but never fails the analysis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunMetric>,
}

/// A cluster-wide AnalysisTemplate, shared by Rollouts of every namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "ClusterAnalysisTemplate",
    shortname = "cat",
    category = "serin",
    doc = "A ClusterAnalysisTemplate is an AnalysisTemplate shared by all namespaces.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAnalysisTemplateSpec {
    /// Arguments the metrics' queries refer to as `{{args.NAME}}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<TemplateArgument>,

    /// The metrics to measure. All of them run side by side.
    #[schemars(length(min = 1))]
    pub metrics: Vec<Metric>,

    /// Metrics whose failure is recorded but never fails the analysis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunMetric>,
}

impl From<ClusterAnalysisTemplateSpec> for AnalysisTemplateSpec {
    fn from(spec: ClusterAnalysisTemplateSpec) -> Self {
        AnalysisTemplateSpec {
            args: spec.args,
            metrics: spec.metrics,
            dry_run: spec.dry_run,
        }
    }
}

/// A declared argument.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateArgument {
    /// Name used in queries as `{{args.NAME}}`.
    #[schemars(length(min = 1))]
    pub name: String,

    /// Default value, used when the Rollout gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,

    /// Read the default value from a Secret key in the Rollout's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<TemplateArgumentValueFrom>,
}

/// Where a template argument's default comes from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateArgumentValueFrom {
    /// A key of a Secret in the Rollout's namespace.
    pub secret_key_ref: SecretKeyRef,
}

/// A metric marked as dry-run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryRunMetric {
    /// Name of the metric.
    pub metric_name: String,
}

/// One metric: what to query, how often, and what counts as success or failure.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    /// Name of the metric, unique in the template.
    #[schemars(length(min = 1))]
    pub name: String,

    /// Time between measurements (`30s`, `1m`). Without it the metric is measured once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<ManifestDuration>,

    /// Time to wait before the first measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<ManifestDuration>,

    /// Number of measurements after which the metric is done. Without it a metric with an interval runs
    /// until its run is terminated (background analysis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<IntOrString>,

    /// Expression over `result` that makes a measurement Successful, for example `result < 0.01`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_condition: Option<String>,

    /// Expression over `result` that makes a measurement Failed, for example `result >= 0.05`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_condition: Option<String>,

    /// Failed measurements tolerated; one more fails the metric. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub failure_limit: Option<i32>,

    /// Inconclusive measurements tolerated; one more pauses the rollout for a human. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub inconclusive_limit: Option<i32>,

    /// Provider errors in a row tolerated; one more fails the metric. Defaults to 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_error_limit: Option<i32>,

    /// Where the measurement comes from.
    pub provider: MetricProvider,
}

/// Measurement providers. Exactly one is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricProvider {
    /// Prometheus (or any server speaking its HTTP query API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusMetric>,
}

/// A Prometheus instant query.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.query) != has(self.check)", "message": "set exactly one of query or check"}
]))]
pub struct PrometheusMetric {
    /// Base URL of the Prometheus server, for example `http://prometheus.monitoring:9090`. Omitted: the
    /// controller's default Prometheus (`--default-prometheus-address`). Serin calls only addresses its
    /// operator allows (`--allowed-destinations`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,

    /// PromQL instant query; `{{args.NAME}}` is replaced by the argument's escaped value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,

    /// A built-in check that needs no PromQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<BuiltinCheck>,

    /// Query timeout (`10s`). Defaults to 10 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<ManifestDuration>,

    /// Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<PrometheusAuthentication>,

    /// Extra HTTP headers sent with every query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeader>,

    /// TLS settings for https addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<PrometheusTls>,
}

/// Built-in checks over the common request metrics (`http_requests_total` and
/// `http_request_duration_seconds`), so that the two questions nearly every user asks need no PromQL.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinCheck {
    /// `ErrorRate`: share of 5xx responses. `LatencyP99`: 99th percentile of response time, in seconds.
    pub kind: BuiltinCheckKind,

    /// Value of the `service` label (often `{{args.service}}`).
    pub service: String,

    /// Value of the `pod_template_hash` label (often `{{args.canary-hash}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_hash: Option<String>,

    /// Value of the `namespace` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Range of the rate window (`1m`). Defaults to 1m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<ManifestDuration>,

    /// Name of the request counter. Defaults to `http_requests_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_metric: Option<String>,

    /// Name of the latency histogram (without `_bucket`). Defaults to `http_request_duration_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_metric: Option<String>,
}

/// The built-in checks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BuiltinCheckKind {
    /// Share of responses with a 5xx code.
    #[default]
    ErrorRate,
    /// 99th percentile of the response time, in seconds.
    LatencyP99,
}

/// Prometheus credentials, read from Secrets in the Rollout's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusAuthentication {
    /// Bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SecretKeyRef>,

    /// HTTP basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
}

/// Basic authentication credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// The user name.
    pub username: SecretKeyRef,
    /// The password.
    pub password: SecretKeyRef,
}

/// An HTTP header.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    /// Header name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Header value.
    pub value: String,
}

/// TLS settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusTls {
    /// CA bundle (PEM) used to verify the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretKeyRef>,

    /// Do not verify the server's certificate. Only for testing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// One execution of analysis templates for a Rollout; Serin creates it and owns it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "AnalysisRun",
    namespaced,
    status = "AnalysisRunStatus",
    shortname = "ar",
    category = "serin",
    doc = "An AnalysisRun measures the metrics of its templates for one Rollout revision and records every measurement.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRunSpec {
    /// Resolved arguments (values of Secrets are not copied here; they are read when measuring).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<TemplateArgument>,

    /// The metrics to measure, merged from all templates.
    #[schemars(length(min = 1))]
    pub metrics: Vec<Metric>,

    /// Metrics whose failure never fails the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunMetric>,

    /// Set by Serin to stop measuring (the step ended, the rollout was promoted or aborted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminate: bool,
}

/// What an AnalysisRun found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRunStatus {
    /// Pending, Running, Successful, Failed, Error or Inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AnalysisPhase>,

    /// Why the run ended as it did: which metric, which value, which condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When the run started measuring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// Per-metric results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metric_results: Vec<MetricResult>,
}

/// Results of one metric.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricResult {
    /// Name of the metric.
    pub name: String,
    /// Phase of the metric.
    pub phase: AnalysisPhase,
    /// Measurements taken.
    #[serde(default)]
    pub count: i32,
    /// Successful measurements.
    #[serde(default)]
    pub successful: i32,
    /// Failed measurements.
    #[serde(default)]
    pub failed: i32,
    /// Inconclusive measurements.
    #[serde(default)]
    pub inconclusive: i32,
    /// Measurements that errored.
    #[serde(default)]
    pub error: i32,
    /// Errors in a row, up to now.
    #[serde(default)]
    pub consecutive_error: i32,
    /// Why the metric is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The most recent measurements (bounded history), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measurements: Vec<Measurement>,
    /// Whether the metric is dry-run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// One measurement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Successful, Failed, Inconclusive or Error.
    pub phase: AnalysisPhase,
    /// The value the provider returned, as text (`0.012`, `NaN`, `[]` for no data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// When the measurement started.
    pub started_at: Time,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Why it has this phase, for errors and inconclusive results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Extra details (the query that ran, the provider's HTTP status).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Phases of an analysis run, metric or measurement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum AnalysisPhase {
    /// Not started.
    #[default]
    Pending,
    /// Measuring.
    Running,
    /// Healthy.
    Successful,
    /// Unhealthy.
    Failed,
    /// The provider could not measure.
    Error,
    /// Neither success nor failure could be decided; a human must look.
    Inconclusive,
}

impl AnalysisPhase {
    /// Whether the phase is final.
    pub fn is_completed(&self) -> bool {
        !matches!(self, AnalysisPhase::Pending | AnalysisPhase::Running)
    }

    /// The phase as written in status.
    pub fn as_str(&self) -> &'static str {
        match self {
            AnalysisPhase::Pending => "Pending",
            AnalysisPhase::Running => "Running",
            AnalysisPhase::Successful => "Successful",
            AnalysisPhase::Failed => "Failed",
            AnalysisPhase::Error => "Error",
            AnalysisPhase::Inconclusive => "Inconclusive",
        }
    }
}
