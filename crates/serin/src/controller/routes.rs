//! Watches of the routing objects (HTTPRoutes, VirtualServices, DestinationRules, Ingresses): a hand edit
//! of the weights Serin manages reaches the Rollouts that name the object as a watch event, and their
//! reconciles read it from a cache instead of asking the API server.
//!
//! Only objects some Rollout names trigger a reconcile (the Rollout reference index maps the object to
//! them), so an idle cluster costs nothing per routed Rollout. A resource that is not served (its CRD is
//! not installed) or cannot be listed leaves its cache unavailable; its watch retries with back-off, so a
//! CRD installed later is picked up, and meanwhile the Rollouts that name such objects read them from the
//! API server and are looked at every `UNWATCHED_ROUTE_RESYNC` to catch hand edits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{future, Stream, StreamExt, TryStreamExt};
use kube::api::{ApiResource, DynamicObject, TypeMeta};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde_json::Value;

use super::index::IndexedCache;
use super::sync::{Cache, CacheGate};
use crate::traffic::RoutingKind;

/// The routing kinds the controller watches (Services are watched with the other core caches).
pub const WATCHED: [RoutingKind; 4] = [
    RoutingKind::HttpRoute,
    RoutingKind::VirtualService,
    RoutingKind::DestinationRule,
    RoutingKind::Ingress,
];

/// How often a routed Rollout is looked at while its routing objects are not watched (their resource
/// cannot be listed): hand edits are found by this look instead of a watch event.
pub const UNWATCHED_ROUTE_RESYNC: Duration = Duration::from_secs(10);

/// One cache per watched routing kind.
#[derive(Clone)]
pub struct RouteCaches {
    caches: BTreeMap<RoutingKind, Arc<IndexedCache<DynamicObject>>>,
}

impl Default for RouteCaches {
    fn default() -> Self {
        RouteCaches {
            caches: WATCHED
                .iter()
                .map(|kind| (*kind, Arc::new(IndexedCache::new())))
                .collect(),
        }
    }
}

impl RouteCaches {
    pub fn new() -> RouteCaches {
        RouteCaches::default()
    }

    /// The cache of a watched routing kind.
    pub fn cache(&self, kind: RoutingKind) -> Option<&Arc<IndexedCache<DynamicObject>>> {
        self.caches.get(&kind)
    }

    /// A routing object as JSON, the way the routers read it from the API server.
    pub fn object(&self, kind: RoutingKind, namespace: &str, name: &str) -> Option<Value> {
        let found = self.cache(kind)?.get(namespace, name)?;
        let mut object = (*found).clone();
        // List items may come without their type; the API server's answer to a get carries it.
        object.types.get_or_insert_with(|| TypeMeta {
            api_version: kind.api_version().to_string(),
            kind: kind.kind().to_string(),
        });
        serde_json::to_value(&object).ok()
    }
}

/// The watch of one routing kind in one namespace scope: it feeds the kind's cache and the gate, and
/// yields the objects it sees (to be mapped to the Rollouts that name them).
pub fn route_watch(
    client: &Client,
    scope: &Option<String>,
    kind: RoutingKind,
    cache: Arc<IndexedCache<DynamicObject>>,
    gate: &Arc<CacheGate>,
) -> impl Stream<Item = Result<DynamicObject, watcher::Error>> + Send + 'static {
    let resource: ApiResource = kind.api_resource();
    let api: Api<DynamicObject> = match scope {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    watcher(api, watcher::Config::default())
        .inspect_ok(move |event| cache.apply(event))
        .inspect_ok(gate.tracker(Cache::of_routing(kind)))
        .inspect_err(gate.failure_tracker(Cache::of_routing(kind)))
        // The watcher announces every list attempt with `Init`, and any item that is not an error resets
        // the back-off: with it passed on, a list that keeps failing (a CRD not installed) would be
        // retried every second forever instead of backing off to one try every 30 s.
        .try_filter(|event| future::ready(!matches!(event, watcher::Event::Init)))
        .default_backoff()
        .touched_objects()
        // The gate has the error and this stream backs off on its own; an error passed on would make the
        // controller back off every trigger stream, the Rollouts' own included, for as long as a CRD is
        // missing.
        .filter_map(|object| future::ready(object.ok().map(Ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cached_route_reads_as_the_api_server_would_answer_it() {
        let caches = RouteCaches::new();
        let mut route: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"rules": [{"backendRefs": [{"name": "web", "weight": 100}]}]}
        }))
        .expect("valid route");
        // As a list item: without its type.
        route.types = None;
        let cache = caches.cache(RoutingKind::HttpRoute).expect("watched kind");
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(route));
        cache.apply(&watcher::Event::InitDone);
        let read = caches
            .object(RoutingKind::HttpRoute, "shop", "web")
            .expect("cached");
        assert_eq!(read["apiVersion"], json!("gateway.networking.k8s.io/v1"));
        assert_eq!(read["kind"], json!("HTTPRoute"));
        assert_eq!(
            read["spec"]["rules"][0]["backendRefs"][0]["weight"],
            json!(100)
        );
        assert_eq!(read["metadata"]["resourceVersion"], json!("7"));
        assert!(caches
            .object(RoutingKind::HttpRoute, "shop", "api")
            .is_none());
        assert!(caches.object(RoutingKind::Ingress, "shop", "web").is_none());
        assert!(caches.cache(RoutingKind::Service).is_none());
    }
}
