//! RBAC in the simulated cluster, seen from clients: with `enforce_rbac` a ServiceAccount's token gets only
//! what stored Roles and bindings grant it, a denied request gets kube-apiserver's 403 body (also through
//! kubectl), the admin keeps every right, and a grant added or removed takes effect on the next request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};
use serin_sim::rbac::service_account_user;
use serin_sim::{SimCluster, SimConfig};

const KUBECTL: &str = "/usr/bin/kubectl";
const NS: &str = "team-a";

async fn start(enforce_rbac: bool) -> SimCluster {
    let sim = SimCluster::start(SimConfig {
        enforce_rbac,
        ..SimConfig::api_only()
    })
    .await
    .expect("sim starts");
    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": NS}})).expect("a Namespace");
    Api::all(sim.client().await.expect("admin client"))
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace created");
    sim
}

fn rbac_api(client: &kube::Client, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "rbac.authorization.k8s.io",
        "v1",
        kind,
    ));
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

async fn create(client: &kube::Client, kind: &str, namespace: Option<&str>, object: Value) {
    let object: DynamicObject = serde_json::from_value(object).expect("a valid object");
    rbac_api(client, kind, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating a {kind}: {e}"));
}

/// A Role in `team-a` letting the ServiceAccount `team-a/bot` read ConfigMaps and patch one by name.
async fn grant_configmap_reads(admin: &kube::Client) {
    create(
        admin,
        "Role",
        Some(NS),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "reader", "namespace": NS},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"], "resourceNames": ["settings"]},
            ]
        }),
    )
    .await;
    create(
        admin,
        "RoleBinding",
        Some(NS),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": NS}]
        }),
    )
    .await;
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": NS}, "data": {"a": "1"}}))
        .expect("a ConfigMap")
}

fn status_of(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn a_service_account_gets_exactly_what_its_role_grants_and_a_real_forbidden_otherwise() {
    let sim = start(true).await;
    let admin = sim.client().await.expect("admin client");
    let bot = service_account_user(NS, "bot");
    let as_bot = sim.client_as(&bot).await.expect("bot client");
    let admin_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    for name in ["settings", "other"] {
        admin_maps
            .create(&PostParams::default(), &config_map(name))
            .await
            .expect("the admin needs no binding");
    }

    // Nothing granted yet: even a get is refused, with the body kube-apiserver sends.
    let bot_maps: Api<ConfigMap> = Api::namespaced(as_bot.clone(), NS);
    let refused = status_of(bot_maps.get("settings").await.expect_err("no binding yet"));
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        refused.message,
        format!("configmaps \"settings\" is forbidden: User \"{bot}\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"{NS}\"")
    );

    grant_configmap_reads(&admin).await;
    assert_eq!(
        bot_maps
            .get("settings")
            .await
            .expect("granted")
            .data
            .unwrap_or_default()["a"],
        "1"
    );
    assert_eq!(
        bot_maps
            .list(&ListParams::default())
            .await
            .expect("list granted")
            .items
            .len(),
        2
    );
    let patch = kube::api::Patch::Merge(json!({"data": {"a": "2"}}));
    let params = kube::api::PatchParams::default();
    bot_maps
        .patch("settings", &params, &patch)
        .await
        .expect("patch of the named ConfigMap");
    let other = status_of(
        bot_maps
            .patch("other", &params, &patch)
            .await
            .expect_err("resourceNames"),
    );
    assert_eq!(other.code, 403);
    assert!(
        other
            .message
            .contains("cannot patch resource \"configmaps\""),
        "{}",
        other.message
    );
    let create = status_of(
        bot_maps
            .create(&PostParams::default(), &config_map("new"))
            .await
            .expect_err("create is not granted"),
    );
    assert!(
        create.message.starts_with("configmaps is forbidden"),
        "{}",
        create.message
    );
    // The Role is in team-a only; across all namespaces the same list is refused at the cluster scope.
    let everywhere = status_of(
        Api::<ConfigMap>::all(as_bot.clone())
            .list(&ListParams::default())
            .await
            .expect_err("a RoleBinding grants nothing cluster-wide"),
    );
    assert!(
        everywhere.message.ends_with("at the cluster scope"),
        "{}",
        everywhere.message
    );
    let elsewhere = status_of(
        Api::<ConfigMap>::namespaced(as_bot.clone(), "team-b")
            .list(&ListParams::default())
            .await
            .expect_err("another namespace"),
    );
    assert!(
        elsewhere.message.ends_with("in the namespace \"team-b\""),
        "{}",
        elsewhere.message
    );
    // Another ServiceAccount of the same namespace is not bound.
    let stranger = sim
        .client_as(&service_account_user(NS, "stranger"))
        .await
        .expect("client");
    assert_eq!(
        status_of(
            Api::<ConfigMap>::namespaced(stranger, NS)
                .get("settings")
                .await
                .expect_err("unbound")
        )
        .code,
        403
    );

    // The request log records each refusal as a 403 for exactly that request.
    let refusals: Vec<(String, String, Option<String>)> = sim
        .request_log()
        .snapshot()
        .into_iter()
        .filter(|r| r.user == bot && r.status == 403)
        .map(|r| (r.verb, r.namespace.unwrap_or_default(), r.name))
        .collect();
    assert_eq!(
        refusals,
        [
            (
                "get".to_string(),
                NS.to_string(),
                Some("settings".to_string())
            ),
            (
                "patch".to_string(),
                NS.to_string(),
                Some("other".to_string())
            ),
            ("create".to_string(), NS.to_string(), None),
            ("list".to_string(), String::new(), None),
            ("list".to_string(), "team-b".to_string(), None),
        ]
    );

    // Removing the binding takes the rights away at once.
    rbac_api(&admin, "RoleBinding", Some(NS))
        .delete("reader", &DeleteParams::default())
        .await
        .expect("binding deleted");
    assert_eq!(
        status_of(bot_maps.get("settings").await.expect_err("unbound again")).code,
        403
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn without_enforcement_every_user_may_do_everything() {
    let sim = start(false).await;
    let as_bot = sim
        .client_as(&service_account_user(NS, "bot"))
        .await
        .expect("client");
    Api::<ConfigMap>::namespaced(as_bot, NS)
        .create(&PostParams::default(), &config_map("settings"))
        .await
        .expect("no RBAC, no refusal");
    sim.shutdown().await;
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(KUBECTL);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} timed out"))
        .expect("kubectl runs")
}

#[tokio::test]
async fn kubectl_prints_the_forbidden_message_and_works_where_granted() {
    if !Path::new(KUBECTL).exists() {
        eprintln!("skipped: kubectl not found at {KUBECTL}");
        return;
    }
    let sim = start(true).await;
    let admin = sim.client().await.expect("admin client");
    Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &config_map("settings"))
        .await
        .expect("created");
    let dir = std::env::temp_dir().join(format!("serin-sim-rbac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("bot");
    let bot = service_account_user(NS, "bot");
    sim.write_kubeconfig_as(&bot, &kubeconfig)
        .expect("kubeconfig");

    let refused = kubectl(&kubeconfig, &["get", "configmaps", "-n", NS]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("Error from server (Forbidden): configmaps is forbidden: User \"{bot}\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"{NS}\"")),
        "{stderr}"
    );

    let can_i = |args: &'static [&'static str]| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let mut full = vec!["auth", "can-i"];
            full.extend_from_slice(args);
            full.extend_from_slice(&["-n", NS]);
            let output = kubectl(&kubeconfig, &full).await;
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        }
    };
    assert_eq!(can_i(&["list", "configmaps"]).await, "no");

    grant_configmap_reads(&admin).await;
    assert_eq!(can_i(&["list", "configmaps"]).await, "yes");
    assert_eq!(can_i(&["patch", "configmaps/settings"]).await, "yes");
    assert_eq!(can_i(&["patch", "configmaps/other"]).await, "no");
    assert_eq!(can_i(&["create", "configmaps"]).await, "no");
    let listed = kubectl(&kubeconfig, &["get", "configmaps", "-n", NS, "-o", "name"]).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "configmap/settings"
    );
    // The admin's kubeconfig (the one the sim writes) keeps every right.
    let deleted = kubectl(
        sim.kubeconfig_path(),
        &["delete", "configmap", "settings", "-n", NS],
    )
    .await;
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    sim.shutdown().await;
}

/// Starts `serin sim` with `args` and waits (bounded) for its kubeconfig; the child is killed on drop.
async fn serin_sim(args: &[&str], kubeconfig: &Path) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["sim", "--port", "0", "--kubeconfig"])
        .arg(kubeconfig)
        .args(args)
        .env_remove("SERIN_SIM_ENFORCE_RBAC")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serin sim starts");
    let appeared = tokio::time::timeout(Duration::from_secs(30), async {
        while !kubeconfig.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(appeared.is_ok(), "serin sim never wrote its kubeconfig");
    child
}

#[tokio::test]
async fn serin_sim_enforces_rbac_only_with_the_flag() {
    if !Path::new(KUBECTL).exists() {
        eprintln!("skipped: kubectl not found at {KUBECTL}");
        return;
    }
    let bot = service_account_user(NS, "bot");
    for (args, enforced) in [(&["--enforce-rbac"][..], true), (&[][..], false)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin_kubeconfig = dir.path().join("admin");
        let mut child = serin_sim(args, &admin_kubeconfig).await;
        let text = std::fs::read_to_string(&admin_kubeconfig).expect("kubeconfig");
        let server = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("server: "))
            .expect("a server line")
            .to_string();
        let bot_kubeconfig = dir.path().join("bot");
        std::fs::write(
            &bot_kubeconfig,
            serin_sim::kubeconfig_yaml_as(&server, &bot),
        )
        .expect("bot kubeconfig");
        let as_bot = kubectl(&bot_kubeconfig, &["get", "namespaces", "-o", "name"]).await;
        let stderr = String::from_utf8_lossy(&as_bot.stderr);
        if enforced {
            assert!(!as_bot.status.success());
            assert!(
                stderr.contains(&format!("namespaces is forbidden: User \"{bot}\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope")),
                "{stderr}"
            );
        } else {
            assert!(as_bot.status.success(), "{stderr}");
        }
        let as_admin = kubectl(&admin_kubeconfig, &["get", "namespaces", "-o", "name"]).await;
        assert!(
            as_admin.status.success(),
            "{}",
            String::from_utf8_lossy(&as_admin.stderr)
        );
        child.kill().await.expect("serin sim stops");
    }
}
