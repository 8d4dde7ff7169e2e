//! Decides where the requests of one entry point go (Service selectors, HTTPRoute, VirtualService, NGINX
//! Ingress canary), as a pure function over a snapshot of the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use kube::api::DynamicObject;
use kube::ResourceExt;
use serde_json::Value;

use super::ResponseProfile;

/// Routing or Service annotation: requests per second entering there (overrides the default rate).
pub const ANNOTATION_REQUESTS_PER_SECOND: &str = "sim.serin.dev/requests-per-second";
/// Routing-object annotation: `"X-Canary=always:0.1"` means 10% of requests carry `X-Canary: always`.
/// Several are separated by commas.
pub const ANNOTATION_HEADER_TRAFFIC: &str = "sim.serin.dev/header-traffic";

const NGINX_CANARY: &str = "nginx.ingress.kubernetes.io/canary";
const NGINX_CANARY_WEIGHT: &str = "nginx.ingress.kubernetes.io/canary-weight";
const NGINX_CANARY_WEIGHT_TOTAL: &str = "nginx.ingress.kubernetes.io/canary-weight-total";
const NGINX_CANARY_BY_HEADER: &str = "nginx.ingress.kubernetes.io/canary-by-header";
const NGINX_CANARY_BY_HEADER_VALUE: &str = "nginx.ingress.kubernetes.io/canary-by-header-value";

/// Where virtual requests enter the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryPoint {
    Service { namespace: String, name: String },
    HttpRoute { namespace: String, name: String },
    VirtualService { namespace: String, name: String },
    Ingress { namespace: String, name: String },
}

/// Who answers a request: a ready pod, or nobody (`pod` empty, hash `"none"`, answered 503).
/// `service` and `pod_template_hash` are the metric labels of the answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub service: String,
    pub pod_template_hash: String,
}

impl PodRef {
    pub fn unavailable(namespace: &str, service: &str) -> PodRef {
        PodRef {
            namespace: namespace.to_string(),
            pod: String::new(),
            service: service.to_string(),
            pod_template_hash: "none".to_string(),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        self.pod.is_empty()
    }
}

/// The outcome of [`split`]: `requests` weights sum to 1 (or the list is empty when the entry point
/// sends nothing); each mirror weight is the fraction of all requests copied to that pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routed {
    pub requests: Vec<(PodRef, f64)>,
    pub mirrors: Vec<(PodRef, f64)>,
}

/// A routing custom resource (HTTPRoute, VirtualService, DestinationRule) as the split reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingObject {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub spec: Value,
}

impl RoutingObject {
    pub fn from_dynamic(object: &DynamicObject) -> RoutingObject {
        RoutingObject {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
            annotations: object.annotations().clone(),
            spec: object.data.get("spec").cloned().unwrap_or(Value::Null),
        }
    }
}

#[derive(Debug, Clone)]
struct ReadyPod {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    profile: ResponseProfile,
}

#[derive(Debug, Clone)]
struct ServiceInfo {
    selector: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// Everything the split needs, indexed so that a thousand Services over thousands of pods stay cheap.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    pods: Vec<ReadyPod>,
    /// (namespace, label key, label value) -> indexes into `pods`.
    pods_by_label: HashMap<(String, String, String), Vec<usize>>,
    /// (namespace, name) -> index into `pods`.
    pods_by_name: HashMap<(String, String), usize>,
    services: BTreeMap<(String, String), ServiceInfo>,
    http_routes: Vec<RoutingObject>,
    virtual_services: Vec<RoutingObject>,
    destination_rules: Vec<RoutingObject>,
    ingresses: Vec<Ingress>,
}

/// Ready condition True and not being deleted: only such pods receive traffic.
pub fn receives_traffic(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl ClusterSnapshot {
    pub fn new<'a>(
        pods: impl IntoIterator<Item = &'a Pod>,
        services: impl IntoIterator<Item = &'a Service>,
        ingresses: impl IntoIterator<Item = &'a Ingress>,
        http_routes: Vec<RoutingObject>,
        virtual_services: Vec<RoutingObject>,
        destination_rules: Vec<RoutingObject>,
    ) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot {
            http_routes,
            virtual_services,
            destination_rules,
            ingresses: ingresses.into_iter().cloned().collect(),
            ..Default::default()
        };
        for pod in pods.into_iter().filter(|p| receives_traffic(p)) {
            let index = snapshot.pods.len();
            let namespace = pod.namespace().unwrap_or_default();
            for (k, v) in pod.labels() {
                snapshot
                    .pods_by_label
                    .entry((namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .push(index);
            }
            snapshot
                .pods_by_name
                .insert((namespace.clone(), pod.name_any()), index);
            snapshot.pods.push(ReadyPod {
                namespace,
                name: pod.name_any(),
                labels: pod.labels().clone(),
                profile: ResponseProfile::from_annotations(pod.annotations()),
            });
        }
        for service in services {
            let selector = service
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            snapshot.services.insert(
                (service.namespace().unwrap_or_default(), service.name_any()),
                ServiceInfo {
                    selector,
                    annotations: service.annotations().clone(),
                },
            );
        }
        snapshot
            .http_routes
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        snapshot
            .virtual_services
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        snapshot
    }

    /// The response behaviour of a pod that [`split`] routed to.
    pub fn profile(&self, pod: &PodRef) -> ResponseProfile {
        self.pods_by_name
            .get(&(pod.namespace.clone(), pod.pod.clone()))
            .and_then(|i| self.pods.get(*i))
            .map(|p| p.profile.clone())
            .unwrap_or_default()
    }

    /// Ready pods matching all of `labels` in `namespace` (an empty selector selects nothing,
    /// like a Service without selector).
    fn ready_pods(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<&ReadyPod> {
        let mut smallest: Option<&Vec<usize>> = None;
        for (k, v) in labels {
            match self
                .pods_by_label
                .get(&(namespace.to_string(), k.clone(), v.clone()))
            {
                None => return Vec::new(),
                Some(list) if smallest.is_none_or(|s| list.len() < s.len()) => {
                    smallest = Some(list)
                }
                Some(_) => {}
            }
        }
        let Some(candidates) = smallest else {
            return Vec::new();
        };
        candidates
            .iter()
            .map(|i| &self.pods[*i])
            .filter(|p| labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect()
    }

    /// Every entry point: each routing object, and each Service no routing object points at.
    pub fn entry_points(&self) -> Vec<EntryPoint> {
        let mut referenced: BTreeSet<(String, String)> = BTreeSet::new();
        let mut entries = Vec::new();
        for route in &self.http_routes {
            for rule in array(&route.spec, "rules") {
                for backend in array(rule, "backendRefs") {
                    referenced.extend(gateway_service(backend, &route.namespace));
                    for filter in array(backend, "filters") {
                        referenced.extend(mirror_service(filter, &route.namespace));
                    }
                }
                for filter in array(rule, "filters") {
                    referenced.extend(mirror_service(filter, &route.namespace));
                }
            }
            entries.push(EntryPoint::HttpRoute {
                namespace: route.namespace.clone(),
                name: route.name.clone(),
            });
        }
        for vs in &self.virtual_services {
            for http in array(&vs.spec, "http") {
                for route in array(http, "route") {
                    referenced.insert(resolve_host(
                        str_at(&route["destination"], "host"),
                        &vs.namespace,
                    ));
                }
                if let Some(host) = http["mirror"]["host"].as_str() {
                    referenced.insert(resolve_host(host, &vs.namespace));
                }
                for mirror in array(http, "mirrors") {
                    referenced.insert(resolve_host(
                        str_at(&mirror["destination"], "host"),
                        &vs.namespace,
                    ));
                }
            }
            entries.push(EntryPoint::VirtualService {
                namespace: vs.namespace.clone(),
                name: vs.name.clone(),
            });
        }
        for ingress in &self.ingresses {
            let namespace = ingress.namespace().unwrap_or_default();
            for (_, _, backend) in ingress_paths(ingress) {
                if let Some(service) = backend.and_then(|b| b.service.as_ref()) {
                    referenced.insert((namespace.clone(), service.name.clone()));
                }
            }
            if !is_canary_ingress(ingress) {
                entries.push(EntryPoint::Ingress {
                    namespace,
                    name: ingress.name_any(),
                });
            }
        }
        for (namespace, name) in self.services.keys() {
            if !referenced.contains(&(namespace.clone(), name.clone())) {
                entries.push(EntryPoint::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
        }
        entries.sort();
        entries
    }

    /// Requests per second entering at `entry`: its annotation, else `default`.
    pub fn requests_per_second(&self, entry: &EntryPoint, default: f64) -> f64 {
        let annotations = match entry {
            EntryPoint::Service { namespace, name } => self
                .services
                .get(&(namespace.clone(), name.clone()))
                .map(|s| &s.annotations),
            EntryPoint::HttpRoute { namespace, name } => {
                find(&self.http_routes, namespace, name).map(|r| &r.annotations)
            }
            EntryPoint::VirtualService { namespace, name } => {
                find(&self.virtual_services, namespace, name).map(|r| &r.annotations)
            }
            EntryPoint::Ingress { namespace, name } => {
                self.ingress(namespace, name).map(|i| i.annotations())
            }
        };
        annotations
            .and_then(|a| a.get(ANNOTATION_REQUESTS_PER_SECOND))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(default)
    }

    fn ingress(&self, namespace: &str, name: &str) -> Option<&Ingress> {
        self.ingresses
            .iter()
            .find(|i| i.metadata.namespace.as_deref() == Some(namespace) && i.name_any() == name)
    }

    /// Splits `weight` of the requests evenly over the ready pods of a Service (optionally only those
    /// carrying `subset` labels too); no Service or no ready pod: those requests fail.
    fn to_service(
        &self,
        namespace: &str,
        name: &str,
        subset: Option<&BTreeMap<String, String>>,
        weight: f64,
        out: &mut Vec<(PodRef, f64)>,
    ) {
        if weight <= 0.0 {
            return;
        }
        let pods = match self
            .services
            .get(&(namespace.to_string(), name.to_string()))
        {
            Some(service) if !service.selector.is_empty() => {
                let mut labels = service.selector.clone();
                if let Some(subset) = subset {
                    labels.extend(subset.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                self.ready_pods(namespace, &labels)
            }
            _ => Vec::new(),
        };
        if pods.is_empty() {
            out.push((PodRef::unavailable(namespace, name), weight));
            return;
        }
        let each = weight / pods.len() as f64;
        for pod in pods {
            out.push((pod_ref(pod, name), each));
        }
    }
}

fn pod_ref(pod: &ReadyPod, delivering_service: &str) -> PodRef {
    let label = |k: &str| pod.labels.get(k).cloned();
    PodRef {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        service: label("app.kubernetes.io/name")
            .or_else(|| label("app"))
            .unwrap_or_else(|| delivering_service.to_string()),
        pod_template_hash: label("serin.dev/pod-template-hash")
            .or_else(|| label("pod-template-hash"))
            .unwrap_or_default(),
    }
}

fn find<'a>(
    objects: &'a [RoutingObject],
    namespace: &str,
    name: &str,
) -> Option<&'a RoutingObject> {
    objects
        .iter()
        .find(|o| o.namespace == namespace && o.name == name)
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A request class: a share of the requests, carrying at most one (lower-cased) header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTraffic {
    pub header: String,
    pub value: String,
    pub fraction: f64,
}

/// Parses `"X-Canary=always:0.1, X-User=beta:0.05"`; malformed parts are skipped and the fractions are
/// capped so that they never add up to more than all requests.
pub fn parse_header_traffic(annotation: Option<&String>) -> Vec<HeaderTraffic> {
    let mut classes = Vec::new();
    let mut total = 0.0;
    for part in annotation
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
    {
        let Some((header_value, fraction)) = part.trim().rsplit_once(':') else {
            continue;
        };
        let Some((header, value)) = header_value.split_once('=') else {
            continue;
        };
        let Ok(fraction) = fraction.trim().parse::<f64>() else {
            continue;
        };
        if !fraction.is_finite() || fraction <= 0.0 || header.trim().is_empty() {
            continue;
        }
        let fraction = fraction.min(1.0 - total);
        if fraction <= 0.0 {
            break;
        }
        total += fraction;
        classes.push(HeaderTraffic {
            header: header.trim().to_ascii_lowercase(),
            value: value.trim().to_string(),
            fraction,
        });
    }
    classes
}

/// Request classes: each header class, then the plain requests (header `""`) with the rest.
fn request_classes(annotations: &[&BTreeMap<String, String>]) -> Vec<HeaderTraffic> {
    let mut classes = annotations
        .iter()
        .map(|a| parse_header_traffic(a.get(ANNOTATION_HEADER_TRAFFIC)))
        .find(|c| !c.is_empty())
        .unwrap_or_default();
    let rest = 1.0 - classes.iter().map(|c| c.fraction).sum::<f64>();
    if rest > 0.0 {
        classes.push(HeaderTraffic {
            header: String::new(),
            value: String::new(),
            fraction: rest,
        });
    }
    classes
}

/// `name`, `name.namespace`, `name.namespace.svc[.cluster.local]` -> (namespace, name).
pub fn resolve_host(host: &str, default_namespace: &str) -> (String, String) {
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name, namespace] => (namespace.to_string(), name.to_string()),
        [name, namespace, "svc", ..] => (namespace.to_string(), name.to_string()),
        _ => (
            default_namespace.to_string(),
            parts.first().copied().unwrap_or_default().to_string(),
        ),
    }
}

fn gateway_service(backend: &Value, namespace: &str) -> Option<(String, String)> {
    let group = str_at(backend, "group");
    let kind = backend
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        return None;
    }
    let ns = backend
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(namespace);
    Some((ns.to_string(), str_at(backend, "name").to_string()))
}

fn mirror_service(filter: &Value, namespace: &str) -> Option<(String, String)> {
    if str_at(filter, "type") != "RequestMirror" {
        return None;
    }
    gateway_service(filter.get("requestMirror")?.get("backendRef")?, namespace)
}

/// Fraction of requests a Gateway API RequestMirror filter copies (percent or fraction; default all).
fn mirror_fraction(mirror: &Value) -> f64 {
    if let Some(percent) = mirror.get("percent").and_then(Value::as_f64) {
        return (percent / 100.0).clamp(0.0, 1.0);
    }
    if let Some(fraction) = mirror.get("fraction") {
        let numerator = fraction
            .get("numerator")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let denominator = fraction
            .get("denominator")
            .and_then(Value::as_f64)
            .unwrap_or(100.0);
        if denominator > 0.0 {
            return (numerator / denominator).clamp(0.0, 1.0);
        }
        return 0.0;
    }
    1.0
}

/// Whether a request of `class` satisfies every header condition of a match (`conditions` lists
/// (lower-cased name, kind, value); kinds: exact, prefix, regex).
fn headers_match(conditions: &[(String, String, String)], class: &HeaderTraffic) -> bool {
    !class.header.is_empty()
        && conditions.iter().all(|(name, kind, value)| {
            *name == class.header
                && match kind.as_str() {
                    "prefix" => class.value.starts_with(value.as_str()),
                    // No regex engine here: the patterns routers write for header routing are literal
                    // values or match-anything.
                    "regex" => value == ".*" || value == ".+" || *value == class.value,
                    _ => *value == class.value,
                }
        })
}

fn gateway_header_conditions(m: &Value) -> Vec<(String, String, String)> {
    array(m, "headers")
        .iter()
        .map(|h| {
            let kind = match str_at(h, "type") {
                "RegularExpression" => "regex",
                _ => "exact",
            };
            (
                str_at(h, "name").to_ascii_lowercase(),
                kind.to_string(),
                str_at(h, "value").to_string(),
            )
        })
        .collect()
}

/// A Gateway API match that every request satisfies whatever its headers (path-only or empty).
fn gateway_match_is_plain(m: &Value) -> bool {
    array(m, "headers").is_empty()
        && array(m, "queryParams").is_empty()
        && m.get("method").is_none()
}

fn gateway_rule_is_plain(rule: &Value) -> bool {
    let matches = array(rule, "matches");
    matches.is_empty() || matches.iter().any(gateway_match_is_plain)
}

fn gateway_rule_matches_header(rule: &Value, class: &HeaderTraffic) -> bool {
    array(rule, "matches").iter().any(|m| {
        !array(m, "headers").is_empty()
            && array(m, "queryParams").is_empty()
            && m.get("method").is_none()
            && headers_match(&gateway_header_conditions(m), class)
    })
}

fn split_http_route(route: &RoutingObject, snapshot: &ClusterSnapshot) -> Routed {
    let mut routed = Routed::default();
    let rules = array(&route.spec, "rules");
    for class in request_classes(&[&route.annotations]) {
        // Header rules are more specific than plain ones, so they win when they match.
        let header_rule = rules
            .iter()
            .find(|r| gateway_rule_matches_header(r, &class));
        let chosen: Vec<&Value> = match header_rule {
            Some(rule) => vec![rule],
            // Rules are not ordered in Gateway API: plain requests spread over every plain rule.
            None => rules.iter().filter(|r| gateway_rule_is_plain(r)).collect(),
        };
        if chosen.is_empty() {
            routed.requests.push((
                PodRef::unavailable(&route.namespace, &route.name),
                class.fraction,
            ));
            continue;
        }
        let per_rule = class.fraction / chosen.len() as f64;
        for rule in chosen {
            split_gateway_rule(rule, route, per_rule, snapshot, &mut routed);
        }
    }
    routed
}

fn split_gateway_rule(
    rule: &Value,
    route: &RoutingObject,
    share: f64,
    snapshot: &ClusterSnapshot,
    routed: &mut Routed,
) {
    let backends = array(rule, "backendRefs");
    let weight = |b: &Value| {
        b.get("weight")
            .and_then(Value::as_f64)
            .unwrap_or(1.0)
            .max(0.0)
    };
    let total: f64 = backends.iter().map(weight).sum();
    if total <= 0.0 {
        routed
            .requests
            .push((PodRef::unavailable(&route.namespace, &route.name), share));
    } else {
        for backend in backends {
            let backend_share = share * weight(backend) / total;
            match gateway_service(backend, &route.namespace) {
                Some((ns, name)) => {
                    snapshot.to_service(&ns, &name, None, backend_share, &mut routed.requests)
                }
                None => routed.requests.push((
                    PodRef::unavailable(&route.namespace, str_at(backend, "name")),
                    backend_share,
                )),
            }
            for filter in array(backend, "filters") {
                add_gateway_mirror(filter, route, backend_share, snapshot, routed);
            }
        }
    }
    for filter in array(rule, "filters") {
        add_gateway_mirror(filter, route, share, snapshot, routed);
    }
}

fn add_gateway_mirror(
    filter: &Value,
    route: &RoutingObject,
    share: f64,
    snapshot: &ClusterSnapshot,
    routed: &mut Routed,
) {
    if let Some((ns, name)) = mirror_service(filter, &route.namespace) {
        let fraction = share * mirror_fraction(&filter["requestMirror"]);
        snapshot.to_service(&ns, &name, None, fraction, &mut routed.mirrors);
    }
}

fn istio_header_conditions(m: &Value) -> Vec<(String, String, String)> {
    m.get("headers")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(name, condition)| {
            let (kind, value) = ["exact", "prefix", "regex"]
                .iter()
                .find_map(|k| {
                    condition
                        .get(*k)
                        .and_then(Value::as_str)
                        .map(|v| (k.to_string(), v.to_string()))
                })
                .unwrap_or_else(|| ("exact".to_string(), String::new()));
            (name.to_ascii_lowercase(), kind, value)
        })
        .collect()
}

/// Whether an Istio http route catches requests of `class` (routes are tried in order).
fn istio_route_catches(http: &Value, class: &HeaderTraffic) -> bool {
    let matches = array(http, "match");
    matches.is_empty()
        || matches.iter().any(|m| {
            let conditions = istio_header_conditions(m);
            conditions.is_empty() || headers_match(&conditions, class)
        })
}

fn destination_subset(
    snapshot: &ClusterSnapshot,
    vs_namespace: &str,
    service: &(String, String),
    subset: &str,
) -> Option<BTreeMap<String, String>> {
    snapshot
        .destination_rules
        .iter()
        .filter(|dr| dr.namespace == vs_namespace || dr.namespace == service.0)
        .filter(|dr| resolve_host(str_at(&dr.spec, "host"), &dr.namespace) == *service)
        .flat_map(|dr| array(&dr.spec, "subsets"))
        .find(|s| str_at(s, "name") == subset)
        .map(|s| {
            s.get("labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
}

fn istio_destination(
    destination: &Value,
    vs: &RoutingObject,
    share: f64,
    snapshot: &ClusterSnapshot,
    out: &mut Vec<(PodRef, f64)>,
) {
    let service = resolve_host(str_at(destination, "host"), &vs.namespace);
    match destination.get("subset").and_then(Value::as_str) {
        None => snapshot.to_service(&service.0, &service.1, None, share, out),
        Some(subset) => match destination_subset(snapshot, &vs.namespace, &service, subset) {
            Some(labels) => snapshot.to_service(&service.0, &service.1, Some(&labels), share, out),
            // Istio answers 503 for a subset no DestinationRule defines.
            None if share > 0.0 => out.push((PodRef::unavailable(&service.0, &service.1), share)),
            None => {}
        },
    }
}

fn split_virtual_service(vs: &RoutingObject, snapshot: &ClusterSnapshot) -> Routed {
    let mut routed = Routed::default();
    let routes = array(&vs.spec, "http");
    for class in request_classes(&[&vs.annotations]) {
        let Some(http) = routes.iter().find(|h| istio_route_catches(h, &class)) else {
            routed
                .requests
                .push((PodRef::unavailable(&vs.namespace, &vs.name), class.fraction));
            continue;
        };
        let destinations = array(http, "route");
        let weight = |d: &Value| match d.get("weight").and_then(Value::as_f64) {
            Some(w) => w.max(0.0),
            None if destinations.len() == 1 => 100.0,
            None => 0.0,
        };
        let total: f64 = destinations.iter().map(weight).sum();
        if total <= 0.0 {
            routed
                .requests
                .push((PodRef::unavailable(&vs.namespace, &vs.name), class.fraction));
        } else {
            for d in destinations {
                istio_destination(
                    &d["destination"],
                    vs,
                    class.fraction * weight(d) / total,
                    snapshot,
                    &mut routed.requests,
                );
            }
        }
        if let Some(mirror) = http.get("mirror").filter(|m| m.is_object()) {
            let percent = http["mirrorPercentage"]["value"].as_f64().unwrap_or(100.0);
            let fraction = class.fraction * (percent / 100.0).clamp(0.0, 1.0);
            istio_destination(mirror, vs, fraction, snapshot, &mut routed.mirrors);
        }
        for mirror in array(http, "mirrors") {
            let percent = mirror["percentage"]["value"].as_f64().unwrap_or(100.0);
            let fraction = class.fraction * (percent / 100.0).clamp(0.0, 1.0);
            istio_destination(
                &mirror["destination"],
                vs,
                fraction,
                snapshot,
                &mut routed.mirrors,
            );
        }
    }
    routed
}

fn is_canary_ingress(ingress: &Ingress) -> bool {
    ingress
        .annotations()
        .get(NGINX_CANARY)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// (host, path, backend) of every path of an Ingress, then its default backend (host and path empty).
fn ingress_paths(ingress: &Ingress) -> Vec<(String, String, Option<&IngressBackend>)> {
    let Some(spec) = ingress.spec.as_ref() else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for rule in spec.rules.iter().flatten() {
        let host = rule.host.clone().unwrap_or_default();
        for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
            paths.push((
                host.clone(),
                path.path.clone().unwrap_or_default(),
                Some(&path.backend),
            ));
        }
    }
    if paths.is_empty() {
        if let Some(default) = spec.default_backend.as_ref() {
            paths.push((String::new(), String::new(), Some(default)));
        }
    }
    paths
}

fn ingress_backend(
    snapshot: &ClusterSnapshot,
    namespace: &str,
    ingress: &Ingress,
    backend: Option<&IngressBackend>,
    share: f64,
    out: &mut Vec<(PodRef, f64)>,
) {
    match backend.and_then(|b| b.service.as_ref()) {
        Some(service) => snapshot.to_service(namespace, &service.name, None, share, out),
        None if share > 0.0 => {
            out.push((PodRef::unavailable(namespace, &ingress.name_any()), share))
        }
        None => {}
    }
}

/// Share of a request class the NGINX canary takes.
fn nginx_canary_share(canary: &Ingress, class: &HeaderTraffic) -> f64 {
    let annotations = canary.annotations();
    let number = |key: &str| {
        annotations
            .get(key)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
    };
    let total = number(NGINX_CANARY_WEIGHT_TOTAL)
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0);
    let weight = (number(NGINX_CANARY_WEIGHT).unwrap_or(0.0) / total).clamp(0.0, 1.0);
    if let Some(header) = annotations.get(NGINX_CANARY_BY_HEADER) {
        if !class.header.is_empty() && header.trim().to_ascii_lowercase() == class.header {
            return match annotations.get(NGINX_CANARY_BY_HEADER_VALUE) {
                Some(value) if value.trim() == class.value => 1.0,
                Some(_) => weight,
                None if class.value == "always" => 1.0,
                None if class.value == "never" => 0.0,
                None => weight,
            };
        }
    }
    weight
}

fn split_ingress(ingress: &Ingress, snapshot: &ClusterSnapshot) -> Routed {
    let mut routed = Routed::default();
    let namespace = ingress.namespace().unwrap_or_default();
    let paths = ingress_paths(ingress);
    if paths.is_empty() {
        routed
            .requests
            .push((PodRef::unavailable(&namespace, &ingress.name_any()), 1.0));
        return routed;
    }
    // Without path-level traffic figures, each path of the main Ingress gets an equal share.
    let per_path = 1.0 / paths.len() as f64;
    for (host, path, backend) in paths {
        let canary = snapshot.ingresses.iter().find(|c| {
            c.metadata.namespace.as_deref() == Some(namespace.as_str())
                && is_canary_ingress(c)
                && ingress_paths(c)
                    .iter()
                    .any(|(h, p, _)| *h == host && *p == path)
        });
        let Some(canary) = canary else {
            ingress_backend(
                snapshot,
                &namespace,
                ingress,
                backend,
                per_path,
                &mut routed.requests,
            );
            continue;
        };
        let canary_backend = ingress_paths(canary)
            .into_iter()
            .find(|(h, p, _)| *h == host && *p == path)
            .and_then(|(_, _, b)| b);
        for class in request_classes(&[canary.annotations(), ingress.annotations()]) {
            let to_canary = nginx_canary_share(canary, &class);
            let share = per_path * class.fraction;
            ingress_backend(
                snapshot,
                &namespace,
                canary,
                canary_backend,
                share * to_canary,
                &mut routed.requests,
            );
            ingress_backend(
                snapshot,
                &namespace,
                ingress,
                backend,
                share * (1.0 - to_canary),
                &mut routed.requests,
            );
        }
    }
    routed
}

/// Where the requests entering at `entry` go. Weights of the same pod are merged.
pub fn split(entry: &EntryPoint, snapshot: &ClusterSnapshot) -> Routed {
    let routed = match entry {
        EntryPoint::Service { namespace, name } => {
            let mut routed = Routed::default();
            snapshot.to_service(namespace, name, None, 1.0, &mut routed.requests);
            routed
        }
        EntryPoint::HttpRoute { namespace, name } => find(&snapshot.http_routes, namespace, name)
            .map(|r| split_http_route(r, snapshot))
            .unwrap_or_default(),
        EntryPoint::VirtualService { namespace, name } => {
            find(&snapshot.virtual_services, namespace, name)
                .map(|vs| split_virtual_service(vs, snapshot))
                .unwrap_or_default()
        }
        EntryPoint::Ingress { namespace, name } => snapshot
            .ingress(namespace, name)
            .map(|i| split_ingress(i, snapshot))
            .unwrap_or_default(),
    };
    Routed {
        requests: merge(routed.requests),
        mirrors: merge(routed.mirrors),
    }
}

fn merge(weights: Vec<(PodRef, f64)>) -> Vec<(PodRef, f64)> {
    let mut merged: BTreeMap<PodRef, f64> = BTreeMap::new();
    for (pod, w) in weights {
        if w > 0.0 {
            *merged.entry(pod).or_default() += w;
        }
    }
    merged.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, app: &str, hash: &str, ready: bool) -> Pod {
        let value = json!({
            "metadata": {"name": name, "namespace": "shop",
                "labels": {"app": app, "pod-template-hash": hash}},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        });
        serde_json::from_value(value).unwrap_or_default()
    }

    fn service(name: &str, selector: Value) -> Service {
        let value = json!({"metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": selector}});
        serde_json::from_value(value).unwrap_or_default()
    }

    fn routing(name: &str, annotations: Value, spec: Value) -> RoutingObject {
        RoutingObject {
            namespace: "shop".into(),
            name: name.into(),
            annotations: serde_json::from_value(annotations).unwrap_or_default(),
            spec,
        }
    }

    fn ingress(name: &str, annotations: Value, service: &str) -> Ingress {
        let value = json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
            "spec": {"rules": [{"host": "shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": service, "port": {"number": 80}}}}
            ]}}]}
        });
        serde_json::from_value(value).unwrap_or_default()
    }

    /// Two versions of `web`: hash v1 with 3 ready pods (+1 unready), v2 with 1 ready pod.
    fn pods() -> Vec<Pod> {
        vec![
            pod("web-v1-a", "web", "v1", true),
            pod("web-v1-b", "web", "v1", true),
            pod("web-v1-c", "web", "v1", true),
            pod("web-v1-d", "web", "v1", false),
            pod("web-v2-a", "web", "v2", true),
        ]
    }

    fn services() -> Vec<Service> {
        vec![
            service("web", json!({"app": "web"})),
            service(
                "web-stable",
                json!({"app": "web", "pod-template-hash": "v1"}),
            ),
            service(
                "web-canary",
                json!({"app": "web", "pod-template-hash": "v2"}),
            ),
        ]
    }

    fn snapshot(
        routes: Vec<RoutingObject>,
        vss: Vec<RoutingObject>,
        drs: Vec<RoutingObject>,
        ingresses: Vec<Ingress>,
    ) -> ClusterSnapshot {
        ClusterSnapshot::new(&pods(), &services(), &ingresses, routes, vss, drs)
    }

    fn by_hash(routed: &[(PodRef, f64)]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (pod, w) in routed {
            *out.entry(pod.pod_template_hash.clone()).or_insert(0.0) += w;
        }
        out
    }

    fn close(a: &BTreeMap<String, f64>, expected: &[(&str, f64)]) -> bool {
        a.len() == expected.len()
            && expected
                .iter()
                .all(|(k, v)| a.get(*k).is_some_and(|x| (x - v).abs() < 1e-9))
    }

    #[test]
    fn service_splits_evenly_over_ready_pods() {
        let s = snapshot(vec![], vec![], vec![], vec![]);
        let routed = split(
            &EntryPoint::Service {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &s,
        );
        assert_eq!(routed.requests.len(), 4, "the unready pod gets nothing");
        assert!(close(
            &by_hash(&routed.requests),
            &[("v1", 0.75), ("v2", 0.25)]
        ));
        assert!(routed.requests.iter().all(|(p, _)| p.service == "web"));
    }

    #[test]
    fn missing_service_or_no_ready_pods_fail_instead_of_rerouting() {
        let route = routing(
            "web",
            json!({}),
            json!({"rules": [{"backendRefs": [
            {"name": "web-stable", "port": 80, "weight": 50},
            {"name": "ghost", "port": 80, "weight": 50}]}]}),
        );
        let s = snapshot(vec![route], vec![], vec![], vec![]);
        let routed = split(
            &EntryPoint::HttpRoute {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &s,
        );
        assert!(close(
            &by_hash(&routed.requests),
            &[("v1", 0.5), ("none", 0.5)]
        ));
        let ghost = routed
            .requests
            .iter()
            .find(|(p, _)| p.is_unavailable())
            .map(|(p, _)| p.service.clone());
        assert_eq!(ghost.as_deref(), Some("ghost"));
    }

    #[test]
    fn entry_points_skip_services_behind_routes() {
        let route = routing(
            "web",
            json!({}),
            json!({"rules": [{"backendRefs": [
            {"name": "web-stable", "port": 80}, {"name": "web-canary", "port": 80}]}]}),
        );
        let s = snapshot(vec![route], vec![], vec![], vec![]);
        assert_eq!(
            s.entry_points(),
            vec![
                EntryPoint::Service {
                    namespace: "shop".into(),
                    name: "web".into()
                },
                EntryPoint::HttpRoute {
                    namespace: "shop".into(),
                    name: "web".into()
                },
            ]
        );
    }

    #[test]
    fn http_route_weights_headers_and_mirrors() {
        let route = routing(
            "web",
            json!({ANNOTATION_HEADER_TRAFFIC: "X-Canary=always:0.1", ANNOTATION_REQUESTS_PER_SECOND: "40"}),
            json!({"rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "backendRefs": [{"name": "web-stable", "port": 80, "weight": 90},
                                 {"name": "web-canary", "port": 80, "weight": 10}],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                     "backendRef": {"name": "web-canary", "port": 80}, "percent": 50}}]},
                {"matches": [{"headers": [{"name": "x-canary", "value": "always"}]}],
                 "backendRefs": [{"name": "web-canary", "port": 80}]}
            ]}),
        );
        let s = snapshot(vec![route], vec![], vec![], vec![]);
        let entry = EntryPoint::HttpRoute {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let routed = split(&entry, &s);
        // 90% plain requests split 90/10, 10% with the header all to the canary.
        assert!(close(
            &by_hash(&routed.requests),
            &[("v1", 0.81), ("v2", 0.19)]
        ));
        assert!(close(&by_hash(&routed.mirrors), &[("v2", 0.45)]));
        assert_eq!(s.requests_per_second(&entry, 100.0), 40.0);
    }

    #[test]
    fn virtual_service_uses_subsets_weights_and_header_routes_in_order() {
        let vs = routing(
            "web",
            json!({ANNOTATION_HEADER_TRAFFIC: "X-Canary=always:0.2"}),
            json!({"hosts": ["web"], "http": [
                {"name": "header", "match": [{"headers": {"x-canary": {"exact": "always"}}}],
                 "route": [{"destination": {"host": "web.shop.svc.cluster.local", "subset": "canary"}}]},
                {"name": "primary",
                 "route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 75},
                           {"destination": {"host": "web", "subset": "canary"}, "weight": 25}],
                 "mirror": {"host": "web-canary"}, "mirrorPercentage": {"value": 10.0}}
            ]}),
        );
        let dr = routing(
            "web",
            json!({}),
            json!({"host": "web", "subsets": [
            {"name": "stable", "labels": {"pod-template-hash": "v1"}},
            {"name": "canary", "labels": {"pod-template-hash": "v2"}}]}),
        );
        let s = snapshot(vec![], vec![vs], vec![dr], vec![]);
        let routed = split(
            &EntryPoint::VirtualService {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &s,
        );
        assert!(close(
            &by_hash(&routed.requests),
            &[("v1", 0.6), ("v2", 0.4)]
        ));
        assert!(close(&by_hash(&routed.mirrors), &[("v2", 0.08)]));
    }

    #[test]
    fn virtual_service_subset_without_destination_rule_fails() {
        let vs = routing(
            "web",
            json!({}),
            json!({"http": [{"route": [
            {"destination": {"host": "web", "subset": "canary"}}]}]}),
        );
        let s = snapshot(vec![], vec![vs], vec![], vec![]);
        let routed = split(
            &EntryPoint::VirtualService {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &s,
        );
        assert!(close(&by_hash(&routed.requests), &[("none", 1.0)]));
    }

    #[test]
    fn nginx_canary_takes_its_weight_and_header_requests() {
        let main = ingress("web", json!({}), "web-stable");
        let canary = ingress(
            "web-canary",
            json!({NGINX_CANARY: "true", NGINX_CANARY_WEIGHT: "20", NGINX_CANARY_WEIGHT_TOTAL: "200",
                   NGINX_CANARY_BY_HEADER: "X-Canary", ANNOTATION_HEADER_TRAFFIC: "X-Canary=always:0.5"}),
            "web-canary",
        );
        let s = snapshot(vec![], vec![], vec![], vec![main, canary]);
        let entries = s.entry_points();
        assert!(entries.contains(&EntryPoint::Ingress {
            namespace: "shop".into(),
            name: "web".into()
        }));
        assert!(!entries
            .iter()
            .any(|e| matches!(e, EntryPoint::Ingress { name, .. } if name == "web-canary")));
        let routed = split(
            &EntryPoint::Ingress {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &s,
        );
        // Half the requests carry the header (all to canary), the other half split 10% to canary.
        assert!(close(
            &by_hash(&routed.requests),
            &[("v1", 0.45), ("v2", 0.55)]
        ));
    }

    #[test]
    fn header_traffic_annotation_parses_and_caps() {
        let parsed = parse_header_traffic(Some(&"X-A=1:0.7, bad, X-B=2:0.6".to_string()));
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].header, "x-a");
        assert!((parsed[1].fraction - 0.3).abs() < 1e-9);
        assert_eq!(
            resolve_host("web.other.svc.cluster.local", "shop"),
            ("other".into(), "web".into())
        );
        assert_eq!(resolve_host("web", "shop"), ("shop".into(), "web".into()));
    }
}
