//! Analysis against a real `prometheus` process scraping a test exporter: verdicts of real PromQL over real
//! scraped series, provider errors, Prometheus going away, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit::exporter as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serin::analysis::outbound::OutboundConfig;
use serin::analysis::prometheus::PrometheusProvider;
use serin::analysis::secret_access::RunOwner;
use serin::analysis::{advance, Measurer, StaticSecrets};
use serin::crd::analysis::{
    AnalysisRun, AnalysisRunSpec, AnalysisRunStatus, BuiltinCheck, BuiltinCheckKind, Metric,
    MetricProvider, PrometheusMetric, TemplateArgument, TemplateArgumentValueFrom,
};
use serin::crd::rollout::SecretKeyRef;
use serin::crd::{AnalysisPhase, ManifestDuration};
use support::{http_traffic, Exporter, Prometheus, Series, Value};

const NAMESPACE: &str = "shop";

fn metric(name: &str, address: &str, success: Option<&str>, failure: Option<&str>) -> Metric {
    Metric {
        name: name.into(),
        interval: Some(ManifestDuration::Text("1s".into())),
        count: Some(IntOrString::Int(3)),
        success_condition: success.map(str::to_string),
        failure_condition: failure.map(str::to_string),
        provider: MetricProvider {
            prometheus: Some(PrometheusMetric {
                address: address.into(),
                timeout: Some(ManifestDuration::Text("5s".into())),
                ..Default::default()
            }),
        },
        ..Default::default()
    }
}

fn with_query(mut metric: Metric, query: &str) -> Metric {
    if let Some(p) = metric.provider.prometheus.as_mut() {
        p.query = Some(query.into());
    }
    metric
}

fn with_check(mut metric: Metric, kind: BuiltinCheckKind) -> Metric {
    if let Some(p) = metric.provider.prometheus.as_mut() {
        p.check = Some(BuiltinCheck {
            kind,
            service: "{{args.service}}".into(),
            pod_template_hash: Some("{{args.canary-hash}}".into()),
            window: Some(ManifestDuration::Text("5s".into())),
            ..Default::default()
        });
    }
    metric
}

fn arg(name: &str, value: &str) -> TemplateArgument {
    TemplateArgument {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn analysis_run(name: &str, args: Vec<TemplateArgument>, metrics: Vec<Metric>) -> AnalysisRun {
    let mut run = AnalysisRun::new(
        name,
        AnalysisRunSpec {
            args,
            metrics,
            dry_run: vec![],
            terminate: false,
        },
    );
    run.metadata.namespace = Some(NAMESPACE.into());
    run
}

/// Every Prometheus of these tests listens on loopback, which the outbound policy opens only when listed.
fn loopback() -> OutboundConfig {
    OutboundConfig::allowing(["127.0.0.1"]).expect("a valid destination")
}

fn measurer(secrets: StaticSecrets) -> Measurer {
    Measurer::new(
        PrometheusProvider::with_outbound(loopback()),
        Arc::new(secrets),
    )
}

/// Makes `run` controlled by a Rollout whose one template is the run itself (as Serin would have built
/// it), and returns a measurer whose Secret store knows that Rollout: only such runs may read Secrets.
fn vouched(run: &mut AnalysisRun, secrets: &StaticSecrets) -> Measurer {
    let name = run.metadata.name.clone().unwrap_or_default();
    let rollout: serin::crd::Rollout = serde_json::from_value(serde_json::json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}")},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}},
            "strategy": {"canary": {"analysis": {"templates": [{"templateName": "t"}]}}}
        }
    }))
    .expect("a valid Rollout");
    run.metadata.owner_references =
        serin::controller::act::owner_reference(&rollout).map(|owner| vec![owner]);
    let owner = RunOwner {
        rollout,
        templates: vec![serin::crd::analysis::AnalysisTemplateSpec {
            args: run.spec.args.clone(),
            metrics: run.spec.metrics.clone(),
            dry_run: vec![],
        }],
    };
    measurer(secrets.clone().with_owner(owner))
}

/// Drives a run the way the runner does (measure, wait for the next due time) until it completes.
async fn drive(mut run: AnalysisRun, measurer: &Measurer) -> AnalysisRunStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    for _ in 0..200 {
        let outcome = advance(&run, Timestamp::now(), measurer).await;
        run.status = Some(outcome.status.clone());
        match outcome.requeue_after {
            None => return outcome.status,
            Some(after) => {
                assert!(
                    Instant::now() < deadline,
                    "run {} did not complete: {:?}",
                    run.metadata.name.as_deref().unwrap_or(""),
                    outcome.status
                );
                tokio::time::sleep(after.max(Duration::from_millis(20))).await;
            }
        }
    }
    panic!("run did not complete within 200 passes: {:?}", run.status);
}

fn values_of(status: &AnalysisRunStatus, metric: &str) -> Vec<String> {
    status
        .metric_results
        .iter()
        .find(|r| r.name == metric)
        .map(|r| {
            r.measurements
                .iter()
                .filter_map(|m| m.value.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn phases_of(status: &AnalysisRunStatus, metric: &str) -> Vec<AnalysisPhase> {
    status
        .metric_results
        .iter()
        .find(|r| r.name == metric)
        .map(|r| r.measurements.iter().map(|m| m.phase).collect())
        .unwrap_or_default()
}

async fn start_bed() -> (Exporter, Prometheus) {
    let mut series = Vec::new();
    series.extend(http_traffic("checkout", "healthy1", 100.0, 0.0, 0.08));
    series.extend(http_traffic("checkout", "errors20", 100.0, 0.2, 0.08));
    series.extend(http_traffic("checkout", "slow", 100.0, 0.0, 2.0));
    series.extend(http_traffic("checkout", "idle", 0.0, 0.0, 0.08));
    series.push(Series::new(
        "test_value",
        &[("case", "nan")],
        Value::Fixed(f64::NAN),
    ));
    series.push(Series::new(
        "test_value",
        &[("case", "inf")],
        Value::Fixed(f64::INFINITY),
    ));
    series.push(Series::new(
        "test_value",
        &[("case", "multi"), ("n", "1")],
        Value::Fixed(0.01),
    ));
    series.push(Series::new(
        "test_value",
        &[("case", "multi"), ("n", "2")],
        Value::Fixed(0.01),
    ));
    let exporter = Exporter::start(series).await;
    let prometheus = Prometheus::start(&[exporter.address]).await;
    // rate() over 5s needs a few scrapes; wait until the healthy version's rate is computable.
    prometheus
        .wait_for(
            r#"sum(rate(http_requests_total{pod_template_hash="healthy1"}[5s])) > 0"#,
            Duration::from_secs(60),
        )
        .await;
    (exporter, prometheus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_over_real_prometheus_data() {
    let (_exporter, prometheus) = start_bed().await;
    let address = prometheus.url.as_str();
    let measurer = measurer(StaticSecrets::default());
    let args = |hash: &str| vec![arg("service", "checkout"), arg("canary-hash", hash)];
    let error_rate = || {
        with_check(
            metric("error-rate", address, Some("result < 0.05"), None),
            BuiltinCheckKind::ErrorRate,
        )
    };
    let latency = || {
        with_check(
            metric("p99-latency", address, Some("result <= 0.5"), None),
            BuiltinCheckKind::LatencyP99,
        )
    };
    let mut failing_errors = error_rate();
    failing_errors.failure_limit = Some(1);

    let runs = vec![
        analysis_run("healthy", args("healthy1"), vec![error_rate(), latency()]),
        analysis_run("errors", args("errors20"), vec![failing_errors, latency()]),
        analysis_run("slow", args("slow"), vec![error_rate(), latency()]),
        analysis_run("idle", args("idle"), vec![error_rate()]),
        analysis_run("absent", args("absent"), vec![error_rate()]),
        analysis_run(
            "nan",
            vec![],
            vec![with_query(
                metric("v", address, Some("result < 1.0"), None),
                r#"test_value{case="nan"}"#,
            )],
        ),
        analysis_run(
            "inf-fails",
            vec![],
            vec![with_query(
                metric("v", address, Some("result < 1.0"), Some("result > 1.0")),
                r#"test_value{case="inf"}"#,
            )],
        ),
        analysis_run(
            "multi",
            vec![],
            vec![with_query(
                metric("v", address, Some("result < 1.0"), None),
                r#"test_value{case="multi"}"#,
            )],
        ),
        analysis_run(
            "injection",
            vec![arg("case", r#"x"} or vector(1) or test_value{case=""#)],
            vec![with_query(
                metric("v", address, Some("result >= 0.0"), None),
                r#"count(test_value{case="{{args.case}}"})"#,
            )],
        ),
    ];
    let statuses = futures::future::join_all(runs.into_iter().map(|run| {
        let measurer = measurer.clone();
        async move {
            let name = run.metadata.name.clone().unwrap_or_default();
            (name, drive(run, &measurer).await)
        }
    }))
    .await;
    let status = |name: &str| {
        statuses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };

    let healthy = status("healthy");
    assert_eq!(
        healthy.phase,
        Some(AnalysisPhase::Successful),
        "{healthy:?}"
    );
    assert_eq!(
        phases_of(&healthy, "error-rate"),
        vec![AnalysisPhase::Successful; 3]
    );
    assert!(
        values_of(&healthy, "error-rate").iter().all(|v| v == "0"),
        "{healthy:?}"
    );
    for v in values_of(&healthy, "p99-latency") {
        let p99: f64 = v.parse().unwrap_or(f64::NAN);
        assert!(p99 > 0.05 && p99 <= 0.1, "healthy p99 {v}");
    }

    let errors = status("errors");
    assert_eq!(errors.phase, Some(AnalysisPhase::Failed), "{errors:?}");
    let recorded = values_of(&errors, "error-rate");
    assert_eq!(
        recorded.len(),
        2,
        "fails on the second failed measurement (failureLimit 1): {errors:?}"
    );
    for v in &recorded {
        let rate: f64 = v.parse().unwrap_or(f64::NAN);
        assert!((rate - 0.2).abs() < 0.01, "recorded error rate {v}");
    }
    let message = errors.message.clone().unwrap_or_default();
    assert!(
        message.starts_with(r#"metric "error-rate": value 0.2"#),
        "{message}"
    );
    assert!(
        message
            .ends_with(r#"failed condition "result < 0.05" (2 of 2 measurements failed, limit 1)"#),
        "{message}"
    );

    let slow = status("slow");
    assert_eq!(slow.phase, Some(AnalysisPhase::Failed), "{slow:?}");
    assert!(
        slow.message
            .as_deref()
            .unwrap_or("")
            .contains(r#"metric "p99-latency""#),
        "{slow:?}"
    );
    let p99: f64 = values_of(&slow, "p99-latency")[0]
        .parse()
        .unwrap_or(f64::NAN);
    assert!(p99 > 1.0 && p99 <= 2.5, "slow p99 {p99}");

    // No requests: 0/0 = NaN. No series: empty. Both are Inconclusive, never Successful.
    for (name, value) in [
        ("idle", "NaN"),
        ("absent", "[]"),
        ("nan", "NaN"),
        ("multi", "[0.01, 0.01]"),
    ] {
        let s = status(name);
        assert_eq!(s.phase, Some(AnalysisPhase::Inconclusive), "{name}: {s:?}");
        let metric = if name == "idle" || name == "absent" {
            "error-rate"
        } else {
            "v"
        };
        assert_eq!(
            values_of(&s, metric),
            vec![value.to_string()],
            "{name}: {s:?}"
        );
    }
    let inf = status("inf-fails");
    assert_eq!(inf.phase, Some(AnalysisPhase::Failed), "{inf:?}");
    assert_eq!(values_of(&inf, "v"), vec!["+Inf".to_string()]);

    // Had the value broken out of its string, `or vector(1)` would have given a count and a success.
    let injection = status("injection");
    assert_eq!(
        injection.phase,
        Some(AnalysisPhase::Inconclusive),
        "{injection:?}"
    );
    assert_eq!(values_of(&injection, "v"), vec!["[]".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ends_the_run_with_a_clear_message() {
    let exporter = Exporter::start(http_traffic("checkout", "h", 10.0, 0.0, 0.08)).await;
    let prometheus = Prometheus::start(&[exporter.address]).await;
    let address = prometheus.url.as_str();
    let secrets = StaticSecrets::default().with(NAMESPACE, "prom", "token", "s3cret");
    let measurer = measurer(secrets.clone());

    let mut malformed = with_query(
        metric("m", address, Some("result < 1.0"), None),
        "sum(rate(http_requests_total[1m]",
    );
    malformed.consecutive_error_limit = Some(1);
    let status = drive(
        analysis_run("malformed", vec![], vec![malformed]),
        &measurer,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:?}");
    assert_eq!(phases_of(&status, "m"), vec![AnalysisPhase::Error; 2]);
    let message = status.message.unwrap_or_default();
    assert!(message.contains("2 errors in a row, limit 1"), "{message}");
    assert!(message.contains("bad_data"), "{message}");

    let unparsable = with_query(metric("m", address, Some("result <"), None), "vector(1)");
    let status = drive(
        analysis_run("unparsable", vec![], vec![unparsable]),
        &measurer,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains(r#"condition "result <" does not parse: "#),
        "{status:?}"
    );
    assert!(
        status.metric_results.iter().all(|r| r.count == 0),
        "nothing measured: {status:?}"
    );

    let missing_arg = with_query(
        metric("m", address, Some("result < 1.0"), None),
        r#"up{job="{{args.job}}"}"#,
    );
    let status = drive(
        analysis_run("missing-arg", vec![], vec![missing_arg]),
        &measurer,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains(r#"no argument "job""#),
        "{status:?}"
    );

    let bare = with_query(
        metric("m", address, Some("result < 1.0"), None),
        "vector({{args.n}})",
    );
    let status = drive(
        analysis_run("bare", vec![arg("n", "1) or vector(0")], vec![bare]),
        &measurer,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("single token"),
        "{status:?}"
    );

    let secret_arg = TemplateArgument {
        name: "job".into(),
        value: None,
        value_from: Some(TemplateArgumentValueFrom {
            secret_key_ref: SecretKeyRef {
                name: "absent".into(),
                key: "job".into(),
            },
        }),
    };
    let uses_secret = with_query(
        metric("m", address, Some("result < 1.0"), None),
        r#"count(up{job="{{args.job}}"})"#,
    );
    let mut missing_secret = analysis_run(
        "missing-secret",
        vec![secret_arg],
        vec![uses_secret.clone()],
    );
    let vouched_measurer = vouched(&mut missing_secret, &secrets);
    let status = drive(missing_secret, &vouched_measurer).await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("secret shop/absent does not exist"),
        "{status:?}"
    );

    // A query carrying a Secret's value works, but is not copied into the measurement's metadata.
    let present = TemplateArgument {
        name: "job".into(),
        value: None,
        value_from: Some(TemplateArgumentValueFrom {
            secret_key_ref: SecretKeyRef {
                name: "prom".into(),
                key: "token".into(),
            },
        }),
    };
    let mut secret_query = analysis_run("secret-query", vec![present], vec![uses_secret]);
    let vouched_measurer = vouched(&mut secret_query, &secrets);
    let status = drive(secret_query, &vouched_measurer).await;
    let serialized = serde_json::to_string(&status).unwrap_or_default();
    assert!(!serialized.contains("s3cret"), "{serialized}");

    let mut unreachable = with_query(
        metric("m", "http://127.0.0.1:1", Some("result < 1.0"), None),
        "vector(0)",
    );
    unreachable.consecutive_error_limit = Some(0);
    let status = drive(
        analysis_run("unreachable", vec![], vec![unreachable]),
        &measurer,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("unreachable"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_mid_analysis_errors_after_the_limit_and_never_succeeds() {
    let exporter = Exporter::start(http_traffic("checkout", "h", 100.0, 0.0, 0.08)).await;
    let mut prometheus = Prometheus::start(&[exporter.address]).await;
    prometheus
        .wait_for(
            r#"sum(rate(http_requests_total[5s])) > 0"#,
            Duration::from_secs(60),
        )
        .await;
    let mut background = with_check(
        metric("error-rate", &prometheus.url, Some("result < 0.05"), None),
        BuiltinCheckKind::ErrorRate,
    );
    background.count = None; // background analysis: runs until terminated or failed
    background.consecutive_error_limit = Some(2);
    let mut run = analysis_run(
        "background",
        vec![arg("service", "checkout"), arg("canary-hash", "h")],
        vec![background],
    );
    let measurer = measurer(StaticSecrets::default());

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stopped = false;
    let mut final_status = None;
    for _ in 0..200 {
        assert!(
            Instant::now() < deadline,
            "run never completed: {:?}",
            run.status
        );
        let outcome = advance(&run, Timestamp::now(), &measurer).await;
        run.status = Some(outcome.status.clone());
        let successes = phases_of(&outcome.status, "error-rate")
            .iter()
            .filter(|p| **p == AnalysisPhase::Successful)
            .count();
        if successes >= 2 && !stopped {
            prometheus.stop();
            stopped = true;
        }
        match outcome.requeue_after {
            None => {
                final_status = Some(outcome.status);
                break;
            }
            Some(after) => tokio::time::sleep(after.max(Duration::from_millis(20))).await,
        }
    }
    let status = final_status.expect("run completed");
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:?}");
    let result = &status.metric_results[0];
    assert_eq!(result.consecutive_error, 3, "{result:?}");
    assert_eq!(result.successful, 2, "{result:?}");
    let phases = phases_of(&status, "error-rate");
    assert_eq!(&phases[phases.len() - 3..], &[AnalysisPhase::Error; 3]);
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("3 errors in a row, limit 2"),
        "{status:?}"
    );

    // A completed run is never measured again.
    let again = advance(&run, Timestamp::now(), &measurer).await;
    assert_eq!(again.measured, 0);
    assert_eq!(Some(again.status), run.status);
}

/// An address where nothing listens: bound, then released, so connections to it are refused.
fn closed_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    format!("http://{address}")
}

/// Safety rule 10 on one status: nothing in it says success.
fn assert_not_successful(status: &AnalysisRunStatus) {
    assert_ne!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
    assert!(
        !status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("metrics successful"),
        "{status:#?}"
    );
    for result in &status.metric_results {
        if result.successful == 0 {
            assert_ne!(result.phase, AnalysisPhase::Successful, "{status:#?}");
        }
    }
}

/// Drives a run on a virtual clock, each pass exactly when the runner would come back to it, checking
/// `invariant` on the status of every pass; returns the final status and the virtual time it took.
async fn drive_virtual(
    mut run: AnalysisRun,
    measurer: &Measurer,
    invariant: impl Fn(&AnalysisRunStatus),
) -> (AnalysisRunStatus, Duration) {
    let start = Timestamp::now();
    let mut now = start;
    for _ in 0..100 {
        let outcome = advance(&run, now, measurer).await;
        invariant(&outcome.status);
        run.status = Some(outcome.status.clone());
        match outcome.requeue_after {
            None => {
                let took = Duration::try_from(now.duration_since(start)).unwrap_or_default();
                return (outcome.status, took);
            }
            Some(after) => {
                let step = SignedDuration::try_from(after.max(Duration::from_millis(50)))
                    .expect("requeue fits a signed duration");
                now = now.checked_add(step).expect("virtual clock stays in range");
            }
        }
    }
    panic!("run did not complete within 100 passes: {:?}", run.status);
}

/// Time between the end of one measurement and the start of the next.
fn gaps(status: &AnalysisRunStatus, metric: &str) -> Vec<Duration> {
    let measurements = status
        .metric_results
        .iter()
        .find(|r| r.name == metric)
        .map(|r| r.measurements.clone())
        .unwrap_or_default();
    measurements
        .windows(2)
        .map(|pair| {
            let previous = pair[0]
                .finished_at
                .as_ref()
                .unwrap_or(&pair[0].started_at)
                .0;
            Duration::try_from(pair[1].started_at.0.duration_since(previous)).unwrap_or_default()
        })
        .collect()
}

/// The reproduction: a metric `successCondition: result > 0` on a Prometheus address that refuses
/// connections. Measured once (no count), its error used to make the run Successful ("all 1 metrics
/// successful" with `error: 1, successful: 0`); with `count: 3, interval: 1s` three errors did. Now the
/// errors are retried, never counted, and the run ends in Error after `consecutiveErrorLimit` (default 4).
#[tokio::test]
async fn refused_connections_end_in_error_after_the_limit_and_never_succeed() {
    let address = closed_address();
    let measurer = measurer(StaticSecrets::default());
    let once = Metric {
        name: "up".into(),
        success_condition: Some("result > 0".into()),
        provider: MetricProvider {
            prometheus: Some(PrometheusMetric {
                address: address.clone(),
                query: Some("vector(1)".into()),
                ..Default::default()
            }),
        },
        ..Default::default()
    };
    let mut counted = once.clone();
    counted.count = Some(IntOrString::Int(3));
    counted.interval = Some(ManifestDuration::Text("1s".into()));

    for (name, metric, spacing) in [
        ("measured-once", once, Duration::from_secs(10)),
        ("count-3", counted, Duration::from_secs(1)),
    ] {
        let run = analysis_run(name, vec![], vec![metric]);
        let (status, _) = drive_virtual(run, &measurer, assert_not_successful).await;
        assert_eq!(
            status.phase,
            Some(AnalysisPhase::Error),
            "{name}: {status:#?}"
        );
        let result = &status.metric_results[0];
        assert_eq!(
            (
                result.phase,
                result.count,
                result.error,
                result.consecutive_error,
                result.successful
            ),
            (AnalysisPhase::Error, 5, 5, 5, 0),
            "{name}: five errors, the fifth passes the default limit of 4: {result:#?}"
        );
        let message = status.message.clone().unwrap_or_default();
        assert!(
            message.starts_with(r#"metric "up": 5 errors in a row, limit 4; last: prometheus at "#)
                && message.contains("is unreachable"),
            "{name}: {message}"
        );
        // Errors are retried one interval apart (10s without an interval), not hammered.
        for gap in gaps(&status, "up") {
            assert!(
                gap >= spacing,
                "{name}: measured again after {gap:?}: {status:#?}"
            );
        }
    }
}

/// The same with a real Prometheus that answered first and then stopped: the successful first measurement
/// and two errors used to make three and a Successful run; now the errors go on until the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_after_answering_never_completes_a_count_with_errors() {
    let exporter = Exporter::start(http_traffic("checkout", "h", 100.0, 0.0, 0.08)).await;
    let mut prometheus = Prometheus::start(&[exporter.address]).await;
    prometheus
        .wait_for(
            r#"sum(rate(http_requests_total[5s])) > 0"#,
            Duration::from_secs(60),
        )
        .await;
    let up = with_query(
        metric("requests", &prometheus.url, Some("result > 0"), None),
        r#"sum(rate(http_requests_total{service="checkout"}[5s]))"#,
    );
    let mut run = analysis_run("stopped", vec![], vec![up]);
    let measurer = measurer(StaticSecrets::default());

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stopped_after = None;
    let mut final_status = None;
    for pass in 0..200 {
        assert!(
            Instant::now() < deadline,
            "run never completed: {:?}",
            run.status
        );
        let outcome = advance(&run, Timestamp::now(), &measurer).await;
        assert_not_successful(&outcome.status);
        run.status = Some(outcome.status.clone());
        let successes = outcome.status.metric_results[0].successful;
        if successes >= 1 && stopped_after.is_none() {
            prometheus.stop();
            stopped_after = Some(pass);
        }
        match outcome.requeue_after {
            None => {
                final_status = Some(outcome.status);
                break;
            }
            Some(after) => tokio::time::sleep(after.max(Duration::from_millis(20))).await,
        }
    }
    assert!(
        stopped_after.is_some(),
        "Prometheus answered before it was stopped"
    );
    let status = final_status.expect("run completed");
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    let result = &status.metric_results[0];
    assert_eq!(result.successful, 1, "{result:#?}");
    assert_eq!(result.consecutive_error, 5, "{result:#?}");
    assert_eq!(
        phases_of(&status, "requests"),
        [
            vec![AnalysisPhase::Successful],
            vec![AnalysisPhase::Error; 5]
        ]
        .concat()
    );
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("5 errors in a row, limit 4"),
        "{status:#?}"
    );
}

/// A stand-in for Prometheus' query API that answers only requests with the expected credentials.
async fn fake_query_api(
    expected_authorization: &'static str,
) -> (String, tokio::task::JoinHandle<()>) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route(
            "/api/v1/query",
            axum::routing::get(move |headers: HeaderMap| async move {
                let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(expected_authorization)
                    && headers.get("x-scope-orgid").and_then(|v| v.to_str().ok()) == Some("team-a");
                if !authorized {
                    return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
                }
                (
                    [("content-type", "application/json")],
                    r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"service":"checkout"},"value":[1700000000,"0.01"]}]}}"#,
                )
                    .into_response()
            }),
        )
        .route(
            "/down/api/v1/query",
            axum::routing::get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "upstream down").into_response() }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}"), server)
}

#[tokio::test]
async fn credentials_from_secrets_and_custom_headers_are_sent() {
    use serin::crd::analysis::{BasicAuth, HttpHeader, PrometheusAuthentication};
    let secret = |name: &str, key: &str| SecretKeyRef {
        name: name.into(),
        key: key.into(),
    };
    let secrets = StaticSecrets::default()
        .with(NAMESPACE, "prom", "token", "t0ken")
        .with(NAMESPACE, "prom", "user", "alice")
        .with(NAMESPACE, "prom", "password", "pa:ss");
    // Each run is controlled by a Rollout whose template it copies, as Serin creates them.
    let drive_vouched = |mut run: AnalysisRun| {
        let measurer = vouched(&mut run, &secrets);
        async move { drive(run, &measurer).await }
    };
    let authenticated = |address: &str, auth: PrometheusAuthentication| {
        let mut m = with_query(metric("m", address, Some("result < 0.05"), None), "up");
        m.count = Some(IntOrString::Int(1));
        if let Some(p) = m.provider.prometheus.as_mut() {
            p.authentication = Some(auth);
            p.headers = vec![HttpHeader {
                name: "X-Scope-OrgID".into(),
                value: "team-a".into(),
            }];
        }
        m
    };
    let bearer = PrometheusAuthentication {
        bearer_token: Some(secret("prom", "token")),
        basic_auth: None,
    };
    let (address, server) = fake_query_api("Bearer t0ken").await;
    let status = drive_vouched(analysis_run(
        "bearer",
        vec![],
        vec![authenticated(&address, bearer.clone())],
    ))
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Successful), "{status:?}");
    server.abort();

    // "alice:pa:ss" in base64.
    let (address, server) = fake_query_api("Basic YWxpY2U6cGE6c3M=").await;
    let basic = PrometheusAuthentication {
        bearer_token: None,
        basic_auth: Some(BasicAuth {
            username: secret("prom", "user"),
            password: secret("prom", "password"),
        }),
    };
    let status = drive_vouched(analysis_run(
        "basic",
        vec![],
        vec![authenticated(&address, basic)],
    ))
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Successful), "{status:?}");

    // Wrong credentials: an HTTP error, so an Error measurement, never a success.
    let mut rejected = authenticated(&address, bearer.clone());
    rejected.consecutive_error_limit = Some(0);
    let status = drive_vouched(analysis_run("rejected", vec![], vec![rejected])).await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:?}");
    assert!(
        status.message.as_deref().unwrap_or("").contains("HTTP 401"),
        "{status:?}"
    );

    let mut down = authenticated(&format!("{address}/down"), bearer);
    down.consecutive_error_limit = Some(0);
    let status = drive_vouched(analysis_run("down", vec![], vec![down])).await;
    assert!(
        status.message.as_deref().unwrap_or("").contains("HTTP 503"),
        "{status:?}"
    );

    let missing = PrometheusAuthentication {
        bearer_token: Some(secret("prom", "absent-key")),
        basic_auth: None,
    };
    let status = drive_vouched(analysis_run(
        "missing",
        vec![],
        vec![authenticated(&address, missing)],
    ))
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or("")
            .contains(r#"has no key "absent-key""#),
        "{status:?}"
    );
    server.abort();
}

mod in_simulated_cluster {
    //! The runner as a controller: AnalysisRuns in the simulated cluster (created, terminated and read
    //! through its API), judged on series a real Prometheus scrapes.

    use std::time::{Duration, Instant};

    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ListParams, Patch, PatchParams, PostParams};
    use kube::Api;
    use serde_json::json;
    use serin::analysis::runner::{self, RunnerConfig};
    use serin::crd::analysis::{
        AnalysisRun, AnalysisRunStatus, AnalysisTemplate, BuiltinCheckKind, TemplateArgument,
        TemplateArgumentValueFrom,
    };
    use serin::crd::rollout::SecretKeyRef;
    use serin::crd::{AnalysisPhase, Rollout};
    use serin_sim::{SimCluster, SimConfig};

    use super::support::{http_traffic, Exporter, Prometheus};
    use super::{
        analysis_run, arg, assert_not_successful, closed_address, metric, phases_of, values_of,
        with_check, with_query,
    };

    const NS: &str = "default";

    async fn wait_until_completed(
        api: &Api<AnalysisRun>,
        name: &str,
        within: Duration,
    ) -> AnalysisRunStatus {
        let deadline = Instant::now() + within;
        let mut last = None;
        for _ in 0..1000 {
            if let Ok(run) = api.get(name).await {
                if let Some(status) = run.status.clone() {
                    if status.phase.is_some_and(|p| p.is_completed()) {
                        return status;
                    }
                }
                last = run.status;
            }
            assert!(
                Instant::now() < deadline,
                "run {name} did not complete: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {name} did not complete: {last:?}");
    }

    /// Asserts the runner never measured a metric before its interval had passed since the last one.
    fn assert_spaced(status: &AnalysisRunStatus, interval: Duration) {
        for result in &status.metric_results {
            for pair in result.measurements.windows(2) {
                let previous = pair[0]
                    .finished_at
                    .as_ref()
                    .unwrap_or(&pair[0].started_at)
                    .0;
                let gap = pair[1].started_at.0.duration_since(previous);
                assert!(
                    gap.as_millis() >= interval.as_millis() as i128 - 5,
                    "metric {} measured again after {gap:?}: {result:?}",
                    result.name
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runner_measures_runs_of_the_simulated_cluster() {
        let sim = SimCluster::start(SimConfig::api_only()).await.expect("sim");
        let client = sim.client().await.expect("client");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("create CRD");
        }
        let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), NS);
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.list(&ListParams::default()).await.is_err() {
            assert!(Instant::now() < deadline, "AnalysisRun API never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "analysis-args", "namespace": NS},
            "stringData": {"service": "web"}
        }))
        .expect("secret");
        Api::<Secret>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &secret)
            .await
            .expect("create secret");

        let mut series = http_traffic("web", "good1", 100.0, 0.0, 0.02);
        series.extend(http_traffic("web", "bad1", 100.0, 0.2, 0.02));
        let exporter = Exporter::start(series).await;
        let prometheus = Prometheus::start(&[exporter.address]).await;
        prometheus
            .wait_for(
                r#"sum(rate(http_requests_total{pod_template_hash="bad1"}[5s])) > 0"#,
                Duration::from_secs(60),
            )
            .await;

        let handle = runner::spawn(
            client.clone(),
            RunnerConfig::allowing(None, super::loopback()),
        );
        let address = prometheus.url.as_str();
        let service_from_secret = TemplateArgument {
            name: "service".into(),
            value: None,
            value_from: Some(TemplateArgumentValueFrom {
                secret_key_ref: SecretKeyRef {
                    name: "analysis-args".into(),
                    key: "service".into(),
                },
            }),
        };
        let error_rate = || {
            with_check(
                metric("error-rate", address, Some("result < 0.05"), None),
                BuiltinCheckKind::ErrorRate,
            )
        };
        let latency = || {
            with_check(
                metric("p99-latency", address, Some("result <= 0.5"), None),
                BuiltinCheckKind::LatencyP99,
            )
        };
        let mut failing = error_rate();
        failing.failure_limit = Some(1);
        let mut background = error_rate();
        background.count = None;

        // The runs reading Secrets are controlled by a Rollout whose template names the Secret (and whose
        // own args name the absent one): only such runs may make the runner read Secrets.
        let template: AnalysisTemplate = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
            "metadata": {"name": "secret-args", "namespace": NS},
            "spec": {
                "args": [service_from_secret.clone(), {"name": "canary-hash"}],
                "metrics": [error_rate(), latency()]
            }
        }))
        .expect("template");
        Api::<AnalysisTemplate>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &template)
            .await
            .expect("create template");
        let rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "app", "image": "web:1"}]}},
                "strategy": {"canary": {
                    "stableService": "web", "canaryService": "web-canary",
                    "analysis": {
                        "templates": [{"templateName": "secret-args"}],
                        "args": [{"name": "service", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "service"}}}]
                    }
                }}
            }
        }))
        .expect("rollout");
        let rollout = Api::<Rollout>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &rollout)
            .await
            .expect("create rollout");
        let owner = serin::controller::act::owner_reference(&rollout).expect("created with a uid");
        let owned = |mut run: AnalysisRun| {
            run.metadata.owner_references = Some(vec![owner.clone()]);
            run
        };

        let to_create = vec![
            owned(analysis_run(
                "good",
                vec![service_from_secret.clone(), arg("canary-hash", "good1")],
                vec![error_rate(), latency()],
            )),
            owned(analysis_run(
                "bad",
                vec![service_from_secret.clone(), arg("canary-hash", "bad1")],
                vec![failing],
            )),
            analysis_run(
                "background",
                vec![arg("service", "web"), arg("canary-hash", "good1")],
                vec![background],
            ),
            owned(analysis_run(
                "no-secret",
                vec![
                    TemplateArgument {
                        name: "service".into(),
                        value: None,
                        value_from: Some(TemplateArgumentValueFrom {
                            secret_key_ref: SecretKeyRef {
                                name: "absent".into(),
                                key: "service".into(),
                            },
                        }),
                    },
                    arg("canary-hash", "good1"),
                ],
                vec![error_rate()],
            )),
        ];
        for mut run in to_create {
            run.metadata.namespace = Some(NS.into());
            runs.create(&PostParams::default(), &run)
                .await
                .expect("create run");
        }

        let good = wait_until_completed(&runs, "good", Duration::from_secs(60)).await;
        assert_eq!(good.phase, Some(AnalysisPhase::Successful), "{good:?}");
        assert_eq!(
            phases_of(&good, "error-rate"),
            vec![AnalysisPhase::Successful; 3],
            "{good:?}"
        );
        assert_eq!(
            phases_of(&good, "p99-latency"),
            vec![AnalysisPhase::Successful; 3],
            "{good:?}"
        );
        assert_spaced(&good, Duration::from_secs(1));

        let bad = wait_until_completed(&runs, "bad", Duration::from_secs(60)).await;
        assert_eq!(bad.phase, Some(AnalysisPhase::Failed), "{bad:?}");
        for value in values_of(&bad, "error-rate") {
            let rate: f64 = value.parse().unwrap_or(f64::NAN);
            assert!((rate - 0.2).abs() < 0.02, "recorded error rate {value}");
        }
        let message = bad.message.clone().unwrap_or_default();
        assert!(
            message.starts_with(r#"metric "error-rate": value 0."#),
            "{message}"
        );
        assert!(
            message.contains(
                r#"failed condition "result < 0.05" (2 of 2 measurements failed, limit 1)"#
            ),
            "{message}"
        );

        let no_secret = wait_until_completed(&runs, "no-secret", Duration::from_secs(30)).await;
        assert_eq!(no_secret.phase, Some(AnalysisPhase::Error));
        assert!(
            no_secret
                .message
                .as_deref()
                .unwrap_or("")
                .contains("secret default/absent does not exist"),
            "{no_secret:?}"
        );

        // A restarted runner continues the background run from its status, without an early measurement.
        handle.shutdown().await.expect("runner stops");
        let before = runs
            .get("background")
            .await
            .expect("background run")
            .status
            .unwrap_or_default();
        let handle = runner::spawn(
            client.clone(),
            RunnerConfig::allowing(None, super::loopback()),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let taken_before = before.metric_results.first().map(|r| r.count).unwrap_or(0);
        loop {
            let now = runs
                .get("background")
                .await
                .expect("background run")
                .status
                .unwrap_or_default();
            if now.metric_results.first().map(|r| r.count).unwrap_or(0) >= taken_before + 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "restarted runner did not measure: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        runs.patch(
            "background",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"terminate": true}})),
        )
        .await
        .expect("terminate");
        let background = wait_until_completed(&runs, "background", Duration::from_secs(30)).await;
        assert_eq!(
            background.phase,
            Some(AnalysisPhase::Successful),
            "{background:?}"
        );
        assert!(
            background
                .message
                .as_deref()
                .unwrap_or("")
                .starts_with("terminated"),
            "{background:?}"
        );
        assert_spaced(&background, Duration::from_secs(1));

        // Completed runs are left alone: nothing is measured or written any more.
        let settled = runs.get("good").await.expect("good run");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let later = runs.get("good").await.expect("good run");
        assert_eq!(
            settled.metadata.resource_version,
            later.metadata.resource_version
        );

        handle.shutdown().await.expect("runner stops");
        sim.shutdown().await;
    }

    /// The runner as a controller, on an address that refuses connections: every status it writes to the API
    /// server is checked, none says success, and the run ends in Error after the default limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runner_never_writes_success_for_a_run_whose_prometheus_refuses_connections() {
        let sim = SimCluster::start(SimConfig::api_only()).await.expect("sim");
        let client = sim.client().await.expect("client");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("create CRD");
        }
        let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), NS);
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.list(&ListParams::default()).await.is_err() {
            assert!(Instant::now() < deadline, "AnalysisRun API never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let handle = runner::spawn(
            client.clone(),
            RunnerConfig::allowing(None, super::loopback()),
        );
        // `count: 3, interval: 1s`, default consecutiveErrorLimit.
        let refused = with_query(
            metric("up", &closed_address(), Some("result > 0"), None),
            "vector(1)",
        );
        let mut run = analysis_run("refused", vec![], vec![refused]);
        run.metadata.namespace = Some(NS.into());
        runs.create(&PostParams::default(), &run)
            .await
            .expect("create run");

        let deadline = Instant::now() + Duration::from_secs(30);
        let mut versions_seen = 0;
        let mut last_version = None;
        let status = loop {
            let stored = runs.get("refused").await.expect("run exists");
            if stored.metadata.resource_version != last_version {
                versions_seen += 1;
                last_version = stored.metadata.resource_version.clone();
            }
            let status = stored.status.unwrap_or_default();
            assert_not_successful(&status);
            if status.phase.is_some_and(|p| p.is_completed()) {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "run never completed: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
        let result = &status.metric_results[0];
        assert_eq!(
            (result.count, result.error, result.successful),
            (5, 5, 0),
            "{result:#?}"
        );
        assert!(
            versions_seen >= 3,
            "statuses were written as it went: {versions_seen}"
        );
        handle.shutdown().await.expect("runner stops");
        sim.shutdown().await;
    }

    async fn create_replica_set(
        client: &kube::Client,
        name: &str,
        hash: &str,
        annotations: serde_json::Value,
    ) {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web", "pod-template-hash": hash}},
                "template": {
                    "metadata": {"labels": {"app": "web", "pod-template-hash": hash}, "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": format!("web:{hash}")}]}
                }
            }
        }))
        .expect("replica set");
        Api::<ReplicaSet>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &rs)
            .await
            .expect("create replica set");
    }

    /// The simulator's traffic (a healthy version, one answering 20% errors, one slow), scraped by
    /// Prometheus from the simulated cluster's `/metrics`, judged by the runner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simulated_traffic_scraped_by_prometheus_passes_and_fails_as_it_should() {
        let sim = SimCluster::start(SimConfig::default()).await.expect("sim");
        let client = sim.client().await.expect("client");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("create CRD");
        }
        let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), NS);
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.list(&ListParams::default()).await.is_err() {
            assert!(Instant::now() < deadline, "AnalysisRun API never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        create_replica_set(&client, "web-good", "good1", json!({})).await;
        create_replica_set(
            &client,
            "web-errors",
            "errors1",
            json!({"sim.serin.dev/error-rate": "0.2"}),
        )
        .await;
        create_replica_set(
            &client,
            "web-slow",
            "slow1",
            json!({"sim.serin.dev/latency-p50": "1s", "sim.serin.dev/latency-p99": "2s"}),
        )
        .await;
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .expect("service");
        Api::<Service>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &service)
            .await
            .expect("create service");

        let sim_address: std::net::SocketAddr = sim
            .base_url()
            .trim_start_matches("http://")
            .parse()
            .expect("sim address");
        let prometheus = Prometheus::start(&[sim_address]).await;
        for hash in ["good1", "errors1", "slow1"] {
            prometheus
                .wait_for(
                    &format!(
                        r#"sum(rate(http_requests_total{{pod_template_hash="{hash}"}}[5s])) > 0"#
                    ),
                    Duration::from_secs(60),
                )
                .await;
        }

        let handle = runner::spawn(
            client.clone(),
            RunnerConfig::allowing(None, super::loopback()),
        );
        let address = prometheus.url.as_str();
        let args = |hash: &str| vec![arg("service", "web"), arg("canary-hash", hash)];
        let error_rate = || {
            with_check(
                metric("error-rate", address, Some("result < 0.05"), None),
                BuiltinCheckKind::ErrorRate,
            )
        };
        let latency = || {
            with_check(
                metric("p99-latency", address, Some("result <= 0.5"), None),
                BuiltinCheckKind::LatencyP99,
            )
        };
        for (name, hash) in [
            ("v2-good", "good1"),
            ("v3-errors", "errors1"),
            ("v4-slow", "slow1"),
        ] {
            let mut run = analysis_run(name, args(hash), vec![error_rate(), latency()]);
            run.metadata.namespace = Some(NS.into());
            runs.create(&PostParams::default(), &run)
                .await
                .expect("create run");
        }

        let good = wait_until_completed(&runs, "v2-good", Duration::from_secs(60)).await;
        assert_eq!(good.phase, Some(AnalysisPhase::Successful), "{good:?}");

        let errors = wait_until_completed(&runs, "v3-errors", Duration::from_secs(60)).await;
        assert_eq!(errors.phase, Some(AnalysisPhase::Failed), "{errors:?}");
        let recorded = values_of(&errors, "error-rate");
        let rate: f64 = recorded
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        assert!(
            (rate - 0.2).abs() < 0.03,
            "recorded error rate {recorded:?}"
        );
        assert!(
            errors
                .message
                .as_deref()
                .unwrap_or("")
                .starts_with(r#"metric "error-rate": value 0."#),
            "{errors:?}"
        );

        let slow = wait_until_completed(&runs, "v4-slow", Duration::from_secs(60)).await;
        assert_eq!(slow.phase, Some(AnalysisPhase::Failed), "{slow:?}");
        let p99: f64 = values_of(&slow, "p99-latency")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        assert!(p99 > 0.5, "recorded p99 {p99}");
        assert!(
            slow.message
                .as_deref()
                .unwrap_or("")
                .contains(r#"metric "p99-latency""#),
            "{slow:?}"
        );

        handle.shutdown().await.expect("runner stops");
        sim.shutdown().await;
    }
}
