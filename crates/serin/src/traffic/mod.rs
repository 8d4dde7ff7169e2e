//! Traffic routers: pure builders that decide the routing objects' managed fields for each backend
//! (Gateway API, Istio, NGINX Ingress), plus the thin adapters that read and write them.

mod adapter;
pub mod error;
pub mod gateway_api;
pub mod istio;
pub mod nginx;
mod shared;

use std::collections::BTreeMap;
use std::fmt;

use kube::api::ApiResource;
use serde_json::Value;

use crate::crd::Rollout;
use crate::strategy::{DesiredTraffic, ObservedTraffic};

pub use adapter::{apply, observe, observed_state, ApplyOutcome};
pub use error::{RouteInvalid, TrafficError};
pub use gateway_api::GatewayApiRouter;
pub use istio::IstioRouter;
pub use nginx::NginxRouter;

/// Annotation on a routing object listing the header and mirror routes Serin put there (JSON
/// `{"headerRoutes": [..], "mirrorRoutes": [..]}`), by their step names. Present only while there are any.
pub const MANAGED_ROUTES_ANNOTATION: &str = "serin.dev/managed-routes";

/// The kinds of routing objects the routers read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoutingKind {
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `networking.istio.io/v1` VirtualService.
    VirtualService,
    /// `networking.istio.io/v1` DestinationRule.
    DestinationRule,
    /// `networking.k8s.io/v1` Ingress.
    Ingress,
    /// `v1` Service (read only: its selector says which version it serves).
    Service,
}

impl RoutingKind {
    pub fn kind(&self) -> &'static str {
        match self {
            RoutingKind::HttpRoute => "HTTPRoute",
            RoutingKind::VirtualService => "VirtualService",
            RoutingKind::DestinationRule => "DestinationRule",
            RoutingKind::Ingress => "Ingress",
            RoutingKind::Service => "Service",
        }
    }

    pub fn api_version(&self) -> &'static str {
        match self {
            RoutingKind::HttpRoute => "gateway.networking.k8s.io/v1",
            RoutingKind::VirtualService | RoutingKind::DestinationRule => "networking.istio.io/v1",
            RoutingKind::Ingress => "networking.k8s.io/v1",
            RoutingKind::Service => "v1",
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        let (group, version) = self
            .api_version()
            .split_once('/')
            .unwrap_or(("", self.api_version()));
        let plural = match self {
            RoutingKind::HttpRoute => "httproutes",
            RoutingKind::VirtualService => "virtualservices",
            RoutingKind::DestinationRule => "destinationrules",
            RoutingKind::Ingress => "ingresses",
            RoutingKind::Service => "services",
        };
        ApiResource {
            group: group.to_string(),
            version: version.to_string(),
            api_version: self.api_version().to_string(),
            kind: self.kind().to_string(),
            plural: plural.to_string(),
        }
    }
}

/// One routing object, by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: RoutingKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: RoutingKind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.kind(), self.namespace, self.name)
    }
}

/// The routing objects a router read, as JSON; a key without an entry does not exist in the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterObjects {
    objects: BTreeMap<ObjectKey, Value>,
}

impl RouterObjects {
    pub fn new() -> RouterObjects {
        RouterObjects::default()
    }

    /// Records an object that exists.
    pub fn insert(&mut self, key: ObjectKey, object: Value) {
        self.objects.insert(key, object);
    }

    /// The object, or None when it does not exist.
    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }
}

/// A write a router needs, in the order the routers return them.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `desired` differs from `current` only in the fields Serin manages.
    Update {
        key: ObjectKey,
        current: Value,
        desired: Value,
    },
    /// A Serin-owned object to create.
    Create { key: ObjectKey, object: Value },
    /// A Serin-owned object to delete, as read.
    Delete { key: ObjectKey, current: Value },
}

impl Change {
    pub fn key(&self) -> &ObjectKey {
        match self {
            Change::Update { key, .. }
            | Change::Create { key, .. }
            | Change::Delete { key, .. } => key,
        }
    }
}

/// One traffic-routing backend. Everything here is pure: the adapters read [`TrafficRouter::objects`],
/// hand them in, and write the returned [`Change`]s.
pub trait TrafficRouter: Send + Sync {
    /// The router's name as in `status.traffic.router`: gatewayAPI, istio, nginx.
    fn name(&self) -> &'static str;
    /// The objects the router reads.
    fn objects(&self) -> Vec<ObjectKey>;
    /// Whether Serin can route with these objects; the error names the object and field path.
    fn validate(&self, objects: &RouterObjects) -> Result<(), RouteInvalid>;
    /// The weights and routes Serin manages, as the objects carry them now (for drift detection).
    fn observe(&self, objects: &RouterObjects) -> Result<ObservedTraffic, RouteInvalid>;
    /// The writes that make the objects carry `desired`, touching only the fields Serin manages; empty
    /// when they already do.
    fn desired(
        &self,
        objects: &RouterObjects,
        desired: &DesiredTraffic,
    ) -> Result<Vec<Change>, RouteInvalid>;
}

/// The router the Rollout configures: None without `trafficRouting`; Err when the Rollout lacks what
/// every router needs (namespace, stable and canary Services).
pub fn router_for(rollout: &Rollout) -> Option<Result<Box<dyn TrafficRouter>, TrafficError>> {
    let canary = rollout.spec.strategy.canary.as_ref()?;
    let routing = canary.traffic_routing.as_ref()?;
    let rollout_name = rollout.metadata.name.clone().unwrap_or_default();
    let Some(namespace) = rollout.metadata.namespace.clone() else {
        return Some(Err(TrafficError::RolloutNamespaceMissing {
            rollout: rollout_name,
        }));
    };
    let object = format!("Rollout {namespace}/{rollout_name}");
    let required = |value: &Option<String>, field: &str| match value.as_deref() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(TrafficError::RouteInvalid(RouteInvalid::field(
            &object,
            format!("spec.strategy.canary.{field}"),
            "required when trafficRouting is set",
        ))),
    };
    let services = required(&canary.stable_service, "stableService")
        .and_then(|stable| Ok((stable, required(&canary.canary_service, "canaryService")?)));
    let (stable_service, canary_service) = match services {
        Ok(services) => services,
        Err(error) => return Some(Err(error)),
    };
    let router: Box<dyn TrafficRouter> = if let Some(gateway) = &routing.gateway_api {
        Box::new(GatewayApiRouter {
            namespace,
            http_route: gateway.http_route.clone(),
            stable_service,
            canary_service,
        })
    } else if let Some(istio) = &routing.istio {
        Box::new(IstioRouter {
            namespace,
            virtual_service: istio.virtual_service.name.clone(),
            routes: istio.virtual_service.routes.clone(),
            destination_rule: istio.destination_rule.clone(),
            stable_service,
            canary_service,
        })
    } else if let Some(nginx) = &routing.nginx {
        Box::new(NginxRouter {
            namespace,
            rollout_name,
            rollout_uid: rollout.metadata.uid.clone(),
            stable_ingress: nginx.stable_ingress.clone(),
            annotation_prefix: nginx
                .annotation_prefix
                .clone()
                .unwrap_or_else(|| nginx::DEFAULT_ANNOTATION_PREFIX.to_string()),
            additional_annotations: nginx.additional_ingress_annotations.clone(),
            stable_service,
            canary_service,
        })
    } else {
        return Some(Err(TrafficError::RouteInvalid(RouteInvalid::field(
            &object,
            "spec.strategy.canary.trafficRouting",
            "set one of gatewayAPI, istio, nginx",
        ))));
    };
    Some(Ok(router))
}

/// Helpers for the routers' unit tests: play changes onto the objects as the API server would.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::crd::rollout::{HeaderMatch, StringMatch};
    use crate::strategy::{HeaderRoute, MirrorRoute};

    /// The objects after the changes, as if written.
    pub(crate) fn applied(objects: &RouterObjects, changes: &[Change]) -> RouterObjects {
        let mut result = objects.clone();
        for change in changes {
            match change {
                Change::Update { key, desired, .. } => result.insert(key.clone(), desired.clone()),
                Change::Create { key, object } => result.insert(key.clone(), object.clone()),
                Change::Delete { key, .. } => {
                    result.objects.remove(key);
                }
            }
        }
        result
    }

    /// The object a single Update (or Create) writes.
    pub(crate) fn written(changes: &[Change]) -> Value {
        match changes {
            [Change::Update { desired, .. }] => desired.clone(),
            [Change::Create { object, .. }] => object.clone(),
            other => panic!("expected one update or create, got {other:?}"),
        }
    }

    pub(crate) fn traffic(weight: i32) -> DesiredTraffic {
        DesiredTraffic {
            stable_service: "checkout".into(),
            canary_service: "checkout-canary".into(),
            canary_weight: weight,
            ..DesiredTraffic::default()
        }
    }

    pub(crate) fn exact_header(name: &str, header: &str, value: &str) -> HeaderRoute {
        HeaderRoute {
            name: name.into(),
            matches: vec![HeaderMatch {
                header_name: header.into(),
                header_value: StringMatch {
                    exact: Some(value.into()),
                    ..StringMatch::default()
                },
            }],
        }
    }

    pub(crate) fn mirror(name: &str, percentage: i32) -> MirrorRoute {
        MirrorRoute {
            name: name.into(),
            percentage,
        }
    }

    /// Serialized bytes, to compare objects byte for byte.
    pub(crate) fn bytes(value: &Value) -> String {
        serde_json::to_string(value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(routing: &str, services: &str) -> Rollout {
        let yaml = format!(
            "apiVersion: serin.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: checkout, namespace: shop, uid: u1}}\n\
             spec:\n  selector: {{matchLabels: {{app: checkout}}}}\n  template: {{metadata: {{labels: {{app: checkout}}}}}}\n\
             \x20 strategy:\n    canary:\n{services}      trafficRouting: {routing}\n"
        );
        serde_yaml::from_str(&yaml).expect("rollout yaml")
    }

    const SERVICES: &str = "      stableService: checkout\n      canaryService: checkout-canary\n";

    #[test]
    fn router_for_picks_the_configured_backend_and_its_objects() {
        let cases = [
            ("{gatewayAPI: {httpRoute: web}}", "gatewayAPI", vec!["HTTPRoute shop/web"]),
            (
                "{istio: {virtualService: {name: vs, routes: [primary]}, destinationRule: {name: dr, canarySubsetName: c, stableSubsetName: s}}}",
                "istio",
                vec![
                    "VirtualService shop/vs",
                    "DestinationRule shop/dr",
                    "Service shop/checkout",
                    "Service shop/checkout-canary",
                ],
            ),
            ("{nginx: {stableIngress: web}}", "nginx", vec!["Ingress shop/web", "Ingress shop/web-checkout-canary"]),
        ];
        for (routing, name, keys) in cases {
            let router = router_for(&rollout(routing, SERVICES))
                .expect("configured")
                .expect("valid");
            assert_eq!(router.name(), name);
            let objects: Vec<String> = router.objects().iter().map(ToString::to_string).collect();
            assert_eq!(objects, keys);
        }
    }

    #[test]
    fn router_for_needs_the_services_and_is_none_without_routing() {
        let mut without = rollout("{gatewayAPI: {httpRoute: web}}", SERVICES);
        if let Some(canary) = without.spec.strategy.canary.as_mut() {
            canary.traffic_routing = None;
        }
        assert!(router_for(&without).is_none());
        let missing = router_for(&rollout(
            "{gatewayAPI: {httpRoute: web}}",
            "      stableService: checkout\n",
        ))
        .expect("configured")
        .err()
        .expect("canaryService required")
        .to_string();
        assert_eq!(missing, "Rollout shop/checkout: spec.strategy.canary.canaryService: required when trafficRouting is set");
    }
}
