//! Analysis benchmark against a real `prometheus` process scraping a test exporter:
//! - Prometheus queries per rollout per interval (each rollout's run measures error rate and p99 latency);
//! - time from a failing measurement's answer to the run's Failed status (p50, p90, max).
//!
//! Run with `cargo bench --bench analysis` (prometheus must be installed: `apt-get install -y prometheus`).
//! `SERIN_BENCH_ROLLOUTS` (default 20) and `SERIN_BENCH_SECONDS` (default 10) size it.

#[path = "../tests/analysis_support/prometheus.rs"]
mod support;

use std::sync::Arc;
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
    let provider = PrometheusProvider::new();
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
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let queries = provider.queries_sent() as f64;
    let per_rollout_per_interval = queries / rollouts as f64 / elapsed; // interval is 1s
    println!(
        "queries: {queries} for {rollouts} rollouts over {elapsed:.1}s at a 1s interval = {per_rollout_per_interval:.2} queries per rollout per interval (2 metrics per run)"
    );

    // 2. From a failing measurement's answer to the run's Failed status.
    let mut latencies = Vec::with_capacity(rollouts * 3);
    for round in 0..3 {
        for i in 0..rollouts {
            let mut run = run_for(
                &format!("fail-{round}-{i}"),
                &format!("svc-{i}"),
                "failing",
                vec![check(
                    "error-rate",
                    &address,
                    BuiltinCheckKind::ErrorRate,
                    "result < 0.05",
                    Some(1),
                )],
            );
            for _ in 0..10 {
                let outcome = advance(&run, Timestamp::now(), &measurer).await;
                let decided_at = Timestamp::now();
                run.status = Some(outcome.status.clone());
                if outcome.status.phase == Some(AnalysisPhase::Failed) {
                    let answered = outcome.status.metric_results[0]
                        .measurements
                        .last()
                        .and_then(|m| m.finished_at.clone());
                    if let Some(answered) = answered {
                        let gap = decided_at.duration_since(answered.0);
                        latencies.push(Duration::try_from(gap).unwrap_or(Duration::ZERO));
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
}
