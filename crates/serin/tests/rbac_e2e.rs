//! The controller as the chart's ServiceAccount with exactly the chart's RBAC, on a simulated cluster that
//! enforces RBAC: `helm template` renders the chart, its ServiceAccount, roles and bindings are applied, and
//! the controller (leader election on) drives a paused canary promoted by hand, a blue-green, three routed
//! canaries (Gateway API, Istio, NGINX), a canary with seven analysis steps on a real Prometheus (one through
//! a ClusterAnalysisTemplate reading a Secret) and a canary whose analysis fails, in cluster-wide and in
//! namespaced mode. No request of the controller is refused, and every permission the chart grants was used
//! by some request (a grant the code does not use fails, naming it). Then, for every single permission of
//! the chart's ClusterRole, the same scenario with that one permission removed shows a 403 for exactly it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;
use serin_testkit::exporter as prometheus;
use serin_testkit::fixtures;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use serin::controller::leader::LeaseConfig;
use serin::controller::ControllerConfig;
use serin::crd::analysis::AnalysisRun;
use serin::crd::{Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use serin_sim::rbac::service_account_user;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{FaultRule, Faults, RequestRecord, SimCluster, SimConfig};
use support::{blue_green_rollout, canary_rollout, State};
use tokio_util::sync::CancellationToken;

const RELEASE: &str = "serin";
const RELEASE_NAMESPACE: &str = "serin-system";
/// The chart's ServiceAccount (its full name: the release name already contains the chart's).
const SERVICE_ACCOUNT: &str = "serin";
const LEASE_NAME: &str = "serin-controller";
const CLUSTER_TEMPLATE: &str = "token-check";
/// How long one path of the scenario may take to reach its expected state.
const PATIENCE: Duration = Duration::from_secs(60);
/// Permissions the chart grants that no request shows: `update` on `rollouts/finalizers` is checked by the
/// OwnerReferencesPermissionEnforcement admission plugin when Serin creates a ReplicaSet, AnalysisRun or
/// canary Ingress whose ownerReference blocks the Rollout's deletion; the sim does not run that plugin.
const NEEDED_BY_ADMISSION: &[(&str, &str, &str)] =
    &[("serin.dev", "rollouts/finalizers", "update")];

/// (API group, resource or resource/subresource, verb).
type Permission = (String, String, String);

fn permission(group: &str, resource: &str, verb: &str) -> Permission {
    (group.to_string(), resource.to_string(), verb.to_string())
}

fn show(p: &Permission) -> String {
    let group = if p.0.is_empty() { "core" } else { p.0.as_str() };
    format!("{} {} ({group})", p.2, p.1)
}

// ---- the chart -------------------------------------------------------------------------------------

fn helm() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/local/bin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join("helm"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`helm` is not installed: install it with `make deps`"))
}

/// The chart's objects rendered for the release, as JSON.
fn render_chart(values: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        RELEASE,
        "charts/serin",
        "--namespace",
        RELEASE_NAMESPACE,
    ];
    args.extend_from_slice(values);
    let output = std::process::Command::new(helm())
        .args(&args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .expect("helm runs");
    assert!(
        output.status.success(),
        "helm template {values:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("YAML");
            serde_json::to_value(value).expect("YAML maps to JSON")
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind_of(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

/// The ServiceAccount, roles and bindings of a render.
fn rbac_objects(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter(|doc| {
            matches!(
                kind_of(doc),
                "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        })
        .cloned()
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Every (group, resource, verb) a role's rules grant.
fn permissions_of(role: &Value) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert(permission(&group, &resource, &verb));
                }
            }
        }
    }
    out
}

/// Everything the roles of a render grant.
fn granted(docs: &[Value]) -> BTreeSet<Permission> {
    docs.iter()
        .filter(|doc| matches!(kind_of(doc), "ClusterRole" | "Role"))
        .flat_map(permissions_of)
        .collect()
}

/// The role without one permission (its other verbs, groups and resources stay granted).
fn without(role: &Value, removed: &Permission) -> Value {
    let mut rules = Vec::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let verbs: Vec<String> = strings(&rule["verbs"])
                    .into_iter()
                    .filter(|verb| permission(&group, &resource, verb) != *removed)
                    .collect();
                if !verbs.is_empty() {
                    rules.push(
                        json!({"apiGroups": [group], "resources": [resource], "verbs": verbs}),
                    );
                }
            }
        }
    }
    let mut role = role.clone();
    role["rules"] = Value::Array(rules);
    role
}

// ---- the cluster -----------------------------------------------------------------------------------

fn dynamic_api(client: &Client, doc: &Value) -> Api<DynamicObject> {
    let api_version = doc["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind_of(doc)));
    match doc["metadata"]["namespace"].as_str() {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// Creates an object as the admin; one that already exists is left as it is.
async fn create(client: &Client, doc: Value) {
    let object: DynamicObject = serde_json::from_value(doc.clone()).expect("a valid object");
    match dynamic_api(client, &doc)
        .create(&PostParams::default(), &object)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!(
            "creating {} {}: {error}",
            kind_of(&doc),
            doc["metadata"]["name"]
        ),
    }
}

struct Bed {
    sim: SimCluster,
    admin: Client,
    prometheus: prometheus::Prometheus,
    _exporter: prometheus::Exporter,
}

impl Bed {
    /// An RBAC-enforcing sim with Serin's CRDs, the Gateway API and Istio CRDs, the release namespace, and
    /// a real Prometheus the analysis queries.
    async fn start(upstream_crds: &Path) -> Bed {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sim = SimCluster::start(SimConfig {
            enforce_rbac: true,
            workload: Some(WorkloadConfig {
                default_ready_delay: support::POD_READY_DELAY,
                resync: Duration::from_secs(2),
            }),
            traffic: None,
            ..SimConfig::default()
        })
        .await
        .expect("sim starts");
        let admin = sim.client().await.expect("admin client");
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("CRD accepted");
        }
        for file in [
            "gateway-api-httproutes.yaml",
            "istio-virtualservices.yaml",
            "istio-destinationrules.yaml",
        ] {
            let text = std::fs::read_to_string(upstream_crds.join(file)).expect("CRD fixture");
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value: Value = serde::Deserialize::deserialize(doc).expect("YAML");
                if !value.is_null() {
                    create(&admin, value).await;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for resource in [
            "serin.dev/v1alpha1/rollouts",
            "networking.istio.io/v1/virtualservices",
        ] {
            let mut parts = resource.split('/');
            let (group, version, plural) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            let api: Api<DynamicObject> = Api::all_with(
                admin.clone(),
                &ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(group, version, ""),
                    plural,
                ),
            );
            while api.list(&ListParams::default()).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{resource} never became servable"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        create(
            &admin,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}}),
        )
        .await;
        let exporter = prometheus::Exporter::start(vec![]).await;
        let prometheus = prometheus::Prometheus::start(&[exporter.address]).await;
        Bed {
            sim,
            admin,
            prometheus,
            _exporter: exporter,
        }
    }

    async fn stop(mut self) {
        self.prometheus.stop();
        self.sim.shutdown().await;
    }

    /// Requests `user` made, oldest first.
    fn requests_of(&self, user: &str) -> Vec<RequestRecord> {
        self.sim.request_log().filter(|r| r.user == user)
    }
}

/// A controller run in-process as `serin controller --leader-elect` runs it, authenticated as `user`.
struct Controller {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), serin::controller::ControllerError>>,
}

impl Controller {
    async fn start(
        bed: &Bed,
        user: &str,
        namespaces: Vec<String>,
        lease_namespace: &str,
    ) -> Controller {
        let client = bed.sim.client_as(user).await.expect("controller client");
        let config = ControllerConfig {
            namespaces,
            error_backoff: Duration::from_millis(200),
            instance: Some("rbac-e2e".into()),
            leader: Some(LeaseConfig {
                lease_name: LEASE_NAME.into(),
                lease_namespace: lease_namespace.into(),
                identity: "rbac-e2e".into(),
                lease_duration: Duration::from_secs(3),
                renew_deadline: Duration::from_secs(2),
                retry_period: Duration::from_millis(200),
            }),
            outbound: support::loopback_prometheus(),
            ..ControllerConfig::default()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serin::controller::run_until(
            client,
            config,
            std::sync::Arc::new(serin::controller::Metrics::new()),
            shutdown.clone(),
        ));
        Controller { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

// ---- the scenario ----------------------------------------------------------------------------------

fn in_namespace(mut manifest: Value, namespace: &str) -> Value {
    manifest["metadata"]["namespace"] = json!(namespace);
    manifest
}

fn service(namespace: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}
    })
}

/// One measurement of `vector(1)` on the test's Prometheus; `passes` decides the condition.
fn metric(name: &str, address: &str, passes: bool, token: bool) -> Value {
    let mut provider = json!({"address": address, "query": "vector(1)", "timeout": "5s"});
    if token {
        provider["authentication"] =
            json!({"bearerToken": {"name": "prometheus-token", "key": "token"}});
    }
    json!({
        "name": name,
        "count": 1,
        "successCondition": if passes { "result == 1" } else { "result == 0" },
        "provider": {"prometheus": provider}
    })
}

/// Services, routes, the Secret and the analysis templates the scenario's Rollouts name, in `namespace`.
async fn prepare(admin: &Client, namespace: &str, prometheus: &str) {
    for (name, app) in [
        ("web", "web"),
        ("web-canary", "web"),
        ("bg", "bg"),
        ("bg-preview", "bg"),
        ("routed", "routed"),
        ("routed-canary", "routed"),
        ("mesh", "mesh"),
        ("mesh-canary", "mesh"),
        ("mesh-all", "mesh"),
        ("edge", "edge"),
        ("edge-canary", "edge"),
        ("checked", "checked"),
        ("checked-canary", "checked"),
        ("failing", "failing"),
        ("failing-canary", "failing"),
        ("slow", "slow"),
        ("slow-canary", "slow"),
    ] {
        create(admin, service(namespace, name, app)).await;
    }
    create(admin, json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "routed", "namespace": namespace},
        "spec": {"parentRefs": [{"name": "public"}], "rules": [{"backendRefs": [
            {"name": "routed", "port": 80, "weight": 100}, {"name": "routed-canary", "port": 80, "weight": 0}]}]}
    }))
    .await;
    create(
        admin,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "mesh", "namespace": namespace},
            "spec": {"host": "mesh-all", "subsets": [{"name": "stable", "labels": {"app": "mesh"}},
                                                     {"name": "canary", "labels": {"app": "mesh"}}]}
        }),
    )
    .await;
    create(
        admin,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "mesh", "namespace": namespace},
            "spec": {"hosts": ["mesh-all"], "http": [{"name": "primary", "route": [
                {"destination": {"host": "mesh-all", "subset": "stable"}, "weight": 100},
                {"destination": {"host": "mesh-all", "subset": "canary"}, "weight": 0}]}]}
        }),
    )
    .await;
    create(admin, json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "edge", "namespace": namespace},
        "spec": {"ingressClassName": "nginx", "rules": [{"host": "edge.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "edge", "port": {"number": 80}}}}]}}]}
    }))
    .await;
    create(
        admin,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "prometheus-token", "namespace": namespace},
            "stringData": {"token": "not-a-real-token"}
        }),
    )
    .await;
    for (name, passes) in [("pass", true), ("fail", false), ("slow", true)] {
        let mut measured = metric(name, prometheus, passes, false);
        if name == "slow" {
            // Measured again only after a while: the run is still running when the test aborts.
            measured["count"] = json!(3);
            measured["interval"] = json!("60s");
        }
        create(
            admin,
            json!({
                "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"metrics": [measured]}
            }),
        )
        .await;
    }
    create(
        admin,
        json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "ClusterAnalysisTemplate",
            "metadata": {"name": CLUSTER_TEMPLATE},
            "spec": {"metrics": [metric(CLUSTER_TEMPLATE, prometheus, true, true)]}
        }),
    )
    .await;
}

fn two_steps() -> Value {
    json!([{"setWeight": 50}, {"setWeight": 100}])
}

fn analysis_step(template: &str, cluster_scope: bool) -> Value {
    json!({"analysis": {"templates": [{"templateName": template, "clusterScope": cluster_scope}]}})
}

/// The scenario's Rollouts at v1.
fn rollouts(namespace: &str) -> Vec<Value> {
    let mut web = canary_rollout(
        "web",
        2,
        "web:v1",
        json!({"steps": [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]}),
    );
    // Old ReplicaSets are deleted as soon as they are at zero.
    web["spec"]["revisionHistoryLimit"] = json!(0);
    let bg = blue_green_rollout(
        "bg",
        2,
        "bg:v1",
        json!({"autoPromotionEnabled": true, "scaleDownDelaySeconds": 0}),
    );
    let routed = canary_rollout(
        "routed",
        2,
        "routed:v1",
        json!({"trafficRouting": {"gatewayAPI": {"httpRoute": "routed"}}, "steps": two_steps()}),
    );
    let mesh = canary_rollout(
        "mesh",
        2,
        "mesh:v1",
        json!({"trafficRouting": {"istio": {
            "virtualService": {"name": "mesh", "routes": ["primary"]},
            "destinationRule": {"name": "mesh", "canarySubsetName": "canary", "stableSubsetName": "stable"}}},
               "steps": two_steps()}),
    );
    let edge = canary_rollout(
        "edge",
        2,
        "edge:v1",
        json!({"trafficRouting": {"nginx": {"stableIngress": "edge"}}, "steps": two_steps()}),
    );
    // Seven analysis runs per revision: at v3, v2's runs are more than the five old ones kept.
    let mut checked_steps = vec![
        json!({"setWeight": 50}),
        analysis_step(CLUSTER_TEMPLATE, true),
    ];
    checked_steps.extend((0..6).map(|_| analysis_step("pass", false)));
    let checked = canary_rollout("checked", 1, "checked:v1", json!({"steps": checked_steps}));
    let failing = canary_rollout(
        "failing",
        1,
        "failing:v1",
        json!({"abortScaleDownDelaySeconds": 0,
               "steps": [{"setWeight": 50}, analysis_step("fail", false), {"setWeight": 100}]}),
    );
    let slow = canary_rollout(
        "slow",
        1,
        "slow:v1",
        json!({"abortScaleDownDelaySeconds": 0,
               "steps": [{"setWeight": 50}, analysis_step("slow", false), {"setWeight": 100}]}),
    );
    [web, bg, routed, mesh, edge, checked, failing, slow]
        .into_iter()
        .map(|rollout| in_namespace(rollout, namespace))
        .collect()
}

async fn state(admin: &Client, namespace: &str, name: &str) -> State {
    let rollout = Api::<Rollout>::namespaced(admin.clone(), namespace)
        .get(name)
        .await
        .expect("rollout exists");
    State {
        rollout,
        replica_sets: Vec::new(),
        selectors: Default::default(),
    }
}

/// Waits (bounded in time and polls) until `condition` holds for the Rollout; the last state on timeout.
async fn wait_for(
    admin: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    condition: impl Fn(&State) -> bool,
) -> Result<State, String> {
    let deadline = Instant::now() + PATIENCE;
    for _ in 0..10_000 {
        let now = state(admin, namespace, name).await;
        if condition(&now) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{namespace}/{name}: no {what} within {PATIENCE:?}: phase {:?}, message {:?}",
                now.phase(),
                now.message()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{namespace}/{name}: no {what} after 10000 polls"))
}

/// Healthy at a revision other than `not`.
fn healthy_past(not: Option<String>) -> impl Fn(&State) -> bool {
    move |s: &State| {
        s.is(RolloutPhase::Healthy)
            && s.observed()
            && s.current_hash().is_some()
            && s.stable_hash() == s.current_hash()
            && s.current_hash() != not
    }
}

async fn set_image(admin: &Client, namespace: &str, name: &str, image: &str) {
    Api::<Rollout>::namespaced(admin.clone(), namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})),
        )
        .await
        .expect("image changed");
}

async fn replica_set_names(admin: &Client, namespace: &str, app: &str) -> Vec<String> {
    Api::<ReplicaSet>::namespaced(admin.clone(), namespace)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list ReplicaSets")
        .items
        .iter()
        .map(|rs| rs.name_any())
        .collect()
}

async fn runs_of(admin: &Client, namespace: &str, hash: &str) -> usize {
    Api::<AnalysisRun>::namespaced(admin.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("list AnalysisRuns")
        .items
        .iter()
        .filter(|run| run.name_any().contains(hash))
        .count()
}

/// The AnalysisRuns of a Rollout that have not completed.
async fn running_runs(admin: &Client, namespace: &str, rollout: &str) -> Vec<AnalysisRun> {
    Api::<AnalysisRun>::namespaced(admin.clone(), namespace)
        .list(
            &ListParams::default()
                .labels(&format!("{}={rollout}", serin::crd::labels::ROLLOUT_NAME)),
        )
        .await
        .expect("list AnalysisRuns")
        .items
        .into_iter()
        .filter(|run| {
            run.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_none_or(|phase| !phase.is_completed())
        })
        .collect()
}

/// Polls `check` (bounded) until it holds.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    for _ in 0..10_000 {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("no {what} within {PATIENCE:?}"))
}

/// Every path, from v1 to its expected end: each Rollout reaches its state or the error says which did not.
async fn drive(admin: &Client, faults: &Faults, namespace: &str) -> Result<(), String> {
    let manifests = rollouts(namespace);
    let names: Vec<String> = manifests
        .iter()
        .map(|m| m["metadata"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    for manifest in manifests {
        let rollout: Rollout = serde_json::from_value(manifest).expect("a valid Rollout");
        Api::<Rollout>::namespaced(admin.clone(), namespace)
            .create(&PostParams::default(), &rollout)
            .await
            .map_err(|e| format!("creating Rollout {}: {e}", rollout.name_any()))?;
    }
    let mut v1 = Vec::new();
    for name in &names {
        let healthy = wait_for(admin, namespace, name, "v1 Healthy", healthy_past(None)).await?;
        v1.push(healthy.current_hash());
    }
    // One ReplicaSet create and one AnalysisRun create answered "already exists" for an object that is not
    // there: the controller reads it back, finds nothing, and creates it again.
    for resource in ["replicasets", "analysisruns"] {
        faults
            .add_rule(FaultRule {
                namespace: Some(namespace.to_string()),
                ..FaultRule::fail("create", resource, 409)
            })
            .map_err(|e| e.to_string())?;
    }
    for name in &names {
        set_image(admin, namespace, name, &format!("{name}:v2")).await;
    }
    // The paused canary goes on only when promoted by hand.
    wait_for(admin, namespace, "web", "pause at step 1", |s| {
        s.is(RolloutPhase::Paused) && s.step() == Some(1)
    })
    .await?;
    serin::ops::commands::send(admin, namespace, "web", ManualCommand::Promote)
        .await
        .map_err(|e| format!("promote: {e}"))?;
    let mut v2 = Vec::new();
    // A run still measuring when its canary is aborted by hand is terminated.
    wait_for(admin, namespace, "slow", "the analysis step", |s| {
        s.step() == Some(1)
    })
    .await?;
    until("a running AnalysisRun of slow", async || {
        !running_runs(admin, namespace, "slow").await.is_empty()
    })
    .await?;
    serin::ops::commands::send(admin, namespace, "slow", ManualCommand::Abort)
        .await
        .map_err(|e| format!("abort: {e}"))?;
    until("termination of slow's run", async || {
        running_runs(admin, namespace, "slow")
            .await
            .iter()
            .all(|run| run.spec.terminate)
    })
    .await?;
    for (name, before) in names.iter().zip(&v1) {
        if name == "slow" {
            wait_for(admin, namespace, name, "abort by hand", |s| {
                s.is(RolloutPhase::Aborted)
            })
            .await?;
            v2.push(None);
            continue;
        }
        if name == "failing" {
            let aborted = wait_for(
                admin,
                namespace,
                name,
                "abort on the failed analysis",
                |s| s.is(RolloutPhase::Aborted) || s.is(RolloutPhase::Degraded),
            )
            .await?;
            if aborted.stable_hash() != *before {
                return Err(format!(
                    "{namespace}/failing: v2 became stable after a failed analysis"
                ));
            }
            v2.push(None);
            continue;
        }
        let healthy = wait_for(
            admin,
            namespace,
            name,
            "v2 Healthy",
            healthy_past(before.clone()),
        )
        .await?;
        v2.push(healthy.current_hash());
    }
    // With revisionHistoryLimit 0, v1's ReplicaSet of the promoted canary is deleted.
    until("deletion of web's v1 ReplicaSet", async || {
        replica_set_names(admin, namespace, "web").await.len() == 1
    })
    .await?;
    // Gateway API and Istio: all traffic back on the stable Service / subset after the promotion.
    for (kind, name, pointers) in [
        (
            ("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "routed",
            [
                "/spec/rules/0/backendRefs/0/weight",
                "/spec/rules/0/backendRefs/1/weight",
            ],
        ),
        (
            ("networking.istio.io", "v1", "VirtualService"),
            "mesh",
            ["/spec/http/0/route/0/weight", "/spec/http/0/route/1/weight"],
        ),
    ] {
        let route = json!({"apiVersion": format!("{}/{}", kind.0, kind.1), "kind": kind.2,
                           "metadata": {"namespace": namespace}});
        until(&format!("{} {name} at 100/0", kind.2), async || {
            dynamic_api(admin, &route)
                .get(name)
                .await
                .ok()
                .and_then(|object| serde_json::to_value(object).ok())
                .is_some_and(|value| {
                    value.pointer(pointers[0]) == Some(&json!(100))
                        && value.pointer(pointers[1]) == Some(&json!(0))
                })
        })
        .await?;
    }
    // NGINX: the managed canary Ingress is gone once all traffic is back on the (new) stable.
    until("deletion of the canary Ingress", async || {
        Api::<k8s_openapi::api::networking::v1::Ingress>::namespaced(admin.clone(), namespace)
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len() == 1)
            .unwrap_or(false)
    })
    .await?;
    // v3 of the analysed canary makes v2's seven runs old: beyond the five kept, they are deleted.
    let checked_v2 = v2[names.iter().position(|n| n == "checked").unwrap_or(0)].clone();
    set_image(admin, namespace, "checked", "checked:v3").await;
    wait_for(
        admin,
        namespace,
        "checked",
        "v3 Healthy",
        healthy_past(checked_v2.clone()),
    )
    .await?;
    let hash = checked_v2.unwrap_or_default();
    until("deletion of v2's oldest AnalysisRuns", async || {
        runs_of(admin, namespace, &hash).await <= 5
    })
    .await
}

// ---- the checks ------------------------------------------------------------------------------------

/// What the controller's requests used: every request it made that was not refused.
fn used(records: &[RequestRecord]) -> BTreeSet<Permission> {
    records
        .iter()
        .filter(|r| !r.resource.is_empty() && r.status != 403)
        .map(|r| {
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            };
            permission(&r.group, &resource, &r.verb)
        })
        .collect()
}

fn refused(records: &[RequestRecord]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| format!("{} {} ({})", r.verb, r.path, r.status))
        .collect()
}

/// Runs the scenario as the chart's ServiceAccount with the chart rendered with `values`; asserts no
/// request was refused and that the chart grants exactly what the requests used.
async fn run_as_the_chart(values: &[&str], namespaced: bool) {
    let Some(crds) = fixtures::upstream_crds_or_skip("rbac_e2e") else {
        return;
    };
    let bed = Bed::start(&crds).await;
    let namespace = "shop";
    create(
        &bed.admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
    )
    .await;
    let docs = render_chart(values);
    for object in rbac_objects(&docs) {
        create(&bed.admin, object).await;
    }
    prepare(&bed.admin, namespace, &bed.prometheus.url).await;
    let user = service_account_user(RELEASE_NAMESPACE, SERVICE_ACCOUNT);
    let scope = if namespaced {
        vec![namespace.to_string()]
    } else {
        Vec::new()
    };
    let controller = Controller::start(&bed, &user, scope, RELEASE_NAMESPACE).await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(240),
        drive(&bed.admin, bed.sim.faults(), namespace),
    )
    .await;
    controller.stop().await;
    let records = bed.requests_of(&user);
    let refusals = refused(&records);
    assert!(
        refusals.is_empty(),
        "the chart's RBAC refused the controller: {refusals:#?}"
    );
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) => panic!("{why}"),
        Err(_) => panic!("the scenario did not finish in 240 s"),
    }
    // Leases only in the release namespace; in namespaced mode nothing outside the watched namespace but
    // the cluster-scoped templates.
    let outside: Vec<String> = records
        .iter()
        .filter(|r| !r.resource.is_empty())
        .filter(|r| match r.namespace.as_deref() {
            Some(ns) if r.resource == "leases" => ns != RELEASE_NAMESPACE,
            Some(ns) => ns != namespace,
            None => namespaced && r.resource != "clusteranalysistemplates",
        })
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect();
    assert!(
        outside.is_empty(),
        "requests outside the controller's scope: {outside:#?}"
    );
    let used = used(&records);
    let exempt: BTreeSet<Permission> = NEEDED_BY_ADMISSION
        .iter()
        .map(|(g, r, v)| permission(g, r, v))
        .collect();
    let unused: Vec<String> = granted(&docs)
        .difference(&used)
        .filter(|p| !exempt.contains(*p))
        .map(show)
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the controller never used: {unused:?}\nused: {:?}",
        used.iter().map(show).collect::<Vec<_>>()
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_passes_cluster_wide_as_the_charts_service_account_and_uses_every_grant() {
    run_as_the_chart(&[], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_passes_namespaced_as_the_charts_service_account_and_uses_every_grant() {
    run_as_the_chart(
        &[
            "--set",
            "namespaced=true",
            "--set",
            "watchNamespaces={shop}",
        ],
        true,
    )
    .await;
}

/// Runs the scenario with `removed` taken out of the render's role at `index`, until the controller is
/// refused something (or the scenario ends); Ok when what was refused is exactly `removed`.
async fn refused_without(
    crds: &Path,
    docs: &[Value],
    index: usize,
    removed: &Permission,
) -> Result<(), String> {
    let bed = Bed::start(crds).await;
    let namespace = "shop";
    create(
        &bed.admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
    )
    .await;
    for (at, object) in docs.iter().enumerate() {
        if !matches!(
            kind_of(object),
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            continue;
        }
        let object = if at == index {
            without(object, removed)
        } else {
            object.clone()
        };
        create(&bed.admin, object).await;
    }
    prepare(&bed.admin, namespace, &bed.prometheus.url).await;
    let user = service_account_user(RELEASE_NAMESPACE, SERVICE_ACCOUNT);
    let controller = Controller::start(&bed, &user, Vec::new(), RELEASE_NAMESPACE).await;
    let first_refusal = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        for _ in 0..2_000 {
            if bed.requests_of(&user).iter().any(|r| r.status == 403) || Instant::now() >= deadline
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = drive(&bed.admin, bed.sim.faults(), namespace) => {}
        _ = first_refusal => {}
    }
    controller.stop().await;
    let refused: BTreeSet<Permission> = bed
        .requests_of(&user)
        .into_iter()
        .filter(|r| r.status == 403)
        .map(|r| {
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            };
            permission(&r.group, &resource, &r.verb)
        })
        .collect();
    bed.stop().await;
    if refused == BTreeSet::from([removed.clone()]) {
        Ok(())
    } else {
        Err(format!(
            "without {}: the controller was refused {:?}",
            show(removed),
            refused.iter().map(show).collect::<Vec<_>>()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_single_permission_of_the_chart_the_controller_is_refused_exactly_that() {
    let Some(crds) = fixtures::upstream_crds_or_skip(
        "without_any_single_permission_of_the_chart_the_controller_is_refused_exactly_that",
    ) else {
        return;
    };
    let docs = render_chart(&[]);
    let exempt: BTreeSet<Permission> = NEEDED_BY_ADMISSION
        .iter()
        .map(|(g, r, v)| permission(g, r, v))
        .collect();
    let cases: Vec<(usize, Permission)> = docs
        .iter()
        .enumerate()
        .filter(|(_, doc)| matches!(kind_of(doc), "ClusterRole" | "Role"))
        .flat_map(|(index, role)| permissions_of(role).into_iter().map(move |p| (index, p)))
        .filter(|(_, p)| !exempt.contains(p))
        .collect();
    assert!(
        cases.len() > 20,
        "the chart grants {} permissions",
        cases.len()
    );
    use futures::StreamExt;
    let failures: Vec<String> = futures::stream::iter(cases.iter())
        .map(|(index, removed)| refused_without(&crds, &docs, *index, removed))
        .buffer_unordered(4)
        .filter_map(|outcome| async move { outcome.err() })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} of {} single removals were not refused as exactly that permission:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
