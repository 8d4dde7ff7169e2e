//! The pure planner: decides, from a Rollout and an observed snapshot, what should change next.
//!
//! `plan` has no client, no clock and no I/O; the controller observes, calls it, applies the actions in
//! order (stopping at the first failure) and writes the returned status when it differs.
//!
//! Choices where the brief left room (the safer option each time):
//! - With a router, a `setWeight` step is done once the router *reports* the weight (the controller should
//!   watch the routing object; the plan also asks for a short requeue after a `SetTraffic`). The canary is
//!   sized `max(ceil(N*w/100), setCanaryScale)`: setCanaryScale can grow it, never shrink it below what its
//!   weight needs. Without a router the stable keeps all its pods through the steps and the canary runs
//!   beside it: setCanaryScale sets its size, or else the pod count whose share is closest to the weight
//!   (never more than one pod's share above it), at most `maxSurge` when set and at most the stable's size
//!   otherwise. Only the promotion replaces the stable, within maxSurge/maxUnavailable.
//! - `setHeaderRoute`/`setMirrorRoute` need `trafficRouting`; a `maxSurge` of 0 without a router leaves the
//!   canary no room beside the full stable: InvalidSpec.
//! - A recorded stable version whose ReplicaSet is not observed (deleted, unlabelled, not yet in the cache)
//!   holds the rollout with `StableReplicaSetMissing`: its pod template is lost, so it cannot be recreated,
//!   and the current template is never made stable in its place unless a human asks with `promote --full`.
//! - Steps that change while a revision is in flight start again from the first (their hash is kept in
//!   `status.stepsHash`): an index into another list of steps would skip pauses and analysis.
//! - An invalid spec changes nothing, except that an abort (asked for, or under way) still takes traffic back
//!   to stable and a retry after it is recorded: a bad spec never strands users on the canary.
//! - When the router cannot be relied on (`observed.traffic` is invalid or unreadable) no weight is written, no
//!   canary or old version is scaled down, the canary Service is not re-pinned (it may still carry traffic),
//!   and no step advances: condition Progressing False RouteMissing (Degraded) when the routes are missing
//!   or invalid, phase Progressing with reason RouteUnreadable (a hold, not a failure) when they could not be
//!   read at all. All traffic moves to the canary only
//!   inside the promotion, which pins the stable Service to it in the same plan.
//! - Without a router, scale-downs are limited by the available pods behind the stable Service (as it will
//!   select after the plan), never below `N - maxUnavailable`; versions that no longer serve are kept until
//!   the stable is fully available.
//! - A user pause (`spec.paused`, `status.commands.paused`) holds steps and promotions; abort, retry and
//!   safety corrections still happen.
//! - Blue-green uses `currentStepIndex` 0 (preview, waiting for its gate) and 1 (promotion decided: scale
//!   the new version to full size, then switch); it is absent when no new version is in flight.
//! - AnalysisRuns are named `<rollout>-<hash>-step<i>` / `-background` / `-pre` / `-post`; a retried
//!   analysis gets a `-2`, `-3`, ... suffix so that the old verdict is never read again. The name in use is
//!   kept in `status.analysis`.
//! - Times written to status are whole seconds, as the API server stores them.
//! - If a status write is lost after the actions were applied, the next plan resumes from the older status
//!   and the cluster as it is: no duplicate ReplicaSet, and never an unsafe split, though a step may run
//!   again.

pub mod blue_green;
pub mod canary;
mod context;
pub mod hash;
mod phases;
pub mod replicas;
pub mod status;
pub mod types;
pub mod validate;

#[cfg(test)]
mod tests;

use k8s_openapi::jiff::Timestamp;

pub use hash::pod_template_hash;
pub use types::{
    Action, AnalysisPurpose, DesiredTraffic, HeaderRoute, MirrorRoute, Neighbour, Observed,
    ObservedAnalysisRun, ObservedReplicaSet, ObservedService, ObservedTraffic, Plan, PlannedEvent,
    RouteState, TemplateKey,
};
pub use validate::{validate, SpecError};

use crate::crd::{reason, Rollout, RolloutPhase, RolloutStatus};
use context::{Ctx, Out};
use status::{fill_counts, finish, Verdict};

/// Decides what to do next for `rollout`, given what the controller observed at `now`.
///
/// Never panics; an invalid spec yields no actions and an `InvalidSpec` condition (safety rule 7). A rollout
/// in its desired state yields no actions, no events and the input status unchanged (safety rule 5).
pub fn plan(rollout: &Rollout, observed: &Observed, now: Timestamp) -> Plan {
    let prev = rollout.status.clone().unwrap_or_default();
    let ctx = Ctx {
        rollout,
        name: rollout.metadata.name.clone().unwrap_or_default(),
        observed,
        now,
        now_s: now.as_second(),
        prev: prev.clone(),
        replicas: rollout.spec.replicas.unwrap_or(1).max(0),
        hash: pod_template_hash(&rollout.spec.template),
    };
    let mut out = Out::new(observed);
    let mut status = prev;
    let strategy = &rollout.spec.strategy;
    let verdict = match (
        validate(rollout, observed),
        &strategy.canary,
        &strategy.blue_green,
    ) {
        (Ok(()), Some(canary), None) => canary::plan_canary(&ctx, canary, &mut out, &mut status),
        (Ok(()), None, Some(blue_green)) => {
            blue_green::plan_blue_green(&ctx, blue_green, &mut out, &mut status)
        }
        (Ok(()), _, _) => {
            return invalid_plan(
                &ctx,
                vec![SpecError::StrategyCount {
                    field: "spec.strategy".into(),
                }],
            )
        }
        (Err(errors), _, _) => return invalid_plan(&ctx, errors),
    };
    finish(&ctx, &mut out, &mut status, verdict);
    let requeue_after = out.requeue_after(ctx.now_s);
    Plan {
        actions: out.actions,
        status,
        events: out.events,
        requeue_after,
    }
}

/// Nothing in the cluster changes; the status says why, and a Warning event is recorded when the reason is new.
/// The exceptions are the ways back to safety: an abort (asked for, or already under way) still moves all
/// traffic to stable, and a retry after it is recorded, so a bad spec pushed mid-canary never strands users
/// on the canary.
fn invalid_plan(ctx: &Ctx<'_>, errors: Vec<SpecError>) -> Plan {
    let message = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let mut out = Out::new(ctx.observed);
    let previous_message = ctx
        .prev
        .conditions
        .iter()
        .find(|c| c.type_ == crate::crd::condition::INVALID_SPEC && c.status == "True")
        .map(|c| c.message.clone());
    if previous_message.as_deref() != Some(message.as_str()) {
        out.event(true, reason::INVALID_SPEC, message.clone());
    }
    let commands = ctx.prev.commands.clone().unwrap_or_default();
    if let Some(canary) = &ctx.prev.canary_revision {
        if commands.retry && ctx.prev.abort {
            return retry_under_invalid_spec(ctx, out, &canary.pod_template_hash, &message);
        }
        if commands.abort || ctx.prev.abort {
            if let Some(plan) = abort_under_invalid_spec(ctx, &mut out, canary, &message) {
                return plan;
            }
        }
    }
    invalid_hold(ctx, out, ctx.prev.clone(), &message)
}

/// The plan of a rollout held by its invalid spec: no action, status Degraded with the spec's errors.
fn invalid_hold(ctx: &Ctx<'_>, mut out: Out, mut status: RolloutStatus, message: &str) -> Plan {
    fill_counts(ctx, &mut status);
    let verdict = Verdict {
        phase: RolloutPhase::Degraded,
        message: format!("invalid spec: {message}"),
        progressing: (
            "False",
            reason::INVALID_SPEC.to_string(),
            message.to_string(),
        ),
        degraded: Some((reason::INVALID_SPEC.to_string(), message.to_string())),
        invalid: Some(message.to_string()),
    };
    finish(ctx, &mut out, &mut status, verdict);
    Plan {
        actions: Vec::new(),
        status,
        events: out.events,
        requeue_after: None,
    }
}

/// An abort while the spec is invalid: the rollout is planned as the aborted canary it is, with the parts of
/// the spec that cannot matter to an abort (steps, analysis) left out, so only the spec's Services, router and
/// replica count are used. If even those are invalid, nothing happens (an abort needs to know where stable is).
fn abort_under_invalid_spec(
    ctx: &Ctx<'_>,
    out: &mut Out,
    canary: &crate::crd::rollout::RevisionRef,
    message: &str,
) -> Option<Plan> {
    let mut rollout = ctx.rollout.clone();
    if let Some(strategy) = rollout.spec.strategy.canary.as_mut() {
        strategy.steps.clear();
        strategy.analysis = None;
    }
    if let Some(strategy) = rollout.spec.strategy.blue_green.as_mut() {
        strategy.pre_promotion_analysis = None;
        strategy.post_promotion_analysis = None;
    }
    validate(&rollout, ctx.observed).ok()?;
    let mut prev = ctx.prev.clone();
    prev.steps_hash = Some(hash::steps_hash(&[]));
    let sanitized = Ctx {
        rollout: &rollout,
        name: ctx.name.clone(),
        observed: ctx.observed,
        now: ctx.now,
        now_s: ctx.now_s,
        prev,
        replicas: ctx.replicas,
        hash: canary.pod_template_hash.clone(),
    };
    let mut status = sanitized.prev.clone();
    let strategy = &rollout.spec.strategy;
    let mut verdict = match (&strategy.canary, &strategy.blue_green) {
        (Some(canary), None) => canary::plan_canary(&sanitized, canary, out, &mut status),
        (None, Some(blue_green)) => {
            blue_green::plan_blue_green(&sanitized, blue_green, out, &mut status)
        }
        _ => return None,
    };
    status.steps_hash = ctx.prev.steps_hash.clone();
    verdict.message = format!("{}; invalid spec: {message}", verdict.message);
    verdict.invalid = Some(message.to_string());
    finish(&sanitized, out, &mut status, verdict);
    status.current_pod_hash = Some(ctx.hash.clone());
    Some(Plan {
        actions: std::mem::take(&mut out.actions),
        status,
        events: std::mem::take(&mut out.events),
        requeue_after: out.requeue_after(ctx.now_s),
    })
}

/// A retry while the spec is invalid is taken (so it is not replayed later), but the canary only starts its
/// steps again once the spec is valid.
fn retry_under_invalid_spec(ctx: &Ctx<'_>, mut out: Out, canary_hash: &str, message: &str) -> Plan {
    let mut status = ctx.prev.clone();
    phases::commands::take_commands(ctx, &mut status);
    status.abort = false;
    status.aborted_at = None;
    status.current_step_index = Some(0);
    status.analysis = None;
    status.step_started_at = Some(ctx.stamp());
    context::remove_deadline(&mut status, canary_hash);
    out.event(
        false,
        reason::RETRIED,
        "rollout retried: its steps start again once the spec is valid",
    );
    invalid_hold(ctx, out, status, message)
}
