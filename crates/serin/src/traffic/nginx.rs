//! NGINX Ingress router: decides the managed canary Ingress (a copy of the stable Ingress pointed at the
//! canary Service, with canary annotations) and when it exists; the stable Ingress is only read.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::shared::{
    canary_share, clamped_weight, covers, read_managed_routes, regex_escape, write_managed_routes,
    ManagedRoutes,
};
use super::{Change, ObjectKey, RouteInvalid, RouterObjects, RoutingKind, TrafficRouter};
use crate::crd::labels::ROLLOUT_NAME;
use crate::strategy::{DesiredTraffic, ObservedTraffic};

/// Annotation prefix of ingress-nginx.
pub const DEFAULT_ANNOTATION_PREFIX: &str = "nginx.ingress.kubernetes.io";

/// Routes through a canary copy of the Ingress `stable_ingress` in `namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NginxRouter {
    pub namespace: String,
    pub rollout_name: String,
    /// The Rollout's uid, for the canary Ingress's ownerReference (none when unknown).
    pub rollout_uid: Option<String>,
    pub stable_ingress: String,
    pub annotation_prefix: String,
    pub additional_annotations: BTreeMap<String, String>,
    pub stable_service: String,
    pub canary_service: String,
}

impl NginxRouter {
    fn stable_key(&self) -> ObjectKey {
        ObjectKey::new(RoutingKind::Ingress, &self.namespace, &self.stable_ingress)
    }

    /// `<stable-ingress>-<rollout>-canary`, cut to the 253 characters of an object name.
    pub fn canary_ingress_name(&self) -> String {
        let suffix = format!("-{}-canary", self.rollout_name);
        let mut base = self.stable_ingress.clone();
        base.truncate(253usize.saturating_sub(suffix.len()));
        let mut name = format!("{}{suffix}", base.trim_end_matches(['-', '.']));
        name.truncate(253);
        name
    }

    fn canary_key(&self) -> ObjectKey {
        ObjectKey::new(
            RoutingKind::Ingress,
            &self.namespace,
            &self.canary_ingress_name(),
        )
    }

    fn annotation(&self, name: &str) -> String {
        format!("{}/{name}", self.annotation_prefix)
    }

    fn stable<'a>(&self, objects: &'a RouterObjects) -> Result<&'a Value, RouteInvalid> {
        let stable = objects
            .get(&self.stable_key())
            .ok_or_else(|| RouteInvalid::Missing {
                object: self.stable_key().to_string(),
                named_by: "spec.strategy.canary.trafficRouting.nginx.stableIngress",
            })?;
        if self.points_at_stable(stable) {
            Ok(stable)
        } else {
            Err(RouteInvalid::field(
                &self.stable_key().to_string(),
                "spec.rules[*].http.paths[*].backend.service.name",
                format!(
                    "no backend to the stable Service \"{}\"",
                    self.stable_service
                ),
            ))
        }
    }

    fn points_at_stable(&self, ingress: &Value) -> bool {
        let is_stable = |backend: &Value| {
            backend.pointer("/service/name").and_then(Value::as_str)
                == Some(self.stable_service.as_str())
        };
        let default_backend = ingress
            .pointer("/spec/defaultBackend")
            .is_some_and(is_stable);
        let rules = ingress
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        default_backend
            || rules.iter().any(|rule| {
                rule.pointer("/http/paths")
                    .and_then(Value::as_array)
                    .is_some_and(|paths| {
                        paths
                            .iter()
                            .any(|path| path.get("backend").is_some_and(is_stable))
                    })
            })
    }

    /// The canary Ingress as it stands, after checking that it is this Rollout's.
    fn canary<'a>(&self, objects: &'a RouterObjects) -> Result<Option<&'a Value>, RouteInvalid> {
        let Some(canary) = objects.get(&self.canary_key()) else {
            return Ok(None);
        };
        let owned = canary
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|owners| {
                owners.iter().any(|owner| {
                    owner.get("kind").and_then(Value::as_str) == Some("Rollout")
                        && owner.get("name").and_then(Value::as_str)
                            == Some(self.rollout_name.as_str())
                        // A reference anyone can write names the Rollout; only its uid proves it.
                        && self.rollout_uid.as_deref().is_none_or(|uid| {
                            owner.get("uid").and_then(Value::as_str) == Some(uid)
                        })
                })
            });
        let labelled = canary
            .pointer("/metadata/labels")
            .and_then(|labels| labels.get(ROLLOUT_NAME))
            .and_then(Value::as_str)
            == Some(self.rollout_name.as_str());
        if owned || (self.rollout_uid.is_none() && labelled) {
            Ok(Some(canary))
        } else {
            Err(RouteInvalid::field(
                &self.canary_key().to_string(),
                "metadata.ownerReferences",
                format!(
                    "exists and is not owned by Rollout {}/{}; Serin does not overwrite it",
                    self.namespace, self.rollout_name
                ),
            ))
        }
    }

    /// The stable Ingress's rules with every backend to the stable Service pointed at the canary Service;
    /// paths to other Services are left out (the canary Ingress only carries the canary's share).
    fn canary_spec(&self, stable: &Value) -> Value {
        let to_canary = |backend: &Value| -> Option<Value> {
            if backend.pointer("/service/name").and_then(Value::as_str)
                != Some(self.stable_service.as_str())
            {
                return None;
            }
            let mut backend = backend.clone();
            backend["service"]["name"] = json!(self.canary_service);
            Some(backend)
        };
        let mut spec = Map::new();
        if let Some(class) = stable.pointer("/spec/ingressClassName") {
            spec.insert("ingressClassName".to_string(), class.clone());
        }
        if let Some(backend) = stable.pointer("/spec/defaultBackend").and_then(to_canary) {
            spec.insert("defaultBackend".to_string(), backend);
        }
        let rules: Vec<Value> = stable
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|rule| {
                let paths: Vec<Value> = rule
                    .pointer("/http/paths")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|path| {
                        let backend = to_canary(path.get("backend")?)?;
                        let mut path = path.clone();
                        path["backend"] = backend;
                        Some(path)
                    })
                    .collect();
                if paths.is_empty() {
                    return None;
                }
                let mut rule = rule.clone();
                rule["http"] = json!({"paths": paths});
                Some(rule)
            })
            .collect();
        if !rules.is_empty() {
            spec.insert("rules".to_string(), Value::Array(rules));
        }
        Value::Object(spec)
    }

    fn canary_annotations(
        &self,
        desired: &DesiredTraffic,
    ) -> Result<Map<String, Value>, RouteInvalid> {
        let mut annotations: Map<String, Value> = self
            .additional_annotations
            .iter()
            .map(|(key, value)| (key.clone(), json!(value)))
            .collect();
        annotations.insert(self.annotation("canary"), json!("true"));
        annotations.insert(
            self.annotation("canary-weight"),
            json!(clamped_weight(desired).to_string()),
        );
        match desired.header_routes.as_slice() {
            [] => {}
            [route] if route.matches.len() == 1 => {
                let condition = &route.matches[0];
                annotations.insert(
                    self.annotation("canary-by-header"),
                    json!(condition.header_name),
                );
                let value = &condition.header_value;
                match (&value.exact, &value.prefix, &value.regex) {
                    (Some(exact), _, _) => {
                        annotations.insert(self.annotation("canary-by-header-value"), json!(exact));
                    }
                    (None, Some(prefix), _) => {
                        annotations.insert(
                            self.annotation("canary-by-header-pattern"),
                            json!(format!("^{}.*", regex_escape(prefix))),
                        );
                    }
                    (None, None, Some(regex)) => {
                        annotations
                            .insert(self.annotation("canary-by-header-pattern"), json!(regex));
                    }
                    (None, None, None) => {}
                }
            }
            _ => {
                return Err(RouteInvalid::Unsupported {
                    router: "nginx",
                    what:
                        "route by more than one header condition (NGINX canaries match one header)"
                            .to_string(),
                })
            }
        }
        Ok(annotations)
    }

    fn desired_canary(
        &self,
        stable: &Value,
        desired: &DesiredTraffic,
    ) -> Result<Value, RouteInvalid> {
        let mut metadata = json!({
            "name": self.canary_ingress_name(),
            "namespace": self.namespace,
            "labels": {ROLLOUT_NAME: self.rollout_name},
            "annotations": self.canary_annotations(desired)?,
        });
        if let Some(uid) = &self.rollout_uid {
            metadata["ownerReferences"] = json!([{
                "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
                "kind": "Rollout",
                "name": self.rollout_name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }]);
        }
        let mut canary = json!({
            "apiVersion": RoutingKind::Ingress.api_version(),
            "kind": "Ingress",
            "metadata": metadata,
            "spec": self.canary_spec(stable),
        });
        write_managed_routes(
            &mut canary,
            &ManagedRoutes {
                header_routes: desired
                    .header_routes
                    .iter()
                    .map(|route| route.name.clone())
                    .collect(),
                mirror_routes: Vec::new(),
            },
        );
        Ok(canary)
    }
}

impl TrafficRouter for NginxRouter {
    fn name(&self) -> &'static str {
        "nginx"
    }

    fn objects(&self) -> Vec<ObjectKey> {
        vec![self.stable_key(), self.canary_key()]
    }

    fn validate(&self, objects: &RouterObjects) -> Result<(), RouteInvalid> {
        self.stable(objects)?;
        self.canary(objects).map(|_| ())
    }

    fn observe(&self, objects: &RouterObjects) -> Result<ObservedTraffic, RouteInvalid> {
        self.stable(objects)?;
        let Some(canary) = self.canary(objects)? else {
            return Ok(ObservedTraffic::default());
        };
        let annotation = |name: &str| {
            canary
                .pointer("/metadata/annotations")
                .and_then(|annotations| annotations.get(self.annotation(name)))
                .and_then(Value::as_str)
        };
        if annotation("canary") != Some("true") {
            return Ok(ObservedTraffic::default());
        }
        let number = |name: &str| annotation(name).and_then(|text| text.trim().parse::<i64>().ok());
        let weight = number("canary-weight").unwrap_or(0);
        let total = number("canary-weight-total").unwrap_or(100);
        let header_routes = if annotation("canary-by-header").is_some() {
            read_managed_routes(canary).header_routes
        } else {
            Vec::new()
        };
        Ok(ObservedTraffic {
            canary_weight: canary_share(total - weight.min(total), weight.min(total)),
            header_routes,
            mirror_routes: Vec::new(),
        })
    }

    fn desired(
        &self,
        objects: &RouterObjects,
        desired: &DesiredTraffic,
    ) -> Result<Vec<Change>, RouteInvalid> {
        let stable = self.stable(objects)?;
        let current = self.canary(objects)?;
        if effective_mirror_requested(desired) {
            return Err(RouteInvalid::Unsupported {
                router: "nginx",
                what: "mirror traffic (use the Gateway API or Istio router for setMirrorRoute)"
                    .to_string(),
            });
        }
        if clamped_weight(desired) == 0 && desired.header_routes.is_empty() {
            return Ok(current
                .map(|current| Change::Delete {
                    key: self.canary_key(),
                    current: current.clone(),
                })
                .into_iter()
                .collect());
        }
        let wanted = self.desired_canary(stable, desired)?;
        let Some(current) = current else {
            return Ok(vec![Change::Create {
                key: self.canary_key(),
                object: wanted,
            }]);
        };
        // Serin owns the canary Ingress: its labels, annotations, owners and spec are exactly Serin's.
        let mut changed = current.clone();
        for field in ["labels", "annotations", "ownerReferences"] {
            match wanted["metadata"].get(field) {
                Some(value) => changed["metadata"][field] = value.clone(),
                None => {
                    if let Some(metadata) =
                        changed.get_mut("metadata").and_then(Value::as_object_mut)
                    {
                        metadata.remove(field);
                    }
                }
            }
        }
        if !current
            .get("spec")
            .is_some_and(|spec| covers(spec, &wanted["spec"]))
        {
            changed["spec"] = wanted["spec"].clone();
        }
        if &changed == current {
            return Ok(Vec::new());
        }
        Ok(vec![Change::Update {
            key: self.canary_key(),
            current: current.clone(),
            desired: changed,
        }])
    }
}

fn effective_mirror_requested(desired: &DesiredTraffic) -> bool {
    desired
        .mirror_routes
        .iter()
        .any(|mirror| mirror.percentage > 0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::traffic::test_support::{applied, exact_header, mirror, traffic, written};

    fn router() -> NginxRouter {
        NginxRouter {
            namespace: "shop".into(),
            rollout_name: "checkout".into(),
            rollout_uid: Some("uid-1".into()),
            stable_ingress: "checkout".into(),
            annotation_prefix: DEFAULT_ANNOTATION_PREFIX.into(),
            additional_annotations: BTreeMap::from([("team".to_string(), "payments".to_string())]),
            stable_service: "checkout".into(),
            canary_service: "checkout-canary".into(),
        }
    }

    fn stable_ingress() -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "9",
                         "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/"}},
            "spec": {
                "ingressClassName": "nginx",
                "tls": [{"hosts": ["shop.example"], "secretName": "shop-tls"}],
                "rules": [{"host": "shop.example", "http": {"paths": [
                    {"path": "/api", "pathType": "Prefix",
                     "backend": {"service": {"name": "checkout", "port": {"number": 80}}}},
                    {"path": "/static", "pathType": "Prefix",
                     "backend": {"service": {"name": "static", "port": {"number": 80}}}}
                ]}}]
            }
        })
    }

    fn objects() -> RouterObjects {
        let mut objects = RouterObjects::new();
        objects.insert(router().stable_key(), stable_ingress());
        objects
    }

    #[test]
    fn the_canary_ingress_is_created_from_the_stable_one() {
        let changes = router()
            .desired(&objects(), &traffic(10))
            .expect("routable");
        assert!(matches!(&changes[..], [Change::Create { .. }]));
        assert_eq!(
            written(&changes),
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "metadata": {
                    "name": "checkout-checkout-canary",
                    "namespace": "shop",
                    "labels": {"serin.dev/rollout": "checkout"},
                    "annotations": {"nginx.ingress.kubernetes.io/canary": "true",
                                    "nginx.ingress.kubernetes.io/canary-weight": "10",
                                    "team": "payments"},
                    "ownerReferences": [{"apiVersion": "serin.dev/v1alpha1", "kind": "Rollout", "name": "checkout",
                                         "uid": "uid-1", "controller": true, "blockOwnerDeletion": true}]
                },
                "spec": {
                    "ingressClassName": "nginx",
                    "rules": [{"host": "shop.example", "http": {"paths": [
                        {"path": "/api", "pathType": "Prefix",
                         "backend": {"service": {"name": "checkout-canary", "port": {"number": 80}}}}
                    ]}}]
                }
            })
        );
        let after = applied(&objects(), &changes);
        assert_eq!(
            router().observe(&after).expect("observable").canary_weight,
            10
        );
        assert!(router()
            .desired(&after, &traffic(10))
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn weights_move_on_the_canary_ingress_and_zero_deletes_it() {
        let at_ten = applied(
            &objects(),
            &router()
                .desired(&objects(), &traffic(10))
                .expect("routable"),
        );
        for weight in [50, 100] {
            let changes = router()
                .desired(&at_ten, &traffic(weight))
                .expect("routable");
            assert_eq!(changes.len(), 1);
            assert_eq!(
                changes[0].key().name,
                "checkout-checkout-canary",
                "the stable Ingress is never written"
            );
            let after = applied(&at_ten, &changes);
            assert_eq!(
                router().observe(&after).expect("observable").canary_weight,
                weight
            );
        }
        let removal = router().desired(&at_ten, &traffic(0)).expect("routable");
        assert!(matches!(&removal[..], [Change::Delete { .. }]));
        assert_eq!(
            router()
                .observe(&applied(&at_ten, &removal))
                .expect("observable"),
            ObservedTraffic::default()
        );
        assert!(router()
            .desired(&objects(), &traffic(0))
            .expect("routable")
            .is_empty());
    }

    #[test]
    fn a_hand_edit_of_the_canary_weight_is_observed_and_reverted() {
        let mut at_ten = applied(
            &objects(),
            &router()
                .desired(&objects(), &traffic(10))
                .expect("routable"),
        );
        let key = router().canary_key();
        let mut edited = at_ten.get(&key).cloned().expect("canary");
        edited["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] =
            json!("60");
        at_ten.insert(key.clone(), edited);
        assert_eq!(
            router().observe(&at_ten).expect("observable").canary_weight,
            60
        );
        let changes = router().desired(&at_ten, &traffic(10)).expect("routable");
        assert_eq!(
            written(&changes)["metadata"]["annotations"]
                ["nginx.ingress.kubernetes.io/canary-weight"],
            json!("10")
        );
    }

    #[test]
    fn header_route_uses_canary_by_header_and_keeps_the_ingress_at_weight_zero() {
        let mut desired = traffic(0);
        desired.header_routes = vec![exact_header("beta", "X-Canary", "yes")];
        let changes = router().desired(&objects(), &desired).expect("routable");
        let annotations = written(&changes)["metadata"]["annotations"].clone();
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/canary-by-header"],
            json!("X-Canary")
        );
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/canary-by-header-value"],
            json!("yes")
        );
        let after = applied(&objects(), &changes);
        assert_eq!(
            router().observe(&after).expect("observable").header_routes,
            vec!["beta".to_string()]
        );
        assert!(matches!(
            &router().desired(&after, &traffic(0)).expect("routable")[..],
            [Change::Delete { .. }]
        ));
    }

    #[test]
    fn unsupported_and_invalid_inputs_are_refused_with_the_object_named() {
        let mut mirrored = traffic(10);
        mirrored.mirror_routes = vec![mirror("shadow", 10)];
        assert!(matches!(
            router().desired(&objects(), &mirrored),
            Err(RouteInvalid::Unsupported { .. })
        ));

        let missing = router()
            .validate(&RouterObjects::new())
            .expect_err("missing")
            .to_string();
        assert_eq!(
            missing,
            "Ingress shop/checkout: not found (named by the Rollout's spec.strategy.canary.trafficRouting.nginx.stableIngress)"
        );

        let mut elsewhere = stable_ingress();
        elsewhere["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] =
            json!("other");
        let mut objects_elsewhere = RouterObjects::new();
        objects_elsewhere.insert(router().stable_key(), elsewhere);
        let message = router()
            .validate(&objects_elsewhere)
            .expect_err("no stable")
            .to_string();
        assert!(message.starts_with("Ingress shop/checkout: spec.rules[*].http.paths[*].backend.service.name: no backend to the stable Service \"checkout\""), "{message}");

        let mut foreign = objects();
        foreign.insert(
            router().canary_key(),
            json!({"metadata": {"name": "checkout-checkout-canary", "namespace": "shop"}}),
        );
        let message = router()
            .desired(&foreign, &traffic(10))
            .expect_err("foreign")
            .to_string();
        assert!(message.starts_with("Ingress shop/checkout-checkout-canary: metadata.ownerReferences: exists and is not owned"), "{message}");
    }
}
