//! Server-side printing: the `meta.k8s.io/v1 Table` kubectl asks for, with a CRD's additionalPrinterColumns.

use serde_json::{json, Map, Value};

use super::registry::ResourceInfo;

/// Kubernetes' short human duration ("45s", "3m20s", "5h", "12d").
pub fn human_duration(seconds: i64) -> String {
    if seconds < 0 {
        return "<invalid>".into();
    }
    let minutes = seconds / 60;
    let hours = minutes / 60;
    let days = hours / 24;
    let years = days / 365;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            rest => format!("{minutes}m{rest}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            rest => format!("{hours}h{rest}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            rest => format!("{days}d{rest}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if years < 8 {
        match days % 365 {
            0 => format!("{years}y"),
            rest => format!("{years}y{rest}d"),
        }
    } else {
        format!("{years}y")
    }
}

fn age_of(timestamp: &str) -> Option<String> {
    let parsed: k8s_openapi::jiff::Timestamp = timestamp.parse().ok()?;
    let elapsed = k8s_openapi::jiff::Timestamp::now().as_second() - parsed.as_second();
    Some(human_duration(elapsed))
}

/// Evaluates the simple JSONPath forms printer columns use: `.a.b`, `.a.b[0].c`, `.a["k"]`.
pub fn simple_json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cursor = object;
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(after_dot) = rest.strip_prefix('.') {
            let end = after_dot.find(['.', '[']).unwrap_or(after_dot.len());
            let key = &after_dot[..end];
            if !key.is_empty() {
                cursor = cursor.get(key)?;
            }
            rest = &after_dot[end..];
        } else if let Some(after_bracket) = rest.strip_prefix('[') {
            let end = after_bracket.find(']')?;
            let inside = after_bracket[..end].trim();
            cursor = match inside.parse::<usize>() {
                Ok(index) => cursor.get(index)?,
                Err(_) => cursor.get(inside.trim_matches(|c| c == '"' || c == '\''))?,
            };
            rest = &after_bracket[end + 1..];
        } else {
            return None;
        }
    }
    Some(cursor)
}

fn cell(column_type: &str, value: Option<&Value>) -> Value {
    let Some(value) = value else {
        return Value::Null;
    };
    match (column_type, value) {
        ("date", Value::String(text)) => age_of(text).map(Value::String).unwrap_or(Value::Null),
        ("integer", Value::Number(number)) => json!(number.as_i64()),
        ("number", Value::Number(number)) => json!(number.as_f64()),
        ("boolean", Value::Bool(flag)) => json!(flag),
        (_, Value::String(text)) => json!(text),
        (_, Value::Array(_) | Value::Object(_)) => json!(value.to_string()),
        (_, other) => json!(other.to_string()),
    }
}

struct Column {
    name: String,
    column_type: String,
    format: String,
    description: String,
    priority: i64,
    json_path: String,
}

fn columns(info: &ResourceInfo, version: &str) -> Vec<Column> {
    let declared = info
        .printer_columns
        .get(version)
        .cloned()
        .unwrap_or_default();
    let mut columns = vec![Column {
        name: "Name".into(),
        column_type: "string".into(),
        format: "name".into(),
        description: "Name must be unique within a namespace.".into(),
        priority: 0,
        json_path: ".metadata.name".into(),
    }];
    if declared.is_empty() {
        columns.push(Column {
            name: "Age".into(),
            column_type: "date".into(),
            format: String::new(),
            description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
            priority: 0,
            json_path: ".metadata.creationTimestamp".into(),
        });
    }
    for column in declared {
        let text = |key: &str| {
            column
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        columns.push(Column {
            name: text("name"),
            column_type: text("type"),
            format: text("format"),
            description: text("description"),
            priority: column.get("priority").and_then(Value::as_i64).unwrap_or(0),
            json_path: text("jsonPath"),
        });
    }
    columns
}

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(text: Option<&str>) -> IncludeObject {
        match text {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// A Table of `objects`; `with_columns` false leaves out the column definitions (later watch events).
pub fn table(
    info: &ResourceInfo,
    version: &str,
    objects: &[Value],
    include: IncludeObject,
    resource_version: Option<&str>,
    with_columns: bool,
) -> Value {
    let columns = columns(info, version);
    let definitions: Vec<Value> = if with_columns {
        columns
            .iter()
            .map(|c| json!({"name": c.name, "type": c.column_type, "format": c.format, "description": c.description, "priority": c.priority}))
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> =
                columns.iter().map(|c| cell(&c.column_type, simple_json_path(object, &c.json_path))).collect();
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(cells));
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row.insert(
                        "object".into(),
                        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({}))}),
                    );
                }
                IncludeObject::Object => {
                    row.insert("object".into(), object.clone());
                }
            }
            Value::Object(row)
        })
        .collect();
    let mut metadata = json!({});
    if let Some(version) = resource_version {
        metadata["resourceVersion"] = json!(version);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600), "60m");
        assert_eq!(human_duration(5 * 3600 + 60), "5h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400), "3d");
        assert_eq!(human_duration(400 * 86400), "400d");
    }

    #[test]
    fn json_paths_reach_fields_and_list_items() {
        let object = json!({"status": {"phase": "Progressing", "steps": [{"weight": 20}]}, "metadata": {"labels": {"a.b/c": "x"}}});
        assert_eq!(
            simple_json_path(&object, ".status.phase"),
            Some(&json!("Progressing"))
        );
        assert_eq!(
            simple_json_path(&object, ".status.steps[0].weight"),
            Some(&json!(20))
        );
        assert_eq!(
            simple_json_path(&object, ".metadata.labels['a.b/c']"),
            Some(&json!("x"))
        );
        assert_eq!(simple_json_path(&object, ".status.missing"), None);
    }
}
