//! Watch caches indexed the way a reconcile asks them: objects by namespace and name, owned objects by the
//! uid of their controller, and Rollouts by the Services and routing objects they name.
//!
//! A reconcile used to scan every cached ReplicaSet, Service and AnalysisRun for the few its Rollout owns or
//! names, and a Service event scanned every Rollout: a wave over N Rollouts cost O(N²). These indexes are
//! kept up to date from the watch events themselves, so a lookup costs what it returns.
//!
//! They follow the reflector's list semantics: a (re)list is collected aside and swapped in whole when it is
//! complete, so a relist never shows a half-filled cache (the cache-sync gate keeps planning closed meanwhile).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::cached::{Cached, CachedFrom, StoredRollout};
use super::observe::service_names;
use crate::crd::Rollout;
use crate::traffic::{router_for, ObjectKey, RoutingKind};

/// An object's namespace and name (namespace empty for cluster-scoped objects).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NameKey {
    pub namespace: String,
    pub name: String,
}

impl NameKey {
    pub fn new(namespace: &str, name: &str) -> NameKey {
        NameKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The key of an object's metadata.
    pub fn of<K: Resource>(object: &K) -> NameKey {
        NameKey {
            namespace: object.meta().namespace.clone().unwrap_or_default(),
            name: object.meta().name.clone().unwrap_or_default(),
        }
    }
}

/// A set of objects that watch events add to and remove from.
pub trait Index<K>: Default {
    fn insert(&mut self, object: &K);
    fn remove(&mut self, object: &K);
}

/// An index plus the list being read into a fresh one, swapped in when the list completes (as the
/// reflector's store does), so readers never see a partial list.
#[derive(Debug, Default)]
pub struct Relisted<I> {
    live: I,
    listing: Option<I>,
}

impl<I> Relisted<I> {
    /// The index readers see.
    pub fn live(&self) -> &I {
        &self.live
    }

    /// Applies one watcher event.
    pub fn apply<K>(&mut self, event: &watcher::Event<K>)
    where
        I: Index<K>,
    {
        match event {
            watcher::Event::Init => self.listing = Some(I::default()),
            watcher::Event::InitApply(object) => {
                self.listing.get_or_insert_with(I::default).insert(object)
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    self.live = listed;
                }
            }
            watcher::Event::Apply(object) => self.live.insert(object),
            watcher::Event::Delete(object) => self.live.remove(object),
        }
    }
}

/// Objects by name and by the uid of their controller. An owner has one to a few objects, so vectors, and
/// each object's key is kept once, shared by both maps.
#[derive(Debug)]
pub struct Objects<C> {
    by_name: HashMap<Arc<NameKey>, Arc<C>>,
    by_owner: HashMap<Box<str>, Vec<Arc<NameKey>>>,
}

impl<C> Default for Objects<C> {
    fn default() -> Self {
        Objects {
            by_name: HashMap::new(),
            by_owner: HashMap::new(),
        }
    }
}

/// The uid of the object's controller ownerReference, if it has one.
pub fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str())
}

impl<C: Cached> Objects<C> {
    /// Removes `key` from the owner index; returns the shared key, if the object was there.
    fn unlink(&mut self, key: &NameKey) -> Option<Arc<NameKey>> {
        let (shared, previous) = self.by_name.get_key_value(key)?;
        if let Some(uid) = previous.controller_uid() {
            if let Some(owned) = self.by_owner.get_mut(uid) {
                owned.retain(|linked| !Arc::ptr_eq(linked, shared));
                if owned.is_empty() {
                    self.by_owner.remove(uid);
                }
            }
        }
        Some(shared.clone())
    }
}

impl<K: Resource, C: CachedFrom<K>> Index<K> for Objects<C> {
    fn insert(&mut self, object: &K) {
        let kept = C::cached_from(object);
        let key = kept.key();
        let key = self.unlink(&key).unwrap_or_else(|| Arc::new(key));
        if let Some(uid) = kept.controller_uid() {
            self.by_owner
                .entry(uid.into())
                .or_default()
                .push(key.clone());
        }
        self.by_name.insert(key, Arc::new(kept));
    }

    fn remove(&mut self, object: &K) {
        let key = NameKey::of(object);
        self.unlink(&key);
        self.by_name.remove(&key);
    }
}

/// A watch cache of one resource, indexed by name and by controller uid, shared by every reconcile. It
/// keeps `C`, what the controller reads of each object (see [`super::cached`]).
pub struct IndexedCache<C> {
    inner: RwLock<Relisted<Objects<C>>>,
}

impl<C> Default for IndexedCache<C> {
    fn default() -> Self {
        IndexedCache {
            inner: RwLock::new(Relisted {
                live: Objects::default(),
                listing: None,
            }),
        }
    }
}

impl<C: Cached> IndexedCache<C> {
    pub fn new() -> IndexedCache<C> {
        IndexedCache::default()
    }

    /// Applies one watcher event (call it for every event of the watch, in order).
    pub fn apply<K: Resource>(&self, event: &watcher::Event<K>)
    where
        C: CachedFrom<K>,
    {
        if let Ok(mut inner) = self.inner.write() {
            inner.apply(event);
        }
    }

    /// A closure for `inspect_ok` on the watch stream of `K` that feeds this cache.
    pub fn feeder<K: Resource>(self: &Arc<Self>) -> impl FnMut(&watcher::Event<K>) + Send + 'static
    where
        C: CachedFrom<K> + Send + Sync + 'static,
    {
        let cache = self.clone();
        move |event| cache.apply(event)
    }

    /// The object called `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<C>> {
        let inner = self.inner.read().ok()?;
        inner
            .live()
            .by_name
            .get(&NameKey::new(namespace, name))
            .cloned()
    }

    /// The objects in `namespace` whose controller has `uid`, in name order.
    pub fn controlled_by(&self, namespace: &str, uid: &str) -> Vec<Arc<C>> {
        if uid.is_empty() {
            return Vec::new();
        }
        let Ok(inner) = self.inner.read() else {
            return Vec::new();
        };
        let objects = inner.live();
        let mut keys: Vec<&Arc<NameKey>> = objects
            .by_owner
            .get(uid)
            .into_iter()
            .flatten()
            .filter(|key| key.namespace == namespace)
            .collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|key| objects.by_name.get(key).cloned())
            .collect()
    }

    /// How many objects the cache holds.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .map(|inner| inner.live().by_name.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many owners the owner index holds (each with at least one object).
    pub fn owners(&self) -> usize {
        self.inner
            .read()
            .map(|inner| inner.live().by_owner.len())
            .unwrap_or(0)
    }
}

/// Everything a Rollout reads by name besides what it owns: its Services and its router's objects.
pub fn referenced_objects(rollout: &Rollout) -> BTreeSet<ObjectKey> {
    let namespace = rollout.namespace().unwrap_or_default();
    let mut keys: BTreeSet<ObjectKey> = service_names(&rollout.spec.strategy)
        .iter()
        .map(|name| ObjectKey::new(RoutingKind::Service, &namespace, name))
        .collect();
    if let Some(Ok(router)) = router_for(rollout) {
        keys.extend(router.objects());
    }
    keys
}

/// Rollouts by the objects they name, and the other way round. Each side holds a few keys (a Rollout
/// names two or three objects, an object is named by one Rollout), so vectors, not sets (a B-tree's first
/// node has room for eleven keys, a hash set's for three), and each key is kept once and shared by both
/// sides: at ten thousand Rollouts every copy of a name costs a megabyte.
#[derive(Debug, Default)]
pub struct References {
    by_rollout: HashMap<Arc<NameKey>, Box<[Arc<ObjectKey>]>>,
    by_object: HashMap<Arc<ObjectKey>, Vec<Arc<NameKey>>>,
}

impl References {
    fn unlink(&mut self, rollout: &NameKey) {
        let Some((rollout, keys)) = self.by_rollout.remove_entry(rollout) else {
            return;
        };
        for key in keys.iter() {
            if let Some(rollouts) = self.by_object.get_mut(key) {
                rollouts.retain(|named_by| !Arc::ptr_eq(named_by, &rollout));
                if rollouts.is_empty() {
                    self.by_object.remove(key);
                }
            }
        }
    }

    /// Whether `rollout` is linked to exactly `keys` (sorted) already.
    fn links(&self, rollout: &NameKey, keys: &BTreeSet<ObjectKey>) -> bool {
        match self.by_rollout.get(rollout) {
            Some(linked) => linked.iter().map(|key| key.as_ref()).eq(keys.iter()),
            None => keys.is_empty(),
        }
    }
}

impl Index<Rollout> for References {
    fn insert(&mut self, rollout: &Rollout) {
        let name = NameKey::of(rollout);
        let keys = referenced_objects(rollout);
        // Most events are status writes, which name nothing new.
        if self.links(&name, &keys) {
            return;
        }
        self.unlink(&name);
        if keys.is_empty() {
            return;
        }
        let name = Arc::new(name);
        let mut linked = Vec::with_capacity(keys.len());
        for key in keys {
            let key = match self.by_object.get_key_value(&key) {
                Some((shared, _)) => shared.clone(),
                None => Arc::new(key),
            };
            self.by_object
                .entry(key.clone())
                .or_default()
                .push(name.clone());
            linked.push(key);
        }
        self.by_rollout.insert(name, linked.into_boxed_slice());
    }

    fn remove(&mut self, rollout: &Rollout) {
        self.unlink(&NameKey::of(rollout));
    }
}

/// Which Rollouts name a Service or routing object, kept up to date from the Rollout watch.
#[derive(Default)]
pub struct ReferenceIndex {
    inner: RwLock<Relisted<References>>,
}

impl ReferenceIndex {
    pub fn new() -> ReferenceIndex {
        ReferenceIndex::default()
    }

    /// Applies one event of the Rollout watch.
    pub fn apply(&self, event: &watcher::Event<Rollout>) {
        if let Ok(mut inner) = self.inner.write() {
            inner.apply(event);
        }
    }

    /// A closure for `inspect_ok` on the Rollout watch stream.
    pub fn feeder(self: &Arc<Self>) -> impl FnMut(&watcher::Event<Rollout>) + Send + 'static {
        let index = self.clone();
        move |event| index.apply(event)
    }

    /// How many Rollouts name at least one object.
    pub fn rollouts(&self) -> usize {
        self.inner
            .read()
            .map(|inner| inner.live().by_rollout.len())
            .unwrap_or(0)
    }

    /// The Rollouts that name `object`, in name order.
    pub fn rollouts_naming(&self, object: &ObjectKey) -> Vec<ObjectRef<StoredRollout>> {
        let Ok(inner) = self.inner.read() else {
            return Vec::new();
        };
        let mut rollouts: Vec<&Arc<NameKey>> = inner
            .live()
            .by_object
            .get(object)
            .into_iter()
            .flatten()
            .collect();
        rollouts.sort();
        rollouts
            .into_iter()
            .map(|rollout| ObjectRef::new(&rollout.name).within(&rollout.namespace))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::cached::CachedReplicaSet;
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use serde_json::json;

    fn rs(namespace: &str, name: &str, owner: Option<&str>, replicas: i32) -> ReplicaSet {
        let mut rs = ReplicaSet::default();
        rs.metadata.namespace = Some(namespace.into());
        rs.metadata.name = Some(name.into());
        rs.metadata.owner_references = owner.map(|uid| {
            vec![OwnerReference {
                api_version: "serin.dev/v1alpha1".into(),
                kind: "Rollout".into(),
                name: "web".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]
        });
        rs.spec.replicas = Some(replicas);
        rs
    }

    fn names(objects: &[Arc<CachedReplicaSet>]) -> Vec<String> {
        objects.iter().map(|rs| rs.view.name.clone()).collect()
    }

    fn listed(cache: &IndexedCache<CachedReplicaSet>, objects: Vec<ReplicaSet>) {
        cache.apply(&watcher::Event::Init);
        for object in objects {
            cache.apply(&watcher::Event::InitApply(object));
        }
        cache.apply(&watcher::Event::InitDone);
    }

    #[test]
    fn owned_objects_are_found_by_their_controller_uid_and_namespace() {
        let cache = IndexedCache::new();
        listed(
            &cache,
            vec![
                rs("shop", "web-b", Some("u1"), 1),
                rs("shop", "web-a", Some("u1"), 1),
                rs("shop", "api-a", Some("u2"), 1),
                rs("other", "web-c", Some("u1"), 1),
                rs("shop", "loose", None, 1),
            ],
        );
        assert_eq!(
            names(&cache.controlled_by("shop", "u1")),
            ["web-a", "web-b"]
        );
        assert_eq!(names(&cache.controlled_by("shop", "u2")), ["api-a"]);
        assert!(cache.controlled_by("shop", "").is_empty());
        assert_eq!(cache.len(), 5);
        assert!(cache.get("shop", "loose").is_some());
        assert!(cache.get("other", "loose").is_none());
    }

    #[test]
    fn a_non_controller_owner_reference_does_not_count() {
        let cache = IndexedCache::new();
        let mut object = rs("shop", "web-a", Some("u1"), 1);
        if let Some(owners) = object.metadata.owner_references.as_mut() {
            owners[0].controller = Some(false);
        }
        listed(&cache, vec![object]);
        assert!(cache.controlled_by("shop", "u1").is_empty());
    }

    #[test]
    fn applies_and_deletes_move_objects_between_owners() {
        let cache = IndexedCache::new();
        listed(&cache, vec![rs("shop", "web-a", Some("u1"), 1)]);
        cache.apply(&watcher::Event::Apply(rs("shop", "web-a", Some("u1"), 3)));
        let owned = cache.controlled_by("shop", "u1");
        assert_eq!(owned[0].view.spec_replicas, 3);
        // Adopted by another owner: gone from the first.
        cache.apply(&watcher::Event::Apply(rs("shop", "web-a", Some("u2"), 3)));
        assert!(cache.controlled_by("shop", "u1").is_empty());
        assert_eq!(names(&cache.controlled_by("shop", "u2")), ["web-a"]);
        // Orphaned: in no owner's set, still found by name.
        cache.apply(&watcher::Event::Apply(rs("shop", "web-a", None, 3)));
        assert!(cache.controlled_by("shop", "u2").is_empty());
        assert!(cache.get("shop", "web-a").is_some());
        cache.apply(&watcher::Event::Delete(rs("shop", "web-a", None, 3)));
        assert!(cache.get("shop", "web-a").is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_complete() {
        let cache = IndexedCache::new();
        listed(
            &cache,
            vec![
                rs("shop", "web-a", Some("u1"), 1),
                rs("shop", "web-b", Some("u1"), 1),
            ],
        );
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(rs(
            "shop",
            "web-b",
            Some("u1"),
            2,
        )));
        // Until the new list is complete the old one is served, whole.
        assert_eq!(
            names(&cache.controlled_by("shop", "u1")),
            ["web-a", "web-b"]
        );
        cache.apply(&watcher::Event::InitDone);
        // web-a was deleted while the watch was down: the new list no longer has it.
        let owned = cache.controlled_by("shop", "u1");
        assert_eq!(names(&owned), ["web-b"]);
        assert_eq!(owned[0].view.spec_replicas, 2);
        assert!(cache.get("shop", "web-a").is_none());
    }

    fn rollout(name: &str, canary: serde_json::Value) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}},
                "strategy": {"canary": canary}
            }
        }))
        .expect("valid rollout")
    }

    fn refs(index: &ReferenceIndex, kind: RoutingKind, name: &str) -> Vec<String> {
        index
            .rollouts_naming(&ObjectKey::new(kind, "shop", name))
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn rollouts_are_found_by_the_services_and_routes_they_name() {
        let index = ReferenceIndex::new();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(rollout(
            "web",
            json!({"stableService": "web", "canaryService": "web-canary",
                   "trafficRouting": {"gatewayAPI": {"httpRoute": "shared"}}}),
        )));
        index.apply(&watcher::Event::InitApply(rollout(
            "api",
            json!({"stableService": "api", "canaryService": "api-canary",
                   "trafficRouting": {"gatewayAPI": {"httpRoute": "shared"}}}),
        )));
        index.apply(&watcher::Event::InitDone);
        assert_eq!(
            refs(&index, RoutingKind::HttpRoute, "shared"),
            ["api", "web"]
        );
        assert_eq!(refs(&index, RoutingKind::Service, "web-canary"), ["web"]);
        assert!(refs(&index, RoutingKind::HttpRoute, "web").is_empty());
        assert!(refs(&index, RoutingKind::Ingress, "shared").is_empty());

        // The spec moves to another route: the old one no longer maps to it.
        index.apply(&watcher::Event::Apply(rollout(
            "web",
            json!({"stableService": "web", "canaryService": "web-canary",
                   "trafficRouting": {"istio": {"virtualService": {"name": "web-vs"}}}}),
        )));
        assert_eq!(refs(&index, RoutingKind::HttpRoute, "shared"), ["api"]);
        assert_eq!(refs(&index, RoutingKind::VirtualService, "web-vs"), ["web"]);

        index.apply(&watcher::Event::Delete(rollout(
            "api",
            json!({"stableService": "api", "canaryService": "api-canary"}),
        )));
        assert!(refs(&index, RoutingKind::HttpRoute, "shared").is_empty());
        assert!(refs(&index, RoutingKind::Service, "api").is_empty());
    }

    #[test]
    fn nginx_rollouts_are_found_by_the_stable_and_the_managed_canary_ingress() {
        let index = ReferenceIndex::new();
        index.apply(&watcher::Event::Apply(rollout(
            "web",
            json!({"stableService": "web", "canaryService": "web-canary",
                   "trafficRouting": {"nginx": {"stableIngress": "web-ingress"}}}),
        )));
        assert_eq!(refs(&index, RoutingKind::Ingress, "web-ingress"), ["web"]);
        let managed: Vec<ObjectKey> = referenced_objects(&rollout(
            "web",
            json!({"stableService": "web", "canaryService": "web-canary",
                   "trafficRouting": {"nginx": {"stableIngress": "web-ingress"}}}),
        ))
        .into_iter()
        .filter(|key| key.kind == RoutingKind::Ingress && key.name != "web-ingress")
        .collect();
        assert_eq!(managed.len(), 1, "the canary Ingress Serin creates");
        assert_eq!(
            refs(&index, RoutingKind::Ingress, &managed[0].name),
            ["web"]
        );
    }
}
