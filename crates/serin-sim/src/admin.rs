//! The admin endpoint under `/sim/` (served only when `SimConfig::admin` / `serin sim --admin` is on):
//! fault rules, watch faults, forced pod readiness, the workload simulator switch and the request log
//! as a small JSON API, for kubectl-level tests and tools outside the test process. `docs/sim.md`
//! lists every call.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api_error::ApiError;
use super::control::{self, ControlError};
use super::faults::{
    FaultAction, FaultError, FaultRule, WatchFault, WatchScope, MAX_FAULT_DURATION,
};
use super::registry::Registry;
use super::server::{error_response, value_response, ServerState};

/// Admin request bodies are small; anything bigger is a mistake.
const MAX_ADMIN_BODY: usize = 64 * 1024;
const DEFAULT_NAMESPACE: &str = "default";

/// A refused admin call: the status to answer and a message naming the field at fault.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
}

impl AdminError {
    pub fn category(&self) -> &'static str {
        match self {
            AdminError::BadRequest(_) => "bad_request",
            AdminError::NotFound(_) => "not_found",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
        }
    }

    fn api_error(&self) -> ApiError {
        match self {
            AdminError::BadRequest(message) => ApiError::bad_request(message.clone()),
            AdminError::NotFound(message) => ApiError::new(404, "NotFound", message.clone()),
            AdminError::MethodNotAllowed { .. } => {
                ApiError::new(405, "MethodNotAllowed", self.to_string())
            }
        }
    }
}

impl From<FaultError> for AdminError {
    fn from(error: FaultError) -> AdminError {
        AdminError::BadRequest(error.to_string())
    }
}

fn bad(message: impl Into<String>) -> AdminError {
    AdminError::BadRequest(message.into())
}

/// `POST /sim/faults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleRequest {
    pub verb: Option<String>,
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub user: Option<String>,
    pub count: Option<u64>,
    pub code: Option<u64>,
    pub timeout_millis: Option<u64>,
    /// With `timeoutMillis`: execute the request before timing out.
    pub applied: Option<bool>,
}

/// `POST /sim/watches/{hold,drop,close,expire}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WatchRequest {
    pub group: Option<String>,
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub user: Option<String>,
    pub millis: Option<u64>,
    pub count: Option<u64>,
}

/// `POST /sim/pods/{unready,ready}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodsRequest {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub replicaset: Option<String>,
    pub count: Option<u64>,
}

/// `POST /sim/latency`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LatencyRequest {
    pub millis: Option<u64>,
}

/// Parses a JSON body; an empty body is an empty object.
pub fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))
}

fn not_empty(field: &'static str, value: Option<String>) -> Result<Option<String>, AdminError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(bad(format!(
            "{field}: must not be empty (leave it out to match any)"
        ))),
        other => Ok(other),
    }
}

fn millis(field: &'static str, value: Option<u64>) -> Result<Duration, AdminError> {
    let millis = value.ok_or_else(|| bad(format!("{field}: required (milliseconds)")))?;
    let duration = Duration::from_millis(millis);
    if millis == 0 || duration > MAX_FAULT_DURATION {
        return Err(bad(format!(
            "{field}: must be between 1 and {} milliseconds",
            MAX_FAULT_DURATION.as_millis()
        )));
    }
    Ok(duration)
}

fn count(value: Option<u64>, default: usize) -> Result<usize, AdminError> {
    match value {
        None => Ok(default),
        Some(0) => Err(bad("count: must be at least 1")),
        Some(n) => usize::try_from(n).map_err(|_| bad("count: too large")),
    }
}

/// Resolves what a user typed (`replicasets`, `replicasets.apps`, `replicaset`, `ReplicaSet`, `rs`)
/// to the served (group, plural), the way kubectl resolves resource names. `group` pins the group.
pub fn resolve_resource(
    registry: &Registry,
    group: Option<&str>,
    typed: &str,
) -> Result<(String, String), AdminError> {
    let typed = typed.trim();
    if typed.is_empty() {
        return Err(bad("resource: required (e.g. \"replicasets\")"));
    }
    let lower = typed.to_ascii_lowercase();
    let all = registry.all();
    let candidates: Vec<(String, String)> = all
        .iter()
        .filter(|info| {
            let named = info.plural == lower
                || info.singular == lower
                || info.kind.to_ascii_lowercase() == lower
                || info.short_names.contains(&lower)
                || (!info.group.is_empty() && lower == format!("{}.{}", info.plural, info.group));
            named && group.is_none_or(|g| g == info.group)
        })
        .map(|info| (info.group.clone(), info.plural.clone()))
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            let elsewhere: Vec<String> = all
                .iter()
                .filter(|info| info.plural == lower || info.singular == lower)
                .map(|info| format!("{:?}", info.group))
                .collect();
            let hint = if elsewhere.is_empty() {
                String::new()
            } else {
                format!(" (it is served in group {})", elsewhere.join(", "))
            };
            Err(bad(format!(
                "resource: {typed:?} is not served in group {:?}{hint}",
                group.unwrap_or("*")
            )))
        }
        several => Err(bad(format!(
            "resource: {typed:?} is ambiguous ({}); add \"group\" or write plural.group",
            several
                .iter()
                .map(|(g, p)| if g.is_empty() {
                    p.clone()
                } else {
                    format!("{p}.{g}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Turns a `POST /sim/faults` body into a checked rule. `"*"` (or leaving a field out) matches any.
pub fn rule_from_request(
    registry: &Registry,
    request: RuleRequest,
) -> Result<FaultRule, AdminError> {
    let verb = request.verb.unwrap_or_else(|| "*".into());
    let resource = match request.resource.as_deref() {
        None | Some("*") => "*".to_string(),
        Some(typed) => {
            let (group, plural) = resolve_resource(registry, None, typed)?;
            if group.is_empty() {
                plural
            } else {
                format!("{plural}.{group}")
            }
        }
    };
    let action = match (request.code, request.timeout_millis, request.applied) {
        (Some(_), Some(_), _) => {
            return Err(bad(
                "code, timeoutMillis: give one (a failure code or a timeout), not both",
            ))
        }
        (_, None, Some(_)) => return Err(bad("applied: only with timeoutMillis")),
        (Some(code), None, None) => FaultAction::Fail(
            u16::try_from(code).map_err(|_| bad(format!("code: {code} is not an HTTP status")))?,
        ),
        (None, None, None) => FaultAction::Fail(500),
        (None, Some(ms), applied) => {
            let hold = Duration::from_millis(ms);
            if applied == Some(true) {
                FaultAction::TimeoutAfterApply(hold)
            } else {
                FaultAction::Timeout(hold)
            }
        }
    };
    let rule = FaultRule {
        verb,
        resource,
        subresource: request.subresource,
        name: request.name,
        namespace: request.namespace,
        user: request.user,
        remaining: count(request.count, 1)?,
        action,
    };
    rule.validate()?;
    Ok(rule)
}

/// Turns a watch-fault body into its scope; `resource` is required unless `optional`.
pub fn scope_from_request(
    registry: &Registry,
    request: &WatchRequest,
) -> Result<WatchScope, AdminError> {
    let typed = request
        .resource
        .as_deref()
        .ok_or_else(|| bad("resource: required (e.g. \"replicasets\")"))?;
    let (group, plural) = resolve_resource(registry, request.group.as_deref(), typed)?;
    Ok(WatchScope {
        group,
        resource: plural,
        namespace: not_empty("namespace", request.namespace.clone())?,
        user: not_empty("user", request.user.clone())?,
    })
}

fn rule_json(rule: &FaultRule) -> Value {
    let mut value = json!({
        "verb": rule.verb, "resource": rule.resource, "subresource": rule.subresource,
        "name": rule.name, "namespace": rule.namespace, "user": rule.user, "count": rule.remaining,
    });
    match rule.action {
        FaultAction::Fail(code) => value["code"] = json!(code),
        FaultAction::Timeout(hold) => value["timeoutMillis"] = json!(hold.as_millis() as u64),
        FaultAction::TimeoutAfterApply(hold) => {
            value["timeoutMillis"] = json!(hold.as_millis() as u64);
            value["applied"] = json!(true);
        }
    }
    value
}

fn scope_json(scope: &WatchScope) -> Value {
    json!({"group": scope.group, "resource": scope.resource, "namespace": scope.namespace, "user": scope.user})
}

fn window_json(window: &WatchFault) -> Value {
    let now = tokio::time::Instant::now();
    let mut value = scope_json(&window.scope);
    value["kind"] = json!(window.kind.as_str());
    value["active"] = json!(window.active(now));
    value["remainingMillis"] =
        json!(window.until.saturating_duration_since(now).as_millis() as u64);
    value
}

fn listing(state: &ServerState) -> Value {
    let rules: Vec<Value> = state.faults.pending_rules().iter().map(rule_json).collect();
    let windows: Vec<Value> = state
        .faults
        .watch_faults()
        .iter()
        .map(window_json)
        .collect();
    let expiries: Vec<Value> = state
        .faults
        .pending_expiries()
        .iter()
        .map(|(scope, remaining)| {
            let mut value = scope_json(scope);
            value["count"] = json!(remaining);
            value
        })
        .collect();
    json!({
        "rules": rules,
        "watches": windows,
        "watchExpiries": expiries,
        "latencyMillis": state.faults.latency().as_millis() as u64,
        "workload": workload_state(state),
    })
}

fn workload_state(state: &ServerState) -> &'static str {
    match control::workload_running(state) {
        Some(true) => "running",
        Some(false) => "stopped",
        None => "absent",
    }
}

fn control_error(error: ControlError) -> Response {
    let code = error.http_status();
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        504 => "Timeout",
        _ => "InternalError",
    };
    error_response(&ApiError::new(code, reason, error.to_string()))
}

fn success(details: Value) -> Response {
    let mut value = json!({"status": "Success"});
    if let (Some(map), Value::Object(extra)) = (value.as_object_mut(), details) {
        map.extend(extra);
    }
    value_response(&value)
}

fn requests(state: &ServerState) -> Value {
    let entries: Vec<Value> = state
        .log
        .snapshot()
        .iter()
        .map(|r| {
            json!({
                "time": r.time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "user": r.user, "verb": r.verb, "path": r.path, "group": r.group, "version": r.version,
                "resource": r.resource, "subresource": r.subresource, "namespace": r.namespace,
                "name": r.name, "patchContentType": r.patch_content_type, "status": r.status,
            })
        })
        .collect();
    json!({"items": entries})
}

/// Totals per user, verb, resource and subresource since the sim started.
fn request_counts(state: &ServerState) -> Value {
    let items: Vec<Value> = state
        .log
        .counts()
        .iter()
        .map(|c| {
            json!({
                "user": c.user, "verb": c.verb, "resource": c.resource,
                "subresource": c.subresource, "count": c.count,
            })
        })
        .collect();
    json!({"items": items})
}

/// Serves one `/sim/...` call; `rest` is the path after `/sim/`.
pub async fn serve(
    state: &Arc<ServerState>,
    method: &str,
    rest: &[String],
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, MAX_ADMIN_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return error_response(
                &bad(format!("body: larger than {MAX_ADMIN_BODY} bytes")).api_error(),
            )
        }
    };
    match dispatch(state, method, rest, &body).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(%error, category = error.category(), "admin call refused");
            error_response(&error.api_error())
        }
    }
}

async fn dispatch(
    state: &Arc<ServerState>,
    method: &str,
    rest: &[String],
    body: &[u8],
) -> Result<Response, AdminError> {
    let path: Vec<&str> = rest.iter().map(String::as_str).collect();
    let registry = &state.api.registry;
    let faults = &state.faults;
    let response = match (method, path.as_slice()) {
        ("GET", ["faults"]) => value_response(&listing(state)),
        ("POST", ["faults"]) => {
            let rule = rule_from_request(registry, parse_body(body)?)?;
            let shown = rule_json(&rule);
            faults.inject(rule);
            success(json!({"rule": shown}))
        }
        ("DELETE", ["faults"]) => {
            faults.clear();
            success(json!({}))
        }
        ("POST", ["latency"]) => {
            let request: LatencyRequest = parse_body(body)?;
            let latency = Duration::from_millis(request.millis.unwrap_or(0));
            if latency > MAX_FAULT_DURATION {
                return Err(bad(format!(
                    "millis: at most {}",
                    MAX_FAULT_DURATION.as_millis()
                )));
            }
            faults.set_latency(latency);
            success(json!({"latencyMillis": latency.as_millis() as u64}))
        }
        ("POST", ["close-watches"]) => {
            faults.close_watches();
            success(json!({}))
        }
        ("POST", ["watches", "close"]) => {
            let request: WatchRequest = parse_body(body)?;
            if request.resource.is_none() {
                if request.group.is_some() || request.namespace.is_some() || request.user.is_some()
                {
                    return Err(bad(
                        "resource: required when group, namespace or user is given",
                    ));
                }
                faults.close_watches();
                success(json!({"closed": "all"}))
            } else {
                let scope = scope_from_request(registry, &request)?;
                let shown = scope_json(&scope);
                faults.close_watches_of(scope);
                success(json!({"closed": shown}))
            }
        }
        ("POST", ["watches", kind @ ("hold" | "drop")]) => {
            let request: WatchRequest = parse_body(body)?;
            if request.count.is_some() {
                return Err(bad(format!("count: not used by {kind} (give millis)")));
            }
            let scope = scope_from_request(registry, &request)?;
            let duration = millis("millis", request.millis)?;
            let shown = scope_json(&scope);
            if *kind == "hold" {
                faults.hold_watch_events(scope, duration);
            } else {
                faults.drop_watch_events(scope, duration);
            }
            let mut details = json!({"millis": duration.as_millis() as u64});
            details[kind.to_string()] = shown;
            success(details)
        }
        ("POST", ["watches", "expire"]) => {
            let request: WatchRequest = parse_body(body)?;
            if request.millis.is_some() {
                return Err(bad("millis: not used by expire (give count)"));
            }
            let scope = scope_from_request(registry, &request)?;
            let count = count(request.count, 1)?;
            let shown = scope_json(&scope);
            faults.expire_next_watches(scope, count);
            success(json!({"expire": shown, "count": count}))
        }
        ("POST", ["pods", wanted @ ("unready" | "ready")]) => {
            let request: PodsRequest = parse_body(body)?;
            let ready = *wanted == "ready";
            let namespace = not_empty("namespace", request.namespace)?
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
            let pods = match (request.pod, request.replicaset, request.count) {
                (Some(_), Some(_), _) => {
                    return Err(bad("pod, replicaset: give one, not both"));
                }
                (Some(_), None, Some(_)) => {
                    return Err(bad("count: only with replicaset"));
                }
                (None, Some(_), Some(_)) if ready => {
                    return Err(bad(
                        "count: not used by ready (every forced pod of the replicaset is given back)",
                    ));
                }
                (None, None, _) => return Err(bad("pod or replicaset: one is required")),
                (Some(pod), None, None) => {
                    match control::set_pod_ready(state, &namespace, &pod, ready).await {
                        Ok(()) => vec![pod],
                        Err(error) => return Ok(control_error(error)),
                    }
                }
                (None, Some(rs), count_given) => {
                    let outcome = if ready {
                        control::make_replicaset_pods_ready(state, &namespace, &rs).await
                    } else {
                        let count = count(count_given, 1)?;
                        control::make_replicaset_pods_unready(state, &namespace, &rs, count).await
                    };
                    match outcome {
                        Ok(pods) => pods,
                        Err(error) => return Ok(control_error(error)),
                    }
                }
            };
            success(json!({"namespace": namespace, "pods": pods}))
        }
        ("GET", ["workload"]) => value_response(&json!({"workload": workload_state(state)})),
        ("POST", ["workload", action @ ("stop" | "start")]) => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                let _: Value = parse_body(body)?;
            }
            let changed = if *action == "stop" {
                control::stop_workload(state).await
            } else {
                control::start_workload(state).await
            };
            match changed {
                Ok(changed) => {
                    success(json!({"workload": workload_state(state), "changed": changed}))
                }
                Err(error) => return Ok(control_error(error)),
            }
        }
        ("GET", ["requests"]) => value_response(&requests(state)),
        ("GET", ["requests", "counts"]) => value_response(&request_counts(state)),
        ("DELETE", ["requests"]) => {
            state.log.clear();
            success(json!({}))
        }
        (
            _,
            ["faults"]
            | ["latency"]
            | ["close-watches"]
            | ["watches", "close" | "hold" | "drop" | "expire"]
            | ["pods", "unready" | "ready"]
            | ["workload"]
            | ["workload", "stop" | "start"]
            | ["requests"]
            | ["requests", "counts"],
        ) => {
            return Err(AdminError::MethodNotAllowed {
                method: method.to_string(),
                path: format!("/sim/{}", path.join("/")),
            })
        }
        _ => {
            return Err(AdminError::NotFound(format!(
                "no admin call /sim/{} (see docs/sim.md)",
                path.join("/")
            )))
        }
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: AdminError) -> String {
        match error {
            AdminError::BadRequest(message) => message.split(':').next().unwrap_or("").to_string(),
            other => format!("not a bad request: {other}"),
        }
    }

    fn rule(body: &str) -> Result<FaultRule, AdminError> {
        let registry = Registry::with_builtins();
        rule_from_request(&registry, parse_body(body.as_bytes())?)
    }

    #[test]
    fn rule_bodies_become_checked_rules() {
        let parsed = rule(
            r#"{"verb": "patch", "resource": "rs", "subresource": "status", "name": "web",
                "namespace": "shop", "user": "serin-a", "count": 3, "code": 409}"#,
        );
        let parsed = parsed.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.resource, "replicasets.apps");
        assert_eq!(
            (parsed.remaining, parsed.action.clone()),
            (3, FaultAction::Fail(409))
        );
        assert_eq!(parsed.user.as_deref(), Some("serin-a"));
        let defaults = rule("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                defaults.verb.as_str(),
                defaults.resource.as_str(),
                defaults.remaining
            ),
            ("*", "*", 1)
        );
        assert_eq!(defaults.action, FaultAction::Fail(500));
        let late = rule(r#"{"resource": "configmaps", "timeoutMillis": 50, "applied": true}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            late.action,
            FaultAction::TimeoutAfterApply(Duration::from_millis(50))
        );
    }

    #[test]
    fn bad_rule_bodies_name_the_field() {
        let field = |body: &str| rule(body).map_or_else(field_of, |r| format!("accepted {r:?}"));
        assert_eq!(field(r#"{"verb": "fetch"}"#), "verb");
        assert_eq!(field(r#"{"resource": "gizmos"}"#), "resource");
        assert_eq!(field(r#"{"code": 200}"#), "code");
        assert_eq!(field(r#"{"code": 70000}"#), "code");
        assert_eq!(field(r#"{"count": 0}"#), "count");
        assert_eq!(
            field(r#"{"code": 500, "timeoutMillis": 5}"#),
            "code, timeoutMillis"
        );
        assert_eq!(field(r#"{"applied": true}"#), "applied");
        assert_eq!(field(r#"{"user": ""}"#), "user");
        assert_eq!(field(r#"{"usr": "alice"}"#), "body");
        assert_eq!(field(r#"{"count": "two"}"#), "body");
        assert_eq!(field("not json"), "body");
    }

    #[test]
    fn resources_resolve_like_kubectl_and_explain_misses() {
        let registry = Registry::with_builtins();
        for typed in [
            "replicasets",
            "replicaset",
            "ReplicaSet",
            "rs",
            "replicasets.apps",
        ] {
            assert_eq!(
                resolve_resource(&registry, None, typed),
                Ok(("apps".to_string(), "replicasets".to_string())),
                "{typed}"
            );
        }
        let wrong_group = resolve_resource(&registry, Some(""), "replicasets");
        let message = wrong_group.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.starts_with("resource:") && message.contains("\"apps\""),
            "{message}"
        );
    }

    #[test]
    fn watch_bodies_need_a_served_resource() {
        let registry = Registry::with_builtins();
        let request: WatchRequest =
            parse_body(br#"{"resource": "replicasets", "namespace": "shop", "millis": 2000}"#)
                .unwrap_or_default();
        let scope = scope_from_request(&registry, &request).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            scope,
            WatchScope::new("apps", "replicasets").namespace("shop")
        );
        assert_eq!(
            field_of(
                scope_from_request(&registry, &WatchRequest::default())
                    .err()
                    .unwrap_or(AdminError::NotFound(String::new()))
            ),
            "resource"
        );
        assert_eq!(
            field_of(
                millis("millis", None)
                    .err()
                    .unwrap_or(AdminError::NotFound(String::new()))
            ),
            "millis"
        );
        assert_eq!(
            field_of(
                millis("millis", Some(0))
                    .err()
                    .unwrap_or(AdminError::NotFound(String::new()))
            ),
            "millis"
        );
    }
}
