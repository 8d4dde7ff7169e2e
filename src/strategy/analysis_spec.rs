//! Builds the spec of an AnalysisRun from the referenced templates and the Rollout's arguments.
//!
//! Kept to one small function so the analysis module's builder can replace it.

use crate::crd::analysis::{TemplateArgument, TemplateArgumentValueFrom};
use crate::crd::rollout::{AnalysisArgument, PodTemplateHashValue};
use crate::crd::{AnalysisRunSpec, AnalysisTemplateSpec};

/// What argument values may refer to.
#[derive(Clone, Debug, Default)]
pub struct ArgumentContext {
    pub rollout_name: String,
    pub namespace: String,
    pub stable_hash: String,
    pub latest_hash: String,
}

/// Why a run spec could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunSpecError {
    #[error("metric {0:?} is defined by more than one template")]
    DuplicateMetric(String),
    #[error("argument {0:?} has no value")]
    ArgumentWithoutValue(String),
    #[error("argument {name:?} reads unsupported field {path:?}")]
    UnsupportedFieldRef { name: String, path: String },
}

impl RunSpecError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            RunSpecError::DuplicateMetric(_) => "duplicate_metric",
            RunSpecError::ArgumentWithoutValue(_) => "argument_without_value",
            RunSpecError::UnsupportedFieldRef { .. } => "unsupported_field_ref",
        }
    }
}

/// Concatenates the templates' metrics and arguments; the Rollout's arguments override the templates'
/// defaults and are resolved to literal values (Secret references stay references).
pub fn build_run_spec(
    templates: &[AnalysisTemplateSpec],
    args: &[AnalysisArgument],
    context: &ArgumentContext,
) -> Result<AnalysisRunSpec, RunSpecError> {
    let mut spec = AnalysisRunSpec::default();
    for template in templates {
        for metric in &template.metrics {
            if spec.metrics.iter().any(|m| m.name == metric.name) {
                return Err(RunSpecError::DuplicateMetric(metric.name.clone()));
            }
            spec.metrics.push(metric.clone());
        }
        spec.dry_run.extend(template.dry_run.iter().cloned());
        for declared in &template.args {
            if !spec.args.iter().any(|a| a.name == declared.name) {
                spec.args.push(declared.clone());
            }
        }
    }
    for given in args {
        let resolved = resolve(given, context)?;
        match spec.args.iter_mut().find(|a| a.name == given.name) {
            Some(slot) => *slot = resolved,
            None => spec.args.push(resolved),
        }
    }
    if let Some(missing) = spec
        .args
        .iter()
        .find(|a| a.value.is_none() && a.value_from.is_none())
    {
        return Err(RunSpecError::ArgumentWithoutValue(missing.name.clone()));
    }
    Ok(spec)
}

fn resolve(
    given: &AnalysisArgument,
    context: &ArgumentContext,
) -> Result<TemplateArgument, RunSpecError> {
    let literal = |value: String| TemplateArgument {
        name: given.name.clone(),
        value: Some(value),
        value_from: None,
    };
    if let Some(value) = &given.value {
        return Ok(literal(value.clone()));
    }
    let Some(from) = &given.value_from else {
        return Err(RunSpecError::ArgumentWithoutValue(given.name.clone()));
    };
    if let Some(which) = from.pod_template_hash_value {
        return Ok(literal(match which {
            PodTemplateHashValue::Stable => context.stable_hash.clone(),
            PodTemplateHashValue::Latest => context.latest_hash.clone(),
        }));
    }
    if let Some(field) = &from.field_ref {
        return match field.field_path.as_str() {
            "metadata.name" => Ok(literal(context.rollout_name.clone())),
            "metadata.namespace" => Ok(literal(context.namespace.clone())),
            other => Err(RunSpecError::UnsupportedFieldRef {
                name: given.name.clone(),
                path: other.to_string(),
            }),
        };
    }
    if let Some(secret) = &from.secret_key_ref {
        return Ok(TemplateArgument {
            name: given.name.clone(),
            value: None,
            value_from: Some(TemplateArgumentValueFrom {
                secret_key_ref: secret.clone(),
            }),
        });
    }
    Err(RunSpecError::ArgumentWithoutValue(given.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::ArgumentValueFrom;
    use crate::crd::Metric;

    fn template(metric: &str, args: &[(&str, Option<&str>)]) -> AnalysisTemplateSpec {
        AnalysisTemplateSpec {
            args: args
                .iter()
                .map(|(n, v)| TemplateArgument {
                    name: n.to_string(),
                    value: v.map(str::to_string),
                    value_from: None,
                })
                .collect(),
            metrics: vec![Metric {
                name: metric.into(),
                ..Default::default()
            }],
            dry_run: vec![],
        }
    }

    #[test]
    fn merges_metrics_and_resolves_arguments() {
        let context = ArgumentContext {
            latest_hash: "abc".into(),
            rollout_name: "ro".into(),
            ..Default::default()
        };
        let args = vec![
            AnalysisArgument {
                name: "service".into(),
                value: Some("checkout".into()),
                value_from: None,
            },
            AnalysisArgument {
                name: "canary-hash".into(),
                value: None,
                value_from: Some(ArgumentValueFrom {
                    pod_template_hash_value: Some(PodTemplateHashValue::Latest),
                    ..Default::default()
                }),
            },
        ];
        let spec = build_run_spec(
            &[
                template("error-rate", &[("service", None), ("canary-hash", None)]),
                template("latency", &[("window", Some("1m"))]),
            ],
            &args,
            &context,
        )
        .unwrap();
        let names: Vec<_> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["error-rate", "latency"]);
        let value = |n: &str| {
            spec.args
                .iter()
                .find(|a| a.name == n)
                .and_then(|a| a.value.clone())
        };
        assert_eq!(value("service").as_deref(), Some("checkout"));
        assert_eq!(value("canary-hash").as_deref(), Some("abc"));
        assert_eq!(value("window").as_deref(), Some("1m"));
    }

    #[test]
    fn rejects_duplicates_and_missing_values() {
        let context = ArgumentContext::default();
        assert_eq!(
            build_run_spec(&[template("m", &[]), template("m", &[])], &[], &context),
            Err(RunSpecError::DuplicateMetric("m".into()))
        );
        assert_eq!(
            build_run_spec(&[template("m", &[("service", None)])], &[], &context),
            Err(RunSpecError::ArgumentWithoutValue("service".into()))
        );
    }
}
