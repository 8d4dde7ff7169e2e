//! Helpers the routers share: JSON comparison that tolerates server defaults, names and annotations of
//! the routes Serin manages, and weight arithmetic.

use serde_json::{json, Map, Value};

use super::MANAGED_ROUTES_ANNOTATION;
use crate::strategy::DesiredTraffic;

/// Prefix of the names of the routes Serin adds (HTTPRoute rules, VirtualService HTTP routes).
pub(crate) const MANAGED_PREFIX: &str = "serin-";

/// Whether `existing` says everything `wanted` says. Fields the API server filled in by default (present
/// in `existing`, absent from `wanted`) do not count as differences, so that what Serin wrote and the
/// server defaulted is not written again on every reconcile. Numbers compare by value (10 == 10.0).
pub(crate) fn covers(existing: &Value, wanted: &Value) -> bool {
    match (existing, wanted) {
        (Value::Object(have), Value::Object(want)) => want
            .iter()
            .all(|(key, value)| have.get(key).is_some_and(|present| covers(present, value))),
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len()
                && have
                    .iter()
                    .zip(want)
                    .all(|(present, value)| covers(present, value))
        }
        (Value::Number(have), Value::Number(want)) => have.as_f64() == want.as_f64(),
        _ => existing == wanted,
    }
}

/// A regular expression (RE2 and PCRE alike) that matches exactly `text`.
pub(crate) fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() * 2);
    for character in text.chars() {
        if "\\.+*?()|[]{}^$".contains(character) {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// The name of the route Serin adds for a `setHeaderRoute` step: `serin-` and the step name made a valid
/// DNS subdomain (the HTTPRoute rule name rules), so it is recognisable and accepted by every schema.
pub(crate) fn managed_route_name(step_name: &str) -> String {
    let mut name: String = step_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        name = "header-route".to_string();
    }
    name.truncate(253 - MANAGED_PREFIX.len());
    let name = name.trim_end_matches(['-', '.']);
    format!("{MANAGED_PREFIX}{name}")
}

/// The header and mirror routes an object's managed-routes annotation lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ManagedRoutes {
    pub header_routes: Vec<String>,
    pub mirror_routes: Vec<String>,
}

pub(crate) fn read_managed_routes(object: &Value) -> ManagedRoutes {
    let parsed = object
        .pointer("/metadata/annotations")
        .and_then(|annotations| annotations.get(MANAGED_ROUTES_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .unwrap_or(Value::Null);
    let names = |field: &str| -> Vec<String> {
        parsed
            .get(field)
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    ManagedRoutes {
        header_routes: names("headerRoutes"),
        mirror_routes: names("mirrorRoutes"),
    }
}

/// Writes the managed-routes annotation into `object`, or removes it when there are none (and removes an
/// annotations map that becomes empty only if Serin's annotation was the only thing in it).
pub(crate) fn write_managed_routes(object: &mut Value, routes: &ManagedRoutes) {
    let wanted = if routes.header_routes.is_empty() && routes.mirror_routes.is_empty() {
        None
    } else {
        Some(
            json!({"headerRoutes": routes.header_routes, "mirrorRoutes": routes.mirror_routes})
                .to_string(),
        )
    };
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    match wanted {
        Some(text) => {
            let annotations = metadata
                .entry("annotations")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(annotations) = annotations.as_object_mut() {
                annotations.insert(MANAGED_ROUTES_ANNOTATION.to_string(), Value::String(text));
            }
        }
        None => {
            let emptied = match metadata
                .get_mut("annotations")
                .and_then(Value::as_object_mut)
            {
                Some(annotations) => {
                    annotations.remove(MANAGED_ROUTES_ANNOTATION).is_some()
                        && annotations.is_empty()
                }
                None => false,
            };
            if emptied {
                metadata.remove("annotations");
            }
        }
    }
}

/// The mirror in place: the names of the mirror routes with a percentage above 0 and the percentage to
/// mirror (the latest step's: a later `setMirrorRoute` replaces an earlier one on the same route).
pub(crate) fn effective_mirror(desired: &DesiredTraffic) -> Option<(Vec<String>, i32)> {
    let active: Vec<_> = desired
        .mirror_routes
        .iter()
        .filter(|mirror| mirror.percentage > 0)
        .collect();
    let last = active.last()?;
    Some((
        active.iter().map(|mirror| mirror.name.clone()).collect(),
        last.percentage.min(100),
    ))
}

/// The canary's percentage of the traffic split between two relative weights.
pub(crate) fn canary_share(stable_weight: i64, canary_weight: i64) -> i32 {
    let stable_weight = stable_weight.max(0);
    let canary_weight = canary_weight.max(0);
    let total = stable_weight + canary_weight;
    if total == 0 {
        return 0;
    }
    let share = (canary_weight * 100 + total / 2) / total;
    i32::try_from(share).unwrap_or(100)
}

/// The desired canary weight clamped to 0..=100.
pub(crate) fn clamped_weight(desired: &DesiredTraffic) -> i64 {
    i64::from(desired.canary_weight.clamp(0, 100))
}

/// Whether an Istio destination host names the Service `service` of `namespace`: the short name or one of
/// its qualified forms.
pub(crate) fn host_is_service(host: &str, service: &str, namespace: &str) -> bool {
    host == service
        || host == format!("{service}.{namespace}")
        || host == format!("{service}.{namespace}.svc")
        || host == format!("{service}.{namespace}.svc.cluster.local")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_ignores_server_defaults_but_not_changed_values() {
        let stored = json!({"name": "a", "kind": "Service", "group": "", "weight": 1, "list": [{"x": 1, "d": 2}]});
        assert!(covers(&stored, &json!({"name": "a", "list": [{"x": 1.0}]})));
        assert!(!covers(&stored, &json!({"name": "b"})));
        assert!(!covers(&stored, &json!({"list": [{"x": 1}, {"x": 2}]})));
        assert!(!covers(&stored, &json!({"missing": true})));
    }

    #[test]
    fn managed_route_names_are_valid_dns_subdomains() {
        assert_eq!(managed_route_name("header-1"), "serin-header-1");
        assert_eq!(managed_route_name("Beta Users!"), "serin-beta-users");
        assert_eq!(managed_route_name("__"), "serin-header-route");
        assert!(managed_route_name(&"x".repeat(400)).len() <= 253);
    }

    #[test]
    fn regex_escape_quotes_metacharacters() {
        assert_eq!(regex_escape("v1.2+beta"), "v1\\.2\\+beta");
    }

    #[test]
    fn canary_share_rounds_and_handles_zero() {
        assert_eq!(canary_share(90, 10), 10);
        assert_eq!(canary_share(1, 1), 50);
        assert_eq!(canary_share(0, 0), 0);
        assert_eq!(canary_share(2, 1), 33);
    }

    #[test]
    fn managed_routes_annotation_round_trips_and_cleans_up() {
        let mut object = json!({"metadata": {"name": "r"}});
        let routes = ManagedRoutes {
            header_routes: vec!["h".into()],
            mirror_routes: vec![],
        };
        write_managed_routes(&mut object, &routes);
        assert_eq!(read_managed_routes(&object), routes);
        write_managed_routes(&mut object, &ManagedRoutes::default());
        assert_eq!(object, json!({"metadata": {"name": "r"}}));
        let mut annotated = json!({"metadata": {"annotations": {"team": "x"}}});
        write_managed_routes(&mut annotated, &routes);
        write_managed_routes(&mut annotated, &ManagedRoutes::default());
        assert_eq!(
            annotated,
            json!({"metadata": {"annotations": {"team": "x"}}})
        );
    }
}
