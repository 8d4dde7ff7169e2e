//! Patch math for the simulated API server: JSON patch, JSON merge patch, strategic merge patch,
//! server-side apply and the `metadata.managedFields` bookkeeping that goes with writes.

use serde_json::{Map, Value};

/// The four patch flavours a kube-apiserver accepts, chosen by the request's Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    /// Maps a Content-Type header (parameters such as `; charset=utf-8` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        match media_type.to_ascii_lowercase().as_str() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// How a list merges: replaced whole, merged as a set of scalars, or merged item by item on keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Where list-merge knowledge comes from: built-in kinds (a table below), a CRD's structural
/// openAPIV3Schema (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, `x-kubernetes-map-type`),
/// or nothing.
#[derive(Clone, Copy, Debug)]
pub enum MergeSchema<'a> {
    Builtin { group: &'a str, kind: &'a str },
    Structural(&'a Value),
    Unknown,
}

impl MergeSchema<'_> {
    /// `path` is the field names from the object root, list items skipped.
    pub fn list_strategy(&self, path: &[&str]) -> ListStrategy {
        if let Some(strategy) = metadata_list_strategy(path) {
            return strategy;
        }
        match self {
            MergeSchema::Builtin { group, kind } => builtin_list_strategy(group, kind, path),
            MergeSchema::Structural(schema) => match structural_node(schema, path) {
                Some(node) => structural_list_strategy(node),
                None => status_conditions_strategy(path),
            },
            MergeSchema::Unknown => status_conditions_strategy(path),
        }
    }

    /// Whether the map at `path` is replaced whole (`x-kubernetes-map-type: atomic`).
    pub fn map_is_atomic(&self, path: &[&str]) -> bool {
        match self {
            MergeSchema::Structural(schema) => {
                structural_node(schema, path)
                    .and_then(|node| node.get("x-kubernetes-map-type"))
                    .and_then(Value::as_str)
                    == Some("atomic")
            }
            _ => false,
        }
    }

    /// The schema to use for an object, from its `apiVersion` and `kind` (built-in table).
    pub fn builtin_for(object: &Value) -> MergeSchema<'_> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        if kind.is_empty() {
            MergeSchema::Unknown
        } else {
            MergeSchema::Builtin { group, kind }
        }
    }
}

fn keys(names: &[&str]) -> ListStrategy {
    ListStrategy::Map(names.iter().map(|n| n.to_string()).collect())
}

fn metadata_list_strategy(path: &[&str]) -> Option<ListStrategy> {
    match path {
        ["metadata", "ownerReferences"] => Some(keys(&["uid"])),
        ["metadata", "finalizers"] => Some(ListStrategy::Set),
        _ => None,
    }
}

fn status_conditions_strategy(path: &[&str]) -> ListStrategy {
    match path {
        ["status", "conditions"] => keys(&["type"]),
        _ => ListStrategy::Atomic,
    }
}

/// Where the pod spec sits inside a built-in workload kind.
fn pod_spec_prefix(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (group, kind) {
        ("", "Pod") => Some(&["spec"]),
        ("", "PodTemplate") => Some(&["template", "spec"]),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
        | ("batch", "Job") => Some(&["spec", "template", "spec"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

fn pod_spec_list_strategy(path: &[&str]) -> ListStrategy {
    const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];
    match path {
        [list] if CONTAINER_LISTS.contains(list) => keys(&["name"]),
        [list, "ports"] if CONTAINER_LISTS.contains(list) => keys(&["containerPort"]),
        [list, "env"] if CONTAINER_LISTS.contains(list) => keys(&["name"]),
        [list, "volumeMounts"] if CONTAINER_LISTS.contains(list) => keys(&["mountPath"]),
        [list, "volumeDevices"] if CONTAINER_LISTS.contains(list) => keys(&["devicePath"]),
        [list, "resizePolicy"] if CONTAINER_LISTS.contains(list) => keys(&["resourceName"]),
        ["volumes"] | ["imagePullSecrets"] | ["resourceClaims"] | ["schedulingGates"] => {
            keys(&["name"])
        }
        ["hostAliases"] => keys(&["ip"]),
        ["topologySpreadConstraints"] => keys(&["topologyKey"]),
        _ => ListStrategy::Atomic,
    }
}

fn builtin_list_strategy(group: &str, kind: &str, path: &[&str]) -> ListStrategy {
    if let Some(prefix) = pod_spec_prefix(group, kind) {
        if path.len() > prefix.len() && path[..prefix.len()] == *prefix {
            return pod_spec_list_strategy(&path[prefix.len()..]);
        }
    }
    match (group, kind, path) {
        ("", "Service", ["spec", "ports"]) => keys(&["port"]),
        ("", "Node", ["spec", "taints"]) => keys(&["key"]),
        ("", "Node", ["status", "addresses"]) => keys(&["type"]),
        _ => status_conditions_strategy(path),
    }
}

/// Walks a structural schema along field names, stepping through array items transparently.
fn structural_node<'s>(schema: &'s Value, path: &[&str]) -> Option<&'s Value> {
    let mut node = schema;
    for field in path {
        while node.get("type").and_then(Value::as_str) == Some("array") {
            node = node.get("items")?;
        }
        node = match node.get("properties").and_then(|p| p.get(*field)) {
            Some(child) => child,
            None => node.get("additionalProperties").filter(|a| a.is_object())?,
        };
    }
    Some(node)
}

fn structural_list_strategy(node: &Value) -> ListStrategy {
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => ListStrategy::Set,
        Some("map") => {
            let names = node
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| {
                    k.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if names.is_empty() {
                ListStrategy::Atomic
            } else {
                ListStrategy::Map(names)
            }
        }
        _ => ListStrategy::Atomic,
    }
}

/// Who applies, whether conflicts are overridden, and the timestamp for managedFields.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions<'a> {
    pub field_manager: &'a str,
    pub force: bool,
    pub now: &'a str,
}

#[derive(thiserror::Error, Debug)]
pub enum PatchError {
    /// The patch document itself is unusable (HTTP 400).
    #[error("malformed patch: {0}")]
    MalformedPatch(String),
    /// The patch applied but produced something that is not a valid object (HTTP 422).
    #[error("invalid patch result: {0}")]
    InvalidResult(String),
    /// A JSON-patch `test` operation did not match (HTTP 422).
    #[error("test operation failed: {0}")]
    TestFailed(String),
    /// Server-side apply would change fields other managers own (HTTP 409).
    #[error("Apply failed with {} conflict(s): {}", conflicts.len(), describe_conflicts(conflicts))]
    ApplyConflict { conflicts: Vec<(String, String)> },
}

fn describe_conflicts(conflicts: &[(String, String)]) -> String {
    conflicts
        .iter()
        .map(|(manager, path)| format!("conflict with \"{manager}\": {path}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl PatchError {
    pub fn category(&self) -> &'static str {
        match self {
            PatchError::MalformedPatch(_) => "malformed_patch",
            PatchError::InvalidResult(_) => "invalid_result",
            PatchError::TestFailed(_) => "test_failed",
            PatchError::ApplyConflict { .. } => "apply_conflict",
        }
    }

    /// The HTTP status a kube-apiserver answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            PatchError::MalformedPatch(_) => 400,
            PatchError::InvalidResult(_) | PatchError::TestFailed(_) => 422,
            PatchError::ApplyConflict { .. } => 409,
        }
    }
}

/// Applies a JSON, merge or strategic-merge patch. `Apply` must go through [`server_side_apply`].
pub fn apply_patch(
    patch_type: PatchType,
    current: &Value,
    patch: &Value,
    schema: &MergeSchema<'_>,
) -> Result<Value, PatchError> {
    let result = match patch_type {
        PatchType::Json => json_patch_apply(current, patch)?,
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(PatchError::MalformedPatch(
                    "a merge patch for an object must be a JSON object".into(),
                ));
            }
            let mut doc = current.clone();
            json_patch::merge(&mut doc, patch);
            doc
        }
        PatchType::StrategicMerge => {
            let Value::Object(patch_map) = patch else {
                return Err(PatchError::MalformedPatch(
                    "a strategic merge patch must be a JSON object".into(),
                ));
            };
            let original = match current {
                Value::Object(m) => m.clone(),
                _ => Map::new(),
            };
            let mut path = Vec::new();
            match strategic_merge_map(original, patch_map, &mut path, schema)? {
                Some(m) => Value::Object(m),
                None => {
                    return Err(PatchError::InvalidResult(
                        "the patch deletes the whole object".into(),
                    ))
                }
            }
        }
        PatchType::Apply => {
            return Err(PatchError::MalformedPatch(
                "apply patches go through server-side apply".into(),
            ))
        }
    };
    if !result.is_object() {
        return Err(PatchError::InvalidResult(
            "the patched document is not a JSON object".into(),
        ));
    }
    Ok(result)
}

fn json_patch_apply(current: &Value, patch: &Value) -> Result<Value, PatchError> {
    let operations: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::MalformedPatch(format!("invalid JSON patch: {e}")))?;
    let mut doc = current.clone();
    json_patch::patch(&mut doc, &operations).map_err(|e| match e.kind {
        json_patch::PatchErrorKind::TestFailed => PatchError::TestFailed(e.to_string()),
        _ => PatchError::InvalidResult(e.to_string()),
    })?;
    Ok(doc)
}

// ---------------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------------

const DIRECTIVE_PATCH: &str = "$patch";
const DIRECTIVE_RETAIN_KEYS: &str = "$retainKeys";
const PREFIX_DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const PREFIX_SET_ELEMENT_ORDER: &str = "$setElementOrder/";

fn path_refs(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|item| item.get(DIRECTIVE_PATCH).is_none())
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Merges `patch` into `original`; `None` means the map is deleted (`$patch: delete`).
fn strategic_merge_map(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
    schema: &MergeSchema<'_>,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match patch.get(DIRECTIVE_PATCH) {
        None => {}
        Some(Value::String(d)) if d == "merge" => {}
        Some(Value::String(d)) if d == "replace" => {
            return match strip_directives(&Value::Object(patch.clone())) {
                Value::Object(m) => Ok(Some(m)),
                _ => Ok(Some(Map::new())),
            };
        }
        Some(Value::String(d)) if d == "delete" => return Ok(None),
        Some(other) => {
            return Err(PatchError::MalformedPatch(format!(
                "unknown $patch directive {other}"
            )))
        }
    }

    for (key, patch_value) in patch {
        if let Some(field) = key.strip_prefix(PREFIX_DELETE_FROM_PRIMITIVE_LIST) {
            let Value::Array(to_delete) = patch_value else {
                return Err(PatchError::MalformedPatch(format!("{key} must be a list")));
            };
            if let Some(Value::Array(items)) = original.get_mut(field) {
                items.retain(|item| !to_delete.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if patch_value.is_null() {
            original.remove(key);
            continue;
        }
        path.push(key.clone());
        let merged = match (original.remove(key), patch_value) {
            (Some(Value::Object(orig)), Value::Object(p))
                if !schema.map_is_atomic(&path_refs(path)) =>
            {
                strategic_merge_map(orig, p, path, schema)?.map(Value::Object)
            }
            (_, Value::Object(p)) => {
                strategic_merge_map(Map::new(), p, path, schema)?.map(Value::Object)
            }
            (orig, Value::Array(p)) => {
                let order = patch.get(&format!("{PREFIX_SET_ELEMENT_ORDER}{key}"));
                Some(strategic_merge_list(orig, p, order, path, schema)?)
            }
            (_, other) => Some(strip_directives(other)),
        };
        path.pop();
        if let Some(v) = merged {
            original.insert(key.clone(), v);
        }
    }

    if let Some(retain) = patch.get(DIRECTIVE_RETAIN_KEYS) {
        let Value::Array(retain) = retain else {
            return Err(PatchError::MalformedPatch(
                "$retainKeys must be a list".into(),
            ));
        };
        let retain: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        original.retain(|k, _| retain.contains(&k.as_str()));
    }
    Ok(Some(original))
}

fn merge_key_of<'v>(item: &'v Value, merge_key: &str) -> Option<&'v Value> {
    item.get(merge_key)
}

fn strategic_merge_list(
    original: Option<Value>,
    patch: &[Value],
    order: Option<&Value>,
    path: &mut Vec<String>,
    schema: &MergeSchema<'_>,
) -> Result<Value, PatchError> {
    let strategy = schema.list_strategy(&path_refs(path));
    let replace_whole = patch
        .iter()
        .any(|item| item.get(DIRECTIVE_PATCH).and_then(Value::as_str) == Some("replace"));
    let original_items = match original {
        Some(Value::Array(items)) if !replace_whole => items,
        _ => Vec::new(),
    };
    let merged = match strategy {
        ListStrategy::Atomic => {
            if patch.iter().any(|p| p.get(DIRECTIVE_PATCH).is_some()) {
                // A merge directive inside an atomic list still only replaces it.
                strip_directives(&Value::Array(patch.to_vec()))
            } else {
                Value::Array(patch.to_vec())
            }
        }
        ListStrategy::Set => {
            let mut items = original_items;
            for p in patch {
                if p.is_object() && p.get(DIRECTIVE_PATCH).is_some() {
                    continue;
                }
                if !items.contains(p) {
                    items.push(p.clone());
                }
            }
            Value::Array(items)
        }
        ListStrategy::Map(map_keys) => {
            let merge_key = map_keys.first().map(String::as_str).unwrap_or("name");
            let mut items = original_items;
            for p in patch {
                let Value::Object(p_map) = p else {
                    return Err(PatchError::MalformedPatch(format!(
                        "list {} merges on {merge_key}: items must be objects",
                        path.join(".")
                    )));
                };
                let directive = p_map.get(DIRECTIVE_PATCH).and_then(Value::as_str);
                if directive == Some("replace") && p_map.len() == 1 {
                    continue;
                }
                let Some(key_value) = merge_key_of(p, merge_key) else {
                    return Err(PatchError::MalformedPatch(format!(
                        "list {} item lacks its merge key {merge_key}",
                        path.join(".")
                    )));
                };
                let position = items
                    .iter()
                    .position(|it| merge_key_of(it, merge_key) == Some(key_value));
                if directive == Some("delete") {
                    items.retain(|it| merge_key_of(it, merge_key) != Some(key_value));
                    continue;
                }
                match position {
                    Some(i) => {
                        let orig = match std::mem::take(&mut items[i]) {
                            Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        match strategic_merge_map(orig, p_map, path, schema)? {
                            Some(m) => items[i] = Value::Object(m),
                            None => {
                                items.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = strategic_merge_map(Map::new(), p_map, path, schema)? {
                            items.push(Value::Object(m));
                        }
                    }
                }
            }
            if let Some(Value::Array(order)) = order {
                reorder(&mut items, order, |item, wanted| {
                    merge_key_of(item, merge_key) == merge_key_of(wanted, merge_key)
                });
            }
            return Ok(Value::Array(items));
        }
    };
    let Value::Array(mut items) = merged else {
        return Ok(merged);
    };
    if let Some(Value::Array(order)) = order {
        reorder(&mut items, order, |item, wanted| item == wanted);
    }
    Ok(Value::Array(items))
}

/// `$setElementOrder`: items named in `order` come first in that order; the rest keep theirs.
fn reorder(items: &mut Vec<Value>, order: &[Value], same: impl Fn(&Value, &Value) -> bool) {
    let mut remaining = std::mem::take(items);
    for wanted in order {
        if let Some(i) = remaining.iter().position(|item| same(item, wanted)) {
            items.push(remaining.remove(i));
        }
    }
    items.extend(remaining);
}

// ---------------------------------------------------------------------------------------------
// Field sets (managedFields `fieldsV1`) and server-side apply
// ---------------------------------------------------------------------------------------------

/// One step of a field path in `fieldsV1` notation: `f:name`, `k:{...}`, `v:...` or `.`.
type FieldPath = Vec<String>;

const METADATA_TRACKED: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

fn item_key(item: &Value, map_keys: &[String]) -> Option<String> {
    let mut parts = Vec::new();
    let mut sorted: Vec<&String> = map_keys.iter().collect();
    sorted.sort();
    for k in sorted {
        if let Some(v) = item.get(k) {
            let key_json = serde_json::to_string(k).ok()?;
            let value_json = serde_json::to_string(v).ok()?;
            parts.push(format!("{key_json}:{value_json}"));
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(format!("k:{{{}}}", parts.join(",")))
    }
}

fn set_item_key(item: &Value) -> String {
    format!("v:{}", serde_json::to_string(item).unwrap_or_default())
}

/// The `fieldsV1` set an object's content spans.
fn fields_of(object: &Value, schema: &MergeSchema<'_>) -> Map<String, Value> {
    let Value::Object(root) = object else {
        return Map::new();
    };
    let mut out = Map::new();
    let mut path = Vec::new();
    for (k, v) in root {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let mut meta = Map::new();
                if let Value::Object(m) = v {
                    for field in METADATA_TRACKED {
                        if let Some(fv) = m.get(field) {
                            path.clear();
                            path.push("metadata".to_string());
                            path.push(field.to_string());
                            meta.insert(
                                format!("f:{field}"),
                                Value::Object(value_fields(fv, &mut path, schema)),
                            );
                        }
                    }
                }
                if !meta.is_empty() {
                    out.insert("f:metadata".into(), Value::Object(meta));
                }
            }
            _ => {
                path.clear();
                path.push(k.clone());
                out.insert(
                    format!("f:{k}"),
                    Value::Object(value_fields(v, &mut path, schema)),
                );
            }
        }
    }
    out
}

fn value_fields(
    value: &Value,
    path: &mut Vec<String>,
    schema: &MergeSchema<'_>,
) -> Map<String, Value> {
    let mut out = Map::new();
    match value {
        Value::Object(m) if !schema.map_is_atomic(&path_refs(path)) => {
            for (k, v) in m {
                path.push(k.clone());
                out.insert(
                    format!("f:{k}"),
                    Value::Object(value_fields(v, path, schema)),
                );
                path.pop();
            }
        }
        Value::Array(items) => match schema.list_strategy(&path_refs(path)) {
            ListStrategy::Map(map_keys) => {
                for item in items {
                    if let Some(key) = item_key(item, &map_keys) {
                        let mut item_fields = match item {
                            Value::Object(_) => value_fields(item, path, schema),
                            _ => Map::new(),
                        };
                        item_fields.insert(".".into(), Value::Object(Map::new()));
                        out.insert(key, Value::Object(item_fields));
                    }
                }
            }
            ListStrategy::Set => {
                for item in items {
                    out.insert(set_item_key(item), Value::Object(Map::new()));
                }
            }
            ListStrategy::Atomic => {}
        },
        _ => {}
    }
    out
}

fn collect_leaves(set: &Map<String, Value>, prefix: &mut FieldPath, out: &mut Vec<FieldPath>) {
    for (k, child) in set {
        prefix.push(k.clone());
        match child {
            Value::Object(c) if !c.is_empty() => collect_leaves(c, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

fn leaves(set: &Map<String, Value>) -> Vec<FieldPath> {
    let mut out = Vec::new();
    collect_leaves(set, &mut Vec::new(), &mut out);
    out
}

fn set_contains(set: &Map<String, Value>, path: &[String]) -> bool {
    let mut node = set;
    for (i, step) in path.iter().enumerate() {
        match node.get(step) {
            Some(Value::Object(child)) => {
                if i + 1 == path.len() {
                    return child.is_empty();
                }
                node = child;
            }
            _ => return false,
        }
    }
    false
}

fn set_has_prefix(set: &Map<String, Value>, prefix: &[String]) -> bool {
    let mut node = set;
    for step in prefix {
        match node.get(step) {
            Some(Value::Object(child)) => node = child,
            _ => return false,
        }
    }
    true
}

fn set_insert(set: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let child = set
        .entry(first.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(c) = child {
        set_insert(c, rest);
    }
}

/// Removes a leaf and any parent it leaves empty (an emptied parent would read as a leaf).
fn set_remove(set: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        if matches!(set.get(first), Some(Value::Object(c)) if c.is_empty()) {
            set.remove(first);
        }
        return;
    }
    let now_empty = match set.get_mut(first) {
        Some(Value::Object(child)) => {
            let had_children = !child.is_empty();
            set_remove(child, rest);
            had_children && child.is_empty()
        }
        _ => false,
    };
    if now_empty {
        set.remove(first);
    }
}

fn parse_item_key(step: &str) -> Option<Map<String, Value>> {
    let json = step.strip_prefix("k:")?;
    match serde_json::from_str(json) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn item_matches(item: &Value, key: &Map<String, Value>) -> bool {
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

fn value_at<'v>(object: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut node = object;
    for step in path {
        node = if let Some(field) = step.strip_prefix("f:") {
            node.get(field)?
        } else if let Some(key) = parse_item_key(step) {
            node.as_array()?
                .iter()
                .find(|item| item_matches(item, &key))?
        } else if let Some(json) = step.strip_prefix("v:") {
            let wanted: Value = serde_json::from_str(json).ok()?;
            node.as_array()?.iter().find(|item| **item == wanted)?
        } else if step == "." {
            node
        } else {
            return None;
        };
    }
    Some(node)
}

fn remove_at(object: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    if last == "." {
        // The item itself: remove it from its list.
        if let Some((item_step, list_path)) = parent_path.split_last() {
            remove_at(
                object,
                &[list_path, std::slice::from_ref(item_step)].concat(),
            );
        }
        return;
    }
    let mut node = object;
    for step in parent_path {
        let next = if let Some(field) = step.strip_prefix("f:") {
            node.get_mut(field)
        } else if let Some(key) = parse_item_key(step) {
            node.as_array_mut()
                .and_then(|items| items.iter_mut().find(|item| item_matches(item, &key)))
        } else if let Some(json) = step.strip_prefix("v:") {
            let wanted: Option<Value> = serde_json::from_str(json).ok();
            node.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| Some(&**item) == wanted.as_ref())
            })
        } else {
            None
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Value::Object(m) = node {
            m.remove(field);
        }
    } else if let Some(key) = parse_item_key(last) {
        if let Value::Array(items) = node {
            items.retain(|item| !item_matches(item, &key));
        }
    } else if let Some(json) = last.strip_prefix("v:") {
        if let (Value::Array(items), Ok(wanted)) = (node, serde_json::from_str::<Value>(json)) {
            items.retain(|item| *item != wanted);
        }
    }
}

/// `[..., k:{"name":"x"}, f:name]`: the field is part of the item's identity.
fn is_item_key_field(leaf: &[String]) -> bool {
    let [.., item_step, last] = leaf else {
        return false;
    };
    match (parse_item_key(item_step), last.strip_prefix("f:")) {
        (Some(key), Some(field)) => key.contains_key(field),
        _ => false,
    }
}

/// Renders a field path the way kube-apiserver names conflicting fields: `.spec.containers[name="app"].image`.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for step in path {
        if let Some(field) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = parse_item_key(step) {
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(json) = step.strip_prefix("v:") {
            out.push_str(&format!("[{json}]"));
        }
    }
    out
}

#[derive(Clone, Debug)]
struct ManagedEntry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: Map<String, Value>,
}

impl ManagedEntry {
    fn from_json(entry: &Value) -> Option<ManagedEntry> {
        Some(ManagedEntry {
            manager: entry.get("manager")?.as_str()?.to_string(),
            operation: entry
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or("Update")
                .to_string(),
            subresource: entry
                .get("subresource")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            api_version: entry
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            time: entry
                .get("time")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            fields: entry
                .get("fieldsV1")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), Value::String(self.manager.clone()));
        m.insert("operation".into(), Value::String(self.operation.clone()));
        m.insert("apiVersion".into(), Value::String(self.api_version.clone()));
        m.insert("time".into(), Value::String(self.time.clone()));
        m.insert("fieldsType".into(), Value::String("FieldsV1".into()));
        m.insert("fieldsV1".into(), Value::Object(self.fields.clone()));
        if let Some(sub) = &self.subresource {
            m.insert("subresource".into(), Value::String(sub.clone()));
        }
        Value::Object(m)
    }
}

fn read_managed(object: Option<&Value>) -> Vec<ManagedEntry> {
    object
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
        .map(|entries| entries.iter().filter_map(ManagedEntry::from_json).collect())
        .unwrap_or_default()
}

fn write_managed(object: &mut Value, entries: &[ManagedEntry]) {
    let Value::Object(root) = object else {
        return;
    };
    let metadata = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = metadata {
        let kept: Vec<Value> = entries
            .iter()
            .filter(|e| !e.fields.is_empty())
            .map(ManagedEntry::to_json)
            .collect();
        if kept.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(kept));
        }
    }
}

fn api_version_of(object: &Value) -> String {
    object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Whether a live map-list item is the one an applied item names. A key the applied item leaves
/// out matches anything: the server fills such keys with defaults after the merge.
fn same_list_item(live_item: &Value, applied_item: &Value, map_keys: &[String]) -> bool {
    let mut named_by_some_key = false;
    for key in map_keys {
        match (applied_item.get(key), live_item.get(key)) {
            (Some(applied), Some(live)) if applied == live => named_by_some_key = true,
            (None, _) => {}
            _ => return false,
        }
    }
    named_by_some_key
}

/// Merges an applied configuration into the live object: maps merged, lists per [`ListStrategy`].
fn merge_applied(
    live: &mut Value,
    applied: &Value,
    path: &mut Vec<String>,
    schema: &MergeSchema<'_>,
) {
    match (&mut *live, applied) {
        (Value::Object(live_map), Value::Object(applied_map))
            if !schema.map_is_atomic(&path_refs(path)) =>
        {
            for (k, v) in applied_map {
                if path.len() == 1 && path[0] == "metadata" && k == "managedFields" {
                    continue;
                }
                path.push(k.clone());
                match live_map.get_mut(k) {
                    Some(existing) => merge_applied(existing, v, path, schema),
                    None => {
                        live_map.insert(k.clone(), v.clone());
                    }
                }
                path.pop();
            }
        }
        (Value::Array(live_items), Value::Array(applied_items)) => {
            match schema.list_strategy(&path_refs(path)) {
                ListStrategy::Map(map_keys) => {
                    for item in applied_items {
                        let existing = live_items
                            .iter_mut()
                            .find(|live_item| same_list_item(live_item, item, &map_keys));
                        match existing {
                            Some(e) => merge_applied(e, item, path, schema),
                            None => live_items.push(item.clone()),
                        }
                    }
                }
                ListStrategy::Set => {
                    for item in applied_items {
                        if !live_items.contains(item) {
                            live_items.push(item.clone());
                        }
                    }
                }
                ListStrategy::Atomic => *live = applied.clone(),
            }
        }
        _ => *live = applied.clone(),
    }
}

fn strip_null_fields(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_null_fields(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_null_fields).collect()),
        other => other.clone(),
    }
}

/// Server-side apply of `applied` (an apply configuration) onto `current` (None on create), on
/// the main resource. The caller drops `status` from the configuration first when the resource
/// has a status subresource, as kube-apiserver does.
pub fn server_side_apply(
    current: Option<&Value>,
    applied: &Value,
    options: &ApplyOptions<'_>,
    schema: &MergeSchema<'_>,
) -> Result<Value, PatchError> {
    server_side_apply_to(current, applied, options, schema, None)
}

/// Server-side apply to a subresource (`Some("status")`) or the main resource (`None`). On the
/// status subresource only `status` is applied and owned, in an entry marked `subresource: status`.
pub fn server_side_apply_to(
    current: Option<&Value>,
    applied: &Value,
    options: &ApplyOptions<'_>,
    schema: &MergeSchema<'_>,
    subresource: Option<&str>,
) -> Result<Value, PatchError> {
    if !applied.is_object() {
        return Err(PatchError::MalformedPatch(
            "an apply configuration must be an object".into(),
        ));
    }
    if options.field_manager.is_empty() {
        return Err(PatchError::MalformedPatch(
            "fieldManager is required for apply requests".into(),
        ));
    }
    // A null in an apply configuration says nothing about the field: it is neither set nor owned.
    let mut applied = strip_null_fields(applied);
    if subresource == Some("status") {
        if let Value::Object(config) = &mut applied {
            config.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "status"));
        }
    }
    let applied = &applied;
    let live = current
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let mut entries = read_managed(current);
    let is_applier = |e: &ManagedEntry| {
        e.manager == options.field_manager
            && e.operation == "Apply"
            && e.subresource.as_deref() == subresource
    };

    let applied_set = fields_of(applied, schema);
    let applied_leaves = leaves(&applied_set);
    let previous_set = entries
        .iter()
        .find(|e| is_applier(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();

    // Conflicts: another manager owns a field this apply sets to a different value.
    let mut conflicts = Vec::new();
    let mut conflicting_paths = Vec::new();
    for leaf in &applied_leaves {
        if leaf.last().map(String::as_str) == Some(".") {
            continue;
        }
        let (Some(live_value), Some(applied_value)) =
            (value_at(&live, leaf), value_at(applied, leaf))
        else {
            continue;
        };
        if live_value == applied_value {
            continue;
        }
        for entry in entries
            .iter()
            .filter(|e| e.manager != options.field_manager)
        {
            if set_contains(&entry.fields, leaf) {
                conflicts.push((entry.manager.clone(), display_path(leaf)));
                conflicting_paths.push(leaf.clone());
            }
        }
    }
    if !conflicts.is_empty() && !options.force {
        return Err(PatchError::ApplyConflict { conflicts });
    }
    for entry in entries
        .iter_mut()
        .filter(|e| e.manager != options.field_manager)
    {
        for path in &conflicting_paths {
            set_remove(&mut entry.fields, path);
        }
    }

    let mut result = live;
    merge_applied(&mut result, applied, &mut Vec::new(), schema);

    // Fields this manager applied before and no longer applies go, unless someone else owns them.
    let others: Vec<&ManagedEntry> = entries.iter().filter(|e| !is_applier(e)).collect();
    let owned_elsewhere = |path: &[String]| {
        others.iter().any(|e| set_contains(&e.fields, path)) || set_contains(&applied_set, path)
    };
    let mut dropped: Vec<FieldPath> = leaves(&previous_set)
        .into_iter()
        .filter(|leaf| !owned_elsewhere(leaf))
        .collect();
    // Whole list items go first, while their key fields still identify them; a key field of an
    // item that stays is never removed on its own.
    let is_item = |leaf: &FieldPath| leaf.last().map(String::as_str) == Some(".");
    dropped.sort_by_key(|leaf| !is_item(leaf));
    for leaf in dropped {
        if is_item(&leaf) {
            let item_prefix = &leaf[..leaf.len() - 1];
            let still_used = others
                .iter()
                .any(|e| set_has_prefix(&e.fields, item_prefix))
                || set_has_prefix(&applied_set, item_prefix);
            if still_used {
                continue;
            }
        } else if is_item_key_field(&leaf) {
            continue;
        }
        remove_at(&mut result, &leaf);
    }

    let api_version = api_version_of(applied);
    let mut new_entry = ManagedEntry {
        manager: options.field_manager.to_string(),
        operation: "Apply".into(),
        subresource: subresource.map(str::to_string),
        api_version,
        time: options.now.to_string(),
        fields: applied_set,
    };
    match entries.iter_mut().find(|e| is_applier(e)) {
        Some(existing) => {
            if existing.fields == new_entry.fields && existing.api_version == new_entry.api_version
            {
                new_entry.time = existing.time.clone();
            }
            *existing = new_entry;
        }
        None => entries.push(new_entry),
    }
    write_managed(&mut result, &entries);
    Ok(result)
}

/// Maintains the `Update` managedFields entry of `field_manager` for a PUT or non-apply patch:
/// the leaf fields that changed between `old` and `new` become that manager's (and leave others).
/// List knowledge comes from the built-in table for `new`'s kind; custom resources should use
/// [`record_update_with_schema`] so Update and Apply entries name list items the same way.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    field_manager: &str,
    now: &str,
    subresource: Option<&str>,
) {
    let api_version = api_version_of(new);
    let kind = new
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let group = api_version
        .rsplit_once('/')
        .map(|(g, _)| g)
        .unwrap_or("")
        .to_string();
    let schema = if kind.is_empty() {
        MergeSchema::Unknown
    } else {
        MergeSchema::Builtin {
            group: &group,
            kind: &kind,
        }
    };
    record_update_with_schema(old, new, field_manager, now, subresource, &schema);
}

/// [`record_update`] with explicit list-merge knowledge (a CRD's structural schema).
pub fn record_update_with_schema(
    old: Option<&Value>,
    new: &mut Value,
    field_manager: &str,
    now: &str,
    subresource: Option<&str>,
    schema: &MergeSchema<'_>,
) {
    // The submitted managedFields never count and are replaced below, so they are dropped in place
    // rather than from a copy of the whole object.
    if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let new_for_fields: &Value = new;
    let mut new_set = fields_of(new_for_fields, schema);
    if subresource == Some("status") {
        new_set.retain(|k, _| k == "f:status");
    }
    let mut entries = read_managed(old);
    let empty = Value::Object(Map::new());
    let old_object = old.unwrap_or(&empty);

    let changed: Vec<FieldPath> = leaves(&new_set)
        .into_iter()
        .filter(|leaf| match leaf.last().map(String::as_str) {
            // A list item is "changed" by appearing, not by edits to its fields.
            Some(".") => value_at(old_object, leaf).is_none(),
            _ => value_at(old_object, leaf) != value_at(new_for_fields, leaf),
        })
        .collect();
    let gone: Vec<FieldPath> = entries
        .iter()
        .flat_map(|e| leaves(&e.fields))
        .filter(|leaf| value_at(new_for_fields, leaf).is_none())
        .collect();

    let is_updater = |e: &ManagedEntry| {
        e.manager == field_manager
            && e.operation == "Update"
            && e.subresource.as_deref() == subresource
    };
    for entry in entries.iter_mut() {
        for path in gone.iter().chain(if is_updater(entry) {
            [].iter()
        } else {
            changed.iter()
        }) {
            set_remove(&mut entry.fields, path);
        }
    }
    if !changed.is_empty() {
        let api_version = api_version_of(new);
        let index = match entries.iter().position(is_updater) {
            Some(i) => i,
            None => {
                entries.push(ManagedEntry {
                    manager: field_manager.to_string(),
                    operation: "Update".into(),
                    subresource: subresource.map(str::to_string),
                    api_version: api_version.clone(),
                    time: String::new(),
                    fields: Map::new(),
                });
                entries.len() - 1
            }
        };
        let entry = &mut entries[index];
        for path in &changed {
            set_insert(&mut entry.fields, path);
        }
        entry.time = now.to_string();
        entry.api_version = api_version;
    }
    write_managed(new, &entries);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEPLOYMENT: MergeSchema<'static> = MergeSchema::Builtin {
        group: "apps",
        kind: "Deployment",
    };

    #[test]
    fn content_types_map_to_patch_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json"),
            Some(PatchType::Json)
        );
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json"),
            Some(PatchType::StrategicMerge)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            Some(PatchType::Apply)
        );
        assert_eq!(PatchType::from_content_type("text/plain"), None);
    }

    #[test]
    fn builtin_table_knows_pod_template_lists() {
        assert_eq!(
            DEPLOYMENT.list_strategy(&["spec", "template", "spec", "containers"]),
            ListStrategy::Map(vec!["name".into()])
        );
        assert_eq!(
            DEPLOYMENT.list_strategy(&["spec", "template", "spec", "containers", "env"]),
            ListStrategy::Map(vec!["name".into()])
        );
        assert_eq!(
            DEPLOYMENT.list_strategy(&["spec", "template", "spec", "tolerations"]),
            ListStrategy::Atomic
        );
        assert_eq!(
            DEPLOYMENT.list_strategy(&["metadata", "finalizers"]),
            ListStrategy::Set
        );
        assert_eq!(
            DEPLOYMENT.list_strategy(&["status", "conditions"]),
            ListStrategy::Map(vec!["type".into()])
        );
        let service = MergeSchema::Builtin {
            group: "",
            kind: "Service",
        };
        assert_eq!(
            service.list_strategy(&["spec", "ports"]),
            ListStrategy::Map(vec!["port".into()])
        );
    }

    #[test]
    fn structural_schema_list_types() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "hosts": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "protocol"],
                      "items": {"type": "object"}},
            "labels": {"type": "object", "x-kubernetes-map-type": "atomic", "additionalProperties": {"type": "string"}}
        }}}});
        let s = MergeSchema::Structural(&schema);
        assert_eq!(s.list_strategy(&["spec", "rules"]), ListStrategy::Atomic);
        assert_eq!(
            s.list_strategy(&["spec", "rules", "hosts"]),
            ListStrategy::Set
        );
        assert_eq!(
            s.list_strategy(&["spec", "ports"]),
            ListStrategy::Map(vec!["port".into(), "protocol".into()])
        );
        assert!(s.map_is_atomic(&["spec", "labels"]));
        assert!(!s.map_is_atomic(&["spec"]));
    }

    #[test]
    fn json_patch_ops_and_test_failure() {
        let doc = json!({"spec": {"replicas": 1}});
        let out = apply_patch(
            PatchType::Json,
            &doc,
            &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]),
            &MergeSchema::Unknown,
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
        let err = apply_patch(
            PatchType::Json,
            &doc,
            &json!([{"op": "test", "path": "/spec/replicas", "value": 2}]),
            &MergeSchema::Unknown,
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::TestFailed(_)), "{err:?}");
        let err = apply_patch(
            PatchType::Json,
            &doc,
            &json!({"op": "x"}),
            &MergeSchema::Unknown,
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::MalformedPatch(_)));
        let err = apply_patch(
            PatchType::Json,
            &doc,
            &json!([{"op": "remove", "path": "/spec/missing"}]),
            &MergeSchema::Unknown,
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::InvalidResult(_)));
        let err = apply_patch(
            PatchType::Json,
            &doc,
            &json!([{"op": "replace", "path": "", "value": 5}]),
            &MergeSchema::Unknown,
        )
        .unwrap_err();
        assert_eq!(err.category(), "invalid_result");
    }

    #[test]
    fn merge_patch_merges_maps_and_null_deletes() {
        let doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"list": [1, 2]}});
        let out = apply_patch(
            PatchType::Merge,
            &doc,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"list": [3]}}),
            &MergeSchema::Unknown,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"list": [3]}})
        );
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {
                "containers": [
                    {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}],
                     "ports": [{"containerPort": 80}]},
                    {"name": "sidecar", "image": "proxy:1"}
                ],
                "tolerations": [{"key": "x"}]
            }}}
        })
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"template": {"spec": {
                "containers": [{"name": "app", "image": "app:2", "env": [{"name": "B", "value": "2"}]}],
                "tolerations": [{"key": "y"}]
            }}}}),
            &DEPLOYMENT,
        )
        .unwrap();
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 2);
        assert_eq!(containers[0]["image"], "app:2");
        assert_eq!(containers[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(containers[0]["ports"][0]["containerPort"], 80);
        assert_eq!(containers[1]["name"], "sidecar");
        assert_eq!(
            out["spec"]["template"]["spec"]["tolerations"],
            json!([{"key": "y"}])
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let schema = DEPLOYMENT;
        // $patch: delete on a list item.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}}}),
            &schema,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // $patch: replace on a list.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"template": {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}}}}),
            &schema,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "only", "image": "x"}])
        );
        // $patch: replace on a map.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"template": {"$patch": "replace", "metadata": {"labels": {"a": "b"}}}}}),
            &schema,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["template"],
            json!({"metadata": {"labels": {"a": "b"}}})
        );
        // $deleteFromPrimitiveList and set merge of finalizers.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"metadata": {"finalizers": ["b"]}}),
            &schema,
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        let out = apply_patch(
            PatchType::StrategicMerge,
            &out,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
            &schema,
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        // $retainKeys keeps only the named keys.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
            &json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
            &schema,
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        // $setElementOrder reorders merged lists; null deletes a key.
        let out = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"replicas": null, "template": {"spec": {
                "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}],
                "containers": [{"name": "app", "image": "app:3"}]}}}}),
            &schema,
        )
        .unwrap();
        assert!(out["spec"].get("replicas").is_none());
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["name"], "sidecar");
        assert_eq!(containers[1]["image"], "app:3");
        // Unknown directive is a malformed patch.
        let err = apply_patch(
            PatchType::StrategicMerge,
            &deployment(),
            &json!({"spec": {"$patch": "explode"}}),
            &schema,
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::MalformedPatch(_)));
    }

    #[test]
    fn strategic_merge_metadata_status_and_service_lists() {
        let service = MergeSchema::Builtin {
            group: "",
            kind: "Service",
        };
        let current = json!({
            "metadata": {"ownerReferences": [{"uid": "u1", "name": "a"}]},
            "spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}
        });
        let out = apply_patch(
            PatchType::StrategicMerge,
            &current,
            &json!({
                "metadata": {"ownerReferences": [{"uid": "u2", "name": "b"}]},
                "spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "$patch": "delete"}]},
                "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "True"}]}
            }),
            &service,
        )
        .unwrap();
        assert_eq!(
            out["metadata"]["ownerReferences"].as_array().unwrap().len(),
            2
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "name": "http", "targetPort": 8080}])
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "True"}])
        );
        // A merge-keyed item without its key is a malformed patch.
        let err = apply_patch(
            PatchType::StrategicMerge,
            &current,
            &json!({"spec": {"ports": [{"name": "x"}]}}),
            &service,
        )
        .unwrap_err();
        assert_eq!(err.http_status(), 400);
    }

    #[test]
    fn strategic_merge_unknown_lists_replace() {
        let out = apply_patch(
            PatchType::StrategicMerge,
            &json!({"spec": {"items": [{"name": "a"}, {"name": "b"}]}}),
            &json!({"spec": {"items": [{"name": "c"}]}}),
            &MergeSchema::Unknown,
        )
        .unwrap();
        assert_eq!(out["spec"]["items"], json!([{"name": "c"}]));
    }

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn apply_opts(manager: &str, force: bool) -> ApplyOptions<'_> {
        ApplyOptions {
            field_manager: manager,
            force,
            now: NOW,
        }
    }

    fn managed_for<'v>(object: &'v Value, manager: &str) -> Option<&'v Value> {
        object["metadata"]["managedFields"]
            .as_array()?
            .iter()
            .find(|e| e["manager"] == manager)
    }

    fn applied_deployment(image: &str, with_sidecar: bool) -> Value {
        let mut containers = vec![json!({"name": "app", "image": image})];
        if with_sidecar {
            containers.push(json!({"name": "sidecar", "image": "proxy:1"}));
        }
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"team": "a"}},
               "spec": {"replicas": 2, "template": {"spec": {"containers": containers}}}})
    }

    #[test]
    fn apply_records_fields_v1() {
        let out = server_side_apply(
            None,
            &applied_deployment("app:1", false),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let entry = managed_for(&out, "kubectl").unwrap();
        assert_eq!(entry["operation"], "Apply");
        assert_eq!(entry["fieldsType"], "FieldsV1");
        assert_eq!(entry["apiVersion"], "apps/v1");
        assert_eq!(
            entry["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:team": {}}},
                "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"app\"}": {".": {}, "f:name": {}, "f:image": {}}}}}}
            })
        );
        assert_eq!(out["spec"]["replicas"], 2);
    }

    #[test]
    fn apply_removes_fields_no_longer_applied() {
        let first = server_side_apply(
            None,
            &applied_deployment("app:1", true),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        )
        .unwrap();
        assert_eq!(
            first["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let second = server_side_apply(
            Some(&first),
            &applied_deployment("app:2", false),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let containers = second["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["image"], "app:2");
    }

    #[test]
    fn apply_conflicts_with_other_managers_unless_forced() {
        let first = server_side_apply(
            None,
            &applied_deployment("app:1", false),
            &apply_opts("alice", false),
            &DEPLOYMENT,
        )
        .unwrap();
        // Same values: shared ownership, no conflict.
        let shared = server_side_apply(
            Some(&first),
            &applied_deployment("app:1", false),
            &apply_opts("bob", false),
            &DEPLOYMENT,
        )
        .unwrap();
        assert!(managed_for(&shared, "alice").is_some());
        assert!(managed_for(&shared, "bob").is_some());
        // Different value: conflict naming the manager and the field.
        let err = server_side_apply(
            Some(&first),
            &applied_deployment("app:2", false),
            &apply_opts("bob", false),
            &DEPLOYMENT,
        )
        .unwrap_err();
        let PatchError::ApplyConflict { conflicts } = &err else {
            panic!("expected a conflict, got {err:?}");
        };
        assert_eq!(
            conflicts,
            &vec![(
                "alice".to_string(),
                ".spec.template.spec.containers[name=\"app\"].image".to_string()
            )]
        );
        assert_eq!(err.http_status(), 409);
        // Forced: ownership moves.
        let forced = server_side_apply(
            Some(&first),
            &applied_deployment("app:2", false),
            &apply_opts("bob", true),
            &DEPLOYMENT,
        )
        .unwrap();
        assert_eq!(
            forced["spec"]["template"]["spec"]["containers"][0]["image"],
            "app:2"
        );
        let alice = managed_for(&forced, "alice").unwrap();
        let alice_leaves = leaves(alice["fieldsV1"].as_object().unwrap());
        assert!(!alice_leaves
            .iter()
            .any(|l| l.last().map(String::as_str) == Some("f:image")));
        // Alice stops applying the image: it stays, since bob owns it now.
        let mut alice_config = applied_deployment("app:1", false);
        alice_config["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("image");
        let after = server_side_apply(
            Some(&forced),
            &alice_config,
            &apply_opts("alice", false),
            &DEPLOYMENT,
        )
        .unwrap();
        assert_eq!(
            after["spec"]["template"]["spec"]["containers"][0]["image"],
            "app:2"
        );
    }

    #[test]
    fn update_managers_conflict_with_apply() {
        let created = server_side_apply(
            None,
            &applied_deployment("app:1", false),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(Some(&created), &mut scaled, "hpa", NOW, None);
        let hpa = managed_for(&scaled, "hpa").unwrap();
        assert_eq!(hpa["operation"], "Update");
        assert_eq!(hpa["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
        let kubectl = managed_for(&scaled, "kubectl").unwrap();
        assert!(kubectl["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        let err = server_side_apply(
            Some(&scaled),
            &applied_deployment("app:1", false),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        );
        // kubectl no longer owns replicas (hpa took it) and applies 2 != 5.
        assert!(
            matches!(err, Err(PatchError::ApplyConflict { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn record_update_status_subresource() {
        let old = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 1}});
        let mut new = old.clone();
        new["status"] =
            json!({"readyReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]});
        record_update(Some(&old), &mut new, "controller", NOW, Some("status"));
        let entry = managed_for(&new, "controller").unwrap();
        assert_eq!(entry["subresource"], "status");
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:status": {"f:readyReplicas": {}, "f:conditions": {"k:{\"type\":\"Available\"}": {".": {}, "f:type": {}, "f:status": {}}}}})
        );
        // A no-op write keeps managedFields unchanged.
        let mut again = new.clone();
        record_update(
            Some(&new),
            &mut again,
            "controller",
            "2030-01-01T00:00:00Z",
            Some("status"),
        );
        assert_eq!(
            again["metadata"]["managedFields"],
            new["metadata"]["managedFields"]
        );
    }

    #[test]
    fn record_update_on_create_owns_everything_and_deletes_release_fields() {
        let mut created = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"x": "1"}}, "data": {"a": "1", "b": "2"}});
        record_update(None, &mut created, "kubectl-create", NOW, None);
        let entry = managed_for(&created, "kubectl-create").unwrap();
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:labels": {"f:x": {}}}})
        );
        let mut edited = created.clone();
        edited["data"].as_object_mut().unwrap().remove("b");
        record_update(Some(&created), &mut edited, "editor", NOW, None);
        let entry = managed_for(&edited, "kubectl-create").unwrap();
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {"f:x": {}}}})
        );
        assert!(managed_for(&edited, "editor").is_none());
    }

    #[test]
    fn set_and_map_lists_in_apply() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "hosts": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}}});
        let s = MergeSchema::Structural(&schema);
        let a = server_side_apply(
            None,
            &json!({"apiVersion": "x/v1", "kind": "K", "spec": {"hosts": ["a"]}}),
            &apply_opts("m1", false),
            &s,
        )
        .unwrap();
        let b = server_side_apply(
            Some(&a),
            &json!({"apiVersion": "x/v1", "kind": "K", "spec": {"hosts": ["b"]}}),
            &apply_opts("m2", false),
            &s,
        )
        .unwrap();
        assert_eq!(b["spec"]["hosts"], json!(["a", "b"]));
        let m2 = managed_for(&b, "m2").unwrap();
        assert_eq!(
            m2["fieldsV1"],
            json!({"f:spec": {"f:hosts": {"v:\"b\"": {}}}})
        );
        let c = server_side_apply(
            Some(&b),
            &json!({"apiVersion": "x/v1", "kind": "K", "spec": {}}),
            &apply_opts("m1", false),
            &s,
        )
        .unwrap();
        assert_eq!(c["spec"]["hosts"], json!(["b"]));
    }

    #[test]
    fn bad_input_does_not_panic() {
        for patch in [
            json!(null),
            json!(1),
            json!("x"),
            json!([1]),
            json!({"$patch": 3}),
        ] {
            for t in [
                PatchType::Json,
                PatchType::Merge,
                PatchType::StrategicMerge,
                PatchType::Apply,
            ] {
                let _ = apply_patch(t, &deployment(), &patch, &DEPLOYMENT);
            }
            let _ = server_side_apply(
                Some(&deployment()),
                &patch,
                &apply_opts("m", false),
                &DEPLOYMENT,
            );
        }
        let mut weird = json!({"metadata": {"managedFields": [{"manager": 1}, "x", {"manager": "m", "fieldsV1": 3}]}});
        record_update(Some(&json!(7)), &mut weird, "m", NOW, None);
    }

    #[test]
    fn status_apply_owns_only_status() {
        let created = server_side_apply(
            None,
            &applied_deployment("app:1", false),
            &apply_opts("kubectl", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let status_config = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 9}, "status": {"replicas": 2, "conditions": [{"type": "Available", "status": "True"}]}});
        let out = server_side_apply_to(
            Some(&created),
            &status_config,
            &apply_opts("controller", true),
            &DEPLOYMENT,
            Some("status"),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["replicas"], 2,
            "spec is not written through status"
        );
        assert_eq!(out["status"]["replicas"], 2);
        let entry = managed_for(&out, "controller").unwrap();
        assert_eq!(entry["subresource"], "status");
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:status": {"f:replicas": {}, "f:conditions": {"k:{\"type\":\"Available\"}": {".": {}, "f:type": {}, "f:status": {}}}}})
        );
        // The main-resource apply entry of the same manager name is separate.
        let again = server_side_apply(
            Some(&out),
            &applied_deployment("app:1", false),
            &apply_opts("controller", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let entries = again["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(
            entries
                .iter()
                .filter(|e| e["manager"] == "controller")
                .count(),
            2
        );
        assert_eq!(again["status"]["replicas"], 2);
    }

    #[test]
    fn update_entries_of_custom_resources_follow_the_structural_schema() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "routes": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                       "items": {"type": "object", "properties": {"name": {"type": "string"}, "weight": {"type": "integer"}}}}}}}});
        let s = MergeSchema::Structural(&schema);
        let config = json!({"apiVersion": "x.dev/v1", "kind": "Route", "metadata": {"name": "r"},
            "spec": {"routes": [{"name": "stable", "weight": 100}, {"name": "canary", "weight": 0}]}});
        let applied = server_side_apply(None, &config, &apply_opts("gitops", false), &s).unwrap();
        let mut shifted = applied.clone();
        shifted["spec"]["routes"][1]["weight"] = json!(10);
        record_update_with_schema(Some(&applied), &mut shifted, "serin", NOW, None, &s);
        let serin = managed_for(&shifted, "serin").unwrap();
        assert_eq!(
            serin["fieldsV1"],
            json!({"f:spec": {"f:routes": {"k:{\"name\":\"canary\"}": {"f:weight": {}}}}})
        );
        // The applier now conflicts on exactly that weight.
        let err = server_side_apply(Some(&shifted), &config, &apply_opts("gitops", false), &s)
            .unwrap_err();
        let PatchError::ApplyConflict { conflicts } = err else {
            panic!("expected a conflict");
        };
        assert_eq!(
            conflicts,
            vec![(
                "serin".to_string(),
                ".spec.routes[name=\"canary\"].weight".to_string()
            )]
        );
    }

    #[test]
    fn apply_keeps_items_another_manager_still_owns_fields_of() {
        let first = server_side_apply(
            None,
            &applied_deployment("app:1", true),
            &apply_opts("alice", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let sidecar_env = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "env": [{"name": "X", "value": "1"}]}]}}}});
        let shared = server_side_apply(
            Some(&first),
            &sidecar_env,
            &apply_opts("bob", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let dropped = server_side_apply(
            Some(&shared),
            &applied_deployment("app:1", false),
            &apply_opts("alice", false),
            &DEPLOYMENT,
        )
        .unwrap();
        let containers = dropped["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(
            containers.len(),
            2,
            "bob still owns the sidecar item: {containers:?}"
        );
        assert_eq!(containers[1]["name"], "sidecar", "the key field stays");
        assert!(
            containers[1].get("image").is_none(),
            "alice's field of it goes"
        );
        assert_eq!(containers[1]["env"][0]["name"], "X");
    }

    #[test]
    fn apply_matches_items_whose_defaulted_keys_it_leaves_out() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "ports": {"type": "array", "x-kubernetes-list-type": "map",
                      "x-kubernetes-list-map-keys": ["port", "protocol"],
                      "items": {"type": "object", "properties": {
                          "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"},
                          "name": {"type": "string"}}}}}}}});
        let s = MergeSchema::Structural(&schema);
        let live = json!({"apiVersion": "x/v1", "kind": "K", "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}});
        let applied = json!({"apiVersion": "x/v1", "kind": "K", "spec": {"ports": [{"port": 80, "name": "http"}]}});
        let out = server_side_apply(Some(&live), &applied, &apply_opts("m", false), &s).unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "protocol": "TCP", "name": "http"}])
        );
    }

    fn arbitrary_json(with_lists: bool) -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-5i64..5).prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, move |inner| {
            let max_list = if with_lists { 3 } else { 1 };
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..max_list).prop_map(move |items| {
                    if with_lists {
                        Value::Array(items)
                    } else {
                        Value::String("no-list".into())
                    }
                }),
                proptest::collection::btree_map("[a-d]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arbitrary_object(with_lists: bool) -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        proptest::collection::btree_map("[a-d]", arbitrary_json(with_lists), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Without lists or directives, a strategic merge patch is a JSON merge patch.
        #[test]
        fn strategic_merge_without_lists_is_merge_patch(current in arbitrary_object(false), patch in arbitrary_object(false)) {
            let merge = apply_patch(PatchType::Merge, &current, &patch, &MergeSchema::Unknown).unwrap();
            let strategic = apply_patch(PatchType::StrategicMerge, &current, &patch, &MergeSchema::Unknown).unwrap();
            proptest::prop_assert_eq!(merge, strategic);
        }

        /// Applying the same configuration twice changes nothing, managedFields included.
        #[test]
        fn apply_is_idempotent(spec in arbitrary_object(true)) {
            let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": spec});
            let once = server_side_apply(None, &config, &apply_opts("m", false), &MergeSchema::Unknown).unwrap();
            let twice = server_side_apply(Some(&once), &config, &apply_opts("m", false), &MergeSchema::Unknown).unwrap();
            proptest::prop_assert_eq!(once, twice);
        }
    }
}
