//! Analysis benchmark against a real `prometheus` process scraping a test exporter:
//! - Prometheus queries per rollout per interval (each rollout's run measures error rate and p99 latency);
//! - time from a failing measurement's answer to the run's Failed status (p50, p90, max).
//!
//! - the runner as a controller in the simulated cluster: time from a failing measurement's answer to
//!   the Failed status reaching a watcher (status write and watch delivery included).
//!
//! Run with `cargo bench --bench analysis` (prometheus must be installed: `apt-get install -y prometheus`).
//! `SERIN_BENCH_ROLLOUTS` (default 20) and `SERIN_BENCH_SECONDS` (default 10) size it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit::exporter as support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serin::analysis::prometheus::PrometheusProvider;
use serin::analysis::{advance, Measurer, StaticSecrets};
use serin::crd::analysis::{
    AnalysisRun, AnalysisRunSpec, BuiltinCheck, BuiltinCheckKind, Metric, MetricProvider,
    PrometheusMetric, TemplateArgument,
};
use serin::crd::{AnalysisPhase, ManifestDuration};
use support::{http_traffic, Exporter, Prometheus};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check(
    name: &str,
    address: &str,
    kind: BuiltinCheckKind,
    condition: &str,
    count: Option<i32>,
) -> Metric {
    Metric {
        name: name.into(),
        interval: Some(ManifestDuration::Text("1s".into())),
        count: count.map(IntOrString::Int),
        success_condition: Some(condition.into()),
        provider: MetricProvider {
            prometheus: Some(PrometheusMetric {
                address: address.into(),
                check: Some(BuiltinCheck {
                    kind,
                    service: "{{args.service}}".into(),
                    pod_template_hash: Some("{{args.hash}}".into()),
                    window: Some(ManifestDuration::Text("5s".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        },
        ..Default::default()
    }
}

fn run_for(name: &str, service: &str, hash: &str, metrics: Vec<Metric>) -> AnalysisRun {
    let arg = |n: &str, v: &str| TemplateArgument {
        name: n.into(),
        value: Some(v.into()),
        value_from: None,
    };
    let mut run = AnalysisRun::new(
        name,
        AnalysisRunSpec {
            args: vec![arg("service", service), arg("hash", hash)],
            metrics,
            dry_run: vec![],
            terminate: false,
        },
    );
    run.metadata.namespace = Some("bench".into());
    run
}

/// When the answer to the last query about each service left a proxy in front of Prometheus: the moment
/// the runner has its measurement (loopback adds microseconds).
type AnswerTimes = Arc<Mutex<HashMap<String, Instant>>>;

async fn answering_proxy(prometheus: &str) -> (String, AnswerTimes) {
    let answers: AnswerTimes = Arc::default();
    let upstream = format!("{prometheus}/api/v1/query");
    let http = reqwest::Client::new();
    let recorded = answers.clone();
    let app = axum::Router::new().route(
        "/api/v1/query",
        axum::routing::get(
            move |axum::extract::RawQuery(query): axum::extract::RawQuery| {
                let http = http.clone();
                let upstream = upstream.clone();
                let recorded = recorded.clone();
                async move {
                    let url = format!("{upstream}?{}", query.clone().unwrap_or_default());
                    let body = match http.get(url).send().await {
                        Ok(response) => response.bytes().await.unwrap_or_default(),
                        Err(_) => Default::default(),
                    };
                    let decoded: String = url_decode(&query.unwrap_or_default());
                    if let Some(service) = decoded
                        .split("service=\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                    {
                        if let Ok(mut map) = recorded.lock() {
                            map.insert(service.to_string(), Instant::now());
                        }
                    }
                    ([("content-type", "application/json")], body)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let address = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}"), answers)
}

fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rollouts = env_number("SERIN_BENCH_ROLLOUTS", 20) as usize;
    let seconds = env_number("SERIN_BENCH_SECONDS", 10);

    let mut series = Vec::new();
    for i in 0..rollouts {
        series.extend(http_traffic(
            &format!("svc-{i}"),
            "healthy",
            50.0,
            0.0,
            0.08,
        ));
        series.extend(http_traffic(
            &format!("svc-{i}"),
            "failing",
            50.0,
            0.2,
            0.08,
        ));
    }
    let exporter = Exporter::start(series).await;
    let prometheus = Prometheus::start(&[exporter.address]).await;
    prometheus
        .wait_for(
            r#"sum(rate(http_requests_total[5s])) > 0"#,
            Duration::from_secs(60),
        )
        .await;
    let address = prometheus.url.clone();

    // 1. Queries per rollout per interval: background runs (no count) measured for `seconds`.
    // The benchmark's Prometheus listens on loopback, which the outbound policy opens only when listed.
    let loopback = serin::analysis::outbound::OutboundConfig::allowing(["127.0.0.1"])
        .expect("a valid destination");
    let provider = PrometheusProvider::with_outbound(loopback);
    let measurer = Measurer::new(provider.clone(), Arc::new(StaticSecrets::default()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..rollouts)
        .map(|i| {
            let measurer = measurer.clone();
            let mut run = run_for(
                &format!("bg-{i}"),
                &format!("svc-{i}"),
                "healthy",
                vec![
                    check(
                        "error-rate",
                        &address,
                        BuiltinCheckKind::ErrorRate,
                        "result < 0.05",
                        None,
                    ),
                    check(
                        "p99",
                        &address,
                        BuiltinCheckKind::LatencyP99,
                        "result <= 0.5",
                        None,
                    ),
                ],
            );
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(seconds);
                for _ in 0..10_000 {
                    if Instant::now() >= until {
                        break;
                    }
                    let outcome = advance(&run, Timestamp::now(), &measurer).await;
                    run.status = Some(outcome.status);
                    match outcome.requeue_after {
                        Some(after) => {
                            tokio::time::sleep(after.max(Duration::from_millis(10))).await
                        }
                        None => break,
                    }
                }
                run.status
            })
        })
        .collect();
    // An interval of a rollout is one round of its run: each metric measured once.
    let mut rounds = 0_i64;
    for task in tasks {
        if let Ok(Some(status)) = task.await {
            rounds += status
                .metric_results
                .iter()
                .map(|r| i64::from(r.count))
                .max()
                .unwrap_or(0);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let queries = provider.queries_sent() as f64;
    let per_rollout_per_interval = queries / rounds.max(1) as f64;
    println!(
        "queries: {queries} for {rollouts} rollouts, {rounds} intervals in all over {elapsed:.1}s = {per_rollout_per_interval:.2} queries per rollout per interval (2 metrics per run)"
    );

    // 2. From a failing measurement's answer (leaving the proxy) to the run's Failed status.
    let (proxy, answers) = answering_proxy(&address).await;
    let mut latencies = Vec::with_capacity(rollouts * 3);
    for round in 0..3 {
        for i in 0..rollouts {
            let service = format!("svc-{i}");
            let mut run = run_for(
                &format!("fail-{round}-{i}"),
                &service,
                "failing",
                vec![check(
                    "error-rate",
                    &proxy,
                    BuiltinCheckKind::ErrorRate,
                    "result < 0.05",
                    Some(1),
                )],
            );
            for _ in 0..10 {
                let outcome = advance(&run, Timestamp::now(), &measurer).await;
                let decided = Instant::now();
                run.status = Some(outcome.status.clone());
                if outcome.status.phase == Some(AnalysisPhase::Failed) {
                    let answered = answers.lock().ok().and_then(|m| m.get(&service).copied());
                    if let Some(answered) = answered {
                        latencies.push(decided.saturating_duration_since(answered));
                    }
                    break;
                }
                match outcome.requeue_after {
                    Some(after) => tokio::time::sleep(after).await,
                    None => break,
                }
            }
        }
    }
    latencies.sort();
    println!(
        "failing measurement answered -> run Failed ({} runs): p50 {:?}, p90 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies.last().copied().unwrap_or_default()
    );

    // 3. The runner in the simulated cluster: answer -> Failed status seen by a watcher.
    for (label, batch) in [("one run at a time", 1), ("all runs at once", rollouts)] {
        let through_api = runner_in_sim(&proxy, &answers, rollouts, batch).await;
        println!(
            "runner in sim, {label}: failing answer -> Failed status seen by a watcher ({} runs): p50 {:?}, p90 {:?}, max {:?}",
            through_api.len(),
            percentile(&through_api, 0.5),
            percentile(&through_api, 0.9),
            through_api.last().copied().unwrap_or_default()
        );
    }
}

/// Creates `rollouts` failing runs, `batch` at a time (the next batch once the previous one failed), and
/// times each from its answer to its Failed status reaching a watcher.
async fn runner_in_sim(
    proxy: &str,
    answers: &AnswerTimes,
    rollouts: usize,
    batch: usize,
) -> Vec<Duration> {
    use futures::StreamExt;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ListParams, PostParams};
    use kube::runtime::watcher;
    use kube::Api;
    use serin::analysis::runner::{self, RunnerConfig};
    use serin_sim::{SimCluster, SimConfig};

    let Ok(sim) = SimCluster::start(SimConfig::api_only()).await else {
        eprintln!("simulated cluster did not start");
        return Vec::new();
    };
    let Ok(client) = sim.client().await else {
        eprintln!("no client for the simulated cluster");
        return Vec::new();
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in serin::crd::all() {
        let _ = crds.create(&PostParams::default(), &crd).await;
    }
    let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), "default");
    for _ in 0..100 {
        if runs.list(&ListParams::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loopback = serin::analysis::outbound::OutboundConfig::allowing(["127.0.0.1"])
        .expect("a valid destination");
    let handle = runner::spawn(client.clone(), RunnerConfig::allowing(None, loopback));
    let mut events = Box::pin(watcher(runs.clone(), watcher::Config::default()));
    let mut latencies = Vec::with_capacity(rollouts);
    let mut pending = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for first in (0..rollouts).step_by(batch.max(1)) {
        for i in first..(first + batch.max(1)).min(rollouts) {
            let service = format!("svc-{i}");
            let name = format!("sim-{batch}-fail-{i}");
            let mut run = run_for(
                &name,
                &service,
                "failing",
                vec![check(
                    "error-rate",
                    proxy,
                    BuiltinCheckKind::ErrorRate,
                    "result < 0.05",
                    Some(1),
                )],
            );
            run.metadata.namespace = Some("default".into());
            match runs.create(&PostParams::default(), &run).await {
                Ok(_) => {
                    pending.insert(name, service);
                }
                Err(error) => eprintln!("creating run: {error}"),
            }
        }
        while !pending.is_empty() && Instant::now() < deadline {
            let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await
            else {
                continue;
            };
            let seen = Instant::now();
            let run = match event {
                Ok(watcher::Event::Apply(run)) | Ok(watcher::Event::InitApply(run)) => run,
                _ => continue,
            };
            let failed = run.status.as_ref().and_then(|s| s.phase) == Some(AnalysisPhase::Failed);
            let name = run.metadata.name.clone().unwrap_or_default();
            if failed {
                if let Some(service) = pending.remove(&name) {
                    if let Some(answered) =
                        answers.lock().ok().and_then(|m| m.get(&service).copied())
                    {
                        latencies.push(seen.saturating_duration_since(answered));
                    }
                }
            }
        }
    }
    let _ = handle.shutdown().await;
    sim.shutdown().await;
    latencies.sort();
    latencies
}
