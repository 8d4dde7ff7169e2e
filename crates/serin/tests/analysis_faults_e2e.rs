//! Prometheus faults seen through the Rollout: the real controller (with its AnalysisRun runner) on the simulated
//! cluster, whose traffic a real `prometheus` process scrapes every second. Prometheus is killed and started
//! again (same port, kept or fresh data), answers NaN, no data or several series, under step analysis and
//! background analysis, with and without a traffic router.
//!
//! Every poll of every test checks that (a) the canary becomes stable only when every analysis run of it was
//! Successful (or a human promoted past it), and never while Prometheus is down; (b) the stable Service is
//! never pinned to the canary unless that is the first half of such a promotion (the status naming it stable
//! follows within seconds); and each test ends with (c) the Rollout converging, Healthy or Aborted, within a
//! bound counted from the end of the fault.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;
use serin_testkit::restartable_prometheus as restartable;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client, ResourceExt};
use restartable::{Data, RestartablePrometheus};
use serde_json::{json, Value};
use serin::crd::analysis::{AnalysisRun, AnalysisTemplate, MetricResult};
use serin::crd::{reason, AnalysisPhase, Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use serin_sim::load::TrafficConfig;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{SimCluster, SimConfig};
use support::{canary_rollout, State, World, NS};

const APP: &str = "checkout";
const CANARY_SERVICE: &str = "checkout-canary";
const ROUTE: &str = "checkout";
const TEMPLATE: &str = "health";
/// Time between two polls of the invariants.
const POLL: Duration = Duration::from_millis(100);
/// The stable Service may select a revision this long before the status write that names it stable lands
/// (the promotion switches the Service first and writes status last, in one reconcile).
const PROMOTION_WRITE_WINDOW: Duration = Duration::from_secs(10);

/// How traffic reaches the canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routing {
    /// No router: the share of ready pods behind the stable Service.
    Replicas,
    /// A Gateway API HTTPRoute whose backendRef weights Serin sets.
    GatewayApi,
}

/// The simulated cluster with workload and traffic simulators, Serin's CRDs, a controller, and a Prometheus
/// that scrapes the simulated requests and can be stopped and started again.
struct Bed {
    world: World,
    prometheus: RestartablePrometheus,
    routing: Routing,
}

fn upstream_crds_dir() -> PathBuf {
    support::fixtures::upstream_crds().unwrap_or_else(|why| panic!("{why}"))
}

fn http_routes(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    Api::namespaced_with(client.clone(), NS, &resource)
}

async fn start(routing: Routing) -> Bed {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sim = SimCluster::start(SimConfig {
        workload: Some(WorkloadConfig {
            default_ready_delay: support::POD_READY_DELAY,
            resync: Duration::from_secs(2),
        }),
        traffic: Some(TrafficConfig::default()),
        ..SimConfig::default()
    })
    .await
    .expect("sim starts");
    let admin = sim.client().await.expect("admin client");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    if routing == Routing::GatewayApi {
        let text = std::fs::read_to_string(upstream_crds_dir().join("gateway-api-httproutes.yaml"))
            .expect("HTTPRoute CRD readable");
        let upstream: CustomResourceDefinition =
            serde_yaml::from_str(&text).expect("HTTPRoute CRD parses");
        crds.create(&PostParams::default(), &upstream)
            .await
            .expect("HTTPRoute CRD accepted");
    }
    for crd in serin::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("Serin CRD accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        let routes_ready = routing == Routing::Replicas
            || http_routes(&admin)
                .list(&ListParams::default())
                .await
                .is_ok();
        let serin_ready = Api::<Rollout>::namespaced(admin.clone(), NS)
            .list(&ListParams::default())
            .await
            .is_ok()
            && Api::<AnalysisTemplate>::namespaced(admin.clone(), NS)
                .list(&ListParams::default())
                .await
                .is_ok();
        if routes_ready && serin_ready {
            break;
        }
        assert!(Instant::now() < deadline, "the CRDs never became servable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target: SocketAddr = sim
        .metrics_url()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("the sim serves its metrics on a socket address");
    let prometheus = RestartablePrometheus::start(&[target]).await;
    let mut world = World::from_parts(sim, admin);
    world.start_controller().await;
    Bed {
        world,
        prometheus,
        routing,
    }
}

impl Bed {
    async fn stop(mut self) {
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

    /// The Services (and, when routed, the HTTPRoute) of the app, the Rollout at v1; waits until v1 is
    /// Healthy and Prometheus has rates of its requests. Returns v1's pod-template hash.
    async fn given_app_at_v1(&self, canary: Value) -> String {
        self.world.given_services(APP, &[APP, CANARY_SERVICE]).await;
        let mut canary = canary;
        if self.routing == Routing::GatewayApi {
            let route: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": ROUTE, "namespace": NS},
                "spec": {
                    "parentRefs": [{"name": "gateway"}],
                    "rules": [{"backendRefs": [
                        {"name": APP, "port": 80, "weight": 100},
                        {"name": CANARY_SERVICE, "port": 80, "weight": 0}
                    ]}]
                }
            }))
            .expect("route manifest");
            http_routes(&self.client())
                .create(&PostParams::default(), &route)
                .await
                .expect("HTTPRoute created");
            canary["trafficRouting"] = json!({"gatewayAPI": {"httpRoute": ROUTE}});
        }
        self.world
            .given_rollout(canary_rollout(APP, 4, "checkout:v1", canary))
            .await
            .expect("Rollout accepted");
        let v1 = self
            .world
            .then_eventually(APP, "v1 Healthy", Duration::from_secs(30), |s| {
                s.is(RolloutPhase::Healthy)
                    && s.current_hash().is_some()
                    && s.stable_hash() == s.current_hash()
            })
            .await
            .current_hash()
            .expect("v1 hash");
        self.prometheus
            .wait_for(
                &format!(
                    r#"sum(rate(http_requests_total{{service="{APP}",pod_template_hash="{v1}"}}[10s])) > 0"#
                ),
                Duration::from_secs(60),
            )
            .await;
        v1
    }

    async fn runs(&self) -> Vec<AnalysisRun> {
        Api::<AnalysisRun>::namespaced(self.client(), NS)
            .list(&ListParams::default())
            .await
            .expect("list AnalysisRuns")
            .items
    }

    /// `(stable weight, canary weight)` of the HTTPRoute's rule; `None` without a router.
    async fn route_weights(&self) -> Option<(i64, i64)> {
        if self.routing != Routing::GatewayApi {
            return None;
        }
        let route = http_routes(&self.client())
            .get(ROUTE)
            .await
            .expect("HTTPRoute readable");
        let weight_of = |service: &str| {
            route.data["spec"]["rules"][0]["backendRefs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["name"].as_str() == Some(service))
                .and_then(|b| b["weight"].as_i64())
                .unwrap_or(1)
        };
        Some((weight_of(APP), weight_of(CANARY_SERVICE)))
    }

    /// Share of the app's simulated requests (last second) per pod-template hash.
    fn recent_share(&self) -> BTreeMap<String, f64> {
        self.world
            .sim
            .traffic()
            .expect("traffic simulator runs")
            .recent_share(NS, APP, Duration::from_secs(1))
    }

    /// Waits (bounded) until the version of `hash` serves all the app's simulated requests.
    async fn expect_all_traffic_on(&self, hash: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for _ in 0..(within.as_millis() / 100 + 1) {
            if self.recent_share().get(hash).copied().unwrap_or(0.0) >= 0.999 {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "traffic never all on {hash} within {within:?}: {:?}",
            self.recent_share()
        );
    }

    async fn command(&self, command: ManualCommand) {
        self.world.when_command(APP, command).await;
    }
}

/// One poll: the Rollout with its ReplicaSets and Services, every AnalysisRun, the route's weights.
struct Seen {
    state: State,
    runs: Vec<AnalysisRun>,
    route: Option<(i64, i64)>,
}

impl Seen {
    /// The runs of the revision `hash` (runs are named `<rollout>-<hash>-<kind>[-<attempt>]`).
    fn runs_of(&self, hash: &str) -> Vec<&AnalysisRun> {
        let prefix = format!("{APP}-{hash}-");
        self.runs
            .iter()
            .filter(|run| run.name_any().starts_with(&prefix))
            .collect()
    }

    /// The latest run of `hash` of a kind (`step1`, `background`): a retry adds `-2`, `-3`, ...
    fn run(&self, hash: &str, kind: &str) -> Option<&AnalysisRun> {
        let base = format!("{APP}-{hash}-{kind}");
        self.runs
            .iter()
            .filter(|run| {
                let name = run.name_any();
                name == base
                    || name
                        .strip_prefix(&base)
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|attempt| attempt.parse::<u32>().is_ok())
            })
            .max_by_key(|run| (run.name_any().len(), run.name_any()))
    }

    /// The one metric of the latest run of `hash` of a kind.
    fn metric(&self, hash: &str, kind: &str) -> Option<&MetricResult> {
        self.run(hash, kind)
            .and_then(|run| run.status.as_ref())
            .and_then(|status| status.metric_results.first())
    }

    fn run_phase(&self, hash: &str, kind: &str) -> Option<AnalysisPhase> {
        self.run(hash, kind)
            .and_then(|run| run.status.as_ref())
            .and_then(|status| status.phase)
    }

    /// The Rollout waits for a human because an analysis was inconclusive.
    fn paused_inconclusive(&self) -> bool {
        self.state.is(RolloutPhase::Paused)
            && self.state.condition("Paused")
                == Some(("True".to_string(), reason::PAUSED_INCONCLUSIVE.to_string()))
    }

    /// The Rollout waits for a human because an analysis was inconclusive; until then it must not have
    /// promoted anything past `stable` by itself (fails the test at once rather than at the timeout).
    fn paused_inconclusive_on(&self, stable: &str) -> bool {
        assert_eq!(
            self.state.stable_hash().as_deref(),
            Some(stable),
            "promoted on its own instead of pausing for a human:\n{self}"
        );
        self.paused_inconclusive()
    }

    /// The Rollout waits at a pause step.
    fn paused_at_step(&self, step: i32) -> bool {
        self.state.is(RolloutPhase::Paused)
            && self.state.step() == Some(step)
            && self.state.condition("Paused")
                == Some(("True".to_string(), reason::PAUSED_STEP.to_string()))
    }

    /// The revision `hash` is fully rolled out and stable.
    fn healthy_on(&self, hash: &str) -> bool {
        self.state.is(RolloutPhase::Healthy)
            && self.state.stable_hash().as_deref() == Some(hash)
            && self.state.current_hash().as_deref() == Some(hash)
    }

    /// The abort is complete: both Services pinned to `stable`, the canary scaled to 0, route weight 0.
    fn aborted_back_on(&self, stable: &str, canary: &str) -> bool {
        self.state.is(RolloutPhase::Aborted)
            && self.state.selector_hash(APP).as_deref() == Some(stable)
            && self.state.selector_hash(CANARY_SERVICE).as_deref() == Some(stable)
            && self.state.replicas_of(canary) == 0
            && self.route.is_none_or(|weights| weights == (100, 0))
    }
}

/// What a failure message needs of a poll, without the managed fields and timestamps of a full dump.
impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = &self.state;
        let status = state.rollout.status.clone().unwrap_or_default();
        writeln!(
            f,
            "rollout: phase {:?} (observed: {}), step {:?}, stable {:?}, current {:?}, abort {}, weight {}",
            state.phase(),
            state.observed(),
            state.step(),
            state.stable_hash(),
            state.current_hash(),
            status.abort,
            state.weight()
        )?;
        writeln!(f, "  message: {:?}", state.message())?;
        let pauses: Vec<&str> = status
            .pause_conditions
            .iter()
            .map(|p| p.reason.as_str())
            .collect();
        writeln!(f, "  pauses: {pauses:?}")?;
        for condition in &status.conditions {
            writeln!(
                f,
                "  condition {}={} ({}): {}",
                condition.type_, condition.status, condition.reason, condition.message
            )?;
        }
        for service in [APP, CANARY_SERVICE] {
            writeln!(
                f,
                "service {service} pinned to {:?}",
                state.selector_hash(service)
            )?;
        }
        for rs in &state.replica_sets {
            writeln!(
                f,
                "replicaset {} (revision {}): spec {}, ready {}",
                rs.pod_template_hash, rs.revision, rs.spec_replicas, rs.ready_replicas
            )?;
        }
        if let Some((stable, canary)) = self.route {
            writeln!(f, "route weights: stable {stable}, canary {canary}")?;
        }
        for run in &self.runs {
            let run_status = run.status.clone().unwrap_or_default();
            writeln!(
                f,
                "run {}: {:?}, terminate {}, message {:?}",
                run.name_any(),
                run_status.phase,
                run.spec.terminate,
                run_status.message
            )?;
            for metric in &run_status.metric_results {
                let last: Vec<String> = metric
                    .measurements
                    .iter()
                    .map(|m| format!("{}:{}", m.phase.as_str(), m.value.as_deref().unwrap_or("-")))
                    .collect();
                writeln!(
                    f,
                    "  metric {}: {:?}, {} measured ({} ok, {} failed, {} inconclusive, {} errors, {} in a row), last {last:?}",
                    metric.name,
                    metric.phase,
                    metric.count,
                    metric.successful,
                    metric.failed,
                    metric.inconclusive,
                    metric.error,
                    metric.consecutive_error
                )?;
            }
        }
        Ok(())
    }
}

/// The invariants, checked on every poll.
struct Guard {
    /// The revision that was stable before the update.
    stable: String,
    /// Runs a human promoted past (`serin promote` on an inconclusive analysis): a human decision, not a
    /// verdict of the analysis.
    overridden: BTreeSet<String>,
    /// The revision the stable Service selects before the status names it stable, and since when.
    switching: Option<(String, Instant)>,
    polls: u64,
}

impl Guard {
    fn new(stable: &str) -> Guard {
        Guard {
            stable: stable.to_string(),
            overridden: BTreeSet::new(),
            switching: None,
            polls: 0,
        }
    }

    async fn poll(&mut self, bed: &Bed) -> Seen {
        self.polls += 1;
        let state = bed.world.state(APP).await;
        let runs = bed.runs().await;
        let route = bed.route_weights().await;
        let seen = Seen { state, runs, route };
        self.check(&seen, bed.prometheus.is_running());
        seen
    }

    fn check(&mut self, seen: &Seen, prometheus_up: bool) {
        let state = &seen.state;
        let stable = state.stable_hash();
        // (a) A new stable revision: every analysis of it passed, and Prometheus was there to say so.
        if let Some(promoted) = stable.as_deref().filter(|h| *h != self.stable) {
            self.expect_analysis_passed(seen, promoted, "became stable");
            assert!(
                prometheus_up,
                "poll {}: revision {promoted} became stable while Prometheus was down:\n{seen}",
                self.polls
            );
        }
        // (b) The stable Service selects only the stable revision, except as the first half of a promotion.
        match state
            .selector_hash(APP)
            .filter(|pinned| Some(pinned) != stable.as_ref())
        {
            Some(pinned) => {
                let aborted = state.rollout.status.as_ref().is_some_and(|s| s.abort);
                assert!(
                    !aborted,
                    "poll {}: the stable Service selects {pinned} of an aborted rollout:\n{seen}",
                    self.polls
                );
                self.expect_analysis_passed(seen, &pinned, "is selected by the stable Service");
                assert!(
                    prometheus_up,
                    "poll {}: the stable Service moved to {pinned} while Prometheus was down:\n{seen}",
                    self.polls
                );
                let since = match &self.switching {
                    Some((hash, since)) if *hash == pinned => *since,
                    _ => Instant::now(),
                };
                assert!(
                    since.elapsed() < PROMOTION_WRITE_WINDOW,
                    "poll {}: the stable Service has selected {pinned} for {:?} but the status never named it \
                     stable:\n{seen}",
                    self.polls,
                    since.elapsed()
                );
                self.switching = Some((pinned, since));
            }
            None => self.switching = None,
        }
    }

    /// Every run of `hash` was Successful (or overridden by a human). The background run may still be Running
    /// at the promotion (the promotion terminates it); whether running or terminated, each of its metrics must
    /// have had a Successful measurement and its latest measurement must be an answer, not an error: a
    /// Prometheus that stopped answering is no evidence of health.
    fn expect_analysis_passed(&self, seen: &Seen, hash: &str, what: &str) {
        for run in seen.runs_of(hash) {
            let name = run.name_any();
            if self.overridden.contains(&name) {
                continue;
            }
            let status = run.status.clone().unwrap_or_default();
            let passed = if name.contains("-background") {
                let metrics_answered = status
                    .metric_results
                    .iter()
                    .filter(|m| !m.dry_run)
                    .all(|m| m.successful >= 1 && m.consecutive_error == 0);
                metrics_answered
                    && matches!(
                        status.phase,
                        Some(
                            AnalysisPhase::Successful
                                | AnalysisPhase::Running
                                | AnalysisPhase::Pending
                        )
                    )
            } else {
                status.phase == Some(AnalysisPhase::Successful)
            };
            assert!(
                passed,
                "poll {}: revision {hash} {what} although its analysis run {name} is {:?}:\n{seen}",
                self.polls, status.phase
            );
        }
    }

    /// Polls until `condition` holds, checking the invariants each time; bounded by time and polls.
    async fn until(
        &mut self,
        bed: &Bed,
        what: &str,
        within: Duration,
        condition: impl Fn(&Seen) -> bool,
    ) -> Seen {
        let deadline = Instant::now() + within;
        let max_polls = within.as_millis() / POLL.as_millis() + 10;
        for _ in 0..max_polls {
            let seen = self.poll(bed).await;
            if condition(&seen) {
                return seen;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {within:?} waiting for: {what}\nlast poll:\n{seen}");
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("gave up after {max_polls} polls waiting for: {what}");
    }

    /// Polls for `duration`, checking the invariants and that `must` holds at every poll.
    async fn hold(
        &mut self,
        bed: &Bed,
        what: &str,
        duration: Duration,
        must: impl Fn(&Seen) -> bool,
    ) -> Seen {
        let end = Instant::now() + duration;
        let max_polls = duration.as_millis() / POLL.as_millis() + 10;
        let mut last = None;
        for _ in 0..max_polls {
            let seen = self.poll(bed).await;
            assert!(
                must(&seen),
                "poll {}: expected {what} throughout {duration:?}:\n{seen}",
                self.polls
            );
            let done = Instant::now() >= end;
            last = Some(seen);
            if done {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        last.unwrap_or_else(|| panic!("no poll while holding {what}"))
    }
}

/// Runs a test body with an overall bound.
async fn bounded(limit: Duration, body: impl Future<Output = ()>) {
    let outcome = tokio::time::timeout(limit, body).await;
    assert!(outcome.is_ok(), "test took longer than {limit:?}");
}

/// An AnalysisTemplate named [`TEMPLATE`] with one metric; both arguments are declared.
fn analysis_template(metric: Value) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": TEMPLATE, "namespace": NS},
        "spec": {
            "args": [{"name": "service"}, {"name": "canary-hash"}],
            "metrics": [metric]
        }
    })
}

/// Adds the keys of `extra` to the object `base`.
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(target), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            target.insert(key.clone(), value.clone());
        }
    }
    base
}

/// The canary's error rate (built-in check over 10 s), measured every second; `limits` adds count and limits.
fn error_rate_metric(address: &str, limits: Value) -> Value {
    merged(
        json!({
            "name": "error-rate",
            // rate() answers once Prometheus has scraped the new pods' series twice.
            "initialDelay": "3s",
            "interval": "1s",
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
        }),
        limits,
    )
}

/// A metric over a hand-written query, measured every second.
fn query_metric(address: &str, query: &str, success: &str, limits: Value) -> Value {
    merged(
        json!({
            "name": "answer",
            "initialDelay": "1s",
            "interval": "1s",
            "successCondition": success,
            "provider": {"prometheus": {"address": address, "timeout": "5s", "query": query}}
        }),
        limits,
    )
}

fn analysis_ref() -> Value {
    json!({
        "templates": [{"templateName": TEMPLATE}],
        "args": [
            {"name": "service", "value": APP},
            {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
        ]
    })
}

/// Canary settings with an analysis step at index 1, between 40% and the given last steps.
fn step_analysis_canary(after: Value) -> Value {
    let mut steps = vec![
        json!({"setWeight": 40}),
        json!({"analysis": analysis_ref()}),
    ];
    steps.extend(after.as_array().cloned().unwrap_or_default());
    json!({"abortScaleDownDelaySeconds": 0, "steps": steps})
}

/// Canary settings with background analysis from the first step.
fn background_canary(steps: Value) -> Value {
    json!({
        "abortScaleDownDelaySeconds": 0,
        "analysis": merged(analysis_ref(), json!({"startingStep": 0})),
        "steps": steps
    })
}

fn counted(metric: &MetricResult) -> i32 {
    metric.successful + metric.failed + metric.inconclusive
}

/// Prometheus killed during a step analysis and started again (same port, same data) while the errors are
/// still within consecutiveErrorLimit: the errors are retried and never counted, the run goes on to its count
/// of answers once Prometheus is back, and the healthy canary is promoted. The outage lasts six errors, as
/// many as the count: were errors counted, the run would end Successful, and promote, during the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_restarted_within_the_error_limit_resumes_the_step_analysis_and_promotes() {
    bounded(Duration::from_secs(150), async {
        let mut bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(error_rate_metric(
            &address,
            json!({"count": 6, "inconclusiveLimit": 3, "consecutiveErrorLimit": 30}),
        )))
        .await;
        let v1 = bed.given_app_at_v1(step_analysis_canary(json!([]))).await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let measuring = guard
            .until(
                &bed,
                "v2's step analysis measured a success",
                Duration::from_secs(60),
                |s| {
                    s.state.current_hash().is_some_and(|h| {
                        h != v1 && s.metric(&h, "step1").is_some_and(|m| m.successful >= 1)
                    })
                },
            )
            .await;
        let v2 = measuring.state.current_hash().expect("v2 hash");

        bed.prometheus.stop();
        let outage = guard
            .until(
                &bed,
                "six errors in a row while Prometheus is down (as many as the count)",
                Duration::from_secs(30),
                |s| {
                    s.metric(&v2, "step1")
                        .is_some_and(|m| m.consecutive_error >= 6)
                },
            )
            .await;
        // Errors are not answers: the run is still measuring and the rollout waits at the analysis step.
        let during = outage.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!(
            outage.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Running),
            "{outage}"
        );
        assert!(
            counted(&during) < 6,
            "errors never count toward count: {during:#?}"
        );
        assert_eq!(outage.state.step(), Some(1), "{outage}");
        assert!(!outage.state.is(RolloutPhase::Aborted), "{outage}");

        bed.prometheus.restart(Data::Kept).await;
        let fault_ended = Instant::now();
        let done = guard
            .until(
                &bed,
                "v2 promoted once Prometheus is back",
                Duration::from_secs(45),
                |s| s.healthy_on(&v2),
            )
            .await;
        let converged_in = fault_ended.elapsed();
        let metric = done.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!(
            done.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Successful),
            "{done}"
        );
        assert_eq!(
            counted(&metric),
            6,
            "six answers, whatever the errors: {metric:#?}"
        );
        assert!(
            metric.error >= 6 && metric.consecutive_error == 0,
            "the outage's errors are recorded, and answers followed them: {metric:#?}"
        );
        assert!(
            metric.successful > during.successful,
            "Prometheus answered again after the restart: {metric:#?}"
        );
        assert!(
            metric
                .message
                .as_deref()
                .is_some_and(|m| m.contains("errors not counted")),
            "the verdict says errors were not counted: {metric:#?}"
        );
        assert_eq!(done.state.selector_hash(APP).as_deref(), Some(v2.as_str()));
        assert_eq!(done.state.replicas_of(&v1), 0, "{done}");
        bed.expect_all_traffic_on(&v2, Duration::from_secs(15))
            .await;
        eprintln!(
            "promoted {converged_in:?} after Prometheus came back, {} polls",
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// Prometheus killed during a step analysis and down for longer than consecutiveErrorLimit allows: the
/// run ends in Error, which counts as a failure, and the Rollout aborts with all traffic on the stable
/// version. Prometheus coming back (fresh data) afterwards changes nothing: the run is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_past_the_error_limit_aborts_the_step_analysis_and_traffic_returns_to_stable(
) {
    bounded(Duration::from_secs(150), async {
        let mut bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(error_rate_metric(
            &address,
            json!({"count": 6, "inconclusiveLimit": 3, "consecutiveErrorLimit": 2}),
        )))
        .await;
        let v1 = bed.given_app_at_v1(step_analysis_canary(json!([]))).await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let measuring = guard
            .until(
                &bed,
                "v2's step analysis measured a success",
                Duration::from_secs(60),
                |s| {
                    s.state.current_hash().is_some_and(|h| {
                        h != v1 && s.metric(&h, "step1").is_some_and(|m| m.successful >= 1)
                    })
                },
            )
            .await;
        let v2 = measuring.state.current_hash().expect("v2 hash");

        bed.prometheus.stop();
        let aborted = guard
            .until(
                &bed,
                "v2 aborted after three errors in a row",
                Duration::from_secs(30),
                |s| s.state.is(RolloutPhase::Aborted),
            )
            .await;
        assert_eq!(aborted.state.stable_hash().as_deref(), Some(v1.as_str()));
        assert!(
            aborted.state.message().contains("errors in a row"),
            "the Rollout says the analysis errored: {}",
            aborted.state.message()
        );
        assert_eq!(
            aborted.state.condition("Degraded"),
            Some(("True".to_string(), reason::ANALYSIS_FAILED.to_string())),
            "{aborted}"
        );
        let note = bed
            .world
            .expect_event(APP, reason::ABORTED, Duration::from_secs(10))
            .await;
        assert!(
            note.contains("error-rate") && note.contains("errors in a row"),
            "the Aborted event names the metric and why: {note}"
        );
        let back = guard
            .until(
                &bed,
                "Services on v1 and the canary scaled down",
                Duration::from_secs(20),
                |s| s.aborted_back_on(&v1, &v2),
            )
            .await;
        assert_eq!(back.state.weight(), 0, "{back}");
        assert_eq!(back.state.replicas_of(&v1), 4, "{back}");
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15))
            .await;
        let metric = back.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!(
            back.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Error),
            "{back}"
        );
        assert_eq!(
            metric.consecutive_error, 3,
            "one error more than the limit: {metric:#?}"
        );

        bed.prometheus.restart(Data::Fresh).await;
        let fault_ended = Instant::now();
        let after = guard
            .hold(
                &bed,
                "v2 stays aborted once Prometheus is back",
                Duration::from_secs(4),
                |s| s.aborted_back_on(&v1, &v2),
            )
            .await;
        assert_eq!(
            after.metric(&v2, "step1").map(|m| m.count),
            Some(metric.count),
            "a finished run is never measured again: {after}"
        );
        assert_eq!(after.runs_of(&v2).len(), 1, "no new run: {after}");
        eprintln!(
            "stayed Aborted {:?} after Prometheus came back, {} polls",
            fault_ended.elapsed(),
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// A query answering NaN (`0 / 0`), with `inconclusiveLimit: 3` and `count: 2`: the count is reached
/// without one success, so the metric is Inconclusive (docs/analysis.md, rule 4) and the Rollout pauses with
/// InconclusiveAnalysis, however long it waits. `serin promote` ends that pause and only it: the next pause
/// step still waits, and a second promote completes the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_answers_pause_the_rollout_until_promote_moves_past_the_analysis_once() {
    bounded(Duration::from_secs(150), async {
        let bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(query_metric(
            &address,
            "0 / 0",
            "result >= 0",
            json!({"count": 2, "inconclusiveLimit": 3}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(step_analysis_canary(json!([{"pause": {}}])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let paused = guard
            .until(
                &bed,
                "v2 paused by its inconclusive analysis",
                Duration::from_secs(60),
                |s| s.paused_inconclusive_on(&v1),
            )
            .await;
        let v2 = paused.state.current_hash().expect("v2 hash");
        assert_eq!(paused.state.step(), Some(1), "{paused}");
        assert_eq!(
            paused.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Inconclusive),
            "{paused}"
        );
        let metric = paused.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!(
            (metric.count, metric.inconclusive, metric.successful),
            (2, 2, 0),
            "{metric:#?}"
        );
        assert!(
            metric
                .measurements
                .iter()
                .all(|m| m.value.as_deref() == Some("NaN")),
            "{metric:#?}"
        );
        assert!(
            metric
                .message
                .as_deref()
                .is_some_and(|m| m.contains("no successful measurement in 2")),
            "{metric:#?}"
        );

        let waited = guard
            .hold(
                &bed,
                "v2 still paused, never promoted by itself",
                Duration::from_secs(3),
                |s| s.paused_inconclusive() && s.state.step() == Some(1),
            )
            .await;
        assert_eq!(
            waited.metric(&v2, "step1").map(|m| m.count),
            Some(2),
            "{waited}"
        );

        let run = paused.run(&v2, "step1").expect("the run").name_any();
        guard.overridden.insert(run.clone());
        bed.command(ManualCommand::Promote).await;
        let next = guard
            .until(
                &bed,
                "the promote moved past the analysis to the pause step",
                Duration::from_secs(20),
                |s| {
                    assert!(
                        !s.healthy_on(&v2),
                        "one promote ended two gates (the analysis and the pause step):\n{s}"
                    );
                    s.paused_at_step(2)
                },
            )
            .await;
        assert_eq!(next.state.stable_hash().as_deref(), Some(v1.as_str()));
        assert_eq!(
            next.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Inconclusive),
            "a human decision does not rewrite the verdict: {next}"
        );
        guard
            .hold(
                &bed,
                "one promote ends one pause",
                Duration::from_secs(3),
                |s| s.paused_at_step(2),
            )
            .await;

        bed.command(ManualCommand::Promote).await;
        let decided = Instant::now();
        let done = guard
            .until(
                &bed,
                "v2 Healthy after the second promote",
                Duration::from_secs(30),
                |s| s.healthy_on(&v2),
            )
            .await;
        assert_eq!(done.runs_of(&v2).len(), 1, "{done}");
        bed.expect_all_traffic_on(&v2, Duration::from_secs(15))
            .await;
        eprintln!(
            "Healthy {:?} after the promote, {} polls",
            decided.elapsed(),
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// A selector that matches nothing (an empty vector), with `inconclusiveLimit: 1`: the second empty
/// answer passes the limit, the metric is Inconclusive and the Rollout pauses; `serin abort` puts every
/// request back on the stable version, and the rollout stays aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_answers_pause_the_rollout_until_abort_puts_traffic_back_on_stable() {
    bounded(Duration::from_secs(150), async {
        let bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(query_metric(
            &address,
            r#"sum(rate(http_requests_total{service="{{args.service}}",pod_template_hash="{{args.canary-hash}}",code="418"}[10s]))"#,
            "result < 0.05",
            json!({"count": 4, "inconclusiveLimit": 1}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(step_analysis_canary(json!([{"setWeight": 100}])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let paused = guard
            .until(&bed, "v2 paused by its inconclusive analysis", Duration::from_secs(60), |s| {
                s.paused_inconclusive_on(&v1)
            })
            .await;
        let v2 = paused.state.current_hash().expect("v2 hash");
        assert_eq!(paused.state.step(), Some(1), "{paused}");
        assert_eq!(paused.run_phase(&v2, "step1"), Some(AnalysisPhase::Inconclusive), "{paused}");
        let metric = paused.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!((metric.inconclusive, metric.successful), (2, 0), "{metric:#?}");
        assert!(
            metric.measurements.iter().all(|m| m.value.as_deref() == Some("[]")),
            "{metric:#?}"
        );
        assert!(
            metric
                .message
                .as_deref()
                .is_some_and(|m| m.contains("no data") && m.contains("limit 1")),
            "{metric:#?}"
        );
        guard
            .hold(&bed, "v2 still paused, never promoted by itself", Duration::from_secs(3), |s| {
                s.paused_inconclusive() && s.state.step() == Some(1)
            })
            .await;

        bed.command(ManualCommand::Abort).await;
        let decided = Instant::now();
        let back = guard
            .until(&bed, "aborted, Services on v1, canary scaled down", Duration::from_secs(30), |s| {
                s.aborted_back_on(&v1, &v2)
            })
            .await;
        assert_eq!(back.state.weight(), 0, "{back}");
        assert_eq!(back.state.replicas_of(&v1), 4, "{back}");
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15)).await;
        guard
            .hold(&bed, "v2 stays aborted", Duration::from_secs(3), |s| s.aborted_back_on(&v1, &v2))
            .await;
        eprintln!("Aborted {:?} after the abort, {} polls", decided.elapsed(), guard.polls);
        bed.stop().await;
    })
    .await;
}

/// A query without `sum` (a histogram's buckets: several series) and no inconclusiveLimit (default 0):
/// the first answer makes the metric Inconclusive and the Rollout pauses. Abort puts traffic back; retry
/// starts the steps again with a new run, which pauses again the same way: never a promotion on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_series_pause_at_the_first_answer_without_a_limit_and_again_after_retry() {
    bounded(Duration::from_secs(150), async {
        let bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(query_metric(
            &address,
            r#"rate(http_request_duration_seconds_bucket{service="{{args.service}}"}[10s])"#,
            "result >= 0",
            json!({"count": 3}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(step_analysis_canary(json!([{"setWeight": 100}])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let paused = guard
            .until(
                &bed,
                "v2 paused by its inconclusive analysis",
                Duration::from_secs(60),
                |s| s.paused_inconclusive_on(&v1),
            )
            .await;
        let v2 = paused.state.current_hash().expect("v2 hash");
        let first_run = paused.run(&v2, "step1").expect("the run").name_any();
        assert_eq!(
            paused.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Inconclusive),
            "{paused}"
        );
        let metric = paused.metric(&v2, "step1").cloned().expect("metric result");
        assert_eq!(
            (metric.count, metric.inconclusive, metric.successful),
            (1, 1, 0),
            "the first inconclusive answer ends the metric: {metric:#?}"
        );
        assert!(
            metric.measurements[0]
                .value
                .as_deref()
                .is_some_and(|v| v.starts_with('[')),
            "{metric:#?}"
        );
        assert!(
            metric
                .message
                .as_deref()
                .is_some_and(|m| m.contains("series") && m.contains("limit 0")),
            "{metric:#?}"
        );
        guard
            .hold(
                &bed,
                "v2 still paused, never promoted by itself",
                Duration::from_secs(3),
                |s| s.paused_inconclusive() && s.state.step() == Some(1),
            )
            .await;

        bed.command(ManualCommand::Abort).await;
        guard
            .until(
                &bed,
                "aborted, Services on v1, canary scaled down",
                Duration::from_secs(30),
                |s| s.aborted_back_on(&v1, &v2),
            )
            .await;
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15))
            .await;

        bed.command(ManualCommand::Retry).await;
        let again = guard
            .until(
                &bed,
                "the retried v2 paused by a new inconclusive run",
                Duration::from_secs(60),
                |s| {
                    s.paused_inconclusive_on(&v1)
                        && s.run(&v2, "step1")
                            .is_some_and(|run| run.name_any() != first_run)
                },
            )
            .await;
        assert_eq!(again.state.step(), Some(1), "{again}");
        assert_eq!(again.runs_of(&v2).len(), 2, "one run per attempt: {again}");
        assert_eq!(
            again.run_phase(&v2, "step1"),
            Some(AnalysisPhase::Inconclusive),
            "{again}"
        );
        guard
            .hold(
                &bed,
                "the retried v2 still paused",
                Duration::from_secs(3),
                |s| s.paused_inconclusive() && s.state.step() == Some(1),
            )
            .await;

        bed.command(ManualCommand::Abort).await;
        let decided = Instant::now();
        guard
            .until(&bed, "aborted again", Duration::from_secs(30), |s| {
                s.aborted_back_on(&v1, &v2)
            })
            .await;
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15))
            .await;
        eprintln!(
            "Aborted {:?} after the second abort, {} polls",
            decided.elapsed(),
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// Background analysis on a canary routed by an HTTPRoute: Prometheus is killed while the rollout waits at
/// a pause, and started again with an empty data directory. The errors are within the limit, so the run goes
/// on (never aborted, never promoted while Prometheus is down, route weight unchanged); once Prometheus
/// answers again the promote completes the rollout and the background run ends Successful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_background_analysis_rides_out_a_prometheus_restart_and_promotes() {
    if support::fixtures::upstream_crds_or_skip(
        "routed_background_analysis_rides_out_a_prometheus_restart_and_promotes",
    )
    .is_none()
    {
        return;
    }
    bounded(Duration::from_secs(150), async {
        let mut bed = start(Routing::GatewayApi).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(error_rate_metric(
            &address,
            json!({"inconclusiveLimit": 20, "consecutiveErrorLimit": 30}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(background_canary(json!([
                {"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {"duration": "2s"}}
            ])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let measuring = guard
            .until(
                &bed,
                "v2 paused with a healthy background analysis",
                Duration::from_secs(60),
                |s| {
                    s.paused_at_step(1)
                        && s.state.current_hash().is_some_and(|h| {
                            h != v1
                                && s.metric(&h, "background")
                                    .is_some_and(|m| m.successful >= 2)
                        })
                },
            )
            .await;
        let v2 = measuring.state.current_hash().expect("v2 hash");
        assert_eq!(measuring.route, Some((75, 25)), "{measuring}");

        bed.prometheus.stop();
        let outage = guard
            .until(
                &bed,
                "three errors while Prometheus is down",
                Duration::from_secs(30),
                |s| {
                    s.metric(&v2, "background")
                        .is_some_and(|m| m.consecutive_error >= 3)
                },
            )
            .await;
        assert!(outage.paused_at_step(1), "{outage}");
        assert_eq!(outage.route, Some((75, 25)), "{outage}");
        assert_eq!(
            outage.run_phase(&v2, "background"),
            Some(AnalysisPhase::Running),
            "{outage}"
        );
        let during = outage
            .metric(&v2, "background")
            .cloned()
            .expect("metric result");

        bed.prometheus.restart(Data::Fresh).await;
        let fault_ended = Instant::now();
        guard
            .until(
                &bed,
                "the background analysis answered healthy again",
                Duration::from_secs(30),
                |s| {
                    s.metric(&v2, "background").is_some_and(|m| {
                        m.successful >= during.successful + 2 && m.consecutive_error == 0
                    })
                },
            )
            .await;
        bed.command(ManualCommand::Promote).await;
        let done = guard
            .until(&bed, "v2 promoted", Duration::from_secs(40), |s| {
                s.healthy_on(&v2)
            })
            .await;
        let converged_in = fault_ended.elapsed();
        let run = guard
            .until(
                &bed,
                "the background run finished",
                Duration::from_secs(15),
                |s| {
                    s.run_phase(&v2, "background")
                        .is_some_and(|phase| phase.is_completed())
                },
            )
            .await;
        assert_eq!(
            run.run_phase(&v2, "background"),
            Some(AnalysisPhase::Successful),
            "{run}"
        );
        let metric = run
            .metric(&v2, "background")
            .cloned()
            .expect("metric result");
        assert!(metric.error >= 3 && metric.failed == 0, "{metric:#?}");
        assert_eq!(done.route, Some((100, 0)), "{done}");
        assert_eq!(done.state.selector_hash(APP).as_deref(), Some(v2.as_str()));
        bed.expect_all_traffic_on(&v2, Duration::from_secs(15))
            .await;
        eprintln!(
            "promoted {converged_in:?} after Prometheus came back, {} polls",
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// Background analysis on a canary without a router: Prometheus is killed and stays down past
/// consecutiveErrorLimit, the background run ends in Error and the Rollout aborts; Prometheus coming back
/// (fresh data) afterwards changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_background_analysis_aborts_when_prometheus_stays_down_past_the_limit() {
    bounded(Duration::from_secs(150), async {
        let mut bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(error_rate_metric(
            &address,
            json!({"inconclusiveLimit": 20, "consecutiveErrorLimit": 2}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(background_canary(json!([{"setWeight": 40}, {"pause": {}}])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let measuring = guard
            .until(
                &bed,
                "v2 paused with a healthy background analysis",
                Duration::from_secs(60),
                |s| {
                    s.paused_at_step(1)
                        && s.state.current_hash().is_some_and(|h| {
                            h != v1
                                && s.metric(&h, "background")
                                    .is_some_and(|m| m.successful >= 1)
                        })
                },
            )
            .await;
        let v2 = measuring.state.current_hash().expect("v2 hash");

        bed.prometheus.stop();
        let aborted = guard
            .until(
                &bed,
                "v2 aborted by its erroring background analysis",
                Duration::from_secs(30),
                |s| s.state.is(RolloutPhase::Aborted),
            )
            .await;
        assert!(
            aborted.state.message().contains("errors in a row"),
            "the Rollout says the analysis errored: {}",
            aborted.state.message()
        );
        assert_eq!(
            aborted.state.condition("Degraded"),
            Some(("True".to_string(), reason::ANALYSIS_FAILED.to_string())),
            "{aborted}"
        );
        let back = guard
            .until(
                &bed,
                "Services on v1 and the canary scaled down",
                Duration::from_secs(20),
                |s| s.aborted_back_on(&v1, &v2),
            )
            .await;
        assert_eq!(
            back.run_phase(&v2, "background"),
            Some(AnalysisPhase::Error),
            "{back}"
        );
        assert_eq!(back.state.replicas_of(&v1), 4, "{back}");
        bed.expect_all_traffic_on(&v1, Duration::from_secs(15))
            .await;
        let count = back.metric(&v2, "background").map(|m| m.count);

        bed.prometheus.restart(Data::Fresh).await;
        let fault_ended = Instant::now();
        let after = guard
            .hold(
                &bed,
                "v2 stays aborted once Prometheus is back",
                Duration::from_secs(4),
                |s| s.aborted_back_on(&v1, &v2),
            )
            .await;
        assert_eq!(
            after.metric(&v2, "background").map(|m| m.count),
            count,
            "{after}"
        );
        eprintln!(
            "stayed Aborted {:?} after Prometheus came back, {} polls",
            fault_ended.elapsed(),
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}

/// Background analysis without a router, and the steps run out while Prometheus is down (a timed pause
/// ends during the outage, the error streak still within its limit): nothing can say the canary is healthy,
/// so it must not be promoted until Prometheus answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_analysis_never_promotes_while_prometheus_is_down_when_the_steps_run_out() {
    bounded(Duration::from_secs(150), async {
        let mut bed = start(Routing::Replicas).await;
        let address = bed.prometheus.url.clone();
        bed.apply_template(analysis_template(error_rate_metric(
            &address,
            json!({"inconclusiveLimit": 20, "consecutiveErrorLimit": 60}),
        )))
        .await;
        let v1 = bed
            .given_app_at_v1(background_canary(json!([
                {"setWeight": 40}, {"pause": {"duration": "8s"}}
            ])))
            .await;
        let mut guard = Guard::new(&v1);

        bed.world.when_image_changes(APP, "checkout:v2").await;
        let measuring = guard
            .until(
                &bed,
                "v2 at its timed pause with a healthy background analysis",
                Duration::from_secs(60),
                |s| {
                    s.state.step() == Some(1)
                        && s.state.current_hash().is_some_and(|h| {
                            h != v1
                                && s.metric(&h, "background")
                                    .is_some_and(|m| m.successful >= 1)
                        })
                },
            )
            .await;
        let v2 = measuring.state.current_hash().expect("v2 hash");

        bed.prometheus.stop();
        guard
            .until(
                &bed,
                "the outage reached the background analysis",
                Duration::from_secs(30),
                |s| {
                    s.metric(&v2, "background")
                        .is_some_and(|m| m.consecutive_error >= 1)
                },
            )
            .await;
        // The pause (8 s) ends during the outage; the guard fails the test on any promotion meanwhile.
        let held = guard
            .hold(
                &bed,
                "v2 not promoted while Prometheus is down",
                Duration::from_secs(15),
                |s| s.state.stable_hash().as_deref() == Some(v1.as_str()),
            )
            .await;
        assert_eq!(
            held.state.step(),
            Some(2),
            "the steps ran out during the outage: {held}"
        );

        bed.prometheus.restart(Data::Kept).await;
        let fault_ended = Instant::now();
        guard
            .until(
                &bed,
                "v2 promoted once Prometheus answers again",
                Duration::from_secs(45),
                |s| s.healthy_on(&v2),
            )
            .await;
        eprintln!(
            "promoted {:?} after Prometheus came back, {} polls",
            fault_ended.elapsed(),
            guard.polls
        );
        bed.stop().await;
    })
    .await;
}
