//! What the controller itself just wrote, laid over watch caches that do not show it yet.
//!
//! A reconcile can run between a write and the watch event that brings it into the cache (another
//! trigger, a requeue). Planned from the stale copy, it would send the same scale patch, selector patch or
//! weight again, and a route read before its own weight change looks like a hand edit. So each write the
//! controller makes is remembered with the server's answer, and observations use that answer until the
//! cache has caught up:
//!
//! - a ReplicaSet written (created, scaled, revision set): until the cached copy shows a later spec
//!   (`generation`, which every spec change raises) or the values written; a created one is added while
//!   the cache does not have it yet;
//! - a ReplicaSet deleted: seen as deleting while the cache still has it;
//! - a Service selector or router weights written: until the cached objects change at all, whoever
//!   changed them (so a hand edit is never hidden; at worst a write is repeated).
//!
//! Each expectation also expires after `EXPECTATION_TTL`, so a cache that never shows a write (a relist
//! that skipped it) is trusted again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::ResourceExt;

use super::cached::CachedReplicaSet;
use super::observe::observed_replica_set;
use crate::strategy::ObservedReplicaSet;
use crate::strategy::ObservedTraffic;
use crate::traffic::ObjectKey;

/// How long a write is laid over a cache that does not show it.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// A ReplicaSet write the cache may not show yet.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaSetWrite {
    /// Created, scaled or annotated: the server's answer, as the planner sees it.
    Written {
        view: ObservedReplicaSet,
        uid: Option<String>,
        generation: Option<i64>,
        /// Created by this write, so a cache without it is behind (not told of a deletion).
        created: bool,
        at: Instant,
    },
    /// Deleted.
    Deleted { uid: Option<String>, at: Instant },
}

impl ReplicaSetWrite {
    /// The expectation for a ReplicaSet as the server answered a write.
    pub fn written(object: &ReplicaSet, created: bool, at: Instant) -> ReplicaSetWrite {
        ReplicaSetWrite::Written {
            view: observed_replica_set(object),
            uid: object.uid(),
            generation: object.metadata.generation,
            created,
            at,
        }
    }

    fn at(&self) -> Instant {
        match self {
            ReplicaSetWrite::Written { at, .. } | ReplicaSetWrite::Deleted { at, .. } => *at,
        }
    }
}

/// A write to objects read by name (a Service's selector, a router's objects), with the resourceVersions
/// the cache held when it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedWrite<T> {
    pub versions: BTreeMap<ObjectKey, Option<String>>,
    pub value: T,
    pub at: Instant,
}

impl<T> NamedWrite<T> {
    /// Whether the cache still holds exactly what it held when the write was made.
    pub fn unchanged_in(&self, current: &BTreeMap<ObjectKey, Option<String>>) -> bool {
        self.versions == *current
    }
}

/// The planner's view of a Rollout's ReplicaSets: the cached ones with the controller's own writes laid
/// over them. Expectations the cache has caught up with, or that expired, are removed from `expected`.
pub fn overlay_replica_sets(
    cached: &[Arc<CachedReplicaSet>],
    expected: &mut BTreeMap<String, ReplicaSetWrite>,
    now: Instant,
) -> Vec<ObservedReplicaSet> {
    expected.retain(|_, write| now.saturating_duration_since(write.at()) < EXPECTATION_TTL);
    let mut seen = Vec::with_capacity(cached.len());
    let mut out = Vec::with_capacity(cached.len() + expected.len());
    for rs in cached {
        let name = rs.view.name.clone();
        let view = rs.view.clone();
        seen.push(name.clone());
        let Some(write) = expected.get(&name) else {
            out.push(view);
            continue;
        };
        let same_object = |uid: &Option<String>| uid.is_none() || *uid == rs.uid;
        match write {
            ReplicaSetWrite::Written {
                view: ours,
                uid,
                generation,
                ..
            } => {
                let later_spec = match (rs.generation, generation) {
                    (Some(cached), Some(written)) => cached > *written,
                    _ => false,
                };
                let shows_ours = view.spec_replicas == ours.spec_replicas
                    && view.revision == ours.revision
                    && rs.generation >= *generation;
                if !same_object(uid) || later_spec || shows_ours {
                    expected.remove(&name);
                    out.push(view);
                } else {
                    out.push(ours.clone());
                }
            }
            ReplicaSetWrite::Deleted { uid, .. } => {
                if same_object(uid) {
                    out.push(ObservedReplicaSet {
                        deleting: true,
                        ..view
                    });
                } else {
                    expected.remove(&name);
                    out.push(view);
                }
            }
        }
    }
    expected.retain(|name, write| match write {
        ReplicaSetWrite::Written { created, view, .. } if !seen.contains(name) => {
            if *created {
                out.push(view.clone());
            }
            *created
        }
        // A deleted ReplicaSet the cache no longer has: the deletion is in.
        ReplicaSetWrite::Deleted { .. } => seen.contains(name),
        ReplicaSetWrite::Written { .. } => true,
    });
    out
}

/// The expectations of one Rollout.
#[derive(Debug, Default)]
struct RolloutWrites {
    replica_sets: BTreeMap<String, ReplicaSetWrite>,
    selectors: BTreeMap<String, NamedWrite<Option<String>>>,
    traffic: Option<NamedWrite<ObservedTraffic>>,
}

impl RolloutWrites {
    fn is_empty(&self) -> bool {
        self.replica_sets.is_empty() && self.selectors.is_empty() && self.traffic.is_none()
    }

    fn expire(&mut self, now: Instant) {
        let live = |at: Instant| now.saturating_duration_since(at) < EXPECTATION_TTL;
        self.replica_sets.retain(|_, write| live(write.at()));
        self.selectors.retain(|_, write| live(write.at));
        if self.traffic.as_ref().is_some_and(|write| !live(write.at)) {
            self.traffic = None;
        }
    }
}

/// The controller's recent writes, by Rollout uid, for one namespace scope.
#[derive(Default)]
pub struct Expectations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_rollout: HashMap<String, RolloutWrites>,
    swept: Option<Instant>,
}

impl Inner {
    /// Drops expired expectations of every Rollout (those deleted included), at most once per TTL, so
    /// the sweep costs nothing per reconcile.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < EXPECTATION_TTL)
        {
            return;
        }
        self.swept = Some(now);
        self.by_rollout.retain(|_, writes| {
            writes.expire(now);
            !writes.is_empty()
        });
    }

    fn entry(&mut self, rollout: &str, now: Instant) -> &mut RolloutWrites {
        self.sweep(now);
        self.by_rollout.entry(rollout.to_string()).or_default()
    }
}

impl Expectations {
    pub fn new() -> Expectations {
        Expectations::default()
    }

    /// Remembers a ReplicaSet write of the Rollout with uid `rollout`.
    pub fn replica_set(&self, rollout: &str, name: &str, write: ReplicaSetWrite) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = write.at();
        let writes = &mut inner.entry(rollout, now).replica_sets;
        let write = match (writes.get(name), write) {
            // Scaled right after it was created: still created, in case the cache has neither yet.
            (
                Some(ReplicaSetWrite::Written {
                    created: true,
                    uid: created_uid,
                    ..
                }),
                ReplicaSetWrite::Written {
                    view,
                    uid,
                    generation,
                    at,
                    ..
                },
            ) if *created_uid == uid => ReplicaSetWrite::Written {
                view,
                uid,
                generation,
                created: true,
                at,
            },
            (_, write) => write,
        };
        writes.insert(name.to_string(), write);
    }

    /// Remembers that a Service's selector was pinned to `hash` (or unpinned).
    pub fn selector(&self, rollout: &str, service: &str, write: NamedWrite<Option<String>>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = write.at;
        inner
            .entry(rollout, now)
            .selectors
            .insert(service.to_string(), write);
    }

    /// Remembers the weights and routes the router was made to carry.
    pub fn traffic(&self, rollout: &str, write: NamedWrite<ObservedTraffic>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = write.at;
        inner.entry(rollout, now).traffic = Some(write);
    }

    /// The Rollout's ReplicaSets as the planner should see them (see [`overlay_replica_sets`]).
    pub fn overlay_replica_sets(
        &self,
        rollout: &str,
        cached: &[Arc<CachedReplicaSet>],
        now: Instant,
    ) -> Vec<ObservedReplicaSet> {
        let Ok(mut inner) = self.inner.lock() else {
            return cached.iter().map(|rs| rs.view.clone()).collect();
        };
        let Some(writes) = inner.by_rollout.get_mut(rollout) else {
            return cached.iter().map(|rs| rs.view.clone()).collect();
        };
        let out = overlay_replica_sets(cached, &mut writes.replica_sets, now);
        if writes.is_empty() {
            inner.by_rollout.remove(rollout);
        }
        out
    }

    /// The selector hash written to `service` while the cache still holds `current` for it.
    pub fn selector_written(
        &self,
        rollout: &str,
        service: &str,
        current: &BTreeMap<ObjectKey, Option<String>>,
        now: Instant,
    ) -> Option<Option<String>> {
        let mut inner = self.inner.lock().ok()?;
        let writes = inner.by_rollout.get_mut(rollout)?;
        let write = writes.selectors.get(service)?;
        let valid = now.saturating_duration_since(write.at) < EXPECTATION_TTL
            && write.unchanged_in(current);
        let hash = valid.then(|| write.value.clone());
        if !valid {
            writes.selectors.remove(service);
            if writes.is_empty() {
                inner.by_rollout.remove(rollout);
            }
        }
        hash
    }

    /// The traffic written to the router while the cache still holds `current` for its objects.
    pub fn traffic_written(
        &self,
        rollout: &str,
        current: &BTreeMap<ObjectKey, Option<String>>,
        now: Instant,
    ) -> Option<ObservedTraffic> {
        let mut inner = self.inner.lock().ok()?;
        let writes = inner.by_rollout.get_mut(rollout)?;
        let write = writes.traffic.as_ref()?;
        let valid = now.saturating_duration_since(write.at) < EXPECTATION_TTL
            && write.unchanged_in(current);
        let traffic = valid.then(|| write.value.clone());
        if !valid {
            writes.traffic = None;
            if writes.is_empty() {
                inner.by_rollout.remove(rollout);
            }
        }
        traffic
    }

    /// Forgets a Rollout (it was deleted).
    pub fn forget(&self, rollout: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.by_rollout.remove(rollout);
        }
    }

    /// How many Rollouts have writes the caches may not show yet.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .map(|inner| inner.by_rollout.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::cached::CachedFrom;
    use crate::crd::labels;
    use crate::traffic::RoutingKind;
    use k8s_openapi::api::apps::v1::ReplicaSetStatus;

    fn rs(uid: &str, generation: i64, replicas: i32, revision: i64) -> ReplicaSet {
        let mut rs = ReplicaSet::default();
        rs.metadata.name = Some("web-h2".into());
        rs.metadata.namespace = Some("shop".into());
        rs.metadata.uid = Some(uid.into());
        rs.metadata.generation = Some(generation);
        rs.metadata.labels = Some([(labels::POD_TEMPLATE_HASH.into(), "h2".into())].into());
        rs.metadata.annotations = Some([(labels::REVISION.into(), revision.to_string())].into());
        rs.spec.replicas = Some(replicas);
        rs.status = Some(ReplicaSetStatus {
            replicas,
            ready_replicas: Some(replicas),
            available_replicas: Some(replicas),
            observed_generation: Some(generation),
            ..Default::default()
        });
        rs
    }

    fn scaled(from: &ReplicaSet, replicas: i32) -> ReplicaSet {
        let mut next = from.clone();
        next.spec.replicas = Some(replicas);
        next.metadata.generation = next.metadata.generation.map(|g| g + 1);
        next
    }

    fn one(
        cached: &[ReplicaSet],
        expected: &mut BTreeMap<String, ReplicaSetWrite>,
        now: Instant,
    ) -> Vec<ObservedReplicaSet> {
        let cached: Vec<Arc<CachedReplicaSet>> = cached
            .iter()
            .map(|rs| Arc::new(CachedReplicaSet::cached_from(rs)))
            .collect();
        overlay_replica_sets(&cached, expected, now)
    }

    #[test]
    fn a_scale_is_seen_until_the_cache_shows_its_generation() {
        let start = Instant::now();
        let before = rs("u", 3, 1, 2);
        let after = scaled(&before, 2);
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&after, false, start),
        )]);
        // The cache still has generation 3 (a pod turned ready meanwhile: only its status moved).
        let mut status_moved = before.clone();
        if let Some(status) = status_moved.status.as_mut() {
            status.ready_replicas = Some(0);
        }
        let seen = one(&[status_moved], &mut expected, start);
        assert_eq!(seen[0].spec_replicas, 2, "the patch the server accepted");
        assert!(
            !seen[0].status_current,
            "its status describes the older spec"
        );
        assert_eq!(expected.len(), 1);
        // The watch brings generation 4: the cache is trusted again.
        let seen = one(std::slice::from_ref(&after), &mut expected, start);
        assert_eq!(seen[0].spec_replicas, 2);
        assert!(expected.is_empty());
    }

    #[test]
    fn a_later_spec_or_another_object_of_the_same_name_wins_over_the_write() {
        let start = Instant::now();
        let before = rs("u", 3, 1, 2);
        let after = scaled(&before, 2);
        let later = scaled(&after, 5);
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&after, false, start),
        )]);
        assert_eq!(one(&[later], &mut expected, start)[0].spec_replicas, 5);
        assert!(expected.is_empty());

        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&after, false, start),
        )]);
        let replaced = rs("other", 1, 1, 2);
        assert_eq!(one(&[replaced], &mut expected, start)[0].spec_replicas, 1);
        assert!(expected.is_empty());
    }

    #[test]
    fn a_revision_annotation_is_seen_until_the_cache_shows_it() {
        let start = Instant::now();
        let before = rs("u", 3, 2, 2);
        let mut annotated = before.clone();
        annotated.metadata.annotations = Some([(labels::REVISION.into(), "5".to_string())].into());
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&annotated, false, start),
        )]);
        assert_eq!(one(&[before], &mut expected, start)[0].revision, 5);
        assert_eq!(expected.len(), 1);
        assert_eq!(one(&[annotated], &mut expected, start)[0].revision, 5);
        assert!(expected.is_empty());
    }

    #[test]
    fn a_created_replica_set_is_seen_before_the_cache_has_it_and_a_deleted_one_as_deleting() {
        let start = Instant::now();
        let created = rs("u", 1, 1, 2);
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&created, true, start),
        )]);
        let seen = one(&[], &mut expected, start);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].name, "web-h2");
        assert_eq!(
            one(std::slice::from_ref(&created), &mut expected, start).len(),
            1
        );
        assert!(expected.is_empty());

        // A scale of a ReplicaSet the cache no longer has: it was deleted, nothing is made up.
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&scaled(&created, 3), false, start),
        )]);
        assert!(one(&[], &mut expected, start).is_empty());
        assert!(expected.is_empty());

        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::Deleted {
                uid: Some("u".into()),
                at: start,
            },
        )]);
        let seen = one(std::slice::from_ref(&created), &mut expected, start);
        assert!(seen[0].deleting);
        assert!(one(&[], &mut expected, start).is_empty());
        assert!(expected.is_empty());
    }

    #[test]
    fn expectations_expire() {
        let start = Instant::now();
        let before = rs("u", 3, 1, 2);
        let mut expected = BTreeMap::from([(
            "web-h2".to_string(),
            ReplicaSetWrite::written(&scaled(&before, 2), false, start),
        )]);
        let later = start + EXPECTATION_TTL;
        assert_eq!(one(&[before], &mut expected, later)[0].spec_replicas, 1);
        assert!(expected.is_empty());
    }

    fn versions(version: &str) -> BTreeMap<ObjectKey, Option<String>> {
        BTreeMap::from([(
            ObjectKey::new(RoutingKind::HttpRoute, "shop", "web"),
            Some(version.to_string()),
        )])
    }

    #[test]
    fn written_traffic_is_seen_until_the_route_changes_in_the_cache() {
        let expectations = Expectations::new();
        let start = Instant::now();
        let traffic = ObservedTraffic {
            canary_weight: 25,
            ..Default::default()
        };
        expectations.traffic(
            "u",
            NamedWrite {
                versions: versions("7"),
                value: traffic.clone(),
                at: start,
            },
        );
        assert_eq!(
            expectations.traffic_written("u", &versions("7"), start),
            Some(traffic.clone())
        );
        assert_eq!(
            expectations.traffic_written("other", &versions("7"), start),
            None
        );
        // Whatever changed the route (the write itself or a hand edit), the cache now says what it carries.
        assert_eq!(
            expectations.traffic_written("u", &versions("8"), start),
            None
        );
        assert_eq!(
            expectations.traffic_written("u", &versions("7"), start),
            None
        );
        assert_eq!(expectations.pending(), 0);

        expectations.traffic(
            "u",
            NamedWrite {
                versions: versions("7"),
                value: traffic,
                at: start,
            },
        );
        assert_eq!(
            expectations.traffic_written("u", &versions("7"), start + EXPECTATION_TTL),
            None
        );
    }

    #[test]
    fn a_written_selector_is_seen_until_the_service_changes_in_the_cache() {
        let expectations = Expectations::new();
        let start = Instant::now();
        expectations.selector(
            "u",
            "web",
            NamedWrite {
                versions: versions("3"),
                value: Some("h2".into()),
                at: start,
            },
        );
        assert_eq!(
            expectations.selector_written("u", "web", &versions("3"), start),
            Some(Some("h2".into()))
        );
        assert_eq!(
            expectations.selector_written("u", "web-canary", &versions("3"), start),
            None
        );
        assert_eq!(
            expectations.selector_written("u", "web", &versions("4"), start),
            None
        );
        assert_eq!(expectations.pending(), 0);
    }

    #[test]
    fn a_replica_set_scaled_right_after_its_creation_is_still_seen_before_the_cache_has_it() {
        let expectations = Expectations::new();
        let start = Instant::now();
        let created = rs("u", 1, 1, 2);
        expectations.replica_set(
            "r",
            "web-h2",
            ReplicaSetWrite::written(&created, true, start),
        );
        expectations.replica_set(
            "r",
            "web-h2",
            ReplicaSetWrite::written(&scaled(&created, 3), false, start),
        );
        let seen = expectations.overlay_replica_sets("r", &[], start);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].spec_replicas, 3);
    }

    #[test]
    fn expired_expectations_of_deleted_rollouts_are_swept() {
        let expectations = Expectations::new();
        let start = Instant::now();
        expectations.replica_set(
            "gone",
            "web-h2",
            ReplicaSetWrite::Deleted {
                uid: None,
                at: start,
            },
        );
        assert_eq!(expectations.pending(), 1);
        expectations.replica_set(
            "other",
            "api-h1",
            ReplicaSetWrite::Deleted {
                uid: None,
                at: start + EXPECTATION_TTL,
            },
        );
        assert_eq!(expectations.pending(), 1, "the expired one went");
        expectations.forget("other");
        assert_eq!(expectations.pending(), 0);
    }
}
