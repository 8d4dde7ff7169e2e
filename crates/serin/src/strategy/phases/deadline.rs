//! Decides whether the rollout stopped making progress: the revision in flight (or a stable that is not yet
//! fully available) must move within `progressDeadlineSeconds`, paused time not counted; past it the rollout
//! is Degraded, and with `progressDeadlineAbort` the revision in flight is aborted.

use super::super::context::{Ctx, Out};
use super::super::status::{
    fill_counts, progress_deadline_exceeded, progress_deadline_secs, Verdict,
};
use super::verdicts::failed;
use super::Core;
use crate::crd::{reason, RolloutPhase, RolloutStatus};

/// Where the rollout stands against its progress deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    pub exceeded: bool,
    /// The stable version was fully available when observed.
    pub stable_healthy: bool,
}

/// Counts the pods, stamps progress and checks the deadline, before anything is acted on: an exceeded deadline
/// may abort `in_flight`, which changes what is acted on.
pub(crate) fn watch_progress(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    core: &mut Core,
) -> Progress {
    fill_counts(ctx, status);
    let active = core.active(status);
    let stable_healthy = ctx.fully_available(&core.stable_hash, ctx.replicas);
    let watching = (active && !core.user_paused) || (core.in_flight.is_none() && !stable_healthy);
    let exceeded = progress_deadline_exceeded(ctx, out, status, watching);
    if let (true, true, Some(hash)) = (
        exceeded && ctx.rollout.spec.progress_deadline_abort,
        active,
        core.in_flight.clone(),
    ) {
        let message = "progress deadline exceeded: aborting".to_string();
        core.abort(
            ctx,
            out,
            status,
            &hash,
            reason::PROGRESS_DEADLINE_EXCEEDED,
            message,
        );
    }
    Progress {
        exceeded,
        stable_healthy,
    }
}

/// The verdict of a rollout past its progress deadline.
pub(crate) fn deadline_verdict(ctx: &Ctx<'_>) -> Verdict {
    let deadline = progress_deadline_secs(ctx);
    let message = format!("no progress for {deadline}s");
    failed(
        RolloutPhase::Degraded,
        message.clone(),
        reason::PROGRESS_DEADLINE_EXCEEDED.to_string(),
        message,
    )
}
