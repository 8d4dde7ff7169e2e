//! The simulated API server through kube-rs: CRUD, selectors, paging, subresources, deletion, patches,
//! watches, faults, bad input and the upstream Gateway API / Istio CRDs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_sim::fixtures;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use serin_sim::{SimCluster, SimConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn start() -> (SimCluster, Client) {
    start_with(SimConfig::api_only()).await
}

async fn start_with(config: SimConfig) -> (SimCluster, Client) {
    let sim = SimCluster::start(config).await.expect("sim starts");
    let client = sim.client().await.expect("client");
    (sim, client)
}

fn config_map(name: &str, labels: &[(&str, &str)], data: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()},
        "data": {"value": data},
    }))
    .expect("valid configmap")
}

fn api_error(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crud_generate_name_and_stale_update_conflict() {
    let (sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &config_map("one", &[], "a"))
        .await
        .unwrap();
    let metadata = &created.metadata;
    assert!(metadata.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(metadata.creation_timestamp.is_some());
    let first_version = metadata.resource_version.clone().unwrap();

    let (code, reason) = api_error(
        api.create(&PostParams::default(), &config_map("one", &[], "a"))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut generated = config_map("", &[], "g");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = api
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let generated_name = generated.metadata.name.unwrap();
    assert!(
        generated_name.starts_with("gen-") && generated_name.len() == 9,
        "{generated_name}"
    );

    let mut changed = created.clone();
    changed.data = Some(BTreeMap::from([("value".to_string(), "b".to_string())]));
    let replaced = api
        .replace("one", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version.as_deref(),
        Some(first_version.as_str())
    );
    assert_eq!(api.get("one").await.unwrap().data.unwrap()["value"], "b");

    // `changed` still carries the first resourceVersion: a stale write.
    changed.data = Some(BTreeMap::from([("value".to_string(), "c".to_string())]));
    let (code, reason) = api_error(
        api.replace("one", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(api.get("one").await.unwrap().data.unwrap()["value"], "b");

    api.delete("one", &DeleteParams::default()).await.unwrap();
    let (code, reason) = api_error(api.get("one").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));

    let (code, _) = api_error(
        Api::<ConfigMap>::namespaced(client, "missing-ns")
            .create(&PostParams::default(), &config_map("x", &[], "a"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn selectors_paging_and_all_namespaces() {
    let (sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let specs = [
        ("a", vec![("app", "web"), ("tier", "front")]),
        ("b", vec![("app", "web"), ("tier", "back")]),
        ("c", vec![("app", "api")]),
        ("d", vec![]),
    ];
    for (name, labels) in &specs {
        api.create(&PostParams::default(), &config_map(name, labels, "x"))
            .await
            .unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect()
    };
    let cases = [
        ("app=web", vec!["a", "b"]),
        ("app==web,tier=back", vec!["b"]),
        ("app!=web", vec!["c", "d"]),
        ("app in (api, web)", vec!["a", "b", "c"]),
        ("app notin (web)", vec!["c", "d"]),
        ("tier", vec!["a", "b"]),
        ("!tier", vec!["c", "d"]),
    ];
    for (selector, expected) in cases {
        let got = names(
            api.list(&ListParams::default().labels(selector))
                .await
                .unwrap(),
        );
        assert_eq!(got, expected, "selector {selector}");
    }
    let by_name = names(
        api.list(&ListParams::default().fields("metadata.name=c"))
            .await
            .unwrap(),
    );
    assert_eq!(by_name, vec!["c"]);
    let not_name = names(
        api.list(&ListParams::default().fields("metadata.name!=c"))
            .await
            .unwrap(),
    );
    assert_eq!(not_name, vec!["a", "b", "d"]);

    let mut pages = Vec::new();
    let mut params = ListParams::default().limit(3);
    for _ in 0..5 {
        let page = api.list(&params).await.unwrap();
        let token = page.metadata.continue_.clone();
        pages.push(names(page));
        match token.filter(|t| !t.is_empty()) {
            Some(token) => params = ListParams::default().limit(3).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, vec![vec!["a", "b", "c"], vec!["d"]]);

    Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &config_map("sys", &[], "x"))
        .await
        .unwrap();
    let everywhere = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 5);
    let list_version: u64 = everywhere
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    assert!(list_version >= 5);
    sim.shutdown().await;
}

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"}
                }
            }]
        }
    })
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    )
}

async fn install_widgets(client: &Client) -> Api<DynamicObject> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(widget_crd()).unwrap();
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let conditions = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    assert!(conditions
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True"));
    Api::namespaced_with(client.clone(), "default", &widget_resource())
}

fn widget(name: &str, replicas: i64) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "color": "blue"},
        "status": {"replicas": 99},
    }))
    .unwrap()
}

#[tokio::test]
async fn status_and_scale_subresources_are_independent_and_generation_tracks_spec() {
    let (sim, client) = start().await;
    let widgets = install_widgets(&client).await;
    let created = widgets
        .create(&PostParams::default(), &widget("w", 2))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create"
    );

    let params = PatchParams::default();
    let patched = widgets
        .patch(
            "w",
            &params,
            &Patch::Merge(json!({"status": {"replicas": 5}, "metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert!(
        patched.data.get("status").is_none(),
        "main resource write ignores status"
    );
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "metadata-only change keeps generation"
    );

    let status = widgets
        .patch_status(
            "w",
            &params,
            &Patch::Merge(
                json!({"status": {"replicas": 2, "selector": "app=w"}, "spec": {"replicas": 7}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"]["replicas"], 2);
    assert_eq!(
        status.data["spec"]["replicas"], 2,
        "status write ignores spec"
    );
    assert_eq!(status.metadata.generation, Some(1));

    let spec = widgets
        .patch(
            "w",
            &params,
            &Patch::Merge(json!({"spec": {"color": "red"}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    assert_eq!(
        spec.data["status"]["replicas"], 2,
        "spec write keeps stored status"
    );

    let scale = widgets.get_scale("w").await.unwrap();
    assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(
        scale
            .status
            .as_ref()
            .and_then(|s| s.selector.clone())
            .as_deref(),
        Some("app=w")
    );
    widgets
        .patch_scale(
            "w",
            &params,
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    let scaled = widgets.get("w").await.unwrap();
    assert_eq!(scaled.data["spec"]["replicas"], 4);
    assert_eq!(scaled.metadata.generation, Some(3));

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 1))
        .await
        .unwrap();
    deployments
        .patch_scale(
            "web",
            &params,
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let scale = deployments.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    assert_eq!(
        scale.status.and_then(|s| s.selector).as_deref(),
        Some("app=web")
    );
    sim.shutdown().await;
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]}]}
            }
        }
    }))
    .unwrap()
}

fn owned_pod(name: &str, owner: &ReplicaSet, finalizers: &[&str]) -> Pod {
    let reference = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: owner.metadata.name.clone().unwrap(),
        uid: owner.metadata.uid.clone().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {"containers": [{"name": "app", "image": "nginx:1"}]},
    }))
    .unwrap();
    pod.metadata.owner_references = Some(vec![reference]);
    pod
}

fn replica_set(name: &str) -> ReplicaSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"rs": name}}, "template": {"metadata": {"labels": {"rs": name}}, "spec": {"containers": [{"name": "a", "image": "b"}]}}},
    }))
    .unwrap()
}

#[tokio::test]
async fn finalizers_and_garbage_collection() {
    let (sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut guarded = config_map("guarded", &[], "x");
    guarded.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    maps.create(&PostParams::default(), &guarded).await.unwrap();
    maps.delete("guarded", &DeleteParams::default())
        .await
        .unwrap();
    let pending = maps.get("guarded").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    maps.patch(
        "guarded",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_error(maps.get("guarded").await.unwrap_err()).0, 404);

    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Background: the owner goes at once, its dependents after it.
    let owner = sets
        .create(&PostParams::default(), &replica_set("bg"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &owned_pod("bg-1", &owner, &[]))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &owned_pod("bg-2", &owner, &[]))
        .await
        .unwrap();
    sets.delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    assert_eq!(api_error(sets.get("bg").await.unwrap_err()).0, 404);
    assert!(pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // Foreground: the owner waits (deletionTimestamp + foregroundDeletion) until its dependents are gone.
    let owner = sets
        .create(&PostParams::default(), &replica_set("fg"))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &owned_pod("fg-held", &owner, &["example.com/hold"]),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &owned_pod("fg-free", &owner, &[]))
        .await
        .unwrap();
    sets.delete("fg", &DeleteParams::foreground())
        .await
        .unwrap();
    let waiting = sets.get("fg").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert!(waiting
        .metadata
        .finalizers
        .unwrap_or_default()
        .contains(&"foregroundDeletion".to_string()));
    assert_eq!(api_error(pods.get("fg-free").await.unwrap_err()).0, 404);
    assert!(pods
        .get("fg-held")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    pods.patch(
        "fg-held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_error(pods.get("fg-held").await.unwrap_err()).0, 404);
    assert_eq!(api_error(sets.get("fg").await.unwrap_err()).0, 404);

    // Orphan: dependents stay, without the owner reference.
    let owner = sets
        .create(&PostParams::default(), &replica_set("or"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &owned_pod("or-1", &owner, &[]))
        .await
        .unwrap();
    sets.delete("or", &DeleteParams::orphan()).await.unwrap();
    let orphan = pods.get("or-1").await.unwrap();
    assert!(orphan
        .metadata
        .owner_references
        .unwrap_or_default()
        .is_empty());

    // Deleting a namespace removes what it holds.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "temp"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let temp_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "temp");
    temp_maps
        .create(&PostParams::default(), &config_map("inside", &[], "x"))
        .await
        .unwrap();
    namespaces
        .delete("temp", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_error(temp_maps.get("inside").await.unwrap_err()).0, 404);

    // deletecollection with a label selector.
    maps.create(
        &PostParams::default(),
        &config_map("k1", &[("sweep", "yes")], "x"),
    )
    .await
    .unwrap();
    maps.create(
        &PostParams::default(),
        &config_map("k2", &[("sweep", "no")], "x"),
    )
    .await
    .unwrap();
    maps.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("sweep=yes"),
    )
    .await
    .unwrap();
    let left: Vec<String> = maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(left, vec!["k2"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn every_patch_type_through_kube_rs() {
    let (sim, client) = start().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 1))
        .await
        .unwrap();
    let params = PatchParams::default();

    let merged = deployments
        .patch(
            "web",
            &params,
            &Patch::Merge(json!({"metadata": {"labels": {"m": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.metadata.labels.unwrap()["m"], "1");

    let operations: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 2}]))
            .unwrap();
    let json_patched = deployments
        .patch("web", &params, &Patch::Json::<()>(operations))
        .await
        .unwrap();
    assert_eq!(json_patched.spec.replicas, Some(2));

    let strategic = deployments
        .patch(
            "web",
            &params,
            &Patch::Strategic(
                json!({"spec": {"template": {"metadata": {"annotations": {"s": "1"}}}}}),
            ),
        )
        .await
        .unwrap();
    let template = strategic.spec.template;
    assert_eq!(template.metadata.unwrap().annotations.unwrap()["s"], "1");
    assert_eq!(template.spec.unwrap().containers[0].name, "app");

    let apply = PatchParams::apply("serin-test").force();
    let applied = deployments
        .patch("web", &apply, &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}})))
        .await
        .unwrap();
    assert_eq!(applied.spec.replicas, Some(5));

    let created = deployments
        .patch("fresh", &apply, &Patch::Apply(deployment("fresh", 1)))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    let log = sim.request_log().matching("patch", "deployments");
    let types: Vec<String> = log
        .iter()
        .filter_map(|r| r.patch_content_type.clone())
        .collect();
    assert_eq!(
        types,
        vec![
            "application/merge-patch+json",
            "application/json-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml",
            "application/apply-patch+yaml",
        ]
    );
    assert!(log.iter().all(|r| r.user == "admin" && r.status < 300));

    let missing = deployments
        .patch("nope", &params, &Patch::Merge(json!({"spec": {}})))
        .await
        .unwrap_err();
    assert_eq!(api_error(missing).0, 404);

    let widgets = install_widgets(&client).await;
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    let (code, reason) = api_error(
        widgets
            .patch(
                "w",
                &params,
                &Patch::Strategic(json!({"spec": {"replicas": 2}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (415, "UnsupportedMediaType"));
    sim.shutdown().await;
}

/// What a watcher saw, reduced to (type, name, data value).
fn describe(event: &watcher::Event<ConfigMap>) -> Option<(String, String, String)> {
    let (kind, map) = match event {
        watcher::Event::Apply(map) => ("apply", map),
        watcher::Event::Delete(map) => ("delete", map),
        _ => return None,
    };
    let value = map
        .data
        .as_ref()
        .and_then(|d| d.get("value").cloned())
        .unwrap_or_default();
    Some((
        kind.to_string(),
        map.metadata.name.clone().unwrap_or_default(),
        value,
    ))
}

#[tokio::test]
async fn watcher_sees_every_change_in_order() {
    let (sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    // Wait for the initial list to finish before writing.
    tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.try_next().await.unwrap() {
            if matches!(event, watcher::Event::InitDone) {
                break;
            }
        }
    })
    .await
    .unwrap();
    api.create(&PostParams::default(), &config_map("w", &[], "1"))
        .await
        .unwrap();
    for value in ["2", "3", "4"] {
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"value": value}})),
        )
        .await
        .unwrap();
    }
    api.delete("w", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while seen.len() < 5 {
            let event = stream.try_next().await.unwrap().unwrap();
            seen.extend(describe(&event));
        }
    })
    .await
    .unwrap();
    let expected: Vec<(String, String, String)> = [
        ("apply", "1"),
        ("apply", "2"),
        ("apply", "3"),
        ("apply", "4"),
        ("delete", "4"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), "w".to_string(), v.to_string()))
    .collect();
    assert_eq!(seen, expected);
    sim.shutdown().await;
}

async fn wait_for_store(store: &reflector::Store<ConfigMap>, api: &Api<ConfigMap>) {
    let server = || async {
        let mut names: Vec<(String, String)> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| {
                (
                    c.metadata.name.unwrap(),
                    c.data
                        .unwrap_or_default()
                        .get("value")
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .collect();
        names.sort();
        names
    };
    let expected = server().await;
    let result = tokio::time::timeout(WAIT, async {
        loop {
            let mut cached: Vec<(String, String)> = store
                .state()
                .iter()
                .map(|c| {
                    (
                        c.metadata.name.clone().unwrap(),
                        c.data
                            .clone()
                            .unwrap_or_default()
                            .get("value")
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
                .collect();
            cached.sort();
            if cached == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "reflector store never matched the server's list ({} objects)",
        expected.len()
    );
}

#[tokio::test]
async fn reflector_recovers_from_closed_watches_and_410_without_losing_anything() {
    let (sim, client) = start_with(SimConfig {
        event_window: 20,
        ..SimConfig::api_only()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let (store, writer) = reflector::store();
    let stream =
        reflector(writer, watcher(api.clone(), watcher::Config::default())).applied_objects();
    let driver = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    for index in 0..5 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("r{index}"), &[], "0"),
        )
        .await
        .unwrap();
    }
    wait_for_store(&store, &api).await;

    sim.faults().close_watches();
    api.patch(
        "r0",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "after-close"}})),
    )
    .await
    .unwrap();
    api.delete("r1", &DeleteParams::default()).await.unwrap();
    wait_for_store(&store, &api).await;

    // Hold the watcher off (its re-watch fails) while more events than the window holds are written,
    // so the resumed watch is answered 410 and the reflector must relist.
    let lists_before = sim.request_log().matching("list", "configmaps").len();
    sim.faults().fail_next("watch", "configmaps", 3, 500);
    sim.faults().close_watches();
    for round in 0..30 {
        api.patch(
            "r2",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"value": round.to_string()}})),
        )
        .await
        .unwrap();
    }
    api.delete("r3", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &config_map("late", &[], "new"))
        .await
        .unwrap();
    wait_for_store(&store, &api).await;
    let lists_after = sim.request_log().matching("list", "configmaps").len();
    assert!(
        lists_after > lists_before,
        "the reflector relisted after 410"
    );
    driver.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn watch_of_a_compacted_version_streams_410_expired() {
    let (sim, client) = start_with(SimConfig {
        event_window: 5,
        ..SimConfig::api_only()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for index in 0..10 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("c{index}"), &[], "x"),
        )
        .await
        .unwrap();
    }
    let mut stream = api
        .watch(&kube::api::WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first {
        kube::api::WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(
                status.message.starts_with("too old resource version: 1"),
                "{}",
                status.message
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }

    // A continue token from before the window moved past it is answered 410 Expired too.
    let first_page = api.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first_page.metadata.continue_.unwrap();
    let fresh = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(fresh.items.len(), 2, "a fresh token still pages");
    for index in 0..10 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("later{index}"), &[], "x"),
        )
        .await
        .unwrap();
    }
    let (code, reason) = api_error(
        api.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (410, "Expired"));
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_faults_fail_then_pass() {
    let (sim, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    sim.faults().fail_next("create", "configmaps", 2, 500);
    for _ in 0..2 {
        let (code, reason) = api_error(
            api.create(&PostParams::default(), &config_map("f", &[], "x"))
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (500, "InternalError"));
    }
    api.create(&PostParams::default(), &config_map("f", &[], "x"))
        .await
        .unwrap();

    // kube-rs retries 429 (honouring Retry-After): the request log shows the two refusals.
    sim.faults().fail_next("get", "configmaps", 2, 429);
    sim.request_log().clear();
    api.get("f").await.unwrap();
    let statuses: Vec<u16> = sim
        .request_log()
        .matching("get", "configmaps")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 200]);

    sim.faults()
        .fail_next_subresource("patch", "configmaps", "status", 1, 409);
    let (code, reason) = api_error(api.get("missing").await.unwrap_err());
    assert_eq!(
        (code, reason.as_str()),
        (404, "NotFound"),
        "subresource rule does not hit the main resource"
    );

    sim.faults()
        .timeout_next("list", "configmaps", 1, Duration::from_millis(50));
    let error = api.list(&ListParams::default()).await;
    // 504 is retried by kube-rs, so the list either surfaces the timeout or succeeds on retry.
    let statuses: Vec<u16> = sim
        .request_log()
        .matching("list", "configmaps")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses.first(), Some(&504));
    assert!(error.is_ok());

    let users = sim.client_as("alice").await.unwrap();
    Api::<ConfigMap>::namespaced(users, "default")
        .create(&PostParams::default(), &config_map("by-alice", &[], "x"))
        .await
        .unwrap();
    assert_eq!(sim.request_log().writes_by("alice").len(), 1);
    sim.shutdown().await;
}

async fn raw(
    sim: &SimCluster,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let response = client
        .request(method, format!("{}{}", sim.base_url(), path))
        .header("content-type", content_type)
        .header("authorization", "Bearer admin")
        .body(body)
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    let text = response.bytes().await.unwrap();
    (code, serde_json::from_slice(&text).unwrap_or(Value::Null))
}

/// (method, path, content type, body, expected code, expected reason).
type BadInputCase = (
    &'static str,
    String,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
);

#[tokio::test]
async fn bad_input_gets_the_right_status_and_the_server_keeps_serving() {
    let (sim, client) = start().await;
    let cms = "/api/v1/namespaces/default/configmaps";
    let good = |name: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
            .to_string()
            .into_bytes()
    };
    let cases: Vec<BadInputCase> = vec![
        (
            "POST",
            cms.into(),
            "application/json",
            b"{\"apiVersion\": ".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.into(),
            "application/yaml",
            b"kind: [unclosed".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.into(),
            "application/json",
            b"[1,2]".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/gizmos".into(),
            "application/json",
            good("g"),
            404,
            "NotFound",
        ),
        (
            "GET",
            "/apis/nope.example.com/v1/things".into(),
            "application/json",
            vec![],
            404,
            "NotFound",
        ),
        (
            "POST",
            cms.into(),
            "application/json",
            good("Bad_Name"),
            422,
            "Invalid",
        ),
        (
            "POST",
            cms.into(),
            "application/json",
            json!({"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "a"}})
                .to_string()
                .into_bytes(),
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.into(),
            "application/json",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}})
                .to_string()
                .into_bytes(),
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.into(),
            "application/json",
            vec![b' '; 3 * 1024 * 1024 + 10],
            413,
            "RequestEntityTooLarge",
        ),
        (
            "PATCH",
            format!("{cms}/exists"),
            "application/x-unknown-patch",
            b"{}".to_vec(),
            415,
            "UnsupportedMediaType",
        ),
        (
            "PATCH",
            format!("{cms}/exists"),
            "application/json-patch+json",
            b"{\"not\": \"a list\"}".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "PATCH",
            format!("{cms}/exists"),
            "application/merge-patch+json",
            b"{oops".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "PATCH",
            format!("{cms}/exists"),
            "application/apply-patch+yaml",
            b"data: {a: b}".to_vec(),
            400,
            "BadRequest",
        ),
        (
            "PUT",
            format!("{cms}/exists"),
            "application/json",
            good("other"),
            400,
            "BadRequest",
        ),
        (
            "POST",
            format!("{cms}/exists"),
            "application/json",
            good("exists"),
            405,
            "MethodNotAllowed",
        ),
        (
            "GET",
            format!("{cms}?labelSelector=a%20in%20b"),
            "application/json",
            vec![],
            400,
            "BadRequest",
        ),
    ];
    let (code, _) = raw(&sim, "POST", cms, "application/json", good("exists")).await;
    assert_eq!(code, 201);
    for (method, path, content_type, body, expected_code, expected_reason) in cases {
        let (code, status) = raw(&sim, method, &path, content_type, body).await;
        assert_eq!(
            code, expected_code,
            "{method} {path} {content_type}: {status}"
        );
        assert_eq!(status["kind"], "Status", "{method} {path}");
        assert_eq!(
            status["reason"], expected_reason,
            "{method} {path}: {status}"
        );
        assert_eq!(status["code"], expected_code);
    }
    let (_, invalid) = raw(&sim, "POST", cms, "application/json", good("Bad_Name")).await;
    assert_eq!(invalid["details"]["causes"][0]["field"], "metadata.name");

    let (code, created) = raw(
        &sim,
        "POST",
        cms,
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\n".to_vec(),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn discovery_lists_builtins_and_crds() {
    let (sim, client) = start().await;
    install_widgets(&client).await;
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (resource, capabilities) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"))
        .expect("widgets discovered");
    assert_eq!(resource.plural, "widgets");
    assert!(capabilities
        .subresources
        .iter()
        .any(|(r, _)| r.plural == "widgets/status" || r.plural == "status"));
    assert!(discovery
        .resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
        .is_some());
    assert!(discovery
        .resolve_gvk(&GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"))
        .is_some());

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &widget_resource());
    assert_eq!(
        api_error(widgets.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );
    sim.shutdown().await;
}

/// `$CARGO_MANIFEST_DIR/../shared/fixtures/upstream-crds`, or the same under a further ancestor (git worktrees).
fn upstream_dir() -> PathBuf {
    fixtures::upstream_crds().unwrap_or_else(|why| panic!("{why}"))
}

async fn apply_upstream_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(upstream_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    assert_eq!(entries.len(), 6);
    for path in entries {
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).unwrap();
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value).unwrap();
            crds.patch(
                crd.metadata.name.as_deref().unwrap(),
                &PatchParams::apply("test").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap_or_else(|e| panic!("{} applies: {e}", path.display()));
        }
    }
}

#[tokio::test]
async fn upstream_gateway_and_istio_crds_apply_and_serve_objects() {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("upstream_gateway_and_istio_crds_apply_and_serve_objects")
    else {
        return;
    };
    let (sim, client) = start().await;
    apply_upstream_crds(&client).await;
    let routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    );
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "web-stable", "port": 80, "weight": 90}, {"name": "web-canary", "port": 80, "weight": 10}]}]},
    }))
    .unwrap();
    routes.create(&PostParams::default(), &route).await.unwrap();
    let stored = routes.get("web").await.unwrap();
    assert_eq!(
        stored.data["spec"]["rules"][0]["backendRefs"][1]["weight"],
        10
    );

    let services: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
            "virtualservices",
        ),
    );
    let virtual_service: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web"},
        "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 100}]}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &virtual_service)
        .await
        .unwrap();
    let older: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "VirtualService"),
            "virtualservices",
        ),
    );
    let as_beta = older.get("web").await.unwrap();
    assert_eq!(
        as_beta.types.unwrap().api_version,
        "networking.istio.io/v1beta1",
        "served at every version"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn upstream_crd_objects_are_pruned_and_validated() {
    let Some(_fixtures) =
        fixtures::upstream_crds_or_skip("upstream_crd_objects_are_pruned_and_validated")
    else {
        return;
    };
    let (sim, client) = start().await;
    apply_upstream_crds(&client).await;
    let routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    );
    let with_unknown: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "pruned"},
        "spec": {"parentRefs": [{"name": "gw"}], "bogusField": 1},
    }))
    .unwrap();
    routes
        .create(&PostParams::default(), &with_unknown)
        .await
        .unwrap();
    assert!(routes.get("pruned").await.unwrap().data["spec"]
        .get("bogusField")
        .is_none());

    let invalid: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "invalid"},
        "spec": {"rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": -5}]}]},
    }))
    .unwrap();
    let (code, reason) = api_error(
        routes
            .create(&PostParams::default(), &invalid)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));

    let (code, status) = raw(
        &sim,
        "POST",
        "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes?fieldValidation=Strict",
        "application/json",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "strict"}, "spec": {"bogusField": 1}}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("strict decoding error: unknown field \"spec.bogusField\""));
    sim.shutdown().await;
}

#[tokio::test]
async fn watch_options_selectors_bookmarks_timeout_and_streaming_lists() {
    let (sim, client) = start_with(SimConfig {
        bookmark_interval: Duration::from_millis(100),
        admin: true,
        ..SimConfig::api_only()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(
        &PostParams::default(),
        &config_map("sel", &[("team", "a")], "1"),
    )
    .await
    .unwrap();
    let version = api
        .get("sel")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let params = kube::api::WatchParams::default()
        .labels("team=a")
        .timeout(5)
        .disable_bookmarks();
    let params = kube::api::WatchParams {
        bookmarks: true,
        ..params
    };
    let mut stream = api.watch(&params, &version).await.unwrap().boxed();
    api.patch(
        "sel",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "b"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "sel",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "ignored"}})),
    )
    .await
    .unwrap();
    api.patch(
        "sel",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
    )
    .await
    .unwrap();
    let mut kinds = Vec::new();
    let mut saw_bookmark = false;
    let finished = tokio::time::timeout(WAIT, async {
        // The stream ends by itself when timeoutSeconds (5 s) runs out.
        while let Some(event) = stream.try_next().await.unwrap() {
            match event {
                kube::api::WatchEvent::Added(_) => kinds.push("ADDED"),
                kube::api::WatchEvent::Modified(_) => kinds.push("MODIFIED"),
                kube::api::WatchEvent::Deleted(_) => kinds.push("DELETED"),
                kube::api::WatchEvent::Bookmark(bookmark) => {
                    assert!(!bookmark.metadata.resource_version.is_empty());
                    saw_bookmark = true;
                }
                kube::api::WatchEvent::Error(status) => panic!("unexpected error {status:?}"),
            }
        }
    })
    .await;
    assert!(finished.is_ok(), "timeoutSeconds ends the watch");
    assert_eq!(
        kinds,
        vec!["DELETED", "ADDED"],
        "leaving and re-entering the selector"
    );
    assert!(saw_bookmark, "allowWatchBookmarks sends bookmarks");

    // Streaming lists: initial ADDED events, then a bookmark marking their end.
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.try_next().await.unwrap().unwrap() {
                watcher::Event::InitApply(map) => initial.push(map.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(initial, vec!["sel"]);
    let watch_request = sim.request_log().matching("watch", "configmaps");
    assert!(watch_request.iter().any(|r| r.status == 200));

    // dryRun answers without storing.
    let (code, _) = raw(
        &sim,
        "POST",
        "/api/v1/namespaces/default/configmaps?dryRun=All",
        "application/json",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(api_error(api.get("dry").await.unwrap_err()).0, 404);

    // Added latency delays every answer; the HTTP control surface sets the same faults.
    sim.faults().set_latency(Duration::from_millis(200));
    let started = std::time::Instant::now();
    api.get("sel").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    sim.faults().clear();
    let (code, _) = raw(
        &sim,
        "POST",
        "/sim/faults",
        "application/json",
        json!({"verb": "get", "resource": "configmaps", "code": 500, "count": 1})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(api_error(api.get("sel").await.unwrap_err()).0, 500);
    api.get("sel").await.unwrap();
    let (code, log) = raw(&sim, "GET", "/sim/requests", "application/json", Vec::new()).await;
    assert_eq!(code, 200);
    assert!(log["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["status"] == 500 && r["resource"] == "configmaps"));
    sim.shutdown().await;
}
