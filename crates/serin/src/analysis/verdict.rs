//! The verdict rules (pure): what one measured value means (Successful, Failed, Inconclusive, Error), what a
//! metric's measurements add up to, and what a run's metrics add up to.
//!
//! A value that is not one finite number (no data, several series, NaN, +/-Inf) is never a success: it is
//! Inconclusive, unless it is +/-Inf and the failure condition holds for it, then Failed. With both
//! conditions, the failure condition wins; with only a success condition, not meeting it is a failure; with
//! only a failure condition, not meeting it is a success; meeting neither of two conditions is Inconclusive.
//!
//! Nothing but a Successful measurement is evidence of health (safety rule 10). An Error is no measurement
//! of the service at all, so it never counts toward `count` (as in Argo Rollouts) and is retried until the
//! metric has its count or passes `consecutiveErrorLimit`. A metric, and a run, without one Successful
//! measurement is never Successful, whatever its limits, its count or a terminate say.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::condition::Conditions;
use crate::crd::analysis::{Measurement, Metric, MetricResult};
use crate::crd::AnalysisPhase;

/// Why a metric's settings cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerdictError {
    #[error("metric {metric:?}: count {count:?} is not a positive whole number")]
    InvalidCount { metric: String, count: String },
}

impl VerdictError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            VerdictError::InvalidCount { .. } => "invalid_count",
        }
    }
}

/// What a provider returned for one query.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderValue {
    /// A PromQL scalar.
    Scalar(f64),
    /// An instant vector: zero, one or several series.
    Vector(Vec<SeriesSample>),
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesSample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// How many measurements of a metric's history status keeps; the counts cover all of them.
pub const MEASUREMENT_HISTORY_LIMIT: usize = 10;

/// Consecutive provider errors tolerated when the metric says nothing (Argo Rollouts' default).
pub const DEFAULT_CONSECUTIVE_ERROR_LIMIT: i32 = 4;

/// The judgement of one measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct MeasurementVerdict {
    pub phase: AnalysisPhase,
    /// The value as text: `0.012`, `NaN`, `+Inf`, `[]` (no data), `[0.1, 0.3]` (several series).
    pub value: Option<String>,
    pub message: Option<String>,
}

/// Formats a float the way status shows it.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        // Ten significant digits: `0.2`, not the `0.19999999999999998` that float division leaves.
        let rounded: f64 = format!("{value:.9e}").parse().unwrap_or(value);
        format!("{rounded}")
    }
}

fn format_provider_value(value: &ProviderValue) -> String {
    const SHOWN: usize = 5;
    match value {
        ProviderValue::Scalar(v) => format_value(*v),
        ProviderValue::Vector(series) if series.len() == 1 => format_value(series[0].value),
        ProviderValue::Vector(series) => {
            let mut shown: Vec<String> = series
                .iter()
                .take(SHOWN)
                .map(|s| format_value(s.value))
                .collect();
            if series.len() > SHOWN {
                shown.push(format!("... {} more", series.len() - SHOWN));
            }
            format!("[{}]", shown.join(", "))
        }
    }
}

/// Judges one value against a metric's conditions.
pub fn judge(value: &ProviderValue, conditions: &Conditions) -> MeasurementVerdict {
    let text = format_provider_value(value);
    let single = match value {
        ProviderValue::Scalar(v) => Some(*v),
        ProviderValue::Vector(series) if series.len() == 1 => Some(series[0].value),
        ProviderValue::Vector(_) => None,
    };
    let Some(number) = single else {
        let message = match value {
            ProviderValue::Vector(series) if series.is_empty() => "query returned no data".to_string(),
            ProviderValue::Vector(series) => format!(
                "query returned {} series; a condition needs exactly one value (aggregate with sum or max)",
                series.len()
            ),
            ProviderValue::Scalar(_) => String::new(),
        };
        return verdict(AnalysisPhase::Inconclusive, text, message);
    };
    if number.is_nan() {
        return verdict(
            AnalysisPhase::Inconclusive,
            text,
            "value NaN is not a number (often 0/0: no requests in the window)".to_string(),
        );
    }
    let failure = match conditions.failure.as_ref().map(|c| (c, c.evaluate(number))) {
        Some((_, Err(error))) => return verdict(AnalysisPhase::Error, text, error.to_string()),
        Some((condition, Ok(true))) => {
            let message = format!(
                "value {text} met failure condition {:?}",
                condition.source()
            );
            return verdict(AnalysisPhase::Failed, text, message);
        }
        Some((_, Ok(false))) => Some(false),
        None => None,
    };
    if number.is_infinite() {
        return verdict(
            AnalysisPhase::Inconclusive,
            text.clone(),
            format!("value {text} is not a finite number"),
        );
    }
    match (conditions.success.as_ref(), failure) {
        (Some(condition), _) => match condition.evaluate(number) {
            Err(error) => verdict(AnalysisPhase::Error, text, error.to_string()),
            Ok(true) => {
                let message = format!("value {text} met condition {:?}", condition.source());
                verdict(AnalysisPhase::Successful, text, message)
            }
            Ok(false) if failure.is_some() => {
                let message =
                    format!("value {text} met neither the success nor the failure condition");
                verdict(AnalysisPhase::Inconclusive, text, message)
            }
            Ok(false) => {
                let message = format!("value {text} failed condition {:?}", condition.source());
                verdict(AnalysisPhase::Failed, text, message)
            }
        },
        (None, Some(_)) => {
            let message = format!("value {text} did not meet the failure condition");
            verdict(AnalysisPhase::Successful, text, message)
        }
        (None, None) => verdict(
            AnalysisPhase::Inconclusive,
            text,
            "the metric has no condition".to_string(),
        ),
    }
}

/// The judgement of a measurement the provider could not make.
pub fn judge_provider_error(message: impl Into<String>) -> MeasurementVerdict {
    MeasurementVerdict {
        phase: AnalysisPhase::Error,
        value: None,
        message: Some(message.into()),
    }
}

fn verdict(phase: AnalysisPhase, value: String, message: String) -> MeasurementVerdict {
    MeasurementVerdict {
        phase,
        value: Some(value),
        message: (!message.is_empty()).then_some(message),
    }
}

/// A metric's limits, with defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricLimits {
    pub failure_limit: i32,
    pub inconclusive_limit: i32,
    pub consecutive_error_limit: i32,
    /// Measurements after which the metric is done; `None`: until the run is terminated.
    pub count: Option<i32>,
}

impl MetricLimits {
    /// Reads the limits of a metric. A metric without interval and count is measured once.
    pub fn of(metric: &Metric) -> Result<Self, VerdictError> {
        let invalid = |count: String| VerdictError::InvalidCount {
            metric: metric.name.clone(),
            count,
        };
        let count = match &metric.count {
            None if metric.interval.is_none() => Some(1),
            None => None,
            Some(IntOrString::Int(n)) if *n > 0 => Some(*n),
            Some(IntOrString::Int(n)) => return Err(invalid(n.to_string())),
            Some(IntOrString::String(s)) => match s.trim().parse::<i32>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(invalid(s.clone())),
            },
        };
        Ok(MetricLimits {
            failure_limit: metric.failure_limit.unwrap_or(0),
            inconclusive_limit: metric.inconclusive_limit.unwrap_or(0),
            consecutive_error_limit: metric
                .consecutive_error_limit
                .unwrap_or(DEFAULT_CONSECUTIVE_ERROR_LIMIT),
            count,
        })
    }
}

/// Adds a measurement to a metric's counts and bounded history.
pub fn record(result: &mut MetricResult, measurement: Measurement) {
    result.count += 1;
    match measurement.phase {
        AnalysisPhase::Successful => result.successful += 1,
        AnalysisPhase::Failed => result.failed += 1,
        AnalysisPhase::Inconclusive => result.inconclusive += 1,
        AnalysisPhase::Error => result.error += 1,
        AnalysisPhase::Pending | AnalysisPhase::Running => {}
    }
    if measurement.phase == AnalysisPhase::Error {
        result.consecutive_error += 1;
    } else {
        result.consecutive_error = 0;
    }
    result.measurements.push(measurement);
    let excess = result
        .measurements
        .len()
        .saturating_sub(MEASUREMENT_HISTORY_LIMIT);
    result.measurements.drain(..excess);
}

fn last_message(result: &MetricResult, phase: AnalysisPhase) -> String {
    result
        .measurements
        .iter()
        .rev()
        .find(|m| m.phase == phase)
        .and_then(|m| m.message.clone())
        .unwrap_or_else(|| format!("{} measurement", phase.as_str().to_lowercase()))
}

/// Measurements that count toward a metric's `count`: those the provider answered (Successful, Failed,
/// Inconclusive). Errors are not among them.
pub fn counted(result: &MetricResult) -> i32 {
    result
        .successful
        .saturating_add(result.failed)
        .saturating_add(result.inconclusive)
}

/// The phase of a metric from its counts, and why.
pub fn metric_phase(
    result: &MetricResult,
    limits: &MetricLimits,
) -> (AnalysisPhase, Option<String>) {
    let name = &result.name;
    if result.failed > limits.failure_limit {
        let message = format!(
            "metric {name:?}: {} ({} of {} measurements failed, limit {})",
            last_message(result, AnalysisPhase::Failed),
            result.failed,
            result.count,
            limits.failure_limit
        );
        return (AnalysisPhase::Failed, Some(message));
    }
    if result.consecutive_error > limits.consecutive_error_limit {
        let message = format!(
            "metric {name:?}: {} errors in a row, limit {}; last: {}",
            result.consecutive_error,
            limits.consecutive_error_limit,
            last_message(result, AnalysisPhase::Error)
        );
        return (AnalysisPhase::Error, Some(message));
    }
    if result.inconclusive > limits.inconclusive_limit {
        let message = format!(
            "metric {name:?}: {} ({} of {} measurements inconclusive, limit {})",
            last_message(result, AnalysisPhase::Inconclusive),
            result.inconclusive,
            result.count,
            limits.inconclusive_limit
        );
        return (AnalysisPhase::Inconclusive, Some(message));
    }
    match limits.count {
        Some(count) if counted(result) >= count => count_reached(result),
        _ if result.count == 0 => (AnalysisPhase::Pending, None),
        _ => (AnalysisPhase::Running, None),
    }
}

/// The verdict of a metric that has its `count` of answered measurements, all within its limits.
fn count_reached(result: &MetricResult) -> (AnalysisPhase, Option<String>) {
    let name = &result.name;
    let answered = counted(result);
    let errors = match result.error {
        0 => String::new(),
        n => format!("; {n} errors not counted"),
    };
    if result.successful > 0 {
        let message = format!(
            "metric {name:?}: {} of {answered} measurements successful{errors}",
            result.successful
        );
        return (AnalysisPhase::Successful, Some(message));
    }
    // Within the limits but without one success: the limits tolerate bad measurements, they never turn them
    // into a pass.
    let (phase, last) = if result.failed > 0 {
        (AnalysisPhase::Failed, AnalysisPhase::Failed)
    } else {
        (AnalysisPhase::Inconclusive, AnalysisPhase::Inconclusive)
    };
    let message = format!(
        "metric {name:?}: no successful measurement in {answered} ({} failed, {} inconclusive{errors}); last: {}",
        result.failed,
        result.inconclusive,
        last_message(result, last)
    );
    (phase, Some(message))
}

fn severity(phase: AnalysisPhase) -> u8 {
    match phase {
        AnalysisPhase::Successful => 0,
        AnalysisPhase::Pending | AnalysisPhase::Running => 1,
        AnalysisPhase::Inconclusive => 2,
        AnalysisPhase::Error => 3,
        AnalysisPhase::Failed => 4,
    }
}

/// The phase of a metric inside a run: a terminated run counts an unfinished metric as successful if it had
/// a Successful measurement and no error since the last one (nothing went wrong while it ran), and as
/// Inconclusive otherwise. A metric
/// that claims success without one Successful measurement (a status written by hand or by an older version)
/// is Inconclusive too.
fn effective(result: &MetricResult, terminated: bool) -> (AnalysisPhase, Option<String>) {
    let without_success = |why: &str| {
        let message = format!(
            "metric {:?}: {why} without a successful measurement ({} measurements: {} failed, {} inconclusive, {} errors)",
            result.name, result.count, result.failed, result.inconclusive, result.error
        );
        (AnalysisPhase::Inconclusive, Some(message))
    };
    match result.phase {
        AnalysisPhase::Pending | AnalysisPhase::Running if terminated => {
            if result.successful > 0 && result.consecutive_error == 0 {
                (AnalysisPhase::Successful, result.message.clone())
            } else if result.successful > 0 {
                // Its provider stopped answering after the last success: nothing says it is healthy now.
                let message = format!(
                    "metric {:?}: terminated after {} errors in a row since its last successful measurement",
                    result.name, result.consecutive_error
                );
                (AnalysisPhase::Inconclusive, Some(message))
            } else {
                without_success("terminated")
            }
        }
        AnalysisPhase::Successful if result.successful <= 0 => without_success("marked successful"),
        phase => (phase, result.message.clone()),
    }
}

/// The phase of a run: the worst phase of its metrics that are not dry-run, and the message of that metric.
/// A run in which no measurement at all was Successful is never Successful: with only dry-run metrics, it is
/// Inconclusive (a human decides).
pub fn run_phase(results: &[MetricResult], terminated: bool) -> (AnalysisPhase, Option<String>) {
    let mut worst: Option<(AnalysisPhase, Option<String>)> = None;
    for result in results.iter().filter(|r| !r.dry_run) {
        let candidate = effective(result, terminated);
        let replace = worst
            .as_ref()
            .is_none_or(|(phase, _)| severity(candidate.0) > severity(*phase));
        if replace {
            worst = Some(candidate);
        }
    }
    let dry_run_notes: Vec<String> = results
        .iter()
        .filter(|r| r.dry_run && matches!(r.phase, AnalysisPhase::Failed | AnalysisPhase::Error))
        .filter_map(|r| r.message.as_ref().map(|m| format!("dry-run {m}")))
        .collect();
    let successes: i64 = results.iter().map(|r| i64::from(r.successful.max(0))).sum();
    let (phase, message) = match worst {
        None if terminated || results.iter().all(|r| r.phase.is_completed()) => {
            if successes > 0 {
                (AnalysisPhase::Successful, None)
            } else {
                let message = format!(
                    "no successful measurement in the run ({} metrics, all dry-run or none)",
                    results.len()
                );
                (AnalysisPhase::Inconclusive, Some(message))
            }
        }
        None => (AnalysisPhase::Running, None),
        Some((phase, message)) => {
            let message = match phase {
                AnalysisPhase::Successful => {
                    let measured = results.iter().filter(|r| !r.dry_run).count();
                    Some(format!("all {measured} metrics successful"))
                }
                AnalysisPhase::Pending | AnalysisPhase::Running => None,
                _ => message,
            };
            (phase, message)
        }
    };
    let message = match (message, dry_run_notes.is_empty()) {
        (message, true) => message,
        (Some(message), false) => Some(format!("{message}; {}", dry_run_notes.join("; "))),
        (None, false) => Some(dry_run_notes.join("; ")),
    };
    let phase = if phase == AnalysisPhase::Pending {
        AnalysisPhase::Running
    } else {
        phase
    };
    (phase, message)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::duration::ManifestDuration;

    fn series(values: &[f64]) -> ProviderValue {
        ProviderValue::Vector(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| SeriesSample {
                    labels: BTreeMap::from([("pod".to_string(), i.to_string())]),
                    value: *v,
                })
                .collect(),
        )
    }

    #[test]
    fn measurement_table() {
        use AnalysisPhase::*;
        let success = Some("result < 0.05");
        let failure = Some("result > 0.1");
        let table: &[(Option<&str>, Option<&str>, ProviderValue, AnalysisPhase)] = &[
            (success, None, ProviderValue::Scalar(0.01), Successful),
            (success, None, ProviderValue::Scalar(0.2), Failed),
            (None, failure, ProviderValue::Scalar(0.2), Failed),
            (None, failure, ProviderValue::Scalar(0.01), Successful),
            (success, failure, ProviderValue::Scalar(0.01), Successful),
            (success, failure, ProviderValue::Scalar(0.2), Failed),
            (success, failure, ProviderValue::Scalar(0.07), Inconclusive),
            (success, None, series(&[0.01]), Successful),
            (success, None, series(&[]), Inconclusive),
            (success, failure, series(&[]), Inconclusive),
            (success, None, series(&[0.01, 0.01]), Inconclusive),
            (None, failure, series(&[0.5, 0.5]), Inconclusive),
            (success, None, ProviderValue::Scalar(f64::NAN), Inconclusive),
            (None, failure, ProviderValue::Scalar(f64::NAN), Inconclusive),
            (success, failure, series(&[f64::NAN]), Inconclusive),
            (
                success,
                None,
                ProviderValue::Scalar(f64::INFINITY),
                Inconclusive,
            ),
            (
                Some("result > 0.0"),
                None,
                ProviderValue::Scalar(f64::INFINITY),
                Inconclusive,
            ),
            (None, failure, ProviderValue::Scalar(f64::INFINITY), Failed),
            (
                None,
                Some("result < 0.0"),
                ProviderValue::Scalar(f64::NEG_INFINITY),
                Failed,
            ),
            (
                None,
                failure,
                ProviderValue::Scalar(f64::NEG_INFINITY),
                Inconclusive,
            ),
            (
                Some("result + 1.0"),
                None,
                ProviderValue::Scalar(1.0),
                Error,
            ),
        ];
        for (success, failure, value, expected) in table {
            let conditions = Conditions::compile(*success, *failure).unwrap();
            let got = judge(value, &conditions);
            assert_eq!(
                got.phase, *expected,
                "{success:?} {failure:?} {value:?}: {got:?}"
            );
        }
    }

    #[test]
    fn nothing_but_one_finite_value_is_ever_successful() {
        let lenient = Conditions::compile(Some("result == result || true"), None).unwrap();
        for value in [
            series(&[]),
            series(&[1.0, 2.0]),
            ProviderValue::Scalar(f64::NAN),
            ProviderValue::Scalar(f64::INFINITY),
            ProviderValue::Scalar(f64::NEG_INFINITY),
        ] {
            assert_ne!(
                judge(&value, &lenient).phase,
                AnalysisPhase::Successful,
                "{value:?}"
            );
        }
    }

    #[test]
    fn values_and_messages_are_recorded_as_text() {
        let conditions = Conditions::compile(Some("result < 0.05"), None).unwrap();
        let got = judge(&ProviderValue::Scalar(0.2), &conditions);
        assert_eq!(got.value.as_deref(), Some("0.2"));
        assert_eq!(
            got.message.as_deref(),
            Some(r#"value 0.2 failed condition "result < 0.05""#)
        );
        assert_eq!(
            judge(&series(&[]), &conditions).value.as_deref(),
            Some("[]")
        );
        assert_eq!(
            judge(&series(&[0.1, 0.3]), &conditions).value.as_deref(),
            Some("[0.1, 0.3]")
        );
        assert_eq!(
            judge(&ProviderValue::Scalar(f64::INFINITY), &conditions)
                .value
                .as_deref(),
            Some("+Inf")
        );
        assert_eq!(format_value(0.19999999999999998), "0.2");
        assert_eq!(format_value(1.5e-7), "0.00000015");
        assert_eq!(format_value(2.485), "2.485");
    }

    fn measurement(phase: AnalysisPhase, message: &str) -> Measurement {
        Measurement {
            phase,
            value: Some("0.2".into()),
            started_at: Time(Timestamp::UNIX_EPOCH),
            finished_at: None,
            message: Some(message.to_string()),
            metadata: BTreeMap::new(),
        }
    }

    fn limits(failure: i32, inconclusive: i32, errors: i32, count: Option<i32>) -> MetricLimits {
        MetricLimits {
            failure_limit: failure,
            inconclusive_limit: inconclusive,
            consecutive_error_limit: errors,
            count,
        }
    }

    fn result_after(phases: &[AnalysisPhase]) -> MetricResult {
        let mut result = MetricResult {
            name: "error-rate".into(),
            ..Default::default()
        };
        for phase in phases {
            record(
                &mut result,
                measurement(*phase, &format!("{} measurement", phase.as_str())),
            );
        }
        result
    }

    #[test]
    fn metric_phase_table() {
        use AnalysisPhase::*;
        let table: &[(&[AnalysisPhase], MetricLimits, AnalysisPhase)] = &[
            (&[], limits(0, 0, 4, Some(3)), Pending),
            (&[Successful], limits(0, 0, 4, Some(3)), Running),
            (
                &[Successful, Successful, Successful],
                limits(0, 0, 4, Some(3)),
                Successful,
            ),
            (&[Failed], limits(0, 0, 4, Some(3)), Failed),
            (&[Failed], limits(1, 0, 4, Some(3)), Running),
            (
                &[Failed, Successful, Failed],
                limits(1, 0, 4, Some(3)),
                Failed,
            ),
            (&[Inconclusive], limits(0, 0, 4, Some(3)), Inconclusive),
            (&[Inconclusive], limits(0, 1, 4, Some(3)), Running),
            (&[Error, Error], limits(0, 0, 1, None), Error),
            (&[Error], limits(0, 0, 1, None), Running),
            // Errors must be consecutive: a good measurement in between resets the streak.
            (&[Error, Successful, Error], limits(0, 0, 1, None), Running),
            (&[Successful; 12], limits(0, 0, 4, None), Running),
            // Failure beats inconclusive and error when several limits are passed.
            (&[Inconclusive, Failed], limits(0, 0, 4, None), Failed),
            // Errors never count toward `count`: a metric measured once that errored measures again...
            (&[Error], limits(0, 0, 4, Some(1)), Running),
            (&[Error, Error, Error], limits(0, 0, 4, Some(3)), Running),
            (
                &[Successful, Error, Error],
                limits(0, 0, 4, Some(3)),
                Running,
            ),
            (&[Error, Successful], limits(0, 0, 4, Some(1)), Successful),
            (
                &[Successful, Error, Successful, Error, Successful],
                limits(0, 0, 4, Some(3)),
                Successful,
            ),
            // ...until it has its count or passes consecutiveErrorLimit, whatever the count.
            (&[Error; 5], limits(0, 0, 4, Some(1)), Error),
            (&[Error; 4], limits(0, 0, 4, Some(1)), Running),
            (&[Error; 5], limits(0, 0, 4, Some(3)), Error),
            (
                &[Successful, Error, Error, Error],
                limits(0, 0, 2, Some(3)),
                Error,
            ),
            // A count of answers within the limits but without one success is never Successful.
            (&[Failed], limits(1, 0, 4, Some(1)), Failed),
            (&[Inconclusive], limits(0, 1, 4, Some(1)), Inconclusive),
            (
                &[Failed, Inconclusive, Failed],
                limits(2, 1, 4, Some(3)),
                Failed,
            ),
            (
                &[Inconclusive, Error, Inconclusive],
                limits(0, 2, 4, Some(2)),
                Inconclusive,
            ),
            // One success with tolerated failures is what failureLimit is for.
            (&[Failed, Successful], limits(1, 0, 4, Some(2)), Successful),
        ];
        for (phases, limits, expected) in table {
            let (phase, _) = metric_phase(&result_after(phases), limits);
            assert_eq!(phase, *expected, "{phases:?} {limits:?}");
        }
    }

    #[test]
    fn failed_metric_message_names_metric_value_condition_and_counts() {
        use AnalysisPhase::*;
        let mut result = MetricResult {
            name: "error-rate".into(),
            ..Default::default()
        };
        record(
            &mut result,
            measurement(Failed, r#"value 0.1 failed condition "result < 0.05""#),
        );
        record(&mut result, measurement(Successful, "fine"));
        record(
            &mut result,
            measurement(Failed, r#"value 0.2 failed condition "result < 0.05""#),
        );
        let (phase, message) = metric_phase(&result, &limits(1, 0, 4, Some(5)));
        assert_eq!(phase, Failed);
        assert_eq!(
            message.as_deref(),
            Some(
                r#"metric "error-rate": value 0.2 failed condition "result < 0.05" (2 of 3 measurements failed, limit 1)"#
            )
        );
    }

    #[test]
    fn history_is_bounded_but_counts_are_not() {
        let result = result_after(&[AnalysisPhase::Successful; 25]);
        assert_eq!(result.count, 25);
        assert_eq!(result.successful, 25);
        assert_eq!(result.measurements.len(), MEASUREMENT_HISTORY_LIMIT);
    }

    /// A metric's result in `phase`, with one measurement of that phase (a Successful metric had one
    /// success; Pending and Running ones had `successes` successes so far).
    fn metric(name: &str, phase: AnalysisPhase, dry_run: bool) -> MetricResult {
        metric_with(name, phase, dry_run, 1)
    }

    fn metric_with(
        name: &str,
        phase: AnalysisPhase,
        dry_run: bool,
        successes: i32,
    ) -> MetricResult {
        let mut result = MetricResult {
            name: name.into(),
            phase,
            dry_run,
            message: Some(format!("metric {name:?} is {}", phase.as_str())),
            ..Default::default()
        };
        match phase {
            AnalysisPhase::Successful | AnalysisPhase::Pending | AnalysisPhase::Running => {
                result.successful = successes
            }
            AnalysisPhase::Failed => result.failed = 1,
            AnalysisPhase::Inconclusive => result.inconclusive = 1,
            AnalysisPhase::Error => result.error = 1,
        }
        result.count = result.successful + result.failed + result.inconclusive + result.error;
        result
    }

    #[test]
    fn run_phase_is_the_worst_non_dry_run_metric() {
        use AnalysisPhase::*;
        // (phase, dry-run, successful measurements) per metric; terminated; the run's phase.
        type Case<'a> = (&'a [(AnalysisPhase, bool, i32)], bool, AnalysisPhase);
        let table: &[Case<'_>] = &[
            (
                &[(Successful, false, 1), (Successful, false, 3)],
                false,
                Successful,
            ),
            (
                &[(Successful, false, 1), (Running, false, 0)],
                false,
                Running,
            ),
            (
                &[(Running, false, 1), (Inconclusive, false, 0)],
                false,
                Inconclusive,
            ),
            (&[(Inconclusive, false, 0), (Error, false, 0)], false, Error),
            (&[(Error, false, 0), (Failed, false, 0)], false, Failed),
            (
                &[(Successful, false, 1), (Failed, true, 0)],
                false,
                Successful,
            ),
            (
                &[(Successful, false, 1), (Error, true, 0)],
                false,
                Successful,
            ),
            (&[(Running, true, 0)], false, Running),
            // Only dry-run metrics: the run passes only if something was measured healthy.
            (&[(Failed, true, 0)], false, Inconclusive),
            (
                &[(Error, true, 0), (Successful, true, 2)],
                false,
                Successful,
            ),
            // Argo's rule: a terminated run with nothing wrong is Successful...
            (
                &[(Running, false, 2), (Successful, false, 1)],
                true,
                Successful,
            ),
            (&[(Running, false, 1), (Failed, false, 0)], true, Failed),
            // ...but only if each metric had a success before the terminate.
            (&[(Running, false, 0)], true, Inconclusive),
            (
                &[(Pending, false, 0), (Successful, false, 1)],
                true,
                Inconclusive,
            ),
            (&[(Pending, false, 0)], false, Running),
            // A status claiming success without one Successful measurement is not believed.
            (&[(Successful, false, 0)], false, Inconclusive),
            (&[], false, Inconclusive),
        ];
        for (metrics, terminated, expected) in table {
            let results: Vec<MetricResult> = metrics
                .iter()
                .enumerate()
                .map(|(i, (phase, dry, successes))| {
                    metric_with(&format!("m{i}"), *phase, *dry, *successes)
                })
                .collect();
            let (phase, _) = run_phase(&results, *terminated);
            assert_eq!(phase, *expected, "{metrics:?} terminated={terminated}");
        }
    }

    #[test]
    fn run_message_is_the_failing_metrics_and_mentions_dry_run_failures() {
        use AnalysisPhase::*;
        let (_, message) = run_phase(
            &[
                metric("a", Successful, false),
                metric("b", Failed, false),
                metric("c", Failed, true),
            ],
            false,
        );
        assert_eq!(
            message.as_deref(),
            Some(r#"metric "b" is Failed; dry-run metric "c" is Failed"#)
        );
    }

    #[test]
    fn limits_default_and_reject_bad_counts() {
        let mut m = Metric {
            name: "m".into(),
            ..Default::default()
        };
        assert_eq!(MetricLimits::of(&m).unwrap(), limits(0, 0, 4, Some(1)));
        m.interval = Some(ManifestDuration::from_secs(30));
        assert_eq!(MetricLimits::of(&m).unwrap().count, None);
        m.count = Some(IntOrString::String("3".into()));
        assert_eq!(MetricLimits::of(&m).unwrap().count, Some(3));
        for bad in [
            IntOrString::Int(0),
            IntOrString::Int(-1),
            IntOrString::String("x".into()),
        ] {
            m.count = Some(bad);
            assert_eq!(
                MetricLimits::of(&m).unwrap_err().category(),
                "invalid_count"
            );
        }
    }

    /// The run as the runner sees it after recording `phases` for one metric.
    fn run_after(
        phases: &[AnalysisPhase],
        limits: &MetricLimits,
    ) -> (AnalysisPhase, Option<String>) {
        let mut result = result_after(phases);
        let (phase, message) = metric_phase(&result, limits);
        result.phase = phase;
        result.message = message;
        run_phase(&[result], false)
    }

    #[test]
    fn an_unreachable_provider_never_makes_a_successful_run() {
        use AnalysisPhase::*;
        // `successCondition: result > 0`, no interval, no count: measured once, and an error is no measurement.
        let once = limits(0, 0, DEFAULT_CONSECUTIVE_ERROR_LIMIT, Some(1));
        for errors in 1..=4 {
            let (phase, message) = run_after(&vec![Error; errors], &once);
            assert_eq!(phase, Running, "{errors} errors: {message:?}");
        }
        let (phase, message) = run_after(&[Error; 5], &once);
        assert_eq!(phase, Error);
        let message = message.unwrap_or_default();
        assert!(
            message.starts_with(r#"metric "error-rate": 5 errors in a row, limit 4; last: "#),
            "{message}"
        );
        // `count: 3, interval: 1s`: three errors are not three measurements.
        let three = limits(0, 0, DEFAULT_CONSECUTIVE_ERROR_LIMIT, Some(3));
        assert_eq!(run_after(&[Error; 3], &three).0, Running);
        assert_eq!(run_after(&[Error; 5], &three).0, Error);
        // Prometheus answered once, then went away.
        assert_eq!(run_after(&[Successful, Error, Error], &three).0, Running);
        assert_eq!(
            run_after(&[Successful, Error, Error, Error, Error, Error], &three).0,
            Error
        );
    }

    #[test]
    fn count_reached_messages_say_what_was_counted() {
        use AnalysisPhase::*;
        let (phase, message) = metric_phase(
            &result_after(&[Successful, Error, Successful, Successful]),
            &limits(0, 0, 4, Some(3)),
        );
        assert_eq!(phase, Successful);
        assert_eq!(
            message.as_deref(),
            Some(r#"metric "error-rate": 3 of 3 measurements successful; 1 errors not counted"#)
        );
        let (phase, message) = metric_phase(
            &result_after(&[Failed, Error, Inconclusive]),
            &limits(1, 1, 4, Some(2)),
        );
        assert_eq!(phase, Failed);
        assert_eq!(
            message.as_deref(),
            Some(
                r#"metric "error-rate": no successful measurement in 2 (1 failed, 1 inconclusive; 1 errors not counted); last: Failed measurement"#
            )
        );
    }

    #[test]
    fn terminated_run_without_a_success_is_inconclusive_and_says_why() {
        let mut errored = result_after(&[AnalysisPhase::Error, AnalysisPhase::Error]);
        errored.phase = AnalysisPhase::Running;
        let (phase, message) = run_phase(&[errored], true);
        assert_eq!(phase, AnalysisPhase::Inconclusive);
        assert_eq!(
            message.as_deref(),
            Some(
                r#"metric "error-rate": terminated without a successful measurement (2 measurements: 0 failed, 0 inconclusive, 2 errors)"#
            )
        );
    }

    #[test]
    fn terminated_run_whose_provider_stopped_answering_after_a_success_is_inconclusive() {
        use AnalysisPhase::*;
        let mut stale = result_after(&[Successful, Error, Error]);
        stale.phase = Running;
        let (phase, message) = run_phase(&[stale], true);
        assert_eq!(phase, Inconclusive);
        assert_eq!(
            message.as_deref(),
            Some(
                r#"metric "error-rate": terminated after 2 errors in a row since its last successful measurement"#
            )
        );
        let mut fresh = result_after(&[Error, Successful]);
        fresh.phase = Running;
        assert_eq!(run_phase(&[fresh], true).0, Successful);
    }

    fn any_phase() -> impl proptest::strategy::Strategy<Value = AnalysisPhase> {
        proptest::sample::select(vec![
            AnalysisPhase::Pending,
            AnalysisPhase::Running,
            AnalysisPhase::Successful,
            AnalysisPhase::Failed,
            AnalysisPhase::Inconclusive,
            AnalysisPhase::Error,
        ])
    }

    fn unsuccessful_measurement() -> impl proptest::strategy::Strategy<Value = AnalysisPhase> {
        proptest::sample::select(vec![
            AnalysisPhase::Failed,
            AnalysisPhase::Inconclusive,
            AnalysisPhase::Error,
        ])
    }

    fn any_limits() -> impl proptest::strategy::Strategy<Value = MetricLimits> {
        use proptest::prelude::*;
        (0..6i32, 0..6i32, 0..6i32, proptest::option::of(1..8i32)).prop_map(
            |(failure, inconclusive, errors, count)| limits(failure, inconclusive, errors, count),
        )
    }

    proptest::proptest! {
        /// Safety rule 10 for one metric: after any prefix of measurements none of which succeeded, whatever
        /// the limits and the count, the metric is not Successful.
        #[test]
        fn a_metric_with_zero_successful_measurements_is_never_successful(
            phases in proptest::collection::vec(unsuccessful_measurement(), 0..30),
            limits in any_limits(),
        ) {
            for end in 0..=phases.len() {
                let (phase, message) = metric_phase(&result_after(&phases[..end]), &limits);
                proptest::prop_assert_ne!(phase, AnalysisPhase::Successful, "{:?} {:?}", &phases[..end], message);
            }
        }

        /// A metric that only errors is Error exactly once it passes consecutiveErrorLimit, and until then
        /// it is still measuring (errors never complete its count).
        #[test]
        fn a_metric_that_only_errors_ends_in_error_after_the_limit(
            errors in 0..20usize,
            limits in any_limits(),
        ) {
            let (phase, _) = metric_phase(&result_after(&vec![AnalysisPhase::Error; errors]), &limits);
            let expected = if errors == 0 {
                AnalysisPhase::Pending
            } else if errors as i32 > limits.consecutive_error_limit {
                AnalysisPhase::Error
            } else {
                AnalysisPhase::Running
            };
            proptest::prop_assert_eq!(phase, expected);
        }

        /// Successful means: `count` answered measurements, at least one of them Successful, none of the
        /// limits passed.
        #[test]
        fn a_successful_metric_had_its_count_and_a_success(
            phases in proptest::collection::vec(
                proptest::sample::select(vec![
                    AnalysisPhase::Successful,
                    AnalysisPhase::Failed,
                    AnalysisPhase::Inconclusive,
                    AnalysisPhase::Error,
                ]),
                0..30,
            ),
            limits in any_limits(),
        ) {
            let result = result_after(&phases);
            if metric_phase(&result, &limits).0 == AnalysisPhase::Successful {
                proptest::prop_assert!(result.successful >= 1);
                proptest::prop_assert!(limits.count.is_some_and(|c| counted(&result) >= c));
                proptest::prop_assert!(result.failed <= limits.failure_limit);
                proptest::prop_assert!(result.inconclusive <= limits.inconclusive_limit);
                proptest::prop_assert!(result.consecutive_error <= limits.consecutive_error_limit);
            }
        }

        /// Safety rule 10 for a run: whatever its metrics claim (any phase, dry-run or not, terminated or
        /// not), a run with zero successful measurements is never Successful.
        #[test]
        fn a_run_with_zero_successful_measurements_is_never_successful(
            metrics in proptest::collection::vec(
                (any_phase(), proptest::bool::ANY, 0..5i32, 0..5i32, 0..5i32),
                0..5,
            ),
            terminated in proptest::bool::ANY,
        ) {
            let results: Vec<MetricResult> = metrics
                .iter()
                .enumerate()
                .map(|(i, (phase, dry_run, failed, inconclusive, error))| MetricResult {
                    name: format!("m{i}"),
                    phase: *phase,
                    dry_run: *dry_run,
                    count: failed + inconclusive + error,
                    failed: *failed,
                    inconclusive: *inconclusive,
                    error: *error,
                    consecutive_error: *error,
                    message: Some(format!("metric m{i} is {}", phase.as_str())),
                    ..Default::default()
                })
                .collect();
            let (phase, message) = run_phase(&results, terminated);
            proptest::prop_assert_ne!(phase, AnalysisPhase::Successful, "{:?} {:?}", metrics, message);
            if let Some(message) = message {
                proptest::prop_assert!(!message.contains("metrics successful"), "{}", message);
            }
        }

        /// The same through the runner's own bookkeeping: measurements recorded one by one, the metric's phase
        /// computed from them, the run's from the metric.
        #[test]
        fn recorded_runs_without_a_success_are_never_successful(
            per_metric in proptest::collection::vec(
                (proptest::collection::vec(unsuccessful_measurement(), 0..12), any_limits()),
                1..4,
            ),
            terminated in proptest::bool::ANY,
        ) {
            let results: Vec<MetricResult> = per_metric
                .iter()
                .map(|(phases, limits)| {
                    let mut result = result_after(phases);
                    let (phase, message) = metric_phase(&result, limits);
                    result.phase = phase;
                    result.message = message;
                    result
                })
                .collect();
            let (phase, message) = run_phase(&results, terminated);
            proptest::prop_assert_ne!(phase, AnalysisPhase::Successful, "{:?}", message);
        }
    }
}
