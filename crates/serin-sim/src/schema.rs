//! Decides what a kube-apiserver decides about a custom resource against its CRD's structural
//! `openAPIV3Schema`: pruning of unknown fields, defaulting, OpenAPI validation and CEL
//! `x-kubernetes-validations`; and whether a CRD's schema is structural enough to be accepted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cel::common::types::CelOptional;
use cel::common::value::Val;
use cel::{Context, Env, ExecutionError, Program};
use serde_json::{Map, Value};

/// One validation failure, shaped like a Kubernetes `StatusCause`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.rules[0].backendRefs[1].weight`
    pub path: String,
    /// The StatusCause type: FieldValueRequired, FieldValueInvalid, FieldValueNotSupported,
    /// FieldValueTypeInvalid, FieldValueTooLong, FieldValueTooMany, FieldValueForbidden, FieldValueDuplicate.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationOutcome {
    pub errors: Vec<FieldError>,
    /// Dotted paths of removed unknown fields (for `fieldValidation=Strict`).
    pub pruned_fields: Vec<String>,
}

/// Why a CEL rule was not enforced.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum CelRuleError {
    #[error("rule does not compile: {0}")]
    CompileFailed(String),
    #[error("rule uses something the interpreter lacks: {0}")]
    UnsupportedFunction(String),
    #[error("rule evaluation failed: {0}")]
    EvaluationFailed(String),
    #[error("rule returned {0}, not a boolean")]
    NotBoolean(String),
}

impl CelRuleError {
    pub fn category(&self) -> &'static str {
        match self {
            CelRuleError::CompileFailed(_) => "compile_failed",
            CelRuleError::UnsupportedFunction(_) => "unsupported_function",
            CelRuleError::EvaluationFailed(_) => "evaluation_failed",
            CelRuleError::NotBoolean(_) => "not_boolean",
        }
    }
}

/// A CEL rule that was skipped (never rejects an object), for a debug log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedRule {
    pub path: String,
    pub rule: String,
    pub error: CelRuleError,
}

/// What happened to CEL rules in one validation: how many ran to a verdict, and which were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CelTrace {
    pub evaluated: usize,
    /// Distinct rule texts that ran to a verdict.
    pub rules_run: std::collections::BTreeSet<String>,
    pub skipped: Vec<SkippedRule>,
}

pub const REQUIRED: &str = "FieldValueRequired";
pub const INVALID: &str = "FieldValueInvalid";
pub const NOT_SUPPORTED: &str = "FieldValueNotSupported";
pub const TYPE_INVALID: &str = "FieldValueTypeInvalid";
pub const TOO_LONG: &str = "FieldValueTooLong";
pub const TOO_MANY: &str = "FieldValueTooMany";
pub const FORBIDDEN: &str = "FieldValueForbidden";
pub const DUPLICATE: &str = "FieldValueDuplicate";

/// Prunes, defaults and validates `object` (a custom resource) against one version's
/// `openAPIV3Schema`. `old` is the stored object on update (for CEL transition rules).
pub fn validate_and_prune(
    schema: &Value,
    object: &mut Value,
    old: Option<&Value>,
) -> ValidationOutcome {
    validate_and_prune_traced(schema, object, old).0
}

/// [`validate_and_prune`], also reporting which CEL rules ran and which were skipped.
pub fn validate_and_prune_traced(
    schema: &Value,
    object: &mut Value,
    old: Option<&Value>,
) -> (ValidationOutcome, CelTrace) {
    let mut outcome = ValidationOutcome::default();
    prune(schema, object, "", true, &mut outcome.pruned_fields);
    apply_defaults(schema, object, true);
    // Defaults may carry unknown fields of their own; real servers prune after defaulting too.
    prune(schema, object, "", true, &mut outcome.pruned_fields);
    let mut validator = Validator {
        errors: Vec::new(),
        trace: CelTrace::default(),
        run_cel: true,
    };
    validator.validate(schema, object, old, "", true);
    outcome.errors = validator.errors;
    (outcome, validator.trace)
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

fn child_path(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn index_path(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

fn key_path(path: &str, key: &str) -> String {
    format!("{path}[{key}]")
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

fn schema_type(schema: &Value) -> Option<&str> {
    schema.get("type").and_then(Value::as_str)
}

fn is_root_meta_field(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

// ---------------------------------------------------------------------------------------------
// Pruning and defaulting
// ---------------------------------------------------------------------------------------------

fn prune(
    schema: &Value,
    value: &mut Value,
    path: &str,
    keeps_type_meta: bool,
    pruned: &mut Vec<String>,
) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = flag(schema, "x-kubernetes-embedded-resource");
            let mut unknown = Vec::new();
            let mut dropped_nulls = Vec::new();
            for (key, child) in map.iter_mut() {
                let child_at = child_path(path, key);
                if (keeps_type_meta || embedded) && is_root_meta_field(key) {
                    continue;
                }
                let known = properties
                    .and_then(|p| p.get(key))
                    .or_else(|| additional.filter(|a| a.is_object()));
                match known {
                    // Like kube-apiserver: a null the schema does not allow and cannot default
                    // is dropped silently (clients serialising `None` as null are common).
                    Some(child_schema)
                        if child.is_null()
                            && !flag(child_schema, "nullable")
                            && child_schema.get("default").is_none() =>
                    {
                        dropped_nulls.push(key.clone());
                    }
                    Some(_) if child.is_null() => {}
                    Some(child_schema) => prune(child_schema, child, &child_at, false, pruned),
                    None if !(preserve || additional == Some(&Value::Bool(true))) => {
                        unknown.push(key.clone());
                    }
                    None => {}
                }
            }
            for key in dropped_nulls {
                map.remove(&key);
            }
            for key in unknown {
                map.remove(&key);
                pruned.push(child_path(path, &key));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &index_path(path, i), false, pruned);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(schema: &Value, value: &mut Value, is_root: bool) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (key, child_schema) in properties {
                    if is_root && key == "metadata" {
                        continue;
                    }
                    let Some(default) = child_schema.get("default") else {
                        continue;
                    };
                    let nullable = flag(child_schema, "nullable");
                    match map.get(key) {
                        None => {
                            map.insert(key.clone(), default.clone());
                        }
                        Some(Value::Null) if !nullable => {
                            map.insert(key.clone(), default.clone());
                        }
                        Some(_) => {}
                    }
                }
                for (key, child) in map.iter_mut() {
                    if is_root && key == "metadata" {
                        continue;
                    }
                    if let Some(child_schema) = properties.get(key) {
                        apply_defaults(child_schema, child, false);
                    }
                }
            } else if let Some(additional) =
                schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for child in map.values_mut() {
                    apply_defaults(additional, child, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for item in items.iter_mut() {
                    apply_defaults(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// How kube-apiserver shows a value in `Invalid value: ...`.
fn shown(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn is_integral(value: &Value) -> bool {
    match value {
        Value::Number(n) => {
            n.is_i64()
                || n.is_u64()
                || n.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
        }
        _ => false,
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "number" => value.is_number(),
        "integer" => is_integral(value),
        _ => true,
    }
}

struct Validator {
    errors: Vec<FieldError>,
    trace: CelTrace,
    run_cel: bool,
}

impl Validator {
    fn push(&mut self, path: &str, reason: &'static str, message: String) {
        self.errors.push(FieldError {
            path: path.to_string(),
            reason,
            message,
        });
    }

    fn invalid(&mut self, path: &str, value: &Value, detail: String) {
        let message = format!("Invalid value: {}: {detail}", shown(value));
        self.push(path, INVALID, message);
    }

    fn type_invalid(&mut self, path: &str, value: &Value, expected: &str) {
        let actual = type_name(value);
        let message = format!(
            "Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""
        );
        self.push(path, TYPE_INVALID, message);
    }

    fn validate(
        &mut self,
        schema: &Value,
        value: &Value,
        old: Option<&Value>,
        path: &str,
        is_root: bool,
    ) {
        if !schema.is_object() {
            return;
        }
        if value.is_null() {
            if !flag(schema, "nullable") && schema_type(schema).is_some() {
                let expected = schema_type(schema).unwrap_or("object");
                self.type_invalid(path, value, expected);
            }
            return;
        }
        if flag(schema, "x-kubernetes-int-or-string") {
            if !(value.is_string() || is_integral(value)) {
                self.type_invalid(path, value, "integer-or-string");
                return;
            }
        } else if let Some(expected) = schema_type(schema) {
            if !type_matches(expected, value) {
                self.type_invalid(path, value, expected);
                return;
            }
        }

        self.check_enum(schema, value, path);
        match value {
            Value::Number(_) => self.check_number(schema, value, path),
            Value::String(s) => self.check_string(schema, value, s, path),
            Value::Array(items) => self.check_array(schema, value, items, old, path),
            Value::Object(map) => self.check_object(schema, value, map, old, path, is_root),
            _ => {}
        }
        self.check_junctors(schema, value, path);
        if self.run_cel {
            self.check_cel(schema, value, old, path);
        }
    }

    fn check_enum(&mut self, schema: &Value, value: &Value, path: &str) {
        let Some(allowed) = schema.get("enum").and_then(Value::as_array) else {
            return;
        };
        if allowed
            .iter()
            .any(|a| a == value || numbers_equal(a, value))
        {
            return;
        }
        let supported: Vec<String> = allowed.iter().map(Value::to_string).collect();
        let message = format!(
            "Unsupported value: {}: supported values: {}",
            shown(value),
            supported.join(", ")
        );
        self.push(path, NOT_SUPPORTED, message);
    }

    fn check_number(&mut self, schema: &Value, value: &Value, path: &str) {
        let Some(n) = value.as_f64() else {
            return;
        };
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if flag(schema, "exclusiveMinimum") {
                if n <= min {
                    self.invalid(
                        path,
                        value,
                        format!("{path} in body should be greater than {min}"),
                    );
                }
            } else if n < min {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should be greater than or equal to {min}"),
                );
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if flag(schema, "exclusiveMaximum") {
                if n >= max {
                    self.invalid(
                        path,
                        value,
                        format!("{path} in body should be less than {max}"),
                    );
                }
            } else if n > max {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should be less than or equal to {max}"),
                );
            }
        }
        if let Some(factor) = schema.get("multipleOf").and_then(Value::as_f64) {
            if factor > 0.0 && (n / factor).fract().abs() > 1e-9 {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should be a multiple of {factor}"),
                );
            }
        }
        match schema.get("format").and_then(Value::as_str) {
            Some("int32") if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&n) => {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must be of type int32: {value}"),
                );
            }
            Some("int64")
                if value.as_i64().is_none() && is_integral(value) && value.as_u64().is_some() =>
            {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must be of type int64: {value}"),
                );
            }
            _ => {}
        }
    }

    fn check_string(&mut self, schema: &Value, value: &Value, s: &str, path: &str) {
        let length = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if length > max {
                self.push(
                    path,
                    TOO_LONG,
                    format!("Too long: may not be more than {max} bytes"),
                );
            }
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if length < min {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should be at least {min} chars long"),
                );
            }
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            if let Some(regex) = cached_regex(pattern) {
                if !regex.is_match(s) {
                    self.invalid(
                        path,
                        value,
                        format!("{path} in body should match '{pattern}'"),
                    );
                }
            }
        }
        if let Some(format) = schema.get("format").and_then(Value::as_str) {
            if !string_format_ok(format, s) {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must be of type {format}: {value}"),
                );
            }
        }
    }

    fn check_array(
        &mut self,
        schema: &Value,
        value: &Value,
        items: &[Value],
        old: Option<&Value>,
        path: &str,
    ) {
        let count = items.len() as u64;
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
            if count > max {
                self.push(
                    path,
                    TOO_MANY,
                    format!("Too many: {count}: must have at most {max} items"),
                );
            }
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
            if count < min {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should have at least {min} items"),
                );
            }
        }
        let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
        let map_keys: Vec<&str> = schema
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .map(|k| k.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if flag(schema, "uniqueItems") || list_type == Some("set") {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    self.push(
                        &index_path(path, i),
                        DUPLICATE,
                        format!("Duplicate value: {item}"),
                    );
                }
            }
        }
        let key_of = |item: &Value| -> Option<Vec<Value>> {
            if map_keys.is_empty() {
                return None;
            }
            Some(
                map_keys
                    .iter()
                    .map(|k| item.get(*k).cloned().unwrap_or(Value::Null))
                    .collect(),
            )
        };
        if list_type == Some("map") && !map_keys.is_empty() {
            let keys: Vec<Option<Vec<Value>>> = items.iter().map(key_of).collect();
            for (i, key) in keys.iter().enumerate() {
                if key.is_some() && keys[..i].contains(key) {
                    let shown_key: Map<String, Value> = map_keys
                        .iter()
                        .map(|k| {
                            (
                                k.to_string(),
                                items[i].get(*k).cloned().unwrap_or(Value::Null),
                            )
                        })
                        .collect();
                    self.push(
                        &index_path(path, i),
                        DUPLICATE,
                        format!("Duplicate value: {}", Value::Object(shown_key)),
                    );
                }
            }
        }
        let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) else {
            return;
        };
        let old_items = old.and_then(Value::as_array);
        for (i, item) in items.iter().enumerate() {
            // Only map lists correlate items with the old object, as in Kubernetes.
            let old_item = match (list_type, old_items) {
                (Some("map"), Some(old_items)) if !map_keys.is_empty() => {
                    let key = key_of(item);
                    old_items.iter().find(|o| key_of(o) == key)
                }
                _ => None,
            };
            self.validate(item_schema, item, old_item, &index_path(path, i), false);
        }
    }

    fn check_object(
        &mut self,
        schema: &Value,
        value: &Value,
        map: &Map<String, Value>,
        old: Option<&Value>,
        path: &str,
        is_root: bool,
    ) {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if is_root && name == "metadata" {
                    continue;
                }
                if !map.contains_key(name) {
                    self.push(&child_path(path, name), REQUIRED, "Required value".into());
                }
            }
        }
        let count = map.len() as u64;
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
            if count > max {
                self.push(
                    path,
                    TOO_MANY,
                    format!("Too many: {count}: must have at most {max} items"),
                );
            }
        }
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64) {
            if count < min {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body should have at least {min} properties"),
                );
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let embedded = flag(schema, "x-kubernetes-embedded-resource");
        if embedded {
            for type_meta in ["apiVersion", "kind"] {
                let present = map
                    .get(type_meta)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty());
                if !present {
                    self.push(
                        &child_path(path, type_meta),
                        REQUIRED,
                        "Required value: must not be empty".into(),
                    );
                }
            }
        }
        for (key, child) in map {
            if (is_root || embedded) && key == "metadata" {
                continue;
            }
            let old_child = old.and_then(|o| o.get(key));
            if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                self.validate(
                    child_schema,
                    child,
                    old_child,
                    &child_path(path, key),
                    false,
                );
            } else if let Some(additional_schema) = additional.filter(|a| a.is_object()) {
                self.validate(
                    additional_schema,
                    child,
                    old_child,
                    &key_path(path, key),
                    false,
                );
            } else if additional == Some(&Value::Bool(false))
                && !(is_root && is_root_meta_field(key))
            {
                self.push(
                    &child_path(path, key),
                    FORBIDDEN,
                    "Forbidden: additional properties are not allowed".into(),
                );
            }
        }
    }

    /// `allOf`/`anyOf`/`oneOf`/`not`: validation-only sub-schemas, checked without CEL or pruning.
    fn check_junctors(&mut self, schema: &Value, value: &Value, path: &str) {
        let passes = |sub: &Value| {
            let mut scratch = Validator {
                errors: Vec::new(),
                trace: CelTrace::default(),
                run_cel: false,
            };
            scratch.validate(sub, value, None, path, false);
            scratch.errors
        };
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for sub in all {
                let errors = passes(sub);
                self.errors.extend(errors);
            }
        }
        if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
            if !any.is_empty() && !any.iter().any(|sub| passes(sub).is_empty()) {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must validate at least one schema (anyOf)"),
                );
            }
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            let valid = one.iter().filter(|sub| passes(sub).is_empty()).count();
            if !one.is_empty() && valid != 1 {
                let found = if valid == 0 { "none" } else { "more than one" };
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must validate one and only one schema (oneOf). Found {found} valid"),
                );
            }
        }
        if let Some(not) = schema.get("not") {
            if passes(not).is_empty() {
                self.invalid(
                    path,
                    value,
                    format!("{path} in body must not validate the schema (not)"),
                );
            }
        }
    }

    fn check_cel(&mut self, schema: &Value, value: &Value, old: Option<&Value>, path: &str) {
        let Some(rules) = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        else {
            return;
        };
        for rule in rules {
            let Some(source) = rule.get("rule").and_then(Value::as_str) else {
                continue;
            };
            let optional_old = flag(rule, "optionalOldSelf");
            let transition = mentions_old_self(source);
            if transition && old.is_none() && !optional_old {
                continue;
            }
            let old_binding = if transition {
                Some(if optional_old {
                    OldSelf::Optional(old)
                } else {
                    OldSelf::Plain(old)
                })
            } else {
                None
            };
            match evaluate_rule(source, value, old_binding.as_ref()) {
                Ok(true) => {
                    self.trace.evaluated += 1;
                    self.trace.rules_run.insert(source.to_string());
                }
                Ok(false) => {
                    self.trace.evaluated += 1;
                    self.trace.rules_run.insert(source.to_string());
                    let message = rule
                        .get("messageExpression")
                        .and_then(Value::as_str)
                        .and_then(|expr| evaluate_message(expr, value, old_binding.as_ref()))
                        .or_else(|| {
                            rule.get("message")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .unwrap_or_else(|| format!("failed rule: {source}"));
                    let reason = rule_reason(rule.get("reason").and_then(Value::as_str));
                    let at = match rule.get("fieldPath").and_then(Value::as_str) {
                        Some(field_path) if !field_path.is_empty() => {
                            join_field_path(path, field_path)
                        }
                        _ => path.to_string(),
                    };
                    let text = match reason {
                        FORBIDDEN => format!("Forbidden: {message}"),
                        REQUIRED => format!("Required value: {message}"),
                        DUPLICATE => format!("Duplicate value: {message}"),
                        _ => format!("Invalid value: {}: {message}", shown(value)),
                    };
                    self.push(&at, reason, text);
                }
                Err(error) => self.trace.skipped.push(SkippedRule {
                    path: path.to_string(),
                    rule: source.to_string(),
                    error,
                }),
            }
        }
    }
}

fn numbers_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => a.is_number() && b.is_number() && x == y,
        _ => false,
    }
}

fn rule_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some("FieldValueForbidden") => FORBIDDEN,
        Some("FieldValueRequired") => REQUIRED,
        Some("FieldValueDuplicate") => DUPLICATE,
        _ => INVALID,
    }
}

fn join_field_path(path: &str, field_path: &str) -> String {
    let relative = field_path.strip_prefix('.').unwrap_or(field_path);
    if path.is_empty() {
        relative.to_string()
    } else if relative.starts_with('[') {
        format!("{path}{relative}")
    } else {
        format!("{path}.{relative}")
    }
}

fn string_format_ok(format: &str, s: &str) -> bool {
    match format {
        "date-time" => s.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "uri" => {
            s.split_once(':').is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            }) || s.starts_with('/')
        }
        "uuid" => uuid::Uuid::parse_str(s).is_ok(),
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        "byte" => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(s).is_ok()
        }
        _ => true,
    }
}

thread_local! {
    static REGEX_CACHE: RefCell<HashMap<String, Option<regex::Regex>>> = RefCell::new(HashMap::new());
    static CEL_ENV: Arc<Env> = Arc::new(build_cel_env());
    static PROGRAM_CACHE: RefCell<HashMap<String, Result<Rc<Program>, CelRuleError>>> = RefCell::new(HashMap::new());
}

/// A pattern the regex crate cannot compile is not enforced (never rejects a valid object).
fn cached_regex(pattern: &str) -> Option<regex::Regex> {
    REGEX_CACHE.with(|cache| {
        cache
            .borrow_mut()
            .entry(pattern.to_string())
            .or_insert_with(|| regex::Regex::new(pattern).ok())
            .clone()
    })
}

// ---------------------------------------------------------------------------------------------
// CEL
// ---------------------------------------------------------------------------------------------

fn build_cel_env() -> Env {
    let mut env = Env::stdlib();
    // Extension registration only fails on duplicate declarations, which a fresh stdlib has none of;
    // a failure would merely leave those functions out (rules using them get skipped).
    let _ = env.add_extension(cel::extensions::strings);
    let _ = env.add_extension(cel::extensions::lists);
    let _ = env.add_extension(cel::extensions::math);
    env
}

fn mentions_old_self(rule: &str) -> bool {
    let bytes = rule.as_bytes();
    rule.match_indices("oldSelf").any(|(i, m)| {
        let before_ok = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let end = i + m.len();
        let after_ok =
            end >= bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        before_ok && after_ok
    })
}

/// Compiles a CEL rule with the interpreter Serin uses, reporting why it cannot when it cannot.
pub fn compile_rule(source: &str) -> Result<(), CelRuleError> {
    compiled(source).map(|_| ())
}

fn compiled(source: &str) -> Result<Rc<Program>, CelRuleError> {
    PROGRAM_CACHE.with(|cache| {
        cache
            .borrow_mut()
            .entry(source.to_string())
            .or_insert_with(|| {
                CEL_ENV
                    .with(|env| env.compile(source))
                    .map(Rc::new)
                    .map_err(|e| CelRuleError::CompileFailed(e.to_string()))
            })
            .clone()
    })
}

/// JSON to CEL: integers stay `int` (as Kubernetes types them from the schema), maps keyed by string.
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: HashMap<String, cel::Value> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::Map(entries.into())
        }
    }
}

enum OldSelf<'a> {
    Plain(Option<&'a Value>),
    Optional(Option<&'a Value>),
}

fn is_url(s: Arc<String>) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.contains(char::is_whitespace)
}

fn run_program(
    program: &Program,
    value: &Value,
    old: Option<&OldSelf<'_>>,
) -> Result<cel::Value, CelRuleError> {
    let env = CEL_ENV.with(Arc::clone);
    let mut context = Context::with_env(env);
    context.add_variable_from_value("self", to_cel(value));
    match old {
        Some(OldSelf::Plain(Some(old))) => context.add_variable_from_value("oldSelf", to_cel(old)),
        Some(OldSelf::Plain(None)) => {}
        Some(OldSelf::Optional(old)) => {
            let optional = match old.map(|o| Box::<dyn Val>::try_from(to_cel(o))) {
                Some(Ok(boxed)) => CelOptional::of(boxed),
                Some(Err(e)) => return Err(CelRuleError::EvaluationFailed(e.to_string())),
                None => CelOptional::none(),
            };
            context.add_variable_as_val("oldSelf", Box::new(optional));
        }
        None => {}
    }
    // `isURL` is a Kubernetes library function the interpreter lacks; it is cheap to provide.
    let _ = context.add_function("isURL", is_url);
    program.execute(&context).map_err(classify_execution_error)
}

fn classify_execution_error(error: ExecutionError) -> CelRuleError {
    match error {
        ExecutionError::NoSuchOverload(_)
        | ExecutionError::UndeclaredReference(_)
        | ExecutionError::NotSupportedAsMethod { .. }
        | ExecutionError::UnsupportedTargetType { .. } => {
            CelRuleError::UnsupportedFunction(error.to_string())
        }
        other => CelRuleError::EvaluationFailed(other.to_string()),
    }
}

fn evaluate_rule(
    source: &str,
    value: &Value,
    old: Option<&OldSelf<'_>>,
) -> Result<bool, CelRuleError> {
    let program = compiled(source)?;
    match run_program(&program, value, old)? {
        cel::Value::Bool(b) => Ok(b),
        other => Err(CelRuleError::NotBoolean(format!("{:?}", other.type_of()))),
    }
}

fn evaluate_message(source: &str, value: &Value, old: Option<&OldSelf<'_>>) -> Option<String> {
    let program = compiled(source).ok()?;
    match run_program(&program, value, old).ok()? {
        cel::Value::String(s) if !s.is_empty() => Some(s.to_string()),
        _ => None,
    }
}

/// Every CEL rule in a schema, with its schema location (as in [`check_crd_schema`]), and
/// whether it compiles.
pub fn cel_rules(schema: &Value) -> Vec<(String, String, Result<(), CelRuleError>)> {
    let mut out = Vec::new();
    collect_rules(schema, "", &mut out);
    out
}

fn collect_rules(
    schema: &Value,
    at: &str,
    out: &mut Vec<(String, String, Result<(), CelRuleError>)>,
) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules
            .iter()
            .filter_map(|r| r.get("rule").and_then(Value::as_str))
        {
            out.push((at.to_string(), rule.to_string(), compile_rule(rule)));
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            collect_rules(child, &format!("{at}.properties[{name}]"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = schema.get(key).filter(|c| c.is_object()) {
            collect_rules(child, &format!("{at}.{key}"), out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRD schema checks
// ---------------------------------------------------------------------------------------------

const KNOWN_TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];

/// Structural-schema basics kube-apiserver checks when a CRD is created. Paths continue the
/// version's `...schema.openAPIV3Schema` path: `.properties[spec].type`, `.type` for the root, and
/// `""` for the schema itself.
pub fn check_crd_schema(schema: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let root = "";
    if !schema.is_object() {
        errors.push(FieldError {
            path: root.into(),
            reason: REQUIRED,
            message: "Required value: must be an object schema".into(),
        });
        return errors;
    }
    if schema_type(schema) != Some("object") {
        errors.push(FieldError {
            path: format!("{root}.type"),
            reason: INVALID,
            message: format!(
                "Invalid value: {}: must be object at the root",
                schema
                    .get("type")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "\"\"".into())
            ),
        });
    }
    check_node(schema, root, false, &mut errors);
    errors
}

fn schema_error(errors: &mut Vec<FieldError>, path: String, reason: &'static str, message: &str) {
    let message = match reason {
        REQUIRED => format!("Required value: {message}"),
        FORBIDDEN => format!("Forbidden: {message}"),
        NOT_SUPPORTED => format!("Unsupported value: {message}"),
        _ => format!("Invalid value: {message}"),
    };
    errors.push(FieldError {
        path,
        reason,
        message,
    });
}

/// Inside junctors only `type: integer`/`type: string` under `x-kubernetes-int-or-string` is allowed
/// (the `anyOf: [{type: integer}, {type: string}]` idiom generators emit).
fn check_node(node: &Value, at: &str, in_junctor: bool, errors: &mut Vec<FieldError>) {
    check_node_with(node, at, in_junctor, false, errors)
}

fn check_node_with(
    node: &Value,
    at: &str,
    in_junctor: bool,
    int_or_string_parent: bool,
    errors: &mut Vec<FieldError>,
) {
    let Some(map) = node.as_object() else {
        schema_error(errors, at.to_string(), INVALID, "must be a schema object");
        return;
    };
    if map.contains_key("$ref") {
        schema_error(
            errors,
            format!("{at}.$ref"),
            FORBIDDEN,
            "$ref is not supported",
        );
    }
    let int_or_string = flag(node, "x-kubernetes-int-or-string");
    let preserve = flag(node, "x-kubernetes-preserve-unknown-fields");
    if in_junctor {
        for key in [
            "type",
            "default",
            "nullable",
            "additionalProperties",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-embedded-resource",
            "x-kubernetes-int-or-string",
            "x-kubernetes-validations",
        ] {
            let int_or_string_type = key == "type"
                && int_or_string_parent
                && matches!(schema_type(node), Some("integer" | "string"));
            if map.contains_key(key) && !int_or_string_type {
                schema_error(
                    errors,
                    format!("{at}.{key}"),
                    FORBIDDEN,
                    "must not be set inside allOf, anyOf, oneOf or not",
                );
            }
        }
    } else {
        match map.get("type") {
            None if !(int_or_string || preserve) => {
                schema_error(
                    errors,
                    format!("{at}.type"),
                    REQUIRED,
                    "must not be empty for specified fields",
                );
            }
            Some(Value::String(t)) if !KNOWN_TYPES.contains(&t.as_str()) => {
                schema_error(errors, format!("{at}.type"), NOT_SUPPORTED, &format!("\"{t}\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""));
            }
            Some(Value::String(_)) | None => {}
            Some(_) => schema_error(errors, format!("{at}.type"), INVALID, "must be a string"),
        }
        if int_or_string && map.get("type").is_some() {
            schema_error(
                errors,
                format!("{at}.type"),
                FORBIDDEN,
                "must be empty when x-kubernetes-int-or-string is true",
            );
        }
    }
    if map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(false)) {
        schema_error(
            errors,
            format!("{at}.x-kubernetes-preserve-unknown-fields"),
            INVALID,
            "false: must be true or undefined",
        );
    }
    if flag(node, "x-kubernetes-embedded-resource") && schema_type(node) != Some("object") {
        schema_error(
            errors,
            format!("{at}.type"),
            INVALID,
            "must be object if x-kubernetes-embedded-resource is true",
        );
    }
    if schema_type(node) == Some("array")
        && !map.get("items").is_some_and(Value::is_object)
        && !in_junctor
    {
        schema_error(errors, format!("{at}.items"), REQUIRED, "must be specified");
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        schema_error(
            errors,
            format!("{at}.additionalProperties"),
            FORBIDDEN,
            "additionalProperties and properties are mutual exclusive",
        );
    }
    match map.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let has_keys = map
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .is_some_and(|k| !k.is_empty());
            if !has_keys {
                schema_error(
                    errors,
                    format!("{at}.x-kubernetes-list-map-keys"),
                    REQUIRED,
                    "must not be empty if x-kubernetes-list-type is map",
                );
            }
            if node.pointer("/items/type").and_then(Value::as_str) != Some("object") {
                schema_error(
                    errors,
                    format!("{at}.items.type"),
                    INVALID,
                    "must be object if x-kubernetes-list-type is map",
                );
            }
        }
        Some("atomic" | "set") | None => {
            if map.contains_key("x-kubernetes-list-map-keys") {
                schema_error(
                    errors,
                    format!("{at}.x-kubernetes-list-map-keys"),
                    FORBIDDEN,
                    "only allowed if x-kubernetes-list-type is map",
                );
            }
        }
        Some(other) => schema_error(
            errors,
            format!("{at}.x-kubernetes-list-type"),
            NOT_SUPPORTED,
            &format!("\"{other}\": supported values: \"atomic\", \"map\", \"set\""),
        ),
    }
    if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
        if regex::Regex::new(pattern).is_err() {
            schema_error(
                errors,
                format!("{at}.pattern"),
                INVALID,
                &format!("\"{pattern}\": must be a valid regular expression"),
            );
        }
    }

    if let Some(properties) = map.get("properties") {
        match properties.as_object() {
            Some(props) => {
                for (name, child) in props {
                    check_node(
                        child,
                        &format!("{at}.properties[{name}]"),
                        in_junctor,
                        errors,
                    );
                }
            }
            None => schema_error(
                errors,
                format!("{at}.properties"),
                INVALID,
                "must be a map of schemas",
            ),
        }
    }
    if let Some(items) = map.get("items") {
        if items.is_array() {
            schema_error(
                errors,
                format!("{at}.items"),
                FORBIDDEN,
                "items must be a schema object and not an array",
            );
        } else {
            check_node(items, &format!("{at}.items"), in_junctor, errors);
        }
    }
    if let Some(additional) = map.get("additionalProperties").filter(|a| a.is_object()) {
        check_node(
            additional,
            &format!("{at}.additionalProperties"),
            in_junctor,
            errors,
        );
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        if let Some(subs) = map.get(junctor).and_then(Value::as_array) {
            for (i, sub) in subs.iter().enumerate() {
                check_node_with(
                    sub,
                    &format!("{at}.{junctor}[{i}]"),
                    true,
                    int_or_string,
                    errors,
                );
            }
        }
    }
    if let Some(not) = map.get("not") {
        check_node(not, &format!("{at}.not"), true, errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reasons(outcome: &ValidationOutcome) -> Vec<(String, &'static str)> {
        outcome
            .errors
            .iter()
            .map(|e| (e.path.clone(), e.reason))
            .collect()
    }

    #[test]
    fn prunes_unknown_fields_but_keeps_type_meta_and_preserved() {
        let schema = json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "a": {"type": "string"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "list": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}}
        }}}});
        let mut object = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "whatever": 1},
            "spec": {"a": "s", "b": 1, "free": {"anything": [1]}, "list": [{"x": 1, "y": 2}]}, "extra": true});
        let outcome = validate_and_prune(&schema, &mut object, None);
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        let mut pruned = outcome.pruned_fields.clone();
        pruned.sort();
        assert_eq!(pruned, vec!["extra", "spec.b", "spec.list[0].y"]);
        assert_eq!(object["metadata"]["whatever"], 1);
        assert_eq!(object["spec"]["free"]["anything"], json!([1]));
        assert!(object["spec"]["list"][0].get("y").is_none());
    }

    #[test]
    fn defaults_fill_missing_fields_in_items_and_maps() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "replicas": {"type": "integer", "default": 1},
            "ports": {"type": "array", "items": {"type": "object", "properties": {
                "protocol": {"type": "string", "default": "TCP"}, "port": {"type": "integer"}}}},
            "byName": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "weight": {"type": "integer", "default": 1}}}}
        }}}});
        let mut object = json!({"spec": {"ports": [{"port": 80}], "byName": {"a": {}}}});
        let outcome = validate_and_prune(&schema, &mut object, None);
        assert!(outcome.errors.is_empty());
        assert_eq!(object["spec"]["replicas"], 1);
        assert_eq!(object["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(object["spec"]["byName"]["a"]["weight"], 1);
    }

    #[test]
    fn cel_rules_reject_with_message_and_path() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [
                {"rule": "self.min <= self.max", "message": "min must not exceed max", "fieldPath": ".min"},
                {"rule": "self.max < 100", "messageExpression": "'max is ' + string(self.max)", "reason": "FieldValueForbidden"},
                {"rule": "self.unknownFn()", "message": "never enforced"},
                {"rule": "self.min == oldSelf.min", "message": "min is immutable"}
            ],
            "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}}}});
        let mut object = json!({"spec": {"min": 250, "max": 200}});
        let (outcome, trace) = validate_and_prune_traced(&schema, &mut object, None);
        assert_eq!(
            reasons(&outcome),
            vec![
                ("spec.min".to_string(), INVALID),
                ("spec".to_string(), FORBIDDEN)
            ]
        );
        assert!(outcome.errors[0]
            .message
            .contains("min must not exceed max"));
        assert_eq!(outcome.errors[1].message, "Forbidden: max is 200");
        assert_eq!(trace.skipped.len(), 1, "{:?}", trace.skipped);
        // Transition rule only on update.
        let old = json!({"spec": {"min": 1, "max": 2}});
        let mut object = json!({"spec": {"min": 2, "max": 3}});
        let outcome = validate_and_prune(&schema, &mut object, Some(&old));
        assert_eq!(reasons(&outcome), vec![("spec".to_string(), INVALID)]);
        assert!(outcome.errors[0].message.contains("min is immutable"));
    }

    #[test]
    fn optional_old_self_is_bound_as_optional() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [
                {"rule": "!oldSelf.hasValue() || oldSelf.value().x == self.x", "message": "x is immutable", "optionalOldSelf": true}
            ],
            "properties": {"x": {"type": "string"}}}}});
        let mut object = json!({"spec": {"x": "a"}});
        let (outcome, trace) = validate_and_prune_traced(&schema, &mut object, None);
        assert!(outcome.errors.is_empty());
        assert_eq!(trace.evaluated, 1, "{:?}", trace.skipped);
        let old = json!({"spec": {"x": "b"}});
        let outcome = validate_and_prune(&schema, &mut object, Some(&old));
        assert_eq!(reasons(&outcome), vec![("spec".to_string(), INVALID)]);
    }

    #[test]
    fn kubernetes_cel_functions() {
        for (rule, expected) in [
            ("isURL(self.u)", true),
            ("isURL('not a url')", false),
            ("self.s.lowerAscii() == 'abc'", true),
            ("self.s.split('B').size() == 2", true),
            ("self.l.all(x, x > 0) && self.l.exists_one(x, x == 2) && self.l.filter(x, x > 1).size() == 2", true),
            ("self.l.map(x, x * 2)[2] == 6", true),
            ("duration(self.d) >= duration('1ms')", true),
            ("self.s.matches('^a.C$') && self.s.startsWith('a') && self.s.endsWith('C') && self.s.contains('B')", true),
        ] {
            let value = json!({"u": "https://example.com/x", "s": "aBC", "l": [1, 2, 3], "d": "5s"});
            assert_eq!(evaluate_rule(rule, &value, None), Ok(expected), "{rule}");
        }
    }

    #[test]
    fn check_crd_schema_finds_non_structural_nodes() {
        let bad = json!({"type": "object", "properties": {
            "spec": {"properties": {"a": {"$ref": "#/x", "type": "string"}}},
            "list": {"type": "array"},
            "pick": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
            "keyed": {"type": "array", "x-kubernetes-list-type": "map", "items": {"type": "object"}},
            "either": {"type": "string", "anyOf": [{"type": "string"}]},
            "ios": {"x-kubernetes-int-or-string": true},
            "odd": {"type": "date"}
        }});
        let errors = check_crd_schema(&bad);
        let found: Vec<(&str, &str)> = errors.iter().map(|e| (e.path.as_str(), e.reason)).collect();
        for expected in [
            (".properties[spec].type", REQUIRED),
            (".properties[spec].properties[a].$ref", FORBIDDEN),
            (".properties[list].items", REQUIRED),
            (".properties[pick].additionalProperties", FORBIDDEN),
            (".properties[keyed].x-kubernetes-list-map-keys", REQUIRED),
            (".properties[either].anyOf[0].type", FORBIDDEN),
            (".properties[odd].type", NOT_SUPPORTED),
        ] {
            assert!(
                found.contains(&expected),
                "missing {expected:?} in {found:?}"
            );
        }
        assert_eq!(found.len(), 7, "{found:?}");
        assert!(check_crd_schema(
            &json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-preserve-unknown-fields": true}}})
        )
        .is_empty());
        assert_eq!(
            check_crd_schema(&json!({"type": "string"}))[0].path,
            ".type"
        );
    }

    #[test]
    fn int_or_string_any_of_idiom_is_structural() {
        let schema = json!({"type": "object", "properties": {"port": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}]}}});
        assert!(
            check_crd_schema(&schema).is_empty(),
            "{:?}",
            check_crd_schema(&schema)
        );
        for ok in [json!(8080), json!("http")] {
            let mut object = json!({"port": ok});
            assert!(validate_and_prune(&schema, &mut object, None)
                .errors
                .is_empty());
        }
        let mut object = json!({"port": [1]});
        let outcome = validate_and_prune(&schema, &mut object, None);
        assert_eq!(reasons(&outcome), vec![("port".to_string(), TYPE_INVALID)]);
        let int32 =
            json!({"type": "object", "properties": {"n": {"type": "integer", "format": "int32"}}});
        assert!(validate_and_prune(&int32, &mut json!({"n": 5.0}), None)
            .errors
            .is_empty());
        let outcome = validate_and_prune(&int32, &mut json!({"n": 2_147_483_648i64}), None);
        assert_eq!(reasons(&outcome), vec![("n".to_string(), INVALID)]);
    }

    #[test]
    fn mentions_old_self_matches_whole_identifier() {
        assert!(mentions_old_self("self == oldSelf"));
        assert!(mentions_old_self("oldSelf.x == 1"));
        assert!(!mentions_old_self("self.oldSelfish == 1"));
    }

    #[test]
    fn garbage_schema_and_object_do_not_panic() {
        for schema in [
            json!(null),
            json!(3),
            json!({"type": 5, "properties": 7, "items": [1]}),
            json!({"x-kubernetes-validations": [{"rule": "((("}]}),
        ] {
            for object in [json!(null), json!({"a": [1, {"b": null}]}), json!("s")] {
                let mut object = object;
                let _ = validate_and_prune(&schema, &mut object, Some(&json!(1)));
            }
            let _ = check_crd_schema(&schema);
        }
    }
}
