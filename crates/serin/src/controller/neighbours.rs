//! Which other Rollouts of a namespace could collide with a Rollout (name one of its Services, select its
//! pods, or have their pods selected by it), kept up to date from the Rollout watch, so a reconcile looks
//! at those few instead of every Rollout of the namespace.
//!
//! The index only narrows the search: every candidate is then checked exactly by the planner's
//! validation. A candidate set may hold Rollouts that do not collide, never miss one that does:
//! - a selector with `matchLabels` selects only pods carrying each of its pairs, so the Rollouts whose pod
//!   labels carry any one of those pairs (the rarest is taken) include every Rollout it selects;
//! - a selector is indexed under the first pair of its `matchLabels`, which any pod it selects carries, so
//!   the selectors indexed under one of a Rollout's pod-label pairs include every selector that selects
//!   its pods;
//! - selectors without `matchLabels` cannot be narrowed this way and are candidates for every Rollout of
//!   their namespace (as are all Rollouts of a namespace for such a selector).
//!
//! Memory: the index holds every Rollout of the cluster, so it keeps each one's name once and no other
//! string. A Rollout is
//! linked under slots, each the hash of what it stands for (a Service, a pod-label pair, a selector pair,
//! a namespace), and each Rollout's key is shared between its slots. Two things hashing to one slot only
//! add candidates (which the planner's exact check then drops), so a collision cannot hide one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};

use kube::runtime::watcher;
use kube::ResourceExt;

use super::index::{Index, NameKey, Relisted};
use crate::crd::Rollout;

/// The hash of one thing Rollouts are linked under.
type Slot = u64;

/// What a slot stands for.
#[derive(Hash)]
enum SlotOf<'a> {
    /// A Service the Rollout names.
    Service(&'a str, &'a str),
    /// A label pair of the Rollout's pods.
    PodPair(&'a str, &'a str, &'a str),
    /// The first `matchLabels` pair of the Rollout's selector.
    SelectorPair(&'a str, &'a str, &'a str),
    /// A selector without `matchLabels` in the namespace.
    Unindexed(&'a str),
    /// Every Rollout of the namespace.
    Namespace(&'a str),
}

impl SlotOf<'_> {
    fn slot(&self) -> Slot {
        // `DefaultHasher::new` has fixed keys: a slot is the same for every event of a Rollout.
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

/// The Rollouts of every namespace by the Services they name, the label pairs of their pods and the
/// first pair of their selectors.
#[derive(Debug, Default)]
pub struct Neighbourhood {
    /// Each Rollout's slots, sorted: to unlink it, and to leave it be when an event did not move it.
    entries: HashMap<Arc<NameKey>, Box<[Slot]>>,
    /// The Rollouts linked under each slot. Mostly one or two, so vectors (a namespace's slot holds all
    /// of its Rollouts; unlinking from it is a scan, done only on delete or a change of labels or
    /// Services).
    by_slot: HashMap<Slot, Vec<Arc<NameKey>>>,
}

/// A label map's pairs, in key order (none for no map).
fn pairs(labels: Option<&BTreeMap<String, String>>) -> Vec<(&str, &str)> {
    labels
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The labels of a Rollout's pod template.
fn pod_pairs(rollout: &Rollout) -> Vec<(&str, &str)> {
    pairs(
        rollout
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|meta| meta.labels.as_ref()),
    )
}

/// The `matchLabels` pairs of a Rollout's selector, in key order.
fn selector_pairs(rollout: &Rollout) -> Vec<(&str, &str)> {
    pairs(rollout.spec.selector.match_labels.as_ref())
}

/// The slots a Rollout is linked under, sorted and without repeats.
fn slots_of(rollout: &Rollout, ns: &str) -> Box<[Slot]> {
    let mut slots: Vec<Slot> = super::observe::service_names(&rollout.spec.strategy)
        .iter()
        .map(|service| SlotOf::Service(ns, service).slot())
        .collect();
    slots.extend(
        pod_pairs(rollout)
            .into_iter()
            .map(|(key, value)| SlotOf::PodPair(ns, key, value).slot()),
    );
    slots.push(match selector_pairs(rollout).first() {
        Some((key, value)) => SlotOf::SelectorPair(ns, key, value).slot(),
        None => SlotOf::Unindexed(ns).slot(),
    });
    slots.push(SlotOf::Namespace(ns).slot());
    slots.sort_unstable();
    slots.dedup();
    slots.into_boxed_slice()
}

impl Neighbourhood {
    fn linked(&self, slot: Slot) -> &[Arc<NameKey>] {
        self.by_slot
            .get(&slot)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn unlink_entry(&mut self, name: &NameKey) {
        let Some((key, slots)) = self.entries.remove_entry(name) else {
            return;
        };
        for slot in slots.iter() {
            if let Some(names) = self.by_slot.get_mut(slot) {
                names.retain(|linked| !Arc::ptr_eq(linked, &key));
                if names.is_empty() {
                    self.by_slot.remove(slot);
                }
            }
        }
    }

    /// The other Rollouts of `rollout`'s namespace that may collide with it, by name.
    pub fn candidates(&self, rollout: &Rollout) -> BTreeSet<String> {
        let ns = rollout.namespace().unwrap_or_default();
        let mut found: BTreeSet<&Arc<NameKey>> = BTreeSet::new();
        for service in super::observe::service_names(&rollout.spec.strategy) {
            found.extend(self.linked(SlotOf::Service(&ns, &service).slot()));
        }
        let selector = selector_pairs(rollout);
        if selector.is_empty() {
            found.extend(self.linked(SlotOf::Namespace(&ns).slot()));
        } else {
            let rarest = selector
                .into_iter()
                .map(|(key, value)| self.linked(SlotOf::PodPair(&ns, key, value).slot()))
                .min_by_key(|names| names.len());
            found.extend(rarest.into_iter().flatten());
        }
        for (key, value) in pod_pairs(rollout) {
            found.extend(self.linked(SlotOf::SelectorPair(&ns, key, value).slot()));
        }
        found.extend(self.linked(SlotOf::Unindexed(&ns).slot()));
        let own = rollout.name_any();
        found
            .into_iter()
            .filter(|name| name.namespace == ns && name.name != own)
            .map(|name| name.name.clone())
            .collect()
    }
}

impl Index<Rollout> for Neighbourhood {
    fn insert(&mut self, rollout: &Rollout) {
        let name = NameKey::of(rollout);
        let slots = slots_of(rollout, &name.namespace);
        // Most events are status writes, which move nothing here.
        if self.entries.get(&name) == Some(&slots) {
            return;
        }
        self.unlink_entry(&name);
        let key = Arc::new(name);
        for slot in slots.iter() {
            self.by_slot.entry(*slot).or_default().push(key.clone());
        }
        self.entries.insert(key, slots);
    }

    fn remove(&mut self, rollout: &Rollout) {
        self.unlink_entry(&NameKey::of(rollout));
    }
}

/// The neighbourhood index behind a lock, fed by the Rollout watch.
#[derive(Default)]
pub struct NeighbourIndex {
    inner: RwLock<Relisted<Neighbourhood>>,
}

impl NeighbourIndex {
    pub fn new() -> NeighbourIndex {
        NeighbourIndex::default()
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

    /// The names of the other Rollouts of `rollout`'s namespace that may collide with it.
    pub fn candidates(&self, rollout: &Rollout) -> BTreeSet<String> {
        self.inner
            .read()
            .map(|inner| inner.live().candidates(rollout))
            .unwrap_or_default()
    }

    /// How many Rollouts the index holds (for tests of deletion).
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .map(|inner| inner.live().entries.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::validate::selects;
    use serde_json::json;

    fn rollout(
        name: &str,
        selector: serde_json::Value,
        pods: serde_json::Value,
        service: &str,
    ) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "replicas": 1,
                "selector": selector,
                "template": {"metadata": {"labels": pods}, "spec": {"containers": [{"name": "app", "image": "a:1"}]}},
                "strategy": {"blueGreen": {"activeService": service}}
            }
        }))
        .expect("rollout decodes")
    }

    fn index(rollouts: &[Rollout]) -> Neighbourhood {
        let mut index = Neighbourhood::default();
        for rollout in rollouts {
            index.insert(rollout);
        }
        index
    }

    #[test]
    fn candidates_hold_every_rollout_that_collides_and_not_the_unrelated_ones() {
        let web = rollout(
            "web",
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web", "tier": "front"}),
            "web",
        );
        let api = rollout(
            "api",
            json!({"matchLabels": {"app": "api"}}),
            json!({"app": "api", "tier": "front"}),
            "api",
        );
        let shares_service = rollout(
            "shares",
            json!({"matchLabels": {"app": "x"}}),
            json!({"app": "x"}),
            "web",
        );
        let selects_web = rollout(
            "greedy",
            json!({"matchLabels": {"tier": "front"}}),
            json!({"app": "g", "tier": "front"}),
            "g",
        );
        let expressions = rollout(
            "expr",
            json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]}),
            json!({"app": "e"}),
            "e",
        );
        let all = [
            web.clone(),
            api.clone(),
            shares_service,
            selects_web,
            expressions,
        ];
        let index = index(&all);

        let found = index.candidates(&web);
        assert!(found.contains("shares"), "the Service sharer: {found:?}");
        assert!(
            found.contains("greedy"),
            "a selector that selects web's pods: {found:?}"
        );
        assert!(
            found.contains("expr"),
            "a selector that cannot be indexed: {found:?}"
        );
        assert!(
            !found.contains("api"),
            "api neither shares nor overlaps: {found:?}"
        );
        assert!(!found.contains("web"), "never itself");

        // Exhaustive against the exact rule: no collision is ever missed.
        for a in &all {
            let found = index.candidates(a);
            for b in &all {
                let collides = a.name_any() != b.name_any()
                    && (selects(&a.spec.selector, &pod_labels(b))
                        || selects(&b.spec.selector, &pod_labels(a))
                        || super::super::observe::service_names(&a.spec.strategy)
                            .iter()
                            .any(|s| {
                                super::super::observe::service_names(&b.spec.strategy).contains(s)
                            }));
                assert!(
                    !collides || found.contains(&b.name_any()),
                    "{} collides with {} but is not a candidate: {found:?}",
                    a.name_any(),
                    b.name_any()
                );
            }
        }
    }

    fn pod_labels(rollout: &Rollout) -> std::collections::BTreeMap<String, String> {
        pod_pairs(rollout)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_deleted_or_changed_rollout_leaves_nothing_behind() {
        let web = rollout(
            "web",
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web"}),
            "web",
        );
        let other = rollout(
            "other",
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web"}),
            "other",
        );
        let mut index = index(&[web.clone(), other.clone()]);
        assert!(index.candidates(&web).contains("other"));
        let moved = rollout(
            "other",
            json!({"matchLabels": {"app": "o"}}),
            json!({"app": "o"}),
            "other",
        );
        index.insert(&moved);
        assert!(
            !index.candidates(&web).contains("other"),
            "the old labels are unlinked"
        );
        index.remove(&moved);
        index.remove(&web);
        assert!(index.entries.is_empty());
        assert!(index.by_slot.is_empty());
    }
}
