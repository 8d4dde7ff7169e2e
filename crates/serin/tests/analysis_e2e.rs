//! Rollout-level analysis end to end: the real controller (with its AnalysisRun runner) on the simulated
//! cluster, whose traffic a real `prometheus` process scrapes every second; a healthy canary is promoted, one
//! answering 20% errors or with a slow p99 is aborted and all simulated traffic goes back to the stable
//! version; a blue-green rollout whose pre-promotion analysis fails never switches its active Service; a
//! canary whose Prometheus stops answering mid-analysis is aborted, never promoted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;
use serin_testkit::exporter as prometheus;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin::analysis::outbound::OutboundConfig;
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::analysis::{AnalysisRun, AnalysisTemplate};
use serin::crd::{AnalysisPhase, Rollout, RolloutPhase};
use serin_sim::load::TrafficConfig;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{SimCluster, SimConfig};
use support::{blue_green_rollout, canary_rollout, expect_selectors, template, State, World, NS};

const APP: &str = "checkout";

/// The simulated cluster with workload and traffic simulators, Serin's CRDs, one controller, and a
/// Prometheus scraping the simulated request metrics.
struct Bed {
    world: World,
    prometheus: prometheus::Prometheus,
    controller: Option<ControllerHandle>,
}

async fn start() -> Bed {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sim = SimCluster::start(SimConfig {
        workload: Some(WorkloadConfig {
            default_ready_delay: Duration::from_millis(100),
            resync: Duration::from_secs(2),
        }),
        traffic: Some(TrafficConfig::default()),
        ..SimConfig::default()
    })
    .await
    .expect("sim starts");
    let admin = sim.client().await.expect("admin client");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in serin::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("CRD is accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Api::<Rollout>::namespaced(admin.clone(), NS)
        .list(&ListParams::default())
        .await
        .is_err()
        || Api::<AnalysisTemplate>::namespaced(admin.clone(), NS)
            .list(&ListParams::default())
            .await
            .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "Serin's CRDs never became servable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target: SocketAddr = sim
        .metrics_url()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("the sim listens on a socket address");
    let prometheus = prometheus::Prometheus::start(&[target]).await;
    let controller = ControllerHandle::start(
        sim.client_as(support::CONTROLLER_USER)
            .await
            .expect("controller client"),
        ControllerConfig {
            error_backoff: Duration::from_millis(200),
            // Prometheus listens on loopback, which the outbound policy opens only when listed.
            outbound: OutboundConfig::allowing(["127.0.0.1"]).expect("a valid destination"),
            ..ControllerConfig::default()
        },
    )
    .await
    .expect("controller starts");
    assert!(
        controller.wait_ready(Duration::from_secs(10)).await,
        "controller caches never synced"
    );
    Bed {
        world: World::from_parts(sim, admin),
        prometheus,
        controller: Some(controller),
    }
}

impl Bed {
    async fn stop(mut self) {
        if let Some(controller) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        }
        self.prometheus.stop();
        self.world.stop().await;
    }

    fn client(&self) -> Client {
        self.world.admin.clone()
    }

    async fn apply_template(&self, manifest: Value) {
        let template: AnalysisTemplate =
            serde_json::from_value(manifest).expect("manifest decodes as an AnalysisTemplate");
        Api::<AnalysisTemplate>::namespaced(self.client(), NS)
            .create(&PostParams::default(), &template)
            .await
            .expect("AnalysisTemplate accepted");
    }

    /// AnalysisRuns whose name contains `hash` (runs are named after the canary's pod-template hash).
    async fn runs_of(&self, hash: &str) -> Vec<AnalysisRun> {
        Api::<AnalysisRun>::namespaced(self.client(), NS)
            .list(&ListParams::default())
            .await
            .expect("list AnalysisRuns")
            .items
            .into_iter()
            .filter(|run| run.name_any().contains(hash))
            .collect()
    }

    /// Share of the app's simulated requests (last second) per pod-template hash.
    fn recent_share(&self) -> std::collections::BTreeMap<String, f64> {
        self.world
            .sim
            .traffic()
            .expect("traffic simulator runs")
            .recent_share(NS, APP, Duration::from_secs(1))
    }

    /// Waits (bounded) until the stable version gets all the app's simulated traffic.
    async fn expect_all_traffic_on(&self, hash: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for _ in 0..((within.as_millis() / 100) + 1) {
            let share = self.recent_share();
            if share.get(hash).copied().unwrap_or(0.0) >= 0.999 {
                return;
            }
            if Instant::now() >= deadline {
                panic!("traffic never all on {hash} within {within:?}: {share:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("traffic never all on {hash}: {:?}", self.recent_share());
    }
}

/// A template with one built-in check of the canary's requests.
fn check_template(name: &str, kind: &str, success: &str, address: &str) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "args": [{"name": "service"}, {"name": "canary-hash"}],
            "metrics": [{
                "name": name,
                // rate() answers once Prometheus has scraped the new pods' series twice.
                "initialDelay": "5s",
                "interval": "2s",
                "count": 2,
                "inconclusiveLimit": 1,
                "successCondition": success,
                "provider": {"prometheus": {
                    "address": address,
                    "timeout": "5s",
                    "check": {
                        "kind": kind,
                        "service": "{{args.service}}",
                        "podTemplateHash": "{{args.canary-hash}}",
                        "window": "10s"
                    }
                }}
            }]
        }
    })
}

fn analysis_rollout() -> Value {
    let analysis = json!({
        "templates": [{"templateName": "error-rate"}, {"templateName": "p99-latency"}],
        "args": [
            {"name": "service", "value": APP},
            {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
        ]
    });
    canary_rollout(
        APP,
        5,
        "checkout:v1",
        json!({
            "abortScaleDownDelaySeconds": 0,
            "steps": [{"setWeight": 40}, {"analysis": analysis}, {"setWeight": 100}]
        }),
    )
}

fn healthy_and_done(state: &State) -> bool {
    state.is(RolloutPhase::Healthy)
        && state.current_hash().is_some()
        && state.stable_hash() == state.current_hash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analysis_promotes_a_healthy_canary_and_aborts_erroring_and_slow_ones() {
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        let bed = start().await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(check_template(
            "error-rate",
            "ErrorRate",
            "result < 0.05",
            &address,
        ))
        .await;
        bed.apply_template(check_template(
            "p99-latency",
            "LatencyP99",
            "result <= 0.5",
            &address,
        ))
        .await;
        bed.world
            .given_services(APP, &[APP, &format!("{APP}-canary")])
            .await;
        bed.world
            .given_rollout(analysis_rollout())
            .await
            .expect("Rollout accepted");
        let v1 = bed
            .world
            .then_eventually(APP, "v1 Healthy", Duration::from_secs(30), healthy_and_done)
            .await
            .current_hash()
            .expect("v1 hash");

        // Prometheus scrapes the simulated traffic before any analysis asks it.
        bed.prometheus
            .wait_for(
                &format!(r#"sum(rate(http_requests_total{{service="{APP}",pod_template_hash="{v1}"}}[10s])) > 0"#),
                Duration::from_secs(60),
            )
            .await;

        // v2, healthy: the analysis step passes on real measurements and the rollout completes.
        bed.world.when_image_changes(APP, "checkout:v2").await;
        let v2_state = bed
            .world
            .then_eventually(APP, "v2 Healthy", Duration::from_secs(90), |s| {
                healthy_and_done(s) && s.current_hash().as_deref() != Some(v1.as_str())
            })
            .await;
        let v2 = v2_state.current_hash().expect("v2 hash");
        expect_selectors(
            &v2_state,
            &[(APP, Some(v2.as_str())), (&format!("{APP}-canary"), Some(v2.as_str()))],
        );
        let v2_runs = bed.runs_of(&v2).await;
        assert_eq!(v2_runs.len(), 1, "one run for v2's analysis step: {v2_runs:#?}");
        let v2_status = v2_runs[0].status.clone().expect("v2 run has status");
        assert_eq!(
            v2_status.phase,
            Some(AnalysisPhase::Successful),
            "{v2_status:#?}"
        );
        for metric in ["error-rate", "p99-latency"] {
            let result = v2_status
                .metric_results
                .iter()
                .find(|r| r.name == metric)
                .unwrap_or_else(|| panic!("no result for {metric}: {v2_status:#?}"));
            assert!(
                result
                    .measurements
                    .iter()
                    .filter(|m| m.phase == AnalysisPhase::Successful)
                    .count()
                    >= 2,
                "{metric} was measured healthy twice: {result:#?}"
            );
            assert!(
                result
                    .measurements
                    .iter()
                    .all(|m| m.phase != AnalysisPhase::Failed),
                "{metric} never failed: {result:#?}"
            );
        }
        bed.expect_all_traffic_on(&v2, Duration::from_secs(10)).await;

        // v3 answers 20% errors: the error-rate metric fails, the rollout aborts, traffic returns to v2.
        bed.world
            .when_template_changes(
                APP,
                template(APP, "checkout:v3", json!({"sim.serin.dev/error-rate": "0.2"})),
            )
            .await;
        let aborted = bed
            .world
            .then_eventually(APP, "v3 Aborted", Duration::from_secs(90), |s| {
                s.is(RolloutPhase::Degraded)
                    || s.is(RolloutPhase::Aborted)
                        && s.current_hash().as_deref() != Some(v2.as_str())
            })
            .await;
        assert_eq!(
            aborted.phase(),
            Some(RolloutPhase::Aborted),
            "{aborted:#?}"
        );
        assert_eq!(aborted.stable_hash().as_deref(), Some(v2.as_str()));
        let v3 = aborted.current_hash().expect("v3 hash");
        assert!(
            aborted.message().contains("error-rate"),
            "the Rollout's message names the failed metric: {}",
            aborted.message()
        );
        let analysis_message = aborted
            .rollout
            .status
            .as_ref()
            .and_then(|s| s.analysis.as_ref())
            .and_then(|a| a.message.clone())
            .unwrap_or_default();
        assert!(
            analysis_message.contains("error-rate") && analysis_message.contains("result < 0.05"),
            "status.analysis.message names metric and condition: {analysis_message:?}"
        );

        let back = bed
            .world
            .then_eventually(
                APP,
                "both Services back on v2",
                Duration::from_secs(20),
                |s| {
                    s.selector_hash(APP).as_deref() == Some(v2.as_str())
                        && s.selector_hash(&format!("{APP}-canary")).as_deref()
                            == Some(v2.as_str())
                },
            )
            .await;
        assert_eq!(back.weight(), 0, "{back:#?}");
        bed.expect_all_traffic_on(&v2, Duration::from_secs(15)).await;

        let v3_runs = bed.runs_of(&v3).await;
        assert_eq!(v3_runs.len(), 1, "one run for v3's analysis step: {v3_runs:#?}");
        let v3_status = v3_runs[0].status.clone().expect("v3 run has status");
        assert_eq!(v3_status.phase, Some(AnalysisPhase::Failed), "{v3_status:#?}");
        let error_rate = v3_status
            .metric_results
            .iter()
            .find(|r| r.name == "error-rate")
            .expect("error-rate result");
        assert_eq!(error_rate.phase, AnalysisPhase::Failed, "{error_rate:#?}");
        let failed = error_rate
            .measurements
            .iter()
            .find(|m| m.phase == AnalysisPhase::Failed)
            .expect("a failed measurement");
        let value: f64 = failed
            .value
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("numeric value: {failed:#?}"));
        assert!(
            (0.15..=0.25).contains(&value),
            "measured error rate about 0.2: {value}"
        );
        let message = v3_status
            .message
            .clone()
            .or_else(|| error_rate.message.clone())
            .unwrap_or_default();
        assert!(
            message.contains("error-rate") && message.contains("result < 0.05"),
            "the run's message names metric and condition: {message:?}"
        );

        // v4 answers quickly but with a slow tail: the latency check fails and the rollout aborts again.
        bed.world
            .when_template_changes(
                APP,
                template(
                    APP,
                    "checkout:v4",
                    // null removes v3's annotation from the merge-patched template.
                    json!({"sim.serin.dev/error-rate": null, "sim.serin.dev/latency-p99": "800ms"}),
                ),
            )
            .await;
        let slow = bed
            .world
            .then_eventually(APP, "v4 Aborted", Duration::from_secs(90), |s| {
                s.is(RolloutPhase::Degraded)
                    || s.is(RolloutPhase::Aborted)
                        && s.current_hash().is_some_and(|h| h != v2 && h != v3)
            })
            .await;
        assert_eq!(slow.phase(), Some(RolloutPhase::Aborted), "{slow:#?}");
        assert_eq!(slow.stable_hash().as_deref(), Some(v2.as_str()));
        assert!(
            slow.message().contains("p99-latency"),
            "the Rollout's message names the failed metric: {}",
            slow.message()
        );
        let v4 = slow.current_hash().expect("v4 hash");
        bed.expect_all_traffic_on(&v2, Duration::from_secs(15)).await;
        let v4_runs = bed.runs_of(&v4).await;
        assert_eq!(v4_runs.len(), 1, "one run for v4's analysis step: {v4_runs:#?}");
        let v4_status = v4_runs[0].status.clone().expect("v4 run has status");
        let latency = v4_status
            .metric_results
            .iter()
            .find(|r| r.name == "p99-latency")
            .expect("p99-latency result");
        assert_eq!(latency.phase, AnalysisPhase::Failed, "{v4_status:#?}");
        assert!(
            v4_status
                .metric_results
                .iter()
                .filter(|r| r.name == "error-rate")
                .all(|r| r.phase != AnalysisPhase::Failed),
            "v4 answers without errors, only latency fails: {v4_status:#?}"
        );
        let slow_value: f64 = latency
            .measurements
            .iter()
            .find(|m| m.phase == AnalysisPhase::Failed)
            .and_then(|m| m.value.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a failed numeric p99: {latency:#?}"));
        assert!(
            slow_value > 0.5 && slow_value <= 1.0,
            "measured p99 above the 0.5s threshold: {slow_value}"
        );
        bed.stop().await;
    })
    .await;
    assert!(outcome.is_ok(), "test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_with_failing_pre_promotion_analysis_never_switches_active() {
    let outcome = tokio::time::timeout(Duration::from_secs(240), async {
        let bed = start().await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(check_template(
            "error-rate",
            "ErrorRate",
            "result < 0.05",
            &address,
        ))
        .await;
        let preview = format!("{APP}-preview");
        bed.world.given_services(APP, &[APP, &preview]).await;
        bed.world
            .given_rollout(blue_green_rollout(
                APP,
                3,
                "checkout:v1",
                json!({
                    "autoPromotionEnabled": true,
                    "prePromotionAnalysis": {
                        "templates": [{"templateName": "error-rate"}],
                        "args": [
                            {"name": "service", "value": APP},
                            {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
                        ]
                    }
                }),
            ))
            .await
            .expect("Rollout accepted");
        let v1 = bed
            .world
            .then_eventually(APP, "v1 Healthy", Duration::from_secs(30), healthy_and_done)
            .await
            .current_hash()
            .expect("v1 hash");
        bed.prometheus
            .wait_for(
                &format!(
                    r#"sum(rate(http_requests_total{{service="{APP}",pod_template_hash="{v1}"}}[10s])) > 0"#
                ),
                Duration::from_secs(60),
            )
            .await;

        bed.world
            .when_template_changes(
                APP,
                template(APP, "checkout:v2", json!({"sim.serin.dev/error-rate": "0.2"})),
            )
            .await;
        let aborted = bed
            .world
            .then_eventually_checking(
                APP,
                "v2 Aborted by its pre-promotion analysis",
                Duration::from_secs(90),
                |s| {
                    assert_eq!(
                        s.selector_hash(APP).as_deref(),
                        Some(v1.as_str()),
                        "the active Service never leaves v1: {s:#?}"
                    )
                },
                |s| {
                    s.is(RolloutPhase::Degraded)
                        || s.is(RolloutPhase::Aborted)
                            && s.current_hash().as_deref() != Some(v1.as_str())
                },
            )
            .await;
        assert_eq!(aborted.phase(), Some(RolloutPhase::Aborted), "{aborted:#?}");
        assert_eq!(aborted.stable_hash().as_deref(), Some(v1.as_str()));
        assert!(
            aborted.message().contains("error-rate"),
            "the Rollout's message names the failed metric: {}",
            aborted.message()
        );
        let v2 = aborted.current_hash().expect("v2 hash");
        let runs = bed.runs_of(&v2).await;
        assert_eq!(runs.len(), 1, "one pre-promotion run: {runs:#?}");
        assert_eq!(
            runs[0].status.as_ref().and_then(|s| s.phase),
            Some(AnalysisPhase::Failed),
            "{runs:#?}"
        );
        bed.stop().await;
    })
    .await;
    assert!(outcome.is_ok(), "test timed out");
}

/// A template whose one metric is measured five times, two seconds apart, with the default
/// consecutiveErrorLimit (4): enough measurements left after the first success for an outage to matter.
fn outage_template(address: &str) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": "error-rate", "namespace": NS},
        "spec": {
            "args": [{"name": "service"}, {"name": "canary-hash"}],
            "metrics": [{
                "name": "error-rate",
                "initialDelay": "5s",
                "interval": "2s",
                "count": 5,
                "inconclusiveLimit": 2,
                "successCondition": "result < 0.05",
                "provider": {"prometheus": {
                    "address": address,
                    "timeout": "5s",
                    "check": {
                        "kind": "ErrorRate",
                        "service": "{{args.service}}",
                        "podTemplateHash": "{{args.canary-hash}}",
                        "window": "10s"
                    }
                }}
            }]
        }
    })
}

/// Prometheus answers the canary's analysis once, then stops. Before errors stopped counting toward `count`,
/// the first success and four errors made five measurements and a Successful run, and the canary was
/// promoted while nobody could see it. Now the errors go on until consecutiveErrorLimit, the run ends in
/// Error and the Rollout aborts: at every poll the stable revision is still v1 and the stable Service never
/// selects v2; in the end traffic and both Services are back on v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_mid_analysis_aborts_the_canary_and_never_promotes_it() {
    let outcome = tokio::time::timeout(Duration::from_secs(240), async {
        let mut bed = start().await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(outage_template(&address)).await;
        bed.world
            .given_services(APP, &[APP, &format!("{APP}-canary")])
            .await;
        let analysis = json!({
            "templates": [{"templateName": "error-rate"}],
            "args": [
                {"name": "service", "value": APP},
                {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
            ]
        });
        bed.world
            .given_rollout(canary_rollout(
                APP,
                5,
                "checkout:v1",
                json!({
                    "abortScaleDownDelaySeconds": 0,
                    "steps": [{"setWeight": 40}, {"analysis": analysis}, {"setWeight": 100}]
                }),
            ))
            .await
            .expect("Rollout accepted");
        let v1 = bed
            .world
            .then_eventually(APP, "v1 Healthy", Duration::from_secs(30), healthy_and_done)
            .await
            .current_hash()
            .expect("v1 hash");
        bed.prometheus
            .wait_for(
                &format!(r#"sum(rate(http_requests_total{{service="{APP}",pod_template_hash="{v1}"}}[10s])) > 0"#),
                Duration::from_secs(60),
            )
            .await;

        // Safety rules 4 and 9, at every poll: v1 stays stable and the stable Service never selects the canary.
        let never_promoted = |s: &State| {
            assert_eq!(
                s.stable_hash().as_deref(),
                Some(v1.as_str()),
                "the canary must never become stable: {s:#?}"
            );
            if let Some(canary) = s.current_hash().filter(|h| *h != v1) {
                assert_ne!(
                    s.selector_hash(APP).as_deref(),
                    Some(canary.as_str()),
                    "the stable Service must never select the canary: {s:#?}"
                );
            }
        };

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let at_analysis = bed
            .world
            .then_eventually_checking(
                APP,
                "v2 at its analysis step",
                Duration::from_secs(60),
                never_promoted,
                |s| s.current_hash().is_some_and(|h| h != v1) && s.step() == Some(1),
            )
            .await;
        let v2 = at_analysis.current_hash().expect("v2 hash");

        // Prometheus answers the first measurement...
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            never_promoted(&bed.world.state(APP).await);
            let answered = bed.runs_of(&v2).await.iter().any(|run| {
                run.status.as_ref().is_some_and(|s| {
                    s.metric_results.iter().any(|r| r.successful >= 1)
                })
            });
            if answered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "v2's analysis never measured a success: {:#?}",
                bed.runs_of(&v2).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...and then stops answering.
        bed.prometheus.stop();

        let aborted = bed
            .world
            .then_eventually_checking(
                APP,
                "v2 Aborted after its analysis errored",
                Duration::from_secs(90),
                never_promoted,
                |s| s.is(RolloutPhase::Aborted) || s.is(RolloutPhase::Healthy),
            )
            .await;
        assert_eq!(aborted.phase(), Some(RolloutPhase::Aborted), "{aborted:#?}");
        assert_eq!(aborted.current_hash().as_deref(), Some(v2.as_str()));
        assert!(
            aborted.message().contains("error-rate") && aborted.message().contains("errors in a row"),
            "the Rollout says which metric errored: {}",
            aborted.message()
        );

        let back = bed
            .world
            .then_eventually_checking(
                APP,
                "both Services back on v1 and the canary scaled down",
                Duration::from_secs(20),
                never_promoted,
                |s| {
                    s.selector_hash(APP).as_deref() == Some(v1.as_str())
                        && s.selector_hash(&format!("{APP}-canary")).as_deref() == Some(v1.as_str())
                        && s.replicas_of(&v2) == 0
                },
            )
            .await;
        assert_eq!(back.weight(), 0, "{back:#?}");
        assert_eq!(back.replicas_of(&v1), 5, "{back:#?}");
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15)).await;

        let runs = bed.runs_of(&v2).await;
        assert_eq!(runs.len(), 1, "one run for v2's analysis step: {runs:#?}");
        let status = runs[0].status.clone().expect("v2 run has status");
        assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
        let result = &status.metric_results[0];
        assert!(
            result.successful >= 1 && result.consecutive_error == 5,
            "answered, then five errors in a row: {result:#?}"
        );
        bed.stop().await;
    })
    .await;
    assert!(outcome.is_ok(), "test timed out");
}
