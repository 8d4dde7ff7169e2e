//! Bad input from tenants, on the real controller against the simulated cluster: huge and deeply nested
//! specs, numbers at the type limits, templates of other namespaces, objects squatting the names Serin gives
//! its own, a Service named by two Rollouts and Rollouts selecting the same pods. Each case checks the exact
//! admission error or condition, that no object of the other tenant changed (resourceVersions and the
//! controller's writes in the request log), and that a well-formed Rollout in another namespace still rolls
//! out meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin::crd::{Rollout, RolloutPhase};
use serin_sim::RequestRecord;
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

    // Deeper than the sim can serve back inside a list (it parses like its clients, to 128 levels): 400,
    // and nothing stored.
    let nested = format!("{}1{}", "{\"a\":".repeat(120), "}".repeat(120));
    let body = manifest.replacen(
        "\"containers\":",
        &format!("\"deep\":{nested},\"containers\":"),
        1,
    );
    let (code, message) = refusal(post_raw(&world, "tenant", body.into_bytes()).await);
    assert_eq!(
        (code, message.as_str()),
        (
            400,
            "the object is nested 129 levels deep; at most 100 are accepted"
        )
    );

    // The deepest nesting the API server stores: the controller reads it inside lists and watch events,
    // which add levels of their own.
    let mut stored = None;
    for depth in (90..128).rev() {
        let nested = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        let body = manifest.replacen(
            "\"containers\":",
            &format!("\"deep\":{nested},\"containers\":"),
            1,
        );
        match post_raw(&world, "tenant", body.into_bytes()).await {
            Ok(()) => {
                stored = Some(depth);
                break;
            }
            Err(error) => assert!(
                matches!(&error, kube::Error::Api(e) if e.code == 400),
                "{depth} levels: {error}"
            ),
        }
    }
    assert_eq!(
        stored,
        Some(91),
        "the deepest pod-spec field stored (managedFields add levels)"
    );

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

/// A named edit of a manifest and the text its error must contain.
type Case = (&'static str, Box<dyn FnOnce(&mut Value)>, &'static str);

/// A canary Rollout in `namespace` whose spec is `spec` merged over [`canary_in`]'s.
fn canary_with(namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut manifest = canary_in(namespace, name, &format!("{name}:1"));
    edit(&mut manifest);
    manifest
}

/// Creates the Rollout and expects the API server to refuse it with 422 and `field` in the message; the
/// Rollout is not stored.
async fn expect_refused(world: &World, namespace: &str, manifest: Value, field: &str) {
    let name = manifest["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (code, message) = refusal(create_in(world, namespace, manifest).await);
    assert_eq!(code, 422, "{name}: {message}");
    assert!(
        message.contains(field),
        "{name}: the refusal names {field}: {message}"
    );
    let stored = Api::<DynamicObject>::namespaced_with(
        world.admin.clone(),
        namespace,
        &ApiResource::erase::<Rollout>(&()),
    )
    .get_opt(&name)
    .await
    .expect("get");
    assert!(stored.is_none(), "{name}: a refused Rollout was stored");
}

/// Waits for InvalidSpec on a Rollout that decodes; returns its message.
async fn expect_invalid(world: &World, namespace: &str, name: &str) -> String {
    let rollout = eventually_rollout(
        world,
        namespace,
        name,
        "InvalidSpec",
        |_| {},
        |r| condition(r, "InvalidSpec").is_some_and(|(status, _, _)| status == "True"),
    )
    .await;
    let (_, reason, message) = condition(&rollout, "InvalidSpec").unwrap_or_default();
    assert_eq!(reason, "InvalidSpec");
    assert_eq!(
        rollout.status.as_ref().and_then(|s| s.phase),
        Some(RolloutPhase::Degraded)
    );
    message
}

/// Waits (bounded) for an event with `reason` about the Rollout `name` of `namespace`; returns its note.
async fn expect_event_in(world: &World, namespace: &str, name: &str, reason: &str) -> String {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(world.admin.clone(), namespace);
    let deadline = Instant::now() + TIMEOUT;
    for _ in 0..5_000 {
        let found = events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .find(|event| {
                event.reason.as_deref() == Some(reason)
                    && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            });
        if let Some(event) = found {
            return event.note.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event about {name} within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {reason} event about {name}");
}

/// ReplicaSets controlled by the Rollout `name` of `namespace`.
async fn owned_replica_sets(world: &World, namespace: &str, name: &str) -> Vec<ReplicaSet> {
    let uid = rollouts_in(&world.admin, namespace)
        .get(name)
        .await
        .expect("rollout")
        .uid()
        .unwrap_or_default();
    Api::<ReplicaSet>::namespaced(world.admin.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("list replicasets")
        .items
        .into_iter()
        .filter(|rs| serin::controller::observe::is_controlled_by(rs, &uid))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_type_limits_are_refused_at_admission_with_the_field_path() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let ns = "tenant";
    create_namespace(&world, ns).await;
    service(&world, ns, "limits", "limits").await;
    service(&world, ns, "limits-canary", "limits").await;

    let steps =
        |steps: Value| move |m: &mut Value| m["spec"]["strategy"]["canary"]["steps"] = steps;
    let pause = |duration: Value| steps(json!([{"pause": {"duration": duration}}]));
    let canary_field = |field: &'static str, value: Value| {
        move |m: &mut Value| m["spec"]["strategy"]["canary"][field] = value
    };
    let many: Vec<Value> = (0..100_000).map(|_| json!({"pause": {}})).collect();
    let cases: Vec<Case> = vec![
        (
            "steps-100000",
            Box::new(steps(Value::Array(many))),
            "spec.strategy.canary.steps",
        ),
        (
            "weight-minus-one",
            Box::new(steps(json!([{"setWeight": -1}]))),
            "spec.strategy.canary.steps[0].setWeight",
        ),
        (
            "weight-101",
            Box::new(steps(json!([{"setWeight": 101}]))),
            "spec.strategy.canary.steps[0].setWeight",
        ),
        (
            "weight-max",
            Box::new(steps(json!([{"setWeight": i32::MAX}]))),
            "spec.strategy.canary.steps[0].setWeight",
        ),
        (
            "weight-past-int32",
            Box::new(steps(json!([{"setWeight": 1u64 << 31}]))),
            "spec.strategy.canary.steps[0].setWeight",
        ),
        (
            "pause-exponent",
            Box::new(pause(json!("1e400s"))),
            "spec.strategy.canary.steps[0].pause.duration",
        ),
        (
            "pause-negative",
            Box::new(pause(json!(-5))),
            "spec.strategy.canary.steps[0].pause.duration",
        ),
        (
            "pause-negative-text",
            Box::new(pause(json!("-5s"))),
            "spec.strategy.canary.steps[0].pause.duration",
        ),
        (
            "pause-huge-seconds",
            Box::new(pause(json!(1u64 << 40))),
            "spec.strategy.canary.steps[0].pause.duration",
        ),
        (
            "replicas-max",
            Box::new(|m: &mut Value| m["spec"]["replicas"] = json!(i32::MAX)),
            "spec.replicas",
        ),
        (
            "deadline-past-int32",
            Box::new(|m: &mut Value| m["spec"]["progressDeadlineSeconds"] = json!(1u64 << 31)),
            "spec.progressDeadlineSeconds",
        ),
        (
            "surge-million-percent",
            Box::new(canary_field("maxSurge", json!("1000000%"))),
            "spec.strategy.canary.maxSurge",
        ),
        (
            "surge-million-pods",
            Box::new(canary_field("maxSurge", json!(1_000_000))),
            "spec.strategy.canary.maxSurge",
        ),
        (
            "unavailable-101-percent",
            Box::new(canary_field("maxUnavailable", json!("101%"))),
            "spec.strategy.canary.maxUnavailable",
        ),
        (
            "scale-down-delay-past-int32",
            Box::new(canary_field("scaleDownDelaySeconds", json!(1u64 << 31))),
            "spec.strategy.canary.scaleDownDelaySeconds",
        ),
    ];
    for (name, edit, field) in cases {
        expect_refused(&world, ns, canary_with(ns, name, edit), field).await;
    }

    // Admitted (the string form of a duration has no maximum in a schema) and refused by the controller.
    service(&world, ns, "pause-eons", "pause-eons").await;
    service(&world, ns, "pause-eons-canary", "pause-eons").await;
    create_in(
        &world,
        ns,
        canary_with(ns, "pause-eons", pause(json!("999999999h"))),
    )
    .await
    .expect("admitted");
    let message = expect_invalid(&world, ns, "pause-eons").await;
    assert_eq!(
        message,
        r#"spec.strategy.canary.steps[0].pause.duration: duration "999999999h" is longer than 2147483647 seconds (68 years)"#
    );
    assert!(
        owned_replica_sets(&world, ns, "pause-eons")
            .await
            .is_empty(),
        "nothing created for an invalid spec"
    );

    // At the limits of int32 and still meaningful: accepted and rolled out without overflow.
    create_in(
        &world,
        ns,
        canary_with(ns, "limits", |m| {
            m["spec"]["progressDeadlineSeconds"] = json!(i32::MAX);
            m["spec"]["minReadySeconds"] = json!(0);
            m["spec"]["strategy"]["canary"]["scaleDownDelaySeconds"] = json!(i32::MAX);
            m["spec"]["strategy"]["canary"]["abortScaleDownDelaySeconds"] = json!(i32::MAX);
            m["spec"]["strategy"]["canary"]["steps"] =
                json!([{"setWeight": 100}, {"pause": {"duration": 2147483647}}]);
        }),
    )
    .await
    .expect("admitted");
    eventually_rollout(
        &world,
        ns,
        "limits",
        "limits Healthy",
        |_| {},
        |r| r.status.as_ref().and_then(|s| s.phase) == Some(RolloutPhase::Healthy),
    )
    .await;

    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    world.stop().await;
}

/// Strips the bounds added to the Rollout CRD from a served CRD, as an older Serin installed it.
fn strip_bounds(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.remove("maxItems");
            map.remove("maximum");
            if map.get("pattern").and_then(Value::as_str)
                == Some(serin::crd::rollout::PODS_OR_PERCENT_PATTERN)
            {
                map.remove("pattern");
            }
            map.values_mut().for_each(strip_bounds);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_bounds),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_an_older_crd_without_the_bounds_the_controller_still_refuses_them_naming_the_field()
{
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(world.admin.clone());
    let mut crd = serde_json::to_value(crds.get("rollouts.serin.dev").await.expect("crd"))
        .unwrap_or_default();
    strip_bounds(&mut crd["spec"]);
    let crd = serde_json::from_value(crd).expect("crd decodes");
    crds.replace("rollouts.serin.dev", &PostParams::default(), &crd)
        .await
        .expect("older CRD applied");
    let ns = "tenant";
    create_namespace(&world, ns).await;

    let many: Vec<Value> = (0..101).map(|_| json!({"pause": {}})).collect();
    let cases: Vec<Case> = vec![
        (
            "steps",
            Box::new(move |m: &mut Value| {
                m["spec"]["strategy"]["canary"]["steps"] = Value::Array(many)
            }),
            "spec.strategy.canary.steps: 101 steps; at most 100 are allowed",
        ),
        (
            "replicas",
            Box::new(|m: &mut Value| m["spec"]["replicas"] = json!(i32::MAX)),
            "spec.replicas: 2147483647 is not between 0 and 100000",
        ),
        (
            "surge",
            Box::new(|m: &mut Value| {
                m["spec"]["strategy"]["canary"]["maxSurge"] = json!("1000000%")
            }),
            r#"spec.strategy.canary.maxSurge: "1000000%" is more than 100%"#,
        ),
        (
            "pause",
            Box::new(|m: &mut Value| {
                m["spec"]["strategy"]["canary"]["steps"] =
                    json!([{"pause": {"duration": 99_999_999_999i64}}])
            }),
            r#"spec.strategy.canary.steps[0].pause.duration: duration "99999999999" is longer than 2147483647 seconds (68 years)"#,
        ),
    ];
    for (name, edit, expected) in cases {
        service(&world, ns, name, name).await;
        service(&world, ns, &format!("{name}-canary"), name).await;
        let manifest = canary_with(ns, name, edit);
        create_in(&world, ns, manifest)
            .await
            .expect("the older CRD admits it");
        let message = expect_invalid(&world, ns, name).await;
        assert_eq!(message, expected, "{name}");
        assert!(
            owned_replica_sets(&world, ns, name).await.is_empty(),
            "{name}: nothing created"
        );
    }
    let writes: Vec<_> = controller_writes_in(&world, ns)
        .into_iter()
        .filter(|r| r.resource != "rollouts" || r.subresource.as_deref() != Some("status"))
        .collect();
    assert!(
        writes.is_empty(),
        "only status writes for invalid specs: {writes:#?}"
    );
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_of_another_namespace_is_neither_read_nor_run() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    for ns in ["tenant-a", "tenant-b"] {
        create_namespace(&world, ns).await;
    }
    create_in(
        &world,
        "tenant-b",
        json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
            "metadata": {"name": "b-only", "namespace": "tenant-b"},
            "spec": {"metrics": [{"name": "up", "provider": {"prometheus": {"address": "http://127.0.0.1:9", "query": "vector(1)"}},
                                  "successCondition": "result[0] == 1"}]}
        }),
    )
    .await
    .expect("tenant-b's template");
    let b_before = versions(&world, "tenant-b").await;
    service(&world, "tenant-a", "web", "web").await;
    service(&world, "tenant-a", "web-canary", "web").await;
    // The template reference has no namespace; one written anyway is pruned by the API server.
    let manifest = canary_with("tenant-a", "web", |m| {
        m["spec"]["strategy"]["canary"]["steps"] = json!([
            {"setWeight": 50},
            {"analysis": {"templates": [{"templateName": "b-only", "namespace": "tenant-b"}]}}
        ]);
    });
    create_in(&world, "tenant-a", manifest)
        .await
        .expect("admitted");
    let stored = rollouts_in(&world.admin, "tenant-a")
        .get("web")
        .await
        .expect("stored");
    let stored_steps = serde_json::to_value(&stored.spec.strategy.canary).unwrap_or_default();
    assert_eq!(
        stored_steps["steps"][1]["analysis"]["templates"][0],
        json!({"templateName": "b-only"}),
        "the unknown namespace field is pruned"
    );
    // The Rollout may reach the controller before its Services do (separate watches): then the first
    // InvalidSpec also names them, and the next reconcile drops them.
    let expected = r#"spec.strategy.canary.steps[1].analysis.templates[0]: AnalysisTemplate "b-only" cannot be used: AnalysisTemplate b-only not found in namespace tenant-a"#;
    let rollout = eventually_rollout(
        &world,
        "tenant-a",
        "web",
        "InvalidSpec naming only the template",
        |_| {},
        |r| {
            condition(r, "InvalidSpec")
                .is_some_and(|(status, _, message)| status == "True" && message == expected)
        },
    )
    .await;
    assert_eq!(
        rollout.status.as_ref().and_then(|s| s.phase),
        Some(RolloutPhase::Degraded)
    );
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let reads_of_b: Vec<_> = world
        .sim
        .request_log()
        .filter(|r| r.user == CONTROLLER_USER && r.namespace.as_deref() == Some("tenant-b"));
    assert!(
        reads_of_b.is_empty(),
        "the controller sent requests to tenant-b: {reads_of_b:#?}"
    );
    assert_eq!(
        versions(&world, "tenant-b").await,
        b_before,
        "tenant-b's objects changed"
    );
    let runs: Vec<_> = controller_writes_in(&world, "tenant-a")
        .into_iter()
        .filter(|r| r.resource == "analysisruns" || r.resource == "replicasets")
        .collect();
    assert!(
        runs.is_empty(),
        "nothing is created for an invalid spec: {runs:#?}"
    );
    world.stop().await;
}

/// The manifest's pod-template hash, as Serin computes it.
fn hash_of(manifest: &Value) -> String {
    let rollout: Rollout = serde_json::from_value(manifest.clone()).expect("decodes");
    serin::strategy::pod_template_hash(&rollout.spec.template)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_squatting_the_name_serin_would_give_its_own_is_left_alone() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let ns = "tenant";
    create_namespace(&world, ns).await;
    service(&world, ns, "web", "web").await;
    service(&world, ns, "web-canary", "web").await;
    let manifest = canary_in(ns, "web", "web:1");
    let hash = hash_of(&manifest);
    let squatter = format!("web-{hash}");
    // Carries Serin's labels, even the right hash: only the controller reference says whose it is.
    create_in(
        &world,
        ns,
        json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": squatter, "namespace": ns,
                         "labels": {"app": "other", "serin.dev/rollout": "web", "serin.dev/pod-template-hash": hash}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "other"}},
                     "template": {"metadata": {"labels": {"app": "other"}},
                                  "spec": {"containers": [{"name": "app", "image": "other:1"}]}}}
        }),
    )
    .await
    .expect("tenant's ReplicaSet");
    // The workload simulator brings its pod up first; after that nobody but the controller could touch it.
    let squatters: Api<ReplicaSet> = Api::namespaced(world.admin.clone(), ns);
    let deadline = Instant::now() + TIMEOUT;
    for _ in 0..5_000 {
        let ready = squatters
            .get(&squatter)
            .await
            .expect("squatter")
            .status
            .and_then(|s| s.ready_replicas);
        if ready == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the squatter's pod never became ready"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let before = versions(&world, ns).await;
    create_in(&world, ns, manifest).await.expect("admitted");
    let message = expect_invalid(&world, ns, "web").await;
    assert_eq!(
        message,
        format!(
            "spec.template: ReplicaSet \"{squatter}\" already exists and is not controlled by this Rollout; Serin \
             neither adopts, scales nor deletes it (rename or delete it, or change the template)"
        )
    );
    expect_event_in(&world, ns, "web", "InvalidSpec").await;
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let mut after = versions(&world, ns).await;
    after.remove("Rollout/web");
    assert_eq!(
        after, before,
        "the squatter, its pods or the Services changed"
    );
    let writes: Vec<_> = controller_writes_in(&world, ns)
        .into_iter()
        .filter(|r| r.resource != "rollouts")
        .collect();
    assert!(writes.is_empty(), "the controller wrote: {writes:#?}");

    // The create itself, should a plan ever ask for it, does not take the squatter for Serin's.
    let rollout = rollouts_in(&world.admin, ns)
        .get("web")
        .await
        .expect("rollout");
    let create = serin::strategy::Action::CreateReplicaSet {
        name: squatter.clone(),
        pod_template_hash: hash.clone(),
        revision: 1,
        replicas: 2,
        template: Box::new(rollout.spec.template.clone().into()),
    };
    let refused = serin::controller::act(&world.admin, &rollout, &[create]).await;
    assert!(
        matches!(&refused, Err(serin::controller::ActError::ReplicaSetNotOwned { name }) if *name == squatter),
        "{refused:?}"
    );
    let run_name = "web-run";
    create_in(
        &world,
        ns,
        json!({"apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisRun",
               "metadata": {"name": run_name, "namespace": ns},
               "spec": {"metrics": [{"name": "up", "provider": {"prometheus": {"address": "http://127.0.0.1:9", "query": "vector(1)"}}}]}}),
    )
    .await
    .expect("tenant's AnalysisRun");
    let run = serin::strategy::Action::CreateAnalysisRun {
        name: run_name.into(),
        purpose: serin::strategy::AnalysisPurpose::Step(1),
        pod_template_hash: hash.clone(),
        spec: Default::default(),
    };
    let refused = serin::controller::act(&world.admin, &rollout, &[run]).await;
    assert!(
        matches!(&refused, Err(serin::controller::ActError::AnalysisRunNotOwned { name }) if name == run_name),
        "{refused:?}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_ingress_serin_does_not_own_is_not_overwritten_or_deleted() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let ns = "tenant";
    create_namespace(&world, ns).await;
    service(&world, ns, "web", "web").await;
    service(&world, ns, "web-canary", "web").await;
    let ingress = |name: &str, owners: Value| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": ns, "ownerReferences": owners},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": "shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}
        })
    };
    create_in(&world, ns, ingress("web", json!([])))
        .await
        .expect("stable Ingress");
    // Names the Rollout as its owner, which anyone can write; the uid is not the Rollout's.
    let forged = json!([{"apiVersion": "serin.dev/v1alpha1", "kind": "Rollout", "name": "web",
                         "uid": "00000000-0000-0000-0000-000000000000", "controller": true}]);
    create_in(&world, ns, ingress("web-web-canary", forged))
        .await
        .expect("tenant's canary-named Ingress");
    let before = versions(&world, ns).await;
    let manifest = canary_with(ns, "web", |m| {
        m["spec"]["strategy"]["canary"]["trafficRouting"] =
            json!({"nginx": {"stableIngress": "web"}});
    });
    create_in(&world, ns, manifest).await.expect("admitted");
    let degraded = eventually_rollout(
        &world,
        ns,
        "web",
        "RouteMissing",
        |_| {},
        |r| condition(r, "Progressing").is_some_and(|(_, reason, _)| reason == "RouteMissing"),
    )
    .await;
    let (_, _, message) = condition(&degraded, "Progressing").unwrap_or_default();
    assert!(
        message.contains("metadata.ownerReferences")
            && message.contains(
                "exists and is not owned by Rollout tenant/web; Serin does not overwrite it"
            ),
        "{message}"
    );
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let after = versions(&world, ns).await;
    for name in ["Ingress/web", "Ingress/web-web-canary"] {
        assert_eq!(after.get(name), before.get(name), "{name} changed");
    }
    let writes: Vec<_> = controller_writes_in(&world, ns)
        .into_iter()
        .filter(|r| r.resource == "ingresses")
        .collect();
    assert!(
        writes.is_empty(),
        "the controller wrote Ingresses: {writes:#?}"
    );
    world.stop().await;
}

/// Services `a` (shared by both Rollouts as stable), `a-canary`, `b-canary`; Rollout `a` Healthy.
async fn first_rollout_healthy(world: &World, ns: &str, a: Value) -> Rollout {
    create_namespace(world, ns).await;
    service(world, ns, "a", "a").await;
    service(world, ns, "a-canary", "a").await;
    service(world, ns, "b-canary", "b").await;
    create_in(world, ns, a).await.expect("a admitted");
    let a = eventually_rollout(
        world,
        ns,
        "a",
        "a Healthy",
        |_| {},
        |r| {
            r.status.as_ref().is_some_and(|s| {
                s.phase == Some(RolloutPhase::Healthy)
                    && s.observed_generation == r.metadata.generation
            })
        },
    )
    .await;
    world
        .wait_for_quiet_controller(Duration::from_millis(500), TIMEOUT)
        .await;
    a
}

/// Holds for `period` (bounded by count too), asserting at every poll that Service `a` selects Rollout `a`'s
/// stable pods.
async fn hold_selector(world: &World, ns: &str, hash: &str, period: Duration) {
    let services: Api<Service> = Api::namespaced(world.admin.clone(), ns);
    let end = Instant::now() + period;
    for _ in 0..2_000 {
        if Instant::now() >= end {
            return;
        }
        let selector = services
            .get("a")
            .await
            .expect("service a")
            .spec
            .and_then(|s| s.selector)
            .unwrap_or_default();
        assert_eq!(
            selector
                .get("serin.dev/pod-template-hash")
                .map(String::as_str),
            Some(hash),
            "Service a was taken from Rollout a: {selector:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_named_by_two_rollouts_stays_with_the_first_and_the_second_is_told_why() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let ns = "tenant";
    let rollout = |name: &str| {
        canary_with(ns, name, |m| {
            m["spec"]["strategy"]["canary"]["stableService"] = json!("a");
            m["spec"]["strategy"]["canary"]["canaryService"] = json!(format!("{name}-canary"));
        })
    };
    let a = first_rollout_healthy(&world, ns, rollout("a")).await;
    let a_hash = a
        .status
        .as_ref()
        .and_then(|s| s.stable_revision.clone())
        .map(|r| r.pod_template_hash)
        .unwrap_or_default();
    let before = versions(&world, ns).await;
    let since = world.controller_object_writes().len();

    create_in(&world, ns, rollout("b"))
        .await
        .expect("b admitted");
    let message = expect_invalid(&world, ns, "b").await;
    assert_eq!(
        message,
        "spec.strategy.canary.stableService: Service \"a\" is already managed by Rollout \"a\", created earlier; \
         two Rollouts pinning one Service's selector would take its traffic from each other"
    );
    // A selector flipping between the two hashes is what this guards against: watched at every poll.
    hold_selector(&world, ns, &a_hash, Duration::from_secs(3)).await;
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let mut after = versions(&world, ns).await;
    after.remove("Rollout/b");
    assert_eq!(after, before, "Rollout a's objects changed");
    let writes: Vec<_> = world.controller_object_writes()[since..]
        .iter()
        .filter(|r| r.namespace.as_deref() == Some(ns) && r.resource != "rollouts")
        .cloned()
        .collect();
    assert!(writes.is_empty(), "the controller wrote: {writes:#?}");
    assert!(owned_replica_sets(&world, ns, "b").await.is_empty());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rollouts_selecting_the_same_pods_leave_the_first_alone() {
    let world = World::start().await;
    let bystander = Bystander::start(&world).await;
    let ns = "tenant";
    // Both select app=a; their templates differ by one label.
    let rollout = |name: &str| {
        canary_with(ns, name, |m| {
            m["spec"]["selector"] = json!({"matchLabels": {"app": "a"}});
            m["spec"]["template"]["metadata"]["labels"] = json!({"app": "a", "team": name});
            m["spec"]["strategy"]["canary"]["stableService"] =
                json!(if name == "a" { "a" } else { "b-stable" });
            m["spec"]["strategy"]["canary"]["canaryService"] = json!(format!("{name}-canary"));
        })
    };
    let a = first_rollout_healthy(&world, ns, rollout("a")).await;
    let a_hash = a
        .status
        .as_ref()
        .and_then(|s| s.stable_revision.clone())
        .map(|r| r.pod_template_hash)
        .unwrap_or_default();
    service(&world, ns, "b-stable", "a").await;
    let before = versions(&world, ns).await;
    let since = world.controller_object_writes().len();

    create_in(&world, ns, rollout("b"))
        .await
        .expect("b admitted");
    let message = expect_invalid(&world, ns, "b").await;
    assert_eq!(
        message,
        "spec.selector: selects the pods of Rollout \"a\", created earlier, or its selector selects these pods; \
         each Rollout must select only its own pods"
    );
    hold_selector(&world, ns, &a_hash, Duration::from_secs(2)).await;
    bystander.roll(&world).await;
    bystander.expect_rolled_out(&world).await;
    let mut after = versions(&world, ns).await;
    after.remove("Rollout/b");
    assert_eq!(after, before, "Rollout a's objects changed");
    let writes: Vec<_> = world.controller_object_writes()[since..]
        .iter()
        .filter(|r| r.namespace.as_deref() == Some(ns) && r.resource != "rollouts")
        .cloned()
        .collect();
    assert!(writes.is_empty(), "the controller wrote: {writes:#?}");
    let a_sets = owned_replica_sets(&world, ns, "a").await;
    assert_eq!(a_sets.len(), 1);
    assert_eq!(a_sets[0].spec.replicas, Some(2));
    assert!(owned_replica_sets(&world, ns, "b").await.is_empty());
    world.stop().await;
}
