//! Decides what an AnalysisRun measures (pure): merges the metrics of the referenced templates and resolves
//! the Rollout's arguments (literal values, fields of the Rollout, pod-template hashes). Secret references
//! stay references: the runner reads them when it measures, so secret values never land in a run.

use std::collections::{BTreeMap, BTreeSet};

use super::args;
use super::builtin::builtin_query;
use super::condition::Conditions;
use super::verdict::{MetricLimits, VerdictError};
use crate::crd::analysis::{
    AnalysisRunSpec, AnalysisTemplateSpec, DryRunMetric, Metric, TemplateArgument,
    TemplateArgumentValueFrom,
};
use crate::crd::rollout::{
    AnalysisArgument, AnalysisTemplateRef, BackgroundAnalysis, PodTemplateHashValue,
    RolloutAnalysis,
};
use crate::crd::{ManifestDuration, Rollout};

/// A reference to an analysis template: name and whether it is cluster-scoped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateKey {
    pub name: String,
    pub cluster_scope: bool,
}

/// Why no AnalysisRun can be built from the spec: each is an invalid spec.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RunSpecError {
    #[error("analysis template {0:?} does not exist")]
    UnknownTemplate(String),
    #[error("analysis template {name:?} cannot be used: {reason}")]
    UnusableTemplate { name: String, reason: String },
    #[error("analysis names no template")]
    NoTemplates,
    #[error("metric {metric:?} is defined by more than one template ({first:?} and {second:?})")]
    DuplicateMetric {
        metric: String,
        first: String,
        second: String,
    },
    #[error("argument {0:?} has no value: give it in the Rollout's analysis args or as a default in the template")]
    MissingArgument(String),
    #[error(
        "argument {name:?} has two different default values in templates {first:?} and {second:?}"
    )]
    ConflictingArgument {
        name: String,
        first: String,
        second: String,
    },
    #[error("argument {name:?}: field {path:?} {reason}")]
    FieldRef {
        name: String,
        path: String,
        reason: String,
    },
    #[error("argument {name:?} asks for the {which} pod-template hash, which is not known yet")]
    UnknownPodTemplateHash { name: String, which: &'static str },
    #[error(
        "argument {0:?} sets valueFrom without secretKeyRef, fieldRef or podTemplateHashValue"
    )]
    EmptyValueFrom(String),
    #[error("metric {metric:?}: {source}")]
    Query {
        metric: String,
        source: args::ArgsError,
    },
    #[error("metric {metric:?}: query refers to argument {arg:?}, which no template declares")]
    UndeclaredArgument { metric: String, arg: String },
    #[error("metric {metric:?}: {reason}")]
    InvalidMetric { metric: String, reason: String },
    #[error("dry-run metric {0:?} is not a metric of the analysis")]
    UnknownDryRunMetric(String),
}

impl RunSpecError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            RunSpecError::UnknownTemplate(_) => "unknown_template",
            RunSpecError::UnusableTemplate { .. } => "unusable_template",
            RunSpecError::NoTemplates => "no_templates",
            RunSpecError::DuplicateMetric { .. } => "duplicate_metric",
            RunSpecError::MissingArgument(_) => "missing_argument",
            RunSpecError::ConflictingArgument { .. } => "conflicting_argument",
            RunSpecError::FieldRef { .. } => "field_ref",
            RunSpecError::UnknownPodTemplateHash { .. } => "unknown_pod_template_hash",
            RunSpecError::EmptyValueFrom(_) => "empty_value_from",
            RunSpecError::Query { .. } => "query",
            RunSpecError::UndeclaredArgument { .. } => "undeclared_argument",
            RunSpecError::InvalidMetric { .. } => "invalid_metric",
            RunSpecError::UnknownDryRunMetric(_) => "unknown_dry_run_metric",
        }
    }
}

impl RunSpecError {
    /// Where in `analysis` the error lies, as a field path relative to the analysis (`templates[1]`,
    /// `args[0].valueFrom.fieldRef.fieldPath`, `args`), for the caller to put after the analysis' own path.
    /// `templates` must be where the error was found.
    pub fn path_in<T: TemplateSource + ?Sized>(
        &self,
        analysis: AnalysisRequest<'_>,
        templates: &T,
    ) -> String {
        let key = |reference: &AnalysisTemplateRef| TemplateKey {
            name: reference.template_name.clone(),
            cluster_scope: reference.cluster_scope,
        };
        let arg = |name: &str, suffix: &str| match analysis.args.iter().position(|a| a.name == name)
        {
            Some(index) => format!("args[{index}]{suffix}"),
            None => "args".to_string(),
        };
        let defining = |defines: &dyn Fn(&AnalysisTemplateSpec) -> bool| {
            analysis
                .templates
                .iter()
                .enumerate()
                .filter(|(_, reference)| {
                    matches!(templates.find(&key(reference)), Some(Ok(t)) if defines(t))
                })
                .map(|(index, _)| index)
                .collect::<Vec<_>>()
        };
        let template = |index: Option<usize>| match index {
            Some(index) => format!("templates[{index}]"),
            None => "templates".to_string(),
        };
        let has_metric = |metric: &str| {
            let metric = metric.to_string();
            move |t: &AnalysisTemplateSpec| t.metrics.iter().any(|m| m.name == metric)
        };
        match self {
            RunSpecError::UnknownTemplate(name) | RunSpecError::UnusableTemplate { name, .. } => {
                template(
                    analysis
                        .templates
                        .iter()
                        .position(|r| display_name(&key(r)) == *name),
                )
            }
            RunSpecError::NoTemplates | RunSpecError::ConflictingArgument { .. } => {
                "templates".to_string()
            }
            // The second template to define the metric is the one that clashes.
            RunSpecError::DuplicateMetric { metric, .. } => {
                template(defining(&has_metric(metric)).get(1).copied())
            }
            RunSpecError::MissingArgument(name) => arg(name, ""),
            RunSpecError::FieldRef { name, .. } => arg(name, ".valueFrom.fieldRef.fieldPath"),
            RunSpecError::UnknownPodTemplateHash { name, .. } => {
                arg(name, ".valueFrom.podTemplateHashValue")
            }
            RunSpecError::EmptyValueFrom(name) => arg(name, ".valueFrom"),
            RunSpecError::Query { metric, .. }
            | RunSpecError::UndeclaredArgument { metric, .. }
            | RunSpecError::InvalidMetric { metric, .. } => {
                template(defining(&has_metric(metric)).first().copied())
            }
            RunSpecError::UnknownDryRunMetric(metric) => template(
                defining(&|t: &AnalysisTemplateSpec| {
                    t.dry_run.iter().any(|d| d.metric_name == *metric)
                })
                .first()
                .copied(),
            ),
        }
    }
}

/// The templates and arguments of one analysis, whichever kind of analysis it is.
#[derive(Clone, Copy, Debug)]
pub struct AnalysisRequest<'a> {
    pub templates: &'a [AnalysisTemplateRef],
    pub args: &'a [AnalysisArgument],
}

impl<'a> From<&'a RolloutAnalysis> for AnalysisRequest<'a> {
    fn from(analysis: &'a RolloutAnalysis) -> Self {
        AnalysisRequest {
            templates: &analysis.templates,
            args: &analysis.args,
        }
    }
}

impl<'a> From<&'a BackgroundAnalysis> for AnalysisRequest<'a> {
    fn from(analysis: &'a BackgroundAnalysis) -> Self {
        AnalysisRequest {
            templates: &analysis.templates,
            args: &analysis.args,
        }
    }
}

/// Where templates are looked up: a list of found templates, or the planner's `Observed.analysis_templates`
/// map (which also says why a template cannot be used).
pub trait TemplateSource {
    /// `None`: no such template. `Some(Err(reason))`: it exists but cannot be used.
    fn find(&self, key: &TemplateKey) -> Option<Result<&AnalysisTemplateSpec, &str>>;
}

impl TemplateSource for [(TemplateKey, AnalysisTemplateSpec)] {
    fn find(&self, key: &TemplateKey) -> Option<Result<&AnalysisTemplateSpec, &str>> {
        self.iter()
            .find(|(k, _)| k == key)
            .map(|(_, spec)| Ok(spec))
    }
}

impl TemplateSource for Vec<(TemplateKey, AnalysisTemplateSpec)> {
    fn find(&self, key: &TemplateKey) -> Option<Result<&AnalysisTemplateSpec, &str>> {
        self.as_slice().find(key)
    }
}

impl TemplateSource for BTreeMap<TemplateKey, Result<AnalysisTemplateSpec, String>> {
    fn find(&self, key: &TemplateKey) -> Option<Result<&AnalysisTemplateSpec, &str>> {
        self.get(key)
            .map(|found| found.as_ref().map_err(String::as_str))
    }
}

fn display_name(key: &TemplateKey) -> String {
    if key.cluster_scope {
        format!("ClusterAnalysisTemplate/{}", key.name)
    } else {
        key.name.clone()
    }
}

/// Builds the spec of an AnalysisRun for a Rollout's analysis.
pub fn build_run_spec<'a, T: TemplateSource + ?Sized>(
    analysis: impl Into<AnalysisRequest<'a>>,
    templates: &T,
    rollout: &Rollout,
    stable_hash: &str,
    canary_hash: &str,
) -> Result<AnalysisRunSpec, RunSpecError> {
    let analysis = analysis.into();
    if analysis.templates.is_empty() {
        return Err(RunSpecError::NoTemplates);
    }
    let mut metrics: Vec<Metric> = Vec::new();
    let mut metric_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut dry_run: Vec<DryRunMetric> = Vec::new();
    // Declared arguments, with the template that declared each and its default.
    let mut declared: BTreeMap<String, (String, TemplateArgument)> = BTreeMap::new();

    for reference in analysis.templates {
        let key = TemplateKey {
            name: reference.template_name.clone(),
            cluster_scope: reference.cluster_scope,
        };
        let name = display_name(&key);
        let template = match templates.find(&key) {
            None => return Err(RunSpecError::UnknownTemplate(name)),
            Some(Err(reason)) => {
                return Err(RunSpecError::UnusableTemplate {
                    name,
                    reason: reason.to_string(),
                })
            }
            Some(Ok(template)) => template,
        };
        for metric in &template.metrics {
            if let Some(first) = metric_origin.insert(metric.name.clone(), name.clone()) {
                return Err(RunSpecError::DuplicateMetric {
                    metric: metric.name.clone(),
                    first,
                    second: name,
                });
            }
            metrics.push(metric.clone());
        }
        for entry in &template.dry_run {
            if !dry_run.contains(entry) {
                dry_run.push(entry.clone());
            }
        }
        for arg in &template.args {
            match declared.get(&arg.name) {
                Some((first, existing))
                    if (existing.value.is_some() || existing.value_from.is_some())
                        && (arg.value.is_some() || arg.value_from.is_some())
                        && (existing.value != arg.value
                            || existing.value_from != arg.value_from) =>
                {
                    return Err(RunSpecError::ConflictingArgument {
                        name: arg.name.clone(),
                        first: first.clone(),
                        second: name.clone(),
                    });
                }
                Some((_, existing))
                    if existing.value.is_some() || existing.value_from.is_some() => {}
                _ => {
                    declared.insert(arg.name.clone(), (name.clone(), arg.clone()));
                }
            }
        }
    }

    for entry in &dry_run {
        if !metric_origin.contains_key(&entry.metric_name) {
            return Err(RunSpecError::UnknownDryRunMetric(entry.metric_name.clone()));
        }
    }

    let mut resolved: Vec<TemplateArgument> = Vec::with_capacity(declared.len());
    for (name, (_, default)) in &declared {
        let given = analysis.args.iter().find(|a| &a.name == name);
        let argument = match given {
            Some(given) => resolve_given(given, rollout, stable_hash, canary_hash)?,
            None if default.value.is_some() || default.value_from.is_some() => default.clone(),
            None => return Err(RunSpecError::MissingArgument(name.clone())),
        };
        resolved.push(argument);
    }

    for metric in &metrics {
        validate_metric(metric, &declared)?;
    }

    Ok(AnalysisRunSpec {
        args: resolved,
        metrics,
        dry_run,
        terminate: false,
    })
}

/// Checks what can be checked before measuring, so that a broken template is an invalid spec rather than a
/// run that fails later: conditions parse, counts are numbers, queries only use declared arguments.
fn validate_metric(
    metric: &Metric,
    declared: &BTreeMap<String, (String, TemplateArgument)>,
) -> Result<(), RunSpecError> {
    let invalid = |reason: String| RunSpecError::InvalidMetric {
        metric: metric.name.clone(),
        reason,
    };
    Conditions::compile(
        metric.success_condition.as_deref(),
        metric.failure_condition.as_deref(),
    )
    .map_err(|error| match error {
        super::condition::ConditionError::Empty { condition } if condition.is_empty() => {
            invalid("set a successCondition, a failureCondition or both".to_string())
        }
        other => invalid(other.to_string()),
    })?;
    MetricLimits::of(metric).map_err(|error| match error {
        VerdictError::InvalidCount { count, .. } => {
            invalid(format!("count {count:?} is not a positive whole number"))
        }
    })?;
    let Some(prometheus) = &metric.provider.prometheus else {
        return Err(invalid("set a provider (prometheus)".to_string()));
    };
    let mut texts: Vec<&str> = Vec::new();
    match (&prometheus.query, &prometheus.check) {
        (Some(query), None) => texts.push(query),
        (None, Some(check)) => {
            texts.push(&check.service);
            texts.extend(check.pod_template_hash.as_deref());
            texts.extend(check.namespace.as_deref());
        }
        _ => return Err(invalid("set exactly one of query or check".to_string())),
    }
    for text in texts {
        let names = args::referenced_names(text).map_err(|source| RunSpecError::Query {
            metric: metric.name.clone(),
            source,
        })?;
        if let Some(arg) = names.into_iter().find(|n| !declared.contains_key(n)) {
            return Err(RunSpecError::UndeclaredArgument {
                metric: metric.name.clone(),
                arg,
            });
        }
    }
    // The runner ends a run in Error before measuring when one of these does not parse.
    for (field, duration) in [
        ("interval", &metric.interval),
        ("initialDelay", &metric.initial_delay),
        ("provider.prometheus.timeout", &prometheus.timeout),
    ] {
        if let Some(Err(error)) = duration.as_ref().map(ManifestDuration::to_duration) {
            return Err(invalid(format!("{field}: {error}")));
        }
    }
    // A built-in check's window and metric names do not depend on argument values: building the query with
    // stand-in values finds what would end every measurement in an error.
    if let Some(check) = &prometheus.check {
        let stand_ins: BTreeMap<String, String> = declared
            .keys()
            .map(|name| (name.clone(), "x".to_string()))
            .collect();
        builtin_query(check, &stand_ins).map_err(|error| invalid(error.to_string()))?;
    }
    Ok(())
}

fn resolve_given(
    given: &AnalysisArgument,
    rollout: &Rollout,
    stable_hash: &str,
    canary_hash: &str,
) -> Result<TemplateArgument, RunSpecError> {
    let literal = |value: String| TemplateArgument {
        name: given.name.clone(),
        value: Some(value),
        value_from: None,
    };
    let Some(from) = &given.value_from else {
        return match &given.value {
            Some(value) => Ok(literal(value.clone())),
            None => Err(RunSpecError::MissingArgument(given.name.clone())),
        };
    };
    if let Some(secret) = &from.secret_key_ref {
        return Ok(TemplateArgument {
            name: given.name.clone(),
            value: None,
            value_from: Some(TemplateArgumentValueFrom {
                secret_key_ref: secret.clone(),
            }),
        });
    }
    if let Some(field) = &from.field_ref {
        return read_field(rollout, &field.field_path)
            .map(literal)
            .map_err(|reason| RunSpecError::FieldRef {
                name: given.name.clone(),
                path: field.field_path.clone(),
                reason,
            });
    }
    if let Some(which) = from.pod_template_hash_value {
        let (hash, label) = match which {
            PodTemplateHashValue::Stable => (stable_hash, "stable"),
            PodTemplateHashValue::Latest => (canary_hash, "latest"),
        };
        if hash.is_empty() {
            return Err(RunSpecError::UnknownPodTemplateHash {
                name: given.name.clone(),
                which: label,
            });
        }
        return Ok(literal(hash.to_string()));
    }
    Err(RunSpecError::EmptyValueFrom(given.name.clone()))
}

/// One step of a field path: `name` or `['key']`.
fn field_path_segments(path: &str) -> Result<Vec<String>, String> {
    let mut segments = Vec::new();
    let mut rest = path.trim();
    if rest.is_empty() {
        return Err("is empty".to_string());
    }
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let quote = after.chars().next().filter(|c| *c == '\'' || *c == '"');
            let Some(quote) = quote else {
                return Err("has a '[' not followed by a quoted key".to_string());
            };
            let body = &after[1..];
            let close = format!("{quote}]");
            let end = body.find(&close).ok_or("has an unclosed ['key']")?;
            segments.push(body[..end].to_string());
            rest = &body[end + close.len()..];
        } else {
            let rest_trimmed = rest.strip_prefix('.').unwrap_or(rest);
            let end = rest_trimmed.find(['.', '[']).unwrap_or(rest_trimmed.len());
            let name = &rest_trimmed[..end];
            if name.is_empty() {
                return Err("has an empty segment".to_string());
            }
            segments.push(name.to_string());
            rest = &rest_trimmed[end..];
        }
    }
    Ok(segments)
}

/// Reads a scalar field of the Rollout by path (`metadata.name`, `metadata.labels['app']`, `spec.replicas`).
fn read_field(rollout: &Rollout, path: &str) -> Result<String, String> {
    let segments = field_path_segments(path)?;
    let document = serde_json::to_value(rollout).map_err(|e| format!("cannot be read: {e}"))?;
    let mut current = &document;
    for segment in &segments {
        current = match current {
            serde_json::Value::Object(map) => map.get(segment),
            serde_json::Value::Array(items) => {
                segment.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        }
        .ok_or_else(|| "does not exist in the Rollout".to_string())?;
    }
    match current {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        _ => Err("is not a string, number or boolean".to_string()),
    }
}

/// Names of the metrics that are dry-run in a run.
pub fn dry_run_names(spec: &AnalysisRunSpec) -> BTreeSet<&str> {
    spec.dry_run
        .iter()
        .map(|d| d.metric_name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::crd::analysis::{BuiltinCheck, MetricProvider, PrometheusMetric};
    use crate::crd::rollout::{ArgumentValueFrom, FieldRef, SecretKeyRef};

    fn metric(name: &str, query: &str) -> Metric {
        Metric {
            name: name.into(),
            success_condition: Some("result < 0.05".into()),
            provider: MetricProvider {
                prometheus: Some(PrometheusMetric {
                    address: "http://prometheus:9090".into(),
                    query: Some(query.into()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }
    }

    fn declared(name: &str, value: Option<&str>) -> TemplateArgument {
        TemplateArgument {
            name: name.into(),
            value: value.map(str::to_string),
            value_from: None,
        }
    }

    fn key(name: &str) -> TemplateKey {
        TemplateKey {
            name: name.into(),
            cluster_scope: false,
        }
    }

    fn template(args: Vec<TemplateArgument>, metrics: Vec<Metric>) -> AnalysisTemplateSpec {
        AnalysisTemplateSpec {
            args,
            metrics,
            dry_run: vec![],
        }
    }

    fn rollout() -> Rollout {
        let mut rollout: Rollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "serin.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "checkout", "namespace": "shop",
                         "labels": {"app": "checkout", "team.example/owner": "payments"}},
            "spec": {
                "replicas": 4,
                "selector": {"matchLabels": {"app": "checkout"}},
                "template": {"metadata": {"labels": {"app": "checkout"}},
                             "spec": {"containers": [{"name": "app", "image": "x"}]}},
                "strategy": {"canary": {"steps": []}}
            }
        }))
        .unwrap();
        rollout.status = None;
        rollout
    }

    fn analysis(names: &[&str], args: Vec<AnalysisArgument>) -> RolloutAnalysis {
        RolloutAnalysis {
            templates: names
                .iter()
                .map(|n| AnalysisTemplateRef {
                    template_name: n.to_string(),
                    cluster_scope: false,
                })
                .collect(),
            args,
        }
    }

    fn given(name: &str, value: &str) -> AnalysisArgument {
        AnalysisArgument {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn given_from(name: &str, from: ArgumentValueFrom) -> AnalysisArgument {
        AnalysisArgument {
            name: name.into(),
            value: None,
            value_from: Some(from),
        }
    }

    fn value_of<'s>(spec: &'s AnalysisRunSpec, name: &str) -> Option<&'s str> {
        spec.args
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.value.as_deref())
    }

    #[test]
    fn merges_metrics_and_resolves_every_kind_of_argument() {
        let templates = vec![
            (
                key("errors"),
                template(
                    vec![
                        declared("service", None),
                        declared("hash", None),
                        declared("ns", None),
                    ],
                    vec![metric(
                        "error-rate",
                        r#"x{s="{{args.service}}",h="{{args.hash}}",n="{{args.ns}}"}"#,
                    )],
                ),
            ),
            (
                key("latency"),
                template(
                    vec![
                        declared("service", None),
                        declared("stable", None),
                        declared("owner", None),
                        declared("replicas", None),
                        declared("window", Some("1m")),
                    ],
                    vec![metric(
                        "p99",
                        r#"y{s="{{args.service}}",st="{{args.stable}}",o="{{args.owner}}"}[{{args.window}}] > {{args.replicas}}"#,
                    )],
                ),
            ),
        ];
        let request = analysis(
            &["errors", "latency"],
            vec![
                given("service", "checkout"),
                given_from(
                    "hash",
                    ArgumentValueFrom {
                        pod_template_hash_value: Some(PodTemplateHashValue::Latest),
                        ..Default::default()
                    },
                ),
                given_from(
                    "stable",
                    ArgumentValueFrom {
                        pod_template_hash_value: Some(PodTemplateHashValue::Stable),
                        ..Default::default()
                    },
                ),
                given_from(
                    "ns",
                    ArgumentValueFrom {
                        field_ref: Some(FieldRef {
                            field_path: "metadata.namespace".into(),
                        }),
                        ..Default::default()
                    },
                ),
                given_from(
                    "owner",
                    ArgumentValueFrom {
                        field_ref: Some(FieldRef {
                            field_path: "metadata.labels['team.example/owner']".into(),
                        }),
                        ..Default::default()
                    },
                ),
                given_from(
                    "replicas",
                    ArgumentValueFrom {
                        field_ref: Some(FieldRef {
                            field_path: "spec.replicas".into(),
                        }),
                        ..Default::default()
                    },
                ),
            ],
        );
        let spec = build_run_spec(&request, &templates, &rollout(), "s7ab1e", "c4na7y").unwrap();
        let names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["error-rate", "p99"]);
        assert_eq!(value_of(&spec, "service"), Some("checkout"));
        assert_eq!(value_of(&spec, "hash"), Some("c4na7y"));
        assert_eq!(value_of(&spec, "stable"), Some("s7ab1e"));
        assert_eq!(value_of(&spec, "ns"), Some("shop"));
        assert_eq!(value_of(&spec, "owner"), Some("payments"));
        assert_eq!(value_of(&spec, "replicas"), Some("4"));
        assert_eq!(value_of(&spec, "window"), Some("1m"));
        assert!(!spec.terminate);
    }

    #[test]
    fn secrets_stay_references_and_are_never_copied_into_the_run() {
        let templates = vec![(
            key("t"),
            template(
                vec![declared("token", None)],
                vec![metric("m", r#"x{t="{{args.token}}"}"#)],
            ),
        )];
        let secret = SecretKeyRef {
            name: "creds".into(),
            key: "token".into(),
        };
        let request = analysis(
            &["t"],
            vec![given_from(
                "token",
                ArgumentValueFrom {
                    secret_key_ref: Some(secret.clone()),
                    ..Default::default()
                },
            )],
        );
        let spec = build_run_spec(&request, &templates, &rollout(), "s", "c").unwrap();
        assert_eq!(spec.args[0].value, None);
        assert_eq!(
            spec.args[0].value_from.as_ref().map(|f| &f.secret_key_ref),
            Some(&secret)
        );
    }

    #[test]
    fn invalid_specs_are_errors_naming_what_is_wrong() {
        let ok_template = template(
            vec![declared("service", None)],
            vec![metric("m", r#"x{s="{{args.service}}"}"#)],
        );
        let with = |templates: Vec<(TemplateKey, AnalysisTemplateSpec)>,
                    names: &[&str],
                    args: Vec<AnalysisArgument>| {
            build_run_spec(&analysis(names, args), &templates, &rollout(), "s", "c").unwrap_err()
        };

        let err = with(vec![], &["missing"], vec![]);
        assert_eq!(err, RunSpecError::UnknownTemplate("missing".into()));

        let err = with(vec![(key("t"), ok_template.clone())], &["t"], vec![]);
        assert_eq!(err, RunSpecError::MissingArgument("service".into()));
        assert!(err.to_string().contains("\"service\""));

        let err = with(
            vec![
                (key("a"), ok_template.clone()),
                (key("b"), ok_template.clone()),
            ],
            &["a", "b"],
            vec![given("service", "x")],
        );
        assert_eq!(err.category(), "duplicate_metric");

        let undeclared = template(vec![], vec![metric("m", r#"x{s="{{args.nope}}"}"#)]);
        let err = with(vec![(key("t"), undeclared)], &["t"], vec![]);
        assert_eq!(
            err,
            RunSpecError::UndeclaredArgument {
                metric: "m".into(),
                arg: "nope".into()
            }
        );

        let mut bad_condition = metric("m", "up");
        bad_condition.success_condition = Some("result <".into());
        let err = with(
            vec![(key("t"), template(vec![], vec![bad_condition]))],
            &["t"],
            vec![],
        );
        assert!(
            err.to_string()
                .contains(r#"condition "result <" does not parse"#),
            "{err}"
        );

        let mut no_condition = metric("m", "up");
        no_condition.success_condition = None;
        let err = with(
            vec![(key("t"), template(vec![], vec![no_condition]))],
            &["t"],
            vec![],
        );
        assert_eq!(err.category(), "invalid_metric");

        let err = with(
            vec![(key("t"), ok_template.clone())],
            &["t"],
            vec![given_from(
                "service",
                ArgumentValueFrom {
                    field_ref: Some(FieldRef {
                        field_path: "metadata.labels['absent']".into(),
                    }),
                    ..Default::default()
                },
            )],
        );
        assert_eq!(err.category(), "field_ref");

        let err = build_run_spec(
            &analysis(
                &["t"],
                vec![given_from(
                    "service",
                    ArgumentValueFrom {
                        pod_template_hash_value: Some(PodTemplateHashValue::Stable),
                        ..Default::default()
                    },
                )],
            ),
            &vec![(key("t"), ok_template.clone())],
            &rollout(),
            "",
            "c",
        )
        .unwrap_err();
        assert_eq!(err.category(), "unknown_pod_template_hash");

        let mut with_dry_run = ok_template.clone();
        with_dry_run.dry_run = vec![DryRunMetric {
            metric_name: "ghost".into(),
        }];
        let err = with(
            vec![(key("t"), with_dry_run)],
            &["t"],
            vec![given("service", "x")],
        );
        assert_eq!(err, RunSpecError::UnknownDryRunMetric("ghost".into()));
    }

    #[test]
    fn observed_map_lookup_reports_unusable_templates_and_cluster_scope() {
        let mut map: BTreeMap<TemplateKey, Result<AnalysisTemplateSpec, String>> = BTreeMap::new();
        map.insert(key("broken"), Err("spec.metrics is empty".into()));
        let cluster_key = TemplateKey {
            name: "shared".into(),
            cluster_scope: true,
        };
        map.insert(cluster_key, Ok(template(vec![], vec![metric("m", "up")])));
        let err =
            build_run_spec(&analysis(&["broken"], vec![]), &map, &rollout(), "s", "c").unwrap_err();
        assert_eq!(err.category(), "unusable_template");
        // The same name as a namespaced template is not found: scope is part of the key.
        let err =
            build_run_spec(&analysis(&["shared"], vec![]), &map, &rollout(), "s", "c").unwrap_err();
        assert_eq!(err, RunSpecError::UnknownTemplate("shared".into()));
        let request = RolloutAnalysis {
            templates: vec![AnalysisTemplateRef {
                template_name: "shared".into(),
                cluster_scope: true,
            }],
            args: vec![],
        };
        assert!(build_run_spec(&request, &map, &rollout(), "s", "c").is_ok());
    }

    #[test]
    fn settings_the_runner_would_stop_on_are_invalid_specs() {
        let run_spec_error = |metric: Metric| {
            let templates = vec![(key("t"), template(vec![], vec![metric]))];
            build_run_spec(&analysis(&["t"], vec![]), &templates, &rollout(), "s", "c")
                .unwrap_err()
                .to_string()
        };
        let mut bad_interval = metric("m", "up");
        bad_interval.interval = Some(ManifestDuration::Text("soon".into()));
        assert_eq!(
            run_spec_error(bad_interval),
            r#"metric "m": interval: duration "soon" is not a number of seconds or a string like 30s, 5m or 1h30m"#
        );
        let mut bad_delay = metric("m", "up");
        bad_delay.initial_delay = Some(ManifestDuration::Seconds(-5));
        assert!(run_spec_error(bad_delay).starts_with(r#"metric "m": initialDelay: "#));
        let mut bad_timeout = metric("m", "up");
        if let Some(p) = bad_timeout.provider.prometheus.as_mut() {
            p.timeout = Some(ManifestDuration::Text("".into()));
        }
        assert!(
            run_spec_error(bad_timeout).starts_with(r#"metric "m": provider.prometheus.timeout: "#)
        );
        let mut bad_window = metric("m", "unused");
        if let Some(p) = bad_window.provider.prometheus.as_mut() {
            p.query = None;
            p.check = Some(BuiltinCheck {
                service: "checkout".into(),
                window: Some(ManifestDuration::Text("0s".into())),
                ..Default::default()
            });
        }
        assert_eq!(
            run_spec_error(bad_window),
            r#"metric "m": check window: must be longer than zero"#
        );
    }

    #[test]
    fn builtin_check_fields_are_validated_for_arguments() {
        let mut check_metric = metric("errors", "unused");
        if let Some(p) = check_metric.provider.prometheus.as_mut() {
            p.query = None;
            p.check = Some(BuiltinCheck {
                service: "{{args.svc}}".into(),
                ..Default::default()
            });
        }
        let templates = vec![(key("t"), template(vec![], vec![check_metric]))];
        let err = build_run_spec(&analysis(&["t"], vec![]), &templates, &rollout(), "s", "c")
            .unwrap_err();
        assert_eq!(err.category(), "undeclared_argument");
    }

    #[test]
    fn errors_name_the_template_or_argument_at_fault() {
        let good = template(
            vec![declared("service", None)],
            vec![metric("ok", r#"x{s="{{args.service}}"}"#)],
        );
        let mut no_provider = metric("broken", "up");
        no_provider.provider.prometheus = None;
        let mut with_dry_run = template(vec![], vec![metric("other", "up")]);
        with_dry_run.dry_run = vec![DryRunMetric {
            metric_name: "ghost".into(),
        }];
        let templates = vec![
            (key("good"), good.clone()),
            (key("again"), good),
            (key("no-provider"), template(vec![], vec![no_provider])),
            (key("dry"), with_dry_run),
        ];
        let field_ref = |path: &str| ArgumentValueFrom {
            field_ref: Some(FieldRef {
                field_path: path.into(),
            }),
            ..Default::default()
        };
        let cases: Vec<(RolloutAnalysis, &str)> = vec![
            (analysis(&["good", "ghost"], vec![]), "templates[1]"),
            (
                analysis(&["good", "again"], vec![given("service", "x")]),
                "templates[1]",
            ),
            (
                analysis(&["good", "no-provider"], vec![given("service", "x")]),
                "templates[1]",
            ),
            (analysis(&["dry"], vec![]), "templates[0]"),
            (analysis(&["good"], vec![]), "args"),
            (
                analysis(
                    &["good"],
                    vec![
                        given("unused", "x"),
                        given_from("service", field_ref("metadata.labels['absent']")),
                    ],
                ),
                "args[1].valueFrom.fieldRef.fieldPath",
            ),
            (
                analysis(
                    &["good"],
                    vec![given_from("service", ArgumentValueFrom::default())],
                ),
                "args[0].valueFrom",
            ),
            (analysis(&[], vec![]), "templates"),
        ];
        for (request, expected) in cases {
            let error = build_run_spec(&request, &templates, &rollout(), "s", "c").unwrap_err();
            assert_eq!(
                error.path_in((&request).into(), &templates),
                expected,
                "{error}"
            );
        }
    }

    #[test]
    fn field_paths_parse_dots_and_quoted_keys() {
        assert_eq!(
            field_path_segments("metadata.annotations['a.b/c']").unwrap(),
            vec!["metadata", "annotations", "a.b/c"]
        );
        assert_eq!(
            field_path_segments(r#"metadata.labels["x"]"#).unwrap(),
            vec!["metadata", "labels", "x"]
        );
        assert!(field_path_segments("metadata.labels[x]").is_err());
        assert!(field_path_segments("metadata..name").is_err());
        assert!(field_path_segments("").is_err());
    }
}
