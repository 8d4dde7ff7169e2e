//! The traffic routers against the in-process simulated cluster with the real upstream CRDs: weights
//! written through `serin::traffic::apply`, accepted by the CRD schemas, the user's fields untouched, drift
//! observed and reverted, missing objects reported, and the simulated traffic following the weights.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit::fixtures;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::{json, Value};
use serin::crd::Rollout;
use serin::strategy::{DesiredTraffic, HeaderRoute, MirrorRoute, RouteState};
use serin::traffic::{self, RoutingKind, TrafficError};
use serin_sim::{SimCluster, SimConfig};

const NS: &str = "shop";
const STABLE_HASH: &str = "aaaa1";
const CANARY_HASH: &str = "bbbb2";

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn upstream_crds_dir() -> Result<PathBuf, String> {
    fixtures::upstream_crds()
}

async fn with_timeout(test: impl Future<Output = TestResult>) -> TestResult {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .map_err(|_| "test timed out")?
}

/// Polls `check` every 100ms until it yields Some, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polled = tokio::time::timeout(limit, async {
        for _ in 0..10_000 {
            if let Some(value) = check().await {
                return Some(value);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
    .await;
    polled
        .ok()
        .flatten()
        .ok_or_else(|| format!("timed out waiting for {what}"))
}

struct Harness {
    sim: SimCluster,
    client: Client,
}

impl Harness {
    /// A cluster with the Rollout CRD, the given upstream CRDs, two ready versions of `checkout` and the
    /// stable and canary Services pinned to them.
    async fn start(upstream_crds: &[&str]) -> Result<Harness, Box<dyn std::error::Error>> {
        let sim = SimCluster::start(SimConfig {
            port: 0,
            ..Default::default()
        })
        .await?;
        let client = sim.client().await?;
        // The default configuration runs the workload and traffic simulators too.
        let harness = Harness { sim, client };
        let namespace: Namespace = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        )?;
        Api::<Namespace>::all(harness.client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        harness.apply_crds(upstream_crds).await?;
        for (name, hash) in [("checkout-v1", STABLE_HASH), ("checkout-v2", CANARY_HASH)] {
            harness.create_replica_set(name, hash).await?;
        }
        for (name, hash) in [("checkout", STABLE_HASH), ("checkout-canary", CANARY_HASH)] {
            harness.create_service(name, hash).await?;
        }
        Ok(harness)
    }

    async fn stop(self) {
        self.sim.shutdown().await;
    }

    async fn apply_crds(&self, files: &[&str]) -> TestResult {
        let crds = Api::<CustomResourceDefinition>::all(self.client.clone());
        crds.create(&PostParams::default(), &Rollout::crd()).await?;
        if files.is_empty() {
            return Ok(());
        }
        let dir = upstream_crds_dir()?;
        for file in files {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|error| format!("reading {}: {error}", path.display()))?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value: Value = serde::Deserialize::deserialize(document)?;
                if value.is_null() {
                    continue;
                }
                crds.create(&PostParams::default(), &serde_json::from_value(value)?)
                    .await?;
            }
        }
        Ok(())
    }

    async fn create_replica_set(&self, name: &str, hash: &str) -> TestResult {
        let labels = json!({"app": "checkout", "serin.dev/pod-template-hash": hash});
        let replica_set: ReplicaSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": {"sim.serin.dev/ready-after": "0s"}},
                                  "spec": {"containers": [{"name": "app", "image": format!("checkout:{hash}")}]}}}
        }))?;
        Api::<ReplicaSet>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &replica_set)
            .await?;
        Ok(())
    }

    async fn create_service(&self, name: &str, hash: &str) -> TestResult {
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            // Requests enter through the routing objects only: a Service no route points at would
            // otherwise be an entry point of its own in the traffic simulator.
            "metadata": {"name": name, "namespace": NS,
                         "annotations": {"sim.serin.dev/requests-per-second": "0"}},
            "spec": {"selector": {"app": "checkout", "serin.dev/pod-template-hash": hash},
                     "ports": [{"port": 80, "targetPort": 8080}]}
        }))?;
        Api::<Service>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &service)
            .await?;
        Ok(())
    }

    fn api(&self, kind: RoutingKind) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NS, &kind.api_resource())
    }

    /// Creates a routing object (retrying while its CRD is not served yet) and returns it as stored.
    async fn create(
        &self,
        kind: RoutingKind,
        object: Value,
    ) -> Result<Value, Box<dyn std::error::Error>> {
        let object: DynamicObject = serde_json::from_value(object)?;
        let api = self.api(kind);
        let created = eventually(
            "the CRD to serve its resource",
            Duration::from_secs(10),
            || {
                let api = api.clone();
                let object = object.clone();
                async move { api.create(&PostParams::default(), &object).await.ok() }
            },
        )
        .await?;
        Ok(serde_json::to_value(created)?)
    }

    async fn get(
        &self,
        kind: RoutingKind,
        name: &str,
    ) -> Result<Option<Value>, Box<dyn std::error::Error>> {
        Ok(self
            .api(kind)
            .get_opt(name)
            .await?
            .map(serde_json::to_value)
            .transpose()?)
    }

    async fn must_get(
        &self,
        kind: RoutingKind,
        name: &str,
    ) -> Result<Value, Box<dyn std::error::Error>> {
        self.get(kind, name)
            .await?
            .ok_or_else(|| format!("{} {NS}/{name} missing", kind.kind()).into())
    }

    /// Creates the Rollout (so that ownerReferences to it hold) and returns it as stored.
    async fn create_rollout(
        &self,
        traffic_routing: Value,
    ) -> Result<Rollout, Box<dyn std::error::Error>> {
        let rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "checkout", "namespace": NS},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "checkout"}},
                     "template": {"metadata": {"labels": {"app": "checkout"}},
                                  "spec": {"containers": [{"name": "app", "image": "checkout:2"}]}},
                     "strategy": {"canary": {"stableService": "checkout", "canaryService": "checkout-canary",
                                             "trafficRouting": traffic_routing,
                                             "steps": [{"setWeight": 10}, {"setWeight": 50}]}}}
        }))?;
        let api = Api::<Rollout>::namespaced(self.client.clone(), NS);
        let created = eventually(
            "the Rollout CRD to be served",
            Duration::from_secs(10),
            || {
                let api = api.clone();
                let rollout = rollout.clone();
                async move { api.create(&PostParams::default(), &rollout).await.ok() }
            },
        )
        .await?;
        Ok(created)
    }

    /// Waits until the canary's share of the simulated `checkout` traffic is within 3 points of `weight`.
    async fn expect_canary_share(&self, weight: i32) -> TestResult {
        let want = f64::from(weight) / 100.0;
        let mut last = Default::default();
        let settled = eventually(
            "the simulated traffic to follow the weight",
            Duration::from_secs(30),
            || {
                let share = self
                    .sim
                    .traffic()
                    .map(|traffic| traffic.recent_share(NS, "checkout", Duration::from_secs(2)))
                    .unwrap_or_default();
                last = share.clone();
                let canary = share.get(CANARY_HASH).copied().unwrap_or(0.0);
                let stable = share.get(STABLE_HASH).copied().unwrap_or(0.0);
                let settled =
                    (canary - want).abs() <= 0.03 && (stable - (1.0 - want)).abs() <= 0.03;
                async move { settled.then_some(()) }
            },
        )
        .await;
        settled.map_err(|error| {
            format!("{error}: canary weight {weight}, last shares {last:?}").into()
        })
    }
}

fn desired(weight: i32) -> DesiredTraffic {
    DesiredTraffic {
        stable_service: "checkout".into(),
        canary_service: "checkout-canary".into(),
        canary_weight: weight,
        ..DesiredTraffic::default()
    }
}

/// The object without what the server changes on every write, with the fields at `managed` pointers
/// replaced by null: what must stay byte for byte as the user wrote it.
fn user_part(object: &Value, managed: &[&str]) -> String {
    let mut object = object.clone();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for volatile in ["resourceVersion", "generation", "managedFields"] {
            metadata.remove(volatile);
        }
    }
    for pointer in managed {
        if let Some(field) = object.pointer_mut(pointer) {
            *field = Value::Null;
        }
    }
    serde_json::to_string(&object).unwrap_or_default()
}

async fn observed_weight(client: &Client, rollout: &Rollout) -> Result<i32, String> {
    match traffic::observe(client, rollout).await {
        RouteState::Observed(observed) => Ok(observed.canary_weight),
        RouteState::Invalid(message) => Err(message),
        RouteState::Unreadable { message, .. } => Err(message),
        RouteState::NotConfigured => Err("no trafficRouting".into()),
    }
}

fn http_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "checkout", "namespace": NS,
                     "annotations": {"team": "payments", "sim.serin.dev/header-traffic": "X-Canary=yes:0.1"}},
        "spec": {
            "parentRefs": [{"name": "public"}],
            "hostnames": ["shop.example"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "filters": [{"type": "RequestHeaderModifier",
                              "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                 "backendRefs": [{"name": "checkout", "port": 80, "weight": 100},
                                 {"name": "checkout-canary", "port": 80, "weight": 0}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                 "backendRefs": [{"name": "static", "port": 80}]}
            ]
        }
    })
}

const ROUTE_WEIGHTS: [&str; 2] = [
    "/spec/rules/0/backendRefs/0/weight",
    "/spec/rules/0/backendRefs/1/weight",
];

#[tokio::test]
async fn gateway_api_weights_follow_apply_and_the_users_route_is_untouched() -> TestResult {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip(
        "gateway_api_weights_follow_apply_and_the_users_route_is_untouched",
    ) else {
        return Ok(());
    };
    with_timeout(async {
        let h = Harness::start(&["gateway-api-httproutes.yaml"]).await?;
        let original = h.create(RoutingKind::HttpRoute, http_route()).await?;
        let rollout = h
            .create_rollout(json!({"gatewayAPI": {"httpRoute": "checkout"}}))
            .await?;
        assert_eq!(observed_weight(&h.client, &rollout).await?, 0);

        for weight in [10, 50, 100] {
            let outcome = traffic::apply(&h.client, &rollout, &desired(weight)).await?;
            assert_eq!(
                outcome.written,
                vec!["patched HTTPRoute shop/checkout".to_string()]
            );
            let stored = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
            assert_eq!(stored.pointer(ROUTE_WEIGHTS[0]), Some(&json!(100 - weight)));
            assert_eq!(stored.pointer(ROUTE_WEIGHTS[1]), Some(&json!(weight)));
            assert_eq!(
                user_part(&stored, &ROUTE_WEIGHTS),
                user_part(&original, &ROUTE_WEIGHTS)
            );
            assert_eq!(observed_weight(&h.client, &rollout).await?, weight);
            assert!(traffic::apply(&h.client, &rollout, &desired(weight))
                .await?
                .wrote_nothing());
            h.expect_canary_share(weight).await?;
        }
        h.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn gateway_api_drift_is_reverted_and_a_deleted_route_is_reported_until_recreated(
) -> TestResult {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip(
        "gateway_api_drift_is_reverted_and_a_deleted_route_is_reported_until_recreated",
    ) else {
        return Ok(());
    };
    with_timeout(async {
        let h = Harness::start(&["gateway-api-httproutes.yaml"]).await?;
        h.create(RoutingKind::HttpRoute, http_route()).await?;
        let rollout = h
            .create_rollout(json!({"gatewayAPI": {"httpRoute": "checkout"}}))
            .await?;
        traffic::apply(&h.client, &rollout, &desired(10)).await?;

        let hand_edit = json!({"spec": {"rules": [
            http_route()["spec"]["rules"][0].clone(),
            http_route()["spec"]["rules"][1].clone(),
        ]}});
        let mut hand_edit = hand_edit;
        hand_edit["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(40);
        hand_edit["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(60);
        h.api(RoutingKind::HttpRoute)
            .patch(
                "checkout",
                &PatchParams::default(),
                &Patch::Merge(&hand_edit),
            )
            .await?;
        assert_eq!(
            observed_weight(&h.client, &rollout).await?,
            60,
            "the hand edit is seen"
        );
        assert!(!traffic::apply(&h.client, &rollout, &desired(10))
            .await?
            .wrote_nothing());
        assert_eq!(
            observed_weight(&h.client, &rollout).await?,
            10,
            "and reverted"
        );

        // A write the server refuses as a conflict is reported as one, and overwrites nothing.
        let before = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        h.sim.faults().fail_next("patch", "httproutes", 1, 409);
        let conflict = traffic::apply(&h.client, &rollout, &desired(50))
            .await
            .expect_err("conflict");
        assert!(
            matches!(conflict, TrafficError::Conflict { .. }),
            "{conflict}"
        );
        let after = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        assert_eq!(
            after["metadata"]["resourceVersion"],
            before["metadata"]["resourceVersion"]
        );
        traffic::apply(&h.client, &rollout, &desired(50)).await?;
        let written = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        let managers: Vec<&str> = written
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|entry| entry.get("manager").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            managers.contains(&"serin"),
            "field manager serin: {managers:?}"
        );

        h.api(RoutingKind::HttpRoute)
            .delete("checkout", &DeleteParams::default())
            .await?;
        let missing = observed_weight(&h.client, &rollout)
            .await
            .expect_err("deleted route");
        assert!(
            missing.starts_with("HTTPRoute shop/checkout: not found"),
            "{missing}"
        );
        let refused = traffic::apply(&h.client, &rollout, &desired(10))
            .await
            .expect_err("deleted route");
        assert_eq!(refused.category(), "route_invalid");

        h.create(RoutingKind::HttpRoute, http_route()).await?;
        assert_eq!(observed_weight(&h.client, &rollout).await?, 0);
        traffic::apply(&h.client, &rollout, &desired(10)).await?;
        assert_eq!(observed_weight(&h.client, &rollout).await?, 10);
        h.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn gateway_api_header_and_mirror_routes_pass_the_schema_and_leave_no_trace() -> TestResult {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip(
        "gateway_api_header_and_mirror_routes_pass_the_schema_and_leave_no_trace",
    ) else {
        return Ok(());
    };
    with_timeout(async {
        let h = Harness::start(&["gateway-api-httproutes.yaml"]).await?;
        // One rule only, so that the header's 10% of the route's requests are 10% of checkout's.
        let mut single_rule = http_route();
        if let Some(rules) = single_rule["spec"]["rules"].as_array_mut() {
            rules.truncate(1);
        }
        let original = h.create(RoutingKind::HttpRoute, single_rule).await?;
        let rollout = h
            .create_rollout(json!({"gatewayAPI": {"httpRoute": "checkout"}}))
            .await?;
        let mut with_routes = desired(0);
        with_routes.header_routes = vec![HeaderRoute {
            name: "beta".into(),
            matches: vec![serde_json::from_value(
                json!({"headerName": "X-Canary", "headerValue": {"exact": "yes"}}),
            )?],
        }];
        with_routes.mirror_routes = vec![MirrorRoute {
            name: "shadow".into(),
            percentage: 20,
        }];
        let header_only = DesiredTraffic {
            mirror_routes: Vec::new(),
            ..with_routes.clone()
        };
        traffic::apply(&h.client, &rollout, &header_only).await?;
        // The header rule takes the requests that carry the header (10% per the sim annotation).
        h.expect_canary_share(10).await?;
        traffic::apply(&h.client, &rollout, &with_routes).await?;
        let RouteState::Observed(observed) = traffic::observe(&h.client, &rollout).await else {
            return Err("the routes were not observed".into());
        };
        assert_eq!(observed.header_routes, vec!["beta".to_string()]);
        assert_eq!(observed.mirror_routes, vec!["shadow".to_string()]);
        let stored = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        assert_eq!(
            stored.pointer("/spec/rules/1/name"),
            Some(&json!("serin-beta"))
        );
        assert!(
            traffic::apply(&h.client, &rollout, &with_routes)
                .await?
                .wrote_nothing(),
            "defaults do not cause rewrites"
        );

        traffic::apply(&h.client, &rollout, &desired(0)).await?;
        let cleaned = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        assert_eq!(user_part(&cleaned, &[]), user_part(&original, &[]));
        h.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn invalid_routes_are_refused_and_nothing_is_written() -> TestResult {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("invalid_routes_are_refused_and_nothing_is_written")
    else {
        return Ok(());
    };
    with_timeout(async {
        let h = Harness::start(&["gateway-api-httproutes.yaml"]).await?;
        let mut two_rules = http_route();
        two_rules["spec"]["rules"][1]["backendRefs"] = json!([{"name": "checkout", "port": 80}]);
        let stored = h.create(RoutingKind::HttpRoute, two_rules).await?;
        let rollout = h
            .create_rollout(json!({"gatewayAPI": {"httpRoute": "checkout"}}))
            .await?;
        let message = observed_weight(&h.client, &rollout)
            .await
            .expect_err("two rules");
        assert!(
            message.starts_with(
                "HTTPRoute shop/checkout: spec.rules[0].backendRefs and spec.rules[1].backendRefs"
            ),
            "{message}"
        );
        let error = traffic::apply(&h.client, &rollout, &desired(10))
            .await
            .expect_err("two rules");
        assert_eq!(error.to_string(), message);
        let after = h.must_get(RoutingKind::HttpRoute, "checkout").await?;
        assert_eq!(
            after["metadata"]["resourceVersion"], stored["metadata"]["resourceVersion"],
            "nothing written"
        );

        // A canary Service that does not exist never gets traffic.
        h.api(RoutingKind::HttpRoute)
            .delete("checkout", &DeleteParams::default())
            .await?;
        h.create(RoutingKind::HttpRoute, http_route()).await?;
        Api::<Service>::namespaced(h.client.clone(), NS)
            .delete("checkout-canary", &DeleteParams::default())
            .await?;
        let error = traffic::apply(&h.client, &rollout, &desired(10))
            .await
            .expect_err("no canary Service");
        assert!(
            matches!(error, TrafficError::CanaryServiceMissing { .. }),
            "{error}"
        );
        assert_eq!(observed_weight(&h.client, &rollout).await?, 0);
        h.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn istio_weights_and_subsets_follow_apply() -> TestResult {
    let Some(_fixtures) = fixtures::upstream_crds_or_skip("istio_weights_and_subsets_follow_apply")
    else {
        return Ok(());
    };
    with_timeout(async {
        let h = Harness::start(&["istio-virtualservices.yaml", "istio-destinationrules.yaml"]).await?;
        let rule = h
            .create(
                RoutingKind::DestinationRule,
                json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                    "metadata": {"name": "checkout", "namespace": NS},
                    "spec": {"host": "checkout-all", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                             "subsets": [{"name": "stable", "labels": {"app": "checkout"}},
                                         {"name": "canary", "labels": {"app": "checkout"}}]}
                }),
            )
            .await?;
        Api::<Service>::namespaced(h.client.clone(), NS)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "checkout-all", "namespace": NS},
                    "spec": {"selector": {"app": "checkout"}, "ports": [{"port": 80}]}
                }))?,
            )
            .await?;
        let original = h
            .create(
                RoutingKind::VirtualService,
                json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                    "metadata": {"name": "checkout", "namespace": NS, "annotations": {"team": "payments"}},
                    "spec": {"hosts": ["checkout-all"], "http": [
                        {"name": "primary", "retries": {"attempts": 3},
                         "route": [{"destination": {"host": "checkout-all", "subset": "stable"}, "weight": 100},
                                   {"destination": {"host": "checkout-all", "subset": "canary"}, "weight": 0}]}]}
                }),
            )
            .await?;
        let rollout = h
            .create_rollout(json!({"istio": {
                "virtualService": {"name": "checkout", "routes": ["primary"]},
                "destinationRule": {"name": "checkout", "canarySubsetName": "canary", "stableSubsetName": "stable"}}}))
            .await?;
        let weights = ["/spec/http/0/route/0/weight", "/spec/http/0/route/1/weight"];
        for weight in [10, 50, 100] {
            // The subsets follow the hashes the Services are pinned to.
            traffic::apply(&h.client, &rollout, &desired(weight)).await?;
            let stored = h.must_get(RoutingKind::VirtualService, "checkout").await?;
            assert_eq!(stored.pointer(weights[1]), Some(&json!(weight)));
            assert_eq!(user_part(&stored, &weights), user_part(&original, &weights));
            assert_eq!(observed_weight(&h.client, &rollout).await?, weight);
            h.expect_canary_share(weight).await?;
        }
        let pinned = h.must_get(RoutingKind::DestinationRule, "checkout").await?;
        assert_eq!(pinned.pointer("/spec/subsets/0/labels/serin.dev~1pod-template-hash"), Some(&json!(STABLE_HASH)));
        assert_eq!(pinned.pointer("/spec/subsets/1/labels/serin.dev~1pod-template-hash"), Some(&json!(CANARY_HASH)));
        assert_eq!(pinned.pointer("/spec/trafficPolicy"), rule.pointer("/spec/trafficPolicy"));

        let mut with_header = desired(0);
        with_header.header_routes = vec![HeaderRoute {
            name: "beta".into(),
            matches: vec![serde_json::from_value(json!({"headerName": "X-Canary", "headerValue": {"exact": "yes"}}))?],
        }];
        traffic::apply(&h.client, &rollout, &with_header).await?;
        let stored = h.must_get(RoutingKind::VirtualService, "checkout").await?;
        assert_eq!(stored.pointer("/spec/http/0/name"), Some(&json!("serin-beta")));
        assert!(traffic::apply(&h.client, &rollout, &with_header).await?.wrote_nothing());
        traffic::apply(&h.client, &rollout, &desired(0)).await?;
        let cleaned = h.must_get(RoutingKind::VirtualService, "checkout").await?;
        assert_eq!(user_part(&cleaned, &[]), user_part(&original, &[]));
        h.stop().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn nginx_canary_ingress_is_created_moved_and_deleted_and_the_stable_ingress_never_written(
) -> TestResult {
    with_timeout(async {
        let h = Harness::start(&[]).await?;
        let stable: Ingress = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "checkout", "namespace": NS, "annotations": {"team": "payments", "sim.serin.dev/header-traffic": "X-Canary=yes:0.1"}},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": "shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "checkout", "port": {"number": 80}}}}]}}]}
        }))?;
        let ingresses = Api::<Ingress>::namespaced(h.client.clone(), NS);
        let rollout = h.create_rollout(json!({"nginx": {"stableIngress": "checkout"}})).await?;
        let missing = observed_weight(&h.client, &rollout).await.expect_err("no stable Ingress");
        assert!(missing.starts_with("Ingress shop/checkout: not found"), "{missing}");
        let stable = ingresses.create(&PostParams::default(), &stable).await?;

        for weight in [10, 50] {
            traffic::apply(&h.client, &rollout, &desired(weight)).await?;
            let canary = ingresses.get("checkout-checkout-canary").await?;
            let annotations = canary.metadata.annotations.clone().unwrap_or_default();
            assert_eq!(annotations.get("nginx.ingress.kubernetes.io/canary").map(String::as_str), Some("true"));
            assert_eq!(
                annotations.get("nginx.ingress.kubernetes.io/canary-weight"),
                Some(&weight.to_string())
            );
            let owners = canary.metadata.owner_references.clone().unwrap_or_default();
            assert!(owners.iter().any(|owner| owner.kind == "Rollout" && owner.name == "checkout"));
            assert_eq!(observed_weight(&h.client, &rollout).await?, weight);
            h.expect_canary_share(weight).await?;
        }

        let hand_edit = json!({"metadata": {"annotations": {"nginx.ingress.kubernetes.io/canary-weight": "90"}}});
        ingresses.patch("checkout-checkout-canary", &PatchParams::default(), &Patch::Merge(&hand_edit)).await?;
        assert_eq!(observed_weight(&h.client, &rollout).await?, 90);
        traffic::apply(&h.client, &rollout, &desired(50)).await?;
        assert_eq!(observed_weight(&h.client, &rollout).await?, 50);

        // A header route keeps the canary Ingress at weight 0: only requests with the header reach it.
        let mut with_header = desired(0);
        with_header.header_routes = vec![HeaderRoute {
            name: "beta".into(),
            matches: vec![serde_json::from_value(
                json!({"headerName": "X-Canary", "headerValue": {"exact": "yes"}}),
            )?],
        }];
        traffic::apply(&h.client, &rollout, &with_header).await?;
        let canary = ingresses.get("checkout-checkout-canary").await?;
        let annotations = canary.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations.get("nginx.ingress.kubernetes.io/canary-by-header").map(String::as_str),
            Some("X-Canary")
        );
        h.expect_canary_share(10).await?;

        let outcome = traffic::apply(&h.client, &rollout, &desired(0)).await?;
        assert_eq!(outcome.written, vec!["deleted Ingress shop/checkout-checkout-canary".to_string()]);
        assert!(h.get(RoutingKind::Ingress, "checkout-checkout-canary").await?.is_none());
        h.expect_canary_share(0).await?;
        let untouched = ingresses.get("checkout").await?;
        assert_eq!(untouched.metadata.resource_version, stable.metadata.resource_version, "stable Ingress never written");
        h.stop().await;
        Ok(())
    })
    .await
}
