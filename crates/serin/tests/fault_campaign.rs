//! The fault campaign: the real controller on the simulated cluster meets, one scenario per test, the faults a
//! production cluster deals it: restarts (with and without a lagging ReplicaSet cache, and a leader handing
//! over), API errors and timeouts on every kind of write, closed and expired watches, a stable ReplicaSet
//! deleted or unlabelled, Git re-applies of the Rollout and of the Services, scaling through the scale
//! subresource, canary pods turning unready, the Rollout deleted, an invalid spec followed by an abort.
//! Every invariant of `support::invariants` is checked at every poll, and each scenario ends converged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use serin::controller::status_write::PROGRESS_WRITE_INTERVAL;
use serin::crd::{AnalysisTemplate, RolloutPhase};
use serin::ops::ManualCommand;
use serin_sim::prometheus::{PrometheusOptions, PrometheusServer};
use serin_sim::{FaultAction, FaultRule, WatchScope};
use support::invariants::{
    http_routes, object_writes_since, writes_since, Invariants, Snapshot, Target,
    POLL_EVERY as POLL, REACTION,
};
use support::*;

const REPLICAS: i32 = 4;

/// The upstream Gateway API CRDs: `SERIN_UPSTREAM_CRDS`, else `../shared/fixtures/upstream-crds` beside
/// the crate.
/// A cluster with Serin's CRDs and the upstream HTTPRoute CRD, and a controller when `controller` is set.
/// None where the CRD fixtures are missing outside CI (the test prints why and passes); in CI their
/// absence is a failure.
async fn routed_world(controller: bool) -> Option<World> {
    let dir = support::fixtures::upstream_crds_or_skip("fault_campaign (routed scenarios)")?;
    let mut world = World::without_controller().await;
    let text = std::fs::read_to_string(dir.join("gateway-api-httproutes.yaml"))
        .expect("HTTPRoute CRD readable");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("HTTPRoute CRD parses");
    Api::<CustomResourceDefinition>::all(world.admin.clone())
        .create(&PostParams::default(), &crd)
        .await
        .expect("HTTPRoute CRD accepted");
    let routes = http_routes(&world.admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        if routes.list(&ListParams::default()).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HTTPRoutes never became servable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if controller {
        world.start_controller().await;
    }
    Some(world)
}

/// Four pauses' worth of steps: 25%, wait, 50%, wait, 75%, wait.
fn three_pauses() -> Value {
    json!([
        {"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 75}, {"pause": {}}
    ])
}

/// The Rollout manifest of `target`: `REPLICAS` pods, these steps, short scale-down delays (long enough
/// that a poll never reads a weight and then pods from after a scale-down it justified).
fn manifest(target: &Target, image: &str, steps: Value) -> Value {
    let mut canary = json!({
        "steps": steps,
        "abortScaleDownDelaySeconds": 1,
        "scaleDownDelaySeconds": 1
    });
    if let Some(route) = &target.route {
        canary["trafficRouting"] = json!({"gatewayAPI": {"httpRoute": route}});
    }
    canary_rollout(&target.rollout, REPLICAS, image, canary)
}

/// The route a user wrote: every request to the stable Service, the canary Service beside it at 0.
fn route_manifest(target: &Target, route: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": route, "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [
                {"name": target.stable_service, "port": 80, "weight": 100},
                {"name": target.canary_service, "port": 80, "weight": 0}
            ]}]
        }
    })
}

/// Given the Services, the route (when routed) and the Rollout on `image` with `steps`; waits until it is
/// Healthy with every pod ready.
async fn given_app(world: &World, inv: &mut Invariants, image: &str, steps: Value) -> Snapshot {
    let target = inv.target.clone();
    world
        .given_services(
            &target.rollout,
            &[&target.stable_service, &target.canary_service],
        )
        .await;
    if let Some(route) = &target.route {
        let route: DynamicObject =
            serde_json::from_value(route_manifest(&target, route)).expect("route decodes");
        http_routes(&world.admin)
            .create(&PostParams::default(), &route)
            .await
            .expect("route created");
    }
    world
        .given_rollout(manifest(&target, image, steps))
        .await
        .expect("Rollout accepted");
    inv.until(
        world,
        "the first revision Healthy",
        Duration::from_secs(30),
        |s| {
            let state = &s.state;
            state.is(RolloutPhase::Healthy)
                && state
                    .stable_hash()
                    .is_some_and(|h| state.ready_of(&h) == REPLICAS)
        },
    )
    .await
}

/// A new image, then the first pause of its steps.
async fn new_revision(
    world: &World,
    inv: &mut Invariants,
    image: &str,
    first_pause: i32,
) -> Snapshot {
    let before = inv.poll(world).await;
    world.when_image_changes(&inv.target.rollout, image).await;
    let stable = before.state.stable_hash();
    inv.until(
        world,
        &format!("{image} paused at step {first_pause}"),
        Duration::from_secs(30),
        |s| {
            s.state.is(RolloutPhase::Paused)
                && s.state.step() == Some(first_pause)
                && s.state.canary_hash().is_some()
                && s.state.canary_hash() != stable
        },
    )
    .await
}

/// Waits (bounded) until `users` made `count` writes since `since`; returns when they did.
async fn wait_for_writes(world: &World, users: &[&str], since: SystemTime, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..5_000 {
        if writes_since(world, users, since).len() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{users:?} made fewer than {count} writes within 10s: {:#?}",
            writes_since(world, users, since)
                .iter()
                .map(|r| (&r.verb, &r.resource, &r.subresource, &r.name, r.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Kills the controllers and returns once the requests they had in flight have landed (no write of theirs
/// logged for a while), so writes logged after the returned time are the next controller's.
async fn kill_and_quiesce(world: &mut World) -> SystemTime {
    world.kill_controllers();
    world
        .wait_for_quiet_controller(Duration::from_millis(300), Duration::from_secs(5))
        .await;
    SystemTime::now()
}

/// Sends a promote (noted by the invariants) and returns when it was sent.
async fn promote_noted(world: &World, inv: &mut Invariants) -> SystemTime {
    let snap = inv.poll(world).await;
    inv.note(ManualCommand::Promote, &snap);
    let since = SystemTime::now();
    world
        .when_command(&inv.target.rollout, ManualCommand::Promote)
        .await;
    since
}

/// Where the steps of [`three_pauses`] rest after the promote at `pause`: the next pause, or Healthy.
async fn after_promote_at(world: &World, inv: &mut Invariants, pause: i32) -> Snapshot {
    if pause < 5 {
        inv.paused_at(world, pause + 2).await
    } else {
        inv.converge(world).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_step_and_restarted_at_every_step_resumes_where_it_stopped() {
    let mut world = World::start().await;
    let mut inv = Invariants::new(Target::plain("kill"));
    given_app(&world, &mut inv, "kill:1", three_pauses()).await;
    new_revision(&world, &mut inv, "kill:2", 1).await;
    for pause in [1, 3, 5] {
        // At rest, a restarted controller finds everything as it should be and writes nothing (rule 5).
        let restarted = kill_and_quiesce(&mut world).await;
        world.start_controller().await;
        inv.hold(&world, Duration::from_secs(1)).await;
        let writes = writes_since(&world, &[CONTROLLER_USER], restarted);
        assert!(
            writes.is_empty(),
            "a restart at the pause of step {pause} wrote: {writes:#?}"
        );

        // Mid-step: killed right after its first write for the promote.
        let since = promote_noted(&world, &mut inv).await;
        wait_for_writes(&world, &[CONTROLLER_USER], since, 1).await;
        world.kill_controllers();
        inv.hold(&world, Duration::from_millis(500)).await;
        world.start_controller().await;
        after_promote_at(&world, &mut inv, pause).await;
    }
    println!("{}", inv.finish(&world));
    world.stop().await;
}

/// The always-successful analysis: `vector(1)` on a real Prometheus, measured once.
async fn analysis_template(world: &World, name: &str, prometheus: &PrometheusServer) {
    let template: AnalysisTemplate = serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"metrics": [{
            "name": "always-one",
            "interval": "1s",
            "count": 1,
            "successCondition": "result == 1.0",
            "provider": {"prometheus": {"address": prometheus.url(), "query": "vector(1)"}}
        }]}
    }))
    .expect("template decodes");
    Api::<AnalysisTemplate>::namespaced(world.admin.clone(), NS)
        .create(&PostParams::default(), &template)
        .await
        .expect("AnalysisTemplate accepted");
}

async fn prometheus() -> PrometheusServer {
    PrometheusServer::start(&[], &PrometheusOptions::default())
        .await
        .expect("prometheus starts (Debian/Ubuntu package `prometheus`)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_with_a_lagging_replica_set_cache_plan_nothing_until_it_listed_and_never_promote_early(
) {
    let Some(mut world) = routed_world(true).await else {
        return;
    };
    let mut inv = Invariants::new(Target::routed("lag"));
    given_app(&world, &mut inv, "lag:1", three_pauses()).await;
    new_revision(&world, &mut inv, "lag:2", 1).await;
    let replica_sets = WatchScope::new("apps", "replicasets").user(CONTROLLER_USER);
    let lag = Duration::from_secs(2);
    for pause in [1, 3, 5] {
        let since = promote_noted(&world, &mut inv).await;
        if pause == 3 {
            // No restart: the running controller's own ReplicaSet changes reach it 2 s late, so the canary
            // pods it scaled up look unready to it all that time.
            world
                .sim
                .faults()
                .hold_watch_events(replica_sets.clone(), lag);
        } else {
            wait_for_writes(&world, &[CONTROLLER_USER], since, 1).await;
            kill_and_quiesce(&mut world).await;
            // The restarted controller's ReplicaSet list and events come 2 s late, as after a failover to a
            // replica whose informer is slow.
            world
                .sim
                .faults()
                .hold_watch_events(replica_sets.clone(), lag);
            let restarted = SystemTime::now();
            let probe = world.start_controller_unsynced().await;
            inv.hold(&world, lag / 2).await;
            // The log first: readiness only ever turns on, so writes logged before a "not ready" answer were
            // made with the ReplicaSet cache still empty.
            let early = writes_since(&world, &[CONTROLLER_USER], restarted);
            assert!(
                !probe.ready().await,
                "ready before its ReplicaSet cache listed"
            );
            assert!(
                early.is_empty(),
                "wrote before its ReplicaSet cache listed: {early:#?}"
            );
        }
        after_promote_at(&world, &mut inv, pause).await;
    }
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_or_unable_to_renew_mid_step_hands_over_and_only_the_lease_holder_writes() {
    let Some(world) = routed_world(false).await else {
        return;
    };
    let timing = LeaseTiming::default();
    let ids = ["serin-a", "serin-b"];
    let mut replicas = Vec::new();
    for id in ids {
        replicas.push(Replica::start(&world, id, timing).await);
    }
    let mut inv =
        Invariants::new(Target::routed("lead")).with_replicas(&ids, timing.lease_duration);
    given_app(&world, &mut inv, "lead:1", three_pauses()).await;
    new_revision(&world, &mut inv, "lead:2", 1).await;
    for pause in [1, 3, 5] {
        let leader = lease_holder(&world).await.expect("a replica leads");
        let since = promote_noted(&world, &mut inv).await;
        wait_for_writes(&world, &[leader.as_str()], since, 1).await;
        if pause == 3 {
            // The leader stays up but can no longer renew its Lease, mid-step: it must stop writing before
            // the standby takes over.
            world
                .sim
                .faults()
                .add_rule(
                    FaultRule::fail("update", "leases", 500)
                        .user(&leader)
                        .times(100_000),
                )
                .expect("valid rule");
        } else {
            for replica in replicas.iter_mut().filter(|r| r.identity == leader) {
                replica.kill();
            }
        }
        // The standby takes the Lease once it expires; only then does the killed pod come back (with its
        // identity, a restarted pod could take its own Lease back at once) or the fenced one renew again.
        let deadline = Instant::now() + Duration::from_secs(20);
        for _ in 0..1_000 {
            if lease_holder(&world).await.is_some_and(|h| h != leader) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby never took the Lease"
            );
            inv.poll(&world).await;
            tokio::time::sleep(POLL).await;
        }
        if pause == 3 {
            world.sim.faults().clear();
        } else {
            replicas.retain(|r| r.identity != leader);
            replicas.push(Replica::start(&world, &leader, timing).await);
        }
        after_promote_at(&world, &mut inv, pause).await;
    }
    println!("{}", inv.finish(&world));
    drop(replicas);
    world.stop().await;
}

/// One kind of write Serin makes, as the request log names it.
#[derive(Clone, Copy, Debug)]
struct Write {
    verb: &'static str,
    resource: &'static str,
    /// `Some("")`: the main resource only.
    subresource: Option<&'static str>,
}

impl Write {
    fn rule(&self, action: &FaultAction) -> FaultRule {
        let mut rule = FaultRule {
            action: action.clone(),
            ..FaultRule::fail(self.verb, self.resource, 500)
        }
        .user(CONTROLLER_USER)
        .times(2);
        if let Some(subresource) = self.subresource {
            rule = rule.subresource(subresource);
        }
        rule
    }

    fn matches(&self, record: &serin_sim::RequestRecord) -> bool {
        record.user == CONTROLLER_USER
            && record.verb == self.verb
            && record.resource == self.resource
            && match self.subresource {
                None => true,
                Some("") => record.subresource.is_none(),
                Some(wanted) => record.subresource.as_deref() == Some(wanted),
            }
    }
}

/// The faults every kind of write meets, one per revision: conflict, throttling, server error, a timeout
/// that did not apply the write and one that did (the client cannot tell them apart).
fn write_faults() -> Vec<(u16, FaultAction)> {
    let hold = Duration::from_secs(1);
    vec![
        (409, FaultAction::Fail(409)),
        (429, FaultAction::Fail(429)),
        (500, FaultAction::Fail(500)),
        (504, FaultAction::Timeout(hold)),
        (504, FaultAction::TimeoutAfterApply(hold)),
    ]
}

/// A weight, an analysis, then a pause before the promotion: one revision makes every kind of write.
fn steps_with_analysis() -> Value {
    json!([
        {"setWeight": 25}, {"analysis": {"templates": [{"templateName": "always-one"}]}}, {"pause": {}}
    ])
}

/// Table-driven: for each fault of [`write_faults`], a new revision meets it twice in a row on `write` and
/// still goes through its steps and analysis to Healthy with every invariant holding. Writes made at the
/// start of a revision (ReplicaSet and AnalysisRun creation) meet it from the image change on, the others
/// from the pause mid-canary on, where the promotion needs them.
async fn faults_on_one_kind_of_write(name: &str, write: Write) {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let mut prometheus = prometheus().await;
    analysis_template(&world, "always-one", &prometheus).await;
    let mut inv = Invariants::new(Target::routed(name));
    given_app(
        &world,
        &mut inv,
        &format!("{name}:1"),
        steps_with_analysis(),
    )
    .await;
    let at_revision_start = write.verb == "create";
    for (round, (status, action)) in write_faults().into_iter().enumerate() {
        let started = SystemTime::now();
        if at_revision_start {
            world
                .sim
                .faults()
                .add_rule(write.rule(&action))
                .expect("valid rule");
        }
        new_revision(&world, &mut inv, &format!("{name}:{}", round + 2), 2).await;
        if !at_revision_start {
            world
                .sim
                .faults()
                .add_rule(write.rule(&action))
                .expect("valid rule");
        }
        inv.command(&world, ManualCommand::Promote).await;
        let met = world
            .sim
            .request_log()
            .filter(|r| r.time >= started && write.matches(r) && r.status == status);
        assert!(
            !met.is_empty(),
            "{action:?} on {write:?} was never met in round {round}; pending rules: {:#?}",
            world.sim.faults().pending_rules()
        );
        world.sim.faults().clear();
    }
    println!("{}", inv.finish(&world));
    prometheus.stop();
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_replica_set_creation() {
    faults_on_one_kind_of_write(
        "rscreate",
        Write {
            verb: "create",
            resource: "replicasets",
            subresource: None,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_replica_set_scaling() {
    faults_on_one_kind_of_write(
        "rsscale",
        Write {
            verb: "patch",
            resource: "replicasets",
            subresource: Some(""),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_service_selector_patches() {
    faults_on_one_kind_of_write(
        "svcpatch",
        Write {
            verb: "patch",
            resource: "services",
            subresource: None,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_http_route_patches() {
    faults_on_one_kind_of_write(
        "routepatch",
        Write {
            verb: "patch",
            resource: "httproutes",
            subresource: None,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_rollout_status_writes() {
    faults_on_one_kind_of_write(
        "statuswrite",
        Write {
            verb: "update",
            resource: "rollouts",
            subresource: Some("status"),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_timeouts_on_analysis_run_creation() {
    faults_on_one_kind_of_write(
        "runcreate",
        Write {
            verb: "create",
            resource: "analysisruns",
            subresource: None,
        },
    )
    .await;
}

/// Every resource the controller watches, as watch faults name them.
fn watched() -> Vec<WatchScope> {
    [
        ("serin.dev", "rollouts"),
        ("apps", "replicasets"),
        ("", "services"),
        ("serin.dev", "analysisruns"),
    ]
    .into_iter()
    .map(|(group, resource)| WatchScope::new(group, resource).user(CONTROLLER_USER))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_closed_expired_and_dropped_mid_step_leave_no_stale_decision() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let mut inv = Invariants::new(Target::routed("watch"));
    given_app(&world, &mut inv, "watch:1", three_pauses()).await;
    new_revision(&world, &mut inv, "watch:2", 1).await;
    let faults = world.sim.faults();
    for pause in [1, 3, 5] {
        promote_noted(&world, &mut inv).await;
        match pause {
            // Every watch closed at once: each resumes from where it was.
            1 => faults.close_watches(),
            // Closed, and resuming answers 410 Gone: each relists.
            3 => {
                for scope in watched() {
                    faults.expire_next_watches(scope, 1);
                }
                faults.close_watches();
            }
            // The events of the step never arrive; after a second the watches close and relist.
            _ => {
                for scope in watched() {
                    faults.drop_watch_events(scope, Duration::from_secs(1));
                }
            }
        }
        after_promote_at(&world, &mut inv, pause).await;
    }
    println!("{}", inv.finish(&world));
    world.stop().await;
}

/// The stable ReplicaSet's name.
fn stable_rs(snap: &Snapshot, target: &Target) -> String {
    format!(
        "{}-{}",
        target.rollout,
        snap.state.stable_hash().expect("a stable revision")
    )
}

/// Holds for a while checking that nothing moves: not one step, no promotion (the invariants fail on
/// either), then returns the last poll.
async fn holds_without_promoting(world: &World, inv: &mut Invariants, held: &Snapshot) -> Snapshot {
    let last = inv.hold(world, Duration::from_secs(3)).await;
    assert_eq!(last.state.stable_hash(), held.state.stable_hash());
    assert_eq!(last.state.step(), held.state.step());
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stable_replica_set_deleted_mid_canary_holds_without_promoting_until_a_full_promote() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("gone");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "gone:1", three_pauses()).await;
    let paused = new_revision(&world, &mut inv, "gone:2", 1).await;
    inv.exempt_stable("the test deletes the stable ReplicaSet and its pods");
    Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(world.admin.clone(), NS)
        .delete(
            &stable_rs(&paused, &target),
            &kube::api::DeleteParams::background(),
        )
        .await
        .expect("stable ReplicaSet deleted");
    let held = inv
        .until(
            &world,
            "held with StableReplicaSetMissing",
            Duration::from_secs(30),
            |s| {
                s.state
                    .condition("Progressing")
                    .is_some_and(|(_, why)| why == serin::crd::reason::STABLE_MISSING)
            },
        )
        .await;
    assert_eq!(held.state.phase(), Some(RolloutPhase::Degraded));
    holds_without_promoting(&world, &mut inv, &held).await;
    // Only a human's full promotion makes the canary stable.
    inv.command(&world, ManualCommand::PromoteFull).await;
    inv.check_stable_again();
    inv.hold(&world, Duration::from_secs(1)).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stable_replica_set_unlabelled_mid_canary_holds_without_promoting_until_relabelled() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("bare");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "bare:1", three_pauses()).await;
    let paused = new_revision(&world, &mut inv, "bare:2", 1).await;
    let stable = paused.state.stable_hash().expect("stable");
    let replica_sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(world.admin.clone(), NS);
    let label = |value: Value| {
        Patch::Merge(
            json!({"metadata": {"labels": {serin::crd::labels::POD_TEMPLATE_HASH: value}}}),
        )
    };
    // Its pods keep their labels and keep serving: only the ReplicaSet no longer says which version it is.
    replica_sets
        .patch(
            &stable_rs(&paused, &target),
            &PatchParams::default(),
            &label(Value::Null),
        )
        .await
        .expect("label removed");
    let held = inv
        .until(
            &world,
            "held with StableReplicaSetMissing",
            Duration::from_secs(30),
            |s| {
                s.state
                    .condition("Progressing")
                    .is_some_and(|(_, why)| why == serin::crd::reason::STABLE_MISSING)
            },
        )
        .await;
    holds_without_promoting(&world, &mut inv, &held).await;
    replica_sets
        .patch(
            &stable_rs(&paused, &target),
            &PatchParams::default(),
            &label(json!(stable)),
        )
        .await
        .expect("label put back");
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

/// What Argo CD or Flux does on a sync: a server-side apply of the whole manifest from Git, forced.
async fn git_apply(world: &World, manifest: Value) {
    let name = manifest["metadata"]["name"]
        .as_str()
        .expect("named")
        .to_string();
    let api: Api<DynamicObject> = Api::namespaced_with(
        world.admin.clone(),
        NS,
        &kube::api::ApiResource::erase::<serin::crd::Rollout>(&()),
    );
    api.patch(
        &name,
        &PatchParams::apply("argocd-controller").force(),
        &Patch::Apply(manifest),
    )
    .await
    .expect("Git manifest applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_reapply_changing_unrelated_fields_and_annotations_mid_canary_changes_nothing() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("sync");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "sync:1", three_pauses()).await;
    new_revision(&world, &mut inv, "sync:2", 1).await;
    inv.command(&world, ManualCommand::Promote).await;
    let before = inv.poll(&world).await;
    // Git holds v2 already; the sync brings other fields and the annotations and labels tools add.
    let mut git = manifest(&target, "sync:2", three_pauses());
    git["metadata"]["annotations"] = json!({
        "argocd.argoproj.io/tracking-id": "shop:serin.dev/Rollout:default/sync",
        "team": "checkout"
    });
    git["metadata"]["labels"] = json!({"app.kubernetes.io/instance": "shop"});
    git["spec"]["revisionHistoryLimit"] = json!(5);
    git["spec"]["progressDeadlineSeconds"] = json!(900);
    let since = SystemTime::now();
    git_apply(&world, git).await;
    let seen = inv
        .until(
            &world,
            "the new generation observed",
            Duration::from_secs(30),
            |s| {
                s.state.observed()
                    && s.state.rollout.metadata.generation
                        > before.state.rollout.metadata.generation
            },
        )
        .await;
    let held = holds_without_promoting(&world, &mut inv, &seen).await;
    assert_eq!(held.route, before.route, "the weights moved");
    assert_eq!(held.state.step(), Some(3), "the steps started again");
    let writes = object_writes_since(&world, &[CONTROLLER_USER], since);
    assert!(
        writes.is_empty(),
        "a re-apply with nothing new for Serin made it write: {writes:#?}"
    );
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_reapply_with_new_steps_mid_canary_starts_the_new_steps_from_the_first() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("steps");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "steps:1", three_pauses()).await;
    new_revision(&world, &mut inv, "steps:2", 1).await;
    inv.command(&world, ManualCommand::Promote).await;
    // At 50%, Git now says: 10%, wait, 30%, wait.
    let new_steps = json!([{"setWeight": 10}, {"pause": {}}, {"setWeight": 30}, {"pause": {}}]);
    git_apply(&world, manifest(&target, "steps:2", new_steps)).await;
    inv.disrupt("new steps ask less than the weight in place");
    let restarted = inv.paused_at(&world, 1).await;
    assert_eq!(
        restarted.route.map(|w| w.canary),
        Some(10),
        "the first new step's weight"
    );
    world
        .expect_event(
            "steps",
            serin::crd::reason::STEPS_CHANGED,
            Duration::from_secs(10),
        )
        .await;
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_replaced_with_their_git_selector_mid_canary_are_pinned_again() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("pins");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "pins:1", three_pauses()).await;
    let paused = new_revision(&world, &mut inv, "pins:2", 1).await;
    inv.command(&world, ManualCommand::Promote).await;
    let (stable, canary) = (
        paused.state.stable_hash().expect("stable"),
        paused.state.canary_hash().expect("canary"),
    );
    // A sync that replaces the Services (Argo CD's Replace=true, `kubectl replace`): the selector is Git's,
    // without Serin's pod-template-hash pin, and both Services select every pod of the app.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(world.admin.clone(), NS);
    let replaced = SystemTime::now();
    for name in [&target.stable_service, &target.canary_service] {
        let mut git = services.get(name).await.expect("service exists");
        let app = [("app".to_string(), "pins".to_string())].into();
        if let Some(spec) = git.spec.as_mut() {
            spec.selector = Some(app);
        }
        let stored = services
            .replace(name, &PostParams::default(), &git)
            .await
            .expect("service replaced");
        assert_eq!(
            stored.spec.and_then(|s| s.selector),
            Some([("app".to_string(), "pins".to_string())].into()),
            "the replace removed the pin"
        );
    }
    inv.disrupt("the Services lost their pins");
    inv.until(&world, "both Services pinned again", REACTION, |s| {
        s.state.selector_hash(&target.stable_service).as_deref() == Some(stable.as_str())
            && s.state.selector_hash(&target.canary_service).as_deref() == Some(canary.as_str())
    })
    .await;
    let repins = writes_since(&world, &[CONTROLLER_USER], replaced)
        .into_iter()
        .filter(|r| r.resource == "services")
        .count();
    assert!(repins >= 2, "Serin pinned both Services again");
    inv.hold(&world, Duration::from_secs(1)).await;
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_through_the_scale_subresource_at_every_step_resizes_both_sides_without_moving_a_step(
) {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("hpa");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "hpa:1", three_pauses()).await;
    new_revision(&world, &mut inv, "hpa:2", 1).await;
    let rollouts: Api<serin::crd::Rollout> = Api::namespaced(world.admin.clone(), NS);
    for (pause, replicas) in [(1, 8), (3, 3), (5, 6)] {
        rollouts
            .patch_scale(
                "hpa",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scaled");
        inv.disrupt(&format!("scaled to {replicas}"));
        let resized = inv
            .until(&world, &format!("resized to {replicas}"), REACTION, |s| {
                let (Some(stable), Some(canary)) = (s.state.stable_hash(), s.state.canary_hash())
                else {
                    return false;
                };
                let weight = s.route.map_or(0, |w| w.canary) as i32;
                s.state.ready_of(&stable) == replicas
                    && s.state.replicas_of(&stable) == replicas
                    && s.state.ready_of(&canary)
                        >= serin::strategy::replicas::canary_pods_needed(replicas, weight)
            })
            .await;
        assert_eq!(resized.state.step(), Some(pause), "a scale is not progress");
        // What an HPA reads: every pod the selector matches, and the selector itself. Counts that only
        // moved are written at most the progress-write interval late, so wait that long for them.
        let counted = inv
            .until(
                &world,
                &format!("pod count {replicas} written"),
                PROGRESS_WRITE_INTERVAL + REACTION,
                |s| {
                    let pods: i32 = s.state.replica_sets.iter().map(|rs| rs.replicas).sum();
                    s.state.rollout.status.as_ref().and_then(|st| st.replicas) == Some(pods)
                },
            )
            .await;
        assert_eq!(counted.state.step(), Some(pause), "a scale is not progress");
        let written = counted
            .state
            .rollout
            .status
            .as_ref()
            .and_then(|st| st.replicas);
        let scale = rollouts.get_scale("hpa").await.expect("scale subresource");
        let status = scale.status.expect("scale status");
        assert_eq!(Some(status.replicas), written, "{counted:#?}");
        assert_eq!(status.selector.as_deref(), Some("app=hpa"));
        inv.command(&world, ManualCommand::Promote).await;
    }
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_pods_that_turn_unready_after_taking_traffic_lose_it_until_they_are_ready_again() {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed("flaky");
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, "flaky:1", three_pauses()).await;
    new_revision(&world, &mut inv, "flaky:2", 1).await;
    let at_half = inv.command(&world, ManualCommand::Promote).await;
    let canary_rs = format!("flaky-{}", at_half.state.canary_hash().expect("canary"));
    assert_eq!(at_half.route.map(|w| w.canary), Some(50));
    assert_eq!(
        at_half
            .state
            .ready_of(&at_half.state.canary_hash().unwrap_or_default()),
        2
    );
    for unready in [1, 2] {
        let names = world
            .sim
            .make_pods_unready(NS, &canary_rs, unready)
            .await
            .expect("canary pods made unready");
        inv.disrupt(&format!("{names:?} unready"));
        // What is left ready carries at most floor(ready * 100 / replicas) percent.
        let carried = (2 - unready as i64) * 100 / i64::from(REPLICAS);
        inv.until(
            &world,
            &format!("the weight down to {carried}%"),
            REACTION,
            |s| s.route.is_some_and(|w| w.canary <= carried),
        )
        .await;
        inv.hold(&world, Duration::from_secs(1)).await;
        world
            .sim
            .make_pods_ready(NS, &canary_rs)
            .await
            .expect("canary pods ready again");
        inv.until(
            &world,
            "the step's weight again",
            Duration::from_secs(30),
            |s| s.route.is_some_and(|w| w.canary == 50),
        )
        .await;
    }
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_deleted_mid_canary_is_collected_and_the_others_keep_going() {
    let world = World::start().await;
    let mut prometheus = prometheus().await;
    analysis_template(&world, "always-one", &prometheus).await;
    let with_background = |target: &Target, image: &str| {
        let mut manifest = manifest(target, image, three_pauses());
        manifest["spec"]["strategy"]["canary"]["analysis"] =
            json!({"templates": [{"templateName": "always-one"}]});
        manifest
    };
    let doomed = Target::plain("doomed");
    let kept = Target::plain("kept");
    let mut inv = Invariants::new(kept.clone());
    let mut doomed_inv = Invariants::new(doomed.clone());
    for (target, invariants) in [(&doomed, &mut doomed_inv), (&kept, &mut inv)] {
        world
            .given_services(
                &target.rollout,
                &[&target.stable_service, &target.canary_service],
            )
            .await;
        world
            .given_rollout(with_background(target, &format!("{}:1", target.rollout)))
            .await
            .expect("Rollout accepted");
        invariants
            .until(&world, "Healthy", Duration::from_secs(30), |s| {
                s.state.is(RolloutPhase::Healthy)
            })
            .await;
        new_revision(&world, invariants, &format!("{}:2", target.rollout), 1).await;
    }
    let owned = |kind: &str| {
        let selector = format!("{}=doomed", serin::crd::labels::ROLLOUT_NAME);
        let admin = world.admin.clone();
        let kind = kind.to_string();
        async move {
            let params = ListParams::default().labels(&selector);
            match kind.as_str() {
                "replicasets" => {
                    Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(admin, NS)
                        .list(&params)
                        .await
                        .expect("list")
                        .items
                        .len()
                }
                _ => Api::<serin::crd::AnalysisRun>::namespaced(admin, NS)
                    .list(&params)
                    .await
                    .expect("list")
                    .items
                    .len(),
            }
        }
    };
    assert_eq!(owned("replicasets").await, 2, "stable and canary");
    assert!(owned("analysisruns").await >= 1, "the background run");
    let deleted = SystemTime::now();
    Api::<serin::crd::Rollout>::namespaced(world.admin.clone(), NS)
        .delete("doomed", &kube::api::DeleteParams::background())
        .await
        .expect("Rollout deleted");
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..1_000 {
        inv.poll(&world).await;
        if owned("replicasets").await == 0 && owned("analysisruns").await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deleted Rollout's ReplicaSets and AnalysisRuns were never collected"
        );
        tokio::time::sleep(POLL).await;
    }
    // Nothing comes back for it, and the controller keeps serving the other Rollout.
    inv.hold(&world, Duration::from_secs(2)).await;
    assert_eq!(
        owned("replicasets").await,
        0,
        "a ReplicaSet of the deleted Rollout came back"
    );
    // A reconcile in flight may still write the deleted Rollout's status (and get 404); nothing it owned or
    // pointed at may change.
    let about_doomed: Vec<_> = writes_since(&world, &[CONTROLLER_USER], deleted)
        .into_iter()
        .filter(|r| r.status < 300 && r.resource != "rollouts")
        .filter(|r| r.name.as_deref().is_some_and(|n| n.starts_with("doomed")))
        .collect();
    assert!(
        about_doomed.is_empty(),
        "changed objects of a deleted Rollout: {about_doomed:#?}"
    );
    inv.converge(&world).await;
    println!("{}", inv.finish(&world));
    prometheus.stop();
    world.stop().await;
}

/// Pushes an invalid spec mid-canary, checks that it changes nothing in the cluster, aborts (weight to 0 and
/// selectors to stable despite the invalid spec), puts the spec right and retries: the steps start again
/// and the Rollout converges.
async fn invalid_spec_then_abort_then_retry(name: &str, break_it: Value, field: &str) {
    let Some(world) = routed_world(true).await else {
        return;
    };
    let target = Target::routed(name);
    let mut inv = Invariants::new(target.clone());
    given_app(&world, &mut inv, &format!("{name}:1"), three_pauses()).await;
    let paused = new_revision(&world, &mut inv, &format!("{name}:2"), 1).await;
    let rollouts: Api<serin::crd::Rollout> = Api::namespaced(world.admin.clone(), NS);
    let since = SystemTime::now();
    rollouts
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"strategy": {"canary": break_it}}})),
        )
        .await
        .expect("invalid spec accepted by the API server");
    let invalid = inv
        .until(&world, "InvalidSpec", Duration::from_secs(30), |s| {
            s.state.observed()
                && s.state
                    .condition(serin::crd::condition::INVALID_SPEC)
                    .is_some_and(|(status, _)| status == "True")
        })
        .await;
    assert!(
        invalid.state.message().contains(field),
        "the message names {field}: {}",
        invalid.state.message()
    );
    let held = inv.hold(&world, Duration::from_secs(2)).await;
    assert_eq!(
        held.route, paused.route,
        "an invalid spec moved the weights"
    );
    let changed = object_writes_since(&world, &[CONTROLLER_USER], since);
    assert!(
        changed.is_empty(),
        "an invalid spec changed the cluster: {changed:#?}"
    );

    let aborted = inv.command(&world, ManualCommand::Abort).await;
    let stable = aborted.state.stable_hash();
    expect_selectors(
        &aborted.state,
        &[
            (&target.stable_service, stable.as_deref()),
            (&target.canary_service, stable.as_deref()),
        ],
    );
    // The canary goes after its abort delay.
    let canary = paused.state.canary_hash().expect("canary");
    inv.until(
        &world,
        "the canary scaled down",
        Duration::from_secs(30),
        |s| s.state.replicas_of(&canary) == 0,
    )
    .await;

    // The spec put right, then retried: the steps start again from the first.
    let mut fixed = manifest(&target, &format!("{name}:2"), three_pauses());
    fixed["spec"]["strategy"]["canary"]["analysis"] = Value::Null;
    rollouts
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"strategy": fixed["spec"]["strategy"].clone()}})),
        )
        .await
        .expect("spec fixed");
    inv.until(
        &world,
        "the InvalidSpec condition gone",
        Duration::from_secs(30),
        |s| {
            s.state.observed()
                && s.state
                    .condition(serin::crd::condition::INVALID_SPEC)
                    .is_none_or(|(status, _)| status != "True")
        },
    )
    .await;
    inv.command(&world, ManualCommand::Retry).await;
    inv.paused_at(&world, 1).await;
    let done = inv.converge(&world).await;
    assert_eq!(done.state.stable_hash().as_deref(), Some(canary.as_str()));
    println!("{}", inv.finish(&world));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_analysis_of_a_missing_template_pushed_mid_canary_still_lets_abort_and_retry_work() {
    invalid_spec_then_abort_then_retry(
        "notpl",
        json!({"steps": [
            {"setWeight": 25}, {"pause": {}},
            {"analysis": {"templates": [{"templateName": "no-such-template"}]}},
            {"setWeight": 50}, {"pause": {}}, {"setWeight": 75}, {"pause": {}}
        ]}),
        "no-such-template",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "product bug: while spec.strategy.canary.stableService names a missing Service, `serin abort` does \
            nothing (the abort stays pending in status.commands, the route keeps 25% on the canary); an abort \
            under an invalid spec is planned only when the spec without steps and analysis validates"]
async fn a_stable_service_that_does_not_exist_pushed_mid_canary_still_lets_abort_and_retry_work() {
    invalid_spec_then_abort_then_retry(
        "nosvc",
        json!({"stableService": "no-such-service"}),
        "no-such-service",
    )
    .await;
}
