//! Publishes Kubernetes Events (events.k8s.io/v1) about Serin's objects; a repeat of a recent identical
//! event is patched into a series on the first one instead of creating another object.
//!
//! Written here rather than using kube-runtime's `Recorder`: that recorder keeps every event it published,
//! whole, for six minutes and scans all of them on each publish. At ten thousand Rollouts one update wave
//! publishes tens of thousands of events, so it held tens of MiB and made each publish linear in the
//! number of recent events. This publisher remembers a bounded number of recent events, and of each only
//! what a series patch needs. Unlike that recorder it also tells events apart by their note: a Rollout's
//! step messages are each an event of their own, not a count on the first one's text.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// How long a published event can still be continued as a series.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// How many recent events are remembered for series at most, whatever the window says.
pub const REMEMBERED: usize = 4_096;

/// Whether an event reports something normal or something a human should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    Normal,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        }
    }
}

/// One event about one object.
#[derive(Clone, Debug)]
pub struct Note<'a> {
    pub severity: Severity,
    /// A reason constant (`crd::reason`), also used as the event's action.
    pub reason: &'a str,
    pub message: &'a str,
}

/// What is remembered of a published event: enough to continue it as a series.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub name: String,
    pub count: i32,
}

/// What to do for an event: create a new object, or patch the series of an earlier one.
#[derive(Clone, Debug, PartialEq)]
pub enum Publication {
    Create,
    Continue(Published),
}

/// The recent events, bounded by count and by age; pure, so the bounds are tested without a cluster.
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    window: Duration,
    entries: HashMap<u64, (Published, Instant, u64)>,
    order: VecDeque<(u64, u64)>,
    sequence: u64,
}

impl Recent {
    pub fn new(capacity: usize, window: Duration) -> Recent {
        Recent {
            capacity,
            window,
            entries: HashMap::new(),
            order: VecDeque::new(),
            sequence: 0,
        }
    }

    /// How many events are remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the event with `key` continues a remembered one, forgetting what is too old first.
    pub fn lookup(&mut self, key: u64, now: Instant) -> Publication {
        self.forget_older_than(now);
        match self.entries.get(&key) {
            Some((published, _, _)) => Publication::Continue(Published {
                name: published.name.clone(),
                count: published.count.saturating_add(1),
            }),
            None => Publication::Create,
        }
    }

    /// Remembers what was published for `key` (a new event or a series that now has `count`).
    pub fn remember(&mut self, key: u64, published: Published, now: Instant) {
        let first_seen = match self.entries.get(&key) {
            Some((before, first_seen, _)) if before.name == published.name => *first_seen,
            _ => now,
        };
        self.sequence += 1;
        self.entries
            .insert(key, (published, first_seen, self.sequence));
        self.order.push_back((key, self.sequence));
        self.forget_older_than(now);
    }

    fn forget_older_than(&mut self, now: Instant) {
        while let Some(&(key, sequence)) = self.order.front() {
            let current = self.entries.get(&key).filter(|(_, _, s)| *s == sequence);
            let expired = match current {
                // A series lives as long as the window from its first event, as kube's recorder does.
                Some((_, first_seen, _)) => {
                    now.saturating_duration_since(*first_seen) >= self.window
                }
                // Superseded by a later remember of the same key, or forgotten.
                None => true,
            };
            if !expired && self.entries.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            if current.is_some() {
                self.entries.remove(&key);
            }
        }
        // An event repeated again and again leaves its earlier places in the order behind a live one.
        if self.order.len() > 2 * self.capacity.max(1) {
            let entries = &self.entries;
            self.order
                .retain(|(key, sequence)| entries.get(key).is_some_and(|(_, _, s)| s == sequence));
        }
    }
}

/// The identity of an event for series: the object it regards, its severity, reason and note.
pub fn key(reference: &ObjectReference, note: &Note<'_>) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        &reference.namespace,
        &reference.kind,
        &reference.name,
        &reference.uid,
    )
        .hash(&mut hasher);
    (note.severity, note.reason, note.message).hash(&mut hasher);
    hasher.finish()
}

/// Publishes events as one reporting controller instance.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Arc<Mutex<Recent>>,
}

impl Publisher {
    /// A publisher reporting as `controller` (and `instance`, the controller's name when None).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Publisher {
        Publisher {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            recent: Arc::new(Mutex::new(Recent::new(REMEMBERED, SERIES_WINDOW))),
        }
    }

    /// Publishes `note` about the object `reference` names, in that object's namespace.
    pub async fn publish(
        &self,
        note: &Note<'_>,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = key(reference, note);
        let now = Instant::now();
        let publication = match self.recent.lock() {
            Ok(mut recent) => recent.lookup(key, now),
            Err(_) => Publication::Create,
        };
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let published = match publication {
            Publication::Continue(series) => match self.continue_series(&events, &series).await {
                Ok(()) => series,
                // The first event is gone (an event's time to live is an hour on a real cluster).
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    self.create(&events, note, reference).await?
                }
                Err(error) => return Err(error),
            },
            Publication::Create => self.create(&events, note, reference).await?,
        };
        if let Ok(mut recent) = self.recent.lock() {
            recent.remember(key, published, Instant::now());
        }
        Ok(())
    }

    async fn continue_series(
        &self,
        events: &Api<K8sEvent>,
        series: &Published,
    ) -> Result<(), kube::Error> {
        let patch = json!({
            "series": {
                "count": series.count,
                "lastObservedTime": MicroTime(Timestamp::now()),
            }
        });
        events
            .patch(&series.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    async fn create(
        &self,
        events: &Api<K8sEvent>,
        note: &Note<'_>,
        reference: &ObjectReference,
    ) -> Result<Published, kube::Error> {
        let event = self.event(note, reference, Timestamp::now());
        let name = event.metadata.name.clone().unwrap_or_default();
        events.create(&PostParams::default(), &event).await?;
        Ok(Published { name, count: 1 })
    }

    fn event(&self, note: &Note<'_>, reference: &ObjectReference, now: Timestamp) -> K8sEvent {
        let regarding = reference.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!("{regarding}.{:x}", now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            action: Some(note.reason.to_string()),
            reason: Some(note.reason.to_string()),
            note: Some(note.message.to_string()),
            type_: Some(note.severity.as_str().to_string()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            series: None::<EventSeries>,
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Rollout".into()),
            namespace: Some("shop".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        }
    }

    fn note(message: &str) -> Note<'_> {
        Note {
            severity: Severity::Normal,
            reason: "Progressing",
            message,
        }
    }

    fn published(name: &str, count: i32) -> Published {
        Published {
            name: name.into(),
            count,
        }
    }

    #[test]
    fn a_repeat_continues_the_series_and_counts_up() {
        let mut recent = Recent::new(8, SERIES_WINDOW);
        let t0 = Instant::now();
        let key = key(&reference("web"), &note("step 1"));
        assert_eq!(recent.lookup(key, t0), Publication::Create);
        recent.remember(key, published("web.1", 1), t0);
        assert_eq!(
            recent.lookup(key, t0 + Duration::from_secs(1)),
            Publication::Continue(published("web.1", 2))
        );
        recent.remember(key, published("web.1", 2), t0 + Duration::from_secs(1));
        assert_eq!(
            recent.lookup(key, t0 + Duration::from_secs(2)),
            Publication::Continue(published("web.1", 3))
        );
    }

    #[test]
    fn another_note_reason_or_object_is_another_event() {
        let first = key(&reference("web"), &note("step 1"));
        assert_ne!(first, key(&reference("web"), &note("step 2")));
        assert_ne!(first, key(&reference("api"), &note("step 1")));
        let warning = Note {
            severity: Severity::Warning,
            ..note("step 1")
        };
        assert_ne!(first, key(&reference("web"), &warning));
        let other_reason = Note {
            reason: "Paused",
            ..note("step 1")
        };
        assert_ne!(first, key(&reference("web"), &other_reason));
    }

    #[test]
    fn a_series_ends_with_its_window() {
        let mut recent = Recent::new(8, Duration::from_secs(60));
        let t0 = Instant::now();
        recent.remember(1, published("web.1", 1), t0);
        recent.remember(1, published("web.1", 2), t0 + Duration::from_secs(50));
        assert_eq!(
            recent.lookup(1, t0 + Duration::from_secs(61)),
            Publication::Create
        );
        assert!(recent.is_empty());
    }

    #[test]
    fn memory_stays_bounded_by_count_and_keeps_the_newest() {
        let mut recent = Recent::new(100, SERIES_WINDOW);
        let t0 = Instant::now();
        for key in 0..10_000u64 {
            recent.remember(key, published(&format!("e.{key}"), 1), t0);
            // The same event repeated many times takes one entry.
            recent.remember(7, published("e.7", 2), t0);
        }
        assert!(recent.len() <= 100, "{} remembered", recent.len());
        assert!(recent.order.len() <= 2 * 100 + 2, "{}", recent.order.len());
        assert_eq!(
            recent.lookup(9_999, t0),
            Publication::Continue(published("e.9999", 2))
        );
        assert_eq!(recent.lookup(0, t0), Publication::Create);
    }
}
