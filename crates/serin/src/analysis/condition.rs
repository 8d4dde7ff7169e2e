//! Decides whether a measured value meets a metric's `successCondition` / `failureCondition`, written in CEL
//! (the `cel` crate, the same language Kubernetes uses for validation rules) over one variable, `result`, a
//! double.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Why a condition cannot be used or evaluated.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConditionError {
    #[error("condition {condition:?} does not parse: {reason}")]
    DoesNotParse { condition: String, reason: String },
    #[error("condition {condition:?} is empty")]
    Empty { condition: String },
    #[error("condition {condition:?} could not be evaluated: {reason}")]
    Evaluation { condition: String, reason: String },
    #[error("condition {condition:?} gave {value}, not true or false")]
    NotBoolean { condition: String, value: String },
}

impl ConditionError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ConditionError::DoesNotParse { .. } => "does_not_parse",
            ConditionError::Empty { .. } => "empty",
            ConditionError::Evaluation { .. } => "evaluation",
            ConditionError::NotBoolean { .. } => "not_boolean",
        }
    }
}

/// The name of the variable conditions are written over.
pub const RESULT_VARIABLE: &str = "result";

/// A compiled condition, with its source kept for messages.
pub struct Condition {
    source: String,
    program: cel::Program,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl Condition {
    /// Compiles a condition once, so that a run with a broken condition fails before it measures anything.
    pub fn compile(source: &str) -> Result<Self, ConditionError> {
        let trimmed = source.trim();
        if trimmed.is_empty() {
            return Err(ConditionError::Empty {
                condition: source.to_string(),
            });
        }
        // The cel parser is recursive; a hostile condition could be deep enough to exhaust the stack.
        if trimmed.len() > MAX_CONDITION_LEN {
            return Err(ConditionError::DoesNotParse {
                condition: source.to_string(),
                reason: format!("longer than {MAX_CONDITION_LEN} characters"),
            });
        }
        let program =
            cel::Program::compile(trimmed).map_err(|errors| ConditionError::DoesNotParse {
                condition: source.to_string(),
                reason: errors.to_string().trim().to_string(),
            })?;
        Ok(Condition {
            source: trimmed.to_string(),
            program,
        })
    }

    /// The condition as the user wrote it (trimmed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the condition with `result` bound to the value.
    pub fn evaluate(&self, result: f64) -> Result<bool, ConditionError> {
        let mut context = cel::Context::default();
        context.add_variable_from_value(RESULT_VARIABLE, cel::Value::Float(result));
        match self.program.execute(&context) {
            Ok(cel::Value::Bool(outcome)) => Ok(outcome),
            Ok(other) => Err(ConditionError::NotBoolean {
                condition: self.source.clone(),
                value: format!("{other:?}"),
            }),
            Err(error) => Err(ConditionError::Evaluation {
                condition: self.source.clone(),
                reason: error.to_string(),
            }),
        }
    }
}

const MAX_CONDITION_LEN: usize = 1024;

/// A metric's two conditions, compiled.
#[derive(Debug)]
pub struct Conditions {
    pub success: Option<Condition>,
    pub failure: Option<Condition>,
}

impl Conditions {
    /// Compiles both conditions. A metric needs at least one of them: without either, no measurement could
    /// ever be judged, and guessing "success" would promote blindly.
    pub fn compile(success: Option<&str>, failure: Option<&str>) -> Result<Self, ConditionError> {
        if success.is_none() && failure.is_none() {
            return Err(ConditionError::Empty {
                condition: String::new(),
            });
        }
        Ok(Conditions {
            success: success.map(Condition::compile).transpose()?,
            failure: failure.map(Condition::compile).transpose()?,
        })
    }
}

/// Compiled conditions shared by every pass over every run, so each distinct condition is compiled once
/// rather than at each measurement.
#[derive(Clone, Debug, Default)]
pub struct ConditionCache {
    compiled: Arc<Mutex<HashMap<ConditionSources, Arc<Conditions>>>>,
}

/// The success and failure condition as written.
type ConditionSources = (Option<String>, Option<String>);

/// Distinct condition pairs kept; past it the cache starts over (templates rarely have that many).
const CACHE_LIMIT: usize = 4096;

impl ConditionCache {
    /// The compiled pair, compiling it on first use. Errors are not cached: a run with a broken condition
    /// ends at its first pass.
    pub fn get_or_compile(
        &self,
        success: Option<&str>,
        failure: Option<&str>,
    ) -> Result<Arc<Conditions>, ConditionError> {
        let key = (success.map(str::to_string), failure.map(str::to_string));
        // Poisoning only means a panic elsewhere while holding the lock; the map is still consistent.
        if let Some(found) = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(found.clone());
        }
        let compiled = Arc::new(Conditions::compile(success, failure)?);
        let mut map = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(key, compiled.clone());
        Ok(compiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_evaluate_over_result_as_a_double() {
        let table: &[(&str, f64, bool)] = &[
            ("result < 0.01", 0.005, true),
            ("result < 0.01", 0.2, false),
            ("result <= 0.5", 0.5, true),
            ("result >= 0.05", 0.2, true),
            ("result > 0.1 || result < 0.0", -1.0, true),
            ("result == 0.0", 0.0, true),
            ("result > 0.5", f64::INFINITY, true),
        ];
        for (source, value, expected) in table {
            let condition = Condition::compile(source).unwrap();
            assert_eq!(
                condition.evaluate(*value).unwrap(),
                *expected,
                "{source} with {value}"
            );
        }
    }

    #[test]
    fn nan_never_satisfies_a_condition() {
        // cel refuses to order NaN; either outcome other than `true` is safe, the verdict never asks.
        for source in ["result < 0.01", "result > 0.01", "result != 0.5"] {
            let outcome = Condition::compile(source).unwrap().evaluate(f64::NAN);
            assert!(
                outcome != Ok(true) || source.contains("!="),
                "{source}: {outcome:?}"
            );
        }
    }

    #[test]
    fn integer_literals_compare_with_a_double_result() {
        // Users write `result < 1`; CEL's heterogeneous numeric comparison must make that work.
        let condition = Condition::compile("result < 1").unwrap();
        assert_eq!(condition.evaluate(0.5), Ok(true));
        assert_eq!(condition.evaluate(2.0), Ok(false));
    }

    #[test]
    fn unparsable_conditions_are_rejected_with_the_condition_in_the_message() {
        for source in ["result <", "result < < 1", "(result", "result ==="] {
            let err = Condition::compile(source).unwrap_err();
            assert_eq!(err.category(), "does_not_parse", "{source}");
            assert!(
                err.to_string()
                    .starts_with(&format!("condition {source:?} does not parse: ")),
                "{err}"
            );
        }
        assert_eq!(Condition::compile("  ").unwrap_err().category(), "empty");
    }

    #[test]
    fn non_boolean_and_unknown_variables_are_evaluation_errors() {
        let err = Condition::compile("result + 1.0")
            .unwrap()
            .evaluate(1.0)
            .unwrap_err();
        assert_eq!(err.category(), "not_boolean");
        let err = Condition::compile("value < 1.0")
            .unwrap()
            .evaluate(1.0)
            .unwrap_err();
        assert_eq!(err.category(), "evaluation");
    }

    #[test]
    fn a_metric_needs_at_least_one_condition() {
        assert!(Conditions::compile(None, None).is_err());
        let both = Conditions::compile(Some("result < 1.0"), Some("result > 2.0")).unwrap();
        assert!(both.success.is_some() && both.failure.is_some());
    }

    #[test]
    fn the_cache_compiles_each_pair_once() {
        let cache = ConditionCache::default();
        let first = cache.get_or_compile(Some("result < 1.0"), None).unwrap();
        let again = cache.get_or_compile(Some("result < 1.0"), None).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = cache
            .get_or_compile(Some("result < 1.0"), Some("result > 2.0"))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(cache.get_or_compile(Some("result <"), None).is_err());
    }
}
