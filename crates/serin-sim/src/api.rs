//! Decides what each resource request does to the store: the kube-apiserver semantics of get, list,
//! create, update, patch and delete, the status/scale subresources, finalizers and garbage collection.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::api_error::{ApiError, ResourceName};
use super::patch::{self, ApplyOptions, MergeSchema, PatchError, PatchType};
use super::registry::{NameRule, Registry, ResourceInfo};
use super::schema;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Store, StoreInner};

/// Largest request body accepted, like kube-apiserver's 3 MiB limit.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Largest object stored, like etcd's default 1.5 MiB request limit that kube-apiserver runs into.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
/// Deepest object stored. kube-apiserver accepts 10,000 levels; serde_json, which the sim and Rust clients
/// parse with, stops at 128, counting the list or watch event around an object. Storing what it cannot
/// serve back would answer an error after the write (half applied) and break every later list.
pub const MAX_NESTING: usize = 100;
const NAMESPACES_KEY: &str = "/namespaces";
const CRD_KEY: &str = "apiextensions.k8s.io/customresourcedefinitions";
const CRD_GROUP: &str = "apiextensions.k8s.io";
const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// The resource a request addresses.
#[derive(Clone, Debug)]
pub struct Target {
    pub info: Arc<ResourceInfo>,
    pub version: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

impl Target {
    fn resource_name(&self) -> ResourceName<'_> {
        ResourceName {
            group: &self.info.group,
            plural: &self.info.plural,
        }
    }

    fn namespace_or_empty(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

/// What the request carried besides its target.
pub struct RequestInput<'a> {
    pub query: &'a HashMap<String, String>,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub user_agent: &'a str,
}

impl RequestInput<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun").is_some_and(|v| v == "All")
    }

    fn field_manager(&self) -> String {
        match self.param("fieldManager") {
            Some(manager) if !manager.is_empty() => manager.to_string(),
            _ => self
                .user_agent
                .split('/')
                .next()
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct ApiResponse {
    pub code: u16,
    pub body: Bytes,
    pub warnings: Vec<String>,
}

impl ApiResponse {
    fn json(code: u16, value: &Value) -> Result<ApiResponse, ApiError> {
        let body = serde_json::to_vec(value).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(ApiResponse {
            code,
            body: Bytes::from(body),
            warnings: Vec::new(),
        })
    }
}

pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn name_errors(rule: NameRule, name: &str) -> Option<String> {
    let valid = match rule {
        NameRule::Subdomain => name.len() <= 253 && name.split('.').all(is_dns_label),
        NameRule::Label => is_dns_label(name),
        NameRule::Dns1035Label => {
            is_dns_label(name) && name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        }
    };
    if valid {
        return None;
    }
    Some(match rule {
        NameRule::Subdomain => format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
        NameRule::Label => format!("Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"),
        NameRule::Dns1035Label => format!("Invalid value: \"{name}\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"),
    })
}

/// Parses a JSON or YAML request body into an object.
pub fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !(media.is_empty()
        || media.ends_with("json")
        || media.ends_with("yaml")
        || media == "*/*"
        || media.starts_with("text/"))
    {
        return Err(ApiError::unsupported_media_type(
            content_type,
            &["application/json", "application/yaml"],
        ));
    }
    let value: Value = if content_type.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: cannot unmarshal {} into Go value of type struct",
            type_name(&value)
        )));
    }
    Ok(value)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    let Value::Object(root) = object else {
        unreachable!("replaced by an object above")
    };
    let metadata = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    let Value::Object(map) = metadata else {
        unreachable!("replaced by an object above")
    };
    map
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn finalizers_of(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(object: &mut Value, finalizers: &[String]) {
    let metadata = metadata_mut(object);
    if finalizers.is_empty() {
        metadata.remove("finalizers");
    } else {
        metadata.insert("finalizers".into(), json!(finalizers));
    }
}

/// `.spec.replicas` -> ["spec", "replicas"].
fn path_segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
        .collect()
}

fn get_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    path_segments(path)
        .iter()
        .try_fold(object, |value, segment| value.get(*segment))
}

fn set_path(object: &mut Value, path: &str, new_value: Value) {
    let segments = path_segments(path);
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut cursor = object;
    for segment in parents {
        let Some(map) = cursor.as_object_mut() else {
            return;
        };
        let entry = map
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        cursor = entry;
    }
    if let Some(map) = cursor.as_object_mut() {
        map.insert(last.to_string(), new_value);
    }
}

/// A LabelSelector object rendered in query syntax, as Scale.status.selector carries it.
fn selector_string(selector: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (key, value) in labels {
            parts.push(format!("{key}={}", value.as_str().unwrap_or_default()));
        }
    }
    if let Some(expressions) = selector.get("matchExpressions").and_then(Value::as_array) {
        for expression in expressions {
            let key = expression
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let values: Vec<&str> = expression
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match expression.get("operator").and_then(Value::as_str) {
                Some("In") => parts.push(format!("{key} in ({})", values.join(","))),
                Some("NotIn") => parts.push(format!("{key} notin ({})", values.join(","))),
                Some("Exists") => parts.push(key.to_string()),
                Some("DoesNotExist") => parts.push(format!("!{key}")),
                _ => {}
            }
        }
    }
    parts.join(",")
}

/// What a real server's registry strategy normalizes before storing: Secret `stringData` folds into
/// base64 `data`.
fn normalize_builtin(info: &ResourceInfo, object: &mut Value) {
    use base64::Engine;
    if info.custom || !info.group.is_empty() || info.plural != "secrets" {
        return;
    }
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    if let Some(data) = data.as_object_mut() {
        for (key, value) in string_data {
            let text = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            data.insert(
                key,
                Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
}

/// Whether two objects' maps hold equal values under every key not in `skip`, without copying them
/// (every write compares whole objects, which a copy per comparison made the sim's main cost).
fn equal_except(a: &Value, b: &Value, skip: &[&str]) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let kept = |map: &'_ serde_json::Map<String, Value>| {
                map.iter()
                    .filter(|(key, _)| !skip.contains(&key.as_str()))
                    .count()
            };
            kept(a) == kept(b)
                && a.iter()
                    .filter(|(key, _)| !skip.contains(&key.as_str()))
                    .all(|(key, value)| b.get(key) == Some(value))
        }
        _ => a == b,
    }
}

/// Equal but for `metadata.managedFields` and `metadata.resourceVersion`.
fn equal_but_volatile_metadata(a: &Value, b: &Value) -> bool {
    let none = Value::Null;
    equal_except(a, b, &["metadata"])
        && equal_except(
            a.get("metadata").unwrap_or(&none),
            b.get("metadata").unwrap_or(&none),
            &["managedFields", "resourceVersion"],
        )
}

/// Equal but for `metadata` and `status` (what `metadata.generation` counts).
fn equal_spec(a: &Value, b: &Value) -> bool {
    equal_except(a, b, &["metadata", "status"])
}

fn map_patch_error(error: PatchError, target: &Target, name: &str) -> ApiError {
    match error {
        PatchError::MalformedPatch(message) => ApiError::bad_request(message),
        PatchError::InvalidResult(message) | PatchError::TestFailed(message) => ApiError::invalid(
            &target.info.kind,
            &target.info.group,
            name,
            &[(String::new(), "FieldValueInvalid", message)],
        ),
        PatchError::ApplyConflict { conflicts } => {
            let lines: Vec<String> = conflicts
                .iter()
                .map(|(manager, field)| format!("conflict with \"{manager}\": {field}"))
                .collect();
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|(manager, field)| {
                    json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{manager}\""), "field": field})
                })
                .collect();
            ApiError {
                details: Some(
                    json!({"name": name, "group": target.info.group, "kind": target.info.plural, "causes": causes}),
                ),
                ..ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflict{}: {}",
                        conflicts.len(),
                        if conflicts.len() == 1 { "" } else { "s" },
                        lines.join("\n")
                    ),
                )
            }
        }
    }
}

/// How the patch engine merges lists of this resource: compiled-in for built-ins, the CRD's schema otherwise.
fn merge_schema(target: &Target) -> MergeSchema<'_> {
    match (target.info.custom, target.info.schemas.get(&target.version)) {
        (true, Some(schema)) => MergeSchema::Structural(schema),
        (true, None) => MergeSchema::Unknown,
        (false, _) => MergeSchema::Builtin {
            group: &target.info.group,
            kind: &target.info.kind,
        },
    }
}

/// Deletion policy for dependents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

/// Side effects of a removal cascade the API layer must finish outside the store.
#[derive(Default)]
struct Cascade {
    removed_crds: Vec<Value>,
}

/// The simulated API server's state: served resources and stored objects.
pub struct ApiState {
    pub registry: Registry,
    pub store: Store,
}

impl ApiState {
    pub fn new(event_window: usize) -> ApiState {
        let state = ApiState {
            registry: Registry::with_builtins(),
            store: Store::new(event_window),
        };
        {
            let mut inner = state.store.lock();
            for namespace in ["default", "kube-system", "kube-public"] {
                let object = json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now_rfc3339(), "labels": {"kubernetes.io/metadata.name": namespace}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                });
                let _ = inner.put(NAMESPACES_KEY, "", namespace, object);
            }
        }
        state
    }

    fn commit_notify(&self, inner: &StoreInner) {
        self.store.notify(inner.resource_version);
    }

    /// The stored JSON rewritten to the requested version when a CRD serves several.
    pub fn served_bytes(info: &ResourceInfo, version: &str, json: &Bytes) -> Bytes {
        if info.versions.len() <= 1 || version == info.storage_version {
            return json.clone();
        }
        match serde_json::from_slice::<Value>(json) {
            Ok(mut value) => {
                if let Some(map) = value.as_object_mut() {
                    map.insert(
                        "apiVersion".into(),
                        Value::String(info.api_version(version)),
                    );
                }
                serde_json::to_vec(&value)
                    .map(Bytes::from)
                    .unwrap_or_else(|_| json.clone())
            }
            Err(_) => json.clone(),
        }
    }

    fn served_value(info: &ResourceInfo, version: &str, mut value: Value) -> Value {
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "apiVersion".into(),
                Value::String(info.api_version(version)),
            );
        }
        value
    }

    fn stored_value(inner: &StoreInner, target: &Target, name: &str) -> Result<Value, ApiError> {
        let stored = inner
            .get(&target.info.key(), target.namespace_or_empty(), name)
            .ok_or_else(|| ApiError::not_found(&target.resource_name(), name))?;
        stored
            .value()
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    pub fn get(&self, target: &Target) -> Result<ApiResponse, ApiError> {
        let name = target.name.as_deref().unwrap_or_default();
        let inner = self.store.lock();
        let value = ApiState::stored_value(&inner, target, name)?;
        drop(inner);
        if target.subresource.as_deref() == Some("scale") {
            return ApiResponse::json(200, &scale_document(&target.info, &value)?);
        }
        ApiResponse::json(
            200,
            &ApiState::served_value(&target.info, &target.version, value),
        )
    }

    pub fn list(&self, target: &Target, input: &RequestInput<'_>) -> Result<ApiResponse, ApiError> {
        let labels = LabelSelector::parse(input.param("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(input.param("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let limit = match input.param("limit") {
            Some(text) => text
                .parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {text:?}")))?,
            None => 0,
        };
        let inner = self.store.lock();
        let (list_version, after) = match input.param("continue").filter(|t| !t.is_empty()) {
            Some(token) => {
                let (version, key) = decode_continue(token)?;
                if version < inner.compacted_through {
                    return Err(ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."));
                }
                (version, Some(key))
            }
            None => (inner.resource_version, None),
        };
        let mut items: Vec<Bytes> = Vec::new();
        let mut next_key = None;
        let mut remaining = 0usize;
        for ((namespace, name), object) in
            inner.range(&target.info.key(), target.namespace.as_deref(), after)
        {
            if !labels.matches(&object.labels) || !fields.matches(namespace, name) {
                continue;
            }
            if limit > 0 && items.len() == limit {
                if next_key.is_none() {
                    next_key = Some((namespace.clone(), name.clone()));
                }
                remaining += 1;
                continue;
            }
            items.push(ApiState::served_bytes(
                &target.info,
                &target.version,
                &object.json,
            ));
        }
        drop(inner);
        let mut list_metadata = json!({"resourceVersion": list_version.to_string()});
        if let Some(key) = next_key {
            // The continue token names the last returned object, so the next page starts right after it.
            let last = items_last_key(&items).unwrap_or(key);
            list_metadata["continue"] = json!(encode_continue(list_version, &last));
            list_metadata["remainingItemCount"] = json!(remaining);
        }
        let header = json!({
            "kind": format!("{}List", target.info.kind),
            "apiVersion": target.info.api_version(&target.version),
            "metadata": list_metadata,
        });
        let mut body =
            serde_json::to_vec(&header).map_err(|e| ApiError::internal(e.to_string()))?;
        body.pop();
        body.extend_from_slice(b",\"items\":[");
        for (index, item) in items.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        Ok(ApiResponse {
            code: 200,
            body: Bytes::from(body),
            warnings: Vec::new(),
        })
    }

    fn check_type(target: &Target, object: &Value) -> Result<(), ApiError> {
        let expected_version = target.info.api_version(&target.version);
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind.is_empty() {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{}'",
                truncate(object)
            )));
        }
        if api_version.is_empty() {
            return Err(ApiError::bad_request(format!(
                "Object 'apiVersion' is missing in '{}'",
                truncate(object)
            )));
        }
        if api_version != expected_version {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({expected_version})"
            )));
        }
        if kind != target.info.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                target.info.kind
            )));
        }
        Ok(())
    }

    fn check_namespace(target: &Target, object: &mut Value) -> Result<(), ApiError> {
        if !target.info.namespaced {
            metadata_mut(object).remove("namespace");
            return Ok(());
        }
        let url_namespace = target.namespace_or_empty().to_string();
        match meta_str(object, "namespace") {
            Some(ns) if !ns.is_empty() && ns != url_namespace => Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )),
            _ => {
                metadata_mut(object).insert("namespace".into(), Value::String(url_namespace));
                Ok(())
            }
        }
    }

    /// Schema validation and pruning for custom resources; returns warnings.
    fn validate_custom(
        target: &Target,
        name: &str,
        object: &mut Value,
        old: Option<&Value>,
        input: &RequestInput<'_>,
    ) -> Result<Vec<String>, ApiError> {
        if !target.info.custom {
            return Ok(Vec::new());
        }
        let Some(schema) = target.info.schemas.get(&target.version) else {
            return Ok(Vec::new());
        };
        let outcome = schema::validate_and_prune(schema, object, old);
        let mut warnings = Vec::new();
        if !outcome.pruned_fields.is_empty() {
            match input.param("fieldValidation").unwrap_or("Warn") {
                "Strict" => {
                    let fields: Vec<String> = outcome
                        .pruned_fields
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "strict decoding error: {}",
                        fields.join(", ")
                    )));
                }
                "Ignore" => {}
                _ => warnings.extend(
                    outcome
                        .pruned_fields
                        .iter()
                        .map(|f| format!("unknown field \"{f}\"")),
                ),
            }
        }
        if !outcome.errors.is_empty() {
            let causes: Vec<(String, &str, String)> = outcome
                .errors
                .iter()
                .map(|e| (e.path.clone(), e.reason, e.message.clone()))
                .collect();
            return Err(ApiError::invalid(
                &target.info.kind,
                &target.info.group,
                name,
                &causes,
            ));
        }
        Ok(warnings)
    }

    fn resolve_name(target: &Target, object: &mut Value) -> Result<String, ApiError> {
        let name = match meta_str(object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(object, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let prefix: String = prefix.chars().take(58).collect();
                    let generated = format!("{prefix}{}", random_suffix());
                    metadata_mut(object).insert("name".into(), Value::String(generated.clone()));
                    generated
                }
                None => {
                    return Err(ApiError::invalid(
                        &target.info.kind,
                        &target.info.group,
                        "",
                        &[(
                            "metadata.name".into(),
                            "FieldValueRequired",
                            "Required value: name or generateName is required".into(),
                        )],
                    ))
                }
            },
        };
        if let Some(message) = name_errors(target.info.name_rule, &name) {
            return Err(ApiError::invalid(
                &target.info.kind,
                &target.info.group,
                &name,
                &[("metadata.name".into(), "FieldValueInvalid", message)],
            ));
        }
        Ok(name)
    }

    pub fn create(
        &self,
        target: &Target,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let mut object = parse_body(input.body, input.content_type)?;
        ApiState::check_type(target, &object)?;
        let mut inner = self.store.lock();
        let (stored, warnings) = self.create_locked(&mut inner, target, &mut object, input)?;
        let mut response = ApiResponse::json(
            201,
            &ApiState::served_value(&target.info, &target.version, stored),
        )?;
        response.warnings = warnings;
        self.commit_notify(&inner);
        Ok(response)
    }

    fn create_locked(
        &self,
        inner: &mut StoreInner,
        target: &Target,
        object: &mut Value,
        input: &RequestInput<'_>,
    ) -> Result<(Value, Vec<String>), ApiError> {
        ApiState::check_namespace(target, object)?;
        let name = ApiState::resolve_name(target, object)?;
        if target.info.namespaced
            && inner
                .get(NAMESPACES_KEY, "", target.namespace_or_empty())
                .is_none()
        {
            return Err(ApiError::not_found(
                &ResourceName {
                    group: "",
                    plural: "namespaces",
                },
                target.namespace_or_empty(),
            ));
        }
        if inner
            .get(&target.info.key(), target.namespace_or_empty(), &name)
            .is_some()
        {
            return Err(ApiError::already_exists(&target.resource_name(), &name));
        }
        let warnings = ApiState::validate_custom(target, &name, object, None, input)?;
        normalize_builtin(&target.info, object);
        if target.info.status_subresource {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        let now = now_rfc3339();
        let tracks_generation = target.info.tracks_generation(object);
        {
            let metadata = metadata_mut(object);
            metadata.insert(
                "uid".into(),
                Value::String(uuid::Uuid::new_v4().to_string()),
            );
            metadata.insert("creationTimestamp".into(), Value::String(now.clone()));
            for field in [
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "resourceVersion",
                "selfLink",
            ] {
                metadata.remove(field);
            }
            if tracks_generation {
                metadata.insert("generation".into(), json!(1));
            } else {
                metadata.remove("generation");
            }
        }
        if let Some(map) = object.as_object_mut() {
            map.insert(
                "apiVersion".into(),
                Value::String(target.info.api_version(&target.info.storage_version)),
            );
        }
        if target.info.key() == CRD_KEY {
            self.prepare_crd(target, &name, object)?;
        }
        patch::record_update_with_schema(
            None,
            object,
            &input.field_manager(),
            &now,
            None,
            &merge_schema(target),
        );
        if input.dry_run() {
            return Ok((object.clone(), warnings));
        }
        check_stored_size(object)?;
        let stored = inner
            .put(
                &target.info.key(),
                target.namespace_or_empty(),
                &name,
                object.clone(),
            )
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let value = stored
            .value()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if target.info.key() == CRD_KEY {
            self.register_crd(&value);
        }
        Ok((value, warnings))
    }

    /// Checks a CRD and fills in the status a real server sets once names are accepted.
    fn prepare_crd(&self, target: &Target, name: &str, object: &mut Value) -> Result<(), ApiError> {
        let invalid = |field: &str, message: String| {
            ApiError::invalid(
                &target.info.kind,
                CRD_GROUP,
                name,
                &[(field.to_string(), "FieldValueInvalid", message)],
            )
        };
        let info = Registry::info_from_crd(object).map_err(|message| invalid("spec", message))?;
        let expected_name = format!("{}.{}", info.plural, info.group);
        if name != expected_name {
            return Err(invalid(
                "metadata.name",
                format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
            ));
        }
        let mut causes = Vec::new();
        for (version, schema) in &info.schemas {
            for error in schema::check_crd_schema(schema) {
                causes.push((
                    format!(
                        "spec.versions[{version}].schema.openAPIV3Schema{}",
                        error.path
                    ),
                    error.reason,
                    error.message,
                ));
            }
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(
                &target.info.kind,
                CRD_GROUP,
                name,
                &causes,
            ));
        }
        let now = now_rfc3339();
        let names = object
            .pointer("/spec/names")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let mut accepted = names;
        if let Some(map) = accepted.as_object_mut() {
            map.entry("singular")
                .or_insert_with(|| json!(info.singular));
            map.entry("listKind")
                .or_insert_with(|| json!(format!("{}List", info.kind)));
        }
        let condition = |kind: &str, reason: &str, message: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
        if let Some(map) = object.as_object_mut() {
            map.insert(
                "status".into(),
                json!({
                    "acceptedNames": accepted,
                    "storedVersions": [info.storage_version],
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                        condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                }),
            );
        }
        Ok(())
    }

    fn register_crd(&self, crd: &Value) {
        if let Ok(info) = Registry::info_from_crd(crd) {
            if let Some(old) =
                self.registry
                    .lookup(&info.group, &info.storage_version, &info.plural)
            {
                if old.custom {
                    self.registry.insert(info);
                }
                return;
            }
            if self
                .registry
                .all()
                .iter()
                .any(|r| r.group == info.group && r.plural == info.plural && !r.custom)
            {
                return;
            }
            self.registry.insert(info);
        }
    }

    pub fn update(
        &self,
        target: &Target,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let name = target.name.clone().unwrap_or_default();
        let body = parse_body(input.body, input.content_type)?;
        if target.subresource.as_deref() == Some("scale") {
            let mut inner = self.store.lock();
            let response = self.write_scale(&mut inner, target, &name, &body, input)?;
            self.commit_notify(&inner);
            return Ok(response);
        }
        ApiState::check_type(target, &body)?;
        if let Some(body_name) = meta_str(&body, "name") {
            if body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
        }
        let mut inner = self.store.lock();
        let current = ApiState::stored_value(&inner, target, &name)?;
        let response = self.update_locked(&mut inner, target, &name, &current, body, input)?;
        self.commit_notify(&inner);
        Ok(response)
    }

    /// The common tail of PUT and PATCH: merge the write into the stored object and commit it.
    fn update_locked(
        &self,
        inner: &mut StoreInner,
        target: &Target,
        name: &str,
        current: &Value,
        mut new: Value,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        if let Some(requested) = meta_str(&new, "resourceVersion").filter(|v| !v.is_empty()) {
            if Some(requested) != meta_str(current, "resourceVersion") {
                return Err(ApiError::stale_update(&target.resource_name(), name));
            }
        }
        ApiState::check_namespace(target, &mut new)?;
        metadata_mut(&mut new).insert("name".into(), Value::String(name.to_string()));
        let on_status = target.subresource.as_deref() == Some("status");
        if on_status {
            let status = new.get("status").cloned();
            new = current.clone();
            if let Some(map) = new.as_object_mut() {
                match status {
                    Some(status) => map.insert("status".into(), status),
                    None => map.remove("status"),
                };
            }
        } else {
            if target.info.status_subresource {
                if let Some(map) = new.as_object_mut() {
                    match current.get("status") {
                        Some(status) => map.insert("status".into(), status.clone()),
                        None => map.remove("status"),
                    };
                }
            }
            let preserved: Vec<(&str, Option<Value>)> = [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ]
            .into_iter()
            .map(|field| {
                (
                    field,
                    current.get("metadata").and_then(|m| m.get(field)).cloned(),
                )
            })
            .collect();
            let metadata = metadata_mut(&mut new);
            for (field, value) in preserved {
                match value {
                    Some(value) => metadata.insert(field.into(), value),
                    None => metadata.remove(field),
                };
            }
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                let old_finalizers = finalizers_of(current);
                let new_finalizers = finalizers_of(&new);
                if new_finalizers.iter().any(|f| !old_finalizers.contains(f)) {
                    return Err(ApiError::invalid(
                        &target.info.kind,
                        &target.info.group,
                        name,
                        &[("metadata.finalizers".into(), "FieldValueForbidden", "Forbidden: no new finalizers can be added if the object is being deleted".into())],
                    ));
                }
            }
        }
        if let Some(map) = new.as_object_mut() {
            map.insert(
                "apiVersion".into(),
                Value::String(target.info.api_version(&target.info.storage_version)),
            );
        }
        let mut warnings = Vec::new();
        if !on_status {
            // Only custom resources are validated against the old object: built-in ones skip the copy.
            if target.info.custom {
                let mut served_old = current.clone();
                if let Some(map) = served_old.as_object_mut() {
                    map.insert(
                        "apiVersion".into(),
                        Value::String(target.info.api_version(&target.version)),
                    );
                }
                warnings =
                    ApiState::validate_custom(target, name, &mut new, Some(&served_old), input)?;
            }
            if let Some(map) = new.as_object_mut() {
                map.insert(
                    "apiVersion".into(),
                    Value::String(target.info.api_version(&target.info.storage_version)),
                );
            }
            if target.info.tracks_generation(&new) && !equal_spec(&new, current) {
                let generation = current
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                metadata_mut(&mut new).insert("generation".into(), json!(generation + 1));
            }
        }
        normalize_builtin(&target.info, &mut new);
        if target.info.key() == CRD_KEY && !on_status {
            self.prepare_crd(target, name, &mut new)?;
        }
        patch::record_update_with_schema(
            Some(current),
            &mut new,
            &input.field_manager(),
            &now_rfc3339(),
            target.subresource.as_deref(),
            &merge_schema(target),
        );
        let served = |value: Value| ApiState::served_value(&target.info, &target.version, value);
        if equal_but_volatile_metadata(&new, current) {
            let mut response = ApiResponse::json(200, &served(current.clone()))?;
            response.warnings = warnings;
            return Ok(response);
        }
        if input.dry_run() {
            let mut response = ApiResponse::json(200, &served(new))?;
            response.warnings = warnings;
            return Ok(response);
        }
        let key = target.info.key();
        let namespace = target.namespace_or_empty();
        let result = if new.pointer("/metadata/deletionTimestamp").is_some()
            && finalizers_of(&new).is_empty()
        {
            let mut cascade = Cascade::default();
            let removed = remove_and_collect(inner, &key, namespace, name, &mut cascade);
            self.finish_cascade(cascade);
            removed.map(|value| {
                let mut value = value;
                set_finalizers(&mut value, &[]);
                value
            })
        } else {
            check_stored_size(&new)?;
            let stored = inner
                .put(&key, namespace, name, new)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if target.info.key() == CRD_KEY {
                if let Ok(value) = stored.value() {
                    self.register_crd(&value);
                }
            }
            stored.value().ok()
        };
        let value = result.ok_or_else(|| ApiError::internal("object vanished during update"))?;
        let mut response = ApiResponse::json(200, &served(value))?;
        response.warnings = warnings;
        Ok(response)
    }

    fn write_scale(
        &self,
        inner: &mut StoreInner,
        target: &Target,
        name: &str,
        scale: &Value,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let paths = target
            .info
            .scale
            .clone()
            .ok_or_else(ApiError::unknown_resource)?;
        let current = ApiState::stored_value(inner, target, name)?;
        if let Some(requested) = meta_str(scale, "resourceVersion").filter(|v| !v.is_empty()) {
            if Some(requested) != meta_str(&current, "resourceVersion") {
                return Err(ApiError::stale_update(&target.resource_name(), name));
            }
        }
        let replicas = scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                name,
                &[(
                    "spec.replicas".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: {replicas}: must be greater than or equal to 0"),
                )],
            ));
        }
        let mut new = current.clone();
        set_path(&mut new, &paths.spec_replicas, json!(replicas));
        let main_target = Target {
            subresource: None,
            ..target.clone()
        };
        let mut served = ApiState::served_value(&target.info, &target.version, new);
        metadata_mut(&mut served).remove("resourceVersion");
        self.update_locked(inner, &main_target, name, &current, served, input)?;
        let updated = ApiState::stored_value(inner, target, name)?;
        ApiResponse::json(200, &scale_document(&target.info, &updated)?)
    }

    pub fn patch(
        &self,
        target: &Target,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let name = target.name.clone().unwrap_or_default();
        let accepted: &[&str] = if target.info.custom {
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ]
        } else {
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
                "application/strategic-merge-patch+json",
            ]
        };
        let patch_type = PatchType::from_content_type(input.content_type)
            .filter(|t| !(target.info.custom && *t == PatchType::StrategicMerge))
            .ok_or_else(|| ApiError::unsupported_media_type(input.content_type, accepted))?;
        let patch_body: Value = if patch_type == PatchType::Apply {
            serde_yaml::from_slice(input.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
        } else {
            serde_json::from_slice(input.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
        };
        let manager = input.field_manager();
        if patch_type == PatchType::Apply && input.param("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
        }
        let now = now_rfc3339();
        let options = ApplyOptions {
            field_manager: &manager,
            force: input.param("force").is_some_and(|v| v == "true"),
            now: &now,
        };
        let schema_value = target.info.schemas.get(&target.version);
        let schema = match (target.info.custom, schema_value) {
            (true, Some(schema)) => MergeSchema::Structural(schema),
            (true, None) => MergeSchema::Unknown,
            (false, _) => MergeSchema::Builtin {
                group: &target.info.group,
                kind: &target.info.kind,
            },
        };
        let mut inner = self.store.lock();
        let current = match inner.get(&target.info.key(), target.namespace_or_empty(), &name) {
            Some(stored) => Some(
                stored
                    .value()
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            ),
            None => None,
        };
        let Some(current) = current else {
            if patch_type != PatchType::Apply || target.subresource.is_some() {
                return Err(ApiError::not_found(&target.resource_name(), &name));
            }
            if !patch_body.is_object() {
                return Err(ApiError::bad_request("apply patch must be an object"));
            }
            ApiState::check_type(target, &patch_body)?;
            let mut created = patch::server_side_apply(None, &patch_body, &options, &schema)
                .map_err(|e| map_patch_error(e, target, &name))?;
            metadata_mut(&mut created).insert("name".into(), Value::String(name.clone()));
            let (stored, warnings) = self.create_locked(&mut inner, target, &mut created, input)?;
            let mut response = ApiResponse::json(
                201,
                &ApiState::served_value(&target.info, &target.version, stored),
            )?;
            response.warnings = warnings;
            self.commit_notify(&inner);
            return Ok(response);
        };
        let on_scale = target.subresource.as_deref() == Some("scale");
        let document = if on_scale {
            scale_document(&target.info, &current)?
        } else {
            ApiState::served_value(&target.info, &target.version, current.clone())
        };
        let patched = if patch_type == PatchType::Apply {
            patch::server_side_apply(Some(&document), &patch_body, &options, &schema)
        } else {
            patch::apply_patch(patch_type, &document, &patch_body, &schema)
        }
        .map_err(|e| map_patch_error(e, target, &name))?;
        let response = if on_scale {
            self.write_scale(&mut inner, target, &name, &patched, input)?
        } else {
            ApiState::check_type(target, &patched)?;
            self.update_locked(&mut inner, target, &name, &current, patched, input)?
        };
        self.commit_notify(&inner);
        Ok(response)
    }

    pub fn delete(
        &self,
        target: &Target,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let name = target.name.clone().unwrap_or_default();
        let options: Value = if input.body.is_empty() {
            json!({})
        } else {
            parse_body(input.body, input.content_type)?
        };
        let policy_text = input
            .param("propagationPolicy")
            .map(str::to_string)
            .or_else(|| {
                options
                    .get("propagationPolicy")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .or_else(
                || match options.get("orphanDependents").and_then(Value::as_bool) {
                    Some(true) => Some("Orphan".into()),
                    _ => None,
                },
            );
        let policy = match policy_text.as_deref() {
            None | Some("Background") => Propagation::Background,
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            Some(other) => {
                return Err(ApiError::invalid("DeleteOptions", "meta.k8s.io", "", &[("propagationPolicy".into(), "FieldValueNotSupported", format!("Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""))]))
            }
        };
        let dry_run = input.dry_run()
            || options
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|v| v == "All"));
        let mut inner = self.store.lock();
        let current = ApiState::stored_value(&inner, target, &name)?;
        if let Some(preconditions) = options.get("preconditions") {
            let mismatch = |field: &str| {
                preconditions
                    .get(field)
                    .and_then(Value::as_str)
                    .is_some_and(|wanted| Some(wanted) != meta_str(&current, field))
            };
            if mismatch("uid") || mismatch("resourceVersion") {
                return Err(ApiError::conflict(
                    &target.resource_name(),
                    &name,
                    "Precondition failed: the object has been modified",
                ));
            }
        }
        if dry_run {
            return ApiResponse::json(
                200,
                &ApiState::served_value(&target.info, &target.version, current),
            );
        }
        let mut cascade = Cascade::default();
        let outcome = delete_locked(
            &mut inner,
            &target.info.key(),
            target.namespace_or_empty(),
            &name,
            policy,
            &mut cascade,
        )?;
        self.finish_cascade(cascade);
        self.commit_notify(&inner);
        drop(inner);
        match outcome {
            DeleteOutcome::Pending(value) => ApiResponse::json(
                200,
                &ApiState::served_value(&target.info, &target.version, value),
            ),
            DeleteOutcome::Removed(value) => {
                if target.info.custom
                    || target.info.plural == "pods"
                    || target.info.plural == "namespaces"
                {
                    ApiResponse::json(
                        200,
                        &ApiState::served_value(&target.info, &target.version, value),
                    )
                } else {
                    ApiResponse::json(
                        200,
                        &json!({
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Success",
                            "details": {"name": name, "group": target.info.group, "kind": target.info.plural, "uid": meta_str(&value, "uid")},
                        }),
                    )
                }
            }
        }
    }

    pub fn delete_collection(
        &self,
        target: &Target,
        input: &RequestInput<'_>,
    ) -> Result<ApiResponse, ApiError> {
        let labels = LabelSelector::parse(input.param("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(input.param("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let mut inner = self.store.lock();
        let key = target.info.key();
        let chosen: Vec<(String, String)> = inner
            .range(&key, target.namespace.as_deref(), None)
            .filter(|((ns, name), object)| {
                labels.matches(&object.labels) && fields.matches(ns, name)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        let mut cascade = Cascade::default();
        for (namespace, name) in chosen {
            if let Ok(DeleteOutcome::Removed(value) | DeleteOutcome::Pending(value)) = delete_locked(
                &mut inner,
                &key,
                &namespace,
                &name,
                Propagation::Background,
                &mut cascade,
            ) {
                items.push(ApiState::served_value(&target.info, &target.version, value));
            }
        }
        self.finish_cascade(cascade);
        self.commit_notify(&inner);
        let version = inner.resource_version.to_string();
        drop(inner);
        ApiResponse::json(
            200,
            &json!({
                "kind": format!("{}List", target.info.kind),
                "apiVersion": target.info.api_version(&target.version),
                "metadata": {"resourceVersion": version},
                "items": items,
            }),
        )
    }

    fn finish_cascade(&self, cascade: Cascade) {
        for crd in cascade.removed_crds {
            if let Ok(info) = Registry::info_from_crd(&crd) {
                if self
                    .registry
                    .all()
                    .iter()
                    .any(|r| r.custom && r.group == info.group && r.plural == info.plural)
                {
                    self.registry.remove(&info.group, &info.plural);
                }
            }
        }
    }
}

fn truncate(object: &Value) -> String {
    let text = object.to_string();
    text.chars().take(200).collect()
}

fn items_last_key(items: &[Bytes]) -> Option<(String, String)> {
    let last: Value = serde_json::from_slice(items.last()?).ok()?;
    Some((
        meta_str(&last, "namespace").unwrap_or("").to_string(),
        meta_str(&last, "name")?.to_string(),
    ))
}

fn encode_continue(version: u64, key: &(String, String)) -> String {
    use base64::Engine;
    let token = json!({"rv": version, "ns": key.0, "name": key.1});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    use base64::Engine;
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let version = value
        .get("rv")
        .and_then(Value::as_u64)
        .ok_or_else(invalid)?;
    let namespace = value
        .get("ns")
        .and_then(Value::as_str)
        .ok_or_else(invalid)?;
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(invalid)?;
    Ok((version, (namespace.to_string(), name.to_string())))
}

/// The autoscaling/v1 Scale view of an object with a scale subresource.
pub fn scale_document(info: &ResourceInfo, object: &Value) -> Result<Value, ApiError> {
    let paths = info.scale.as_ref().ok_or_else(ApiError::unknown_resource)?;
    let replicas = get_path(object, &paths.spec_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let status_replicas = get_path(object, &paths.status_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let selector = match &paths.label_selector {
        Some(path) => get_path(object, path)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        None => object
            .pointer("/spec/selector")
            .map(selector_string)
            .unwrap_or_default(),
    };
    let metadata = object.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut scale_metadata = Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(value) = metadata.get(field) {
            scale_metadata.insert(field.into(), value.clone());
        }
    }
    let mut status = json!({"replicas": status_replicas});
    if !selector.is_empty() {
        status["selector"] = json!(selector);
    }
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_metadata,
        "spec": {"replicas": replicas},
        "status": status,
    }))
}

enum DeleteOutcome {
    Pending(Value),
    Removed(Value),
}

/// Deletes one object honouring finalizers and the propagation policy.
fn delete_locked(
    inner: &mut StoreInner,
    key: &str,
    namespace: &str,
    name: &str,
    policy: Propagation,
    cascade: &mut Cascade,
) -> Result<DeleteOutcome, ApiError> {
    let stored = inner
        .get(key, namespace, name)
        .ok_or_else(|| ApiError::internal("object vanished"))?;
    let uid = stored.uid.to_string();
    let mut value = stored
        .value()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let dependents = inner.dependents_of(&uid);
    if policy == Propagation::Orphan {
        for (dep_key, dep_ns, dep_name) in &dependents {
            drop_owner_reference(inner, dep_key, dep_ns, dep_name, &uid);
        }
    }
    let mut finalizers = finalizers_of(&value);
    if policy == Propagation::Foreground
        && !dependents.is_empty()
        && !finalizers.iter().any(|f| f == FOREGROUND_FINALIZER)
    {
        finalizers.push(FOREGROUND_FINALIZER.into());
    }
    if finalizers.is_empty() {
        let removed = remove_and_collect(inner, key, namespace, name, cascade);
        return removed
            .map(DeleteOutcome::Removed)
            .ok_or_else(|| ApiError::internal("object vanished"));
    }
    let already_deleting = value.pointer("/metadata/deletionTimestamp").is_some();
    let foreground_added = finalizers.len() != finalizers_of(&value).len();
    if !already_deleting || foreground_added {
        set_finalizers(&mut value, &finalizers);
        let metadata = metadata_mut(&mut value);
        metadata
            .entry("deletionTimestamp")
            .or_insert_with(|| Value::String(now_rfc3339()));
        metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
        inner
            .put(key, namespace, name, value)
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    if policy == Propagation::Foreground {
        for (dep_key, dep_ns, dep_name) in dependents {
            if inner.get(&dep_key, &dep_ns, &dep_name).is_some() {
                let _ = delete_locked(
                    inner,
                    &dep_key,
                    &dep_ns,
                    &dep_name,
                    Propagation::Background,
                    cascade,
                );
            }
        }
        finish_foreground(inner, &uid, cascade);
    }
    match inner.get(key, namespace, name) {
        Some(stored) => Ok(DeleteOutcome::Pending(
            stored
                .value()
                .map_err(|e| ApiError::internal(e.to_string()))?,
        )),
        None => Ok(DeleteOutcome::Removed(value_without_finalizers(&uid))),
    }
}

fn value_without_finalizers(uid: &str) -> Value {
    json!({"metadata": {"uid": uid}})
}

fn drop_owner_reference(
    inner: &mut StoreInner,
    key: &str,
    namespace: &str,
    name: &str,
    owner_uid: &str,
) {
    let Some(Ok(mut value)) = inner.get(key, namespace, name).map(|s| s.value()) else {
        return;
    };
    if let Some(refs) = value
        .pointer_mut("/metadata/ownerReferences")
        .and_then(Value::as_array_mut)
    {
        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
        if refs.is_empty() {
            metadata_mut(&mut value).remove("ownerReferences");
        }
    }
    let _ = inner.put(key, namespace, name, value);
}

/// Removes an object and runs what follows a removal: namespace contents, CRD contents, garbage collection
/// of dependents, and completion of owners waiting in foreground deletion.
fn remove_and_collect(
    inner: &mut StoreInner,
    key: &str,
    namespace: &str,
    name: &str,
    cascade: &mut Cascade,
) -> Option<Value> {
    let removed = inner.remove(key, namespace, name)?;
    let value = removed.value().ok()?;
    if key == NAMESPACES_KEY {
        for (object_key, object_name) in inner.namespaced_keys(name) {
            remove_and_collect(inner, &object_key, name, &object_name, cascade);
        }
    }
    if key == CRD_KEY {
        if let Ok(info) = Registry::info_from_crd(&value) {
            for (ns, object_name) in inner.keys_of(&info.key()) {
                remove_and_collect(inner, &info.key(), &ns, &object_name, cascade);
            }
        }
        cascade.removed_crds.push(value.clone());
    }
    for (dep_key, dep_ns, dep_name) in inner.dependents_of(&removed.uid) {
        let Some(Ok(dependent)) = inner.get(&dep_key, &dep_ns, &dep_name).map(|s| s.value()) else {
            continue;
        };
        let live_owners = dependent
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r.get("uid").and_then(Value::as_str))
                    .filter(|uid| *uid != &*removed.uid && inner.locate_uid(uid).is_some())
                    .count()
            })
            .unwrap_or(0);
        if live_owners == 0 {
            let _ = delete_locked(
                inner,
                &dep_key,
                &dep_ns,
                &dep_name,
                Propagation::Background,
                cascade,
            );
        } else {
            drop_owner_reference(inner, &dep_key, &dep_ns, &dep_name, &removed.uid);
        }
    }
    for owner_uid in removed.owner_uids.clone() {
        finish_foreground(inner, &owner_uid, cascade);
    }
    Some(value)
}

/// An owner in foreground deletion goes away once its last dependent is gone.
fn finish_foreground(inner: &mut StoreInner, owner_uid: &str, cascade: &mut Cascade) {
    let Some((key, namespace, name)) = inner.locate_uid(owner_uid) else {
        return;
    };
    let Some(Ok(mut owner)) = inner.get(&key, &namespace, &name).map(|s| s.value()) else {
        return;
    };
    let mut finalizers = finalizers_of(&owner);
    if owner.pointer("/metadata/deletionTimestamp").is_none()
        || !finalizers.iter().any(|f| f == FOREGROUND_FINALIZER)
        || !inner.dependents_of(owner_uid).is_empty()
    {
        return;
    }
    finalizers.retain(|f| f != FOREGROUND_FINALIZER);
    if finalizers.is_empty() {
        remove_and_collect(inner, &key, &namespace, &name, cascade);
    } else {
        set_finalizers(&mut owner, &finalizers);
        let _ = inner.put(&key, &namespace, &name, owner);
    }
}

/// Refuses an object larger than etcd stores (the body limit alone lets a 3 MiB object through), or nested
/// deeper than the sim and its clients parse once it is wrapped in a list or a watch event.
fn check_stored_size(object: &Value) -> Result<(), ApiError> {
    let depth = nesting(object);
    if depth > MAX_NESTING {
        return Err(ApiError::bad_request(format!(
            "the object is nested {depth} levels deep; at most {MAX_NESTING} are accepted"
        )));
    }
    let size = serde_json::to_vec(object)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    if size > MAX_OBJECT_BYTES {
        return Err(ApiError::object_too_large());
    }
    Ok(())
}

/// Levels of objects and arrays in `value` (a scalar has none). Iterative: the value may be as deep as the
/// parser allowed.
fn nesting(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1usize)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Object(map) => {
                deepest = deepest.max(depth);
                pending.extend(map.values().map(|child| (child, depth + 1)));
            }
            Value::Array(items) => {
                deepest = deepest.max(depth);
                pending.extend(items.iter().map(|child| (child, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        assert!(name_errors(NameRule::Subdomain, "a.b-c").is_none());
        assert!(name_errors(NameRule::Subdomain, "Upper").is_some());
        assert!(name_errors(NameRule::Label, "a.b").is_some());
        assert!(name_errors(NameRule::Dns1035Label, "1abc").is_some());
        assert!(name_errors(NameRule::Subdomain, "-x").is_some());
    }

    #[test]
    fn selector_objects_render_in_query_syntax() {
        let selector = json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]});
        assert_eq!(selector_string(&selector), "app=web,tier in (a,b)");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, &("ns".into(), "name".into()));
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, ("ns".into(), "name".into()))
        );
        assert!(decode_continue("garbage!").is_err());
    }
}
