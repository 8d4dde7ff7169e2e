//! When a planned status is written: at once when anything a user, a GitOps health check or the next plan
//! acts on changed; pod counts alone (which move each time a pod turns ready) at most once per interval.
//!
//! The planner recomputes the pod counts, the message that quotes them and `lastProgressAt` on every
//! reconcile. Writing each of those changes would cost a status write per pod turning ready, several per
//! canary step. They are informational: phase, step, revisions, weights, conditions, pauses, analysis and
//! commands are what decisions and health checks read, and a change to any of those is written at once
//! (carrying the current counts with it). A change confined to the counts waits until the status written
//! last is `PROGRESS_WRITE_INTERVAL` old (measured by its `lastProgressAt`; a tenth of the progress deadline
//! when that is shorter), so the counts users see are at most that stale, and the progress deadline, which
//! counts from `lastProgressAt`, fires at most that late.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{Rollout, RolloutStatus};
use crate::strategy::status::DEFAULT_PROGRESS_DEADLINE_SECS;

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

/// When to write `planned` over `current`, at `now`; `announces` is whether the plan records events (which
/// describe a transition the status must show when they are read), `interval` how long a change confined
/// to pod counts may wait (see [`progress_write_interval`]).
pub fn status_write(
    current: Option<&RolloutStatus>,
    planned: &RolloutStatus,
    announces: bool,
    now: Timestamp,
    interval: Duration,
) -> StatusWrite {
    if !status_differs(current, planned) {
        return StatusWrite::Unchanged;
    }
    let Some(current) = current else {
        return StatusWrite::Now;
    };
    if announces || without_progress(current) != without_progress(planned) {
        return StatusWrite::Now;
    }
    let Some(written) = current.last_progress_at.as_ref() else {
        return StatusWrite::Now;
    };
    let due = written.0.checked_add(interval).unwrap_or(written.0);
    if now >= due {
        return StatusWrite::Now;
    }
    StatusWrite::Later(now.duration_until(due).unsigned_abs().min(interval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::RevisionRef;
    use crate::crd::RolloutPhase;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const FIVE: Duration = Duration::from_secs(5);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("valid time")
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
            status_write(Some(&current), &current, false, at(100), FIVE),
            StatusWrite::Unchanged
        );
        assert_eq!(
            status_write(None, &RolloutStatus::default(), false, at(100), FIVE),
            StatusWrite::Unchanged
        );
        assert_eq!(
            status_write(None, &current, false, at(100), FIVE),
            StatusWrite::Now
        );
    }

    #[test]
    fn a_pod_turning_ready_waits_until_the_written_status_is_an_interval_old() {
        let current = written(10);
        let planned = pod_ready(&current, 12);
        assert_eq!(
            status_write(Some(&current), &planned, false, at(12), FIVE),
            StatusWrite::Later(Duration::from_secs(3))
        );
        assert_eq!(
            status_write(Some(&current), &planned, false, at(15), FIVE),
            StatusWrite::Now
        );
        // A written status long settled is refreshed at once.
        let settled = written(0);
        assert_eq!(
            status_write(
                Some(&settled),
                &pod_ready(&settled, 60),
                false,
                at(60),
                FIVE
            ),
            StatusWrite::Now
        );
        // Without a progress stamp there is nothing to wait from.
        let mut unstamped = written(0);
        unstamped.last_progress_at = None;
        assert_eq!(
            status_write(
                Some(&unstamped),
                &pod_ready(&unstamped, 1),
                false,
                at(1),
                FIVE
            ),
            StatusWrite::Now
        );
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
                status_write(Some(&current), &planned, false, at(11), FIVE),
                StatusWrite::Now,
                "{what}"
            );
        }
        assert_eq!(
            status_write(Some(&current), &moved, true, at(11), FIVE),
            StatusWrite::Now,
            "a plan that records events"
        );
    }
}
