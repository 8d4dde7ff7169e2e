//! When a planned status is written: at once when anything a user, a GitOps health check or the next plan
//! acts on changed; pod counts alone (which move each time a pod turns ready) at most once per interval,
//! or at once when they reach a resting point.
//!
//! The planner recomputes the pod counts, the message that quotes them and `lastProgressAt` on every
//! reconcile (and, for a canary without a traffic router, the weight, which is the share of ready pods).
//! Writing each of those changes would cost a status write per pod turning ready, several per canary step.
//! Phase, step, revisions, a router's weights, conditions, pauses, analysis and commands are what
//! decisions and health checks read: a change to any of those is written at once, carrying the current
//! counts with it. So are counts that reached a resting point (every pod the ReplicaSets ask for exists
//! and is available, nothing being resized), which is what an HPA or a user waiting on the counts reads.
//! Counts in between wait until the status written last is `PROGRESS_WRITE_INTERVAL` old (measured by its
//! `lastProgressAt`; a tenth of the progress deadline when that is shorter), so they are at most that
//! stale, and the progress deadline, which counts from `lastProgressAt`, fires at most that late.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{Rollout, RolloutStatus};
use crate::strategy::status::DEFAULT_PROGRESS_DEADLINE_SECS;
use crate::strategy::{Action, Observed};

/// The longest a change confined to pod counts waits before it is written.
pub const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(5);

/// The share of a Rollout's progress deadline a change confined to pod counts may wait, so a short
/// deadline is not overshot by much more than that share.
const DEADLINE_SHARE: u32 = 10;

/// How long a change confined to pod counts may wait for this Rollout: `PROGRESS_WRITE_INTERVAL`, or a
/// tenth of its progress deadline when that is shorter.
pub fn progress_write_interval(rollout: &Rollout) -> Duration {
    let deadline = rollout
        .spec
        .progress_deadline_seconds
        .map(i64::from)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECS)
        .max(0);
    let deadline = Duration::from_secs(u64::try_from(deadline).unwrap_or(0));
    PROGRESS_WRITE_INTERVAL.min(deadline / DEADLINE_SHARE)
}

/// What to do with a planned status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// The status in the cluster is already the planned one.
    Unchanged,
    /// Write it now.
    Now,
    /// Only pod counts moved: write them after this wait (a later reconcile may carry them sooner).
    Later(Duration),
}

/// Whether the planned status differs from the current one at all.
pub fn status_differs(current: Option<&RolloutStatus>, planned: &RolloutStatus) -> bool {
    match current {
        Some(current) => current != planned,
        None => planned != &RolloutStatus::default(),
    }
}

/// The top-level status fields that differ, by their API names (for debug logs).
pub fn changed_fields(current: Option<&RolloutStatus>, planned: &RolloutStatus) -> Vec<String> {
    let as_map = |status: Option<&RolloutStatus>| match status.map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Object(map))) => map,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (as_map(current), as_map(Some(planned)));
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The status without what moves as pods turn ready: counts, the messages that quote them, the progress
/// stamp (and the paused seconds it resets).
fn without_progress(status: &RolloutStatus) -> RolloutStatus {
    let mut stripped = status.clone();
    stripped.replicas = None;
    stripped.updated_replicas = None;
    stripped.ready_replicas = None;
    stripped.available_replicas = None;
    stripped.message = None;
    stripped.last_progress_at = None;
    stripped.paused_seconds_in_step = None;
    for condition in &mut stripped.conditions {
        condition.message.clear();
    }
    stripped
}

/// What, besides the two statuses, decides when a status is written.
#[derive(Clone, Copy, Debug)]
pub struct WriteContext {
    pub now: Timestamp,
    /// How long a change confined to pod counts may wait (see [`progress_write_interval`]).
    pub interval: Duration,
    /// The plan records events, which describe a transition the status must show when they are read.
    pub announces: bool,
    /// Every pod the ReplicaSets ask for exists and is available, and the plan resizes nothing: the counts
    /// reached a resting point (what an HPA or a user waiting for the rollout reads), written at once.
    pub pods_at_rest: bool,
    /// A canary without a traffic router: its weight is the share of ready pods, a pod count too.
    pub weight_follows_pods: bool,
}

/// When to write `planned` over `current`.
pub fn status_write(
    current: Option<&RolloutStatus>,
    planned: &RolloutStatus,
    context: &WriteContext,
) -> StatusWrite {
    if !status_differs(current, planned) {
        return StatusWrite::Unchanged;
    }
    let Some(current) = current else {
        return StatusWrite::Now;
    };
    let decisions = |status: &RolloutStatus| {
        let mut stripped = without_progress(status);
        if context.weight_follows_pods {
            stripped.current_weight = None;
        }
        stripped
    };
    if context.announces || context.pods_at_rest || decisions(current) != decisions(planned) {
        return StatusWrite::Now;
    }
    let Some(written) = current.last_progress_at.as_ref() else {
        return StatusWrite::Now;
    };
    let due = written.0.checked_add(context.interval).unwrap_or(written.0);
    if context.now >= due {
        return StatusWrite::Now;
    }
    StatusWrite::Later(
        context
            .now
            .duration_until(due)
            .unsigned_abs()
            .min(context.interval),
    )
}

/// Whether every live ReplicaSet has exactly the pods its spec asks for, all available and reported for
/// its current spec, and `actions` resize, create and delete none of them.
pub fn pods_at_rest(observed: &Observed, actions: &[Action]) -> bool {
    let resizing = actions.iter().any(|action| {
        matches!(
            action,
            Action::CreateReplicaSet { .. }
                | Action::ScaleReplicaSet { .. }
                | Action::DeleteReplicaSet { .. }
        )
    });
    !resizing
        && observed
            .replica_sets
            .iter()
            .filter(|rs| !rs.deleting)
            .all(|rs| {
                rs.status_current
                    && rs.replicas == rs.spec_replicas
                    && rs.ready_replicas == rs.spec_replicas
                    && rs.available_replicas == rs.spec_replicas
            })
}

/// A canary without a traffic router, whose weight is the share of its ready pods.
pub fn weight_follows_pods(rollout: &Rollout) -> bool {
    rollout
        .spec
        .strategy
        .canary
        .as_ref()
        .is_some_and(|canary| canary.traffic_routing.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::RevisionRef;
    use crate::crd::RolloutPhase;
    use crate::strategy::ObservedReplicaSet;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const FIVE: Duration = Duration::from_secs(5);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("valid time")
    }

    fn context(second: i64) -> WriteContext {
        WriteContext {
            now: at(second),
            interval: FIVE,
            announces: false,
            pods_at_rest: false,
            weight_follows_pods: false,
        }
    }

    fn written(second: i64) -> RolloutStatus {
        RolloutStatus {
            observed_generation: Some(2),
            phase: Some(RolloutPhase::Progressing),
            message: Some("canary 0/2 available".into()),
            current_step_index: Some(1),
            canary_revision: Some(RevisionRef {
                pod_template_hash: "h2".into(),
                revision: 2,
            }),
            replicas: Some(5),
            ready_replicas: Some(4),
            available_replicas: Some(4),
            updated_replicas: Some(1),
            last_progress_at: Some(Time(at(second))),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "NotReady".into(),
                message: "canary 0/2 available".into(),
                observed_generation: Some(2),
                last_transition_time: Time(at(0)),
            }],
            ..Default::default()
        }
    }

    /// The same status after one more canary pod turned ready, as the planner stamps it at `second`.
    fn pod_ready(current: &RolloutStatus, second: i64) -> RolloutStatus {
        let mut next = current.clone();
        next.ready_replicas = Some(5);
        next.available_replicas = Some(5);
        next.message = Some("canary 1/2 available".into());
        next.conditions[0].message = "canary 1/2 available".into();
        next.last_progress_at = Some(Time(at(second)));
        next
    }

    #[test]
    fn an_unchanged_status_is_not_written() {
        let current = written(0);
        assert_eq!(
            status_write(Some(&current), &current, &context(100)),
            StatusWrite::Unchanged
        );
        assert_eq!(
            status_write(None, &RolloutStatus::default(), &context(100)),
            StatusWrite::Unchanged
        );
        assert_eq!(
            status_write(None, &current, &context(100)),
            StatusWrite::Now
        );
    }

    #[test]
    fn a_pod_turning_ready_waits_until_the_written_status_is_an_interval_old() {
        let current = written(10);
        let planned = pod_ready(&current, 12);
        assert_eq!(
            status_write(Some(&current), &planned, &context(12)),
            StatusWrite::Later(Duration::from_secs(3))
        );
        assert_eq!(
            status_write(Some(&current), &planned, &context(15)),
            StatusWrite::Now
        );
        // A written status long settled is refreshed at once.
        let settled = written(0);
        assert_eq!(
            status_write(Some(&settled), &pod_ready(&settled, 60), &context(60)),
            StatusWrite::Now
        );
        // Without a progress stamp there is nothing to wait from.
        let mut unstamped = written(0);
        unstamped.last_progress_at = None;
        assert_eq!(
            status_write(Some(&unstamped), &pod_ready(&unstamped, 1), &context(1)),
            StatusWrite::Now
        );
    }

    #[test]
    fn counts_at_a_resting_point_are_written_at_once() {
        let current = written(10);
        let planned = pod_ready(&current, 12);
        assert_eq!(
            status_write(
                Some(&current),
                &planned,
                &WriteContext {
                    pods_at_rest: true,
                    ..context(12)
                }
            ),
            StatusWrite::Now
        );
    }

    #[test]
    fn without_a_router_the_weight_is_a_pod_count_and_waits_with_them() {
        let current = written(10);
        let mut planned = pod_ready(&current, 12);
        planned.current_weight = Some(20);
        assert_eq!(
            status_write(Some(&current), &planned, &context(12)),
            StatusWrite::Now,
            "a router's weight is a decision"
        );
        assert_eq!(
            status_write(
                Some(&current),
                &planned,
                &WriteContext {
                    weight_follows_pods: true,
                    ..context(12)
                }
            ),
            StatusWrite::Later(Duration::from_secs(3))
        );
    }

    fn replica_set(spec: i32, replicas: i32, ready: i32) -> ObservedReplicaSet {
        ObservedReplicaSet {
            name: "web-h1".into(),
            pod_template_hash: "h1".into(),
            revision: 1,
            spec_replicas: spec,
            replicas,
            ready_replicas: ready,
            available_replicas: ready,
            status_current: true,
            deleting: false,
        }
    }

    #[test]
    fn pods_rest_when_every_live_replica_set_has_its_pods_available_and_nothing_resizes() {
        let observed = |sets: Vec<ObservedReplicaSet>| Observed {
            replica_sets: sets,
            ..Default::default()
        };
        assert!(pods_at_rest(&observed(vec![replica_set(3, 3, 3)]), &[]));
        assert!(!pods_at_rest(&observed(vec![replica_set(3, 3, 2)]), &[]));
        assert!(!pods_at_rest(&observed(vec![replica_set(3, 4, 3)]), &[]));
        let mut stale = replica_set(3, 3, 3);
        stale.status_current = false;
        assert!(!pods_at_rest(&observed(vec![stale]), &[]));
        let mut going = replica_set(0, 2, 2);
        going.deleting = true;
        assert!(pods_at_rest(
            &observed(vec![replica_set(3, 3, 3), going]),
            &[]
        ));
        assert!(!pods_at_rest(
            &observed(vec![replica_set(3, 3, 3)]),
            &[Action::ScaleReplicaSet {
                name: "web-h1".into(),
                replicas: 4
            }]
        ));
    }

    #[test]
    fn a_short_progress_deadline_shortens_the_wait() {
        let mut rollout: Rollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}},
                "strategy": {"canary": {}}
            }
        }))
        .expect("valid rollout");
        assert_eq!(progress_write_interval(&rollout), PROGRESS_WRITE_INTERVAL);
        rollout.spec.progress_deadline_seconds = Some(2);
        assert_eq!(
            progress_write_interval(&rollout),
            Duration::from_millis(200)
        );
        rollout.spec.progress_deadline_seconds = Some(-1);
        assert_eq!(progress_write_interval(&rollout), Duration::ZERO);
    }

    #[test]
    fn what_decisions_and_health_checks_read_is_written_at_once() {
        let current = written(10);
        let moved = pod_ready(&current, 11);
        type Change = Box<dyn Fn(&mut RolloutStatus)>;
        let changes: Vec<(&str, Change)> = vec![
            ("step", Box::new(|s| s.current_step_index = Some(2))),
            ("phase", Box::new(|s| s.phase = Some(RolloutPhase::Paused))),
            ("generation", Box::new(|s| s.observed_generation = Some(3))),
            ("weight", Box::new(|s| s.current_weight = Some(50))),
            (
                "stable",
                Box::new(|s| s.stable_revision = s.canary_revision.clone()),
            ),
            ("abort", Box::new(|s| s.abort = true)),
            (
                "condition status",
                Box::new(|s| s.conditions[0].status = "True".into()),
            ),
            (
                "condition reason",
                Box::new(|s| s.conditions[0].reason = "RolloutCompleted".into()),
            ),
        ];
        for (what, change) in changes {
            let mut planned = moved.clone();
            change(&mut planned);
            assert_eq!(
                status_write(Some(&current), &planned, &context(11)),
                StatusWrite::Now,
                "{what}"
            );
        }
        assert_eq!(
            status_write(
                Some(&current),
                &moved,
                &WriteContext {
                    announces: true,
                    ..context(11)
                }
            ),
            StatusWrite::Now,
            "a plan that records events"
        );
    }
}
