//! The simulated cluster through the real kubectl: apply/get/watch/delete of CRDs and custom resources,
//! bundles, server-side apply, every patch type, scale, and the `serin sim` binary itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serin_sim::{FaultRule, SimCluster, SimConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const KUBECTL: &str = "/usr/bin/kubectl";
const WAIT: Duration = Duration::from_secs(30);

fn kubectl_available() -> bool {
    if Path::new(KUBECTL).exists() {
        return true;
    }
    eprintln!("SKIPPED: kubectl not found at {KUBECTL}; install kubectl to run the kubectl tests");
    false
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Outcome {
    let mut command = Command::new(KUBECTL);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} timed out"))
        .expect("kubectl runs");
    Outcome {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let outcome = kubectl(kubeconfig, args).await;
    assert!(
        outcome.success,
        "kubectl {args:?} failed: {}{}",
        outcome.stdout, outcome.stderr
    );
    outcome.stdout
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GADGET_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
              color: {type: string}
              replicas: {type: integer}
          status:
            type: object
            properties:
              replicas: {type: integer}
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Color, type: string, jsonPath: .spec.color}
"#;

fn gadget(color: &str) -> String {
    format!("apiVersion: example.com/v1\nkind: Gadget\nmetadata: {{name: g1}}\nspec: {{size: 1, color: {color}, replicas: 1}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_and_custom_resource_lifecycle_through_kubectl() {
    if !kubectl_available() {
        return;
    }
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    let kubeconfig = sim.kubeconfig_path().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let crd = write(dir.path(), "crd.yaml", GADGET_CRD);
    let crd_arg = crd.to_str().unwrap();
    assert!(kubectl_ok(&kubeconfig, &["apply", "-f", crd_arg])
        .await
        .contains("created"));
    kubectl_ok(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=established",
            "crd/gadgets.example.com",
            "--timeout=20s",
        ],
    )
    .await;

    let blue = write(dir.path(), "blue.yaml", &gadget("blue"));
    kubectl_ok(&kubeconfig, &["apply", "-f", blue.to_str().unwrap()]).await;
    let yaml = kubectl_ok(&kubeconfig, &["get", "gadget", "g1", "-o", "yaml"]).await;
    assert!(
        yaml.contains("color: blue") && yaml.contains("generation: 1"),
        "{yaml}"
    );

    let printed = kubectl_ok(&kubeconfig, &["get", "gadgets"]).await;
    let header: Vec<&str> = printed
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        vec!["NAME", "COLOR"],
        "server-side printing uses additionalPrinterColumns: {printed}"
    );
    assert!(
        printed
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .eq(["g1", "blue"]),
        "{printed}"
    );

    let mut watch = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "gd", "-w", "-o", "jsonpath={.spec.color}{\"\\n\"}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("blue"));

    let green = write(dir.path(), "green.yaml", &gadget("green"));
    assert!(
        kubectl_ok(&kubeconfig, &["apply", "-f", green.to_str().unwrap()])
            .await
            .contains("configured")
    );
    let changed = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.as_deref(), Some("green"), "get -w shows the change");
    watch.kill().await.unwrap();

    let yaml = kubectl_ok(&kubeconfig, &["get", "gadget", "g1", "-o", "yaml"]).await;
    assert!(
        yaml.contains("color: green") && yaml.contains("generation: 2"),
        "{yaml}"
    );
    kubectl_ok(&kubeconfig, &["delete", "gadget", "g1"]).await;
    let missing = kubectl(&kubeconfig, &["get", "gadget", "g1"]).await;
    assert!(
        !missing.success && missing.stderr.contains("NotFound"),
        "{}",
        missing.stderr
    );

    let patches = sim.request_log().matching("patch", "gadgets");
    assert!(
        patches
            .iter()
            .any(|r| r.patch_content_type.as_deref() == Some("application/merge-patch+json")),
        "{patches:?}"
    );
    sim.shutdown().await;
}

const BUNDLE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {a: "1"}
---
apiVersion: v1
kind: Secret
metadata: {name: web-secret}
stringData: {password: hunter2}
"#;

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1"}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_server_side_apply_patches_and_scale_through_kubectl() {
    if !kubectl_available() {
        return;
    }
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    let kubeconfig = sim.kubeconfig_path().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let bundle = write(dir.path(), "bundle.yaml", BUNDLE);
    let bundle_arg = bundle.to_str().unwrap();
    let first = kubectl_ok(&kubeconfig, &["apply", "-f", bundle_arg]).await;
    assert_eq!(first.matches("created").count(), 3, "{first}");
    let second = kubectl_ok(&kubeconfig, &["apply", "-f", bundle_arg]).await;
    // Like a real server: Secret stringData is folded into data, so kubectl re-sends it ("configured").
    assert_eq!(second.matches("unchanged").count(), 2, "{second}");
    let password = kubectl_ok(
        &kubeconfig,
        &[
            "get",
            "secret",
            "web-secret",
            "-o",
            "jsonpath={.data.password}",
        ],
    )
    .await;
    assert_eq!(password, "aHVudGVyMg==");

    let server_side = kubectl_ok(&kubeconfig, &["apply", "--server-side", "-f", bundle_arg]).await;
    assert_eq!(
        server_side.matches("serverside-applied").count(),
        3,
        "{server_side}"
    );
    assert!(sim
        .request_log()
        .matching("patch", "configmaps")
        .iter()
        .any(|r| r.patch_content_type.as_deref() == Some("application/apply-patch+yaml")));

    kubectl_ok(
        &kubeconfig,
        &[
            "patch",
            "configmap",
            "web-config",
            "--type=merge",
            "-p",
            r#"{"data":{"b":"2"}}"#,
        ],
    )
    .await;
    kubectl_ok(
        &kubeconfig,
        &[
            "patch",
            "configmap",
            "web-config",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/data/c","value":"3"}]"#,
        ],
    )
    .await;
    kubectl_ok(
        &kubeconfig,
        &[
            "patch",
            "configmap",
            "web-config",
            "--type=strategic",
            "-p",
            r#"{"data":{"d":"4"}}"#,
        ],
    )
    .await;
    let data = kubectl_ok(
        &kubeconfig,
        &["get", "configmap", "web-config", "-o", "jsonpath={.data}"],
    )
    .await;
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"a": "1", "b": "2", "c": "3", "d": "4"})
    );

    let crd = write(dir.path(), "crd.yaml", GADGET_CRD);
    kubectl_ok(&kubeconfig, &["apply", "-f", crd.to_str().unwrap()]).await;
    let blue = write(dir.path(), "blue.yaml", &gadget("blue"));
    kubectl_ok(&kubeconfig, &["apply", "-f", blue.to_str().unwrap()]).await;
    let refused = kubectl(
        &kubeconfig,
        &[
            "patch",
            "gadget",
            "g1",
            "--type=strategic",
            "-p",
            r#"{"spec":{"size":2}}"#,
        ],
    )
    .await;
    assert!(
        !refused.success && refused.stderr.contains("not supported"),
        "{}",
        refused.stderr
    );
    kubectl_ok(&kubeconfig, &["scale", "gadget", "g1", "--replicas=3"]).await;
    let replicas = kubectl_ok(
        &kubeconfig,
        &["get", "gadget", "g1", "-o", "jsonpath={.spec.replicas}"],
    )
    .await;
    assert_eq!(replicas, "3");

    let deployment = write(dir.path(), "deployment.yaml", DEPLOYMENT);
    kubectl_ok(&kubeconfig, &["apply", "-f", deployment.to_str().unwrap()]).await;
    kubectl_ok(&kubeconfig, &["scale", "deployment", "web", "--replicas=4"]).await;
    let replicas = kubectl_ok(
        &kubeconfig,
        &[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}",
        ],
    )
    .await;
    assert_eq!(replicas, "4");
    assert!(sim
        .request_log()
        .matching("patch", "deployments")
        .iter()
        .any(|r| r.subresource.as_deref() == Some("scale")));

    let deleted = kubectl_ok(&kubeconfig, &["delete", "-f", bundle_arg]).await;
    assert_eq!(deleted.matches("deleted").count(), 3, "{deleted}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serin_sim_binary_serves_kubectl() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["sim", "--port", "0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let appeared = tokio::time::timeout(WAIT, async {
        while !kubeconfig.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        appeared.is_ok(),
        "serin sim never wrote {}",
        kubeconfig.display()
    );
    let namespaces = kubectl_ok(&kubeconfig, &["get", "ns"]).await;
    assert!(
        namespaces.contains("default") && namespaces.contains("kube-system"),
        "{namespaces}"
    );
    let (code, _) = admin_call(&server_of(&kubeconfig), "GET", "faults", None).await;
    assert_eq!(code, 404, "no admin endpoint without --admin");
    child.kill().await.unwrap();
}

/// The API server URL a kubeconfig written by the sim points at.
fn server_of(kubeconfig: &Path) -> String {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    text.lines()
        .find_map(|line| line.trim().strip_prefix("server: "))
        .unwrap()
        .to_string()
}

/// A plain HTTP call to the sim's admin endpoint.
async fn admin_call(
    server: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{server}/sim/{path}"),
    );
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    let body =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(serde_json::Value::Null);
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_as_a_user_prints_the_error_injected_for_that_user() {
    if !kubectl_available() {
        return;
    }
    let sim = SimCluster::start(SimConfig::api_only()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let as_admin = sim.kubeconfig_path().to_path_buf();
    let as_alice = dir.path().join("alice.kubeconfig");
    sim.write_kubeconfig_as("alice", &as_alice).unwrap();
    let manifest = write(
        dir.path(),
        "config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web-config}\ndata: {a: \"1\"}\n",
    );
    kubectl_ok(&as_admin, &["apply", "-f", manifest.to_str().unwrap()]).await;
    assert!(
        sim.request_log()
            .writes_by("admin")
            .iter()
            .any(|r| r.resource == "configmaps"),
        "kubectl's requests carry the kubeconfig's user"
    );
    sim.faults()
        .add_rule(
            FaultRule::fail("get", "configmaps", 500)
                .name("web-config")
                .user("alice"),
        )
        .unwrap();
    let refused = kubectl(&as_alice, &["get", "configmap", "web-config"]).await;
    assert!(!refused.success);
    assert!(
        refused
            .stderr
            .contains("Error from server (InternalError): Internal error occurred: injected fault"),
        "{}",
        refused.stderr
    );
    let failed = sim.request_log().filter(|r| r.status == 500);
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].user.as_str(), failed[0].name.as_deref()),
        ("alice", Some("web-config"))
    );
    // The same request as another user, or alice's next one, is served.
    kubectl_ok(&as_admin, &["get", "configmap", "web-config"]).await;
    sim.faults()
        .add_rule(
            FaultRule::fail("get", "configmaps", 500)
                .name("web-config")
                .user("alice"),
        )
        .unwrap();
    kubectl_ok(&as_admin, &["get", "configmap", "web-config"]).await;
    assert_eq!(sim.faults().pending_rules().len(), 1, "admin did not match");
    assert!(
        !kubectl(&as_alice, &["get", "configmap", "web-config"])
            .await
            .success
    );
    kubectl_ok(&as_alice, &["get", "configmap", "web-config"]).await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serin_sim_with_admin_lets_kubectl_tests_inject_errors() {
    if !kubectl_available() {
        return;
    }
    // The flag and its environment twin.
    for (args, env) in [(vec!["--admin"], None), (vec![], Some("true"))] {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let mut command = Command::new(env!("CARGO_BIN_EXE_serin"));
        command
            .args(["sim", "--port", "0", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(&args)
            .env_remove("SERIN_SIM_ADMIN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(value) = env {
            command.env("SERIN_SIM_ADMIN", value);
        }
        let mut child = command.spawn().unwrap();
        let appeared = tokio::time::timeout(WAIT, async {
            while !kubeconfig.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(appeared.is_ok(), "serin sim never wrote its kubeconfig");
        let server = server_of(&kubeconfig);
        let (code, added) = admin_call(
            &server,
            "POST",
            "faults",
            Some(serde_json::json!({"verb": "get", "resource": "namespaces", "name": "default", "code": 500})),
        )
        .await;
        assert_eq!(code, 200, "{args:?} {env:?}: {added}");
        let refused = kubectl(&kubeconfig, &["get", "namespace", "default"]).await;
        assert!(!refused.success);
        assert!(
            refused.stderr.contains(
                "Error from server (InternalError): Internal error occurred: injected fault"
            ),
            "{}",
            refused.stderr
        );
        let (_, listing) = admin_call(&server, "GET", "faults", None).await;
        assert_eq!(
            listing["rules"],
            serde_json::json!([]),
            "the rule was used up"
        );
        kubectl_ok(&kubeconfig, &["get", "namespace", "default"]).await;
        let (code, refused) = admin_call(
            &server,
            "POST",
            "faults",
            Some(serde_json::json!({"verb": "get", "resource": "namespace", "code": 99})),
        )
        .await;
        assert_eq!(code, 400);
        assert!(
            refused["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("code:"),
            "{refused}"
        );
        child.kill().await.unwrap();
    }
}
