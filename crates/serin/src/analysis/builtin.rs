//! Decides the PromQL of the built-in checks (error rate, p99 latency) over the common request metrics, so
//! that users need no PromQL for the two questions nearly everyone asks. Label values are escaped like args.
//!
//! With `SEL` = `service="S"` plus `,pod_template_hash="H"` and `,namespace="N"` when given, and `W` the window:
//! - ErrorRate:  `(sum(rate(REQUESTS{SEL,code=~"5.."}[W])) or vector(0)) / sum(rate(REQUESTS{SEL}[W]))`
//!   (`or vector(0)`: no 5xx series yet means no errors; no requests at all leaves the denominator empty, so
//!   the result is empty: Inconclusive, never a success);
//! - LatencyP99: `histogram_quantile(0.99, sum by (le) (rate(DURATION_bucket{SEL}[W])))`.
//!
//! `REQUESTS` defaults to `http_requests_total`, `DURATION` to `http_request_duration_seconds`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::args::{self, escape_double_quoted, ArgsError};
use crate::crd::analysis::{BuiltinCheck, BuiltinCheckKind};

/// Why a built-in check cannot become a query.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BuiltinError {
    #[error("check field {field}: {source}")]
    Argument {
        field: &'static str,
        source: ArgsError,
    },
    #[error("check field {field}: {value:?} is not a Prometheus metric name")]
    InvalidMetricName { field: &'static str, value: String },
    #[error("check window: {0}")]
    InvalidWindow(String),
    #[error("check service is empty")]
    EmptyService,
}

impl BuiltinError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            BuiltinError::Argument { .. } => "argument",
            BuiltinError::InvalidMetricName { .. } => "invalid_metric_name",
            BuiltinError::InvalidWindow(_) => "invalid_window",
            BuiltinError::EmptyService => "empty_service",
        }
    }
}

pub const DEFAULT_REQUESTS_METRIC: &str = "http_requests_total";
pub const DEFAULT_DURATION_METRIC: &str = "http_request_duration_seconds";
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn promql_duration(window: Duration) -> String {
    let millis = window.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// The PromQL of a built-in check, with arguments substituted into its fields and escaped.
pub fn builtin_query(
    check: &BuiltinCheck,
    values: &BTreeMap<String, String>,
) -> Result<String, BuiltinError> {
    let field = |field: &'static str, text: &str| {
        args::substitute_plain(text, values)
            .map_err(|source| BuiltinError::Argument { field, source })
    };
    let service = field("service", &check.service)?;
    if service.is_empty() {
        return Err(BuiltinError::EmptyService);
    }
    let mut selector = format!("service=\"{}\"", escape_double_quoted(&service));
    if let Some(hash) = &check.pod_template_hash {
        let hash = field("podTemplateHash", hash)?;
        selector.push_str(&format!(
            ",pod_template_hash=\"{}\"",
            escape_double_quoted(&hash)
        ));
    }
    if let Some(namespace) = &check.namespace {
        let namespace = field("namespace", namespace)?;
        selector.push_str(&format!(
            ",namespace=\"{}\"",
            escape_double_quoted(&namespace)
        ));
    }
    let window = match &check.window {
        None => DEFAULT_WINDOW,
        Some(w) => w
            .to_duration()
            .map_err(|e| BuiltinError::InvalidWindow(e.to_string()))?,
    };
    if window.as_millis() == 0 {
        return Err(BuiltinError::InvalidWindow(
            "must be longer than zero".to_string(),
        ));
    }
    let window = promql_duration(window);
    let metric_name = |field_name: &'static str, given: &Option<String>, default: &str| {
        let name = given.clone().unwrap_or_else(|| default.to_string());
        if is_metric_name(&name) {
            Ok(name)
        } else {
            Err(BuiltinError::InvalidMetricName {
                field: field_name,
                value: name,
            })
        }
    };
    Ok(match check.kind {
        BuiltinCheckKind::ErrorRate => {
            let requests = metric_name(
                "requestsMetric",
                &check.requests_metric,
                DEFAULT_REQUESTS_METRIC,
            )?;
            format!(
                "(sum(rate({requests}{{{selector},code=~\"5..\"}}[{window}])) or vector(0)) \
                 / sum(rate({requests}{{{selector}}}[{window}]))"
            )
        }
        BuiltinCheckKind::LatencyP99 => {
            let duration = metric_name(
                "durationMetric",
                &check.duration_metric,
                DEFAULT_DURATION_METRIC,
            )?;
            format!("histogram_quantile(0.99, sum by (le) (rate({duration}_bucket{{{selector}}}[{window}])))")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::duration::ManifestDuration;

    fn check(kind: BuiltinCheckKind) -> BuiltinCheck {
        BuiltinCheck {
            kind,
            service: "{{args.service}}".into(),
            pod_template_hash: Some("{{args.hash}}".into()),
            ..Default::default()
        }
    }

    fn values(service: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("service".to_string(), service.to_string()),
            ("hash".to_string(), "abc".to_string()),
        ])
    }

    #[test]
    fn documented_queries() {
        assert_eq!(
            builtin_query(&check(BuiltinCheckKind::ErrorRate), &values("checkout")).unwrap(),
            r#"(sum(rate(http_requests_total{service="checkout",pod_template_hash="abc",code=~"5.."}[60s])) or vector(0)) / sum(rate(http_requests_total{service="checkout",pod_template_hash="abc"}[60s]))"#
        );
        let mut latency = check(BuiltinCheckKind::LatencyP99);
        latency.window = Some(ManifestDuration::Text("30s".into()));
        latency.namespace = Some("shop".into());
        latency.duration_metric = Some("rpc_seconds".into());
        assert_eq!(
            builtin_query(&latency, &values("checkout")).unwrap(),
            r#"histogram_quantile(0.99, sum by (le) (rate(rpc_seconds_bucket{service="checkout",pod_template_hash="abc",namespace="shop"}[30s])))"#
        );
    }

    #[test]
    fn hostile_values_are_escaped() {
        let query = builtin_query(
            &check(BuiltinCheckKind::ErrorRate),
            &values("x\"} or vector(1) #\n"),
        )
        .unwrap();
        assert!(
            query.contains(r#"service="x\"} or vector(1) #\n""#),
            "{query}"
        );
    }

    #[test]
    fn bad_fields_are_errors() {
        let mut bad = check(BuiltinCheckKind::ErrorRate);
        bad.requests_metric = Some("x{a=\"b\"}".into());
        assert_eq!(
            builtin_query(&bad, &values("s")).unwrap_err().category(),
            "invalid_metric_name"
        );
        let mut zero = check(BuiltinCheckKind::LatencyP99);
        zero.window = Some(ManifestDuration::Seconds(0));
        assert_eq!(
            builtin_query(&zero, &values("s")).unwrap_err().category(),
            "invalid_window"
        );
        assert_eq!(
            builtin_query(&check(BuiltinCheckKind::ErrorRate), &BTreeMap::new())
                .unwrap_err()
                .category(),
            "argument"
        );
        assert_eq!(
            builtin_query(&check(BuiltinCheckKind::ErrorRate), &values("")).unwrap_err(),
            BuiltinError::EmptyService
        );
    }
}
