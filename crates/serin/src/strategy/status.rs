//! Decides the status the controller writes: counts, phase, message, conditions (keeping the
//! lastTransitionTime of a condition whose status did not change), pauses and the progress deadline.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};

use super::context::{Ctx, Out};
use crate::crd::rollout::{PauseCondition, RevisionRef};
use crate::crd::{condition, reason, RolloutPhase, RolloutStatus};

/// Condition reasons that are states rather than events.
pub mod state_reason {
    pub const NOT_PAUSED: &str = "NotPaused";
    pub const NOT_DEGRADED: &str = "NotDegraded";
    pub const SPEC_VALID: &str = "SpecValid";
    pub const RECONCILED: &str = "Reconciled";
    pub const NOT_STALLED: &str = "NotStalled";
    pub const NOT_READY: &str = "NotReady";
}

/// Default of `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECS: i64 = 600;

/// What the strategy concluded, for the status.
#[derive(Clone, Debug)]
pub(crate) struct Verdict {
    pub phase: RolloutPhase,
    pub message: String,
    /// Status ("True", "False", "Unknown"), reason and message of the Progressing condition.
    pub progressing: (&'static str, String, String),
    /// Reason and message when Degraded.
    pub degraded: Option<(String, String)>,
    /// Message when the spec is invalid.
    pub invalid: Option<String>,
}

/// `status.selector`: the Rollout's selector as a label selector string.
pub fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        parts.push(match expression.operator.as_str() {
            "In" => format!("{} in ({values})", expression.key),
            "NotIn" => format!("{} notin ({values})", expression.key),
            "Exists" => expression.key.clone(),
            "DoesNotExist" => format!("!{}", expression.key),
            other => format!("{} {other} ({values})", expression.key),
        });
    }
    parts.join(",")
}

/// Replica counts over all live ReplicaSets, and the selector.
pub(crate) fn fill_counts(ctx: &Ctx<'_>, status: &mut RolloutStatus) {
    let live = ctx.observed.replica_sets.iter().filter(|rs| !rs.deleting);
    let (mut replicas, mut ready, mut available) = (0, 0, 0);
    for rs in live {
        replicas += rs.replicas.max(0);
        ready += rs.ready_replicas.max(0);
        available += rs.available_replicas.max(0);
    }
    status.replicas = Some(replicas);
    status.ready_replicas = Some(ready);
    status.available_replicas = Some(available);
    status.updated_replicas = Some(
        ctx.rs(&ctx.hash)
            .filter(|rs| !rs.deleting)
            .map(|rs| rs.replicas.max(0))
            .unwrap_or(0),
    );
    status.selector = Some(selector_string(&ctx.rollout.spec.selector));
    status.current_pod_hash = Some(ctx.hash.clone());
}

pub(crate) fn has_pause(status: &RolloutStatus, reason: &str) -> bool {
    status.pause_conditions.iter().any(|p| p.reason == reason)
}

/// Starts a pause (keeping the start of one already running). Returns its start, in seconds.
pub(crate) fn start_pause(ctx: &Ctx<'_>, status: &mut RolloutStatus, reason: &str) -> i64 {
    if let Some(existing) = status.pause_conditions.iter().find(|p| p.reason == reason) {
        return existing.start_time.0.as_second();
    }
    status.pause_conditions.push(PauseCondition {
        reason: reason.to_string(),
        start_time: ctx.stamp(),
    });
    ctx.now_s
}

/// Ends a pause; its time is added to the paused seconds of the step (not counted by the deadline).
pub(crate) fn end_pause(ctx: &Ctx<'_>, status: &mut RolloutStatus, reason: &str) {
    let mut paused = 0;
    status.pause_conditions.retain(|p| {
        if p.reason == reason {
            paused += (ctx.now_s - p.start_time.0.as_second()).max(0);
            false
        } else {
            true
        }
    });
    if paused > 0 {
        status.paused_seconds_in_step = Some(status.paused_seconds_in_step.unwrap_or(0) + paused);
    }
}

/// Ends every pause except the user's.
pub(crate) fn end_step_pauses(ctx: &Ctx<'_>, status: &mut RolloutStatus) {
    let reasons: Vec<String> = status
        .pause_conditions
        .iter()
        .filter(|p| p.reason != reason::PAUSED_BY_USER)
        .map(|p| p.reason.clone())
        .collect();
    for r in reasons {
        end_pause(ctx, status, &r);
    }
}

/// Applies `serin pause` / `serin resume` and `spec.paused`. Returns whether the user holds the rollout.
pub(crate) fn apply_user_pause(
    ctx: &Ctx<'_>,
    status: &mut RolloutStatus,
    in_progress: bool,
) -> bool {
    let commanded = ctx
        .prev
        .commands
        .as_ref()
        .and_then(|c| c.paused)
        .unwrap_or(false);
    let paused = (ctx.rollout.spec.paused || commanded) && in_progress;
    if paused {
        start_pause(ctx, status, reason::PAUSED_BY_USER);
    } else if has_pause(status, reason::PAUSED_BY_USER) {
        end_pause(ctx, status, reason::PAUSED_BY_USER);
    }
    paused
}

/// `progressDeadlineSeconds`, or the default.
pub(crate) fn progress_deadline_secs(ctx: &Ctx<'_>) -> i64 {
    ctx.rollout
        .spec
        .progress_deadline_seconds
        .map(i64::from)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECS)
}

/// Stamps `lastProgressAt` when pods or the step moved, and tells whether the progress deadline passed
/// (paused time does not count). Only meaningful while the rollout is progressing and not paused.
pub(crate) fn progress_deadline_exceeded(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    watching: bool,
) -> bool {
    let prev = &ctx.prev;
    let moved = prev.ready_replicas != status.ready_replicas
        || prev.available_replicas != status.available_replicas
        || prev.updated_replicas != status.updated_replicas
        || prev.current_step_index != status.current_step_index
        || prev.canary_revision != status.canary_revision
        || prev.stable_revision != status.stable_revision;
    if moved || (watching && status.last_progress_at.is_none()) {
        status.last_progress_at = Some(ctx.stamp());
        status.paused_seconds_in_step = None;
    }
    if !watching || !status.pause_conditions.is_empty() {
        return false;
    }
    let deadline = progress_deadline_secs(ctx);
    let since = status
        .last_progress_at
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(ctx.now_s);
    let due = since + status.paused_seconds_in_step.unwrap_or(0) + deadline;
    if ctx.now_s >= due {
        true
    } else {
        out.requeue_at(due);
        false
    }
}

fn set_condition(
    ctx: &Ctx<'_>,
    conditions: &mut Vec<Condition>,
    type_: &str,
    state: &str,
    reason: &str,
    message: &str,
) {
    let generation = ctx.rollout.metadata.generation;
    let previous = ctx.prev.conditions.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(p) if p.status == state => p.last_transition_time.clone(),
        _ => ctx.stamp(),
    };
    conditions.push(Condition {
        type_: type_.to_string(),
        status: state.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time,
    });
}

fn truth(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

/// Writes phase, message and conditions, and records the events that phase changes call for.
pub(crate) fn finish(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, verdict: Verdict) {
    use state_reason::*;
    status.observed_generation = ctx.rollout.metadata.generation;
    status.phase = Some(verdict.phase);
    status.message = Some(verdict.message.clone());
    let healthy = verdict.phase == RolloutPhase::Healthy;
    let progressing_phase = verdict.phase == RolloutPhase::Progressing;
    let mut conditions = Vec::new();
    if healthy {
        set_condition(
            ctx,
            &mut conditions,
            condition::READY,
            "True",
            reason::ROLLOUT_COMPLETED,
            &verdict.message,
        );
    } else {
        set_condition(
            ctx,
            &mut conditions,
            condition::READY,
            "False",
            NOT_READY,
            &verdict.message,
        );
    }
    let (state, why, message) = &verdict.progressing;
    set_condition(
        ctx,
        &mut conditions,
        condition::PROGRESSING,
        state,
        why,
        message,
    );
    let total = ctx.replicas;
    let available = status.available_replicas.unwrap_or(0);
    let minimum = match &ctx.rollout.spec.strategy.canary {
        Some(canary) => {
            total
                - super::replicas::max_unavailable(canary.max_unavailable.as_ref(), total)
                    .unwrap_or(0)
        }
        None => total,
    };
    if available >= minimum {
        set_condition(
            ctx,
            &mut conditions,
            condition::AVAILABLE,
            "True",
            reason::AVAILABLE,
            &format!("{available} of {total} pods available"),
        );
    } else {
        set_condition(
            ctx,
            &mut conditions,
            condition::AVAILABLE,
            "False",
            reason::UNAVAILABLE,
            &format!("{available} of {total} pods available, {minimum} needed"),
        );
    }
    match status.pause_conditions.first() {
        Some(pause) => set_condition(
            ctx,
            &mut conditions,
            condition::PAUSED,
            "True",
            &pause.reason.clone(),
            &verdict.message,
        ),
        None => set_condition(
            ctx,
            &mut conditions,
            condition::PAUSED,
            "False",
            NOT_PAUSED,
            "",
        ),
    }
    match &verdict.degraded {
        Some((why, message)) => set_condition(
            ctx,
            &mut conditions,
            condition::DEGRADED,
            "True",
            why,
            message,
        ),
        None => set_condition(
            ctx,
            &mut conditions,
            condition::DEGRADED,
            "False",
            NOT_DEGRADED,
            "",
        ),
    }
    match &verdict.invalid {
        Some(message) => set_condition(
            ctx,
            &mut conditions,
            condition::INVALID_SPEC,
            "True",
            reason::INVALID_SPEC,
            message,
        ),
        None => set_condition(
            ctx,
            &mut conditions,
            condition::INVALID_SPEC,
            "False",
            SPEC_VALID,
            "",
        ),
    }
    if progressing_phase {
        set_condition(
            ctx,
            &mut conditions,
            condition::RECONCILING,
            "True",
            why,
            message,
        );
    } else {
        set_condition(
            ctx,
            &mut conditions,
            condition::RECONCILING,
            "False",
            RECONCILED,
            "",
        );
    }
    let stalled = verdict.invalid.is_some() || verdict.degraded.is_some();
    match (&verdict.degraded, &verdict.invalid) {
        (_, Some(message)) => set_condition(
            ctx,
            &mut conditions,
            condition::STALLED,
            truth(stalled),
            reason::INVALID_SPEC,
            message,
        ),
        (Some((why, message)), None) => set_condition(
            ctx,
            &mut conditions,
            condition::STALLED,
            truth(stalled),
            why,
            message,
        ),
        (None, None) => set_condition(
            ctx,
            &mut conditions,
            condition::STALLED,
            "False",
            NOT_STALLED,
            "",
        ),
    }
    status.conditions = conditions;
    if healthy && ctx.prev.phase != Some(RolloutPhase::Healthy) {
        out.event(false, reason::ROLLOUT_COMPLETED, verdict.message.clone());
    }
    let was_deadline = ctx.prev.conditions.iter().any(|c| {
        c.type_ == condition::PROGRESSING && c.reason == reason::PROGRESS_DEADLINE_EXCEEDED
    });
    if verdict.progressing.1 == reason::PROGRESS_DEADLINE_EXCEEDED && !was_deadline {
        out.event(
            true,
            reason::PROGRESS_DEADLINE_EXCEEDED,
            verdict.progressing.2.clone(),
        );
    }
}

/// The previous Degraded reason and message, for a state (aborted) that outlives the plan that decided it.
pub(crate) fn previous_degraded(ctx: &Ctx<'_>) -> Option<(String, String)> {
    ctx.prev
        .conditions
        .iter()
        .find(|c| c.type_ == condition::DEGRADED && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// Holds a rollout whose recorded stable version has no ReplicaSet: no action, commands kept for later (a
/// ReplicaSet that was only late in the cache comes back and the rollout resumes where it was).
pub(crate) fn stable_missing(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    stable: &RevisionRef,
) -> Verdict {
    *status = ctx.prev.clone();
    fill_counts(ctx, status);
    let message = format!(
        "stable revision {} ({}) has no ReplicaSet (deleted, unlabelled or not yet observed): holding; \
         `kubectl serin promote --full` makes the current template stable",
        stable.revision, stable.pod_template_hash
    );
    if previous_degraded(ctx).map(|(why, _)| why).as_deref() != Some(reason::STABLE_MISSING) {
        out.event(true, reason::STABLE_MISSING, message.clone());
    }
    Verdict {
        phase: RolloutPhase::Degraded,
        message: message.clone(),
        progressing: ("False", reason::STABLE_MISSING.to_string(), message.clone()),
        degraded: Some((reason::STABLE_MISSING.to_string(), message)),
        invalid: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn selector_string_covers_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some([("app".to_string(), "checkout".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "legacy".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selector_string(&selector),
            "app=checkout,tier in (a,b),!legacy"
        );
    }
}
