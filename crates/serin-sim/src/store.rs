//! The object store: compact serialized objects, one global resourceVersion, and a bounded window of
//! committed events that watches read in commit order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::Value;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One stored object: its JSON bytes plus the few fields lists, selectors and GC look at.
#[derive(Clone, Debug)]
pub struct StoredObject {
    pub json: Bytes,
    pub labels: Arc<Labels>,
    pub uid: Arc<str>,
    pub resource_version: u64,
    pub owner_uids: Vec<Arc<str>>,
}

impl StoredObject {
    pub fn value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.json)
    }
}

/// A committed change, as watchers see it.
#[derive(Clone, Debug)]
pub struct Event {
    pub resource_version: u64,
    pub resource_key: Arc<str>,
    pub event_type: EventType,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub object: Bytes,
    pub labels: Arc<Labels>,
    /// Labels before a modification, so selector watches can tell "stopped matching".
    pub previous_labels: Option<Arc<Labels>>,
}

pub type ObjectKey = (String, String);

#[derive(Default)]
pub struct StoreInner {
    pub resource_version: u64,
    objects: HashMap<String, BTreeMap<ObjectKey, StoredObject>>,
    by_uid: HashMap<Arc<str>, (String, String, String)>,
    /// owner uid -> objects whose ownerReferences name it, so garbage collection need not scan everything.
    dependents: HashMap<Arc<str>, BTreeSet<(String, String, String)>>,
    events: VecDeque<Event>,
    window: usize,
    /// Highest resourceVersion whose event has been dropped from the window.
    pub compacted_through: u64,
    /// The latest resourceVersion committed per resource, so a watch wakes for commits of its own
    /// resource only rather than for every commit in the cluster.
    resource_signals: HashMap<String, tokio::sync::watch::Sender<u64>>,
}

pub fn labels_of(object: &Value) -> Labels {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(key, value)| value.as_str().map(|v| (key.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub fn owner_uids_of(object: &Value) -> Vec<Arc<str>> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid")?.as_str().map(Arc::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Events after a resourceVersion, or the reason they can no longer be served.
pub enum EventsSince {
    /// Matching events, and the resourceVersion up to which the window was scanned.
    Events(Vec<Event>, u64),
    TooOld {
        requested: u64,
        oldest: u64,
    },
}

impl StoreInner {
    pub fn get(&self, resource_key: &str, namespace: &str, name: &str) -> Option<&StoredObject> {
        self.objects
            .get(resource_key)?
            .get(&(namespace.to_string(), name.to_string()))
    }

    pub fn locate_uid(&self, uid: &str) -> Option<(String, String, String)> {
        self.by_uid.get(uid).cloned()
    }

    /// Objects of a resource in key order, optionally within one namespace, starting after `after`.
    pub fn range<'a>(
        &'a self,
        resource_key: &str,
        namespace: Option<&str>,
        after: Option<ObjectKey>,
    ) -> Box<dyn Iterator<Item = (&'a ObjectKey, &'a StoredObject)> + 'a> {
        let Some(objects) = self.objects.get(resource_key) else {
            return Box::new(std::iter::empty());
        };
        let lower = match (&after, namespace) {
            (Some(after), _) => std::ops::Bound::Excluded(after.clone()),
            (None, Some(ns)) => std::ops::Bound::Included((ns.to_string(), String::new())),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let namespace = namespace.map(str::to_string);
        Box::new(
            objects
                .range((lower, std::ops::Bound::Unbounded))
                .take_while(move |((ns, _), _)| {
                    namespace.as_ref().is_none_or(|wanted| wanted == ns)
                }),
        )
    }

    pub fn count(&self, resource_key: &str) -> usize {
        self.objects.get(resource_key).map_or(0, BTreeMap::len)
    }

    /// Objects anywhere whose ownerReferences name `uid`.
    pub fn dependents_of(&self, uid: &str) -> Vec<(String, String, String)> {
        self.dependents
            .get(uid)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn unlink_owners(&mut self, owners: &[Arc<str>], location: &(String, String, String)) {
        for owner in owners {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(location);
                if set.is_empty() {
                    self.dependents.remove(owner);
                }
            }
        }
    }

    pub fn namespaced_keys(&self, namespace: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (resource_key, objects) in &self.objects {
            for (ns, name) in objects.keys() {
                if ns == namespace {
                    found.push((resource_key.clone(), name.clone()));
                }
            }
        }
        found
    }

    pub fn keys_of(&self, resource_key: &str) -> Vec<ObjectKey> {
        self.objects
            .get(resource_key)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A receiver that changes whenever an event of `resource_key` is committed.
    pub fn subscribe_resource(&mut self, resource_key: &str) -> tokio::sync::watch::Receiver<u64> {
        let current = self.resource_version;
        self.resource_signals
            .entry(resource_key.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(current).0)
            .subscribe()
    }

    fn push_event(&mut self, event: Event) {
        if let Some(signal) = self.resource_signals.get(&*event.resource_key) {
            signal.send_replace(event.resource_version);
        }
        self.events.push_back(event);
        while self.events.len() > self.window {
            if let Some(dropped) = self.events.pop_front() {
                self.compacted_through = dropped.resource_version;
            }
        }
    }

    /// Stores `object` (its metadata.resourceVersion is set here) and records the event.
    pub fn put(
        &mut self,
        resource_key: &str,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Result<StoredObject, serde_json::Error> {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert(
                "resourceVersion".into(),
                Value::String(resource_version.to_string()),
            );
        }
        let json = Bytes::from(serde_json::to_vec(&object)?);
        let uid: Arc<str> = Arc::from(
            object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
        let stored = StoredObject {
            json,
            labels: Arc::new(labels_of(&object)),
            uid: uid.clone(),
            resource_version,
            owner_uids: owner_uids_of(&object),
        };
        let key = (namespace.to_string(), name.to_string());
        let previous = self
            .objects
            .entry(resource_key.to_string())
            .or_default()
            .insert(key, stored.clone());
        self.by_uid.insert(
            uid,
            (
                resource_key.to_string(),
                namespace.to_string(),
                name.to_string(),
            ),
        );
        let location = (
            resource_key.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        if let Some(previous) = &previous {
            self.unlink_owners(&previous.owner_uids, &location);
        }
        for owner in &stored.owner_uids {
            self.dependents
                .entry(owner.clone())
                .or_default()
                .insert(location.clone());
        }
        let event_type = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.push_event(Event {
            resource_version,
            resource_key: Arc::from(resource_key),
            event_type,
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            object: stored.json.clone(),
            labels: stored.labels.clone(),
            previous_labels: previous.map(|p| p.labels),
        });
        Ok(stored)
    }

    /// Removes an object; the DELETED event carries it with a fresh resourceVersion.
    pub fn remove(
        &mut self,
        resource_key: &str,
        namespace: &str,
        name: &str,
    ) -> Option<StoredObject> {
        let key = (namespace.to_string(), name.to_string());
        let removed = self.objects.get_mut(resource_key)?.remove(&key)?;
        self.by_uid.remove(&removed.uid);
        let location = (
            resource_key.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.unlink_owners(&removed.owner_uids, &location);
        self.resource_version += 1;
        let resource_version = self.resource_version;
        let json = match serde_json::from_slice::<Value>(&removed.json) {
            Ok(mut value) => {
                if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                    metadata.insert(
                        "resourceVersion".into(),
                        Value::String(resource_version.to_string()),
                    );
                }
                serde_json::to_vec(&value)
                    .map(Bytes::from)
                    .unwrap_or_else(|_| removed.json.clone())
            }
            Err(_) => removed.json.clone(),
        };
        self.push_event(Event {
            resource_version,
            resource_key: Arc::from(resource_key),
            event_type: EventType::Deleted,
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            object: json.clone(),
            labels: removed.labels.clone(),
            previous_labels: None,
        });
        Some(StoredObject {
            json,
            resource_version,
            ..removed
        })
    }

    /// Events with resourceVersion greater than `after` for one resource, at most `max` of them.
    pub fn events_since(&self, resource_key: &str, after: u64, max: usize) -> EventsSince {
        if after < self.compacted_through {
            let oldest = self
                .events
                .front()
                .map_or(self.resource_version, |e| e.resource_version);
            return EventsSince::TooOld {
                requested: after,
                oldest,
            };
        }
        let start = self
            .events
            .partition_point(|event| event.resource_version <= after);
        let events: Vec<Event> = self
            .events
            .iter()
            .skip(start)
            .filter(|event| &*event.resource_key == resource_key)
            .take(max)
            .cloned()
            .collect();
        let scanned_through = match events.last() {
            Some(last) if events.len() == max => last.resource_version,
            _ => self.resource_version,
        };
        EventsSince::Events(events, scanned_through)
    }
}

/// Shared handle to the store plus a notification of the latest committed resourceVersion.
pub struct Store {
    inner: Mutex<StoreInner>,
    latest: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(window: usize) -> Store {
        let (latest, _) = tokio::sync::watch::channel(0);
        Store {
            inner: Mutex::new(StoreInner {
                window: window.max(1),
                ..StoreInner::default()
            }),
            latest,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, StoreInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes watchers; call after releasing the lock on every commit.
    pub fn notify(&self, resource_version: u64) {
        self.latest.send_replace(resource_version);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(name: &str) -> Value {
        json!({"metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"a": "b"}}})
    }

    #[test]
    fn events_are_in_commit_order_and_window_compacts() {
        let store = Store::new(3);
        let mut inner = store.lock();
        for index in 0..5 {
            inner
                .put(
                    "/configmaps",
                    "default",
                    &format!("o{index}"),
                    object(&format!("o{index}")),
                )
                .unwrap();
        }
        assert_eq!(inner.resource_version, 5);
        assert_eq!(inner.compacted_through, 2);
        match inner.events_since("/configmaps", 2, 10) {
            EventsSince::Events(events, scanned) => {
                assert_eq!(scanned, 5);
                let versions: Vec<u64> = events.iter().map(|e| e.resource_version).collect();
                assert_eq!(versions, vec![3, 4, 5]);
            }
            EventsSince::TooOld { .. } => panic!("rv 2 is still servable"),
        }
        assert!(matches!(
            inner.events_since("/configmaps", 1, 10),
            EventsSince::TooOld { .. }
        ));
        let removed = inner.remove("/configmaps", "default", "o1").unwrap();
        assert_eq!(removed.resource_version, 6);
        assert!(inner.get("/configmaps", "default", "o1").is_none());
        assert_eq!(inner.locate_uid("uid-o1"), None);

        let mut child = object("child");
        child["metadata"]["ownerReferences"] = json!([{"uid": "uid-o2"}]);
        inner
            .put("/pods", "default", "child", child.clone())
            .unwrap();
        assert_eq!(
            inner.dependents_of("uid-o2"),
            vec![(
                "/pods".to_string(),
                "default".to_string(),
                "child".to_string()
            )]
        );
        child["metadata"]["ownerReferences"] = json!([{"uid": "uid-o3"}]);
        inner.put("/pods", "default", "child", child).unwrap();
        assert!(
            inner.dependents_of("uid-o2").is_empty(),
            "re-pointed owner reference unlinks the old owner"
        );
        inner.remove("/pods", "default", "child");
        assert!(inner.dependents_of("uid-o3").is_empty());
    }

    #[test]
    fn resource_signals_change_only_for_their_own_resource() {
        let store = Store::new(10);
        let mut pods = store.lock().subscribe_resource("/pods");
        let mut maps = store.lock().subscribe_resource("/configmaps");
        store
            .lock()
            .put("/configmaps", "default", "a", object("a"))
            .unwrap();
        assert!(
            !pods.has_changed().unwrap(),
            "a ConfigMap commit wakes pod watches"
        );
        assert!(maps.has_changed().unwrap());
        assert_eq!(*maps.borrow_and_update(), 1);
        store
            .lock()
            .put("/pods", "default", "p", object("p"))
            .unwrap();
        store.lock().remove("/pods", "default", "p");
        assert!(pods.has_changed().unwrap());
        assert_eq!(*pods.borrow_and_update(), 3, "the removal signals too");
        assert!(!maps.has_changed().unwrap());
    }
}
