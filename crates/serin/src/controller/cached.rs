//! What the watch caches keep of each object: the few fields a reconcile reads, not the object.
//!
//! The caches hold every ReplicaSet, AnalysisRun and Service of the watched namespaces for as long as the
//! controller runs, so what one entry costs is multiplied by tens of thousands. A ReplicaSet as the API
//! server sends it carries its pod template, `managedFields` and whatever annotations `kubectl apply`
//! left, and a decoded k8s-openapi ReplicaSet is kilobytes before any of its strings; a reconcile reads
//! its name, labels, revision, counts and generation. So each watch event is turned into the planner's
//! view at once, and the object itself is dropped. Routing objects are kept as objects (the routers read
//! the routes) and Rollouts as their metadata and JSON (see [`StoredRollout`]), both without what no
//! reader looks at: `managedFields`, the `last-applied-configuration` annotation (a second copy of the
//! object), and a Rollout's pod spec (only creating a ReplicaSet needs it).

use std::borrow::Cow;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::DynamicObject;
use kube::runtime::watcher;
use kube::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::index::{controller_uid, NameKey};
use super::observe::{observed_analysis_run, observed_replica_set, observed_service};
use crate::crd::analysis::AnalysisRun;
use crate::crd::rollout::{RolloutSpec, RolloutStatus};
use crate::crd::Rollout;
use crate::strategy::hash::{elide_pod_spec, elided_hash};
use crate::strategy::{Action, ObservedAnalysisRun, ObservedReplicaSet, ObservedService};

/// The annotation `kubectl apply` keeps a copy of the applied object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// An object as a cache keeps it: found by namespace and name, and by the uid of its controller.
pub trait Cached {
    fn key(&self) -> NameKey;
    fn controller_uid(&self) -> Option<&str>;
}

/// How a cache turns a watched object of type `K` into what it keeps.
pub trait CachedFrom<K>: Cached {
    fn cached_from(object: &K) -> Self;
}

/// Drops from an object's metadata what no reader of the caches looks at.
pub fn trim_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A Rollout as the Rollout store keeps it (for `WatchStreamExt::modify`): without its pod spec, which a
/// reconcile reads only to create a ReplicaSet and then reads from the API server (see
/// [`needs_pod_spec`]); its hash stays on the template. Its status is written with `replace_status`, which
/// takes only the status from the body, so nothing removed here is ever written back.
pub fn trim_rollout(rollout: &mut Rollout) {
    trim_metadata(&mut rollout.metadata);
    elide_pod_spec(&mut rollout.spec.template);
}

/// A Rollout as the Rollout store keeps it: its metadata as it is (the store's keys and the freshness and
/// ownership checks read it), its spec and status as JSON, decoded again for each reconcile.
///
/// The store holds every Rollout of the watched namespaces. Decoded, a settled Rollout is about 5 KiB: a
/// 2 KiB struct of mostly empty optional fields, eight status conditions of four strings each, a B-tree
/// map for each one-label selector. Its JSON is under half of that, and decoding it costs tens of
/// microseconds of a reconcile that takes milliseconds.
#[derive(Clone, Debug)]
pub struct StoredRollout {
    pub metadata: ObjectMeta,
    /// [`super::rollout_trigger_hash`] of the Rollout, for the trigger filter.
    pub trigger_hash: u64,
    /// The hash of the template whose pod spec [`trim_rollout`] dropped (not serialized with it).
    elided_hash: Option<Box<str>>,
    /// `{"spec": ..., "status": ...}`.
    packed: Box<[u8]>,
}

#[derive(Serialize)]
struct PackedRef<'a> {
    spec: &'a RolloutSpec,
    status: &'a Option<RolloutStatus>,
}

#[derive(Deserialize)]
struct Packed {
    spec: RolloutSpec,
    status: Option<RolloutStatus>,
}

impl StoredRollout {
    /// The stored form of `rollout`.
    pub fn pack(rollout: &Rollout) -> StoredRollout {
        let packed = serde_json::to_vec(&PackedRef {
            spec: &rollout.spec,
            status: &rollout.status,
        })
        // Encoding these types into memory cannot fail (every map key is a string); were it to, the
        // Rollout would fail to decode at its reconcile, with that error, rather than be planned wrong.
        .unwrap_or_default();
        StoredRollout {
            metadata: rollout.metadata.clone(),
            trigger_hash: super::rollout_trigger_hash(rollout),
            elided_hash: rollout.spec.template.elided_hash.as_deref().map(Into::into),
            packed: packed.into_boxed_slice(),
        }
    }

    /// The Rollout as it was stored.
    pub fn unpack(&self) -> Result<Rollout, serde_json::Error> {
        let Packed { mut spec, status } = serde_json::from_slice(&self.packed)?;
        spec.template.elided_hash = self.elided_hash.as_deref().map(String::from);
        Ok(Rollout {
            metadata: self.metadata.clone(),
            spec,
            status,
        })
    }

    /// What a trigger of this Rollout needs: its reference and trigger hash, not its spec and status.
    pub fn trigger(&self) -> StoredRollout {
        StoredRollout {
            metadata: ObjectMeta {
                name: self.metadata.name.clone(),
                namespace: self.metadata.namespace.clone(),
                uid: self.metadata.uid.clone(),
                resource_version: self.metadata.resource_version.clone(),
                ..ObjectMeta::default()
            },
            trigger_hash: self.trigger_hash,
            elided_hash: None,
            packed: Box::default(),
        }
    }
}

impl Resource for StoredRollout {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Rollout::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Rollout::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Rollout::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Rollout::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Rollout watch event with the Rollout in its stored form.
pub fn stored_event(event: watcher::Event<Rollout>) -> watcher::Event<StoredRollout> {
    use watcher::Event;
    match event {
        Event::Init => Event::Init,
        Event::InitApply(rollout) => Event::InitApply(StoredRollout::pack(&rollout)),
        Event::InitDone => Event::InitDone,
        Event::Apply(rollout) => Event::Apply(StoredRollout::pack(&rollout)),
        Event::Delete(rollout) => Event::Delete(StoredRollout::pack(&rollout)),
    }
}

/// Decodes a Rollout and stores it (kube-runtime's controller asks its object type to be decodable).
impl<'de> Deserialize<'de> for StoredRollout {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Rollout::deserialize(deserializer).map(|rollout| StoredRollout::pack(&rollout))
    }
}

/// Whether a plan for `rollout` would create a ReplicaSet from a template whose pod spec the cache
/// dropped: the Rollout is then read whole and planned again.
pub fn needs_pod_spec(rollout: &Rollout, actions: &[Action]) -> bool {
    elided_hash(&rollout.spec.template).is_some()
        && actions
            .iter()
            .any(|action| matches!(action, Action::CreateReplicaSet { .. }))
}

/// A routing object as the route caches keep it (for `WatchStreamExt::modify`): routers write it with
/// JSON patches computed against the spec and annotations, which are kept.
pub fn trim_dynamic(object: &mut DynamicObject) {
    trim_metadata(&mut object.metadata);
}

/// The controller uid and namespace of an object, as the indexes key it.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    pub namespace: String,
    pub controller_uid: Option<String>,
}

impl Owned {
    fn of<K: Resource>(object: &K) -> Owned {
        Owned {
            namespace: object.meta().namespace.clone().unwrap_or_default(),
            controller_uid: controller_uid(object).map(str::to_string),
        }
    }
}

/// What the controller keeps of a ReplicaSet: the planner's view plus what tells a write of its own
/// apart from a later one (uid and generation).
#[derive(Clone, Debug, PartialEq)]
pub struct CachedReplicaSet {
    pub owned: Owned,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub view: ObservedReplicaSet,
}

impl Cached for CachedReplicaSet {
    fn key(&self) -> NameKey {
        NameKey::new(&self.owned.namespace, &self.view.name)
    }

    fn controller_uid(&self) -> Option<&str> {
        self.owned.controller_uid.as_deref()
    }
}

impl CachedFrom<ReplicaSet> for CachedReplicaSet {
    fn cached_from(rs: &ReplicaSet) -> CachedReplicaSet {
        CachedReplicaSet {
            owned: Owned::of(rs),
            uid: rs.metadata.uid.clone(),
            generation: rs.metadata.generation,
            view: observed_replica_set(rs),
        }
    }
}

/// What the controller keeps of a Service: its selector, and its resourceVersion (which tells the
/// controller's own selector write apart from a later edit). The selector is kept as sorted pairs, not a
/// B-tree map: a map's first node has room for eleven pairs (over 500 bytes), a Service selector holds
/// one to three, and the cache holds every Service of the watched namespaces.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedService {
    pub namespace: Box<str>,
    pub name: Box<str>,
    pub resource_version: Option<Box<str>>,
    selector: Box<[(Box<str>, Box<str>)]>,
}

impl CachedService {
    /// The Service as the planner reads it.
    pub fn view(&self) -> ObservedService {
        ObservedService {
            name: self.name.to_string(),
            selector: self
                .selector
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        }
    }

    /// The Service as a router reads it: name, namespace, resourceVersion and selector.
    pub fn to_value(&self) -> Value {
        let selector: serde_json::Map<String, Value> = self
            .selector
            .iter()
            .map(|(key, value)| (key.to_string(), Value::from(value.as_ref())))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": self.resource_version,
            },
            "spec": {"selector": selector},
        })
    }
}

impl Cached for CachedService {
    fn key(&self) -> NameKey {
        NameKey::new(&self.namespace, &self.name)
    }

    fn controller_uid(&self) -> Option<&str> {
        None
    }
}

impl CachedFrom<Service> for CachedService {
    fn cached_from(service: &Service) -> CachedService {
        let view = observed_service(service);
        CachedService {
            namespace: service
                .metadata
                .namespace
                .as_deref()
                .unwrap_or_default()
                .into(),
            name: view.name.into(),
            resource_version: service.metadata.resource_version.as_deref().map(Into::into),
            selector: view
                .selector
                .into_iter()
                .map(|(key, value)| (key.into(), value.into()))
                .collect(),
        }
    }
}

/// What the controller keeps of an AnalysisRun: the planner's view (`None` for a run without Serin's
/// purpose labels, which the planner ignores), not its measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedAnalysisRun {
    pub owned: Owned,
    pub name: String,
    pub view: Option<ObservedAnalysisRun>,
}

impl Cached for CachedAnalysisRun {
    fn key(&self) -> NameKey {
        NameKey::new(&self.owned.namespace, &self.name)
    }

    fn controller_uid(&self) -> Option<&str> {
        self.owned.controller_uid.as_deref()
    }
}

impl CachedFrom<AnalysisRun> for CachedAnalysisRun {
    fn cached_from(run: &AnalysisRun) -> CachedAnalysisRun {
        CachedAnalysisRun {
            owned: Owned::of(run),
            name: run.metadata.name.clone().unwrap_or_default(),
            view: observed_analysis_run(run),
        }
    }
}

impl Cached for DynamicObject {
    fn key(&self) -> NameKey {
        NameKey::of(self)
    }

    fn controller_uid(&self) -> Option<&str> {
        controller_uid(self)
    }
}

impl CachedFrom<DynamicObject> for DynamicObject {
    fn cached_from(object: &DynamicObject) -> DynamicObject {
        let mut kept = object.clone();
        trim_dynamic(&mut kept);
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::pod_template_hash;
    use kube::ResourceExt;
    use serde_json::json;

    fn rollout() -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                         "annotations": {LAST_APPLIED: "{}"}},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "app", "image": "web:2"}]}},
                "strategy": {"canary": {"steps": [{"setWeight": 50}]}}
            }
        }))
        .expect("a valid Rollout")
    }

    fn create_from(rollout: &Rollout) -> Vec<Action> {
        vec![Action::CreateReplicaSet {
            name: "web-h".into(),
            pod_template_hash: pod_template_hash(&rollout.spec.template),
            revision: 1,
            replicas: 1,
            template: Box::new(rollout.spec.template.clone().into()),
        }]
    }

    #[test]
    fn the_rollout_cache_keeps_the_template_hash_and_labels_not_the_pod_spec() {
        let full = rollout();
        let mut kept = full.clone();
        trim_rollout(&mut kept);
        assert!(kept.spec.template.spec.is_none());
        assert!(kept.metadata.annotations.is_none());
        assert_eq!(
            pod_template_hash(&kept.spec.template),
            pod_template_hash(&full.spec.template)
        );
        assert_eq!(
            kept.spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone()),
            full.spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
        );
        assert!(needs_pod_spec(&kept, &create_from(&kept)));
        assert!(!needs_pod_spec(&kept, &[]));
        assert!(!needs_pod_spec(&full, &create_from(&full)));
    }

    #[test]
    fn a_stored_rollout_unpacks_to_the_trimmed_rollout_with_its_elided_hash() {
        let mut kept = rollout();
        kept.metadata.resource_version = Some("7".into());
        kept.status = Some(RolloutStatus {
            message: Some("revision 1 is stable".into()),
            current_step_index: Some(1),
            ..RolloutStatus::default()
        });
        trim_rollout(&mut kept);
        let stored = StoredRollout::pack(&kept);
        let unpacked = stored.unpack().expect("unpacks");
        let json = |rollout: &Rollout| serde_json::to_value(rollout).expect("encodes");
        assert_eq!(json(&unpacked), json(&kept));
        assert_eq!(unpacked.metadata, kept.metadata);
        assert_eq!(
            unpacked.spec.template.elided_hash,
            kept.spec.template.elided_hash
        );
        assert!(
            elided_hash(&unpacked.spec.template).is_some(),
            "without its elided hash, an unpacked template would look whole to the create path"
        );
        assert!(needs_pod_spec(&unpacked, &create_from(&unpacked)));
        assert_eq!(
            stored.trigger_hash,
            super::super::rollout_trigger_hash(&kept)
        );
        assert_eq!(stored.name_any(), "web");
        let decoded: StoredRollout = serde_json::from_value(json(&kept)).expect("decodes");
        assert_eq!(json(&decoded.unpack().expect("unpacks")), json(&kept));
    }
}
