//! Controller benchmarks against the simulated cluster (not timed tests; numbers go to
//! docs/benchmarks/controller.md):
//! 1. time from a Rollout change to the controller's first write (p50, p99),
//! 2. API requests and writes per canary step,
//! 3. what settled Rollouts routed through HTTPRoutes cost at idle (`SERIN_BENCH_ROUTED`, default 200):
//!    reconciles, route reads and writes over 20 s,
//! 4. the cost of a reconcile over many settled Rollouts (`SERIN_BENCH_ROLLOUTS`, default 1000): a fresh
//!    controller's first pass, then a resync pass (mean duration and CPU time per reconcile).
//!
//! `SERIN_BENCH_PARTS` (latency, writes, routes, reconciles; comma-separated) runs only some parts;
//! `SERIN_BENCH_VERBOSE` lists every write of the canary measured in part 2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use serin::controller::status_write::PROGRESS_WRITE_INTERVAL;
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::{Rollout, RolloutPhase};
use serin_sim::workload::WorkloadConfig;
use serin_sim::{RequestRecord, SimCluster, SimConfig};

const NS: &str = "default";
const CONTROLLER: &str = "serin-controller";

fn rollout(name: &str, replicas: i32, image: &str, steps: Value) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": image}]}},
            "strategy": {"canary": {"stableService": name, "canaryService": format!("{name}-canary"), "steps": steps}}
        }
    })
}

async fn create_rollout(admin: &Client, name: &str, replicas: i32, steps: Value) {
    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    for service in [name.to_string(), format!("{name}-canary")] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": service, "namespace": NS},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}
        }))
        .expect("valid service");
        services
            .create(&PostParams::default(), &svc)
            .await
            .expect("service");
    }
    let rollouts: Api<Rollout> = Api::namespaced(admin.clone(), NS);
    let object: Rollout =
        serde_json::from_value(rollout(name, replicas, "app:1", steps)).expect("valid rollout");
    rollouts
        .create(&PostParams::default(), &object)
        .await
        .expect("rollout");
}

async fn wait_all_healthy(admin: &Client, expected: usize, timeout: Duration) -> bool {
    let rollouts: Api<Rollout> = Api::namespaced(admin.clone(), NS);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let list = rollouts.list(&ListParams::default()).await.expect("list");
        let healthy = list
            .items
            .iter()
            .filter(|r| {
                let status = r.status.as_ref();
                status.and_then(|s| s.phase) == Some(RolloutPhase::Healthy)
                    && status.and_then(|s| s.observed_generation) == r.metadata.generation
            })
            .count();
        if healthy >= expected {
            return true;
        }
        if Instant::now() + Duration::from_millis(60) >= deadline {
            for r in list.items.iter().take(3) {
                eprintln!("not healthy: {:?} {:?}", r.metadata.generation, r.status);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Cluster {
    sim: SimCluster,
    admin: Client,
}

async fn cluster() -> Cluster {
    let sim = SimCluster::start(SimConfig {
        request_log_capacity: 2_000_000,
        workload: Some(WorkloadConfig {
            default_ready_delay: Duration::from_millis(20),
            resync: Duration::from_secs(1),
        }),
        traffic: None,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let admin = sim.client().await.expect("admin");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in serin::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("crd");
    }
    let rollouts: Api<Rollout> = Api::namespaced(admin.clone(), NS);
    for _ in 0..200 {
        if rollouts.list(&ListParams::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Cluster { sim, admin }
}

async fn controller(cluster: &Cluster, concurrency: u16, resync: Duration) -> ControllerHandle {
    let client = cluster
        .sim
        .client_as(CONTROLLER)
        .await
        .expect("controller client");
    let handle = ControllerHandle::start(
        client,
        ControllerConfig {
            concurrency,
            resync,
            ..ControllerConfig::default()
        },
    )
    .await
    .expect("controller");
    assert!(
        handle.wait_ready(Duration::from_secs(60)).await,
        "caches synced"
    );
    handle
}

/// Time from a template change to the controller's first write, over `samples` changes.
async fn reaction_latency(samples: usize) -> (Duration, Duration, Duration) {
    let cluster = cluster().await;
    let handle = controller(&cluster, 4, Duration::from_secs(300)).await;
    create_rollout(&cluster.admin, "lat", 1, json!([])).await;
    assert!(wait_all_healthy(&cluster.admin, 1, Duration::from_secs(30)).await);
    let rollouts: Api<Rollout> = Api::namespaced(cluster.admin.clone(), NS);
    let mut latencies = Vec::new();
    for sample in 0..samples {
        // Wait for the previous change to settle so the controller is idle.
        if !wait_all_healthy(&cluster.admin, 1, Duration::from_secs(10)).await {
            for r in cluster
                .sim
                .request_log()
                .filter(|r| r.verb != "watch" && r.user != "admin")
                .iter()
                .rev()
                .take(40)
                .rev()
            {
                eprintln!(
                    "{:?} {} {} {} {:?} {:?} {}",
                    r.time, r.user, r.verb, r.resource, r.subresource, r.name, r.status
                );
            }
            panic!("stuck");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = SystemTime::now();
        let image = format!("app:{}", sample + 2);
        rollouts
            .patch(
                "lat",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})),
            )
            .await
            .expect("patch");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let first = cluster
                .sim
                .request_log()
                .filter(|r| {
                    r.user == CONTROLLER
                        && r.time >= before
                        && r.resource != "events"
                        && matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete")
                })
                .first()
                .map(|r| r.time);
            if let Some(at) = first {
                latencies.push(at.duration_since(before).unwrap_or_default());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no controller write after a change"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let _ = handle.stop().await;
    cluster.sim.shutdown().await;
    latencies.sort();
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    )
}

/// Whether a request changed an object (events aside: they are the controller's announcements).
fn is_object_write(r: &RequestRecord) -> bool {
    matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete") && r.resource != "events"
}

/// A list of a resource the cluster does not serve: the route watches retrying (with back-off) for
/// routing CRDs this cluster does not have. Not part of any step.
fn is_unserved_list(r: &RequestRecord) -> bool {
    r.status == 404 && r.name.is_none() && matches!(r.verb.as_str(), "get" | "list")
}

/// Waits until the controller has written nothing for `quiet` (at most `limit`), so a rollout's last
/// writes (counts the controller writes a little after the last step) are all in the log.
async fn wait_quiet(cluster: &Cluster, quiet: Duration, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let last = cluster
            .sim
            .request_log()
            .filter(|r| r.user == CONTROLLER && is_object_write(r))
            .last()
            .map(|r| r.time);
        let since = last
            .and_then(|at| SystemTime::now().duration_since(at).ok())
            .unwrap_or(quiet);
        if since >= quiet || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(quiet - since).await;
    }
}

/// What one 4-step canary cost, and what the controller did once it was over.
struct Canary {
    requests_per_step: f64,
    writes_per_step: f64,
    kinds: Vec<(String, usize)>,
    /// Lists of routing resources the cluster does not serve, over the whole canary.
    unserved_lists: usize,
    /// Reconciles, and object writes, over an idle period after the rollout settled.
    idle_reconciles: u64,
    idle_writes: usize,
    idle: Duration,
}

/// Requests and writes per step over a 4-step canary, by kind of request, then the writes of a settled
/// Rollout reconciled every second.
async fn requests_per_step() -> Canary {
    let cluster = cluster().await;
    // Every second a resync reconciles the Rollout, so the idle period below counts real no-op reconciles.
    let handle = controller(&cluster, 4, Duration::from_secs(1)).await;
    let steps =
        json!([{"setWeight": 25}, {"setWeight": 50}, {"setWeight": 75}, {"setWeight": 100}]);
    create_rollout(&cluster.admin, "steps", 4, steps).await;
    assert!(wait_all_healthy(&cluster.admin, 1, Duration::from_secs(30)).await);
    let quiet = PROGRESS_WRITE_INTERVAL + Duration::from_secs(1);
    wait_quiet(&cluster, quiet, Duration::from_secs(30)).await;
    cluster.sim.request_log().clear();
    let rollouts: Api<Rollout> = Api::namespaced(cluster.admin.clone(), NS);
    rollouts
        .patch(
            "steps",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}})),
        )
        .await
        .expect("patch");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(wait_all_healthy(&cluster.admin, 1, Duration::from_secs(60)).await);
    // Counts the controller writes after the last step (at most one interval later) belong to the step.
    wait_quiet(&cluster, quiet, Duration::from_secs(30)).await;
    let requests = cluster
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER && r.verb != "watch" && !is_unserved_list(r));
    let unserved_lists = cluster
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER && is_unserved_list(r))
        .len();
    let writes: Vec<&RequestRecord> = requests.iter().filter(|r| is_object_write(r)).collect();
    if std::env::var_os("SERIN_BENCH_VERBOSE").is_some() {
        for r in &writes {
            println!(
                "    {:?} {} {} {}{} {}",
                r.time
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
                r.status,
                r.verb,
                r.resource,
                r.subresource
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                r.name.as_deref().unwrap_or("")
            );
        }
    }
    let mut kinds: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for r in &requests {
        let sub = r
            .subresource
            .as_deref()
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        *kinds
            .entry(format!("{} {}{sub}", r.verb, r.resource))
            .or_default() += 1;
    }

    cluster.sim.request_log().clear();
    let idle = Duration::from_secs(5);
    let reconciles_before = handle.metrics().total_reconciles();
    tokio::time::sleep(idle).await;
    let idle_reconciles = handle.metrics().total_reconciles() - reconciles_before;
    let idle_writes = cluster
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER && (is_object_write(r) || r.resource == "events"))
        .len();

    let _ = handle.stop().await;
    cluster.sim.shutdown().await;
    let steps = 4.0;
    Canary {
        requests_per_step: requests.len() as f64 / steps,
        writes_per_step: writes.len() as f64 / steps,
        kinds: kinds.into_iter().collect(),
        unserved_lists,
        idle_reconciles,
        idle_writes,
        idle,
    }
}

/// What a pass of reconciles over many settled Rollouts costs.
struct Pass {
    /// Reconciles per second over a fresh controller's first pass, from its start (cache lists included).
    first_rate: f64,
    first_took: Duration,
    /// Mean duration of one reconcile in a resync pass (caches full, nothing to write), from the histogram.
    mean: Duration,
    /// Process CPU time per reconcile over that resync pass (the in-process sim is idle meanwhile: no reads
    /// reach it and nothing is written).
    cpu: Duration,
}

/// A fresh controller over `count` settled Rollouts: its first pass, then one resync pass over all of them.
async fn reconcile_passes(count: usize) -> Pass {
    let cluster = cluster().await;
    let first = controller(&cluster, 8, Duration::from_secs(300)).await;
    for index in 0..count {
        create_rollout(&cluster.admin, &format!("r{index}"), 0, json!([])).await;
    }
    assert!(
        wait_all_healthy(&cluster.admin, count, Duration::from_secs(600)).await,
        "all Rollouts became Healthy"
    );
    let _ = first.stop().await;
    // Nothing changes from here on: the workload simulator would only add its own CPU to the measure.
    cluster.sim.stop_workload().await.expect("workload stopped");
    let resync = Duration::from_secs(5);
    let started = Instant::now();
    let second = controller(&cluster, 8, resync).await;
    let target = count as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while second.metrics().total_reconciles() < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_took = started.elapsed();
    let first_done = second.metrics().total_reconciles();
    // The resync pass starts when the first Rollout comes round again; measuring from then keeps the idle
    // wait before it out of the CPU figure.
    while second.metrics().total_reconciles() <= target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (sum_before, count_before) = reconcile_histogram(&second.metrics().encode());
    let cpu_before = process_cpu();
    while second.metrics().total_reconciles() < 2 * target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu = process_cpu().saturating_sub(cpu_before);
    let (sum_after, count_after) = reconcile_histogram(&second.metrics().encode());
    let _ = second.stop().await;
    cluster.sim.shutdown().await;
    let reconciles = (count_after - count_before).max(1.0);
    Pass {
        first_rate: first_done as f64 / first_took.as_secs_f64(),
        first_took,
        mean: Duration::from_secs_f64((sum_after - sum_before) / reconciles),
        cpu: cpu.div_f64(reconciles),
    }
}

/// User plus system CPU time of this process so far (from /proc, in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state field.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Sum and count of the `serin_reconcile_duration_seconds` histogram.
fn reconcile_histogram(metrics: &str) -> (f64, f64) {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("serin_reconcile_duration_seconds_sum"),
        value("serin_reconcile_duration_seconds_count"),
    )
}

/// A minimal HTTPRoute CRD (the schema left open), so the bench needs no fixture from outside the repo.
fn http_route_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
        "spec": {
            "group": "gateway.networking.k8s.io",
            "scope": "Namespaced",
            "names": {"plural": "httproutes", "singular": "httproute", "kind": "HTTPRoute", "listKind": "HTTPRouteList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }]
        }
    }))
    .expect("valid CRD")
}

/// What `count` settled Rollouts routed through HTTPRoutes cost while nothing happens.
struct RoutedIdle {
    idle: Duration,
    reconciles: u64,
    route_reads: usize,
    writes: usize,
}

/// `count` routed Rollouts (an HTTPRoute each), settled, then left alone for `idle`: reconciles, route
/// reads and writes over that time.
async fn routed_idle(count: usize, idle: Duration) -> RoutedIdle {
    let cluster = cluster().await;
    Api::<CustomResourceDefinition>::all(cluster.admin.clone())
        .create(&PostParams::default(), &http_route_crd())
        .await
        .expect("HTTPRoute CRD");
    let routes: Api<kube::api::DynamicObject> = Api::namespaced_with(
        cluster.admin.clone(),
        NS,
        &serin::traffic::RoutingKind::HttpRoute.api_resource(),
    );
    for _ in 0..200 {
        if routes.list(&ListParams::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handle = controller(&cluster, 8, Duration::from_secs(300)).await;
    for index in 0..count {
        let name = format!("r{index}");
        let route: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"rules": [{"backendRefs": [
                {"name": name, "port": 80, "weight": 100},
                {"name": format!("{name}-canary"), "port": 80, "weight": 0}
            ]}]}
        }))
        .expect("valid route");
        routes
            .create(&PostParams::default(), &route)
            .await
            .expect("route");
        let mut object = rollout(&name, 1, "app:1", json!([{"setWeight": 50}]));
        object["spec"]["strategy"]["canary"]["trafficRouting"] =
            json!({"gatewayAPI": {"httpRoute": name}});
        let services: Api<Service> = Api::namespaced(cluster.admin.clone(), NS);
        for service in [name.clone(), format!("{name}-canary")] {
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": service, "namespace": NS},
                "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}
            }))
            .expect("valid service");
            services
                .create(&PostParams::default(), &svc)
                .await
                .expect("service");
        }
        Api::<Rollout>::namespaced(cluster.admin.clone(), NS)
            .create(
                &PostParams::default(),
                &serde_json::from_value(object).expect("valid rollout"),
            )
            .await
            .expect("rollout");
    }
    assert!(
        wait_all_healthy(&cluster.admin, count, Duration::from_secs(600)).await,
        "all routed Rollouts became Healthy"
    );
    wait_quiet(
        &cluster,
        PROGRESS_WRITE_INTERVAL + Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    cluster.sim.request_log().clear();
    let before = handle.metrics().total_reconciles();
    tokio::time::sleep(idle).await;
    let reconciles = handle.metrics().total_reconciles() - before;
    let requests = cluster
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER && r.verb != "watch");
    let _ = handle.stop().await;
    cluster.sim.shutdown().await;
    RoutedIdle {
        idle,
        reconciles,
        route_reads: requests
            .iter()
            .filter(|r| r.resource == "httproutes" && matches!(r.verb.as_str(), "get" | "list"))
            .count(),
        writes: requests
            .iter()
            .filter(|r| is_object_write(r) || r.resource == "events")
            .count(),
    }
}

fn main() {
    serin::install_crypto_provider();
    // RUST_LOG=serin::controller=debug shows, among others, which status fields each write changed.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let count: usize = std::env::var("SERIN_BENCH_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // `SERIN_BENCH_PARTS` (comma-separated: latency, writes, routes, reconciles) runs only those parts.
    let parts = std::env::var("SERIN_BENCH_PARTS").unwrap_or_default();
    let wanted = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    runtime.block_on(async {
        if wanted("latency") {
            let (p50, p99, max) = reaction_latency(100).await;
            println!("change -> first write: p50 {p50:?}, p99 {p99:?}, max {max:?} (100 samples)");
        }
        if wanted("writes") {
            let canary = requests_per_step().await;
            println!(
                "per step: {:.1} API requests, {:.1} object writes (4-step canary, 4 pods)",
                canary.requests_per_step, canary.writes_per_step
            );
            for (kind, n) in canary.kinds {
                println!("  {n:>4}  {kind}");
            }
            println!(
                "  (besides: {} retried lists of routing resources this cluster does not serve)",
                canary.unserved_lists
            );
            println!(
                "settled: {} reconciles in {:?}, {} writes (events included)",
                canary.idle_reconciles, canary.idle, canary.idle_writes
            );
        }
        if wanted("routes") {
            let routed: usize = std::env::var("SERIN_BENCH_ROUTED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            let idle = routed_idle(routed, Duration::from_secs(20)).await;
            println!(
                "{routed} routed Rollouts idle for {:?}: {} reconciles, {} route reads, {} writes",
                idle.idle, idle.reconciles, idle.route_reads, idle.writes
            );
        }
        if wanted("reconciles") {
            let pass = reconcile_passes(count).await;
            println!(
                "{count} Rollouts: fresh controller {:.0} reconciles/s ({:?} for its first pass); resync pass: {:?} per reconcile, {:?} CPU per reconcile",
                pass.first_rate, pass.first_took, pass.mean, pass.cpu
            );
        }
    });
}
