//! The reproductions of what broke the safety promise under ordinary faults, on the real controller against
//! the simulated cluster: a deleted stable ReplicaSet, a "50%" step with one replica, steps changed by a Git
//! re-apply mid-canary, and `spec.replicas` changed through the scale subresource (as an HPA does). Each
//! checks its invariants at every poll, not only at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use serin::crd::{reason, Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use support::*;

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn three_pauses() -> serde_json::Value {
    json!({"steps": [
        {"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 75}, {"pause": {}}
    ]})
}

/// A canary `name` of 4 replicas paused at step 1 of [`three_pauses`] on its second revision: (v1, v2).
async fn paused_at_first_pause(world: &World, name: &str) -> (String, String) {
    world
        .given_services(name, &[name, &format!("{name}-canary")])
        .await;
    world
        .given_rollout(canary_rollout(
            name,
            4,
            &format!("{name}:1"),
            three_pauses(),
        ))
        .await
        .expect("rollout accepted");
    let v1 = world
        .then_eventually(name, "v1 Healthy", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy) && s.stable_hash().is_some_and(|h| s.ready_of(&h) == 4)
        })
        .await
        .stable_hash()
        .unwrap_or_default();
    world.when_image_changes(name, &format!("{name}:2")).await;
    let paused = world
        .then_eventually(name, "paused at step 1", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1)
        })
        .await;
    (v1, paused.canary_hash().unwrap_or_default())
}

/// Polls for `period` (bounded by count too), checking `invariant` at every poll.
async fn hold_for(world: &World, name: &str, period: Duration, mut invariant: impl FnMut(&State)) {
    let end = Instant::now() + period;
    for _ in 0..2_000 {
        if Instant::now() >= end {
            return;
        }
        invariant(&world.state(name).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_stable_replica_set_mid_canary_never_promotes_the_canary() {
    let world = World::start().await;
    let (v1, v2) = paused_at_first_pause(&world, "web").await;
    let replica_sets: Api<ReplicaSet> = Api::namespaced(world.admin.clone(), NS);
    replica_sets
        .delete(&format!("web-{v1}"), &DeleteParams::background())
        .await
        .expect("stable ReplicaSet deleted");

    let not_promoted = |s: &State| {
        assert_eq!(
            s.stable_hash().as_deref(),
            Some(v1.as_str()),
            "promoted:\n{s:#?}"
        );
        assert_ne!(s.phase(), Some(RolloutPhase::Healthy), "{s:#?}");
        assert!(s.step().unwrap_or(0) <= 1, "steps skipped:\n{s:#?}");
    };
    let held = world
        .then_eventually_checking(
            "web",
            "held with StableReplicaSetMissing",
            STEP_TIMEOUT,
            not_promoted,
            |s| {
                s.condition("Progressing")
                    .is_some_and(|(_, why)| why == reason::STABLE_MISSING)
            },
        )
        .await;
    assert_eq!(held.phase(), Some(RolloutPhase::Degraded));
    assert!(
        held.message().contains("promote --full"),
        "{}",
        held.message()
    );
    // Well past the 3 s in which the canary used to be promoted, it still is not.
    hold_for(&world, "web", Duration::from_secs(3), not_promoted).await;
    world
        .expect_event("web", reason::STABLE_MISSING, STEP_TIMEOUT)
        .await;

    // Only a human's full promotion makes the canary stable.
    world.when_command("web", ManualCommand::PromoteFull).await;
    let done = world
        .then_eventually(
            "web",
            "v2 Healthy after promote --full",
            STEP_TIMEOUT,
            |s| s.is(RolloutPhase::Healthy) && s.stable_hash().as_deref() == Some(v2.as_str()),
        )
        .await;
    expect_selectors(&done, &[("web", Some(&v2)), ("web-canary", Some(&v2))]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_percent_step_with_one_replica_keeps_the_stable_serving() {
    let world = World::start().await;
    world.given_services("one", &["one", "one-canary"]).await;
    world
        .given_rollout(canary_rollout(
            "one",
            1,
            "one:1",
            json!({"steps": [{"setWeight": 50}, {"pause": {}}]}),
        ))
        .await
        .expect("rollout accepted");
    let v1 = world
        .then_eventually("one", "v1 Healthy", STEP_TIMEOUT, |s| {
            s.is(RolloutPhase::Healthy) && s.stable_hash().is_some_and(|h| s.ready_of(&h) == 1)
        })
        .await
        .stable_hash()
        .unwrap_or_default();
    world.when_image_changes("one", "one:2").await;
    // Safety rule 11 at every poll: the stable keeps its pod, the canary never carries more than 50%.
    let stable_serves = |s: &State| {
        if s.stable_hash().as_deref() == Some(v1.as_str()) {
            assert_eq!(
                s.replicas_of(&v1),
                1,
                "stable scaled down mid-canary:\n{s:#?}"
            );
            assert!(s.weight() <= 50, "canary carries {}%:\n{s:#?}", s.weight());
        }
    };
    let paused = world
        .then_eventually_checking("one", "paused at 50%", STEP_TIMEOUT, stable_serves, |s| {
            s.is(RolloutPhase::Paused) && s.step() == Some(1)
        })
        .await;
    let v2 = paused.canary_hash().unwrap_or_default();
    assert_eq!(
        (paused.ready_of(&v1), paused.ready_of(&v2)),
        (1, 1),
        "{paused:#?}"
    );
    assert_eq!(paused.weight(), 50);
    hold_for(&world, "one", Duration::from_secs(1), stable_serves).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_changed_by_a_git_reapply_mid_canary_start_again() {
    let world = World::start().await;
    let (v1, v2) = paused_at_first_pause(&world, "git").await;
    let rollouts: Api<Rollout> = Api::namespaced(world.admin.clone(), NS);
    // Git now says: one step of 25%, then promote. An unrelated annotation rides along.
    rollouts
        .patch(
            "git",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {"argocd.argoproj.io/tracking-id": "shop:serin.dev/Rollout:default/git"}},
                "spec": {"strategy": {"canary": {"steps": [{"setWeight": 25}]}}}
            })),
        )
        .await
        .expect("steps re-applied");
    // The stable keeps all its pods through the steps (only the promotion replaces it), and nothing pauses
    // with the stable gone.
    let invariant = |s: &State| {
        let steps = s
            .rollout
            .spec
            .strategy
            .canary
            .as_ref()
            .map_or(0, |c| c.steps.len());
        let in_steps = usize::try_from(s.step().unwrap_or(0)).unwrap_or(0) < steps;
        if s.stable_hash().as_deref() == Some(v1.as_str()) && in_steps {
            assert_eq!(
                s.replicas_of(&v1),
                4,
                "stable shrank before promotion:\n{s:#?}"
            );
        }
        if s.is(RolloutPhase::Paused) {
            let stable = s.stable_hash().unwrap_or_default();
            assert!(
                s.ready_of(&stable) > 0,
                "paused with no stable pod:\n{s:#?}"
            );
        }
    };
    world
        .then_eventually_checking(
            "git",
            "v2 promoted after the new steps",
            STEP_TIMEOUT,
            invariant,
            |s| s.is(RolloutPhase::Healthy) && s.stable_hash().as_deref() == Some(v2.as_str()),
        )
        .await;
    world
        .expect_event("git", reason::STEPS_CHANGED, STEP_TIMEOUT)
        .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_through_the_scale_subresource_mid_canary_resizes_both_sides() {
    let world = World::start().await;
    let (v1, v2) = paused_at_first_pause(&world, "hpa").await;
    let rollouts: Api<Rollout> = Api::namespaced(world.admin.clone(), NS);
    let scale = rollouts.get_scale("hpa").await.expect("scale subresource");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(4));
    let status = scale.status.expect("scale status");
    // An HPA counts every pod the selector matches: the full stable and the canary beside it.
    assert_eq!(status.replicas, 5);
    assert_eq!(status.selector.as_deref(), Some("app=hpa"));

    rollouts
        .patch_scale(
            "hpa",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 8}})),
        )
        .await
        .expect("scaled");
    // 25% beside 8 stable pods: 3 canary pods (27%) is closer than 2 (20%).
    let resized = world
        .then_eventually(
            "hpa",
            "8 stable pods and 3 canary pods, still at step 1",
            STEP_TIMEOUT,
            |s| s.ready_of(&v1) == 8 && s.ready_of(&v2) == 3 && s.step() == Some(1),
        )
        .await;
    assert!(resized.is(RolloutPhase::Paused), "{resized:#?}");
    assert_eq!(resized.stable_hash().as_deref(), Some(v1.as_str()));
    let scale = rollouts.get_scale("hpa").await.expect("scale subresource");
    assert_eq!(scale.status.map(|s| s.replicas), Some(11));
    world.stop().await;
}
