//! State the controller keeps per Rollout goes with the Rollout.
//!
//! Besides the watch caches (which the watches themselves empty), the controller keeps a few things per
//! Rollout: its own last status write until the watch shows it, the writes laid over lagging caches, and
//! the Rollout's metric series. A controller that runs for months sees many more Rollouts come and go
//! than exist at any time, so each of these is dropped when its Rollout is deleted: on the watch's
//! Delete event, and, for a Rollout deleted while the watch was down, when the relist that follows no
//! longer lists it. A Rollout recreated under the same name is a new object (new uid): what was kept
//! under the old uid goes.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;

use super::cached::StoredRollout;
use super::index::NameKey;
use crate::crd::Rollout;

/// A Rollout whose state is to be dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Departed {
    pub key: NameKey,
    /// The uid it had (state kept by uid goes).
    pub uid: Option<String>,
    /// The name is gone too (not replaced by a new Rollout of the same name): state kept by name goes.
    pub name_gone: bool,
}

/// The Rollouts a watch shows (name -> uid), following its events, and which of them went.
#[derive(Debug, Default)]
pub struct Departures {
    live: HashMap<NameKey, Option<String>>,
    listing: Option<HashMap<NameKey, Option<String>>>,
}

impl Departures {
    pub fn new() -> Departures {
        Departures::default()
    }

    /// Applies one event of the Rollout watch; returns the Rollouts that went with it.
    pub fn apply(&mut self, event: &watcher::Event<Rollout>) -> Vec<Departed> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(rollout) => {
                self.listing
                    .get_or_insert_with(HashMap::new)
                    .insert(NameKey::of(rollout), rollout.uid());
                Vec::new()
            }
            watcher::Event::InitDone => {
                let Some(listed) = self.listing.take() else {
                    return Vec::new();
                };
                let previous = std::mem::replace(&mut self.live, listed);
                let mut departed: Vec<Departed> = previous
                    .into_iter()
                    .filter_map(|(key, uid)| match self.live.get(&key) {
                        None => Some(Departed {
                            key,
                            uid,
                            name_gone: true,
                        }),
                        Some(now) if *now != uid => Some(Departed {
                            key,
                            uid,
                            name_gone: false,
                        }),
                        Some(_) => None,
                    })
                    .collect();
                departed.sort_by(|a, b| a.key.cmp(&b.key));
                departed
            }
            watcher::Event::Apply(rollout) => {
                let key = NameKey::of(rollout);
                match self.live.insert(key.clone(), rollout.uid()) {
                    Some(before) if before != rollout.uid() => vec![Departed {
                        key,
                        uid: before,
                        name_gone: false,
                    }],
                    _ => Vec::new(),
                }
            }
            watcher::Event::Delete(rollout) => {
                let key = NameKey::of(rollout);
                let uid = self.live.remove(&key).unwrap_or_else(|| rollout.uid());
                vec![Departed {
                    key,
                    uid,
                    name_gone: true,
                }]
            }
        }
    }

    /// How many Rollouts the watch shows.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// The resourceVersion a status write replaced, and the Rollout the server answered it with.
type OwnWrite = (Option<String>, Box<Rollout>);

/// The controller's own last status write per Rollout, with the resourceVersion it replaced: until the
/// watch shows it, a reconcile plans from it instead of the stale cached copy (which would only earn a
/// 409 or, worse, an unchanged plan that writes nothing and waits for a trigger that already came). An
/// entry goes as soon as the Rollout store holds another version than the one it replaced. Entries are
/// boxed: a burst of writes grows the table, which keeps its size when it empties again.
pub struct OwnWrites {
    written: Mutex<HashMap<NameKey, OwnWrite>>,
    store: Store<StoredRollout>,
}

impl OwnWrites {
    /// Own writes checked against `store` (the Rollout reflector's).
    pub fn new(store: Store<StoredRollout>) -> OwnWrites {
        OwnWrites {
            written: Mutex::new(HashMap::new()),
            store,
        }
    }

    /// The Rollout to plan from: our own write while the cache still holds the version it replaced.
    pub fn fresher(&self, cached: &Rollout) -> Rollout {
        let key = NameKey::of(cached);
        let Ok(mut written) = self.written.lock() else {
            return cached.clone();
        };
        match written.get(&key) {
            Some((replaced, ours)) if *replaced == cached.metadata.resource_version => {
                Rollout::clone(ours)
            }
            Some(_) => {
                written.remove(&key);
                cached.clone()
            }
            None => cached.clone(),
        }
    }

    /// Remembers our write of `written` over `replaced`, unless the store no longer holds `replaced`
    /// (the watch brought the write or a later change before its answer was handled, or the Rollout was
    /// deleted meanwhile). The store is read under the lock [`OwnWrites::forget`] takes, so a deletion
    /// cannot slip between the check and the insert.
    pub fn remember(&self, replaced: &Rollout, mut written: Rollout) {
        let key = NameKey::of(replaced);
        let reference = ObjectRef::new(&key.name).within(&key.namespace);
        super::cached::trim_rollout(&mut written);
        let Ok(mut map) = self.written.lock() else {
            return;
        };
        let stored = self.store.get(&reference);
        let holds_replaced = stored.is_some_and(|stored| {
            stored.metadata.resource_version == replaced.metadata.resource_version
                && stored.metadata.uid == replaced.metadata.uid
        });
        if holds_replaced {
            map.insert(
                key,
                (
                    replaced.metadata.resource_version.clone(),
                    Box::new(written),
                ),
            );
        }
    }

    /// The watch brought a version of `rollout`: an entry for another version is stale.
    pub fn observed(&self, rollout: &Rollout) {
        let key = NameKey::of(rollout);
        if let Ok(mut map) = self.written.lock() {
            if map
                .get(&key)
                .is_some_and(|(replaced, _)| *replaced != rollout.metadata.resource_version)
            {
                map.remove(&key);
            }
        }
    }

    /// Drops the entry of a Rollout that went.
    pub fn forget(&self, key: &NameKey) {
        if let Ok(mut map) = self.written.lock() {
            map.remove(key);
        }
    }

    /// How many Rollouts have an entry.
    pub fn len(&self) -> usize {
        self.written.lock().map(|map| map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rollout(name: &str, uid: &str, version: &str) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": version},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}},
                "strategy": {"canary": {}}
            }
        }))
        .expect("valid rollout")
    }

    fn names(departed: &[Departed]) -> Vec<(String, Option<String>, bool)> {
        departed
            .iter()
            .map(|d| (d.key.name.clone(), d.uid.clone(), d.name_gone))
            .collect()
    }

    #[test]
    fn a_deleted_rollout_departs_with_its_uid() {
        let mut departures = Departures::new();
        assert!(departures
            .apply(&watcher::Event::Apply(rollout("web", "u1", "1")))
            .is_empty());
        assert!(departures
            .apply(&watcher::Event::Apply(rollout("web", "u1", "2")))
            .is_empty());
        let gone = departures.apply(&watcher::Event::Delete(rollout("web", "u1", "3")));
        assert_eq!(names(&gone), [("web".into(), Some("u1".into()), true)]);
        assert!(departures.is_empty());
    }

    #[test]
    fn a_rollout_recreated_under_its_name_leaves_only_its_old_uid_behind() {
        let mut departures = Departures::new();
        departures.apply(&watcher::Event::Apply(rollout("web", "u1", "1")));
        let gone = departures.apply(&watcher::Event::Apply(rollout("web", "u2", "5")));
        assert_eq!(names(&gone), [("web".into(), Some("u1".into()), false)]);
        assert_eq!(departures.len(), 1);
    }

    #[test]
    fn a_relist_without_a_rollout_departs_it() {
        let mut departures = Departures::new();
        for (name, uid) in [("a", "ua"), ("b", "ub"), ("c", "uc")] {
            departures.apply(&watcher::Event::Apply(rollout(name, uid, "1")));
        }
        // The watch was down while `a` was deleted and `c` recreated.
        departures.apply(&watcher::Event::Init);
        departures.apply(&watcher::Event::InitApply(rollout("b", "ub", "1")));
        departures.apply(&watcher::Event::InitApply(rollout("c", "uc2", "9")));
        let gone = departures.apply(&watcher::Event::InitDone);
        assert_eq!(
            names(&gone),
            [
                ("a".into(), Some("ua".into()), true),
                ("c".into(), Some("uc".into()), false)
            ]
        );
        assert_eq!(departures.len(), 2);
    }

    #[test]
    fn an_own_write_is_kept_until_the_watch_shows_another_version() {
        let (store, mut writer) = kube::runtime::reflector::store::<StoredRollout>();
        let own = OwnWrites::new(store);
        let cached = rollout("web", "u1", "1");
        // Not in the store (deleted): nothing is kept.
        own.remember(&cached, rollout("web", "u1", "2"));
        assert!(own.is_empty());
        writer.apply_watcher_event(&watcher::Event::Apply(StoredRollout::pack(&cached)));
        own.remember(&cached, rollout("web", "u1", "2"));
        assert_eq!(
            own.fresher(&cached).metadata.resource_version.as_deref(),
            Some("2")
        );
        own.observed(&cached);
        assert_eq!(own.len(), 1, "the watch still shows the replaced version");
        own.observed(&rollout("web", "u1", "2"));
        assert!(own.is_empty());

        own.remember(&cached, rollout("web", "u1", "2"));
        own.forget(&NameKey::new("shop", "web"));
        assert!(own.is_empty());
    }
}
