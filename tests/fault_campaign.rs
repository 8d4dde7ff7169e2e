//! The fault campaign: the real controller on the simulated cluster meets, one scenario per test, the faults a
//! production cluster deals it: restarts (with and without a lagging ReplicaSet cache, and a leader handing
//! over), API errors and timeouts on every kind of write, closed and expired watches, a stable ReplicaSet
//! deleted or unlabelled, Git re-applies of the Rollout and of the Services, scaling through the scale
//! subresource, canary pods turning unready, the Rollout deleted, an invalid spec followed by an abort.
//! Every invariant of `support::invariants` is checked at every poll, and each scenario ends converged.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use serin::cli::ManualCommand;
use serin::crd::{AnalysisTemplate, RolloutPhase};
use serin::sim::prometheus::{PrometheusOptions, PrometheusServer};
use support::invariants::{http_routes, Invariants, Snapshot, Target};
use support::*;

const REPLICAS: i32 = 4;

/// The upstream Gateway API CRDs: `SERIN_UPSTREAM_CRDS`, else `../shared/fixtures/upstream-crds` beside
/// the crate.
fn upstream_crds_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SERIN_UPSTREAM_CRDS").map(PathBuf::from),
        Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/upstream-crds"
        ))),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("gateway-api-httproutes.yaml").exists())
}

/// A cluster with Serin's CRDs and the upstream HTTPRoute CRD, and a controller when `controller` is set.
/// None where the CRD fixtures are missing outside CI (the test prints why and passes); in CI their
/// absence is a failure.
async fn routed_world(controller: bool) -> Option<World> {
    let Some(dir) = upstream_crds_dir() else {
        let reason = "the upstream Gateway API CRDs are not in ../shared/fixtures/upstream-crds \
                      (set SERIN_UPSTREAM_CRDS to their directory)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs every scenario: {reason}"
        );
        println!("skipped: {reason}");
        return None;
    };
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
    while routes.list(&ListParams::default()).await.is_err() {
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

/// Writes by `users` since `since`, Events and Leases aside: what changed the cluster or the Rollout.
fn writes_since(
    world: &World,
    users: &[&str],
    since: SystemTime,
) -> Vec<serin::sim::RequestRecord> {
    world.sim.request_log().filter(|r| {
        r.time >= since
            && users.contains(&r.user.as_str())
            && is_write(r)
            && r.resource != "events"
            && r.resource != "leases"
    })
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
        world.kill_controllers();
        let restarted = SystemTime::now();
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
