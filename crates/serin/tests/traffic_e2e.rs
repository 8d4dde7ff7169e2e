//! A canary through a Gateway API HTTPRoute, driven by the real controller on the simulated cluster: the route
//! carries exactly the step's weights, the user's other rules stay as written, simulated traffic follows, and
//! an abort puts the weight back to 0 before the canary is scaled down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit::fixtures;

use serin_testkit as support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::{json, Value};
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::{Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use serin_sim::load::TrafficConfig;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{SimCluster, SimConfig};
use support::{canary_rollout, NS};

fn upstream_crds_dir() -> PathBuf {
    fixtures::upstream_crds().unwrap_or_else(|why| panic!("{why}"))
}

struct Cluster {
    sim: SimCluster,
    admin: Client,
    controller: ControllerHandle,
}

async fn start() -> Cluster {
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
    let text = std::fs::read_to_string(upstream_crds_dir().join("gateway-api-httproutes.yaml"))
        .expect("HTTPRoute CRD readable");
    let upstream: CustomResourceDefinition =
        serde_yaml::from_str(&text).expect("HTTPRoute CRD parses");
    crds.create(&PostParams::default(), &upstream)
        .await
        .expect("HTTPRoute CRD accepted");
    for crd in serin::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("Serin CRD accepted");
    }
    let routes = http_routes(&admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while routes.list(&ListParams::default()).await.is_err()
        || Api::<Rollout>::namespaced(admin.clone(), NS)
            .list(&ListParams::default())
            .await
            .is_err()
    {
        assert!(Instant::now() < deadline, "CRDs never became servable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let controller = ControllerHandle::start(
        sim.client_as(support::CONTROLLER_USER)
            .await
            .expect("controller client"),
        ControllerConfig {
            error_backoff: Duration::from_millis(200),
            ..ControllerConfig::default()
        },
    )
    .await
    .expect("controller starts");
    assert!(controller.wait_ready(Duration::from_secs(10)).await);
    Cluster {
        sim,
        admin,
        controller,
    }
}

fn http_routes(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    Api::namespaced_with(client.clone(), NS, &resource)
}

/// The route the user wrote: a header-matched rule of their own first, then the rule Serin manages.
fn user_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": NS, "annotations": {"team": "checkout"}},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/admin"},
                                 "headers": [{"name": "x-admin", "value": "yes"}]}],
                    "backendRefs": [{"name": "shop-admin", "port": 80}]
                },
                {
                    "backendRefs": [
                        {"name": "shop", "port": 80, "weight": 100},
                        {"name": "shop-canary", "port": 80, "weight": 0}
                    ]
                }
            ]
        }
    })
}

fn weights(route: &DynamicObject) -> Vec<(String, i64)> {
    route.data["spec"]["rules"][1]["backendRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|backend| {
            (
                backend["name"].as_str().unwrap_or_default().to_string(),
                backend["weight"].as_i64().unwrap_or(1),
            )
        })
        .collect()
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rollout(admin: &Client) -> Rollout {
    Api::<Rollout>::namespaced(admin.clone(), NS)
        .get("shop")
        .await
        .expect("rollout readable")
}

#[tokio::test]
async fn gateway_api_canary_follows_the_steps_and_abort_puts_the_weight_back_first() {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip(
        "gateway_api_canary_follows_the_steps_and_abort_puts_the_weight_back_first",
    ) else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(180), async {
        let cluster = start().await;
        let admin = cluster.admin.clone();
        for name in ["shop", "shop-canary"] {
            let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": NS},
                "spec": {"selector": {"app": "shop"}, "ports": [{"port": 80}]}
            }))
            .unwrap();
            Api::namespaced(admin.clone(), NS)
                .create(&PostParams::default(), &service)
                .await
                .expect("service created");
        }
        let routes = http_routes(&admin);
        let route: DynamicObject = serde_json::from_value(user_route()).unwrap();
        routes.create(&PostParams::default(), &route).await.expect("route created");
        let manifest = canary_rollout(
            "shop",
            4,
            "shop:1",
            json!({
                "trafficRouting": {"gatewayAPI": {"httpRoute": "shop"}},
                "steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}],
                "abortScaleDownDelaySeconds": 2
            }),
        );
        let rollouts: Api<Rollout> = Api::namespaced(admin.clone(), NS);
        rollouts
            .create(&PostParams::default(), &serde_json::from_value(manifest).unwrap())
            .await
            .expect("rollout created");
        wait_for("v1 healthy", Duration::from_secs(30), async || {
            (rollout(&admin).await.status?.phase? == RolloutPhase::Healthy).then_some(())
        })
        .await;
        let original = routes.get("shop").await.unwrap();

        rollouts
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "shop:2"}]}}}})),
            )
            .await
            .expect("template changed");

        for (step, canary_weight) in [(1, 10), (3, 50)] {
            wait_for(&format!("pause at step {step}"), Duration::from_secs(30), async || {
                let status = rollout(&admin).await.status?;
                (status.current_step_index == Some(step) && status.phase == Some(RolloutPhase::Paused))
                    .then_some(())
            })
            .await;
            let route = routes.get("shop").await.unwrap();
            assert_eq!(
                weights(&route),
                vec![("shop".to_string(), 100 - canary_weight), ("shop-canary".to_string(), canary_weight)],
                "route weights at step {step}"
            );
            assert_eq!(route.data["spec"]["rules"][0], original.data["spec"]["rules"][0], "the user's own rule is untouched");
            assert_eq!(route.metadata.annotations, original.metadata.annotations);
            let canary_hash = rollout(&admin).await.status.unwrap().canary_revision.unwrap().pod_template_hash;
            let traffic = cluster.sim.traffic().expect("traffic simulator").clone();
            wait_for("traffic share follows the weight", Duration::from_secs(20), async || {
                let share = traffic
                    .recent_share(NS, "shop", Duration::from_secs(2))
                    .get(&canary_hash)
                    .copied()
                    .unwrap_or(0.0);
                ((share * 100.0 - canary_weight as f64).abs() <= 4.0).then_some(())
            })
            .await;
            if step == 1 {
                // A hand edit of the managed weights (as Argo CD or a user might make) is put back.
                let mut edited = routes.get("shop").await.unwrap();
                edited.data["spec"]["rules"][1]["backendRefs"][0]["weight"] = json!(50);
                edited.data["spec"]["rules"][1]["backendRefs"][1]["weight"] = json!(50);
                routes
                    .replace("shop", &PostParams::default(), &edited)
                    .await
                    .expect("hand edit accepted");
                wait_for("the hand edit reverted", Duration::from_secs(30), async || {
                    let route = routes.get("shop").await.ok()?;
                    (weights(&route) == vec![("shop".to_string(), 90), ("shop-canary".to_string(), 10)])
                        .then_some(())
                })
                .await;
                let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), NS);
                wait_for("a drift event", Duration::from_secs(10), async || {
                    events
                        .list(&ListParams::default())
                        .await
                        .ok()?
                        .items
                        .iter()
                        .any(|e| e.reason.as_deref() == Some(serin::crd::reason::TRAFFIC_DRIFT))
                        .then_some(())
                })
                .await;
                serin::ops::commands::send(&admin, NS, "shop", ManualCommand::Promote)
                    .await
                    .expect("promote accepted");
            }
        }

        cluster.sim.request_log().clear();
        serin::ops::commands::send(&admin, NS, "shop", ManualCommand::Abort)
            .await
            .expect("abort accepted");
        wait_for("aborted with the weight back on stable", Duration::from_secs(30), async || {
            let status = rollout(&admin).await.status?;
            let route = routes.get("shop").await.ok()?;
            (status.phase == Some(RolloutPhase::Aborted)
                && weights(&route) == vec![("shop".to_string(), 100), ("shop-canary".to_string(), 0)])
            .then_some(())
        })
        .await;
        let writes: Vec<_> = cluster
            .sim
            .request_log()
            .snapshot()
            .into_iter()
            .filter(|r| r.user == support::CONTROLLER_USER && r.verb != "get" && r.verb != "list" && r.verb != "watch")
            .collect();
        let route_write = writes.iter().position(|r| r.resource == "httproutes");
        let canary_scale_down = writes
            .iter()
            .position(|r| r.resource == "replicasets" && r.verb == "patch");
        assert!(route_write.is_some(), "the abort wrote the route: {writes:#?}");
        if let (Some(route_write), Some(scale)) = (route_write, canary_scale_down) {
            assert!(route_write < scale, "weight to 0 before any ReplicaSet is scaled: {writes:#?}");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), cluster.controller.stop()).await;
        cluster.sim.shutdown().await;
    })
    .await
    .expect("test finishes in time");
}
