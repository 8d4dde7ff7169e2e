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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::runtime::watcher;
use kube::ResourceExt;

use super::index::{Index, NameKey, Relisted};
use crate::crd::Rollout;

/// A label pair within a namespace.
type PairKey = (String, String, String);

/// What the index keeps of one Rollout, to unlink it again.
#[derive(Debug, Default)]
struct Entry {
    services: Vec<String>,
    pod_pairs: Vec<(String, String)>,
    selector_pair: Option<(String, String)>,
}

/// The Rollouts of every namespace by the Services they name, the label pairs of their pods and the
/// first pair of their selectors.
#[derive(Debug, Default)]
pub struct Neighbourhood {
    entries: HashMap<NameKey, Entry>,
    by_service: HashMap<(String, String), HashSet<NameKey>>,
    by_pod_pair: HashMap<PairKey, HashSet<NameKey>>,
    by_selector_pair: HashMap<PairKey, HashSet<NameKey>>,
    /// Rollouts whose selector has no `matchLabels`, by namespace.
    unindexed_selectors: HashMap<String, HashSet<NameKey>>,
    /// Every Rollout, by namespace: the candidates of a selector without `matchLabels`.
    by_namespace: HashMap<String, HashSet<NameKey>>,
}

fn link<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<NameKey>>, key: K, name: &NameKey) {
    map.entry(key).or_default().insert(name.clone());
}

fn unlink<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<NameKey>>, key: K, name: &NameKey) {
    if let Some(names) = map.get_mut(&key) {
        names.remove(name);
        if names.is_empty() {
            map.remove(&key);
        }
    }
}

/// The labels of a Rollout's pod template.
fn pod_pairs(rollout: &Rollout) -> Vec<(String, String)> {
    rollout
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.as_ref())
        .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// The `matchLabels` pairs of a Rollout's selector, in key order.
fn selector_pairs(rollout: &Rollout) -> Vec<(String, String)> {
    rollout
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

impl Neighbourhood {
    fn unlink_entry(&mut self, name: &NameKey) {
        let Some(entry) = self.entries.remove(name) else {
            return;
        };
        let ns = &name.namespace;
        for service in entry.services {
            unlink(&mut self.by_service, (ns.clone(), service), name);
        }
        for (key, value) in entry.pod_pairs {
            unlink(&mut self.by_pod_pair, (ns.clone(), key, value), name);
        }
        match entry.selector_pair {
            Some((key, value)) => {
                unlink(&mut self.by_selector_pair, (ns.clone(), key, value), name)
            }
            None => unlink(&mut self.unindexed_selectors, ns.clone(), name),
        }
        unlink(&mut self.by_namespace, ns.clone(), name);
    }

    /// The other Rollouts of `rollout`'s namespace that may collide with it, by name.
    pub fn candidates(&self, rollout: &Rollout) -> BTreeSet<String> {
        let ns = rollout.namespace().unwrap_or_default();
        let mut found: BTreeSet<&NameKey> = BTreeSet::new();
        for service in super::observe::service_names(&rollout.spec.strategy) {
            found.extend(
                self.by_service
                    .get(&(ns.clone(), service))
                    .into_iter()
                    .flatten(),
            );
        }
        let selector = selector_pairs(rollout);
        if selector.is_empty() {
            found.extend(self.by_namespace.get(&ns).into_iter().flatten());
        } else {
            let rarest = selector
                .into_iter()
                .filter_map(|(key, value)| self.by_pod_pair.get(&(ns.clone(), key, value)))
                .min_by_key(|names| names.len());
            found.extend(rarest.into_iter().flatten());
        }
        for (key, value) in pod_pairs(rollout) {
            found.extend(
                self.by_selector_pair
                    .get(&(ns.clone(), key, value))
                    .into_iter()
                    .flatten(),
            );
        }
        found.extend(self.unindexed_selectors.get(&ns).into_iter().flatten());
        let own = rollout.name_any();
        found
            .into_iter()
            .filter(|name| name.name != own)
            .map(|name| name.name.clone())
            .collect()
    }
}

impl Index<Rollout> for Neighbourhood {
    fn insert(&mut self, rollout: &Rollout) {
        let name = NameKey::of(rollout);
        self.unlink_entry(&name);
        let ns = name.namespace.clone();
        let entry = Entry {
            services: super::observe::service_names(&rollout.spec.strategy),
            pod_pairs: pod_pairs(rollout),
            selector_pair: selector_pairs(rollout).into_iter().next(),
        };
        for service in &entry.services {
            link(&mut self.by_service, (ns.clone(), service.clone()), &name);
        }
        for (key, value) in &entry.pod_pairs {
            link(
                &mut self.by_pod_pair,
                (ns.clone(), key.clone(), value.clone()),
                &name,
            );
        }
        match &entry.selector_pair {
            Some((key, value)) => link(
                &mut self.by_selector_pair,
                (ns.clone(), key.clone(), value.clone()),
                &name,
            ),
            None => link(&mut self.unindexed_selectors, ns.clone(), &name),
        }
        link(&mut self.by_namespace, ns, &name);
        self.entries.insert(name, entry);
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
        pod_pairs(rollout).into_iter().collect()
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
        assert!(index.by_service.is_empty() && index.by_pod_pair.is_empty());
        assert!(index.by_selector_pair.is_empty() && index.by_namespace.is_empty());
        assert!(index.unindexed_selectors.is_empty());
    }
}
