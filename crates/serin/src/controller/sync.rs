//! The cache-sync gate: a reconcile plans only from watch caches that hold a complete, current list.
//!
//! kube-runtime's `Controller` waits for the cache of the object it reconciles (Rollouts) and nothing else.
//! The planner also reads ReplicaSets, Services and AnalysisRuns from watch caches, and a cache that has not
//! finished its first list looks exactly like a cluster in which those objects do not exist: the planner
//! would answer a missing stable ReplicaSet by creating one or by promoting the canary. So every reconcile
//! asks this gate first. Analysis templates are read from the API server at each reconcile (`observe`), so
//! they are always as fresh as the server and need no gate.
//!
//! The routing objects (HTTPRoutes, VirtualServices, DestinationRules, Ingresses) are watched too, but
//! their resources may not be served at all (a CRD that is not installed) or not be readable in bulk, so
//! they do not hold planning back: a reconcile reads them from their cache only while the gate says that
//! cache is synced, and from the API server otherwise. A route cache whose list fails is `Unavailable`
//! (logged once, with the reason) until a retried list succeeds, which is how a CRD installed later is
//! picked up. The controller reports ready once every cache has answered: synced, or for a route cache
//! unavailable.
//!
//! After a watch restarts with a new list (410 Gone), the cache keeps serving the old list until the new
//! one is complete and then swaps it in at once; the old list misses whatever changed while the watch was
//! down, so the gate stays closed (and a route cache is not read) until the swap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::watcher;

use crate::traffic::RoutingKind;

/// A watch cache the planner reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cache {
    Rollouts,
    ReplicaSets,
    Services,
    AnalysisRuns,
    HttpRoutes,
    VirtualServices,
    DestinationRules,
    Ingresses,
}

impl Cache {
    /// The caches no reconcile plans without.
    pub const REQUIRED: [Cache; 4] = [
        Cache::Rollouts,
        Cache::ReplicaSets,
        Cache::Services,
        Cache::AnalysisRuns,
    ];

    /// The routing objects' caches, read only while synced.
    pub const ROUTES: [Cache; 4] = [
        Cache::HttpRoutes,
        Cache::VirtualServices,
        Cache::DestinationRules,
        Cache::Ingresses,
    ];

    /// The resource's plural name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Cache::Rollouts => "rollouts",
            Cache::ReplicaSets => "replicasets",
            Cache::Services => "services",
            Cache::AnalysisRuns => "analysisruns",
            Cache::HttpRoutes => "httproutes",
            Cache::VirtualServices => "virtualservices",
            Cache::DestinationRules => "destinationrules",
            Cache::Ingresses => "ingresses",
        }
    }

    /// The cache that holds objects of a routing kind.
    pub fn of_routing(kind: RoutingKind) -> Cache {
        match kind {
            RoutingKind::HttpRoute => Cache::HttpRoutes,
            RoutingKind::VirtualService => Cache::VirtualServices,
            RoutingKind::DestinationRule => Cache::DestinationRules,
            RoutingKind::Ingress => Cache::Ingresses,
            RoutingKind::Service => Cache::Services,
        }
    }
}

/// Where a watch cache is in its list-then-watch cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    /// The first list has not completed: the cache is empty.
    Listing,
    /// A complete list was stored and the watch keeps it current.
    Synced,
    /// The watch restarted and a new list is being read; the cache still holds the old one.
    Relisting,
    /// The first list failed (the resource is not served, or not readable): the cache holds nothing and its
    /// watch retries.
    Unavailable,
}

/// The part of a watcher event that moves a cache's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListEvent {
    /// A (re)list started (`Event::Init`).
    Started,
    /// The list completed and the store now holds it (`Event::InitDone`).
    Done,
    /// The watch answered an error (a list that failed, among others).
    Failed,
}

/// The list event a watcher event carries, if any (applies and deletes move nothing).
pub fn list_event<K>(event: &watcher::Event<K>) -> Option<ListEvent> {
    match event {
        watcher::Event::Init => Some(ListEvent::Started),
        watcher::Event::InitDone => Some(ListEvent::Done),
        watcher::Event::InitApply(_) | watcher::Event::Apply(_) | watcher::Event::Delete(_) => None,
    }
}

/// A cache's state after `event`.
pub fn next_state(state: CacheState, event: ListEvent) -> CacheState {
    match (state, event) {
        (_, ListEvent::Done) => CacheState::Synced,
        (CacheState::Listing | CacheState::Unavailable, ListEvent::Started) => CacheState::Listing,
        (CacheState::Synced | CacheState::Relisting, ListEvent::Started) => CacheState::Relisting,
        // Only a cache that never listed is unavailable: a synced one keeps its list while its watch
        // resumes, a relisting one keeps the old list until the new one is complete.
        (CacheState::Listing | CacheState::Unavailable, ListEvent::Failed) => {
            CacheState::Unavailable
        }
        (state @ (CacheState::Synced | CacheState::Relisting), ListEvent::Failed) => state,
    }
}

/// Why a watch failed, in words for the log.
pub fn failure_reason(error: &watcher::Error) -> String {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    match status {
        Some(404) => "the resource is not served by the API server (is its CRD installed?)".into(),
        Some(403) => "listing it is forbidden (RBAC)".into(),
        _ => error.to_string(),
    }
}

/// Whether a reconcile may plan now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateVerdict {
    Open,
    /// These caches are not complete and current.
    Closed {
        waiting: Vec<(Cache, CacheState)>,
    },
}

impl GateVerdict {
    pub fn is_open(&self) -> bool {
        matches!(self, GateVerdict::Open)
    }
}

/// Open only when every required cache is synced.
pub fn verdict(states: &BTreeMap<Cache, CacheState>) -> GateVerdict {
    let waiting: Vec<(Cache, CacheState)> = Cache::REQUIRED
        .iter()
        .map(|cache| {
            (
                *cache,
                states.get(cache).copied().unwrap_or(CacheState::Listing),
            )
        })
        .filter(|(_, state)| *state != CacheState::Synced)
        .collect();
    if waiting.is_empty() {
        GateVerdict::Open
    } else {
        GateVerdict::Closed { waiting }
    }
}

/// Whether every cache has answered: the required ones synced, the route caches synced or unavailable.
pub fn answered(states: &BTreeMap<Cache, CacheState>) -> bool {
    let state = |cache: &Cache| states.get(cache).copied().unwrap_or(CacheState::Listing);
    verdict(states).is_open()
        && Cache::ROUTES
            .iter()
            .all(|cache| matches!(state(cache), CacheState::Synced | CacheState::Unavailable))
}

/// The caches of one namespace scope: fed by their watch streams, asked by every reconcile.
pub struct CacheGate {
    states: Mutex<BTreeMap<Cache, CacheState>>,
    open: tokio::sync::watch::Sender<bool>,
    answered_once: AtomicBool,
    on_answered: Box<dyn Fn() + Send + Sync>,
    /// Why each cache whose lists fail cannot list, until one succeeds.
    failures: Mutex<BTreeMap<Cache, String>>,
}

impl CacheGate {
    /// A gate with every cache still listing; `on_answered` runs once, when every cache has first answered
    /// (see [`answered`]).
    pub fn new(on_answered: impl Fn() + Send + Sync + 'static) -> CacheGate {
        CacheGate {
            states: Mutex::new(BTreeMap::new()),
            open: tokio::sync::watch::channel(false).0,
            answered_once: AtomicBool::new(false),
            on_answered: Box::new(on_answered),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a watcher event of `cache` (call it after the cache stored the event).
    pub fn observe<K>(&self, cache: Cache, event: &watcher::Event<K>) {
        if let Some(event) = list_event(event) {
            self.moved(cache, event);
        }
    }

    /// Records an error of the watch of `cache`.
    pub fn failed(&self, cache: Cache, error: &watcher::Error) {
        let before = self.state(cache);
        self.moved(cache, ListEvent::Failed);
        if self.state(cache) != CacheState::Unavailable {
            return;
        }
        let reason = failure_reason(error);
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        // Once per cache until it lists, not at every retry.
        if before != CacheState::Unavailable && !failures.contains_key(&cache) {
            tracing::warn!(
                cache = cache.name(),
                reason = %reason,
                "cannot list this resource: objects of it are read from the API server until a retried list succeeds"
            );
        }
        failures.insert(cache, reason);
    }

    /// Why `cache` cannot list, while its lists fail.
    pub fn unavailable_reason(&self, cache: Cache) -> Option<String> {
        self.failures.lock().ok()?.get(&cache).cloned()
    }

    /// The state of one cache.
    pub fn state(&self, cache: Cache) -> CacheState {
        self.states
            .lock()
            .ok()
            .and_then(|states| states.get(&cache).copied())
            .unwrap_or(CacheState::Listing)
    }

    /// Whether `cache` holds a complete, current list.
    pub fn synced(&self, cache: Cache) -> bool {
        self.state(cache) == CacheState::Synced
    }

    fn moved(&self, cache: Cache, event: ListEvent) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let before = states.get(&cache).copied().unwrap_or(CacheState::Listing);
        let after = next_state(before, event);
        states.insert(cache, after);
        let verdict = verdict(&states);
        let answered = answered(&states);
        drop(states);
        if after == CacheState::Synced {
            if let Ok(mut failures) = self.failures.lock() {
                failures.remove(&cache);
            }
        }
        if before != after {
            tracing::debug!(cache = cache.name(), from = ?before, to = ?after, "watch cache state");
        }
        let open = verdict.is_open();
        self.open.send_if_modified(|current| {
            let changed = *current != open;
            *current = open;
            changed
        });
        if answered && !self.answered_once.swap(true, Ordering::AcqRel) {
            (self.on_answered)();
        }
    }

    /// A closure for `inspect_ok` on a watch stream of `cache`.
    pub fn tracker<K: 'static>(
        self: &std::sync::Arc<Self>,
        cache: Cache,
    ) -> impl FnMut(&watcher::Event<K>) + Send + 'static {
        let gate = self.clone();
        move |event| gate.observe(cache, event)
    }

    /// A closure for `inspect_err` on a watch stream of `cache`.
    pub fn failure_tracker(
        self: &std::sync::Arc<Self>,
        cache: Cache,
    ) -> impl FnMut(&watcher::Error) + Send + 'static {
        let gate = self.clone();
        move |error| gate.failed(cache, error)
    }

    /// Whether a reconcile may plan now, and if not, which caches it waits for.
    pub fn verdict(&self) -> GateVerdict {
        match self.states.lock() {
            Ok(states) => verdict(&states),
            Err(_) => GateVerdict::Closed {
                waiting: Cache::REQUIRED
                    .iter()
                    .map(|cache| (*cache, CacheState::Listing))
                    .collect(),
            },
        }
    }

    /// Waits at most `limit` for the gate to be open; returns the verdict at the end of the wait.
    pub async fn wait_open(&self, limit: Duration) -> GateVerdict {
        let mut open = self.open.subscribe();
        // The channel only says when to look again; the verdict itself is read from the states.
        let _ = tokio::time::timeout(limit, open.wait_for(|open| *open)).await;
        self.verdict()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn feed(gate: &CacheGate, cache: Cache, events: &[watcher::Event<()>]) {
        for event in events {
            gate.observe(cache, event);
        }
    }

    fn list() -> Vec<watcher::Event<()>> {
        vec![
            watcher::Event::Init,
            watcher::Event::InitApply(()),
            watcher::Event::InitDone,
        ]
    }

    #[test]
    fn states_follow_list_and_relist() {
        use CacheState::*;
        use ListEvent::*;
        assert_eq!(next_state(Listing, Started), Listing);
        assert_eq!(next_state(Listing, Done), Synced);
        assert_eq!(next_state(Synced, Started), Relisting);
        assert_eq!(next_state(Relisting, Started), Relisting);
        assert_eq!(next_state(Relisting, Done), Synced);
        assert_eq!(list_event(&watcher::Event::Apply(())), None);
        assert_eq!(list_event(&watcher::Event::Delete(())), None);
        assert_eq!(list_event(&watcher::Event::InitApply(())), None);
        // A failed list leaves a cache that never listed unavailable until a list succeeds; a cache that
        // holds a list keeps it.
        assert_eq!(next_state(Listing, Failed), Unavailable);
        assert_eq!(next_state(Unavailable, Failed), Unavailable);
        assert_eq!(next_state(Unavailable, Started), Listing);
        assert_eq!(next_state(Unavailable, Done), Synced);
        assert_eq!(next_state(Synced, Failed), Synced);
        assert_eq!(next_state(Relisting, Failed), Relisting);
    }

    fn not_served() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(
            kube::core::Status::failure(
                "the server could not find the requested resource",
                "NotFound",
            )
            .with_code(404)
            .boxed(),
        ))
    }

    #[test]
    fn route_caches_never_hold_planning_back_and_are_read_only_when_synced() {
        let gate = CacheGate::new(|| {});
        for cache in Cache::REQUIRED {
            feed(&gate, cache, &list());
        }
        assert!(gate.verdict().is_open(), "route caches still listing");
        assert!(!gate.synced(Cache::HttpRoutes));
        feed(&gate, Cache::HttpRoutes, &[watcher::Event::Init]);
        gate.failed(Cache::HttpRoutes, &not_served());
        assert_eq!(gate.state(Cache::HttpRoutes), CacheState::Unavailable);
        assert!(gate.verdict().is_open());
        // Retried: listing again, still unavailable for the same reason until a list succeeds.
        feed(&gate, Cache::HttpRoutes, &[watcher::Event::Init]);
        assert!(gate
            .unavailable_reason(Cache::HttpRoutes)
            .is_some_and(|reason| reason.contains("not served")));
        // The CRD is installed: the retried list succeeds.
        feed(&gate, Cache::HttpRoutes, &list());
        assert!(gate.synced(Cache::HttpRoutes));
        assert_eq!(gate.unavailable_reason(Cache::HttpRoutes), None);
        assert!(failure_reason(&not_served()).contains("CRD"));
    }

    #[test]
    fn the_gate_opens_when_every_required_cache_listed_and_calls_back_once_all_answered() {
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        let gate = CacheGate::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            gate.verdict(),
            GateVerdict::Closed {
                waiting: Cache::REQUIRED
                    .iter()
                    .map(|c| (*c, CacheState::Listing))
                    .collect()
            }
        );
        // The Rollout cache alone (all kube-runtime waits for) is not enough.
        feed(&gate, Cache::Rollouts, &list());
        feed(&gate, Cache::Services, &list());
        feed(&gate, Cache::AnalysisRuns, &list());
        feed(
            &gate,
            Cache::ReplicaSets,
            &[watcher::Event::Init, watcher::Event::InitApply(())],
        );
        assert_eq!(
            gate.verdict(),
            GateVerdict::Closed {
                waiting: vec![(Cache::ReplicaSets, CacheState::Listing)]
            }
        );
        assert_eq!(opened.load(Ordering::SeqCst), 0);
        feed(&gate, Cache::ReplicaSets, &[watcher::Event::InitDone]);
        assert_eq!(gate.verdict(), GateVerdict::Open);
        // Ready once the route caches answered too: listed, or unavailable (their CRD is missing).
        assert_eq!(opened.load(Ordering::SeqCst), 0);
        for cache in [Cache::HttpRoutes, Cache::VirtualServices, Cache::Ingresses] {
            feed(&gate, cache, &list());
        }
        assert_eq!(opened.load(Ordering::SeqCst), 0);
        feed(&gate, Cache::DestinationRules, &[watcher::Event::Init]);
        gate.failed(Cache::DestinationRules, &not_served());
        assert_eq!(opened.load(Ordering::SeqCst), 1);

        // A relist closes it again until the new list is in; the first-open callback does not run again.
        feed(&gate, Cache::ReplicaSets, &[watcher::Event::Init]);
        assert_eq!(
            gate.verdict(),
            GateVerdict::Closed {
                waiting: vec![(Cache::ReplicaSets, CacheState::Relisting)]
            }
        );
        feed(&gate, Cache::ReplicaSets, &[watcher::Event::Apply(())]);
        assert!(!gate.verdict().is_open());
        feed(&gate, Cache::ReplicaSets, &[watcher::Event::InitDone]);
        assert!(gate.verdict().is_open());
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn waiting_ends_when_the_gate_opens_or_the_limit_passes() {
        let gate = Arc::new(CacheGate::new(|| {}));
        let closed = gate.wait_open(Duration::from_millis(20)).await;
        assert!(!closed.is_open());
        for cache in [Cache::Rollouts, Cache::Services, Cache::AnalysisRuns] {
            feed(&gate, cache, &list());
        }
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_open(Duration::from_secs(30)).await })
        };
        feed(&gate, Cache::ReplicaSets, &list());
        let opened = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes when the gate opens")
            .expect("waiter task");
        assert!(opened.is_open());
    }
}
