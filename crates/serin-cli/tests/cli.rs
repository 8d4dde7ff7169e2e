//! The `serin` user commands, run as a process (and as the kubectl plugin) against the simulated cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use serin::crd::RolloutPhase;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(program: &Path, args: &[&str], path_prefix: Option<&Path>) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env_remove("KUBECONFIG");
    if let Some(prefix) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{path}", prefix.display()));
    }
    let output = tokio::time::timeout(TIMEOUT, command.output())
        .await
        .expect("command finished in time")
        .expect("command runs");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn serin(world: &World, args: &[&str]) -> Output {
    let kubeconfig = world.sim.kubeconfig_path().display().to_string();
    let mut full = args.to_vec();
    full.extend_from_slice(&["--kubeconfig", kubeconfig.as_str()]);
    run(Path::new(env!("CARGO_BIN_EXE_serin")), &full, None).await
}

/// A canary `web` paused at step 1 (setWeight 25: one canary pod beside the 4 stable ones, 20%) on its second
/// revision; returns (v1, v2) hashes.
async fn paused_canary(world: &World) -> (String, String) {
    world.given_services("web", &["web", "web-canary"]).await;
    let steps =
        json!({"steps": [{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]});
    world
        .given_rollout(canary_rollout("web", 4, "web:1", steps))
        .await
        .expect("rollout accepted");
    let v1 = world
        .then_eventually("web", "v1 Healthy", TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy) && s.stable_hash().is_some_and(|h| s.ready_of(&h) == 4)
        })
        .await
        .stable_hash()
        .unwrap_or_default();
    world.when_image_changes("web", "web:2").await;
    let paused = world
        .then_eventually("web", "paused at step 1", TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1) && s.weight() == 20
        })
        .await;
    (v1, paused.canary_hash().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_steps_revisions_weights_pods_and_events() {
    let world = World::start().await;
    let (v1, v2) = paused_canary(&world).await;
    world
        .expect_event("web", serin::crd::reason::STEP_REACHED, TIMEOUT)
        .await;
    let out = serin(&world, &["status", "web", "-n", NS]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let text = out.stdout;
    for line in [
        "Name:       web\n",
        "Strategy:   Canary\n",
        "Phase:      Paused",
        &format!("Stable:     revision 1 (hash {v1})\n"),
        &format!("Canary:     revision 2 (hash {v2})\n"),
        "Weight:     current 20%, desired 25%\n",
        "  done      0  setWeight 25%\n",
        "  current   1  pause (until promoted)\n",
        "  next      2  setWeight 50%\n",
        "canary  pods 1/1 ready",
        "stable  pods 4/4 ready",
        "Events (last 5):",
        "StepReached",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Stable output: the same state renders the same text.
    let again = serin(&world, &["status", "web", "-n", NS]).await;
    assert_eq!(again.stdout, text);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_moves_a_paused_rollout_and_commands_that_make_no_sense_are_refused() {
    let world = World::start().await;
    paused_canary(&world).await;
    let generation = world.state("web").await.rollout.metadata.generation;

    let out = serin(&world, &["promote", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("promote requested"), "{}", out.stdout);
    let moved = world
        .then_eventually("web", "paused at step 3 after promote", TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(3)
        })
        .await;
    assert_eq!(moved.weight(), 50);
    assert_eq!(
        moved.rollout.metadata.generation, generation,
        "promote must not touch the spec (GitOps would see drift)"
    );

    let out = serin(&world, &["retry", "web"]).await;
    assert_ne!(out.code, Some(0));
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one clear line: {}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("only an aborted rollout can be retried"),
        "{}",
        out.stderr
    );

    let out = serin(&world, &["promote", "nope"]).await;
    assert_ne!(out.code, Some(0));
    assert_eq!(
        out.stderr.trim(),
        "error: rollout nope not found in namespace default",
        "{}",
        out.stderr
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_retry_pause_resume_and_undo_work_from_the_command_line() {
    let world = World::start().await;
    let (v1, v2) = paused_canary(&world).await;

    let out = serin(&world, &["abort", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let aborted = world
        .then_eventually("web", "aborted", TIMEOUT, |s| s.is(RolloutPhase::Aborted))
        .await;
    expect_selectors(&aborted, &[("web", Some(&v1)), ("web-canary", Some(&v1))]);

    let out = serin(&world, &["retry", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    world
        .then_eventually("web", "running again after retry", TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1)
        })
        .await;

    let out = serin(&world, &["pause", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    world
        .then_eventually("web", "user pause recorded", TIMEOUT, |s| {
            s.rollout.status.as_ref().is_some_and(|st| {
                st.pause_conditions
                    .iter()
                    .any(|c| c.reason == serin::crd::reason::PAUSED_BY_USER)
            })
        })
        .await;
    let out = serin(&world, &["resume", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // Full promotion, then undo back to revision 1's template.
    let out = serin(&world, &["promote", "--full", "web"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    world
        .then_eventually("web", "v2 Healthy", TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy) && s.stable_hash().as_deref() == Some(v2.as_str())
        })
        .await;
    let out = serin(&world, &["undo", "web", "--to-revision", "1"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let undone = world.state("web").await;
    let image = undone
        .rollout
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|c| c.image.clone());
    assert_eq!(image.as_deref(), Some("web:1"));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_as_a_kubectl_plugin() {
    let world = World::start().await;
    paused_canary(&world).await;
    let bin = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_serin"),
        bin.path().join("kubectl-serin"),
    )
    .expect("symlink");
    let kubeconfig = world.sim.kubeconfig_path().display().to_string();

    let out = run(
        Path::new("kubectl"),
        &["serin", "status", "web", "--kubeconfig", &kubeconfig],
        Some(bin.path()),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("Name:       web"), "{}", out.stdout);
    assert!(
        out.stdout.contains("current   1  pause (until promoted)"),
        "{}",
        out.stdout
    );

    let out = run(
        Path::new("kubectl"),
        &["serin", "promote", "web", "--kubeconfig", &kubeconfig],
        Some(bin.path()),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    world
        .then_eventually("web", "promoted through the plugin", TIMEOUT, |s| {
            s.step() == Some(3)
        })
        .await;
    world.stop().await;
}

#[tokio::test]
async fn crd_prints_every_custom_resource_definition() {
    let out = run(Path::new(env!("CARGO_BIN_EXE_serin")), &["crd"], None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout.matches("kind: CustomResourceDefinition").count(),
        4
    );
    assert!(out.stdout.contains("name: rollouts.serin.dev"));
}

/// `serin controller` as a process: with `--leader-elect`, two replicas share one Lease, only the holder
/// reconciles, and when it dies the other takes over and carries the rollout on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_processes_elect_one_leader_and_fail_over() {
    let world = World::without_controller().await;
    let kubeconfig = world.sim.kubeconfig_path().display().to_string();
    let spawn = |identity: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_serin"))
            .args([
                "controller",
                "--kubeconfig",
                kubeconfig.as_str(),
                "--metrics-addr",
                "127.0.0.1:0",
                "--leader-elect",
                "--lease-namespace",
                NS,
                "--lease-duration",
                "2s",
                "--lease-renew",
                "1500ms",
                "--lease-retry",
                "200ms",
                "--instance",
                identity,
            ])
            .env_remove("KUBECONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("controller process starts")
    };
    let mut first = spawn("replica-a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = spawn("replica-b");

    world.given_services("web", &["web", "web-canary"]).await;
    let steps =
        json!({"steps": [{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]});
    world
        .given_rollout(canary_rollout("web", 4, "web:1", steps))
        .await
        .expect("rollout accepted");
    world
        .then_eventually("web", "v1 Healthy under the first leader", TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy)
        })
        .await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(world.admin.clone(), NS);
    let holder = || async {
        leases
            .get("serin-controller")
            .await
            .ok()
            .and_then(|lease| lease.spec.and_then(|spec| spec.holder_identity))
    };
    assert_eq!(holder().await.as_deref(), Some("replica-a"));

    // The leader dies; the standby takes the Lease once it expires and carries the rollout on.
    first.kill().await.expect("kill the leader");
    world.when_image_changes("web", "web:2").await;
    world
        .then_eventually(
            "web",
            "the new leader reconciles v2 to its first pause",
            TIMEOUT,
            |s| s.is(RolloutPhase::Paused) && s.step() == Some(1),
        )
        .await;
    assert_eq!(holder().await.as_deref(), Some("replica-b"));
    second.kill().await.expect("kill the second replica");
    world.stop().await;
}

#[tokio::test]
async fn each_command_lists_only_its_own_options() {
    let help = |command: &'static str| async move {
        run(
            Path::new(env!("CARGO_BIN_EXE_serin")),
            &[command, "--help"],
            None,
        )
        .await
    };
    let sim = help("sim").await;
    assert_eq!(sim.code, Some(0), "{}", sim.stderr);
    for foreign in ["--namespace", "--context", "Namespace of the Rollout"] {
        assert!(
            !sim.stdout.contains(foreign),
            "`serin sim --help` lists {foreign}:\n{}",
            sim.stdout
        );
    }
    assert!(sim.stdout.contains("--kubeconfig"), "{}", sim.stdout);
    let crd = help("crd").await;
    assert!(!crd.stdout.contains("--kubeconfig"), "{}", crd.stdout);
    let status = help("status").await;
    for own in ["--namespace", "--context", "--kubeconfig", "--watch"] {
        assert!(
            status.stdout.contains(own),
            "`serin status --help` lacks {own}:\n{}",
            status.stdout
        );
    }
    let controller = help("controller").await;
    assert!(
        controller.stdout.contains("A namespace to watch"),
        "{}",
        controller.stdout
    );
}
