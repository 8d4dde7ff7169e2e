//! Gateway API router: decides the weights of the stable and canary backendRefs of one HTTPRoute rule,
//! and the header rules and request mirror Serin adds beside it (`gateway.networking.k8s.io/v1`).

use serde_json::{json, Value};

use super::shared::{
    canary_share, clamped_weight, covers, effective_mirror, managed_route_name, read_managed_routes,
    regex_escape, write_managed_routes, ManagedRoutes, MANAGED_PREFIX,
};
use super::{Change, DesiredTraffic, ObjectKey, ObservedTraffic, RouteInvalid, RouterObjects, RoutingKind, TrafficRouter};
use crate::crd::rollout::{HeaderMatch, StringMatch};

/// Routes through the HTTPRoute `http_route` in `namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayApiRouter {
    pub namespace: String,
    pub http_route: String,
    pub stable_service: String,
    pub canary_service: String,
}

impl GatewayApiRouter {
    fn key(&self) -> ObjectKey {
        ObjectKey::new(RoutingKind::HttpRoute, &self.namespace, &self.http_route)
    }

    fn route<'a>(&self, objects: &'a RouterObjects) -> Result<&'a Value, RouteInvalid> {
        objects.get(&self.key()).ok_or_else(|| RouteInvalid::Missing {
            object: self.key().to_string(),
            named_by: "spec.strategy.canary.trafficRouting.gatewayAPI.httpRoute",
        })
    }

    /// Whether a backendRef points at the Service `service` in the route's namespace.
    fn refers_to(&self, backend_ref: &Value, service: &str) -> bool {
        let text = |field: &str| backend_ref.get(field).and_then(Value::as_str);
        text("name") == Some(service)
            && text("group").is_none_or(str::is_empty)
            && text("kind").is_none_or(|kind| kind == "Service")
            && text("namespace").is_none_or(|namespace| namespace == self.namespace)
    }

    /// Index of the rule whose weights Serin manages: the one user rule with backendRefs to both the
    /// stable and the canary Service.
    fn primary_rule(&self, route: &Value) -> Result<usize, RouteInvalid> {
        let object = self.key().to_string();
        let rules = route.pointer("/spec/rules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let referencing = |service: &str, rule: &Value| {
            rule.get("backendRefs")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|backend_ref| self.refers_to(backend_ref, service)))
        };
        let stable_rules: Vec<usize> = rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| !is_managed_rule(rule) && referencing(&self.stable_service, rule))
            .map(|(index, _)| index)
            .collect();
        match stable_rules.as_slice() {
            [] => {
                let field = if rules.len() == 1 { "spec.rules[0].backendRefs" } else { "spec.rules" };
                let problem = if rules.len() == 1 {
                    format!("no backendRef to the stable Service \"{}\"", self.stable_service)
                } else {
                    format!("no rule has a backendRef to the stable Service \"{}\"", self.stable_service)
                };
                Err(RouteInvalid::field(&object, field, problem))
            }
            [index] => {
                if referencing(&self.canary_service, &rules[*index]) {
                    Ok(*index)
                } else {
                    Err(RouteInvalid::field(
                        &object,
                        format!("spec.rules[{index}].backendRefs"),
                        format!("no backendRef to the canary Service \"{}\"", self.canary_service),
                    ))
                }
            }
            [first, second, ..] => Err(RouteInvalid::field(
                &object,
                format!("spec.rules[{first}].backendRefs and spec.rules[{second}].backendRefs"),
                format!(
                    "both reference the stable Service \"{}\"; Serin manages the weights of exactly one rule",
                    self.stable_service
                ),
            )),
        }
    }

    fn is_managed_mirror(&self, filter: &Value) -> bool {
        filter.get("type").and_then(Value::as_str) == Some("RequestMirror")
            && filter
                .pointer("/requestMirror/backendRef")
                .is_some_and(|backend_ref| self.refers_to(backend_ref, &self.canary_service))
    }

    /// The header rule for one `setHeaderRoute`: the primary rule's matches each narrowed by the headers,
    /// its filters except Serin's mirror, and the canary backendRef alone.
    fn header_rule(&self, primary: &Value, header_route: &super::HeaderRoute) -> Value {
        let headers: Vec<Value> = header_route.matches.iter().map(header_match).collect();
        let primary_matches = primary.get("matches").and_then(Value::as_array).cloned().unwrap_or_default();
        let matches: Vec<Value> = if primary_matches.is_empty() {
            vec![json!({"headers": headers})]
        } else {
            primary_matches
                .into_iter()
                .map(|mut user_match| {
                    let mut all_headers = user_match.get("headers").and_then(Value::as_array).cloned().unwrap_or_default();
                    all_headers.extend(headers.iter().cloned());
                    if let Some(fields) = user_match.as_object_mut() {
                        fields.insert("headers".to_string(), Value::Array(all_headers));
                    }
                    user_match
                })
                .collect()
        };
        let mut canary_ref = primary
            .get("backendRefs")
            .and_then(Value::as_array)
            .and_then(|refs| refs.iter().find(|backend_ref| self.refers_to(backend_ref, &self.canary_service)))
            .cloned()
            .unwrap_or_else(|| json!({"name": self.canary_service}));
        if let Some(fields) = canary_ref.as_object_mut() {
            fields.insert("weight".to_string(), json!(1));
        }
        let mut rule = json!({
            "name": managed_route_name(&header_route.name),
            "matches": matches,
            "backendRefs": [canary_ref],
        });
        let filters: Vec<Value> = primary
            .get("filters")
            .and_then(Value::as_array)
            .map(|filters| filters.iter().filter(|filter| !self.is_managed_mirror(filter)).cloned().collect())
            .unwrap_or_default();
        if !filters.is_empty() {
            rule["filters"] = Value::Array(filters);
        }
        if let Some(timeouts) = primary.get("timeouts") {
            rule["timeouts"] = timeouts.clone();
        }
        rule
    }

    fn mirror_filter(&self, primary: &Value, percent: i32) -> Value {
        let port = primary
            .get("backendRefs")
            .and_then(Value::as_array)
            .and_then(|refs| refs.iter().find(|backend_ref| self.refers_to(backend_ref, &self.canary_service)))
            .and_then(|backend_ref| backend_ref.get("port"))
            .cloned();
        let mut backend_ref = json!({"name": self.canary_service});
        if let Some(port) = port {
            backend_ref["port"] = port;
        }
        json!({"type": "RequestMirror", "requestMirror": {"backendRef": backend_ref, "percent": percent}})
    }
}

fn is_managed_rule(rule: &Value) -> bool {
    rule.get("name").and_then(Value::as_str).is_some_and(|name| name.starts_with(MANAGED_PREFIX))
}

/// A Gateway API header match; a prefix becomes an anchored regular expression (Gateway API has no prefix
/// match for headers).
fn header_match(condition: &HeaderMatch) -> Value {
    let StringMatch { exact, prefix, regex } = &condition.header_value;
    let (kind, value) = match (exact, prefix, regex) {
        (Some(exact), _, _) => ("Exact", exact.clone()),
        (None, Some(prefix), _) => ("RegularExpression", format!("^{}.*", regex_escape(prefix))),
        (None, None, Some(regex)) => ("RegularExpression", regex.clone()),
        (None, None, None) => ("RegularExpression", ".*".to_string()),
    };
    json!({"type": kind, "name": condition.header_name, "value": value})
}

fn weight_of(backend_ref: &Value) -> i64 {
    backend_ref.get("weight").and_then(Value::as_i64).unwrap_or(1)
}

impl TrafficRouter for GatewayApiRouter {
    fn name(&self) -> &'static str {
        "gatewayAPI"
    }

    fn objects(&self) -> Vec<ObjectKey> {
        vec![self.key()]
    }

    fn validate(&self, objects: &RouterObjects) -> Result<(), RouteInvalid> {
        self.primary_rule(self.route(objects)?).map(|_| ())
    }

    fn observe(&self, objects: &RouterObjects) -> Result<ObservedTraffic, RouteInvalid> {
        let route = self.route(objects)?;
        let index = self.primary_rule(route)?;
        let primary = &route["spec"]["rules"][index];
        let refs = primary.get("backendRefs").and_then(Value::as_array).cloned().unwrap_or_default();
        let total_of = |service: &str| -> i64 {
            refs.iter().filter(|backend_ref| self.refers_to(backend_ref, service)).map(weight_of).sum()
        };
        let managed = read_managed_routes(route);
        let rule_names: Vec<&str> = route
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(|rules| rules.iter().filter_map(|rule| rule.get("name").and_then(Value::as_str)).collect())
            .unwrap_or_default();
        let mirrored = primary
            .get("filters")
            .and_then(Value::as_array)
            .is_some_and(|filters| filters.iter().any(|filter| self.is_managed_mirror(filter)));
        Ok(ObservedTraffic {
            canary_weight: canary_share(total_of(&self.stable_service), total_of(&self.canary_service)),
            header_routes: managed
                .header_routes
                .into_iter()
                .filter(|name| rule_names.contains(&managed_route_name(name).as_str()))
                .collect(),
            mirror_routes: if mirrored { managed.mirror_routes } else { Vec::new() },
        })
    }

    fn desired(&self, objects: &RouterObjects, desired: &DesiredTraffic) -> Result<Vec<Change>, RouteInvalid> {
        let route = self.route(objects)?;
        let index = self.primary_rule(route)?;
        let canary_weight = clamped_weight(desired);
        let mut rules = route["spec"]["rules"].as_array().cloned().unwrap_or_default();
        let mut primary = rules[index].clone();

        if let Some(refs) = primary.get_mut("backendRefs").and_then(Value::as_array_mut) {
            for backend_ref in refs.iter_mut() {
                let weight = if self.refers_to(backend_ref, &self.stable_service) {
                    100 - canary_weight
                } else if self.refers_to(backend_ref, &self.canary_service) {
                    canary_weight
                } else {
                    continue;
                };
                if weight_of(backend_ref) != weight || backend_ref.get("weight").is_none() {
                    backend_ref["weight"] = json!(weight);
                }
            }
        }

        let mirror = effective_mirror(desired);
        let existing_filters = primary.get("filters").and_then(Value::as_array).cloned().unwrap_or_default();
        let existing_mirror = existing_filters.iter().find(|filter| self.is_managed_mirror(filter)).cloned();
        let mut filters: Vec<Value> =
            existing_filters.iter().filter(|filter| !self.is_managed_mirror(filter)).cloned().collect();
        if let Some((_, percent)) = &mirror {
            let wanted = self.mirror_filter(&primary, *percent);
            filters.push(match existing_mirror {
                Some(present) if covers(&present, &wanted) => present,
                _ => wanted,
            });
        }
        if filters != existing_filters {
            match primary.as_object_mut() {
                Some(fields) if filters.is_empty() => {
                    fields.remove("filters");
                }
                Some(fields) => {
                    fields.insert("filters".to_string(), Value::Array(filters));
                }
                None => {}
            }
        }

        let mut seen_names = Vec::new();
        let mut header_rules = Vec::new();
        for header_route in &desired.header_routes {
            let wanted = self.header_rule(&primary, header_route);
            let name = managed_route_name(&header_route.name);
            if seen_names.contains(&name) {
                return Err(RouteInvalid::Unsupported {
                    router: "gatewayAPI",
                    what: format!("give two header routes the same rule name \"{name}\""),
                });
            }
            let present = rules
                .iter()
                .find(|rule| is_managed_rule(rule) && rule.get("name").and_then(Value::as_str) == Some(name.as_str()));
            header_rules.push(match present {
                Some(present) if covers(present, &wanted) => present.clone(),
                _ => wanted,
            });
            seen_names.push(name);
        }

        rules[index] = primary;
        rules.retain(|rule| !is_managed_rule(rule));
        rules.extend(header_rules);

        let mut changed = route.clone();
        changed["spec"]["rules"] = Value::Array(rules);
        write_managed_routes(
            &mut changed,
            &ManagedRoutes {
                header_routes: desired.header_routes.iter().map(|route| route.name.clone()).collect(),
                mirror_routes: mirror.map(|(names, _)| names).unwrap_or_default(),
            },
        );
        if &changed == route {
            return Ok(Vec::new());
        }
        Ok(vec![Change::Update {
            key: self.key(),
            current: route.clone(),
            desired: changed,
        }])
    }
}
