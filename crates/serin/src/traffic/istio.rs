//! Istio router: decides the destination weights of named VirtualService HTTP routes, the header routes and
//! mirror Serin adds there, and the pod-template-hash labels of DestinationRule subsets
//! (`networking.istio.io/v1`).

use serde_json::{json, Map, Value};

use super::shared::{
    canary_share, clamped_weight, covers, effective_mirror, host_is_service, managed_route_name,
    read_managed_routes, write_managed_routes, ManagedRoutes, MANAGED_PREFIX,
};
use super::{Change, ObjectKey, RouteInvalid, RouterObjects, RoutingKind, TrafficRouter};
use crate::crd::labels::POD_TEMPLATE_HASH;
use crate::crd::rollout::{HeaderMatch, IstioDestinationRule};
use crate::strategy::{DesiredTraffic, ObservedTraffic};

const ROUTES_FIELD: &str = "spec.strategy.canary.trafficRouting.istio.virtualService.routes";

/// Routes through the VirtualService `virtual_service` (and, with subsets, the DestinationRule) in `namespace`.
#[derive(Clone, Debug, PartialEq)]
pub struct IstioRouter {
    pub namespace: String,
    pub virtual_service: String,
    /// Names of the HTTP routes whose weights Serin manages; empty means the only HTTP route.
    pub routes: Vec<String>,
    pub destination_rule: Option<IstioDestinationRule>,
    pub stable_service: String,
    pub canary_service: String,
}

/// Which side of the split a destination is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Stable,
    Canary,
}

impl IstioRouter {
    fn vs_key(&self) -> ObjectKey {
        ObjectKey::new(
            RoutingKind::VirtualService,
            &self.namespace,
            &self.virtual_service,
        )
    }

    fn dr_key(&self) -> Option<ObjectKey> {
        self.destination_rule
            .as_ref()
            .map(|rule| ObjectKey::new(RoutingKind::DestinationRule, &self.namespace, &rule.name))
    }

    fn service_key(&self, service: &str) -> ObjectKey {
        ObjectKey::new(RoutingKind::Service, &self.namespace, service)
    }

    /// The pod-template hash a Service's selector is pinned to. The planner pins the stable and canary
    /// Services before it moves weights (and, at promotion, the stable Service to the new version before
    /// the weight returns to it), so subsets that follow the Services never select the wrong pods.
    fn pinned_hash<'a>(&self, objects: &'a RouterObjects, service: &str) -> Option<&'a str> {
        objects
            .get(&self.service_key(service))?
            .pointer("/spec/selector")?
            .get(POD_TEMPLATE_HASH)?
            .as_str()
    }

    fn virtual_service<'a>(&self, objects: &'a RouterObjects) -> Result<&'a Value, RouteInvalid> {
        objects
            .get(&self.vs_key())
            .ok_or_else(|| RouteInvalid::Missing {
                object: self.vs_key().to_string(),
                named_by: "spec.strategy.canary.trafficRouting.istio.virtualService.name",
            })
    }

    fn destination_rule_object<'a>(
        &self,
        objects: &'a RouterObjects,
    ) -> Result<Option<&'a Value>, RouteInvalid> {
        let Some(key) = self.dr_key() else {
            return Ok(None);
        };
        objects
            .get(&key)
            .map(Some)
            .ok_or_else(|| RouteInvalid::Missing {
                object: key.to_string(),
                named_by: "spec.strategy.canary.trafficRouting.istio.destinationRule.name",
            })
    }

    /// Which side a `route[].destination` serves: by subset with a DestinationRule, else by host.
    fn side_of(&self, destination: &Value) -> Option<Side> {
        match &self.destination_rule {
            Some(rule) => {
                let subset = destination.get("subset").and_then(Value::as_str)?;
                if subset == rule.stable_subset_name {
                    Some(Side::Stable)
                } else if subset == rule.canary_subset_name {
                    Some(Side::Canary)
                } else {
                    None
                }
            }
            None => {
                let host = destination.get("host").and_then(Value::as_str)?;
                if host_is_service(host, &self.stable_service, &self.namespace) {
                    Some(Side::Stable)
                } else if host_is_service(host, &self.canary_service, &self.namespace) {
                    Some(Side::Canary)
                } else {
                    None
                }
            }
        }
    }

    fn side_name(&self, side: Side) -> String {
        match (&self.destination_rule, side) {
            (Some(rule), Side::Stable) => {
                format!("destination with subset \"{}\"", rule.stable_subset_name)
            }
            (Some(rule), Side::Canary) => {
                format!("destination with subset \"{}\"", rule.canary_subset_name)
            }
            (None, Side::Stable) => format!(
                "destination to the stable Service \"{}\"",
                self.stable_service
            ),
            (None, Side::Canary) => format!(
                "destination to the canary Service \"{}\"",
                self.canary_service
            ),
        }
    }

    /// Indexes of the HTTP routes whose weights Serin manages, each checked to have both destinations.
    fn primary_routes(&self, virtual_service: &Value) -> Result<Vec<usize>, RouteInvalid> {
        let object = self.vs_key().to_string();
        let http = virtual_service
            .pointer("/spec/http")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let user_routes: Vec<usize> = (0..http.len())
            .filter(|index| !is_managed_route(&http[*index]))
            .collect();
        let indexes = if self.routes.is_empty() {
            match user_routes.as_slice() {
                [only] => vec![*only],
                _ => {
                    return Err(RouteInvalid::field(
                        &object,
                        "spec.http",
                        format!(
                            "{} HTTP routes and none named in the Rollout's {ROUTES_FIELD}; name the routes Serin manages",
                            user_routes.len()
                        ),
                    ))
                }
            }
        } else {
            let mut indexes = Vec::new();
            for name in &self.routes {
                let found = user_routes.iter().find(|index| {
                    http[**index].get("name").and_then(Value::as_str) == Some(name.as_str())
                });
                match found {
                    Some(index) => indexes.push(*index),
                    None => {
                        return Err(RouteInvalid::field(
                            &object,
                            "spec.http",
                            format!("no HTTP route named \"{name}\" (named by the Rollout's {ROUTES_FIELD})"),
                        ))
                    }
                }
            }
            indexes
        };
        for index in &indexes {
            let destinations = http[*index]
                .get("route")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for side in [Side::Stable, Side::Canary] {
                let present = destinations.iter().any(|entry| {
                    entry
                        .get("destination")
                        .and_then(|destination| self.side_of(destination))
                        == Some(side)
                });
                if !present {
                    return Err(RouteInvalid::field(
                        &object,
                        format!("spec.http[{index}].route"),
                        format!("no {}", self.side_name(side)),
                    ));
                }
            }
        }
        Ok(indexes)
    }

    fn canary_destination(&self, primary: &Value) -> Value {
        primary
            .get("route")
            .and_then(Value::as_array)
            .and_then(|entries| {
                entries
                    .iter()
                    .filter_map(|entry| entry.get("destination"))
                    .find(|destination| self.side_of(destination) == Some(Side::Canary))
            })
            .cloned()
            .unwrap_or_else(|| json!({"host": self.canary_service}))
    }

    fn is_managed_mirror(&self, route: &Value) -> bool {
        route
            .get("mirror")
            .is_some_and(|mirror| self.side_of(mirror) == Some(Side::Canary))
    }

    fn check_subsets(&self, objects: &RouterObjects) -> Result<(), RouteInvalid> {
        let (Some(rule), Some(object)) = (
            &self.destination_rule,
            self.destination_rule_object(objects)?,
        ) else {
            return Ok(());
        };
        let subsets = object
            .pointer("/spec/subsets")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for name in [&rule.stable_subset_name, &rule.canary_subset_name] {
            if !subsets
                .iter()
                .any(|subset| subset.get("name").and_then(Value::as_str) == Some(name.as_str()))
            {
                return Err(RouteInvalid::field(
                    &self.dr_key().map(|key| key.to_string()).unwrap_or_default(),
                    "spec.subsets",
                    format!("no subset named \"{name}\""),
                ));
            }
        }
        Ok(())
    }

    /// The DestinationRule with the stable and canary subsets' hash labels pinned, when a hash is known.
    fn desired_destination_rule(
        &self,
        objects: &RouterObjects,
    ) -> Result<Option<Change>, RouteInvalid> {
        let (Some(rule), Some(key), Some(current)) = (
            &self.destination_rule,
            self.dr_key(),
            self.destination_rule_object(objects)?,
        ) else {
            return Ok(None);
        };
        let stable_hash = self.pinned_hash(objects, &self.stable_service);
        let canary_hash = self.pinned_hash(objects, &self.canary_service);
        let mut changed = current.clone();
        if let Some(subsets) = changed
            .pointer_mut("/spec/subsets")
            .and_then(Value::as_array_mut)
        {
            for subset in subsets.iter_mut() {
                let name = subset
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let hash = if name == rule.stable_subset_name {
                    stable_hash
                } else if name == rule.canary_subset_name {
                    canary_hash
                } else {
                    None
                };
                let (Some(hash), Some(fields)) = (hash, subset.as_object_mut()) else {
                    continue;
                };
                let labels = fields
                    .entry("labels")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert(POD_TEMPLATE_HASH.to_string(), json!(hash));
                }
            }
        }
        if &changed == current {
            return Ok(None);
        }
        Ok(Some(Change::Update {
            key,
            current: current.clone(),
            desired: changed,
        }))
    }
}

fn is_managed_route(route: &Value) -> bool {
    route
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|name| name.starts_with(MANAGED_PREFIX))
}

/// Istio header matches are keyed by lower-case header name.
fn header_condition(condition: &HeaderMatch) -> (String, Value) {
    let value = &condition.header_value;
    let matcher = match (&value.exact, &value.prefix, &value.regex) {
        (Some(exact), _, _) => json!({"exact": exact}),
        (None, Some(prefix), _) => json!({"prefix": prefix}),
        (None, None, Some(regex)) => json!({"regex": regex}),
        (None, None, None) => json!({"regex": ".*"}),
    };
    (condition.header_name.to_ascii_lowercase(), matcher)
}

fn weight_of(entry: &Value, entries: usize) -> i64 {
    entry
        .get("weight")
        .and_then(Value::as_i64)
        .unwrap_or(if entries == 1 { 100 } else { 0 })
}

impl TrafficRouter for IstioRouter {
    fn name(&self) -> &'static str {
        "istio"
    }

    fn objects(&self) -> Vec<ObjectKey> {
        let mut keys = vec![self.vs_key()];
        if let Some(rule) = self.dr_key() {
            keys.push(rule);
            keys.push(self.service_key(&self.stable_service));
            keys.push(self.service_key(&self.canary_service));
        }
        keys
    }

    fn validate(&self, objects: &RouterObjects) -> Result<(), RouteInvalid> {
        self.primary_routes(self.virtual_service(objects)?)?;
        self.check_subsets(objects)
    }

    fn observe(&self, objects: &RouterObjects) -> Result<ObservedTraffic, RouteInvalid> {
        let virtual_service = self.virtual_service(objects)?;
        let indexes = self.primary_routes(virtual_service)?;
        self.check_subsets(objects)?;
        let http = virtual_service
            .pointer("/spec/http")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let shares: Vec<i32> = indexes
            .iter()
            .map(|index| {
                let entries = http[*index]
                    .get("route")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let total = |side: Side| -> i64 {
                    entries
                        .iter()
                        .filter(|entry| {
                            entry.get("destination").and_then(|d| self.side_of(d)) == Some(side)
                        })
                        .map(|entry| weight_of(entry, entries.len()))
                        .sum()
                };
                canary_share(total(Side::Stable), total(Side::Canary))
            })
            .collect();
        // Serin writes the same weight to every managed route, so a route that disagrees with the first was
        // edited by someone else: report it, so that the drift is seen.
        let first = shares.first().copied().unwrap_or(0);
        let canary_weight = shares
            .iter()
            .copied()
            .find(|share| *share != first)
            .unwrap_or(first);
        let managed = read_managed_routes(virtual_service);
        let route_names: Vec<&str> = http
            .iter()
            .filter_map(|route| route.get("name").and_then(Value::as_str))
            .collect();
        let mirrored = indexes
            .iter()
            .all(|index| self.is_managed_mirror(&http[*index]));
        Ok(ObservedTraffic {
            canary_weight,
            header_routes: managed
                .header_routes
                .into_iter()
                .filter(|name| route_names.contains(&managed_route_name(name).as_str()))
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
        let virtual_service = self.virtual_service(objects)?;
        let indexes = self.primary_routes(virtual_service)?;
        self.check_subsets(objects)?;
        let object = self.vs_key().to_string();
        let canary_weight = clamped_weight(desired);
        let mirror = effective_mirror(desired);
        let mut http = virtual_service
            .pointer("/spec/http")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();

        for index in &indexes {
            let route = &mut http[*index];
            if let Some(entries) = route.get_mut("route").and_then(Value::as_array_mut) {
                for entry in entries.iter_mut() {
                    let weight = match entry.get("destination").and_then(|d| self.side_of(d)) {
                        Some(Side::Stable) => 100 - canary_weight,
                        Some(Side::Canary) => canary_weight,
                        None => continue,
                    };
                    if entry.get("weight").and_then(Value::as_i64) != Some(weight) {
                        entry["weight"] = json!(weight);
                    }
                }
            }
            let user_mirror = route.get("mirror").is_some() && !self.is_managed_mirror(route);
            match &mirror {
                Some(_) if user_mirror => {
                    return Err(RouteInvalid::field(
                        &object,
                        format!("spec.http[{index}].mirror"),
                        "already mirrors to another destination; Serin does not replace it",
                    ))
                }
                Some((_, percent)) => {
                    let destination = self.canary_destination(route);
                    let wanted_percentage = json!({"value": f64::from(*percent)});
                    if let Some(fields) = route.as_object_mut() {
                        if !fields
                            .get("mirror")
                            .is_some_and(|present| covers(present, &destination))
                        {
                            fields.insert("mirror".to_string(), destination);
                        }
                        if !fields
                            .get("mirrorPercentage")
                            .is_some_and(|present| covers(present, &wanted_percentage))
                        {
                            fields.insert("mirrorPercentage".to_string(), wanted_percentage);
                        }
                    }
                }
                None if self.is_managed_mirror(route) => {
                    if let Some(fields) = route.as_object_mut() {
                        fields.remove("mirror");
                        fields.remove("mirrorPercentage");
                    }
                }
                None => {}
            }
        }

        let template = http
            .get(indexes.first().copied().unwrap_or(0))
            .cloned()
            .unwrap_or(Value::Null);
        let mut header_routes = Vec::new();
        for header_route in &desired.header_routes {
            let name = managed_route_name(&header_route.name);
            let headers: Map<String, Value> =
                header_route.matches.iter().map(header_condition).collect();
            let user_matches = template
                .get("match")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let matches: Vec<Value> = if user_matches.is_empty() {
                vec![json!({"headers": headers})]
            } else {
                user_matches
                    .into_iter()
                    .map(|mut user_match| {
                        let mut all = user_match
                            .get("headers")
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default();
                        all.extend(headers.clone());
                        if let Some(fields) = user_match.as_object_mut() {
                            fields.insert("headers".to_string(), Value::Object(all));
                        }
                        user_match
                    })
                    .collect()
            };
            let wanted = json!({
                "name": name,
                "match": matches,
                "route": [{"destination": self.canary_destination(&template), "weight": 100}],
            });
            let present = http.iter().find(|route| {
                is_managed_route(route)
                    && route.get("name").and_then(Value::as_str) == Some(name.as_str())
            });
            header_routes.push(match present {
                Some(present) if covers(present, &wanted) => present.clone(),
                _ => wanted,
            });
        }
        http.retain(|route| !is_managed_route(route));
        // Istio takes the first HTTP route that matches, so header routes go in front of the user's.
        header_routes.extend(http);

        let mut changed = virtual_service.clone();
        changed["spec"]["http"] = Value::Array(header_routes);
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

        // Subsets are pinned before any weight moves, so a weight never reaches a subset that still selects
        // the wrong pods.
        let mut changes: Vec<Change> = self
            .desired_destination_rule(objects)?
            .into_iter()
            .collect();
        if &changed != virtual_service {
            changes.push(Change::Update {
                key: self.vs_key(),
                current: virtual_service.clone(),
                desired: changed,
            });
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::traffic::test_support::{applied, bytes, exact_header, mirror, traffic, written};

    fn router() -> IstioRouter {
        IstioRouter {
            namespace: "shop".into(),
            virtual_service: "checkout".into(),
            routes: vec!["primary".into()],
            destination_rule: None,
            stable_service: "checkout".into(),
            canary_service: "checkout-canary".into(),
        }
    }

    fn subset_router() -> IstioRouter {
        IstioRouter {
            destination_rule: Some(IstioDestinationRule {
                name: "checkout".into(),
                canary_subset_name: "canary".into(),
                stable_subset_name: "stable".into(),
            }),
            ..router()
        }
    }

    fn user_virtual_service() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "3",
                         "annotations": {"team": "payments"}},
            "spec": {
                "hosts": ["checkout.shop.example"],
                "gateways": ["public"],
                "http": [
                    {"name": "primary",
                     "match": [{"uri": {"prefix": "/api"}}],
                     "retries": {"attempts": 3},
                     "route": [{"destination": {"host": "checkout", "port": {"number": 80}}, "weight": 100},
                               {"destination": {"host": "checkout-canary.shop.svc.cluster.local",
                                                "port": {"number": 80}}, "weight": 0}]},
                    {"name": "static", "route": [{"destination": {"host": "static"}}]}
                ]
            }
        })
    }

    fn subset_virtual_service() -> Value {
        let mut vs = user_virtual_service();
        vs["spec"]["http"][0]["route"] = json!([
            {"destination": {"host": "checkout", "subset": "stable"}, "weight": 100},
            {"destination": {"host": "checkout", "subset": "canary"}, "weight": 0}
        ]);
        vs
    }

    fn destination_rule() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "4"},
            "spec": {"host": "checkout",
                     "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                     "subsets": [{"name": "stable", "labels": {"app": "checkout"}},
                                 {"name": "canary", "labels": {"app": "checkout"}}]}
        })
    }

    fn objects(vs: Value) -> RouterObjects {
        let mut objects = RouterObjects::new();
        objects.insert(router().vs_key(), vs);
        objects
    }

    fn with_weights(mut vs: Value, stable: i64, canary: i64) -> Value {
        vs["spec"]["http"][0]["route"][0]["weight"] = json!(stable);
        vs["spec"]["http"][0]["route"][1]["weight"] = json!(canary);
        vs
    }

    #[test]
    fn weights_are_set_on_the_named_route_and_nothing_else_changes() {
        for weight in [10, 50, 100] {
            let changes = router()
                .desired(&objects(user_virtual_service()), &traffic(weight))
                .expect("routable");
            let changed = written(&changes);
            assert_eq!(
                changed["spec"]["http"][0]["route"][0]["weight"],
                json!(100 - weight)
            );
            assert_eq!(
                changed["spec"]["http"][0]["route"][1]["weight"],
                json!(weight)
            );
            assert_eq!(
                bytes(&with_weights(changed, 100, 0)),
                bytes(&user_virtual_service())
            );
            let after = applied(&objects(user_virtual_service()), &changes);
            assert_eq!(
                router().observe(&after).expect("observable").canary_weight,
                weight
            );
            assert!(router()
                .desired(&after, &traffic(weight))
                .expect("routable")
                .is_empty());
        }
    }

    #[test]
    fn the_only_route_is_managed_when_none_is_named() {
        let mut vs = user_virtual_service();
        if let Some(routes) = vs["spec"]["http"].as_array_mut() {
            routes.truncate(1);
        }
        let unnamed = IstioRouter {
            routes: Vec::new(),
            ..router()
        };
        let changes = unnamed
            .desired(&objects(vs), &traffic(30))
            .expect("routable");
        assert_eq!(
            written(&changes)["spec"]["http"][0]["route"][1]["weight"],
            json!(30)
        );
    }

    #[test]
    fn a_hand_edit_is_observed_as_drift_and_reverted() {
        let edited = with_weights(user_virtual_service(), 50, 50);
        assert_eq!(
            router()
                .observe(&objects(edited.clone()))
                .expect("observable")
                .canary_weight,
            50
        );
        let changes = router()
            .desired(&objects(edited), &traffic(10))
            .expect("routable");
        assert_eq!(
            bytes(&written(&changes)),
            bytes(&with_weights(user_virtual_service(), 90, 10))
        );
    }

    #[test]
    fn header_route_is_prepended_and_removed_without_a_trace() {
        let mut desired = traffic(10);
        desired.header_routes = vec![exact_header("beta", "X-Canary", "yes")];
        let changes = router()
            .desired(&objects(user_virtual_service()), &desired)
            .expect("routable");
        let changed = written(&changes);
        assert_eq!(
            changed["spec"]["http"][0],
            json!({"name": "serin-beta",
                   "match": [{"uri": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "yes"}}}],
                   "route": [{"destination": {"host": "checkout-canary.shop.svc.cluster.local",
                                              "port": {"number": 80}}, "weight": 100}]})
        );
        assert_eq!(
            changed["spec"]["http"][2],
            user_virtual_service()["spec"]["http"][1]
        );
        let after = applied(&objects(user_virtual_service()), &changes);
        assert_eq!(
            router().observe(&after).expect("observable").header_routes,
            vec!["beta".to_string()]
        );
        assert!(router()
            .desired(&after, &desired)
            .expect("routable")
            .is_empty());
        let removal = router().desired(&after, &traffic(0)).expect("routable");
        assert_eq!(bytes(&written(&removal)), bytes(&user_virtual_service()));
    }

    #[test]
    fn mirror_is_set_on_the_named_route_and_removed_at_the_end() {
        let mut desired = traffic(0);
        desired.mirror_routes = vec![mirror("shadow", 20)];
        let changes = router()
            .desired(&objects(user_virtual_service()), &desired)
            .expect("routable");
        let changed = written(&changes);
        assert_eq!(
            changed["spec"]["http"][0]["mirror"],
            json!({"host": "checkout-canary.shop.svc.cluster.local", "port": {"number": 80}})
        );
        assert_eq!(
            changed["spec"]["http"][0]["mirrorPercentage"],
            json!({"value": 20.0})
        );
        let mut after = applied(&objects(user_virtual_service()), &changes);
        assert_eq!(
            router().observe(&after).expect("observable").mirror_routes,
            vec!["shadow".to_string()]
        );
        // The server may store 20.0 as 20: still the same mirror.
        let mut stored = changed.clone();
        stored["spec"]["http"][0]["mirrorPercentage"] = json!({"value": 20});
        after.insert(router().vs_key(), stored);
        assert!(router()
            .desired(&after, &desired)
            .expect("routable")
            .is_empty());
        let removal = router().desired(&after, &traffic(0)).expect("routable");
        assert_eq!(bytes(&written(&removal)), bytes(&user_virtual_service()));
    }

    #[test]
    fn a_users_own_mirror_is_not_replaced() {
        let mut vs = user_virtual_service();
        vs["spec"]["http"][0]["mirror"] = json!({"host": "audit"});
        let mut desired = traffic(0);
        desired.mirror_routes = vec![mirror("shadow", 20)];
        let error = router()
            .desired(&objects(vs.clone()), &desired)
            .expect_err("user mirror");
        assert!(error.to_string().contains("spec.http[0].mirror"), "{error}");
        assert!(router()
            .desired(&objects(vs), &traffic(0))
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn subsets_are_pinned_before_the_weights_move() {
        let mut objects = RouterObjects::new();
        objects.insert(subset_router().vs_key(), subset_virtual_service());
        objects.insert(subset_router().dr_key().expect("dr"), destination_rule());
        for (service, hash) in [("checkout", "aaaa"), ("checkout-canary", "bbbb")] {
            objects.insert(
                subset_router().service_key(service),
                json!({"metadata": {"name": service}, "spec": {"selector": {"app": "checkout", POD_TEMPLATE_HASH: hash}}}),
            );
        }
        let desired = traffic(25);
        let changes = subset_router()
            .desired(&objects, &desired)
            .expect("routable");
        assert_eq!(changes.len(), 2);
        assert_eq!(
            changes[0].key().kind,
            RoutingKind::DestinationRule,
            "subsets first"
        );
        let Change::Update { desired: rule, .. } = &changes[0] else {
            panic!("update")
        };
        assert_eq!(
            rule["spec"]["subsets"][0]["labels"],
            json!({"app": "checkout", POD_TEMPLATE_HASH: "aaaa"})
        );
        assert_eq!(
            rule["spec"]["subsets"][1]["labels"],
            json!({"app": "checkout", POD_TEMPLATE_HASH: "bbbb"})
        );
        assert_eq!(
            rule["spec"]["trafficPolicy"],
            destination_rule()["spec"]["trafficPolicy"]
        );
        let after = applied(&objects, &changes);
        assert_eq!(
            subset_router()
                .observe(&after)
                .expect("observable")
                .canary_weight,
            25
        );
        assert!(subset_router()
            .desired(&after, &desired)
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn invalid_objects_are_named_with_object_and_field() {
        let vs_only = |vs: Value| objects(vs);
        let mut no_stable = user_virtual_service();
        no_stable["spec"]["http"][0]["route"][0]["destination"]["host"] = json!("other");
        let mut no_canary = user_virtual_service();
        if let Some(routes) = no_canary["spec"]["http"][0]["route"].as_array_mut() {
            routes.truncate(1);
        }
        let cases: Vec<(IstioRouter, RouterObjects, &str)> = vec![
            (router(), RouterObjects::new(), "VirtualService shop/checkout: not found"),
            (
                IstioRouter { routes: vec!["main".into()], ..router() },
                vs_only(user_virtual_service()),
                "VirtualService shop/checkout: spec.http: no HTTP route named \"main\"",
            ),
            (
                IstioRouter { routes: Vec::new(), ..router() },
                vs_only(user_virtual_service()),
                "VirtualService shop/checkout: spec.http: 2 HTTP routes and none named",
            ),
            (router(), vs_only(no_stable), "VirtualService shop/checkout: spec.http[0].route: no destination to the stable Service \"checkout\""),
            (router(), vs_only(no_canary), "VirtualService shop/checkout: spec.http[0].route: no destination to the canary Service \"checkout-canary\""),
            (subset_router(), vs_only(subset_virtual_service()), "DestinationRule shop/checkout: not found"),
            (subset_router(), {
                let mut objects = vs_only(subset_virtual_service());
                let mut rule = destination_rule();
                if let Some(subsets) = rule["spec"]["subsets"].as_array_mut() { subsets.truncate(1); }
                objects.insert(subset_router().dr_key().expect("dr"), rule);
                objects
            }, "DestinationRule shop/checkout: spec.subsets: no subset named \"canary\""),
        ];
        for (router, objects, expected) in cases {
            let message = router.validate(&objects).expect_err(expected).to_string();
            assert!(
                message.starts_with(expected),
                "{message}\n  expected to start with\n{expected}"
            );
            assert!(router.observe(&objects).is_err());
            assert!(router.desired(&objects, &traffic(10)).is_err());
        }
    }
}
