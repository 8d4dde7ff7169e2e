//! The sim's injected faults, in-process and through the admin endpoint: request rules by verb,
//! resource, subresource, name, namespace and user with real Status bodies; held, dropped, closed and
//! expired watches as kube-rs reflectors see them; pods forced unready; the workload simulator stopped
//! and started.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin_sim::load::TrafficConfig;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{ControlError, FaultRule, SimCluster, SimConfig, WatchScope, SIMULATOR_USER};

const NS: &str = "default";
/// Upper bound for anything the sim does by itself (a reconcile, a watch event, a relist).
const SETTLE: Duration = Duration::from_secs(15);
/// Poll interval of invariant checks and bounded waits.
const POLL: Duration = Duration::from_millis(50);

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn with_timeout(test: impl Future<Output = TestResult>) -> TestResult {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .map_err(|_| "test timed out")?
}

/// Polls `check` every POLL until it yields Some, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let most = (limit.as_millis() / POLL.as_millis()) as usize + 1;
    for _ in 0..most {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    Err(format!("timed out after {limit:?} waiting for {what}"))
}

fn config_map(name: &str, data: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name}, "data": {"value": data},
    }))
    .unwrap()
}

fn replicaset(name: &str, replicas: i32, hash: &str) -> ReplicaSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web", "pod-template-hash": hash}},
            "template": {
                "metadata": {"labels": {"app": "web", "pod-template-hash": hash},
                             "annotations": {"sim.serin.dev/ready-after": "0s"}},
                "spec": {"containers": [{"name": "app", "image": format!("web:{hash}")}]}
            }
        }
    }))
    .unwrap()
}

fn api_code(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A plain HTTP call as `token`; returns status, Retry-After header and JSON body.
async fn http(
    url: &str,
    method: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
        .header("authorization", format!("Bearer {token}"));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = response.bytes().await.unwrap();
    (
        code,
        retry_after,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A reflector over `api`, driven in the background; returns once its first list is in.
async fn reflect<K>(api: Api<K>) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).applied_objects();
    let driver = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(SETTLE, store.wait_until_ready())
        .await
        .expect("reflector synced in time")
        .expect("reflector alive");
    (store, driver)
}

#[tokio::test]
async fn rules_match_verb_resource_subresource_name_namespace_and_user() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let admin = sim.client().await?;
        let alice = sim.client_as("alice").await?;
        let bob = sim.client_as("bob").await?;
        let other: Namespace = serde_json::from_value(json!({"metadata": {"name": "other"}}))?;
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &other)
            .await?;
        for (namespace, name) in [(NS, "a"), (NS, "b"), ("other", "a")] {
            Api::<ConfigMap>::namespaced(admin.clone(), namespace)
                .create(&PostParams::default(), &config_map(name, "1"))
                .await?;
        }
        sim.faults().add_rule(
            FaultRule::fail("get", "configmaps", 500)
                .name("a")
                .namespace(NS)
                .user("alice")
                .times(2),
        )?;
        let alice_default = Api::<ConfigMap>::namespaced(alice.clone(), NS);
        alice_default.get("b").await?;
        Api::<ConfigMap>::namespaced(bob.clone(), NS)
            .get("a")
            .await?;
        Api::<ConfigMap>::namespaced(alice.clone(), "other")
            .get("a")
            .await?;
        alice_default.list(&ListParams::default()).await?;
        assert_eq!(
            sim.faults().pending_rules()[0].remaining,
            2,
            "nothing else matched"
        );
        for _ in 0..2 {
            let (code, reason) = api_code(alice_default.get("a").await.unwrap_err());
            assert_eq!((code, reason.as_str()), (500, "InternalError"));
        }
        alice_default.get("a").await?;
        assert!(
            sim.faults().pending_rules().is_empty(),
            "the rule is used up"
        );
        let failed: Vec<(String, u16)> = sim
            .request_log()
            .filter(|r| r.status == 500)
            .into_iter()
            .map(|r| (r.user, r.status))
            .collect();
        assert_eq!(failed, vec![("alice".to_string(), 500); 2]);

        // A list (or watch) names its object through a metadata.name field selector.
        sim.faults()
            .add_rule(FaultRule::fail("list", "configmaps", 500).name("b"))?;
        Api::<ConfigMap>::namespaced(bob.clone(), NS)
            .list(&ListParams::default())
            .await?;
        let pinned = ListParams::default().fields("metadata.name=b");
        let (code, _) = api_code(
            Api::<ConfigMap>::namespaced(bob.clone(), NS)
                .list(&pinned)
                .await
                .unwrap_err(),
        );
        assert_eq!(code, 500);

        // Subresource "" is the main resource only, "status" only the status subresource.
        let replicasets = Api::<ReplicaSet>::namespaced(admin.clone(), NS);
        replicasets
            .create(&PostParams::default(), &replicaset("web-v1", 1, "v1"))
            .await?;
        let status = Patch::Merge(json!({"status": {"replicas": 1}}));
        let spec = Patch::Merge(json!({"spec": {"replicas": 2}}));
        sim.faults()
            .add_rule(FaultRule::fail("patch", "replicasets.apps", 409).subresource(""))?;
        replicasets
            .patch_status("web-v1", &PatchParams::default(), &status)
            .await?;
        let (code, reason) = api_code(
            replicasets
                .patch("web-v1", &PatchParams::default(), &spec)
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "Conflict"));
        sim.faults()
            .add_rule(FaultRule::fail("patch", "replicasets", 500).subresource("status"))?;
        replicasets
            .patch("web-v1", &PatchParams::default(), &spec)
            .await?;
        let (code, _) = api_code(
            replicasets
                .patch_status("web-v1", &PatchParams::default(), &status)
                .await
                .unwrap_err(),
        );
        assert_eq!(code, 500);
        assert_eq!(
            replicasets.get("web-v1").await?.spec.replicas,
            Some(2),
            "only the unfaulted patch landed"
        );

        // Refused rules say which field is wrong and change nothing.
        let refused = sim
            .faults()
            .add_rule(FaultRule::fail("fetch", "configmaps", 500));
        assert!(refused.unwrap_err().to_string().starts_with("verb:"));
        assert!(sim.faults().pending_rules().is_empty());
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn injected_errors_carry_the_status_bodies_of_a_real_server() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let api = Api::<ConfigMap>::namespaced(client.clone(), NS);
        api.create(&PostParams::default(), &config_map("a", "1"))
            .await?;
        let url = format!("{}/api/v1/namespaces/{NS}/configmaps/a", sim.base_url());
        let patch = json!({"data": {"value": "2"}});
        let merge = |method: &'static str| {
            let url = url.clone();
            let patch = patch.clone();
            async move {
                let client = reqwest::Client::new();
                let response = client
                    .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), &url)
                    .header("authorization", "Bearer admin")
                    .header("content-type", "application/merge-patch+json")
                    .body(patch.to_string())
                    .send()
                    .await
                    .unwrap();
                let code = response.status().as_u16();
                let retry = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body: Value =
                    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
                (code, retry, body)
            }
        };

        sim.faults().fail_next("patch", "configmaps", 1, 409);
        let (code, _, body) = merge("PATCH").await;
        assert_eq!(code, 409);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["status"], "Failure");
        assert_eq!(body["reason"], "Conflict");
        assert_eq!(
            body["message"],
            "Operation cannot be fulfilled on configmaps \"a\": the object has been modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(body["details"]["name"], "a");
        assert_eq!(body["details"]["kind"], "configmaps");

        sim.faults().fail_next("patch", "configmaps", 1, 429);
        let (code, retry_after, body) = merge("PATCH").await;
        assert_eq!((code, retry_after.as_deref()), (429, Some("1")));
        assert_eq!(body["reason"], "TooManyRequests");
        assert_eq!(body["details"]["retryAfterSeconds"], 1);

        sim.faults().fail_next("patch", "configmaps", 1, 500);
        let (code, _, body) = merge("PATCH").await;
        assert_eq!(code, 500);
        assert_eq!(body["reason"], "InternalError");
        assert_eq!(body["message"], "Internal error occurred: injected fault");

        let hold = Duration::from_millis(300);
        sim.faults().timeout_next("patch", "configmaps", 1, hold);
        let started = Instant::now();
        let (code, _, body) = merge("PATCH").await;
        assert!(started.elapsed() >= hold, "the request was held");
        assert_eq!((code, body["reason"].as_str()), (504, Some("Timeout")));
        assert_eq!(
            api.get("a").await?.data.unwrap_or_default()["value"],
            "1",
            "a timed-out request was not executed"
        );

        sim.faults()
            .inject(FaultRule::timeout_after_apply("patch", "configmaps", hold));
        let (code, _, _) = merge("PATCH").await;
        assert_eq!(code, 504);
        assert_eq!(
            api.get("a").await?.data.unwrap_or_default()["value"],
            "2",
            "timeout-after-apply executed the write"
        );

        sim.faults().fail_next("create", "configmaps", 1, 409);
        let (code, reason) = api_code(
            api.create(&PostParams::default(), &config_map("b", "1"))
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
        assert_eq!(
            api.get_opt("b").await?.map(|c| c.name_any()),
            None,
            "the create did not happen"
        );
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn held_replicaset_events_reach_a_reflector_only_after_the_hold_and_in_order() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let api = Api::<ReplicaSet>::namespaced(client.clone(), NS);
        api.create(&PostParams::default(), &replicaset("web-old", 1, "old"))
            .await?;
        let (store, driver) = reflect(api.clone()).await;
        let version = api
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut raw = api.watch(&WatchParams::default(), &version).await?.boxed();

        let hold = Duration::from_secs(2);
        let started = Instant::now();
        sim.faults()
            .hold_watch_events(WatchScope::new("apps", "replicasets"), hold);
        api.create(&PostParams::default(), &replicaset("web-new", 1, "new"))
            .await?;
        for step in ["1", "2"] {
            api.patch(
                "web-new",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"step": step}}})),
            )
            .await?;
        }
        assert_eq!(
            api.get("web-new")
                .await?
                .labels()
                .get("step")
                .map(String::as_str),
            Some("2"),
            "reads of one object are not held"
        );
        let new = ObjectRef::new("web-new").within(NS);
        let mut polls = 0;
        while started.elapsed() + POLL < hold && polls < 200 {
            assert!(
                store.get(&new).is_none(),
                "the reflector showed web-new {:?} into a {hold:?} hold",
                started.elapsed()
            );
            polls += 1;
            tokio::time::sleep(POLL).await;
        }
        assert!(
            polls >= 10,
            "the hold was checked throughout ({polls} polls)"
        );
        let shown = eventually("the reflector to show web-new", SETTLE, || {
            let shown = store.get(&new);
            async move { shown.filter(|rs| rs.labels().get("step").is_some_and(|s| s == "2")) }
        })
        .await?;
        assert!(started.elapsed() >= hold);
        assert_eq!(shown.name_any(), "web-new");

        // The raw watch got every held event, in commit order, none before the hold ended.
        let mut seen = Vec::new();
        for _ in 0..50 {
            if seen.len() == 3 {
                break;
            }
            let event = tokio::time::timeout(SETTLE, raw.try_next())
                .await?
                .map_err(|e| e.to_string())?
                .ok_or("watch ended")?;
            match event {
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Added(rs) => seen.push(("ADDED", rs)),
                WatchEvent::Modified(rs) => seen.push(("MODIFIED", rs)),
                other => panic!("unexpected {other:?}"),
            }
            assert!(
                started.elapsed() >= hold,
                "an event arrived during the hold"
            );
        }
        let kinds: Vec<&str> = seen.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, vec!["ADDED", "MODIFIED", "MODIFIED"]);
        let versions: Vec<u64> = seen
            .iter()
            .map(|(_, rs)| {
                rs.resource_version()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or(0)
            })
            .collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        driver.abort();
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn holds_are_scoped_by_namespace_and_user_and_lists_wait_for_them() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let admin = sim.client().await?;
        let controller = sim.client_as("controller").await?;
        let lagging = Api::<ConfigMap>::namespaced(controller.clone(), NS);
        let fresh = Api::<ConfigMap>::namespaced(admin.clone(), NS);
        let (lagging_store, lagging_driver) = reflect(lagging.clone()).await;
        let (fresh_store, fresh_driver) = reflect(fresh.clone()).await;

        // Another namespace's hold does not touch this one.
        sim.faults().hold_watch_events(
            WatchScope::new("", "configmaps").namespace("elsewhere"),
            Duration::from_secs(30),
        );
        fresh
            .create(&PostParams::default(), &config_map("first", "1"))
            .await?;
        let first = ObjectRef::new("first").within(NS);
        eventually("both reflectors to show first", SETTLE, || {
            let both = lagging_store.get(&first).is_some() && fresh_store.get(&first).is_some();
            async move { both.then_some(()) }
        })
        .await?;
        sim.faults().clear();

        // A hold for one user lags only that user's cache.
        let hold = Duration::from_secs(3);
        let started = Instant::now();
        sim.faults()
            .hold_watch_events(WatchScope::new("", "configmaps").user("controller"), hold);
        fresh
            .create(&PostParams::default(), &config_map("second", "1"))
            .await?;
        let second = ObjectRef::new("second").within(NS);
        eventually("the other user's reflector to show second", SETTLE, || {
            let shown = fresh_store.get(&second).is_some();
            async move { shown.then_some(()) }
        })
        .await?;
        assert!(
            started.elapsed() < hold,
            "the unheld cache saw it during the hold"
        );
        assert!(lagging_store.get(&second).is_none());
        // A list by the held user is answered only when its cache caught up.
        let listed = lagging.list(&ListParams::default()).await?;
        assert!(started.elapsed() >= hold, "the list waited for the hold");
        assert!(listed.items.iter().any(|c| c.name_any() == "second"));
        eventually("the held reflector to catch up", SETTLE, || {
            let shown = lagging_store.get(&second).is_some();
            async move { shown.then_some(()) }
        })
        .await?;
        lagging_driver.abort();
        fresh_driver.abort();
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dropped_events_are_never_delivered_then_the_watch_closes_and_clients_relist() -> TestResult
{
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let api = Api::<ConfigMap>::namespaced(client.clone(), NS);
        api.create(&PostParams::default(), &config_map("before", "1"))
            .await?;
        let (store, driver) = reflect(api.clone()).await;
        let version = api
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut raw = api.watch(&WatchParams::default(), &version).await?.boxed();
        let lists_before = sim.request_log().matching("list", "configmaps").len();

        let window = Duration::from_secs(2);
        let started = Instant::now();
        sim.faults()
            .drop_watch_events(WatchScope::new("", "configmaps"), window);
        api.create(&PostParams::default(), &config_map("lost", "1"))
            .await?;
        api.delete("before", &DeleteParams::default()).await?;
        let lost = ObjectRef::new("lost").within(NS);
        let before = ObjectRef::new("before").within(NS);
        let mut polls = 0;
        while started.elapsed() + POLL < window && polls < 100 {
            assert!(store.get(&lost).is_none(), "a dropped event was delivered");
            assert!(
                store.get(&before).is_some(),
                "a dropped delete was delivered"
            );
            polls += 1;
            tokio::time::sleep(POLL).await;
        }
        assert!(polls >= 5);

        // The raw watch delivers nothing and ends when the window does.
        let rest: Vec<_> = tokio::time::timeout(SETTLE, raw.by_ref().collect::<Vec<_>>()).await?;
        assert!(
            started.elapsed() >= window,
            "the watch ended before the window"
        );
        let leaked: Vec<_> = rest
            .iter()
            .filter(|e| !matches!(e, Ok(WatchEvent::Bookmark(_))))
            .collect();
        assert!(
            leaked.is_empty(),
            "events leaked out of the window: {leaked:?}"
        );
        // Resuming from before the window is answered 410 Gone, so clients relist.
        let mut resumed = api.watch(&WatchParams::default(), &version).await?.boxed();
        match tokio::time::timeout(SETTLE, resumed.try_next()).await?? {
            Some(WatchEvent::Error(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
            }
            other => panic!("expected 410 Gone, got {other:?}"),
        }
        // The reflector relisted and holds the truth again, the deletion included.
        eventually("the reflector to relist", SETTLE, || {
            let converged = store.get(&lost).is_some() && store.get(&before).is_none();
            async move { converged.then_some(()) }
        })
        .await?;
        assert!(sim.request_log().matching("list", "configmaps").len() > lists_before);
        driver.abort();
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_watch_that_dropped_an_event_delivers_nothing_after_it() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let other: Namespace = serde_json::from_value(json!({"metadata": {"name": "other"}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &other)
            .await?;
        let everywhere = Api::<ConfigMap>::all(client.clone());
        let version = everywhere
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut raw = everywhere
            .watch(&WatchParams::default(), &version)
            .await?
            .boxed();
        let window = Duration::from_secs(1);
        let started = Instant::now();
        sim.faults()
            .drop_watch_events(WatchScope::new("", "configmaps").namespace(NS), window);
        Api::<ConfigMap>::namespaced(client.clone(), NS)
            .create(&PostParams::default(), &config_map("lost", "1"))
            .await?;
        Api::<ConfigMap>::namespaced(client.clone(), "other")
            .create(&PostParams::default(), &config_map("after-the-break", "1"))
            .await?;
        let rest: Vec<_> = tokio::time::timeout(SETTLE, raw.by_ref().collect::<Vec<_>>()).await?;
        assert!(started.elapsed() >= window);
        let delivered: Vec<_> = rest
            .iter()
            .filter(|e| !matches!(e, Ok(WatchEvent::Bookmark(_))))
            .collect();
        assert!(
            delivered.is_empty(),
            "a later event of another namespace passed the broken watch: {delivered:?}"
        );
        // A watch of the other namespace alone was never in the scope and got its event.
        let mut other_watch = Api::<ConfigMap>::namespaced(client.clone(), "other")
            .watch(&WatchParams::default(), &version)
            .await?
            .boxed();
        match tokio::time::timeout(SETTLE, other_watch.try_next()).await?? {
            Some(WatchEvent::Added(map)) => assert_eq!(map.name_any(), "after-the-break"),
            other => panic!("expected the other namespace's event, got {other:?}"),
        }
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn closing_one_resource_leaves_other_watches_open() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
        let secrets = Api::<Secret>::namespaced(client.clone(), NS);
        let version = maps
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut map_watch = maps.watch(&WatchParams::default(), &version).await?.boxed();
        let mut secret_watch = secrets
            .watch(&WatchParams::default(), &version)
            .await?
            .boxed();
        sim.faults()
            .close_watches_of(WatchScope::new("", "configmaps"));
        let ended = tokio::time::timeout(SETTLE, map_watch.try_next()).await??;
        assert!(ended.is_none(), "the configmap watch was closed: {ended:?}");
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": "s1"}, "stringData": {"k": "v"}}))?;
        secrets.create(&PostParams::default(), &secret).await?;
        match tokio::time::timeout(SETTLE, secret_watch.try_next()).await?? {
            Some(WatchEvent::Added(s)) => assert_eq!(s.name_any(), "s1"),
            other => panic!("the secret watch should still be open, got {other:?}"),
        }
        assert_eq!(
            sim.request_log().matching("watch", "secrets").len(),
            1,
            "the secret watch was never reopened"
        );
        sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn next_watch_answers_410_and_a_reflector_relists() -> TestResult {
    with_timeout(async {
        let sim = SimCluster::start(SimConfig::api_only()).await?;
        let client = sim.client().await?;
        let api = Api::<ConfigMap>::namespaced(client.clone(), NS);
        let (store, driver) = reflect(api.clone()).await;
        let lists_before = sim.request_log().matching("list", "configmaps").len();
        let scope = WatchScope::new("", "configmaps");
        sim.faults().expire_next_watches(scope.clone(), 1);
        sim.faults().close_watches_of(scope);
        api.create(&PostParams::default(), &config_map("after", "1"))
            .await?;
        let after = ObjectRef::new("after").within(NS);
        eventually("the reflector to show after", SETTLE, || {
            let shown = store.get(&after).is_some();
            async move { shown.then_some(()) }
        })
        .await?;
        assert!(
            sim.request_log().matching("list", "configmaps").len() > lists_before,
            "the reflector relisted after 410"
        );
        assert!(sim.faults().pending_expiries().is_empty());

        // A raw watch of an expired scope gets the ERROR event, other resources are not touched.
        driver.abort();
        let secrets = Api::<Secret>::namespaced(client.clone(), NS);
        sim.faults()
            .expire_next_watches(WatchScope::new("", "secrets"), 1);
        let mut watch = api.watch(&WatchParams::default(), "1").await?.boxed();
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "s1"}}))?;
        secrets.create(&PostParams::default(), &secret).await?;
        api.create(&PostParams::default(), &config_map("late", "1"))
            .await?;
        match tokio::time::timeout(SETTLE, watch.try_next()).await?? {
            Some(WatchEvent::Added(map)) => assert_eq!(map.name_any(), "after"),
            other => panic!("the configmap watch was not expired, got {other:?}"),
        }
        let mut watch = secrets.watch(&WatchParams::default(), "1").await?.boxed();
        match tokio::time::timeout(SETTLE, watch.try_next()).await?? {
            Some(WatchEvent::Error(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
            }
            other => panic!("expected a 410 event, got {other:?}"),
        }
        assert!(
            tokio::time::timeout(SETTLE, watch.try_next())
                .await??
                .is_none(),
            "the expired watch ends"
        );

        // A 410 fault rule on a watch is streamed as an ERROR event too, like kube-apiserver does.
        sim.faults().fail_next("watch", "configmaps", 1, 410);
        let mut watch = api.watch(&WatchParams::default(), "1").await?.boxed();
        match tokio::time::timeout(SETTLE, watch.try_next()).await?? {
            Some(WatchEvent::Error(status)) => assert_eq!(status.code, 410),
            other => panic!("expected a 410 event, got {other:?}"),
        }
        sim.shutdown().await;
        Ok(())
    })
    .await
}

struct Workloads {
    sim: SimCluster,
    client: Client,
}

impl Workloads {
    async fn start(traffic: bool) -> Result<Workloads, Box<dyn std::error::Error>> {
        let sim = SimCluster::start(SimConfig {
            workload: Some(WorkloadConfig {
                default_ready_delay: Duration::from_millis(100),
                resync: Duration::from_secs(2),
            }),
            traffic: traffic.then(TrafficConfig::default),
            admin: true,
            ..SimConfig::default()
        })
        .await?;
        let client = sim.client().await?;
        Ok(Workloads { sim, client })
    }

    async fn create_rs(&self, name: &str, replicas: i32, hash: &str) -> TestResult {
        Api::<ReplicaSet>::namespaced(self.client.clone(), NS)
            .create(&PostParams::default(), &replicaset(name, replicas, hash))
            .await?;
        Ok(())
    }

    async fn pods_of(&self, rs: &str) -> Vec<Pod> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), NS)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut owned: Vec<Pod> = pods
            .into_iter()
            .filter(|p| p.owner_references().iter().any(|o| o.name == rs))
            .collect();
        owned.sort_by_key(|p| p.name_any());
        owned
    }

    /// (replicas, readyReplicas, availableReplicas) from the ReplicaSet's status.
    async fn rs_status(&self, name: &str) -> Option<(i32, i32, i32)> {
        let rs = Api::<ReplicaSet>::namespaced(self.client.clone(), NS)
            .get(name)
            .await
            .ok()?;
        let s = rs.status?;
        Some((
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        ))
    }

    async fn ready_pods(&self, rs: &str, count: usize) -> Result<Vec<Pod>, String> {
        eventually(&format!("{count} ready pods of {rs}"), SETTLE, || async {
            let pods = self.pods_of(rs).await;
            (pods.len() == count && pods.iter().all(is_ready)).then_some(pods)
        })
        .await
    }

    async fn expect_status(&self, rs: &str, want: (i32, i32, i32)) -> Result<(), String> {
        eventually(&format!("{rs} status {want:?}"), SETTLE, || async {
            (self.rs_status(rs).await == Some(want)).then_some(())
        })
        .await
    }

    /// Waits until app `web`'s traffic over the last 2s splits as `expected` (within 2 points).
    async fn expect_shares(
        &self,
        expected: &[(&str, f64)],
    ) -> Result<BTreeMap<String, f64>, String> {
        let traffic = self.sim.traffic().ok_or("no traffic simulator")?.clone();
        let mut last = BTreeMap::new();
        let found = eventually("traffic shares", Duration::from_secs(30), || {
            let share = traffic.recent_share(NS, "web", Duration::from_secs(2));
            last = share.clone();
            let matches = share.len() == expected.len()
                && expected.iter().all(|(hash, want)| {
                    share
                        .get(*hash)
                        .is_some_and(|got| (got - want).abs() <= 0.02)
                });
            async move { matches.then_some(share) }
        })
        .await;
        found.map_err(|e| format!("{e}: last shares {last:?}"))
    }
}

#[tokio::test]
async fn forced_unready_pods_lose_traffic_and_the_replicaset_status_follows() -> TestResult {
    with_timeout(async {
        let w = Workloads::start(true).await?;
        w.create_rs("web-v1", 2, "v1").await?;
        w.create_rs("web-v2", 2, "v2").await?;
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
        }))?;
        Api::<Service>::namespaced(w.client.clone(), NS)
            .create(&PostParams::default(), &service)
            .await?;
        let v2_pods = w.ready_pods("web-v2", 2).await?;
        w.ready_pods("web-v1", 2).await?;
        w.expect_shares(&[("v1", 0.5), ("v2", 0.5)]).await?;

        let made = w.sim.make_pods_unready(NS, "web-v2", 1).await?;
        assert_eq!(made, vec![v2_pods[0].name_any()], "the first pod by name");
        let pods = w.pods_of("web-v2").await;
        assert_eq!(
            pods.iter()
                .map(|p| (p.name_any(), is_ready(p)))
                .collect::<Vec<_>>(),
            vec![
                (v2_pods[0].name_any(), false),
                (v2_pods[1].name_any(), true)
            ],
            "the pod is unready when the call returns, and it is not replaced"
        );
        w.expect_status("web-v2", (2, 1, 1)).await?;
        w.expect_shares(&[("v1", 2.0 / 3.0), ("v2", 1.0 / 3.0)])
            .await?;

        w.sim.make_pod_unready(NS, &v2_pods[1].name_any()).await?;
        w.expect_status("web-v2", (2, 0, 0)).await?;
        w.expect_shares(&[("v1", 1.0)]).await?;
        assert_eq!(w.pods_of("web-v2").await.len(), 2, "unready pods stay");

        let back = w.sim.make_pods_ready(NS, "web-v2").await?;
        assert_eq!(back.len(), 2);
        assert!(w.pods_of("web-v2").await.iter().all(is_ready));
        w.expect_status("web-v2", (2, 2, 2)).await?;
        w.expect_shares(&[("v1", 0.5), ("v2", 0.5)]).await?;

        match w.sim.make_pods_unready(NS, "web-v2", 3).await {
            Err(error @ ControlError::NotEnoughReadyPods { .. }) => {
                assert!(error.to_string().starts_with("count:"), "{error}")
            }
            other => panic!("expected NotEnoughReadyPods, got {other:?}"),
        }
        assert!(matches!(
            w.sim.make_pod_unready(NS, "web-v9-zzzzz").await,
            Err(ControlError::PodNotFound { .. })
        ));
        assert!(matches!(
            w.sim.make_pods_unready(NS, "web-v9", 1).await,
            Err(ControlError::ReplicaSetNotFound { .. })
        ));
        w.sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_stopped_workload_simulator_creates_no_pods_and_writes_no_status() -> TestResult {
    with_timeout(async {
        let w = Workloads::start(false).await?;
        w.create_rs("web-v1", 2, "v1").await?;
        let pods = w.ready_pods("web-v1", 2).await?;
        w.expect_status("web-v1", (2, 2, 2)).await?;

        assert!(w.sim.stop_workload().await?);
        assert!(!w.sim.stop_workload().await?, "stopping twice is a no-op");
        assert!(!w.sim.workload_running());
        let simulator_requests =
            || w.sim.request_log().filter(|r| r.user == SIMULATOR_USER).len();
        let replicasets = Api::<ReplicaSet>::namespaced(w.client.clone(), NS);
        replicasets
            .patch(
                "web-v1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
        w.create_rs("web-v2", 1, "v2").await?;
        Api::<Pod>::namespaced(w.client.clone(), NS)
            .delete(&pods[0].name_any(), &DeleteParams::default())
            .await?;
        // Forced readiness waits for the kubelet to come back.
        w.sim.make_pod_unready(NS, &pods[1].name_any()).await?;

        let started = Instant::now();
        let mut polls = 0;
        // Counted from the first poll: a request the stopped run had on the wire may still be logged
        // (and refused) until then; after it, nothing.
        let mut requests_while_stopped = None;
        while started.elapsed() < Duration::from_millis(1500) && polls < 100 {
            let v1 = w.pods_of("web-v1").await;
            assert_eq!(v1.len(), 1, "no pod created or replaced while stopped");
            assert!(is_ready(&v1[0]), "no pod status written while stopped");
            assert!(w.pods_of("web-v2").await.is_empty());
            assert_eq!(w.rs_status("web-v1").await, Some((2, 2, 2)), "stale status");
            assert_eq!(w.rs_status("web-v2").await, None, "no status for a new RS");
            let requests = simulator_requests();
            assert_eq!(
                requests,
                *requests_while_stopped.get_or_insert(requests),
                "a stopped simulator sends nothing"
            );
            polls += 1;
            tokio::time::sleep(POLL).await;
        }
        assert!(polls >= 10);

        // A request a stopped run still had on the wire is refused, not applied.
        let (code, _, _) = http(
            &format!("{}/api/v1/namespaces/{NS}/configmaps", w.sim.base_url()),
            "POST",
            SIMULATOR_USER,
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}})),
        )
        .await;
        assert_eq!(code, 201, "requests without a run header are served");
        let client = reqwest::Client::new();
        let late = client
            .post(format!(
                "{}/api/v1/namespaces/{NS}/configmaps",
                w.sim.base_url()
            ))
            .header("authorization", format!("Bearer {SIMULATOR_USER}"))
            .header("content-type", "application/json")
            .header(serin_sim::workload::RUN_HEADER, "1")
            .body(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-stopped-run"}})
                    .to_string(),
            )
            .send()
            .await?;
        assert_eq!(late.status().as_u16(), 503);
        assert!(Api::<ConfigMap>::namespaced(w.client.clone(), NS)
            .get_opt("from-stopped-run")
            .await?
            .is_none());

        assert!(w.sim.start_workload().await?);
        assert!(!w.sim.start_workload().await?, "starting twice is a no-op");
        assert!(w.sim.workload_running());
        w.expect_status("web-v2", (1, 1, 1)).await?;
        eventually(
            "web-v1 back to 3 pods, one forced unready",
            SETTLE,
            || async {
                let v1 = w.pods_of("web-v1").await;
                let unready: Vec<String> = v1
                    .iter()
                    .filter(|p| !is_ready(p))
                    .map(|p| p.name_any())
                    .collect();
                (v1.len() == 3 && unready == vec![pods[1].name_any()]).then_some(())
            },
        )
        .await?;
        w.expect_status("web-v1", (3, 2, 2)).await?;
        // The new run's requests are admitted; the first run's stay refused.
        let late = client
            .post(format!(
                "{}/api/v1/namespaces/{NS}/configmaps",
                w.sim.base_url()
            ))
            .header("authorization", format!("Bearer {SIMULATOR_USER}"))
            .header("content-type", "application/json")
            .header(serin_sim::workload::RUN_HEADER, "1")
            .body(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-stopped-run"}})
                    .to_string(),
            )
            .send()
            .await?;
        assert_eq!(late.status().as_u16(), 503);
        w.sim.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_admin_endpoint_drives_every_fault_over_plain_http() -> TestResult {
    with_timeout(async {
        let w = Workloads::start(false).await?;
        let admin = w.sim.admin_url();
        let (code, _, listing) = http(&format!("{admin}/faults"), "GET", "admin", None).await;
        assert_eq!(code, 200);
        assert_eq!(listing["rules"], json!([]));
        assert_eq!(listing["workload"], "running");

        // A rule for one user and one object, listed, applied, used up.
        let (code, _, added) = http(
            &format!("{admin}/faults"),
            "POST",
            "admin",
            Some(
                json!({"verb": "get", "resource": "cm", "name": "web-config", "user": "alice",
                        "count": 2, "code": 403}),
            ),
        )
        .await;
        assert_eq!(code, 200, "{added}");
        assert_eq!(added["rule"]["resource"], "configmaps");
        let (_, _, listing) = http(&format!("{admin}/faults"), "GET", "admin", None).await;
        assert_eq!(listing["rules"][0]["count"], 2);
        assert_eq!(listing["rules"][0]["user"], "alice");
        let maps = Api::<ConfigMap>::namespaced(w.client.clone(), NS);
        maps.create(&PostParams::default(), &config_map("web-config", "1"))
            .await?;
        let alice = Api::<ConfigMap>::namespaced(w.sim.client_as("alice").await?, NS);
        let (code, reason) = api_code(alice.get("web-config").await.unwrap_err());
        assert_eq!((code, reason.as_str()), (403, "Forbidden"));
        maps.get("web-config").await?;
        let (code, _, _) = http(&format!("{admin}/faults"), "DELETE", "admin", None).await;
        assert_eq!(code, 200);
        alice.get("web-config").await?;

        // Bad input: 400 with the field at fault first.
        for (path, body, field) in [
            ("faults", json!({"verb": "fetch"}), "verb:"),
            ("faults", json!({"resource": "gizmos"}), "resource:"),
            ("faults", json!({"code": 200}), "code:"),
            ("faults", json!({"usr": "alice"}), "body:"),
            (
                "faults",
                json!({"code": 500, "timeoutMillis": 10}),
                "code, timeoutMillis:",
            ),
            (
                "watches/hold",
                json!({"resource": "replicasets"}),
                "millis:",
            ),
            ("watches/drop", json!({"millis": 100}), "resource:"),
            (
                "watches/expire",
                json!({"resource": "rs", "count": 0}),
                "count:",
            ),
            ("pods/unready", json!({}), "pod or replicaset:"),
            (
                "pods/unready",
                json!({"pod": "a", "replicaset": "b"}),
                "pod, replicaset:",
            ),
        ] {
            let (code, _, body) = http(
                &format!("{admin}/{path}"),
                "POST",
                "admin",
                Some(body.clone()),
            )
            .await;
            assert_eq!(code, 400, "{path} {body}");
            assert_eq!(body["reason"], "BadRequest");
            let message = body["message"].as_str().unwrap_or("");
            assert!(message.starts_with(field), "{path}: {message}");
        }
        let (code, _, _) = http(&format!("{admin}/nothing"), "POST", "admin", None).await;
        assert_eq!(code, 404);
        let (code, _, _) = http(&format!("{admin}/workload/stop"), "GET", "admin", None).await;
        assert_eq!(code, 405);

        // Watch faults: a hold shows in the listing and makes lists wait.
        let (code, _, held) = http(
            &format!("{admin}/watches/hold"),
            "POST",
            "admin",
            Some(json!({"resource": "configmaps", "millis": 800})),
        )
        .await;
        assert_eq!(code, 200, "{held}");
        let (_, _, listing) = http(&format!("{admin}/faults"), "GET", "admin", None).await;
        assert_eq!(listing["watches"][0]["kind"], "hold");
        assert_eq!(listing["watches"][0]["resource"], "configmaps");
        let started = Instant::now();
        maps.list(&ListParams::default()).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "the list waited"
        );
        for (path, body) in [
            (
                "watches/drop",
                json!({"resource": "secrets", "millis": 100}),
            ),
            ("watches/expire", json!({"resource": "secrets", "count": 1})),
            ("watches/close", json!({"resource": "secrets"})),
            ("watches/close", json!({})),
        ] {
            let (code, _, answer) =
                http(&format!("{admin}/{path}"), "POST", "admin", Some(body)).await;
            assert_eq!(code, 200, "{path}: {answer}");
        }
        let (_, _, listing) = http(&format!("{admin}/faults"), "GET", "admin", None).await;
        assert_eq!(listing["watchExpiries"][0]["count"], 1);

        // Pods forced unready and back by ReplicaSet.
        w.create_rs("web-v1", 2, "v1").await?;
        w.ready_pods("web-v1", 2).await?;
        let (code, _, made) = http(
            &format!("{admin}/pods/unready"),
            "POST",
            "admin",
            Some(json!({"replicaset": "web-v1", "count": 1})),
        )
        .await;
        assert_eq!(code, 200, "{made}");
        let name = made["pods"][0].as_str().unwrap_or("").to_string();
        let pod = Api::<Pod>::namespaced(w.client.clone(), NS)
            .get(&name)
            .await?;
        assert!(!is_ready(&pod));
        w.expect_status("web-v1", (2, 1, 1)).await?;
        let (code, _, missing) = http(
            &format!("{admin}/pods/unready"),
            "POST",
            "admin",
            Some(json!({"pod": "nope"})),
        )
        .await;
        assert_eq!(code, 404, "{missing}");
        let (code, _, back) = http(
            &format!("{admin}/pods/ready"),
            "POST",
            "admin",
            Some(json!({"replicaset": "web-v1"})),
        )
        .await;
        assert_eq!((code, back["pods"].clone()), (200, json!([name])));
        w.expect_status("web-v1", (2, 2, 2)).await?;

        // The workload switch.
        let (code, _, stopped) =
            http(&format!("{admin}/workload/stop"), "POST", "admin", None).await;
        assert_eq!((code, stopped["workload"].as_str()), (200, Some("stopped")));
        assert!(!w.sim.workload_running());
        let (_, _, state) = http(&format!("{admin}/workload"), "GET", "admin", None).await;
        assert_eq!(state["workload"], "stopped");
        let (code, _, started_again) =
            http(&format!("{admin}/workload/start"), "POST", "admin", None).await;
        assert_eq!(
            (
                code,
                started_again["workload"].as_str(),
                started_again["changed"].as_bool()
            ),
            (200, Some("running"), Some(true))
        );
        w.sim.shutdown().await;

        // Without the flag there is no admin endpoint.
        let plain = SimCluster::start(SimConfig::api_only()).await?;
        let (code, _, _) = http(
            &format!("{}/faults", plain.admin_url()),
            "GET",
            "admin",
            None,
        )
        .await;
        assert_eq!(code, 404);
        let (code, _, _) = http(
            &format!("{}/faults", plain.admin_url()),
            "POST",
            "admin",
            Some(json!({"code": 500})),
        )
        .await;
        assert_eq!(code, 404);
        assert!(plain.faults().pending_rules().is_empty());
        plain.shutdown().await;
        Ok(())
    })
    .await
}
