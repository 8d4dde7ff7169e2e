//! The HTTP face of the simulated API server: routes Kubernetes REST paths, streams watches, applies
//! injected faults and records every request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::api::{ApiResponse, ApiState, RequestInput, Target, MAX_BODY_BYTES};
use super::api_error::{ApiError, InjectedRequest};
use super::faults::{
    EventFate, FaultAction, Faults, RequestFacts, RequestLog, RequestRecord, WatchFacts,
};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{EventType, EventsSince};
use super::table::{table, IncludeObject};
use super::workload::{RunFence, WorkloadControl, RUN_HEADER};

/// Everything the request handlers share.
pub struct ServerState {
    pub api: ApiState,
    pub faults: Arc<Faults>,
    pub log: Arc<RequestLog>,
    pub shutdown: CancellationToken,
    pub port: u16,
    pub bookmark_interval: Duration,
    /// The traffic simulator whose request metrics `/metrics` serves (set once it runs).
    pub traffic_metrics: std::sync::OnceLock<super::load::TrafficSimulator>,
    /// Whether `/sim/...` (the admin endpoint: faults, request log, workload control) is served.
    pub admin: bool,
    /// The workload simulator's start/stop switch (set once it runs).
    pub workload: std::sync::OnceLock<Arc<WorkloadControl>>,
    /// Requests of a stopped workload-simulator run are refused (see [`RunFence`]).
    pub workload_fence: Arc<RunFence>,
    /// When set, every resource request is authorized against the stored RBAC objects.
    pub rbac: Option<super::rbac::PolicyCache>,
}

pub fn router(state: Arc<ServerState>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(traffic_metrics))
        .fallback(handle)
        .with_state(state)
}

/// The simulated request metrics, for a Prometheus server to scrape; empty before the simulator runs.
async fn traffic_metrics(State(state): State<Arc<ServerState>>) -> Response {
    let text = state
        .traffic_metrics
        .get()
        .map(|traffic| traffic.metrics_text())
        .unwrap_or_else(|| "# EOF\n".to_string());
    Response::builder()
        .status(200)
        .header("content-type", super::load::METRICS_CONTENT_TYPE)
        .body(Body::from(text))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn json_response(code: u16, body: Bytes, warnings: &[String]) -> Response {
    let mut builder = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    for warning in warnings {
        let escaped = warning.replace('"', "\\\"");
        builder = builder.header("warning", format!("299 - \"{escaped}\""));
    }
    builder
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

pub(crate) fn error_response(error: &ApiError) -> Response {
    let body = serde_json::to_vec(&error.body()).unwrap_or_default();
    let mut builder = Response::builder()
        .status(error.code)
        .header("content-type", "application/json");
    if let Some(seconds) = error.retry_after_seconds {
        builder = builder.header("retry-after", seconds.to_string());
    }
    builder
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

pub(crate) fn value_response(value: &Value) -> Response {
    json_response(
        200,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
        &[],
    )
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(percent_decode(key), percent_decode(value));
    }
    params
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a path names, before the registry is consulted.
enum Route {
    Version,
    CoreVersions,
    GroupList,
    Group(String),
    ResourceList {
        group: String,
        version: String,
    },
    Resource {
        group: String,
        version: String,
        rest: Vec<String>,
    },
    Health,
    OpenApiRoot,
    OpenApiDocument(String, String),
    Sim(Vec<String>),
    NotFound,
}

fn route(path: &str) -> Route {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    match parts.as_slice() {
        ["version"] => Route::Version,
        ["healthz"] | ["livez"] | ["readyz"] => Route::Health,
        ["openapi", "v3"] => Route::OpenApiRoot,
        ["openapi", "v3", "api", version] => {
            Route::OpenApiDocument(String::new(), version.to_string())
        }
        ["openapi", "v3", "apis", group, version] => {
            Route::OpenApiDocument(group.to_string(), version.to_string())
        }
        ["sim", rest @ ..] => Route::Sim(rest.iter().map(|s| s.to_string()).collect()),
        ["api"] => Route::CoreVersions,
        ["api", version] => Route::ResourceList {
            group: String::new(),
            version: version.to_string(),
        },
        ["apis"] => Route::GroupList,
        ["apis", group] => Route::Group(group.to_string()),
        ["apis", group, version] => Route::ResourceList {
            group: group.to_string(),
            version: version.to_string(),
        },
        ["api", version, rest @ ..] => Route::Resource {
            group: String::new(),
            version: version.to_string(),
            rest: rest.iter().map(|s| s.to_string()).collect(),
        },
        ["apis", group, version, rest @ ..] => Route::Resource {
            group: group.to_string(),
            version: version.to_string(),
            rest: rest.iter().map(|s| s.to_string()).collect(),
        },
        _ => Route::NotFound,
    }
}

/// (namespace, resource, name, subresource) named by a resource path.
type ResourcePath = (Option<String>, String, Option<String>, Option<String>);

/// Splits the part after `/api/v1` or `/apis/g/v` into namespace, resource, name, subresource.
fn split_resource_path(rest: &[String]) -> Option<ResourcePath> {
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    let owned = |s: &str| s.to_string();
    match parts.as_slice() {
        [resource] => Some((None, owned(resource), None, None)),
        [resource, name] => Some((None, owned(resource), Some(owned(name)), None)),
        ["namespaces", name, sub @ ("status" | "finalize")] => Some((
            None,
            "namespaces".into(),
            Some(owned(name)),
            Some(owned(sub)),
        )),
        ["namespaces", namespace, resource] => {
            Some((Some(owned(namespace)), owned(resource), None, None))
        }
        ["namespaces", namespace, resource, name] => Some((
            Some(owned(namespace)),
            owned(resource),
            Some(owned(name)),
            None,
        )),
        ["namespaces", namespace, resource, name, sub] => Some((
            Some(owned(namespace)),
            owned(resource),
            Some(owned(name)),
            Some(owned(sub)),
        )),
        [resource, name, sub] => Some((None, owned(resource), Some(owned(name)), Some(owned(sub)))),
        _ => None,
    }
}

struct Resolved {
    target: Target,
    verb: &'static str,
}

fn resolve(
    state: &ServerState,
    method: &str,
    group: &str,
    version: &str,
    rest: &[String],
    query: &HashMap<String, String>,
) -> Result<Resolved, ApiError> {
    let (namespace, resource, name, subresource) =
        split_resource_path(rest).ok_or_else(ApiError::unknown_resource)?;
    let info = state
        .api
        .registry
        .lookup(group, version, &resource)
        .ok_or_else(ApiError::unknown_resource)?;
    if namespace.is_some() && !info.namespaced {
        return Err(ApiError::unknown_resource());
    }
    if info.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::unknown_resource());
    }
    if let Some(sub) = subresource.as_deref() {
        let served = (sub == "status" && info.status_subresource)
            || (sub == "scale" && info.scale.is_some())
            || (sub == "finalize" && info.plural == "namespaces");
        if !served {
            return Err(ApiError::unknown_resource());
        }
    }
    let watching = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    let verb = match (method, name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed(method)),
    };
    let subresource = subresource.map(|s| {
        if s == "finalize" {
            "status".to_string()
        } else {
            s
        }
    });
    Ok(Resolved {
        target: Target {
            info,
            version: version.to_string(),
            namespace,
            name,
            subresource,
        },
        verb,
    })
}

async fn handle(State(state): State<Arc<ServerState>>, request: Request) -> Response {
    let started = SystemTime::now();
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    // client-go (kubectl) sends no bearer token over plain http but does send impersonation, which a
    // real server also logs and authorizes as the impersonated user.
    let impersonated = header("impersonate-user");
    let user = if impersonated.is_empty() {
        header("authorization")
            .strip_prefix("Bearer ")
            .map(str::to_string)
            .unwrap_or_else(|| "system:anonymous".into())
    } else {
        impersonated
    };
    let content_type = header("content-type");

    let mut record = RequestRecord {
        time: started,
        user,
        verb: "get".into(),
        method: method.clone(),
        path: path.clone(),
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        patch_content_type: (method == "PATCH").then(|| content_type.clone()),
        status: 200,
    };

    let latency = state.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let run = header(RUN_HEADER);
    if !run.is_empty()
        && !run
            .parse()
            .is_ok_and(|run| state.workload_fence.admits(run))
    {
        let refused = error_response(&ApiError::new(
            503,
            "ServiceUnavailable",
            format!("workload simulator run {run} was stopped"),
        ));
        record.status = refused.status().as_u16();
        state.log.record(record);
        return refused;
    }

    let resolved = match route(&path) {
        Route::Version => Ok(value_response(&json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-serin-sim", "gitCommit": "serin-sim",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
            "compiler": "gc", "platform": "linux/amd64",
        }))),
        Route::Health => Ok(Response::new(Body::from("ok"))),
        Route::CoreVersions => Ok(value_response(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{}", state.port)}],
        }))),
        Route::GroupList => Ok(value_response(&state.api.registry.api_group_list())),
        Route::Group(group) => {
            record.group = group.clone();
            state
                .api
                .registry
                .api_group(&group)
                .map(|g| value_response(&g))
                .ok_or_else(ApiError::unknown_resource)
        }
        Route::ResourceList { group, version } => {
            record.group = group.clone();
            record.version = version.clone();
            state
                .api
                .registry
                .api_resource_list(&group, &version)
                .map(|l| value_response(&l))
                .ok_or_else(ApiError::unknown_resource)
        }
        Route::OpenApiRoot => Ok(value_response(&state.api.registry.openapi_v3_root())),
        Route::OpenApiDocument(group, version) => state
            .api
            .registry
            .openapi_v3_document(&group, &version)
            .map(|d| value_response(&d))
            .ok_or_else(ApiError::unknown_resource),
        Route::Sim(rest) if state.admin => {
            Ok(super::admin::serve(&state, &method, &rest, body).await)
        }
        Route::Sim(_) => Err(ApiError::unknown_resource()),
        Route::NotFound => Err(ApiError::unknown_resource()),
        Route::Resource {
            group,
            version,
            rest,
        } => {
            record.group = group.clone();
            record.version = version.clone();
            match resolve(&state, &method, &group, &version, &rest, &query) {
                Err(error) => {
                    if let Some((_, resource, _, _)) = split_resource_path(&rest) {
                        record.resource = resource;
                    }
                    Err(error)
                }
                Ok(resolved) => {
                    record.verb = resolved.verb.into();
                    record.resource = resolved.target.info.plural.clone();
                    record.subresource = resolved.target.subresource.clone();
                    record.namespace = resolved.target.namespace.clone();
                    record.name = resolved.target.name.clone();
                    // Every user may ask what they may do (system:basic-user in a real cluster).
                    if resolved.target.info.plural == "selfsubjectaccessreviews" {
                        review_access(&state, &resolved, &parts.headers, &record.user, body).await
                    } else {
                        match authorize(&state, &resolved, &query, &record.user) {
                            Ok(()) => {
                                serve_resource(
                                    &state,
                                    resolved,
                                    &query,
                                    &parts.headers,
                                    &record.user,
                                    body,
                                )
                                .await
                            }
                            Err(forbidden) => Err(forbidden),
                        }
                    }
                }
            }
        }
    };
    let response = match resolved {
        Ok(response) => response,
        Err(error) => {
            if error.code >= 500 {
                tracing::warn!(%method, %path, code = error.code, reason = error.reason, "request failed");
            } else {
                tracing::debug!(%method, %path, code = error.code, reason = error.reason, "request refused");
            }
            error_response(&error)
        }
    };
    record.status = response.status().as_u16();
    state.log.record(record);
    response
}

/// Refuses a resource request the stored RBAC objects do not allow, with the 403 kube-apiserver sends,
/// when the sim enforces RBAC.
fn authorize(
    state: &ServerState,
    resolved: &Resolved,
    query: &HashMap<String, String>,
    user: &str,
) -> Result<(), ApiError> {
    let Some(cache) = &state.rbac else {
        return Ok(());
    };
    let target = &resolved.target;
    let name = match resolved.verb {
        "list" | "watch" => pinned_name(query),
        _ => target.name.as_deref(),
    };
    let attributes = super::rbac::Attributes {
        verb: resolved.verb,
        group: &target.info.group,
        resource: &target.info.plural,
        subresource: target.subresource.as_deref(),
        namespace: target.namespace.as_deref(),
        name,
    };
    let policy = cache.policy(&state.api.store.lock());
    if policy
        .authorize(&super::rbac::UserInfo::from_name(user), &attributes)
        .allowed()
    {
        return Ok(());
    }
    Err(ApiError::injected(
        403,
        &InjectedRequest {
            verb: resolved.verb,
            group: &target.info.group,
            resource: &target.info.plural,
            subresource: target.subresource.as_deref(),
            namespace: target.namespace.as_deref(),
            name,
            user,
        },
    ))
}

/// Answers a SelfSubjectAccessReview from the stored RBAC objects; nothing is stored.
async fn review_access(
    state: &ServerState,
    resolved: &Resolved,
    headers: &http::HeaderMap,
    user: &str,
    body: Body,
) -> Result<Response, ApiError> {
    if resolved.verb != "create" {
        return Err(ApiError::method_not_allowed(resolved.verb));
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let bytes = read_body(body).await?;
    let review: Value = if content_type.contains("protobuf") {
        super::rbac::review_from_protobuf(&bytes)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let policy = state
        .rbac
        .as_ref()
        .map(|cache| cache.policy(&state.api.store.lock()));
    let answered = super::rbac::access_review(
        policy.as_deref(),
        &super::rbac::UserInfo::from_name(user),
        review,
    )
    .map_err(|e| {
        ApiError::invalid(
            "SelfSubjectAccessReview",
            "authorization.k8s.io",
            "",
            &[(e.to_string(), "FieldValueRequired", e.to_string())],
        )
    })?;
    Ok(json_response(
        201,
        Bytes::from(serde_json::to_vec(&answered).unwrap_or_default()),
        &[],
    ))
}

/// How much of a refused body is still read before the answer, as Go's HTTP server discards what a handler
/// left unread so the client, still writing, gets the answer rather than a closed connection.
const DRAIN_BYTES: usize = 256 * 1024;

/// The request body, as kube-apiserver reads it: up to [`MAX_BODY_BYTES`], refused with 413 past that
/// (whatever `Content-Length` says; a larger body is read up to the limit first).
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut read = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::too_large())?;
        if read.len() + chunk.len() > MAX_BODY_BYTES {
            let mut drained = read.len() + chunk.len() - MAX_BODY_BYTES;
            while drained < DRAIN_BYTES {
                match stream.next().await {
                    Some(Ok(more)) => drained += more.len(),
                    _ => break,
                }
            }
            return Err(ApiError::too_large());
        }
        read.extend_from_slice(&chunk);
    }
    Ok(read.freeze())
}

/// The object name a `metadata.name=` (or `==`) term of a field selector pins, for list and watch.
fn pinned_name(query: &HashMap<String, String>) -> Option<&str> {
    query.get("fieldSelector")?.split(',').find_map(|term| {
        let value = term.trim().strip_prefix("metadata.name")?;
        value
            .strip_prefix("==")
            .or_else(|| value.strip_prefix('='))
            .map(str::trim)
    })
}

/// Waits until `until` (or shutdown).
async fn wait_until(state: &ServerState, until: tokio::time::Instant) {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => {}
        _ = state.shutdown.cancelled() => {}
    }
}

/// A watch that answers with one 410 `ERROR` event and ends, like kube-apiserver for an expired
/// resourceVersion.
fn expired_watch(requested: u64, oldest: u64) -> Result<Response, ApiError> {
    let line = expired_line(requested, oldest);
    // Streamed like every watch; a fixed-length body would contradict the chunked encoding.
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(line) });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// One resource request past routing, as the fault checks and the store see it.
struct ResourceRequest<'a> {
    target: Target,
    verb: &'static str,
    query: &'a HashMap<String, String>,
    headers: &'a http::HeaderMap,
    user: &'a str,
    as_table: Option<IncludeObject>,
    body: Bytes,
}

impl ResourceRequest<'_> {
    /// The object the request names: its path, a `metadata.name` field selector, or a create's body.
    fn object_name(&self) -> Option<String> {
        self.target
            .name
            .as_deref()
            .or_else(|| pinned_name(self.query))
            .map(str::to_string)
            .or_else(|| {
                (self.verb == "create")
                    .then(|| serde_json::from_slice::<Value>(&self.body).ok())
                    .flatten()
                    .and_then(|v| v.pointer("/metadata/name")?.as_str().map(str::to_string))
            })
    }

    /// Takes the fault rule this request matches, if any.
    fn take_fault(&self, faults: &Faults) -> Option<(FaultAction, Option<String>)> {
        if !faults.has_rules() {
            return None;
        }
        let name = self.object_name();
        let facts = RequestFacts {
            verb: self.verb,
            group: &self.target.info.group,
            resource: &self.target.info.plural,
            subresource: self.target.subresource.as_deref(),
            namespace: self.target.namespace.as_deref(),
            name: name.as_deref(),
            user: self.user,
        };
        faults
            .take_matching_request(&facts)
            .map(|action| (action, name))
    }
}

async fn serve_resource(
    state: &Arc<ServerState>,
    resolved: Resolved,
    query: &HashMap<String, String>,
    headers: &http::HeaderMap,
    user: &str,
    body: Body,
) -> Result<Response, ApiError> {
    let accept = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Resolved { target, verb } = resolved;
    // kubectl asks for server-side printing; clients that do not are answered with plain objects.
    let as_table = (accept.contains("as=Table") && target.subresource.is_none())
        .then(|| IncludeObject::parse(query.get("includeObject").map(String::as_str)));
    let body = if verb == "watch" {
        Bytes::new()
    } else {
        read_body(body).await?
    };
    let request = ResourceRequest {
        target,
        verb,
        query,
        headers,
        user,
        as_table,
        body,
    };
    let mut late_timeout = None;
    if let Some((action, name)) = request.take_fault(&state.faults) {
        match action {
            FaultAction::Fail(410) if verb == "watch" => {
                let current = state.api.store.lock().resource_version;
                let requested = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(current);
                return expired_watch(requested, current);
            }
            FaultAction::Fail(code) => {
                let target = &request.target;
                return Err(ApiError::injected(
                    code,
                    &InjectedRequest {
                        verb,
                        group: &target.info.group,
                        resource: &target.info.plural,
                        subresource: target.subresource.as_deref(),
                        namespace: target.namespace.as_deref(),
                        name: name.as_deref(),
                        user,
                    },
                ));
            }
            FaultAction::Timeout(hold) => {
                wait_until(state, tokio::time::Instant::now() + hold).await;
                return Err(ApiError::timeout());
            }
            FaultAction::TimeoutAfterApply(hold) => late_timeout = Some(hold),
        }
    }
    let answer = serve_target(state, request).await;
    match late_timeout {
        Some(hold) => {
            wait_until(state, tokio::time::Instant::now() + hold).await;
            Err(ApiError::timeout())
        }
        None => answer,
    }
}

/// Serves a request no fault stopped.
async fn serve_target(
    state: &Arc<ServerState>,
    request: ResourceRequest<'_>,
) -> Result<Response, ApiError> {
    let ResourceRequest {
        target,
        verb,
        query,
        headers,
        user,
        as_table,
        body,
    } = request;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (content_type, user_agent) = (header("content-type"), header("user-agent"));
    let watch_facts = WatchFacts {
        group: &target.info.group,
        resource: &target.info.plural,
        namespace: target.namespace.as_deref(),
        user,
    };
    if verb == "list" || verb == "watch" {
        // A lagging watch cache answers lists (and the initial objects of a watch) only once it caught up.
        let resumes = verb == "watch"
            && !matches!(
                query.get("resourceVersion").map(String::as_str),
                None | Some("" | "0")
            )
            && query.get("sendInitialEvents").is_none_or(|v| v != "true");
        if !resumes {
            if let Some(until) = state
                .faults
                .hold_until(&watch_facts, tokio::time::Instant::now())
            {
                wait_until(state, until).await;
            }
        }
    }
    if verb == "watch" {
        if state.faults.take_expiry(&watch_facts) {
            let current = state.api.store.lock().resource_version;
            let requested = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(current);
            return expired_watch(requested, current);
        }
        return start_watch(state.clone(), target, query, as_table, user);
    }
    let input = RequestInput {
        query,
        content_type,
        body: &body,
        user_agent,
    };
    let api = &state.api;
    let outcome: Result<ApiResponse, ApiError> = match verb {
        "get" => api.get(&target),
        "list" => api.list(&target, &input),
        "create" => api.create(&target, &input),
        "update" => api.update(&target, &input),
        "patch" => api.patch(&target, &input),
        "delete" => api.delete(&target, &input),
        "deletecollection" => api.delete_collection(&target, &input),
        _ => Err(ApiError::method_not_allowed(verb)),
    };
    let answer = outcome?;
    match (as_table, verb) {
        (Some(include), "get" | "list") => {
            let value: Value = serde_json::from_slice(&answer.body)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let (objects, version) = if verb == "list" {
                let version = value
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (
                    value
                        .get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                    version,
                )
            } else {
                (vec![value], None)
            };
            let printed = table(
                &target.info,
                &target.version,
                &objects,
                include,
                version.as_deref(),
                true,
            );
            Ok(json_response(
                answer.code,
                Bytes::from(serde_json::to_vec(&printed).unwrap_or_default()),
                &answer.warnings,
            ))
        }
        _ => Ok(json_response(answer.code, answer.body, &answer.warnings)),
    }
}

/// Renders one watch event's object, as a one-row Table when the watcher asked for tables.
fn event_object(
    target: &Target,
    object: &Bytes,
    as_table: Option<IncludeObject>,
    first: &mut bool,
) -> Bytes {
    let served = ApiState::served_bytes(&target.info, &target.version, object);
    let Some(include) = as_table else {
        return served;
    };
    let Ok(value) = serde_json::from_slice::<Value>(&served) else {
        return served;
    };
    let printed = table(
        &target.info,
        &target.version,
        &[value],
        include,
        None,
        *first,
    );
    *first = false;
    Bytes::from(serde_json::to_vec(&printed).unwrap_or_default())
}

/// Per-watch filter: namespace and selectors.
struct WatchFilter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, namespace: &str, name: &str, labels: &super::store::Labels) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(labels)
            && self.fields.matches(namespace, name)
    }
}

fn watch_line(event_type: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn bookmark_line(target: &Target, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({
        "kind": target.info.kind,
        "apiVersion": target.info.api_version(&target.version),
        "metadata": metadata,
    });
    watch_line("BOOKMARK", object.to_string().as_bytes())
}

fn expired_line(requested: u64, oldest: u64) -> Bytes {
    let status = ApiError::gone(format!("too old resource version: {requested} ({oldest})")).body();
    watch_line("ERROR", status.to_string().as_bytes())
}

fn start_watch(
    state: Arc<ServerState>,
    target: Target,
    query: &HashMap<String, String>,
    as_table: Option<IncludeObject>,
    user: &str,
) -> Result<Response, ApiError> {
    let filter = WatchFilter {
        namespace: target.namespace.clone(),
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let requested = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let from_now = requested.is_empty() || requested == "0";
    let requested_version = if from_now {
        0
    } else {
        requested.parse::<u64>().map_err(|_| {
            ApiError::invalid(
                "WatchOptions",
                "meta.k8s.io",
                "",
                &[(
                    "resourceVersion".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: {requested:?}"),
                )],
            )
        })?
    };
    let user = user.to_string();
    let facts = || WatchFacts {
        group: &target.info.group,
        resource: &target.info.plural,
        namespace: target.namespace.as_deref(),
        user: &user,
    };
    if !from_now && !send_initial {
        // After a drop window, resuming from before its end must relist, like after a compaction.
        let current = state.api.store.lock().resource_version;
        if let Some(floor) =
            state
                .faults
                .resume_floor(&facts(), current, tokio::time::Instant::now())
        {
            if requested_version < floor {
                return expired_watch(requested_version, floor);
            }
        }
    }

    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut initial = Vec::new();
    let mut first_table = true;
    let start_version;
    {
        let inner = state.api.store.lock();
        if from_now || send_initial {
            start_version = inner.resource_version;
            for ((namespace, name), object) in
                inner.range(&target.info.key(), target.namespace.as_deref(), None)
            {
                if filter.matches(namespace, name, &object.labels) {
                    initial.push(watch_line(
                        "ADDED",
                        &event_object(&target, &object.json, as_table, &mut first_table),
                    ));
                }
            }
        } else {
            start_version = requested_version;
        }
    }
    let mut latest = state
        .api
        .store
        .lock()
        .subscribe_resource(&target.info.key());
    let mut signal = state.faults.watch_closer();
    let mut seen_signal = *signal.borrow_and_update();
    let task_state = state.clone();
    tokio::spawn(async move {
        let state = task_state;
        let facts = WatchFacts {
            group: &target.info.group,
            resource: &target.info.plural,
            namespace: target.namespace.as_deref(),
            user: &user,
        };
        for line in initial {
            if sender.send(line).await.is_err() {
                return;
            }
        }
        if send_initial
            && sender
                .send(bookmark_line(&target, start_version, true))
                .await
                .is_err()
        {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cursor = start_version;
        let mut bookmark_timer = tokio::time::interval(state.bookmark_interval);
        bookmark_timer.tick().await;
        let key = target.info.key();
        // The end of the latest drop window this watch was open in: it is closed then.
        let mut close_at: Option<tokio::time::Instant> = None;
        // Once an event was dropped the watch delivers nothing more, bookmarks included, as if the
        // connection broke there: a client that learnt a later resourceVersion would resume past the
        // dropped events and never relist.
        let mut broken = false;
        loop {
            let now = tokio::time::Instant::now();
            if close_at.is_some_and(|at| now >= at) {
                return;
            }
            let gate = state.faults.watch_gate(&facts, now);
            if let Some(ends) = gate.drop_ends() {
                close_at = Some(close_at.map_or(ends, |at| at.max(ends)));
            }
            let mut held_until = None;
            latest.mark_unchanged();
            let batch = state.api.store.lock().events_since(&key, cursor, 512);
            match batch {
                EventsSince::TooOld { requested, oldest } => {
                    let _ = sender.send(expired_line(requested, oldest)).await;
                    return;
                }
                EventsSince::Events(events, scanned_through) => {
                    let had_events = !events.is_empty();
                    for event in events {
                        match gate.fate(&event.namespace, event.resource_version) {
                            EventFate::Deliver if !broken => {}
                            EventFate::Deliver | EventFate::Drop => {
                                broken = true;
                                cursor = event.resource_version;
                                continue;
                            }
                            EventFate::HoldUntil(until) => {
                                // This and every later event wait, so they still arrive in order.
                                held_until = Some(until);
                                cursor = event.resource_version - 1;
                                break;
                            }
                        }
                        let now_matches =
                            filter.matches(&event.namespace, &event.name, &event.labels);
                        let event_type = match event.event_type {
                            EventType::Modified => {
                                let before = event.previous_labels.as_ref().is_some_and(|labels| {
                                    filter.matches(&event.namespace, &event.name, labels)
                                });
                                match (before, now_matches) {
                                    (true, true) => Some("MODIFIED"),
                                    (false, true) => Some("ADDED"),
                                    (true, false) => Some("DELETED"),
                                    (false, false) => None,
                                }
                            }
                            other => now_matches.then_some(other.as_str()),
                        };
                        if let Some(event_type) = event_type {
                            let object =
                                event_object(&target, &event.object, as_table, &mut first_table);
                            if sender.send(watch_line(event_type, &object)).await.is_err() {
                                return;
                            }
                        }
                        cursor = event.resource_version;
                    }
                    if held_until.is_none() {
                        cursor = cursor.max(scanned_through);
                        if had_events {
                            continue;
                        }
                    }
                }
            }
            tokio::select! {
                changed = latest.changed(), if held_until.is_none() => {
                    if changed.is_err() { return; }
                }
                _ = tokio::time::sleep_until(held_until.unwrap_or(deadline)), if held_until.is_some() => {}
                _ = tokio::time::sleep_until(close_at.unwrap_or(deadline)), if close_at.is_some() => return,
                _ = bookmark_timer.tick(), if bookmarks && !broken => {
                    if sender.send(bookmark_line(&target, cursor, false)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                changed = signal.changed() => {
                    if changed.is_err() { return; }
                    let now_signal = *signal.borrow_and_update();
                    if state.faults.closed_since(seen_signal, now_signal, &facts) {
                        return;
                    }
                    seen_signal = now_signal;
                }
                _ = sender.closed() => return,
                _ = state.shutdown.cancelled() => return,
            }
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|line| (Ok::<Bytes, std::io::Error>(line), receiver))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_namespace_resource_name_subresource() {
        let split =
            |p: &str| split_resource_path(&p.split('/').map(str::to_string).collect::<Vec<_>>());
        assert_eq!(
            split("namespaces/ns1/pods"),
            Some((Some("ns1".into()), "pods".into(), None, None))
        );
        assert_eq!(
            split("namespaces/ns1"),
            Some((None, "namespaces".into(), Some("ns1".into()), None))
        );
        assert_eq!(
            split("namespaces/ns1/status"),
            Some((
                None,
                "namespaces".into(),
                Some("ns1".into()),
                Some("status".into())
            ))
        );
        assert_eq!(
            split("namespaces/ns1/deployments/web/scale"),
            Some((
                Some("ns1".into()),
                "deployments".into(),
                Some("web".into()),
                Some("scale".into())
            ))
        );
        assert_eq!(
            split("nodes/n1/proxy"),
            Some((
                None,
                "nodes".into(),
                Some("n1".into()),
                Some("proxy".into())
            ))
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let query = parse_query(Some("labelSelector=app%20in%20(a%2Cb)&watch=1&bad=%zz"));
        assert_eq!(query["labelSelector"], "app in (a,b)");
        assert_eq!(query["watch"], "1");
        assert_eq!(query["bad"], "%zz");
    }
}
