//! Gateway API router: decides the weights of the stable and canary backendRefs of one HTTPRoute rule,
//! and the header rules and request mirror Serin adds beside it (`gateway.networking.k8s.io/v1`).

use serde_json::{json, Value};

use super::shared::{
    canary_share, clamped_weight, covers, effective_mirror, managed_route_name,
    read_managed_routes, regex_escape, write_managed_routes, ManagedRoutes, MANAGED_PREFIX,
};
use super::{Change, ObjectKey, RouteInvalid, RouterObjects, RoutingKind, TrafficRouter};
use crate::crd::rollout::{HeaderMatch, StringMatch};
use crate::strategy::{DesiredTraffic, ObservedTraffic};

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
        objects
            .get(&self.key())
            .ok_or_else(|| RouteInvalid::Missing {
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
        let rules = route
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let referencing = |service: &str, rule: &Value| {
            rule.get("backendRefs")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|backend_ref| self.refers_to(backend_ref, service))
                })
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
    fn header_rule(&self, primary: &Value, header_route: &crate::strategy::HeaderRoute) -> Value {
        let headers: Vec<Value> = header_route.matches.iter().map(header_match).collect();
        let primary_matches = primary
            .get("matches")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let matches: Vec<Value> = if primary_matches.is_empty() {
            vec![json!({"headers": headers})]
        } else {
            primary_matches
                .into_iter()
                .map(|mut user_match| {
                    let mut all_headers = user_match
                        .get("headers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
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
            .and_then(|refs| {
                refs.iter()
                    .find(|backend_ref| self.refers_to(backend_ref, &self.canary_service))
            })
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
            .map(|filters| {
                filters
                    .iter()
                    .filter(|filter| !self.is_managed_mirror(filter))
                    .cloned()
                    .collect()
            })
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
            .and_then(|refs| {
                refs.iter()
                    .find(|backend_ref| self.refers_to(backend_ref, &self.canary_service))
            })
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
    rule.get("name")
        .and_then(Value::as_str)
        .is_some_and(|name| name.starts_with(MANAGED_PREFIX))
}

/// A Gateway API header match; a prefix becomes an anchored regular expression (Gateway API has no prefix
/// match for headers).
fn header_match(condition: &HeaderMatch) -> Value {
    let StringMatch {
        exact,
        prefix,
        regex,
    } = &condition.header_value;
    let (kind, value) = match (exact, prefix, regex) {
        (Some(exact), _, _) => ("Exact", exact.clone()),
        (None, Some(prefix), _) => ("RegularExpression", format!("^{}.*", regex_escape(prefix))),
        (None, None, Some(regex)) => ("RegularExpression", regex.clone()),
        (None, None, None) => ("RegularExpression", ".*".to_string()),
    };
    json!({"type": kind, "name": condition.header_name, "value": value})
}

fn weight_of(backend_ref: &Value) -> i64 {
    backend_ref
        .get("weight")
        .and_then(Value::as_i64)
        .unwrap_or(1)
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
        let refs = primary
            .get("backendRefs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let total_of = |service: &str| -> i64 {
            refs.iter()
                .filter(|backend_ref| self.refers_to(backend_ref, service))
                .map(weight_of)
                .sum()
        };
        let managed = read_managed_routes(route);
        let rule_names: Vec<&str> = route
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(|rule| rule.get("name").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        let mirrored = primary
            .get("filters")
            .and_then(Value::as_array)
            .is_some_and(|filters| filters.iter().any(|filter| self.is_managed_mirror(filter)));
        Ok(ObservedTraffic {
            canary_weight: canary_share(
                total_of(&self.stable_service),
                total_of(&self.canary_service),
            ),
            header_routes: managed
                .header_routes
                .into_iter()
                .filter(|name| rule_names.contains(&managed_route_name(name).as_str()))
                .collect(),
            mirror_routes: if mirrored {
                managed.mirror_routes
            } else {
                Vec::new()
            },
        })
    }

    fn desired(
        &self,
        objects: &RouterObjects,
        desired: &DesiredTraffic,
    ) -> Result<Vec<Change>, RouteInvalid> {
        let route = self.route(objects)?;
        let index = self.primary_rule(route)?;
        let canary_weight = clamped_weight(desired);
        let mut rules = route["spec"]["rules"]
            .as_array()
            .cloned()
            .unwrap_or_default();
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
                // Written explicitly even where the default (1) would give the same split: Serin's
                // weights are percentages, and observe reads them back as such.
                if backend_ref.get("weight").and_then(Value::as_i64) != Some(weight) {
                    backend_ref["weight"] = json!(weight);
                }
            }
        }

        let mirror = effective_mirror(desired);
        let existing_filters = primary
            .get("filters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let existing_mirror = existing_filters
            .iter()
            .find(|filter| self.is_managed_mirror(filter))
            .cloned();
        let mut filters: Vec<Value> = existing_filters
            .iter()
            .filter(|filter| !self.is_managed_mirror(filter))
            .cloned()
            .collect();
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
            let present = rules.iter().find(|rule| {
                is_managed_rule(rule)
                    && rule.get("name").and_then(Value::as_str) == Some(name.as_str())
            });
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
                header_routes: desired
                    .header_routes
                    .iter()
                    .map(|route| route.name.clone())
                    .collect(),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::traffic::test_support::{applied, bytes, exact_header, mirror, traffic, written};

    fn router() -> GatewayApiRouter {
        GatewayApiRouter {
            namespace: "shop".into(),
            http_route: "checkout".into(),
            stable_service: "checkout".into(),
            canary_service: "checkout-canary".into(),
        }
    }

    fn user_route() -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "5",
                         "annotations": {"team": "payments"}},
            "spec": {
                "parentRefs": [{"name": "public"}],
                "hostnames": ["shop.example"],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                     "filters": [{"type": "RequestHeaderModifier",
                                  "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                     "backendRefs": [{"name": "checkout", "port": 80, "weight": 100},
                                     {"name": "checkout-canary", "port": 80, "weight": 0}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                     "backendRefs": [{"name": "static", "port": 80}]}
                ]
            }
        })
    }

    fn objects(route: Value) -> RouterObjects {
        let mut objects = RouterObjects::new();
        objects.insert(router().key(), route);
        objects
    }

    fn with_weights(mut route: Value, stable: i64, canary: i64) -> Value {
        route["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(stable);
        route["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(canary);
        route
    }

    #[test]
    fn weights_are_set_on_the_primary_rule_and_nothing_else_changes() {
        for (weight, expected_stable) in [(10, 90), (50, 50), (100, 0)] {
            let changes = router()
                .desired(&objects(user_route()), &traffic(weight))
                .expect("routable");
            let changed = written(&changes);
            let refs = &changed["spec"]["rules"][0]["backendRefs"];
            assert_eq!(
                refs[0]["weight"],
                json!(expected_stable),
                "stable at {weight}"
            );
            assert_eq!(refs[1]["weight"], json!(weight), "canary at {weight}");
            assert_eq!(
                bytes(&with_weights(changed.clone(), 100, 0)),
                bytes(&user_route()),
                "only weights at {weight}"
            );
            let observed = router()
                .observe(&applied(&objects(user_route()), &changes))
                .expect("observable");
            assert_eq!(observed.canary_weight, weight);
        }
    }

    #[test]
    fn a_route_that_already_carries_the_weights_is_not_written() {
        assert!(router()
            .desired(&objects(user_route()), &traffic(0))
            .expect("routable")
            .is_empty());
        let at_ten = with_weights(user_route(), 90, 10);
        assert!(router()
            .desired(&objects(at_ten), &traffic(10))
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn a_hand_edit_is_observed_as_drift_and_reverted() {
        let edited = with_weights(user_route(), 70, 30);
        assert_eq!(
            router()
                .observe(&objects(edited.clone()))
                .expect("observable")
                .canary_weight,
            30
        );
        let changes = router()
            .desired(&objects(edited), &traffic(10))
            .expect("routable");
        assert_eq!(
            bytes(&written(&changes)),
            bytes(&with_weights(user_route(), 90, 10))
        );
    }

    #[test]
    fn header_route_is_a_managed_rule_to_the_canary_and_is_removed_without_a_trace() {
        let mut desired = traffic(10);
        desired.header_routes = vec![exact_header("beta users", "X-Canary", "yes")];
        let changes = router()
            .desired(&objects(user_route()), &desired)
            .expect("routable");
        let changed = written(&changes);
        let rules = changed["spec"]["rules"].as_array().expect("rules");
        assert_eq!(rules.len(), 3);
        assert_eq!(
            rules[2],
            json!({
                "name": "serin-beta-users",
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                             "headers": [{"type": "Exact", "name": "X-Canary", "value": "yes"}]}],
                "filters": [{"type": "RequestHeaderModifier",
                             "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                "backendRefs": [{"name": "checkout-canary", "port": 80, "weight": 1}]
            })
        );
        assert_eq!(rules[1], user_route()["spec"]["rules"][1]);
        let after = applied(&objects(user_route()), &changes);
        let observed = router().observe(&after).expect("observable");
        assert_eq!(observed.header_routes, vec!["beta users".to_string()]);
        assert!(
            router()
                .desired(&after, &desired)
                .expect("routable")
                .is_empty(),
            "idempotent"
        );

        let removal = router().desired(&after, &traffic(0)).expect("routable");
        assert_eq!(bytes(&written(&removal)), bytes(&user_route()));
    }

    #[test]
    fn server_defaults_on_a_managed_rule_do_not_cause_rewrites() {
        let mut desired = traffic(10);
        desired.header_routes = vec![exact_header("beta", "X-Canary", "yes")];
        let mut stored = written(
            &router()
                .desired(&objects(user_route()), &desired)
                .expect("routable"),
        );
        stored["spec"]["rules"][2]["backendRefs"][0]["group"] = json!("");
        stored["spec"]["rules"][2]["backendRefs"][0]["kind"] = json!("Service");
        assert!(router()
            .desired(&objects(stored), &desired)
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn mirror_is_a_request_mirror_filter_on_the_primary_rule_and_is_removed_at_the_end() {
        let mut desired = traffic(10);
        desired.mirror_routes = vec![mirror("shadow", 25)];
        let changes = router()
            .desired(&objects(user_route()), &desired)
            .expect("routable");
        let changed = written(&changes);
        assert_eq!(
            changed["spec"]["rules"][0]["filters"][1],
            json!({"type": "RequestMirror",
                   "requestMirror": {"backendRef": {"name": "checkout-canary", "port": 80}, "percent": 25}})
        );
        let after = applied(&objects(user_route()), &changes);
        assert_eq!(
            router().observe(&after).expect("observable").mirror_routes,
            vec!["shadow".to_string()]
        );
        let removal = router().desired(&after, &traffic(0)).expect("routable");
        assert_eq!(bytes(&written(&removal)), bytes(&user_route()));
    }

    #[test]
    fn invalid_routes_are_named_with_object_and_field() {
        let mut no_stable = user_route();
        no_stable["spec"]["rules"] = json!([{"backendRefs": [{"name": "other", "port": 80}]}]);
        let mut two_rules = user_route();
        two_rules["spec"]["rules"][1]["backendRefs"] = json!([{"name": "checkout", "port": 80}]);
        let mut no_canary = user_route();
        no_canary["spec"]["rules"][0]["backendRefs"] = json!([{"name": "checkout", "port": 80}]);
        let mut other_namespace = user_route();
        other_namespace["spec"]["rules"][0]["backendRefs"][0]["namespace"] = json!("elsewhere");
        let cases = [
            (Some(no_stable), "HTTPRoute shop/checkout: spec.rules[0].backendRefs: no backendRef to the stable Service \"checkout\""),
            (Some(two_rules), "HTTPRoute shop/checkout: spec.rules[0].backendRefs and spec.rules[1].backendRefs: both reference the stable Service \"checkout\""),
            (Some(no_canary), "HTTPRoute shop/checkout: spec.rules[0].backendRefs: no backendRef to the canary Service \"checkout-canary\""),
            (Some(other_namespace), "HTTPRoute shop/checkout: spec.rules: no rule has a backendRef to the stable Service \"checkout\""),
            (None, "HTTPRoute shop/checkout: not found (named by the Rollout's spec.strategy.canary.trafficRouting.gatewayAPI.httpRoute)"),
        ];
        for (route, expected) in cases {
            let objects = route.map(objects).unwrap_or_default();
            let message = router().validate(&objects).expect_err(expected).to_string();
            assert!(
                message.starts_with(expected),
                "{message}\n  expected to start with\n{expected}"
            );
            assert!(router().observe(&objects).is_err());
            assert!(
                router().desired(&objects, &traffic(10)).is_err(),
                "nothing written for {expected}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_weight_from_any_starting_point_is_observed_and_then_stable(
            weight in 0i32..=100,
            stable_start in 0i64..1000,
            canary_start in 0i64..1000,
        ) {
            let start = objects(with_weights(user_route(), stable_start, canary_start));
            let changes = router().desired(&start, &traffic(weight)).expect("routable");
            let after = applied(&start, &changes);
            proptest::prop_assert_eq!(router().observe(&after).expect("observable").canary_weight, weight);
            proptest::prop_assert!(router().desired(&after, &traffic(weight)).expect("routable").is_empty());
            let changed = after.get(&router().key()).cloned().expect("route");
            proptest::prop_assert_eq!(bytes(&with_weights(changed, 100, 0)), bytes(&user_route()));
        }
    }
}
