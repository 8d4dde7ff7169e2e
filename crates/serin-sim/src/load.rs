//! Simulated client traffic: a steady stream of virtual requests per entry point, split over ready pods
//! the way Services and routing objects say, answered per pod template and exported as Prometheus metrics.
//!
//! Entry points are every HTTPRoute (gateway.networking.k8s.io/v1), VirtualService (networking.istio.io/v1),
//! non-canary Ingress (networking.k8s.io/v1) and every Service that none of them points at. Routing rules
//! and annotations are described in [`split`] and in `docs/sim.md`.

pub mod apportion;
pub mod response;
pub mod split;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use apportion::{Apportioner, RateAccumulator};
pub use response::{Answer, Responder, ResponseProfile};
pub use split::{split, ClusterSnapshot, EntryPoint, PodRef, Routed, RoutingObject};

/// Buckets of `http_request_duration_seconds`.
pub const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The content type to serve [`TrafficSimulator::metrics_text`] with.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How far back [`TrafficSimulator::recent_share`] can look.
const HISTORY: Duration = Duration::from_secs(120);
/// After a stall (a suspended laptop, a starved runtime) do not fire a burst of requests.
const MAX_TICKS_PER_STEP: u32 = 10;
/// Routing CRDs may be applied long after the simulator starts: retry their watches at this pace.
const WATCH_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// How often requests are sent (and the metrics move).
    pub tick: Duration,
    /// Requests per second per entry point unless its annotation says otherwise.
    pub default_requests_per_second: f64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            tick: Duration::from_millis(100),
            default_requests_per_second: 100.0,
        }
    }
}

/// The labels of one served series; `pod_template_hash` is `"none"` for requests nobody could serve.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct SeriesKey {
    pub namespace: String,
    pub service: String,
    pub pod_template_hash: String,
}

impl SeriesKey {
    pub fn of(pod: &PodRef) -> SeriesKey {
        SeriesKey {
            namespace: pod.namespace.clone(),
            service: pod.service.clone(),
            pod_template_hash: pod.pod_template_hash.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    namespace: String,
    service: String,
    pod_template_hash: String,
    code: String,
}

/// Requests answered with one code by one series since the simulator started.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServedCount {
    pub namespace: String,
    pub service: String,
    pub pod_template_hash: String,
    pub code: u16,
    pub count: u64,
}

/// Requests answered by one series during one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedBatch {
    pub series: SeriesKey,
    /// Requests routed there (mirrored copies excluded).
    pub routed: u64,
    /// Every answer given, mirrored copies included.
    pub answers: Vec<Answer>,
}

#[derive(Debug, Default)]
struct EntryState {
    rate: RateAccumulator,
    requests: Apportioner<PodRef>,
    mirrors: BTreeMap<PodRef, RateAccumulator>,
}

#[derive(Debug, Clone)]
struct EntryPlan {
    entry: EntryPoint,
    requests_per_second: f64,
    routed: Routed,
}

/// The deterministic heart of the simulator: turns elapsed time into answered requests.
#[derive(Debug, Default)]
pub struct TrafficEngine {
    default_requests_per_second: f64,
    plan: Vec<EntryPlan>,
    profiles: HashMap<PodRef, ResponseProfile>,
    entries: HashMap<EntryPoint, EntryState>,
    responders: HashMap<SeriesKey, Responder>,
}

impl TrafficEngine {
    pub fn new(default_requests_per_second: f64) -> TrafficEngine {
        TrafficEngine {
            default_requests_per_second,
            ..Default::default()
        }
    }

    /// Re-reads routing from `snapshot`; accumulators of entry points and pods that remain are kept.
    pub fn set_snapshot(&mut self, snapshot: &ClusterSnapshot) {
        self.plan = snapshot
            .entry_points()
            .into_iter()
            .map(|entry| EntryPlan {
                requests_per_second: snapshot
                    .requests_per_second(&entry, self.default_requests_per_second),
                routed: split(&entry, snapshot),
                entry,
            })
            .collect();
        self.profiles = self
            .plan
            .iter()
            .flat_map(|p| p.routed.requests.iter().chain(&p.routed.mirrors))
            .filter(|(pod, _)| !pod.is_unavailable())
            .map(|(pod, _)| (pod.clone(), snapshot.profile(pod)))
            .collect();
        let live: std::collections::HashSet<&EntryPoint> =
            self.plan.iter().map(|p| &p.entry).collect();
        self.entries.retain(|entry, _| live.contains(entry));
    }

    /// Sends the requests of `elapsed` time through every entry point.
    pub fn tick(&mut self, elapsed: Duration) -> Vec<ServedBatch> {
        let mut routed: BTreeMap<PodRef, (u64, u64)> = BTreeMap::new();
        for plan in &self.plan {
            let state = self.entries.entry(plan.entry.clone()).or_default();
            let sent = state
                .rate
                .take(plan.requests_per_second * elapsed.as_secs_f64());
            for (pod, n) in state.requests.apportion(sent, &plan.routed.requests) {
                routed.entry(pod).or_default().0 += n;
            }
            state
                .mirrors
                .retain(|pod, _| plan.routed.mirrors.iter().any(|(p, _)| p == pod));
            for (pod, fraction) in &plan.routed.mirrors {
                let copies = state
                    .mirrors
                    .entry(pod.clone())
                    .or_default()
                    .take(sent as f64 * fraction);
                routed.entry(pod.clone()).or_default().1 += copies;
            }
        }
        let mut batches: BTreeMap<SeriesKey, ServedBatch> = BTreeMap::new();
        let default_profile = ResponseProfile::default();
        for (pod, (primary, mirrored)) in routed {
            let series = SeriesKey::of(&pod);
            let batch = batches
                .entry(series.clone())
                .or_insert_with(|| ServedBatch {
                    series: series.clone(),
                    routed: 0,
                    answers: Vec::new(),
                });
            batch.routed += primary;
            let total = primary + mirrored;
            if pod.is_unavailable() {
                batch.answers.extend((0..total).map(|_| Answer {
                    code: 503,
                    seconds: 0.0,
                }));
                continue;
            }
            let profile = self.profiles.get(&pod).unwrap_or(&default_profile);
            let responder = self.responders.entry(series).or_default();
            batch
                .answers
                .extend((0..total).map(|_| responder.answer(profile)));
        }
        batches
            .into_values()
            .filter(|b| !b.answers.is_empty())
            .collect()
    }
}

struct TickRecord {
    at: Instant,
    counts: Vec<(u32, u64)>,
}

#[derive(Default)]
struct Ledger {
    totals: BTreeMap<(SeriesKey, u16), u64>,
    series_ids: HashMap<SeriesKey, u32>,
    series: Vec<SeriesKey>,
    history: VecDeque<TickRecord>,
}

impl Ledger {
    fn record(&mut self, at: Instant, batches: &[ServedBatch]) {
        let mut counts = Vec::with_capacity(batches.len());
        for batch in batches {
            for answer in &batch.answers {
                *self
                    .totals
                    .entry((batch.series.clone(), answer.code))
                    .or_default() += 1;
            }
            if batch.routed > 0 {
                let next_id = u32::try_from(self.series.len()).unwrap_or(u32::MAX);
                let id = *self
                    .series_ids
                    .entry(batch.series.clone())
                    .or_insert(next_id);
                if id == next_id {
                    self.series.push(batch.series.clone());
                }
                counts.push((id, batch.routed));
            }
        }
        self.history.push_back(TickRecord { at, counts });
        while self
            .history
            .front()
            .is_some_and(|r| at.duration_since(r.at) > HISTORY)
        {
            self.history.pop_front();
        }
    }

    fn recent_share(
        &self,
        namespace: &str,
        service: &str,
        window: Duration,
        now: Instant,
    ) -> BTreeMap<String, f64> {
        let mut by_hash: BTreeMap<String, u64> = BTreeMap::new();
        for record in self
            .history
            .iter()
            .rev()
            .take_while(|r| now.duration_since(r.at) <= window)
        {
            for (id, count) in &record.counts {
                let Some(series) = self.series.get(*id as usize) else {
                    continue;
                };
                if series.namespace == namespace && series.service == service {
                    *by_hash.entry(series.pod_template_hash.clone()).or_default() += count;
                }
            }
        }
        let total: u64 = by_hash.values().sum();
        by_hash
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(hash, n)| (hash, n as f64 / total as f64))
            .collect()
    }
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<SeriesKey, Histogram, fn() -> Histogram>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<SeriesKey, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register(
            "http_requests",
            "Virtual requests answered by the simulated pods",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Response time of the virtual requests",
            durations.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
        }
    }

    fn record(&self, batches: &[ServedBatch]) {
        for batch in batches {
            let mut by_code: BTreeMap<u16, u64> = BTreeMap::new();
            let histogram = (batch.series.pod_template_hash != "none")
                .then(|| self.durations.get_or_create(&batch.series));
            for answer in &batch.answers {
                *by_code.entry(answer.code).or_default() += 1;
                if let Some(h) = &histogram {
                    h.observe(answer.seconds);
                }
            }
            for (code, n) in by_code {
                let labels = RequestLabels {
                    namespace: batch.series.namespace.clone(),
                    service: batch.series.service.clone(),
                    pod_template_hash: batch.series.pod_template_hash.clone(),
                    code: code.to_string(),
                };
                self.requests.get_or_create(&labels).inc_by(n);
            }
        }
    }
}

struct Shared {
    metrics: Metrics,
    ledger: Mutex<Ledger>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in lock(&self.tasks).iter() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Retries a failed watch (e.g. of a CRD not applied yet) at a steady pace.
struct SteadyRetry;

impl Iterator for SteadyRetry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(WATCH_RETRY)
    }
}

impl Backoff for SteadyRetry {
    fn reset(&mut self) {}
}

fn mirror_store<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    dirty: Arc<AtomicBool>,
) -> impl std::future::Future<Output = ()> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let stream = watcher(api, watcher::Config::default())
        .backoff(SteadyRetry)
        .reflect(writer);
    drive(stream, dirty)
}

async fn drive<S, T, E>(stream: S, dirty: Arc<AtomicBool>)
where
    S: Stream<Item = Result<T, E>> + Send,
{
    stream
        .for_each(|event| {
            if event.is_ok() {
                dirty.store(true, Ordering::Release);
            }
            futures::future::ready(())
        })
        .await;
}

fn dynamic_store(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    dirty: &Arc<AtomicBool>,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let stream = watcher(api, watcher::Config::default())
        .backoff(SteadyRetry)
        .reflect(writer);
    (store, tokio::spawn(drive(stream, dirty.clone())))
}

fn typed_store<K>(client: &Client, dirty: &Arc<AtomicBool>) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    (
        store,
        tokio::spawn(mirror_store(
            Api::<K>::all(client.clone()),
            writer,
            dirty.clone(),
        )),
    )
}

struct Stores {
    pods: Store<Pod>,
    services: Store<Service>,
    ingresses: Store<Ingress>,
    http_routes: Store<DynamicObject>,
    virtual_services: Store<DynamicObject>,
    destination_rules: Store<DynamicObject>,
}

impl Stores {
    fn snapshot(&self) -> ClusterSnapshot {
        let routing = |store: &Store<DynamicObject>| {
            store
                .state()
                .iter()
                .map(|o| RoutingObject::from_dynamic(o))
                .collect::<Vec<_>>()
        };
        let pods = self.pods.state();
        let services = self.services.state();
        let ingresses = self.ingresses.state();
        ClusterSnapshot::new(
            pods.iter().map(|p| p.as_ref()),
            services.iter().map(|s| s.as_ref()),
            ingresses.iter().map(|i| i.as_ref()),
            routing(&self.http_routes),
            routing(&self.virtual_services),
            routing(&self.destination_rules),
        )
    }
}

/// Running traffic simulator; clones share it.
#[derive(Clone)]
pub struct TrafficSimulator {
    shared: Arc<Shared>,
}

impl TrafficSimulator {
    pub fn spawn(client: Client, config: TrafficConfig) -> TrafficSimulator {
        let dirty = Arc::new(AtomicBool::new(true));
        let mut tasks = Vec::new();
        let (pods, task) = typed_store::<Pod>(&client, &dirty);
        tasks.push(task);
        let (services, task) = typed_store::<Service>(&client, &dirty);
        tasks.push(task);
        let (ingresses, task) = typed_store::<Ingress>(&client, &dirty);
        tasks.push(task);
        let (http_routes, task) = dynamic_store(
            &client,
            "gateway.networking.k8s.io",
            "v1",
            "HTTPRoute",
            "httproutes",
            &dirty,
        );
        tasks.push(task);
        let (virtual_services, task) = dynamic_store(
            &client,
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
            &dirty,
        );
        tasks.push(task);
        let (destination_rules, task) = dynamic_store(
            &client,
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "destinationrules",
            &dirty,
        );
        tasks.push(task);
        let stores = Stores {
            pods,
            services,
            ingresses,
            http_routes,
            virtual_services,
            destination_rules,
        };
        let shared = Arc::new(Shared {
            metrics: Metrics::new(),
            ledger: Mutex::default(),
            tasks: Mutex::default(),
        });
        let weak = Arc::downgrade(&shared);
        let tick = config.tick.max(Duration::from_millis(1));
        tasks.push(tokio::spawn(async move {
            let mut engine = TrafficEngine::new(config.default_requests_per_second);
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            loop {
                interval.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if dirty.swap(false, Ordering::AcqRel) {
                    engine.set_snapshot(&stores.snapshot());
                }
                let now = Instant::now();
                let elapsed = now.duration_since(last).min(tick * MAX_TICKS_PER_STEP);
                last = now;
                let batches = engine.tick(elapsed);
                shared.metrics.record(&batches);
                lock(&shared.ledger).record(now, &batches);
            }
        }));
        *lock(&shared.tasks) = tasks;
        TrafficSimulator { shared }
    }

    /// Prometheus text exposition (OpenMetrics flavour) of `http_requests_total` and
    /// `http_request_duration_seconds`.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.shared.metrics.registry)
            .is_err()
        {
            tracing::warn!("encoding traffic metrics failed");
        }
        text
    }

    /// Share of requests each pod-template hash served for the app `service` in `namespace` over the
    /// last `window` (at most two minutes back). Mirrored copies do not count; `"none"` is the share
    /// nobody could serve.
    pub fn recent_share(
        &self,
        namespace: &str,
        service: &str,
        window: Duration,
    ) -> BTreeMap<String, f64> {
        lock(&self.shared.ledger).recent_share(namespace, service, window, Instant::now())
    }

    /// Every (namespace, service, pod_template_hash, code) answered so far, with its count.
    pub fn totals(&self) -> Vec<ServedCount> {
        lock(&self.shared.ledger)
            .totals
            .iter()
            .map(|((series, code), count)| ServedCount {
                namespace: series.namespace.clone(),
                service: series.service.clone(),
                pod_template_hash: series.pod_template_hash.clone(),
                code: *code,
                count: *count,
            })
            .collect()
    }

    pub async fn shutdown(self) {
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, hash: &str, error_rate: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop",
                "labels": {"app.kubernetes.io/name": "web", "serin.dev/pod-template-hash": hash},
                "annotations": {"sim.serin.dev/error-rate": error_rate}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap_or_default()
    }

    fn engine() -> TrafficEngine {
        let pods = vec![
            pod("a", "v1", "0"),
            pod("b", "v1", "0"),
            pod("c", "v1", "0"),
            pod("d", "v2", "0.2"),
        ];
        let services: Vec<Service> = vec![serde_json::from_value(json!({
            "metadata": {"name": "web-svc", "namespace": "shop"}, "spec": {"selector": {"app.kubernetes.io/name": "web"}}
        }))
        .unwrap_or_default()];
        let mut engine = TrafficEngine::new(100.0);
        engine.set_snapshot(&ClusterSnapshot::new(
            &pods,
            &services,
            &[],
            vec![],
            vec![],
            vec![],
        ));
        engine
    }

    #[test]
    fn ticks_send_the_rate_split_exactly_with_exact_errors() {
        let mut engine = engine();
        let mut ledger = Ledger::default();
        let start = Instant::now();
        for i in 0..100u32 {
            let batches = engine.tick(Duration::from_millis(100));
            ledger.record(start + Duration::from_millis(100) * i, &batches);
        }
        let total = |hash: &str, code: u16| {
            ledger
                .totals
                .iter()
                .filter(|((s, c), _)| {
                    s.pod_template_hash == hash && *c == code && s.service == "web"
                })
                .map(|(_, n)| *n)
                .sum::<u64>()
        };
        assert_eq!(total("v1", 200), 750);
        assert_eq!(total("v2", 200) + total("v2", 500), 250);
        assert_eq!(total("v2", 500), 50);
        let share = ledger.recent_share(
            "shop",
            "web",
            Duration::from_secs(60),
            start + Duration::from_secs(10),
        );
        assert!(
            (share["v1"] - 0.75).abs() < 0.01 && (share["v2"] - 0.25).abs() < 0.01,
            "{share:?}"
        );
    }

    #[test]
    fn metrics_carry_the_series_labels_and_buckets() {
        let mut engine = engine();
        let metrics = Metrics::new();
        metrics.record(&engine.tick(Duration::from_secs(1)));
        let mut text = String::new();
        assert!(prometheus_client::encoding::text::encode(&mut text, &metrics.registry).is_ok());
        assert!(text.contains(r#"http_requests_total{namespace="shop",service="web",pod_template_hash="v1",code="200"} 75"#), "{text}");
        assert!(text.contains(r#"http_request_duration_seconds_bucket{le="0.025",namespace="shop",service="web",pod_template_hash="v2"}"#) 
            || text.contains(r#"http_request_duration_seconds_bucket{namespace="shop",service="web",pod_template_hash="v2",le="0.025"}"#), "{text}");
    }
}
