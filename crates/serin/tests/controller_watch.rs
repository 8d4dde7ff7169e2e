//! The controller's watches and caches, against the simulated cluster: a hand edit of the weights Serin
//! manages in an HTTPRoute is put back from the watch event, not by a timer; only the routes Rollouts name
//! trigger reconciles; an HTTPRoute CRD installed after the controller started is watched once it is
//! there, and before that a routed Rollout says why its route cannot be read; caches that lag behind the
//! controller's own writes never make it send a write twice or take its own weight for a hand edit; pods
//! turning ready one by one do not each cost a status write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit::fixtures;

use serin_testkit as support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::json;
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::{reason, Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use serin_sim::faults::WatchScope;
use serin_sim::RequestRecord;
use support::{canary_rollout, World, CONTROLLER_USER, NS};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// Upper bound on polls of one wait, whatever the clock says.
const MAX_POLLS: u32 = 5_000;
/// A hand edit put back from its watch event takes milliseconds; the timers a controller without the
/// route watch falls back to fire after 5 s (the follow-up after a weight write) or 10 s.
const REVERT_BOUND: Duration = Duration::from_secs(2);
/// How long watch events of the controller are held back to make its caches lag.
const HOLD: Duration = Duration::from_millis(1500);

fn http_routes(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    Api::namespaced_with(client.clone(), NS, &resource)
}

/// A route sending everything to `app`, with a zero-weight backend for its canary Service.
fn route(name: &str, app: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [
                {"name": app, "port": 80, "weight": 100},
                {"name": format!("{app}-canary"), "port": 80, "weight": 0}
            ]}]
        }
    }))
    .expect("valid route")
}

/// (stable, canary) weights of the route's rule.
fn weights(route: &DynamicObject) -> (i64, i64) {
    let refs = &route.data["spec"]["rules"][0]["backendRefs"];
    (
        refs[0]["weight"].as_i64().unwrap_or(-1),
        refs[1]["weight"].as_i64().unwrap_or(-1),
    )
}

async fn install_http_route_crd(admin: &Client, fixtures: &Path) {
    let text = std::fs::read_to_string(fixtures.join("gateway-api-httproutes.yaml"))
        .expect("HTTPRoute CRD readable");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("HTTPRoute CRD parses");
    Api::<CustomResourceDefinition>::all(admin.clone())
        .create(&PostParams::default(), &crd)
        .await
        .expect("HTTPRoute CRD accepted");
    let routes = http_routes(admin);
    wait_for("HTTPRoutes servable", Duration::from_secs(10), async || {
        routes.list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
}

async fn start_controller(world: &World, resync: Duration) -> ControllerHandle {
    let client = world
        .sim
        .client_as(CONTROLLER_USER)
        .await
        .expect("controller client");
    let handle = ControllerHandle::start(
        client,
        ControllerConfig {
            error_backoff: Duration::from_millis(200),
            resync,
            outbound: support::loopback_prometheus(),
            ..ControllerConfig::default()
        },
    )
    .await
    .expect("controller starts");
    assert!(
        handle.wait_ready(Duration::from_secs(10)).await,
        "controller caches never answered"
    );
    handle
}

/// Polls `probe` until it answers, bounded by `timeout` and by `MAX_POLLS`.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    for _ in 0..MAX_POLLS {
        if let Some(found) = probe().await {
            return found;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

async fn route_weights(routes: &Api<DynamicObject>, name: &str) -> Option<(i64, i64)> {
    routes.get(name).await.ok().map(|route| weights(&route))
}

/// Services `app` and `app-canary`, an HTTPRoute `app` and a routed canary Rollout `app` (4 pods,
/// setWeight 10, pause, setWeight 50, pause), Healthy on v1.
async fn given_routed_rollout(world: &World, app: &str) {
    world
        .given_services(app, &[app, &format!("{app}-canary")])
        .await;
    http_routes(&world.admin)
        .create(&PostParams::default(), &route(app, app))
        .await
        .expect("route created");
    world
        .given_rollout(canary_rollout(
            app,
            4,
            &format!("{app}:1"),
            json!({
                "trafficRouting": {"gatewayAPI": {"httpRoute": app}},
                "steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]
            }),
        ))
        .await
        .expect("rollout created");
    world
        .then_eventually(app, "v1 Healthy", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy)
                && s.stable_hash()
                    .is_some_and(|h| s.ready_of(&h) == 4 && s.current_hash() == Some(h))
        })
        .await;
}

/// Changes the image and waits until the canary is paused at step 1 with the route at 90/10.
async fn paused_at_ten_percent(world: &World, app: &str) {
    world.when_image_changes(app, &format!("{app}:2")).await;
    world
        .then_eventually(app, "paused at step 1", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1)
        })
        .await;
    let routes = http_routes(&world.admin);
    wait_for("the route at 90/10", STEP_TIMEOUT, async || {
        (route_weights(&routes, app).await? == (90, 10)).then_some(())
    })
    .await;
}

/// A user (or GitOps) sets the route's weights by hand; returns when the API server accepted it.
async fn hand_edit(
    routes: &Api<DynamicObject>,
    name: &str,
    stable: i64,
    canary: i64,
) -> SystemTime {
    let mut edited = routes.get(name).await.expect("route readable");
    edited.data["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(stable);
    edited.data["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(canary);
    let at = SystemTime::now();
    routes
        .replace(name, &PostParams::default(), &edited)
        .await
        .expect("hand edit accepted");
    at
}

fn controller_requests(world: &World, verb: &str, resource: &str) -> Vec<RequestRecord> {
    world
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER_USER && r.verb == verb && r.resource == resource)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_of_a_managed_weight_is_put_back_from_the_watch_event() {
    let Some(fixtures) = fixtures::upstream_crds_or_skip(
        "a_hand_edit_of_a_managed_weight_is_put_back_from_the_watch_event",
    ) else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        let world = World::without_controller().await;
        install_http_route_crd(&world.admin, &fixtures).await;
        // No resync in the test's time: only a watch event can bring the edit to the controller.
        let controller = start_controller(&world, Duration::from_secs(300)).await;
        given_routed_rollout(&world, "shop").await;
        paused_at_ten_percent(&world, "shop").await;
        let routes = http_routes(&world.admin);

        // Twice, the second edit right after the first was put back, when no timer of the controller can
        // be due: each is put back within milliseconds of the edit.
        for round in 0..2 {
            let edited_at = hand_edit(&routes, "shop", 50, 50).await;
            wait_for(
                "the hand edit put back",
                Duration::from_secs(15),
                async || (route_weights(&routes, "shop").await? == (90, 10)).then_some(()),
            )
            .await;
            let put_back = controller_requests(&world, "patch", "httproutes")
                .into_iter()
                .find(|r| r.time >= edited_at && r.status < 300)
                .expect("the controller patched the route");
            let took = put_back.time.duration_since(edited_at).unwrap_or_default();
            assert!(
                took < REVERT_BOUND,
                "round {round}: the hand edit was put back {took:?} after it was made"
            );
        }
        world
            .expect_event("shop", reason::TRAFFIC_DRIFT, Duration::from_secs(5))
            .await;

        // A route no Rollout names changes 20 times: no reconcile follows, nothing is written to it.
        http_routes(&world.admin)
            .create(&PostParams::default(), &route("other", "shop"))
            .await
            .expect("unrelated route created");
        let reconciles_before = controller.metrics().total_reconciles();
        for edit in 0..20 {
            http_routes(&world.admin)
                .patch(
                    "other",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"edit": edit.to_string()}}})),
                )
                .await
                .expect("unrelated route edited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reconciles = controller.metrics().total_reconciles() - reconciles_before;
        // The follow-up the last weight write asked for may fall in this second, once.
        assert!(
            reconciles <= 2,
            "{reconciles} reconciles while only a route no Rollout names changed"
        );
        assert!(
            world
                .controller_object_writes()
                .iter()
                .all(|w| w.name.as_deref() != Some("other")),
            "the controller wrote to a route no Rollout names"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_route_crd_installed_after_the_controller_started_is_watched_once_it_is_there() {
    let Some(fixtures) = fixtures::upstream_crds_or_skip(
        "an_http_route_crd_installed_after_the_controller_started_is_watched_once_it_is_there",
    ) else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(150), async {
        let world = World::without_controller().await;
        let controller = start_controller(&world, Duration::from_secs(300)).await;

        // Without the CRD, a routed Rollout waits and its status says why the route cannot be read.
        world
            .given_services("early", &["early", "early-canary"])
            .await;
        world
            .given_rollout(canary_rollout(
                "early",
                2,
                "early:1",
                json!({"trafficRouting": {"gatewayAPI": {"httpRoute": "early"}}, "steps": [{"setWeight": 50}]}),
            ))
            .await
            .expect("rollout created");
        let waiting = world
            .then_eventually("early", "the missing route reported", STEP_TIMEOUT, |s| {
                s.message().contains("httproutes") && s.message().contains("CRD")
            })
            .await;
        assert!(!waiting.is(RolloutPhase::Healthy), "{waiting:#?}");

        install_http_route_crd(&world.admin, &fixtures).await;
        // The watch retries with back-off (at most 30 s between tries) and starts once the list works.
        wait_for("the controller watching HTTPRoutes", Duration::from_secs(45), async || {
            controller_requests(&world, "watch", "httproutes")
                .iter()
                .any(|r| r.status == 200)
                .then_some(())
        })
        .await;
        given_routed_rollout(&world, "shop").await;
        paused_at_ten_percent(&world, "shop").await;
        let routes = http_routes(&world.admin);
        let edited_at = hand_edit(&routes, "shop", 0, 100).await;
        wait_for("the hand edit put back", Duration::from_secs(15), async || {
            (route_weights(&routes, "shop").await? == (90, 10)).then_some(())
        })
        .await;
        let put_back = controller_requests(&world, "patch", "httproutes")
            .into_iter()
            .find(|r| r.time >= edited_at && r.status < 300)
            .expect("the controller patched the route");
        let took = put_back.time.duration_since(edited_at).unwrap_or_default();
        assert!(took < REVERT_BOUND, "put back {took:?} after the edit");

        // The Rollout that waited for its route goes on once the route exists.
        http_routes(&world.admin)
            .create(&PostParams::default(), &route("early", "early"))
            .await
            .expect("route created");
        world
            .then_eventually("early", "Healthy once its route exists", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Healthy)
            })
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}

/// Writes of the controller between `from` and `to`, as (verb, resource, name).
fn writes_between(
    world: &World,
    from: SystemTime,
    to: SystemTime,
) -> Vec<(String, String, String)> {
    world
        .controller_object_writes()
        .into_iter()
        .filter(|r| r.time >= from && r.time <= to)
        .map(|r| (r.verb, r.resource, r.name.unwrap_or_default()))
        .collect()
}

/// The writes that appear more than once in `writes` (status updates aside: the same object, new content).
fn repeated(writes: &[(String, String, String)]) -> Vec<(String, String, String)> {
    let mut seen = std::collections::BTreeMap::new();
    for write in writes
        .iter()
        .filter(|(_, resource, _)| resource != "rollouts")
    {
        *seen.entry(write.clone()).or_insert(0) += 1;
    }
    seen.into_iter()
        .filter(|(_, count)| *count > 1)
        .map(|(write, _)| write)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_lagging_behind_the_controllers_writes_never_get_the_same_write_twice() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let world = World::without_controller().await;
        // A reconcile every 100 ms, so many plans are made from the lagging caches.
        let controller = start_controller(&world, Duration::from_millis(100)).await;
        world.given_services("cart", &["cart", "cart-canary"]).await;
        world
            .given_rollout(canary_rollout(
                "cart",
                4,
                "cart:1",
                json!({"steps": [{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]}),
            ))
            .await
            .expect("rollout created");
        let healthy = world
            .then_eventually("cart", "v1 Healthy", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Healthy)
                    && s.stable_hash().is_some_and(|h| s.ready_of(&h) == 4)
            })
            .await;
        let v1 = healthy.stable_hash().unwrap_or_default();
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;

        // The new ReplicaSet and the canary Service's new selector reach the caches only after the hold.
        let lag = |resource: &str, group: &str| {
            world.sim.faults().hold_watch_events(
                WatchScope::new(group, resource).user(CONTROLLER_USER),
                HOLD,
            )
        };
        let started = SystemTime::now();
        lag("replicasets", "apps");
        lag("services", "");
        world.when_image_changes("cart", "cart:2").await;
        let paused = world
            .then_eventually("cart", "paused at step 1", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Paused)
                    && s.step() == Some(1)
                    && s.canary_hash().is_some_and(|h| s.ready_of(&h) == 1)
            })
            .await;
        let v2 = paused.canary_hash().unwrap_or_default();
        let writes = writes_between(&world, started, SystemTime::now());
        assert!(
            repeated(&writes).is_empty(),
            "sent twice: {:?}\nall writes: {writes:#?}",
            repeated(&writes)
        );
        let creates = writes
            .iter()
            .filter(|(verb, resource, _)| verb == "create" && resource == "replicasets")
            .count();
        assert_eq!(creates, 1, "{writes:#?}");

        // The scale-up of the next step reaches the ReplicaSet cache only after the hold.
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;
        let promoted = SystemTime::now();
        lag("replicasets", "apps");
        world.when_command("cart", ManualCommand::Promote).await;
        world
            // 50% without a router: 4 canary pods beside the 4 stable ones.
            .then_eventually("cart", "paused at step 3 with 4 canary pods", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Paused)
                    && s.step() == Some(3)
                    && s.ready_of(&v2) == 4
                    && s.ready_of(&v1) == 4
            })
            .await;
        let writes = writes_between(&world, promoted, SystemTime::now());
        let canary_scales = writes
            .iter()
            .filter(|(verb, resource, name)| {
                verb == "patch" && resource == "replicasets" && name.ends_with(&v2)
            })
            .count();
        assert_eq!(canary_scales, 1, "{writes:#?}");
        assert!(repeated(&writes).is_empty(), "{writes:#?}");
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_cache_lagging_behind_the_controllers_weight_does_not_look_like_a_hand_edit() {
    let Some(fixtures) = fixtures::upstream_crds_or_skip(
        "a_route_cache_lagging_behind_the_controllers_weight_does_not_look_like_a_hand_edit",
    ) else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        let world = World::without_controller().await;
        install_http_route_crd(&world.admin, &fixtures).await;
        let controller = start_controller(&world, Duration::from_millis(100)).await;
        given_routed_rollout(&world, "shop").await;
        paused_at_ten_percent(&world, "shop").await;
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;
        let routes = http_routes(&world.admin);

        // The weight of the next step reaches the route cache only after the hold.
        let promoted = SystemTime::now();
        world.sim.faults().hold_watch_events(
            WatchScope::new("gateway.networking.k8s.io", "httproutes").user(CONTROLLER_USER),
            HOLD,
        );
        world.when_command("shop", ManualCommand::Promote).await;
        world
            .then_eventually("shop", "paused at step 3", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Paused) && s.step() == Some(3)
            })
            .await;
        wait_for("the route at 50/50", STEP_TIMEOUT, async || {
            (route_weights(&routes, "shop").await? == (50, 50)).then_some(())
        })
        .await;
        // Past the hold, so every plan made from the lagging cache is in.
        wait_for("the hold over", HOLD * 4, async || {
            (SystemTime::now()
                .duration_since(promoted)
                .unwrap_or_default()
                > HOLD * 2)
                .then_some(())
        })
        .await;
        let drift: Vec<String> = world
            .events("shop")
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason::TRAFFIC_DRIFT))
            .filter_map(|e| e.note)
            .collect();
        assert!(
            drift.is_empty(),
            "the controller's own weight was taken for a hand edit: {drift:?}"
        );
        let route_patches = controller_requests(&world, "patch", "httproutes")
            .into_iter()
            .filter(|r| r.time >= promoted)
            .count();
        assert_eq!(route_patches, 1, "one weight change, one patch");
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_turning_ready_one_by_one_cost_no_status_write_each() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let world = World::without_controller().await;
        let controller = start_controller(&world, Duration::from_secs(300)).await;
        world.given_services("cart", &["cart", "cart-canary"]).await;
        world
            .given_rollout(canary_rollout(
                "cart",
                2,
                "cart:1",
                json!({"steps": [{"setWeight": 50}, {"pause": {}}]}),
            ))
            .await
            .expect("rollout created");
        world
            .then_eventually("cart", "Healthy with 2 pods", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Healthy) && s.stable_hash().is_some_and(|h| s.ready_of(&h) == 2)
            })
            .await;
        world.when_image_changes("cart", "cart:2").await;
        // 50% without a router: as many canary pods as stable ones.
        world
            .then_eventually("cart", "paused at step 1, 2 + 2 pods", STEP_TIMEOUT, |s| {
                s.is(RolloutPhase::Paused)
                    && s.step() == Some(1)
                    && s.canary_hash().is_some_and(|h| s.ready_of(&h) == 2)
            })
            .await;
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;
        let scaled = SystemTime::now();
        Api::<Rollout>::namespaced(world.admin.clone(), NS)
            .patch(
                "cart",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 6}})),
            )
            .await
            .expect("scaled");
        // Still paused: only the counts move. Once all 12 pods are up they are written at once (what an
        // HPA reads); counts in between may wait up to 5 s, and so would these if a resting point were not
        // told apart.
        wait_for(
            "the status counting 12 ready pods",
            Duration::from_millis(2500),
            async || {
                let rollout = Api::<Rollout>::namespaced(world.admin.clone(), NS)
                    .get("cart")
                    .await
                    .ok()?;
                let status = rollout.status?;
                (status.ready_replicas == Some(12)
                    && status.replicas == Some(12)
                    && status.available_replicas == Some(12))
                .then_some(())
            },
        )
        .await;
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;
        let status_writes = controller_requests(&world, "update", "rollouts")
            .into_iter()
            .filter(|r| r.time >= scaled && r.subresource.as_deref() == Some("status"))
            .count();
        // The new spec seen (observedGeneration), then each resting point: the stable side grows first,
        // the canary side once the stable can carry its share.
        assert!(
            status_writes <= 3,
            "{status_writes} status writes for 8 pods turning ready"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}

/// Every Rollout in `names` is Healthy on generation `generation`.
async fn all_healthy(world: &World, names: &[String], generation: i64) -> Option<()> {
    let rollouts: Api<Rollout> = Api::namespaced(world.admin.clone(), NS);
    for name in names {
        let rollout = rollouts.get(name).await.ok()?;
        let status = rollout.status?;
        let settled = status.phase == Some(RolloutPhase::Healthy)
            && status.observed_generation == Some(generation)
            && rollout.metadata.generation == Some(generation);
        if !settled {
            return None;
        }
    }
    Some(())
}

#[tokio::test]
async fn what_the_controller_keeps_per_rollout_goes_with_the_rollout() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let world = World::without_controller().await;
        let client = world
            .sim
            .client_as(CONTROLLER_USER)
            .await
            .expect("controller client");
        let controller = ControllerHandle::start(
            client,
            ControllerConfig {
                error_backoff: Duration::from_millis(200),
                metrics_addr: Some("127.0.0.1:0".parse().expect("address")),
                outbound: support::loopback_prometheus(),
                ..ControllerConfig::default()
            },
        )
        .await
        .expect("controller starts");
        assert!(controller.wait_ready(Duration::from_secs(10)).await);
        let metrics_url = format!(
            "http://{}/metrics",
            controller.metrics_addr().expect("metrics served")
        );
        let scrape = async || -> String {
            reqwest::get(&metrics_url)
                .await
                .expect("metrics answer")
                .text()
                .await
                .expect("metrics text")
        };

        let names: Vec<String> = (0..8).map(|index| format!("kept-{index}")).collect();
        for name in &names {
            world
                .given_services(name, &[name, &format!("{name}-canary")])
                .await;
            let steps = json!({"steps": [{"setWeight": 50}, {"pause": {"duration": "1s"}}]});
            world
                .given_rollout(canary_rollout(name, 2, "app:v1", steps))
                .await
                .expect("rollout created");
        }
        wait_for("every Rollout Healthy", STEP_TIMEOUT, async || {
            all_healthy(&world, &names, 1).await
        })
        .await;
        // A canary step each: two ReplicaSets per Rollout, selectors pinned, status written.
        for name in &names {
            world.when_image_changes(name, "app:v2").await;
        }
        wait_for("every Rollout Healthy on v2", STEP_TIMEOUT, async || {
            all_healthy(&world, &names, 2).await
        })
        .await;
        let held = controller.retained();
        assert_eq!(held.rollouts, names.len(), "{held:?}");
        assert_eq!(held.replica_set_owners, names.len(), "{held:?}");
        assert_eq!(held.referencing_rollouts, names.len(), "{held:?}");
        assert_eq!(held.rollout_series, names.len(), "{held:?}");
        assert!(scrape().await.contains("rollout=\"kept-0\""));
        // Deleted once nothing is in flight: a write racing the deletion (a ReplicaSet created after the
        // garbage collection ran) is another matter than what is kept.
        world
            .wait_for_quiet_controller(Duration::from_millis(500), Duration::from_secs(10))
            .await;

        let rollouts: Api<Rollout> = Api::namespaced(world.admin.clone(), NS);
        for name in &names {
            rollouts
                .delete(name, &Default::default())
                .await
                .expect("rollout deleted");
        }
        // The watches bring the deletions and the garbage collection of the ReplicaSets.
        let deadline = Instant::now() + STEP_TIMEOUT;
        for _ in 0..MAX_POLLS {
            let retained = controller.retained();
            if retained.rollouts == 0 && retained.replica_sets == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "caches never emptied: {retained:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(
            controller.retained(),
            serin::controller::Retained::default(),
            "nothing kept for a deleted Rollout"
        );
        let text = scrape().await;
        assert!(
            !text.contains("kept-"),
            "no series names a deleted Rollout:\n{text}"
        );
        assert!(
            text.contains("serin_rollouts{phase=\"Healthy\"} 0"),
            "deleted Rollouts are not counted:\n{text}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), controller.stop()).await;
        world.stop().await;
    })
    .await
    .expect("test finishes in time");
}
