//! The cache-sync gate: a reconcile plans only from watch caches that hold a complete, current list.
//!
//! kube-runtime's `Controller` waits for the cache of the object it reconciles (Rollouts) and nothing else.
//! The planner also reads ReplicaSets, Services and AnalysisRuns from watch caches, and a cache that has not
//! finished its first list looks exactly like a cluster in which those objects do not exist: the planner
//! would answer a missing stable ReplicaSet by creating one or by promoting the canary. So every reconcile
//! asks this gate first. Analysis templates and routing objects are read from the API server at each
//! reconcile (`observe`), so they are always as fresh as the server and need no gate.
//!
//! After a watch restarts with a new list (410 Gone), the reflector keeps serving the old list until the new
//! one is complete and then swaps it in at once; the old list misses whatever changed while the watch was
//! down, so the gate stays closed until the swap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::watcher;

/// A watch cache the planner reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cache {
    Rollouts,
    ReplicaSets,
    Services,
    AnalysisRuns,
}

impl Cache {
    /// Every cache one namespace scope runs.
    pub const ALL: [Cache; 4] = [
        Cache::Rollouts,
        Cache::ReplicaSets,
        Cache::Services,
        Cache::AnalysisRuns,
    ];

    /// The resource's plural name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Cache::Rollouts => "rollouts",
            Cache::ReplicaSets => "replicasets",
            Cache::Services => "services",
            Cache::AnalysisRuns => "analysisruns",
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
}

/// The part of a watcher event that moves a cache's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListEvent {
    /// A (re)list started (`Event::Init`).
    Started,
    /// The list completed and the store now holds it (`Event::InitDone`).
    Done,
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
        (CacheState::Listing, ListEvent::Started) => CacheState::Listing,
        (CacheState::Synced | CacheState::Relisting, ListEvent::Started) => CacheState::Relisting,
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

/// Open only when every cache is synced.
pub fn verdict(states: &BTreeMap<Cache, CacheState>) -> GateVerdict {
    let waiting: Vec<(Cache, CacheState)> = Cache::ALL
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

/// The caches of one namespace scope: fed by their watch streams, asked by every reconcile.
pub struct CacheGate {
    states: Mutex<BTreeMap<Cache, CacheState>>,
    open: tokio::sync::watch::Sender<bool>,
    opened_once: AtomicBool,
    on_first_open: Box<dyn Fn() + Send + Sync>,
}

impl CacheGate {
    /// A gate with every cache still listing; `on_first_open` runs once, when the gate first opens.
    pub fn new(on_first_open: impl Fn() + Send + Sync + 'static) -> CacheGate {
        CacheGate {
            states: Mutex::new(BTreeMap::new()),
            open: tokio::sync::watch::channel(false).0,
            opened_once: AtomicBool::new(false),
            on_first_open: Box::new(on_first_open),
        }
    }

    /// Records a watcher event of `cache` (call it after the reflector stored the event).
    pub fn observe<K>(&self, cache: Cache, event: &watcher::Event<K>) {
        let Some(event) = list_event(event) else {
            return;
        };
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let before = states.get(&cache).copied().unwrap_or(CacheState::Listing);
        let after = next_state(before, event);
        states.insert(cache, after);
        let verdict = verdict(&states);
        drop(states);
        if before != after {
            tracing::debug!(cache = cache.name(), from = ?before, to = ?after, "watch cache state");
        }
        let open = verdict.is_open();
        self.open.send_if_modified(|current| {
            let changed = *current != open;
            *current = open;
            changed
        });
        if open && !self.opened_once.swap(true, Ordering::AcqRel) {
            (self.on_first_open)();
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

    /// Whether a reconcile may plan now, and if not, which caches it waits for.
    pub fn verdict(&self) -> GateVerdict {
        match self.states.lock() {
            Ok(states) => verdict(&states),
            Err(_) => GateVerdict::Closed {
                waiting: Cache::ALL
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
    }

    #[test]
    fn the_gate_opens_only_when_every_cache_listed_and_calls_back_once() {
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        let gate = CacheGate::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            gate.verdict(),
            GateVerdict::Closed {
                waiting: Cache::ALL
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
