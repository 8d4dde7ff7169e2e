//! The AnalysisRun controller: measures each running run's metrics when they are due, records the
//! measurements and phases in the run's status, and stops when the run is complete or terminated.
//!
//! [`advance`] does one pass over one run (measure what is due, judge, compute phases) and returns the new
//! status; the kube-runtime controller around it only reads runs and Secrets and writes status. Every due
//! time is computed from the status (start time, last measurement), so a restarted runner neither measures
//! twice nor measures a completed run.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::args;
use super::builtin::builtin_query;
use super::condition::{ConditionCache, Conditions};
use super::outbound::{self, Admitted, OutboundConfig};
use super::prometheus::{
    Credentials, PrometheusProvider, PrometheusTarget, ProviderError, DEFAULT_TIMEOUT,
};
use super::run_spec::dry_run_names;
use super::secret_access::{self, RunOwner};
use super::verdict::{self, MetricLimits};
use crate::crd::analysis::{
    AnalysisRun, AnalysisRunStatus, AnalysisTemplate, AnalysisTemplateSpec,
    ClusterAnalysisTemplate, Measurement, Metric, MetricResult, PrometheusMetric,
};
use crate::crd::rollout::SecretKeyRef;
use crate::crd::{AnalysisPhase, Rollout};
use crate::events::{Note, Publisher, Severity};

/// Why a Secret value could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret {namespace}/{name} does not exist")]
    NotFound { namespace: String, name: String },
    #[error("secret {namespace}/{name} has no key {key:?}")]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret {namespace}/{name} key {key:?} is not UTF-8 text")]
    NotText {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret {namespace}/{name} cannot be read: {reason}")]
    Unreadable {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("the Rollout {namespace}/{name} that controls the run cannot be read: {reason}")]
    OwnerUnreadable {
        namespace: String,
        name: String,
        reason: String,
    },
}

impl SecretError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SecretError::NotFound { .. } => "not_found",
            SecretError::MissingKey { .. } => "missing_key",
            SecretError::NotText { .. } => "not_text",
            SecretError::Unreadable { .. } => "unreadable",
            SecretError::OwnerUnreadable { .. } => "owner_unreadable",
        }
    }
}

/// Why the runner could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("AnalysisRuns cannot be listed (is the CRD installed and readable?): {0}")]
    ListRuns(#[source] kube::Error),
}

impl RunnerError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            RunnerError::ListRuns(_) => "list_runs",
        }
    }
}

/// Why one reconcile of a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("writing the status of AnalysisRun {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::WriteStatus { .. } => "write_status",
        }
    }
}

/// Reads Secret values at measurement time, and the Rollout that must vouch for a run before any is read.
pub trait SecretStore: Send + Sync {
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        secret: &'a SecretKeyRef,
    ) -> BoxFuture<'a, Result<String, SecretError>>;

    /// The Rollout `name` of `namespace` with the templates it references; `None` when it does not exist.
    fn run_owner<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunOwner>, SecretError>>;
}

/// Secrets read from the API server.
#[derive(Clone)]
pub struct KubeSecrets {
    client: Client,
}

impl KubeSecrets {
    pub fn new(client: Client) -> Self {
        KubeSecrets { client }
    }
}

impl SecretStore for KubeSecrets {
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        secret: &'a SecretKeyRef,
    ) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let found = api
                .get_opt(&secret.name)
                .await
                .map_err(|e| SecretError::Unreadable {
                    namespace: namespace.to_string(),
                    name: secret.name.clone(),
                    reason: e.to_string(),
                })?;
            let found = found.ok_or_else(|| SecretError::NotFound {
                namespace: namespace.to_string(),
                name: secret.name.clone(),
            })?;
            if let Some(bytes) = found.data.as_ref().and_then(|d| d.get(&secret.key)) {
                return String::from_utf8(bytes.0.clone()).map_err(|_| SecretError::NotText {
                    namespace: namespace.to_string(),
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                });
            }
            // A server that does not fold stringData into data (like a simple test server) still works.
            found
                .string_data
                .as_ref()
                .and_then(|d| d.get(&secret.key))
                .cloned()
                .ok_or_else(|| SecretError::MissingKey {
                    namespace: namespace.to_string(),
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                })
        })
    }

    fn run_owner<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunOwner>, SecretError>> {
        Box::pin(async move {
            let unreadable = |reason: String| SecretError::OwnerUnreadable {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason,
            };
            let rollouts: Api<Rollout> = Api::namespaced(self.client.clone(), namespace);
            let Some(rollout) = rollouts
                .get_opt(name)
                .await
                .map_err(|e| unreadable(e.to_string()))?
            else {
                return Ok(None);
            };
            let mut templates: Vec<AnalysisTemplateSpec> = Vec::new();
            for reference in secret_access::template_refs(&rollout.spec.strategy) {
                let found = if reference.cluster_scope {
                    Api::<ClusterAnalysisTemplate>::all(self.client.clone())
                        .get_opt(&reference.template_name)
                        .await
                        .map(|t| t.map(|t| AnalysisTemplateSpec::from(t.spec)))
                } else {
                    Api::<AnalysisTemplate>::namespaced(self.client.clone(), namespace)
                        .get_opt(&reference.template_name)
                        .await
                        .map(|t| t.map(|t| t.spec))
                };
                templates.extend(found.map_err(|e| unreadable(e.to_string()))?);
            }
            Ok(Some(RunOwner { rollout, templates }))
        })
    }
}

/// Secrets held in memory: namespace -> secret name -> key -> value, and the Rollouts that vouch for runs.
/// For tests, benchmarks and the demo.
#[derive(Clone, Debug, Default)]
pub struct StaticSecrets {
    secrets: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    owners: BTreeMap<(String, String), RunOwner>,
}

impl StaticSecrets {
    /// Adds one key of one Secret.
    pub fn with(mut self, namespace: &str, name: &str, key: &str, value: &str) -> Self {
        self.secrets
            .entry(namespace.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a Rollout (in its own namespace) with the templates it references.
    pub fn with_owner(mut self, owner: RunOwner) -> Self {
        let key = (
            owner.rollout.namespace().unwrap_or_default(),
            owner.rollout.name_any(),
        );
        self.owners.insert(key, owner);
        self
    }
}

impl SecretStore for StaticSecrets {
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        secret: &'a SecretKeyRef,
    ) -> BoxFuture<'a, Result<String, SecretError>> {
        let found = match self
            .secrets
            .get(namespace)
            .and_then(|n| n.get(&secret.name))
        {
            None => Err(SecretError::NotFound {
                namespace: namespace.to_string(),
                name: secret.name.clone(),
            }),
            Some(keys) => keys
                .get(&secret.key)
                .cloned()
                .ok_or_else(|| SecretError::MissingKey {
                    namespace: namespace.to_string(),
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                }),
        };
        Box::pin(async move { found })
    }

    fn run_owner<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<RunOwner>, SecretError>> {
        let found = self
            .owners
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(async move { Ok(found) })
    }
}

/// What a pass over a run needs to measure: the provider (with its outbound policy), where Secrets come
/// from, and the address of a metric that names none.
#[derive(Clone)]
pub struct Measurer {
    pub provider: PrometheusProvider,
    pub secrets: Arc<dyn SecretStore>,
    pub conditions: ConditionCache,
    /// Told the phase of every measurement taken (for the controller's metrics).
    pub on_measurement: Option<Arc<dyn Fn(AnalysisPhase) + Send + Sync>>,
    /// The Prometheus a metric without `address` queries.
    pub default_prometheus_address: Option<String>,
}

/// Where the operator sets the default Prometheus address; named when a metric has no address.
pub const DEFAULT_PROMETHEUS_ADDRESS_SETTING: &str = "flag --default-prometheus-address, env \
     SERIN_DEFAULT_PROMETHEUS_ADDRESS, Helm value analysis.defaultPrometheusAddress";

impl Measurer {
    pub fn new(provider: PrometheusProvider, secrets: Arc<dyn SecretStore>) -> Self {
        Measurer {
            provider,
            secrets,
            conditions: ConditionCache::default(),
            on_measurement: None,
            default_prometheus_address: None,
        }
    }

    /// The same measurer, querying `address` for metrics that name none. The operator chose it, so the
    /// outbound policy allows its host and port as if listed.
    pub fn with_default_prometheus_address(mut self, address: Option<String>) -> Self {
        if let Some(address) = &address {
            let outbound = self.provider.outbound().clone();
            match outbound.policy.clone().allowing_address(address) {
                Ok(policy) => {
                    self.provider = self.provider.reconfigured(OutboundConfig {
                        policy,
                        limits: outbound.limits,
                    })
                }
                // The policy then refuses it, and the measurement says why.
                Err(error) => tracing::warn!(%error, "the default Prometheus address is unusable"),
            }
        }
        self.default_prometheus_address = address.filter(|a| !a.is_empty());
        self
    }

    /// The same measurer, also treating these addresses as the API server's.
    pub fn with_api_server(mut self, addresses: Vec<std::net::IpAddr>) -> Self {
        let outbound = self.provider.outbound().clone();
        self.provider = self.provider.reconfigured(OutboundConfig {
            policy: outbound.policy.with_api_server(addresses),
            limits: outbound.limits,
        });
        self
    }

    /// The same measurer, telling `observer` the phase of every measurement it takes.
    pub fn observed_by(mut self, observer: Arc<dyn Fn(AnalysisPhase) + Send + Sync>) -> Self {
        self.on_measurement = Some(observer);
        self
    }
}

/// The outcome of one pass over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Advance {
    /// The run's new status (equal to the old one when nothing happened).
    pub status: AnalysisRunStatus,
    /// When to look at the run again; `None` once it is complete.
    pub requeue_after: Option<Duration>,
    /// How many measurements this pass took.
    pub measured: usize,
    /// Warnings to record as events on the run (refused destinations and Secret reads).
    pub events: Vec<RunEvent>,
}

/// A warning about a run, recorded as an event on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunEvent {
    pub reason: &'static str,
    pub message: String,
}

/// The event reason of a refused destination.
pub const DESTINATION_REFUSED: &str = "DestinationRefused";
/// The event reason of a refused Secret read.
pub const SECRET_ACCESS_REFUSED: &str = "SecretAccessRefused";

/// A metric's settings, checked once per pass before anything is measured.
struct PreparedMetric<'r> {
    metric: &'r Metric,
    prometheus: &'r PrometheusMetric,
    conditions: Arc<Conditions>,
    limits: MetricLimits,
    interval: Duration,
    initial_delay: Duration,
}

fn prepare<'r>(metric: &'r Metric, cache: &ConditionCache) -> Result<PreparedMetric<'r>, String> {
    let in_metric = |reason: String| format!("metric {:?}: {reason}", metric.name);
    let conditions = cache
        .get_or_compile(
            metric.success_condition.as_deref(),
            metric.failure_condition.as_deref(),
        )
        .map_err(|e| match e {
            super::condition::ConditionError::Empty { condition } if condition.is_empty() => {
                in_metric("set a successCondition, a failureCondition or both".to_string())
            }
            other => in_metric(other.to_string()),
        })?;
    let limits = MetricLimits::of(metric).map_err(|e| e.to_string())?;
    let prometheus = metric
        .provider
        .prometheus
        .as_ref()
        .ok_or_else(|| in_metric("set a provider (prometheus)".to_string()))?;
    let duration = |d: &Option<crate::crd::ManifestDuration>, field: &str| match d {
        None => Ok(Duration::ZERO),
        Some(d) => d
            .to_duration()
            .map_err(|e| in_metric(format!("{field}: {e}"))),
    };
    Ok(PreparedMetric {
        metric,
        prometheus,
        conditions,
        limits,
        interval: duration(&metric.interval, "interval")?,
        initial_delay: duration(&metric.initial_delay, "initialDelay")?,
    })
}

fn plus(at: Timestamp, by: Duration) -> Timestamp {
    SignedDuration::try_from(by)
        .ok()
        .and_then(|by| at.checked_add(by).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Kubernetes times are written with one-second precision. Rounding a measurement's end *up* keeps the
/// next one at least an interval after the real answer, before and after the status round trip.
fn ceil_to_second(at: Timestamp) -> Timestamp {
    if at.subsec_nanosecond() == 0 {
        return at;
    }
    Timestamp::from_second(at.as_second().saturating_add(1)).unwrap_or(at)
}

fn until(now: Timestamp, due: Timestamp) -> Duration {
    Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// How long a metric without an interval waits before it retries a measurement that errored (Argo Rollouts'
/// default). An error is not counted, so the metric needs another measurement; retrying at once would turn a
/// short outage into `consecutiveErrorLimit` errors within a second.
pub const ERROR_RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// When a metric is next due: its initial delay after the run started, then one interval after the last
/// measurement finished (for a metric without an interval whose last measurement errored, the error retry
/// interval).
fn next_due(prepared: &PreparedMetric<'_>, result: &MetricResult, started: Timestamp) -> Timestamp {
    match result.measurements.last() {
        None => plus(started, prepared.initial_delay),
        Some(last) => {
            let finished = last.finished_at.as_ref().unwrap_or(&last.started_at);
            let wait = if last.phase == AnalysisPhase::Error && prepared.interval.is_zero() {
                ERROR_RETRY_INTERVAL
            } else {
                prepared.interval
            };
            plus(finished.0, wait)
        }
    }
}

fn end_run(mut status: AnalysisRunStatus, phase: AnalysisPhase, message: String) -> Advance {
    status.phase = Some(phase);
    status.message = Some(message);
    Advance {
        status,
        requeue_after: None,
        measured: 0,
        events: Vec::new(),
    }
}

/// Ends the run in Error because the policy refused it something, with the same words in status and in an
/// event; `metric` also gets an Error measurement saying so.
fn refuse(
    mut status: AnalysisRunStatus,
    mut results: Vec<MetricResult>,
    metric: Option<usize>,
    now: Timestamp,
    reason: &'static str,
    message: String,
) -> Advance {
    if let Some(result) = metric.and_then(|index| results.get_mut(index)) {
        verdict::record(
            result,
            Measurement {
                phase: AnalysisPhase::Error,
                value: None,
                started_at: Time(now),
                finished_at: Some(Time(ceil_to_second(now))),
                message: Some(message.clone()),
                metadata: BTreeMap::new(),
            },
        );
        result.phase = AnalysisPhase::Error;
        result.message = Some(message.clone());
    }
    status.metric_results = results;
    let mut outcome = end_run(status, AnalysisPhase::Error, message.clone());
    outcome.events.push(RunEvent { reason, message });
    outcome
}

/// Resolves the run's arguments, reading Secrets.
async fn resolve_args(
    run: &AnalysisRun,
    namespace: &str,
    secrets: &dyn SecretStore,
) -> Result<(BTreeMap<String, String>, BTreeSet<String>), String> {
    let mut values = BTreeMap::new();
    let mut secret_args = BTreeSet::new();
    for arg in &run.spec.args {
        let value = match (&arg.value, &arg.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                secret_args.insert(arg.name.clone());
                secrets
                    .read(namespace, &from.secret_key_ref)
                    .await
                    .map_err(|e| format!("argument {:?}: {e}", arg.name))?
            }
            (None, None) => return Err(format!("argument {:?} has no value", arg.name)),
        };
        values.insert(arg.name.clone(), value);
    }
    Ok((values, secret_args))
}

async fn resolve_target(
    prometheus: &PrometheusMetric,
    address: &str,
    namespace: &str,
    secrets: &dyn SecretStore,
) -> Result<PrometheusTarget, String> {
    let read = |r: &SecretKeyRef| {
        let r = r.clone();
        async move { secrets.read(namespace, &r).await.map_err(|e| e.to_string()) }
    };
    let credentials = match &prometheus.authentication {
        None => Credentials::None,
        Some(auth) => match (&auth.bearer_token, &auth.basic_auth) {
            (Some(token), _) => Credentials::Bearer(read(token).await?),
            (None, Some(basic)) => Credentials::Basic {
                username: read(&basic.username).await?,
                password: read(&basic.password).await?,
            },
            (None, None) => Credentials::None,
        },
    };
    let ca_pem = match prometheus.tls.as_ref().and_then(|t| t.ca.as_ref()) {
        Some(ca) => Some(read(ca).await?),
        None => None,
    };
    let timeout = match &prometheus.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => t.to_duration().map_err(|e| format!("timeout: {e}"))?,
    };
    Ok(PrometheusTarget {
        address: address.to_string(),
        timeout,
        credentials,
        headers: prometheus
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        ca_pem,
        insecure_skip_verify: prometheus
            .tls
            .as_ref()
            .is_some_and(|t| t.insecure_skip_verify),
    })
}

/// The query of a metric with its arguments substituted.
fn build_query(
    prepared: &PreparedMetric<'_>,
    values: &BTreeMap<String, String>,
) -> Result<String, String> {
    let in_metric = |reason: String| format!("metric {:?}: {reason}", prepared.metric.name);
    match (&prepared.prometheus.query, &prepared.prometheus.check) {
        (Some(query), None) => {
            args::substitute_promql(query, values).map_err(|e| in_metric(e.to_string()))
        }
        (None, Some(check)) => builtin_query(check, values).map_err(|e| in_metric(e.to_string())),
        _ => Err(in_metric("set exactly one of query or check".to_string())),
    }
}

/// The address a metric queries: its own, or the controller's default.
fn address_of(prepared: &PreparedMetric<'_>, measurer: &Measurer) -> Result<String, String> {
    let own = prepared.prometheus.address.trim();
    if !own.is_empty() {
        return Ok(own.to_string());
    }
    measurer.default_prometheus_address.clone().ok_or_else(|| {
        format!(
            "metric {:?}: provider.prometheus.address is not set and the controller has no default \
             Prometheus address ({DEFAULT_PROMETHEUS_ADDRESS_SETTING})",
            prepared.metric.name
        )
    })
}

/// One measurement: query, judge, and describe it, with every Secret value taken out of what it says.
async fn measure(
    measurer: &Measurer,
    prepared: &PreparedMetric<'_>,
    work: &Work,
    secret_values: &[String],
    now: Timestamp,
) -> Measurement {
    let clock = Instant::now();
    let judged = match measurer
        .provider
        .query_admitted(&work.admitted, &work.target, &work.query)
        .await
    {
        Ok(value) => verdict::judge(&value, &prepared.conditions),
        Err(error) => verdict::judge_provider_error(error.to_string()),
    };
    if let Some(observer) = &measurer.on_measurement {
        observer(judged.phase);
    }
    let mut metadata = BTreeMap::new();
    if work.show_query {
        metadata.insert("query".to_string(), work.query.clone());
    }
    let redact = |text: String| secret_access::redact(&text, secret_values);
    Measurement {
        phase: judged.phase,
        value: judged.value.map(redact),
        started_at: Time(now),
        finished_at: Some(Time(ceil_to_second(plus(now, clock.elapsed())))),
        message: judged.message.map(redact),
        metadata,
    }
}

/// A measurement ready to be taken.
struct Work {
    index: usize,
    admitted: Admitted,
    target: PrometheusTarget,
    query: String,
    show_query: bool,
}

/// A measurement that could not be taken for a passing reason (the address did not resolve in time).
fn provider_error_measurement(error: &ProviderError, now: Timestamp) -> Measurement {
    let judged = verdict::judge_provider_error(error.to_string());
    Measurement {
        phase: judged.phase,
        value: None,
        started_at: Time(now),
        finished_at: Some(Time(ceil_to_second(now))),
        message: judged.message,
        metadata: BTreeMap::new(),
    }
}

/// One pass over a run at time `now`: measures every metric that is due and returns the new status.
///
/// Before anything is read or sent: every due metric's address must pass the outbound policy, and a run
/// naming Secrets must be vouched for by its Rollout ([`secret_access::authorize`]). A refusal ends the run
/// in Error with an event; no Secret is read and no request is made.
pub async fn advance(run: &AnalysisRun, now: Timestamp, measurer: &Measurer) -> Advance {
    let mut status = run.status.clone().unwrap_or_default();
    let unchanged = |status: AnalysisRunStatus| Advance {
        status,
        requeue_after: None,
        measured: 0,
        events: Vec::new(),
    };
    if status.phase.is_some_and(|p| p.is_completed()) {
        return unchanged(status);
    }
    let namespace = run.namespace().unwrap_or_else(|| "default".to_string());

    let mut prepared = Vec::with_capacity(run.spec.metrics.len());
    for metric in &run.spec.metrics {
        match prepare(metric, &measurer.conditions) {
            Ok(p) => prepared.push(p),
            Err(message) => return end_run(status, AnalysisPhase::Error, message),
        }
    }
    if prepared.is_empty() {
        return end_run(
            status,
            AnalysisPhase::Error,
            "the run has no metrics".to_string(),
        );
    }

    let dry_run = dry_run_names(&run.spec);
    let mut results: Vec<MetricResult> = prepared
        .iter()
        .map(|p| {
            let mut result = status
                .metric_results
                .iter()
                .find(|r| r.name == p.metric.name)
                .cloned()
                .unwrap_or_else(|| MetricResult {
                    name: p.metric.name.clone(),
                    ..Default::default()
                });
            result.dry_run = dry_run.contains(p.metric.name.as_str());
            result
        })
        .collect();

    if run.spec.terminate {
        let (phase, message) = verdict::run_phase(&results, true);
        status.metric_results = results;
        let message = match message {
            Some(m) => format!("terminated: {m}"),
            None => "terminated".to_string(),
        };
        return end_run(status, phase, message);
    }

    let started = status.started_at.get_or_insert(Time(now)).0;
    let due: Vec<usize> = prepared
        .iter()
        .zip(&results)
        .enumerate()
        .filter(|(_, (p, r))| !r.phase.is_completed() && next_due(p, r, started) <= now)
        .map(|(i, _)| i)
        .collect();

    let mut measured = 0;
    if !due.is_empty() {
        // Safety rule 13, first half: where the run would send anything, before any Secret is read.
        let mut admitted: Vec<(usize, String, Admitted)> = Vec::with_capacity(due.len());
        for &index in &due {
            let p = &prepared[index];
            let address = match address_of(p, measurer) {
                Ok(address) => address,
                Err(message) => return end_run(status, AnalysisPhase::Error, message),
            };
            match measurer.provider.admit(&address).await {
                Ok(allowed) => admitted.push((index, address, allowed)),
                Err(error @ ProviderError::Refused(_)) => {
                    let message = format!("metric {:?}: {error}", p.metric.name);
                    return refuse(
                        status,
                        results,
                        Some(index),
                        now,
                        DESTINATION_REFUSED,
                        message,
                    );
                }
                // The name did not resolve (in time): like an unreachable server, an error to retry.
                Err(error) => {
                    if let Some(observer) = &measurer.on_measurement {
                        observer(AnalysisPhase::Error);
                    }
                    verdict::record(&mut results[index], provider_error_measurement(&error, now));
                    measured += 1;
                }
            }
        }
        // Safety rule 13, second half: whose Secrets, and only for runs their Rollout vouches for.
        if !secret_access::secret_refs(&run.spec).is_empty() && !admitted.is_empty() {
            let owner = match secret_access::controlling_rollout(run) {
                None => None,
                Some(reference) => {
                    match measurer
                        .secrets
                        .run_owner(&namespace, &reference.name)
                        .await
                    {
                        Ok(owner) => owner,
                        Err(error) => {
                            return end_run(status, AnalysisPhase::Error, error.to_string())
                        }
                    }
                }
            };
            if let Err(refused) = secret_access::authorize(run, owner.as_ref()) {
                return refuse(
                    status,
                    results,
                    None,
                    now,
                    SECRET_ACCESS_REFUSED,
                    refused.to_string(),
                );
            }
        }

        let mut work: Vec<Work> = Vec::with_capacity(admitted.len());
        let mut secret_values: Vec<String> = Vec::new();
        if !admitted.is_empty() {
            let (values, secret_args) =
                match resolve_args(run, &namespace, measurer.secrets.as_ref()).await {
                    Ok(resolved) => resolved,
                    Err(message) => return end_run(status, AnalysisPhase::Error, message),
                };
            secret_values.extend(
                secret_args
                    .iter()
                    .filter_map(|name| values.get(name))
                    .cloned(),
            );
            for (index, address, allowed) in admitted {
                let p = &prepared[index];
                let query = match build_query(p, &values) {
                    Ok(query) => query,
                    Err(message) => {
                        let message = secret_access::redact(&message, &secret_values);
                        return end_run(status, AnalysisPhase::Error, message);
                    }
                };
                let target = match resolve_target(
                    p.prometheus,
                    &address,
                    &namespace,
                    measurer.secrets.as_ref(),
                )
                .await
                {
                    Ok(target) => target,
                    Err(reason) => {
                        let message = format!("metric {:?}: {reason}", p.metric.name);
                        return end_run(status, AnalysisPhase::Error, message);
                    }
                };
                secret_values.extend(target.credentials.values());
                // A query carrying a Secret's value is not written into status, where anyone may read it.
                let uses_secret = match (&p.prometheus.query, &p.prometheus.check) {
                    (Some(q), _) => args::referenced_names(q)
                        .map(|names| names.iter().any(|n| secret_args.contains(n)))
                        .unwrap_or(true),
                    _ => !secret_args.is_empty(),
                };
                work.push(Work {
                    index,
                    admitted: allowed,
                    target,
                    query,
                    show_query: !uses_secret,
                });
            }
        }
        let measurements = futures::future::join_all(
            work.iter()
                .map(|w| measure(measurer, &prepared[w.index], w, &secret_values, now)),
        )
        .await;
        for (w, measurement) in work.iter().zip(measurements) {
            verdict::record(&mut results[w.index], measurement);
            measured += 1;
        }
    }

    for (p, result) in prepared.iter().zip(results.iter_mut()) {
        let (phase, message) = verdict::metric_phase(result, &p.limits);
        result.phase = phase;
        result.message = message;
    }
    let (phase, message) = verdict::run_phase(&results, false);
    status.phase = Some(phase);
    status.message = message;
    let requeue_after = if phase.is_completed() {
        None
    } else {
        prepared
            .iter()
            .zip(&results)
            .filter(|(_, r)| !r.phase.is_completed())
            .map(|(p, r)| until(now, next_due(p, r, started)))
            .min()
    };
    status.metric_results = results;
    Advance {
        status,
        requeue_after,
        measured,
        events: Vec::new(),
    }
}

/// Settings of the runner.
#[derive(Clone, Debug, Default)]
pub struct RunnerConfig {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Whom the runner may call and how much it reads; the default allows no destination.
    pub outbound: OutboundConfig,
    /// The Prometheus a metric without `address` queries (also allowed by the outbound policy).
    pub default_prometheus_address: Option<String>,
}

impl RunnerConfig {
    /// Settings for one namespace (or all, with `None`) allowing these outbound destinations.
    pub fn allowing(namespace: Option<String>, outbound: OutboundConfig) -> Self {
        RunnerConfig {
            namespace,
            outbound,
            default_prometheus_address: None,
        }
    }
}

/// The measurer of a runner in a cluster: its outbound settings, Secrets from the API server.
pub fn cluster_measurer(client: Client, config: &RunnerConfig) -> Measurer {
    Measurer::new(
        PrometheusProvider::with_outbound(config.outbound.clone()),
        Arc::new(KubeSecrets::new(client)),
    )
    .with_default_prometheus_address(config.default_prometheus_address.clone())
}

struct Context {
    client: Client,
    measurer: Measurer,
    recorder: Publisher,
}

/// Looks again soon after a failed status write; the watch usually brings the newer object first.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// The floor of a requeue, so that a metric due "now" after a slow query does not spin.
const MIN_REQUEUE: Duration = Duration::from_millis(50);

async fn reconcile(run: Arc<AnalysisRun>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    let outcome = advance(&run, Timestamp::now(), &context.measurer).await;
    if run.status.as_ref() != Some(&outcome.status) {
        let name = run.name_any();
        let api: Api<AnalysisRun> = Api::namespaced(
            context.client.clone(),
            &run.namespace().unwrap_or_else(|| "default".into()),
        );
        let mut updated = (*run).clone();
        updated.status = Some(outcome.status.clone());
        match api
            .replace_status(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                for event in &outcome.events {
                    publish(&context.recorder, &run, event).await;
                }
                if let Some(phase) = outcome.status.phase.filter(|p| p.is_completed()) {
                    tracing::info!(
                        run = %name,
                        phase = phase.as_str(),
                        message = outcome.status.message.as_deref().unwrap_or(""),
                        "analysis run completed"
                    );
                }
            }
            // Someone wrote first (a terminate, or our own earlier write not yet seen): that version comes
            // back through the watch, and this pass's measurements are taken again from it.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                return Ok(Action::requeue(MIN_REQUEUE))
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Ok(Action::await_change())
            }
            Err(source) => return Err(ReconcileError::WriteStatus { name, source }),
        }
    }
    Ok(match outcome.requeue_after {
        Some(after) => Action::requeue(after.max(MIN_REQUEUE)),
        None => Action::await_change(),
    })
}

async fn publish(recorder: &Publisher, run: &AnalysisRun, event: &RunEvent) {
    let recorded = Note {
        severity: Severity::Warning,
        reason: event.reason,
        message: &event.message,
    };
    if let Err(error) = recorder.publish(&recorded, &run.object_ref(&())).await {
        tracing::warn!(%error, reason = event.reason, "recording an event failed");
    }
}

fn error_policy(_run: Arc<AnalysisRun>, error: &ReconcileError, _context: Arc<Context>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "analysis run reconcile failed");
    Action::requeue(RETRY_AFTER_ERROR)
}

/// Runs the AnalysisRun controller until `shutdown` completes. The API server's in-cluster addresses are
/// added to the measurer's outbound policy as protected.
pub async fn run_until(
    client: Client,
    config: RunnerConfig,
    measurer: Measurer,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunnerError> {
    let api: Api<AnalysisRun> = match &config.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(RunnerError::ListRuns)?;
    let measurer = measurer.with_api_server(outbound::api_server_addresses().await);
    let opened = measurer.provider.outbound().policy.protected_entries();
    if !opened.is_empty() {
        tracing::warn!(
            entries = ?opened,
            "allowed destinations open loopback, link-local or API server addresses to analysis"
        );
    }
    let recorder = Publisher::new(client.clone(), crate::crd::FIELD_MANAGER, None);
    let context = Arc::new(Context {
        client,
        measurer,
        recorder,
    });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(error = %error, "analysis controller event");
            }
        })
        .await;
    Ok(())
}

/// Runs the AnalysisRun controller with Secrets from the API server, until the process ends.
pub async fn run(client: Client, config: RunnerConfig) -> Result<(), RunnerError> {
    let measurer = cluster_measurer(client.clone(), &config);
    run_until(client, config, measurer, std::future::pending()).await
}

/// A runner started in the background, next to a controller or in a test.
pub struct RunnerHandle {
    provider: PrometheusProvider,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunnerError>>,
}

impl RunnerHandle {
    /// Queries sent to Prometheus so far.
    pub fn queries_sent(&self) -> u64 {
        self.provider.queries_sent()
    }

    /// Stops the runner and waits for in-flight reconciles to finish.
    pub async fn shutdown(mut self) -> Result<(), RunnerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.await {
            Ok(outcome) => outcome,
            // Only a panic inside the task gets here (nothing aborts it); surface it rather than hide it.
            Err(join_error) => match join_error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Ok(()),
            },
        }
    }
}

/// Starts the runner in the background with Secrets from the API server.
pub fn spawn(client: Client, config: RunnerConfig) -> RunnerHandle {
    let measurer = cluster_measurer(client.clone(), &config);
    spawn_with(client, config, measurer)
}

/// Starts the runner in the background with a given measurer (provider and Secret store).
pub fn spawn_with(client: Client, config: RunnerConfig, measurer: Measurer) -> RunnerHandle {
    let (stop, stopped) = oneshot::channel::<()>();
    let provider = measurer.provider.clone();
    let task = tokio::spawn(run_until(client, config, measurer, async move {
        let _ = stopped.await;
    }));
    RunnerHandle {
        provider,
        stop: Some(stop),
        task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::analysis::{AnalysisRunSpec, MetricProvider};
    use crate::crd::ManifestDuration;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    /// Nothing listens on port 1: any query made would be an Error measurement, which the tests rule out.
    fn run_with(metric: Metric) -> AnalysisRun {
        let mut run = AnalysisRun::new(
            "r",
            AnalysisRunSpec {
                metrics: vec![metric],
                ..Default::default()
            },
        );
        run.metadata.namespace = Some("shop".into());
        run
    }

    fn metric(interval: u64, initial_delay: Option<u64>) -> Metric {
        Metric {
            name: "m".into(),
            interval: Some(ManifestDuration::from_secs(interval)),
            initial_delay: initial_delay.map(ManifestDuration::from_secs),
            count: Some(IntOrString::Int(3)),
            success_condition: Some("result < 1.0".into()),
            provider: MetricProvider {
                prometheus: Some(PrometheusMetric {
                    address: "http://127.0.0.1:1".into(),
                    query: Some("vector(0)".into()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }
    }

    fn measurer() -> Measurer {
        let outbound = OutboundConfig::allowing(["127.0.0.1"]).unwrap_or_default();
        Measurer::new(
            PrometheusProvider::with_outbound(outbound),
            Arc::new(StaticSecrets::default()),
        )
    }

    /// Counts every Secret read and owner lookup.
    #[derive(Default)]
    struct CountingSecrets {
        inner: StaticSecrets,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl SecretStore for CountingSecrets {
        fn read<'a>(
            &'a self,
            namespace: &'a str,
            secret: &'a SecretKeyRef,
        ) -> BoxFuture<'a, Result<String, SecretError>> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.read(namespace, secret)
        }

        fn run_owner<'a>(
            &'a self,
            namespace: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<RunOwner>, SecretError>> {
            self.inner.run_owner(namespace, name)
        }
    }

    fn bearer(mut metric: Metric) -> Metric {
        if let Some(p) = metric.provider.prometheus.as_mut() {
            p.authentication = Some(crate::crd::analysis::PrometheusAuthentication {
                bearer_token: Some(SecretKeyRef {
                    name: "prom".into(),
                    key: "token".into(),
                }),
                basic_auth: None,
            });
        }
        metric
    }

    #[tokio::test]
    async fn a_refused_destination_ends_the_run_before_any_secret_is_read() {
        let secrets = Arc::new(CountingSecrets {
            inner: StaticSecrets::default().with("shop", "prom", "token", "t0ken"),
            ..Default::default()
        });
        let provider = PrometheusProvider::new();
        let deny_all = Measurer::new(provider.clone(), secrets.clone());
        let mut metric = bearer(metric(10, None));
        if let Some(p) = metric.provider.prometheus.as_mut() {
            p.address = "http://169.254.169.254/latest".into();
        }
        let outcome = advance(&run_with(metric), at(0), &deny_all).await;
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Error));
        let message = outcome.status.message.clone().unwrap_or_default();
        assert!(
            message
                .starts_with(r#"metric "m": address "http://169.254.169.254/latest" is refused"#),
            "{message}"
        );
        assert!(
            message.contains("link-local") && message.contains("--allowed-destinations"),
            "{message}"
        );
        let result = &outcome.status.metric_results[0];
        assert_eq!(
            (result.count, result.error, result.phase),
            (1, 1, AnalysisPhase::Error)
        );
        assert_eq!(
            result.measurements[0].message.as_deref(),
            Some(message.as_str())
        );
        assert_eq!(
            outcome.events,
            vec![RunEvent {
                reason: DESTINATION_REFUSED,
                message: message.clone()
            }]
        );
        assert_eq!(outcome.requeue_after, None);
        assert_eq!(secrets.reads.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(provider.queries_sent(), 0);
    }

    #[tokio::test]
    async fn a_run_no_rollout_controls_reads_no_secret() {
        let secrets = Arc::new(CountingSecrets {
            inner: StaticSecrets::default().with("shop", "prom", "token", "t0ken"),
            ..Default::default()
        });
        let measurer = Measurer::new(measurer().provider, secrets.clone());
        let outcome = advance(&run_with(bearer(metric(10, None))), at(0), &measurer).await;
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Error));
        let message = outcome.status.message.clone().unwrap_or_default();
        assert!(message.contains("no Rollout controls it"), "{message}");
        assert_eq!(outcome.events.len(), 1);
        assert_eq!(outcome.events[0].reason, SECRET_ACCESS_REFUSED);
        assert_eq!(outcome.measured, 0);
        assert_eq!(secrets.reads.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(measurer.provider.queries_sent(), 0);
    }

    #[tokio::test]
    async fn a_metric_without_address_uses_the_default_or_says_how_to_set_one() {
        let mut no_address = metric(10, None);
        if let Some(p) = no_address.provider.prometheus.as_mut() {
            p.address = String::new();
        }
        let run = run_with(no_address);
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Error));
        let message = outcome.status.message.unwrap_or_default();
        assert!(
            message.contains("address is not set")
                && message.contains("--default-prometheus-address"),
            "{message}"
        );
        // With a default the policy did not list, the default is still allowed: the operator chose it.
        let with_default = Measurer::new(
            PrometheusProvider::new(),
            Arc::new(StaticSecrets::default()),
        )
        .with_default_prometheus_address(Some("http://127.0.0.1:1".into()));
        let outcome = advance(&run, at(0), &with_default).await;
        assert_eq!(outcome.measured, 1);
        let result = &outcome.status.metric_results[0];
        let message = result.measurements[0].message.clone().unwrap_or_default();
        assert!(message.contains("127.0.0.1:1 is unreachable"), "{message}");
        assert_eq!(with_default.provider.queries_sent(), 1);
    }

    #[tokio::test]
    async fn a_secret_value_never_reaches_status_through_an_error_message() {
        let rollout: crate::crd::Rollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}},
                "strategy": {"canary": {"analysis": {"templates": [{"templateName": "t"}]}}}
            }
        }))
        .expect("a valid Rollout");
        let mut bare = metric(10, None);
        if let Some(p) = bare.provider.prometheus.as_mut() {
            p.query = Some("vector({{args.n}})".into());
        }
        let secret_arg = crate::crd::analysis::TemplateArgument {
            name: "n".into(),
            value: None,
            value_from: Some(crate::crd::analysis::TemplateArgumentValueFrom {
                secret_key_ref: SecretKeyRef {
                    name: "prom".into(),
                    key: "n".into(),
                },
            }),
        };
        let template = crate::crd::analysis::AnalysisTemplateSpec {
            args: vec![secret_arg.clone()],
            metrics: vec![bare.clone()],
            dry_run: vec![],
        };
        let secrets = StaticSecrets::default()
            .with("shop", "prom", "n", "not a token s3cret")
            .with_owner(RunOwner {
                rollout: rollout.clone(),
                templates: vec![template],
            });
        let measurer = Measurer::new(measurer().provider, Arc::new(secrets));
        let mut run = run_with(bare);
        run.spec.args = vec![secret_arg];
        run.metadata.owner_references =
            crate::controller::act::owner_reference(&rollout).map(|o| vec![o]);
        let outcome = advance(&run, at(0), &measurer).await;
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Error));
        let message = outcome.status.message.clone().unwrap_or_default();
        assert!(
            message.contains("single token") && message.contains(secret_access::REDACTED),
            "{message}"
        );
        let written = serde_json::to_string(&outcome.status).unwrap_or_default();
        assert!(!written.contains("s3cret"), "{written}");

        // Inside a string the value is escaped into the query, which travels in the request URL: a
        // connection error must not carry the URL (and the value, encoded) into status.
        let mut quoted = run.clone();
        if let Some(p) = quoted.spec.metrics[0].provider.prometheus.as_mut() {
            p.query = Some(r#"up{job="{{args.n}}"}"#.into());
        }
        let template = crate::crd::analysis::AnalysisTemplateSpec {
            args: quoted.spec.args.clone(),
            metrics: quoted.spec.metrics.clone(),
            dry_run: vec![],
        };
        let secrets = StaticSecrets::default()
            .with("shop", "prom", "n", "not a token s3cret")
            .with_owner(RunOwner {
                rollout,
                templates: vec![template],
            });
        let measurer = Measurer::new(measurer.provider.clone(), Arc::new(secrets));
        let outcome = advance(&quoted, at(0), &measurer).await;
        assert_eq!(outcome.measured, 1);
        let message = outcome.status.metric_results[0].measurements[0]
            .message
            .clone()
            .unwrap_or_default();
        assert!(message.contains("is unreachable"), "{message}");
        let written = serde_json::to_string(&outcome.status).unwrap_or_default();
        assert!(!written.contains("s3cret"), "{written}");
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[tokio::test]
    async fn waits_for_the_initial_delay_before_the_first_measurement() {
        let run = run_with(metric(10, Some(60)));
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.measured, 0);
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Running));
        assert_eq!(outcome.status.started_at, Some(Time(at(0))));
        assert_eq!(outcome.requeue_after, Some(Duration::from_secs(60)));
        assert_eq!(measurements_taken(&outcome), 0);
    }

    fn measurements_taken(outcome: &Advance) -> i32 {
        outcome.status.metric_results.iter().map(|r| r.count).sum()
    }

    #[tokio::test]
    async fn next_measurement_is_due_one_interval_after_the_last_recorded_one() {
        // As after a restart: status says the last measurement finished 4s ago, the interval is 10s.
        let mut run = run_with(metric(10, None));
        let mut result = MetricResult {
            name: "m".into(),
            phase: AnalysisPhase::Running,
            ..Default::default()
        };
        verdict::record(
            &mut result,
            Measurement {
                phase: AnalysisPhase::Successful,
                value: Some("0".into()),
                started_at: Time(at(-5)),
                finished_at: Some(Time(at(-4))),
                message: None,
                metadata: BTreeMap::new(),
            },
        );
        run.status = Some(AnalysisRunStatus {
            phase: Some(AnalysisPhase::Running),
            started_at: Some(Time(at(-5))),
            metric_results: vec![result],
            ..Default::default()
        });
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.measured, 0);
        assert_eq!(outcome.requeue_after, Some(Duration::from_secs(6)));
        assert_eq!(
            Some(&outcome.status),
            run.status.as_ref(),
            "nothing to write"
        );
    }

    #[tokio::test]
    async fn terminated_and_completed_runs_are_not_measured() {
        let mut run = run_with(metric(10, None));
        run.spec.terminate = true;
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.measured, 0);
        // Terminated before anything was measured: no verdict, and certainly not a success.
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Inconclusive));
        assert_eq!(
            outcome.status.message.as_deref(),
            Some(
                r#"terminated: metric "m": terminated without a successful measurement (0 measurements: 0 failed, 0 inconclusive, 0 errors)"#
            )
        );
        assert_eq!(outcome.requeue_after, None);

        run.spec.terminate = false;
        run.status = Some(AnalysisRunStatus {
            phase: Some(AnalysisPhase::Failed),
            message: Some("earlier verdict".into()),
            ..Default::default()
        });
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.measured, 0);
        assert_eq!(Some(&outcome.status), run.status.as_ref());
    }

    #[tokio::test]
    async fn an_error_is_not_a_measurement_and_is_retried_after_the_error_interval() {
        // Measured once (no interval, no count), on a port where nothing listens.
        let mut once = metric(10, None);
        once.interval = None;
        once.count = None;
        let run = run_with(once);
        let outcome = advance(&run, at(0), &measurer()).await;
        assert_eq!(outcome.measured, 1);
        let result = &outcome.status.metric_results[0];
        assert_eq!((result.count, result.error), (1, 1));
        assert_eq!(result.phase, AnalysisPhase::Running, "{result:?}");
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Running));
        let retry = outcome.requeue_after.unwrap_or_default();
        assert!(
            // The measurement's end is rounded up to the next second.
            retry >= ERROR_RETRY_INTERVAL && retry <= ERROR_RETRY_INTERVAL + Duration::from_secs(1),
            "{retry:?}"
        );
        let mut run = run;
        run.status = Some(outcome.status);
        assert_eq!(advance(&run, at(5), &measurer()).await.measured, 0);
        let again = advance(&run, at(11), &measurer()).await;
        assert_eq!(again.measured, 1);
        assert_eq!(again.status.metric_results[0].consecutive_error, 2);
    }

    #[tokio::test]
    async fn a_broken_spec_ends_the_run_before_measuring() {
        let mut broken = metric(10, None);
        broken.failure_condition = Some("result >".into());
        let outcome = advance(&run_with(broken), at(0), &measurer()).await;
        assert_eq!(outcome.status.phase, Some(AnalysisPhase::Error));
        assert_eq!(outcome.measured, 0);
        let message = outcome.status.message.unwrap_or_default();
        assert!(
            message.starts_with(r#"metric "m": condition "result >" does not parse: "#),
            "{message}"
        );
    }

    #[tokio::test]
    async fn measurement_end_is_rounded_up_so_the_round_trip_never_brings_the_next_one_early() {
        let run = run_with(metric(10, None));
        let start = at(0)
            .checked_add(SignedDuration::from_millis(300))
            .unwrap_or(at(0));
        // Nothing listens on port 1: the measurement is a quick Error, which is all this test needs.
        let outcome = advance(&run, start, &measurer()).await;
        assert_eq!(outcome.measured, 1);
        let finished = outcome.status.metric_results[0].measurements[0]
            .finished_at
            .clone()
            .map(|t| t.0);
        assert!(
            finished.is_some_and(|f| f.subsec_nanosecond() == 0 && f > start),
            "{finished:?}"
        );
        // Through JSON, as the API server stores it.
        let stored: AnalysisRunStatus =
            serde_json::from_value(serde_json::to_value(&outcome.status).unwrap_or_default())
                .unwrap_or_default();
        let mut run = run;
        run.status = Some(stored);
        let almost = start
            .checked_add(SignedDuration::from_millis(10_500))
            .unwrap_or(start);
        let outcome = advance(&run, almost, &measurer()).await;
        assert_eq!(
            outcome.measured, 0,
            "10.5s after a measurement started at .3 it may have ended at .9"
        );
        let after = at(11);
        assert_eq!(advance(&run, after, &measurer()).await.measured, 1);
    }
}
