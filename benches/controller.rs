//! Controller benchmarks against the simulated cluster (not timed tests; numbers go to
//! docs/benchmarks/controller.md):
//! 1. time from a Rollout change to the controller's first write (p50, p99),
//! 2. API requests and writes per canary step,
//! 3. reconciles per second over many Rollouts (`SERIN_BENCH_ROLLOUTS`, default 1000).

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::{Rollout, RolloutPhase};
use serin::sim::workload::WorkloadConfig;
use serin::sim::{SimCluster, SimConfig};

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

async fn controller(cluster: &Cluster, concurrency: u16) -> ControllerHandle {
    let client = cluster
        .sim
        .client_as(CONTROLLER)
        .await
        .expect("controller client");
    let handle = ControllerHandle::start(
        client,
        ControllerConfig {
            concurrency,
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
    let handle = controller(&cluster, 4).await;
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

/// Requests and writes per step over a 4-step canary, by kind of request.
async fn requests_per_step() -> (f64, f64, Vec<(String, usize)>) {
    let cluster = cluster().await;
    let handle = controller(&cluster, 4).await;
    let steps =
        json!([{"setWeight": 25}, {"setWeight": 50}, {"setWeight": 75}, {"setWeight": 100}]);
    create_rollout(&cluster.admin, "steps", 4, steps).await;
    assert!(wait_all_healthy(&cluster.admin, 1, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = cluster
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER && r.verb != "watch");
    let writes: Vec<_> = requests
        .iter()
        .filter(|r| {
            matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete")
                && r.resource != "events"
        })
        .collect();
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
    let _ = handle.stop().await;
    cluster.sim.shutdown().await;
    let steps = 4.0;
    (
        requests.len() as f64 / steps,
        writes.len() as f64 / steps,
        kinds.into_iter().collect(),
    )
}

/// Reconciles per second when a fresh controller starts over `count` settled Rollouts.
async fn reconciles_per_second(count: usize) -> (f64, Duration) {
    let cluster = cluster().await;
    let first = controller(&cluster, 8).await;
    for index in 0..count {
        create_rollout(&cluster.admin, &format!("r{index}"), 0, json!([])).await;
    }
    assert!(
        wait_all_healthy(&cluster.admin, count, Duration::from_secs(600)).await,
        "all Rollouts became Healthy"
    );
    let _ = first.stop().await;
    let started = Instant::now();
    let second = controller(&cluster, 8).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while second.metrics().total_reconciles() < count as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let done = second.metrics().total_reconciles();
    let _ = second.stop().await;
    cluster.sim.shutdown().await;
    (done as f64 / took.as_secs_f64(), took)
}

fn main() {
    serin::sim::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let count: usize = std::env::var("SERIN_BENCH_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    runtime.block_on(async {
        let (p50, p99, max) = reaction_latency(100).await;
        println!("change -> first write: p50 {p50:?}, p99 {p99:?}, max {max:?} (100 samples)");
        let (requests, writes, kinds) = requests_per_step().await;
        println!("per step: {requests:.1} API requests, {writes:.1} object writes (4-step canary, 4 pods)");
        for (kind, n) in kinds {
            println!("  {n:>4}  {kind}");
        }
        let (rate, took) = reconciles_per_second(count).await;
        println!("{count} Rollouts: {rate:.0} reconciles/s ({took:?} for the initial pass of a fresh controller)");
    });
}
