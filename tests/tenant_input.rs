//! Bad input from tenants, on the real controller against the simulated cluster: huge and deeply nested
//! specs, numbers at the type limits, templates of other namespaces, objects squatting the names Serin gives
//! its own, a Service named by two Rollouts and Rollouts selecting the same pods. Each case checks the exact
//! admission error or condition, that no object of the other tenant changed (resourceVersions and the
//! controller's writes in the request log), and that a well-formed Rollout in another namespace still rolls
//! out meanwhile.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin::crd::{Rollout, RolloutPhase};
use serin::sim::RequestRecord;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Namespace of the well-formed Rollout that must keep rolling out whatever the tenants send.
const BYSTANDER_NS: &str = "bystander";
const BYSTANDER: &str = "calm";

fn rollouts_in(client: &Client, namespace: &str) -> Api<Rollout> {
    Api::namespaced(client.clone(), namespace)
}

async fn create_namespace(world: &World, name: &str) {
    let namespaces: Api<Namespace> = Api::all(world.admin.clone());
    let namespace: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .expect("valid namespace");
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace created");
}

/// Creates `object` (any kind) in `namespace` as the admin.
async fn create_in(world: &World, namespace: &str, object: Value) -> Result<(), kube::Error> {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group.to_string(), version.to_string()),
        None => (String::new(), api_version.clone()),
    };
    let plural = match kind.as_str() {
        "Ingress" => "ingresses".to_string(),
        other => format!("{}s", other.to_lowercase()),
    };
    let resource = ApiResource {
        group,
        version,
        api_version,
        kind,
        plural,
    };
    let api: Api<DynamicObject> = Api::namespaced_with(world.admin.clone(), namespace, &resource);
    let object: DynamicObject = serde_json::from_value(object).expect("object decodes");
    api.create(&PostParams::default(), &object)
        .await
        .map(|_| ())
}

async fn service(world: &World, namespace: &str, name: &str, app: &str) {
    create_in(
        world,
        namespace,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}
        }),
    )
    .await
    .expect("service created");
}

/// A canary Rollout `name` in `namespace` with its two Services, steps without pauses.
fn canary_in(namespace: &str, name: &str, image: &str) -> Value {
    let mut manifest = canary_rollout(
        name,
        2,
        image,
        json!({"steps": [{"setWeight": 50}], "maxSurge": 1}),
    );
    manifest["metadata"]["namespace"] = json!(namespace);
    manifest
}

/// The Rollout in another namespace that must keep rolling out: created Healthy at v1 when the test starts,
/// moved to v2 while the bad input is in the cluster, and expected Healthy at v2 at the end.
struct Bystander;

impl Bystander {
    async fn start(world: &World) -> Bystander {
        create_namespace(world, BYSTANDER_NS).await;
        service(world, BYSTANDER_NS, BYSTANDER, BYSTANDER).await;
        service(
            world,
            BYSTANDER_NS,
            &format!("{BYSTANDER}-canary"),
            BYSTANDER,
        )
        .await;
        create_in(
            world,
            BYSTANDER_NS,
            canary_in(BYSTANDER_NS, BYSTANDER, "calm:1"),
        )
        .await
        .expect("bystander accepted");
        Bystander
    }

    /// Changes the bystander's image now, while the bad input is in the cluster.
    async fn roll(&self, world: &World) {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "calm:2"}]}}}});
        rollouts_in(&world.admin, BYSTANDER_NS)
            .patch(
                BYSTANDER,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .expect("bystander patched");
    }

    /// Waits (bounded) until the bystander is Healthy on v2.
    async fn expect_rolled_out(&self, world: &World) {
        let api = rollouts_in(&world.admin, BYSTANDER_NS);
        let deadline = Instant::now() + TIMEOUT;
        for _ in 0..5_000 {
            let rollout = api.get(BYSTANDER).await.expect("bystander exists");
            let status = rollout.status.clone().unwrap_or_default();
            let image = rollout
                .spec
                .template
                .spec
                .as_ref()
                .map(|spec| spec.containers[0].image.clone());
            if status.observed_generation == rollout.metadata.generation
                && status.phase == Some(RolloutPhase::Healthy)
                && image == Some(Some("calm:2".into()))
                && status.stable_revision.as_ref().map(|r| r.revision) == Some(2)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the bystander did not roll out to v2 within {TIMEOUT:?}: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bystander did not roll out to v2");
    }
}

/// resourceVersion of every object of the watched kinds in `namespace`, by kind and name.
async fn versions(world: &World, namespace: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (group, version, kind, plural) in [
        ("apps", "v1", "ReplicaSet", "replicasets"),
        ("", "v1", "Service", "services"),
        ("", "v1", "Pod", "pods"),
        ("networking.k8s.io", "v1", "Ingress", "ingresses"),
        ("serin.dev", "v1alpha1", "Rollout", "rollouts"),
        (
            "serin.dev",
            "v1alpha1",
            "AnalysisTemplate",
            "analysistemplates",
        ),
        ("serin.dev", "v1alpha1", "AnalysisRun", "analysisruns"),
    ] {
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        let resource = ApiResource {
            group: group.into(),
            version: version.into(),
            api_version,
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(world.admin.clone(), namespace, &resource);
        for object in api.list(&ListParams::default()).await.expect("list").items {
            out.insert(
                format!("{kind}/{}", object.name_any()),
                object.resource_version().unwrap_or_default(),
            );
        }
    }
    out
}

/// The controller's writes (Events aside) to objects in `namespace`.
fn controller_writes_in(world: &World, namespace: &str) -> Vec<RequestRecord> {
    world
        .controller_object_writes()
        .into_iter()
        .filter(|record| record.namespace.as_deref() == Some(namespace))
        .collect()
}

/// Polls the Rollout `name` of `namespace` until `condition` holds (bounded by time and count), checking
/// `invariant` at every poll; returns the Rollout that satisfied it.
async fn eventually_rollout(
    world: &World,
    namespace: &str,
    name: &str,
    what: &str,
    mut invariant: impl FnMut(&Rollout),
    condition: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let api = rollouts_in(&world.admin, namespace);
    let deadline = Instant::now() + TIMEOUT;
    for _ in 0..5_000 {
        let rollout = api.get(name).await.expect("rollout exists");
        invariant(&rollout);
        if condition(&rollout) {
            return rollout;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for: {what}\n{:#?}",
            rollout.status
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gave up waiting for: {what}");
}

/// The condition of `type_` in the Rollout's status: (status, reason, message).
fn condition(rollout: &Rollout, type_: &str) -> Option<(String, String, String)> {
    rollout.status.as_ref().and_then(|status| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    })
}

/// Polls the status of a Rollout that may not decode as one (bounded), until `condition` holds.
async fn eventually_raw_status(
    world: &World,
    namespace: &str,
    name: &str,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let api: Api<DynamicObject> = Api::namespaced_with(
        world.admin.clone(),
        namespace,
        &ApiResource::erase::<Rollout>(&()),
    );
    let deadline = Instant::now() + TIMEOUT;
    for _ in 0..5_000 {
        let object = api.get(name).await.expect("rollout exists");
        let status = object.data.get("status").cloned().unwrap_or(Value::Null);
        if condition(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for: {what}\n{status:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gave up waiting for: {what}");
}

/// A condition of a status read as JSON: (status, reason, message).
fn raw_condition(status: &Value, type_: &str) -> Option<(String, String, String)> {
    let found = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?;
    let text = |key: &str| found[key].as_str().unwrap_or_default().to_string();
    Some((text("status"), text("reason"), text("message")))
}

/// The API server's refusal of a request: (code, message).
fn refusal(result: Result<(), kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(response)) => (response.code, response.message),
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

/// Sends `body` as a create of a Rollout in `namespace`, bytes as they are.
async fn post_raw(world: &World, namespace: &str, body: Vec<u8>) -> Result<(), kube::Error> {
    let request = http::Request::post(format!(
        "/apis/serin.dev/v1alpha1/namespaces/{namespace}/rollouts"
    ))
    .header("content-type", "application/json")
    .body(body)
    .expect("request builds");
    world.admin.request_text(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_deeply_nested_specs_are_refused_by_the_api_server_and_do_not_stop_the_controller()
{
    let mut world = World::start().await;
    let bystander = Bystander::start(&world).await;
    create_namespace(&world, "tenant").await;
    let before = world.controller_object_writes().len();

    // Over the 3 MiB request limit: refused before it is read.
    let mut huge = canary_in("tenant", "huge", "huge:1");
    huge["metadata"]["annotations"] = json!({"blob": "x".repeat(3 * 1024 * 1024 + 1)});
    let (code, message) = refusal(
        post_raw(
            &world,
            "tenant",
            serde_json::to_vec(&huge).unwrap_or_default(),
        )
        .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (413, "Request entity too large: limit is 3145728")
    );

    // Under the request limit but over what etcd stores (1.5 MiB).
    let mut big = canary_in("tenant", "big", "big:1");
    big["metadata"]["annotations"] = json!({"blob": "x".repeat(2 * 1024 * 1024)});
    let (code, message) = refusal(
        post_raw(
            &world,
            "tenant",
            serde_json::to_vec(&big).unwrap_or_default(),
        )
        .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (500, "etcdserver: request is too large")
    );

    // 10,000 levels of nesting in a field whose unknown content is kept: a parse error, not a crash.
    let depth = 10_000;
    let manifest =
        serde_json::to_string(&canary_in("tenant", "deep", "deep:1")).unwrap_or_default();
    let nested = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let body = manifest.replacen(
        "\"containers\":",
        &format!("\"deep\":{nested},\"containers\":"),
        1,
    );
    let (code, message) = refusal(post_raw(&world, "tenant", body.into_bytes()).await);
    assert_eq!(code, 400, "{message}");
    assert!(
        message.contains("json parse error") && message.contains("recursion limit exceeded"),
        "{message}"
    );

    // Just under the parser's limit the sim stores it; the controller must read it, or at least not stall.
    let depth = 100;
    let nested = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let body = manifest.replacen(
        "\"containers\":",
        &format!("\"deep\":{nested},\"containers\":"),
        1,
    );
    post_raw(&world, "tenant", body.into_bytes())
        .await
        .expect("100 levels are stored");

    // A value of the wrong type where the schema keeps unknown fields (the pod spec): stored by the API
    // server, undecodable as a pod template.
    let mut wrong = canary_in("tenant", "wrong", "wrong:1");
    wrong["spec"]["template"]["spec"]["containers"] = json!(5);
    create_in(&world, "tenant", wrong)
        .await
        .expect("stored: the pod spec keeps unknown fields");

    // A controller that starts (a restart, a new leader) lists them all at once.
    world.kill_controllers();
    world.start_controller().await;
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let status = eventually_raw_status(&world, "tenant", "wrong", "wrong: InvalidSpec", |status| {
        raw_condition(status, "InvalidSpec").is_some_and(|(status, _, _)| status == "True")
    })
    .await;
    let (_, reason, message) = raw_condition(&status, "InvalidSpec").unwrap_or_default();
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains("spec.template.spec.containers"),
        "{message}"
    );
    let writes: Vec<_> = controller_writes_in(&world, "tenant")
        .into_iter()
        .filter(|r| r.name.as_deref() != Some("wrong") && r.name.as_deref() != Some("deep"))
        .collect();
    assert!(
        writes.is_empty(),
        "the controller wrote for a refused Rollout: {writes:#?}"
    );
    assert!(
        world.controller_object_writes().len() > before,
        "the controller kept working"
    );
    world.stop().await;
}
