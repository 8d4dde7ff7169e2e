//! End-to-end: the real controller against the simulated cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use serin::crd::{reason, RolloutPhase};
use serin::ops::ManualCommand;
use support::*;

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Brings a fresh Rollout to Healthy on its first template and returns that template's hash.
async fn healthy_first_revision(world: &World, name: &str, replicas: i32) -> String {
    let state = world
        .then_eventually(
            name,
            "first revision Healthy and fully ready",
            STEP_TIMEOUT,
            |s| {
                s.is(RolloutPhase::Healthy)
                    && s.stable_hash().is_some()
                    && s.stable_hash() == s.current_hash()
                    && s.ready_of(s.stable_hash().as_deref().unwrap_or_default()) == replicas
            },
        )
        .await;
    state.stable_hash().unwrap_or_default()
}

/// Tracks, over every observed state of one update, that the canary weight and step only move forward
/// (a new revision or an abort may restart them) and that no hash gets two ReplicaSets.
#[derive(Default)]
struct Monotonic {
    canary: Option<String>,
    highest_weight: i32,
    highest_step: i32,
}

impl Monotonic {
    fn check(&mut self, state: &State) {
        let mut per_hash: BTreeMap<&str, usize> = BTreeMap::new();
        for rs in &state.replica_sets {
            *per_hash.entry(rs.pod_template_hash.as_str()).or_default() += 1;
        }
        assert!(
            per_hash.values().all(|count| *count == 1),
            "duplicate ReplicaSet: {per_hash:?}"
        );
        if state.is(RolloutPhase::Aborted) || !state.observed() {
            return;
        }
        let Some(canary) = state.canary_hash() else {
            return;
        };
        if self.canary.as_deref() != Some(canary.as_str()) {
            *self = Monotonic {
                canary: Some(canary),
                ..Monotonic::default()
            };
        }
        assert!(
            state.weight() >= self.highest_weight,
            "weight went back from {} to {}:\n{state:#?}",
            self.highest_weight,
            state.weight()
        );
        self.highest_weight = state.weight();
        let step = state.step().unwrap_or(0);
        assert!(
            step >= self.highest_step,
            "step went back from {} to {step}",
            self.highest_step
        );
        self.highest_step = step;
    }
}

/// Safety rule 3 without a traffic router: the pods behind the stable Service never drop below what the
/// Rollout needs (maxUnavailable defaults to 0).
fn serving_pods_never_below(replicas: i32) -> impl Fn(&State) {
    move |state: &State| {
        let ready: i32 = state.replica_sets.iter().map(|rs| rs.ready_replicas).sum();
        assert!(
            ready >= replicas,
            "only {ready} ready pods of {replicas}:\n{state:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_goes_step_by_step_to_healthy_and_scales_the_old_version_down() {
    let world = World::start().await;
    world.given_services("web", &["web", "web-canary"]).await;
    let steps = json!({"steps": [
        {"setWeight": 20}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 80}
    ]});
    world
        .given_rollout(canary_rollout("web", 10, "web:1", steps))
        .await
        .expect("rollout accepted");
    let v1 = healthy_first_revision(&world, "web", 10).await;
    let state = world.state("web").await;
    expect_selectors(&state, &[("web", Some(&v1)), ("web-canary", Some(&v1))]);

    world.when_image_changes("web", "web:2").await;
    let mut monotonic = Monotonic::default();
    let floor = serving_pods_never_below(10);
    let mut check = |s: &State| {
        monotonic.check(s);
        floor(s);
    };

    let at_20 = world
        .then_eventually_checking(
            "web",
            "step 1 (pause 2s) at weight 20",
            STEP_TIMEOUT,
            &mut check,
            |s| s.observed() && s.step() == Some(1),
        )
        .await;
    let v2 = at_20.canary_hash().expect("canary revision");
    assert_ne!(v1, v2);
    // Without a router the canary runs beside the full stable: 3 pods beside 10 carry 23%, the closest
    // share to 20% (2 would carry 17%).
    assert_eq!(at_20.weight(), 23);
    assert_eq!(at_20.replicas_of(&v2), 3, "{at_20:#?}");
    assert_eq!(at_20.replicas_of(&v1), 10, "{at_20:#?}");
    expect_selectors(&at_20, &[("web", None), ("web-canary", Some(&v2))]);

    let at_50 = world
        .then_eventually_checking(
            "web",
            "step 3 (pause until promoted) at 50",
            STEP_TIMEOUT,
            &mut check,
            |s| s.observed() && s.step() == Some(3) && s.is(RolloutPhase::Paused),
        )
        .await;
    assert_eq!(at_50.weight(), 50);
    assert_eq!(at_50.replicas_of(&v2), 10, "{at_50:#?}");
    assert_eq!(at_50.replicas_of(&v1), 10, "{at_50:#?}");
    expect_selectors(&at_50, &[("web", None), ("web-canary", Some(&v2))]);

    // An indefinite pause holds until promoted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = world.state("web").await;
    assert_eq!(
        (held.step(), held.phase()),
        (Some(3), Some(RolloutPhase::Paused))
    );

    world.when_command("web", ManualCommand::Promote).await;
    let done = world
        .then_eventually_checking(
            "web",
            "v2 Healthy as stable",
            STEP_TIMEOUT,
            |s| {
                check(s);
            },
            |s| s.is(RolloutPhase::Healthy) && s.stable_hash().as_deref() == Some(v2.as_str()),
        )
        .await;
    expect_selectors(&done, &[("web", Some(&v2)), ("web-canary", Some(&v2))]);
    assert_eq!(done.replicas_of(&v2), 10);
    world
        .then_eventually("web", "v1 scaled down", STEP_TIMEOUT, |s| {
            s.replicas_of(&v1) == 0
        })
        .await;
    world
        .expect_event("web", reason::STEP_REACHED, STEP_TIMEOUT)
        .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_previews_then_switches_and_keeps_the_old_version_for_the_delay() {
    let world = World::start().await;
    world
        .given_services("shop", &["shop", "shop-preview"])
        .await;
    world
        .given_rollout(blue_green_rollout(
            "shop",
            3,
            "shop:1",
            json!({"autoPromotionEnabled": false, "scaleDownDelaySeconds": 2}),
        ))
        .await
        .expect("rollout accepted");
    let v1 = healthy_first_revision(&world, "shop", 3).await;
    expect_selectors(&world.state("shop").await, &[("shop", Some(&v1))]);

    world.when_image_changes("shop", "shop:2").await;
    let preview = world
        .then_eventually(
            "shop",
            "preview ready and waiting for promotion",
            STEP_TIMEOUT,
            |s| {
                s.is(RolloutPhase::Paused)
                    && s.canary_hash()
                        .is_some_and(|h| h != v1 && s.ready_of(&h) == 3)
            },
        )
        .await;
    let v2 = preview.canary_hash().unwrap_or_default();
    expect_selectors(
        &preview,
        &[("shop", Some(&v1)), ("shop-preview", Some(&v2))],
    );
    assert_eq!(preview.replicas_of(&v1), 3);

    world.when_command("shop", ManualCommand::Promote).await;
    let switched = world
        .then_eventually("shop", "active switched to v2", STEP_TIMEOUT, |s| {
            s.selector_hash("shop").as_deref() == Some(v2.as_str())
        })
        .await;
    assert_eq!(
        switched.replicas_of(&v1),
        3,
        "v1 is kept for the scale-down delay:\n{switched:#?}"
    );
    let done = world
        .then_eventually(
            "shop",
            "Healthy on v2 and v1 scaled down",
            STEP_TIMEOUT,
            |s| s.is(RolloutPhase::Healthy) && s.replicas_of(&v1) == 0,
        )
        .await;
    assert_eq!(done.stable_hash().as_deref(), Some(v2.as_str()));
    expect_selectors(&done, &[("shop", Some(&v2))]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_puts_everything_back_on_stable_and_retry_starts_the_steps_again() {
    let world = World::start().await;
    world.given_services("cart", &["cart", "cart-canary"]).await;
    let canary =
        json!({"steps": [{"setWeight": 40}, {"pause": {}}], "abortScaleDownDelaySeconds": 1});
    world
        .given_rollout(canary_rollout("cart", 5, "cart:1", canary))
        .await
        .expect("rollout accepted");
    let v1 = healthy_first_revision(&world, "cart", 5).await;
    world.when_image_changes("cart", "cart:2").await;
    let paused = world
        .then_eventually("cart", "paused at weight 40", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1)
        })
        .await;
    let v2 = paused.canary_hash().expect("canary revision");
    assert_eq!(paused.weight(), 38, "3 canary pods beside 5");

    world.when_command("cart", ManualCommand::Abort).await;
    let aborted = world
        .then_eventually(
            "cart",
            "aborted with stable at full size",
            STEP_TIMEOUT,
            |s| s.is(RolloutPhase::Aborted) && s.replicas_of(&v1) == 5 && s.ready_of(&v1) == 5,
        )
        .await;
    assert_eq!(aborted.weight(), 0, "{aborted:#?}");
    expect_selectors(&aborted, &[("cart", Some(&v1)), ("cart-canary", Some(&v1))]);
    assert!(!aborted.message().is_empty(), "an aborted rollout says why");
    world
        .then_eventually(
            "cart",
            "canary scaled down after the abort delay",
            STEP_TIMEOUT,
            |s| s.replicas_of(&v2) == 0,
        )
        .await;
    world
        .expect_event("cart", reason::ABORTED, STEP_TIMEOUT)
        .await;

    world.when_command("cart", ManualCommand::Retry).await;
    let retried = world
        .then_eventually(
            "cart",
            "steps carried out again after retry",
            STEP_TIMEOUT,
            |s| s.is(RolloutPhase::Paused) && s.step() == Some(1) && s.replicas_of(&v2) > 0,
        )
        .await;
    assert_eq!(retried.weight(), 38);
    expect_selectors(&retried, &[("cart", None), ("cart-canary", Some(&v2))]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_pods_that_never_get_ready_hit_the_deadline_and_never_shrink_stable() {
    let world = World::start().await;
    world.given_services("api", &["api", "api-canary"]).await;
    let mut manifest = canary_rollout(
        "api",
        4,
        "api:1",
        json!({"steps": [{"setWeight": 50}, {"pause": {}}]}),
    );
    manifest["spec"]["progressDeadlineSeconds"] = json!(2);
    world
        .given_rollout(manifest)
        .await
        .expect("rollout accepted");
    let v1 = healthy_first_revision(&world, "api", 4).await;

    world
        .when_template_changes(
            "api",
            template("api", "api:2", json!({"sim.serin.dev/never-ready": "true"})),
        )
        .await;
    let stable_untouched = |s: &State| {
        assert_eq!(s.replicas_of(&v1), 4, "stable was scaled down:\n{s:#?}");
    };
    let stuck = world
        .then_eventually_checking(
            "api",
            "progress deadline exceeded",
            STEP_TIMEOUT,
            stable_untouched,
            |s| {
                s.rollout.status.as_ref().is_some_and(|status| {
                    status
                        .conditions
                        .iter()
                        .any(|c| c.reason == reason::PROGRESS_DEADLINE_EXCEEDED)
                })
            },
        )
        .await;
    assert_ne!(stuck.phase(), Some(RolloutPhase::Healthy));
    world
        .expect_event("api", reason::PROGRESS_DEADLINE_EXCEEDED, STEP_TIMEOUT)
        .await;

    world.when_command("api", ManualCommand::Abort).await;
    let aborted = world
        .then_eventually_checking("api", "aborted", STEP_TIMEOUT, stable_untouched, |s| {
            s.is(RolloutPhase::Aborted)
        })
        .await;
    expect_selectors(&aborted, &[("api", Some(&v1)), ("api-canary", Some(&v1))]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_doubled_controller_resumes_without_duplicates_or_regression() {
    let mut world = World::start().await;
    world.given_services("pay", &["pay", "pay-canary"]).await;
    let canary =
        json!({"steps": [{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}, {"pause": {}}]});
    world
        .given_rollout(canary_rollout("pay", 5, "pay:1", canary))
        .await
        .expect("rollout accepted");
    healthy_first_revision(&world, "pay", 5).await;
    world.when_image_changes("pay", "pay:2").await;
    let mut monotonic = Monotonic::default();
    world
        .then_eventually_checking(
            "pay",
            "paused at step 1 with weight 17 (1 canary pod beside 5)",
            STEP_TIMEOUT,
            |s| monotonic.check(s),
            |s| s.is(RolloutPhase::Paused) && s.step() == Some(1) && s.weight() == 17,
        )
        .await;

    // Killed mid-rollout, then started again twice by mistake.
    world.kill_controllers();
    world.start_controller().await;
    world.start_controller().await;
    // Resumed from status: still waiting at the same step, nothing redone or undone.
    for _ in 0..20 {
        let resumed = world.state("pay").await;
        monotonic.check(&resumed);
        assert_eq!(
            (resumed.step(), resumed.weight()),
            (Some(1), 17),
            "{resumed:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let resumed = world.state("pay").await;
    assert_eq!(resumed.replica_sets.len(), 2, "{resumed:#?}");

    world.when_command("pay", ManualCommand::Promote).await;
    let next = world
        .then_eventually_checking(
            "pay",
            "paused at step 3",
            STEP_TIMEOUT,
            |s| monotonic.check(s),
            |s| s.is(RolloutPhase::Paused) && s.step() == Some(3),
        )
        .await;
    // 60% beside 5 stable pods: at most 5 canary pods (maxSurge unset), the closest share is 50%.
    assert_eq!(next.weight(), 50);
    assert_eq!(next.replica_sets.len(), 2, "{next:#?}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_rollout_is_left_alone_and_status_writes_trigger_nothing() {
    let world = World::start().await;
    world
        .given_services("quiet", &["quiet", "quiet-canary"])
        .await;
    world
        .given_rollout(canary_rollout(
            "quiet",
            2,
            "quiet:1",
            json!({"steps": [{"setWeight": 50}]}),
        ))
        .await
        .expect("rollout accepted");
    healthy_first_revision(&world, "quiet", 2).await;

    // Let the last writes and their watch events settle.
    let mut previous = usize::MAX;
    for _ in 0..40 {
        let writes = world.controller_writes().len();
        if writes == previous {
            break;
        }
        previous = writes;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    world.sim.request_log().clear();
    let reconciles = world.controller().metrics().total_reconciles();

    // The rollout's status changes (as the controller's own status writes do): no reconcile follows.
    let rollouts: kube::Api<serin::crd::Rollout> = kube::Api::namespaced(world.admin.clone(), NS);
    rollouts
        .patch_status(
            "quiet",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"readyReplicas": 2}})),
        )
        .await
        .expect("status patched");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        world.controller().metrics().total_reconciles(),
        reconciles,
        "a status-only change triggered a reconcile"
    );
    assert!(
        world.controller_writes().is_empty(),
        "writes with nothing to do: {:#?}",
        world.controller_writes()
    );

    // A manual command, which also lives in the status, does trigger one.
    world.when_command("quiet", ManualCommand::Pause).await;
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while world.controller().metrics().total_reconciles() == reconciles {
        assert!(
            std::time::Instant::now() < deadline,
            "a command did not trigger a reconcile"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_the_schema_can_judge_are_rejected_by_the_api_server() {
    let world = World::without_controller().await;
    let base = canary_rollout("bad", 1, "bad:1", json!({"steps": [{"setWeight": 10}]}));
    let mut cases = Vec::new();

    let mut both = base.clone();
    both["spec"]["strategy"]["blueGreen"] = json!({"activeService": "bad-active"});
    cases.push(("both strategies", both));
    let mut none = base.clone();
    none["spec"]["strategy"] = json!({});
    cases.push(("no strategy", none));
    let mut heavy = base.clone();
    heavy["spec"]["strategy"]["canary"]["steps"] = json!([{"setWeight": 150}]);
    cases.push(("weight 150", heavy));
    let mut negative = base.clone();
    negative["spec"]["strategy"]["canary"]["steps"] = json!([{"pause": {"duration": -5}}]);
    cases.push(("negative pause", negative));
    let mut negative_text = base.clone();
    negative_text["spec"]["strategy"]["canary"]["steps"] = json!([{"pause": {"duration": "-5s"}}]);
    cases.push(("negative pause as text", negative_text));
    let mut same = base.clone();
    same["spec"]["strategy"]["canary"]["canaryService"] = json!("bad");
    cases.push(("stable == canary Service", same));

    let mut accepted = Vec::new();
    for (index, (what, mut manifest)) in cases.into_iter().enumerate() {
        manifest["metadata"]["name"] = json!(format!("bad-{index}"));
        match world.given_raw_rollout(manifest).await {
            Err(kube::Error::Api(status)) if status.code == 422 => {}
            other => accepted.push(format!("{what}: expected 422 Invalid, got {other:?}")),
        }
    }
    assert!(accepted.is_empty(), "{accepted:#?}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_only_the_controller_can_judge_get_invalid_spec_and_change_nothing() {
    let world = World::start().await;
    world.given_services("lonely", &["lonely"]).await;
    world
        .given_rollout(canary_rollout("lonely", 2, "lonely:1", json!({})))
        .await
        .expect("accepted by the schema");
    let mut mismatched = canary_rollout("odd", 2, "odd:1", json!({}));
    mismatched["spec"]["selector"] = json!({"matchLabels": {"app": "something-else"}});
    world.given_services("odd", &["odd", "odd-canary"]).await;
    world
        .given_rollout(mismatched)
        .await
        .expect("accepted by the schema");

    for (name, field) in [("lonely", "canaryService"), ("odd", "selector")] {
        let state = world
            .then_eventually(name, "InvalidSpec condition", STEP_TIMEOUT, |s| {
                s.condition(serin::crd::condition::INVALID_SPEC)
                    .is_some_and(|(status, _)| status == "True")
            })
            .await;
        assert!(
            state.message().contains(field),
            "message names the field {field}: {:?}",
            state.message()
        );
        assert!(state.replica_sets.is_empty(), "nothing created for {name}");
        world
            .expect_event(name, reason::INVALID_SPEC, STEP_TIMEOUT)
            .await;
    }
    let writes: Vec<_> = world
        .controller_object_writes()
        .into_iter()
        .filter(|r| r.resource != "rollouts")
        .collect();
    assert!(
        writes.is_empty(),
        "an invalid spec changed the cluster: {writes:#?}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_putting_selectors_back_fails_on_abort_nothing_after_it_happens() {
    let world = World::start().await;
    world.given_services("ord", &["ord", "ord-canary"]).await;
    let canary =
        json!({"steps": [{"setWeight": 50}, {"pause": {}}], "abortScaleDownDelaySeconds": 0});
    world
        .given_rollout(canary_rollout("ord", 4, "ord:1", canary))
        .await
        .expect("rollout accepted");
    let v1 = healthy_first_revision(&world, "ord", 4).await;
    world.when_image_changes("ord", "ord:2").await;
    let paused = world
        .then_eventually("ord", "paused at weight 50", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1) && s.weight() == 50
        })
        .await;
    let v2 = paused.canary_hash().expect("canary revision");

    // Every Service write fails: the abort cannot move traffic back, so it must not go further.
    world
        .sim
        .faults()
        .fail_next("patch", "services", 10_000, 500);
    world.when_command("ord", ManualCommand::Abort).await;
    world
        .expect_event("ord", "SetServiceSelectorFailed", STEP_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = world.state("ord").await;
    assert_eq!(
        held.replicas_of(&v2),
        4,
        "canary scaled down before traffic left it:\n{held:#?}"
    );
    expect_selectors(&held, &[("ord", None), ("ord-canary", Some(&v2))]);
    assert_ne!(
        held.phase(),
        Some(RolloutPhase::Aborted),
        "reported Aborted without doing it"
    );

    world.sim.faults().clear();
    let aborted = world
        .then_eventually("ord", "aborted once writes work again", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Aborted) && s.replicas_of(&v2) == 0
        })
        .await;
    expect_selectors(&aborted, &[("ord", Some(&v1)), ("ord-canary", Some(&v1))]);
    world.stop().await;
}
