//! Benchmark of the simulated API server: objects held and RSS, time to list 10,000 objects through
//! kube-rs, and watch-event latency from write to watcher. Run: `cargo bench --bench sim`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use serin_sim::{SimCluster, SimConfig};

const HELD_OBJECTS: usize = 100_000;
const LISTED_OBJECTS: usize = 10_000;
const LIST_ROUNDS: usize = 10;
const WATCH_SAMPLES: usize = 1_000;
const CONCURRENCY: usize = 32;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn config_map(name: &str, index: usize) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "bench", "shard": (index % 10).to_string()}},
        "data": {"index": index.to_string(), "payload": "x".repeat(64)},
    }))
    .expect("valid configmap")
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .expect("valid namespace");
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace created");
}

async fn fill(client: &kube::Client, namespace: &str, count: usize) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..count)
        .map(|index| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &config_map(&format!("cm-{index:06}"), index),
                )
                .await
                .expect("create");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sim = SimCluster::start(SimConfig { request_log_capacity: 1_000, ..SimConfig::default() }).await.expect("sim");
        let client = sim.client().await.expect("client");
        let rss_start = rss_mib();

        create_namespace(&client, "held").await;
        let started = Instant::now();
        fill(&client, "held", HELD_OBJECTS).await;
        let fill_time = started.elapsed();
        let rss_held = rss_mib();
        println!(
            "objects held: {} configmaps created in {:.1} s ({:.0}/s); RSS {:.0} MiB at start, {:.0} MiB holding them",
            sim.object_count("", "configmaps"),
            fill_time.as_secs_f64(),
            HELD_OBJECTS as f64 / fill_time.as_secs_f64(),
            rss_start,
            rss_held
        );

        create_namespace(&client, "listed").await;
        fill(&client, "listed", LISTED_OBJECTS).await;
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "listed");
        let mut list_times = Vec::new();
        for _ in 0..LIST_ROUNDS {
            let started = Instant::now();
            let list = api.list(&ListParams::default()).await.expect("list");
            list_times.push(started.elapsed());
            assert_eq!(list.items.len(), LISTED_OBJECTS);
        }
        list_times.sort();
        println!(
            "list {LISTED_OBJECTS} objects through kube-rs (typed, {LIST_ROUNDS} rounds): median {:.1} ms, min {:.1} ms, max {:.1} ms",
            percentile(&list_times, 0.5).as_secs_f64() * 1e3,
            list_times[0].as_secs_f64() * 1e3,
            list_times[list_times.len() - 1].as_secs_f64() * 1e3
        );

        let watched: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        watched.create(&PostParams::default(), &config_map("latency", 0)).await.expect("create");
        let current = watched.get("latency").await.expect("get").metadata.resource_version.expect("rv");
        let mut events = watched.watch(&WatchParams::default(), &current).await.expect("watch").boxed();
        let mut latencies = Vec::with_capacity(WATCH_SAMPLES);
        for sample in 1..=WATCH_SAMPLES {
            let marker = sample.to_string();
            let started = Instant::now();
            watched
                .patch("latency", &PatchParams::default(), &Patch::Merge(json!({"data": {"index": marker}})))
                .await
                .expect("patch");
            loop {
                let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
                    .await
                    .expect("event within 10 s")
                    .expect("watch stream")
                    .expect("stream open");
                if let WatchEvent::Modified(map) = event {
                    if map.data.as_ref().and_then(|d| d.get("index")) == Some(&marker) {
                        latencies.push(started.elapsed());
                        break;
                    }
                }
            }
        }
        latencies.sort();
        println!(
            "watch latency, write sent -> event received ({WATCH_SAMPLES} samples, idle): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies[latencies.len() - 1].as_secs_f64() * 1e3
        );
        println!("final RSS {:.0} MiB", rss_mib());
        sim.shutdown().await;
    });
}
