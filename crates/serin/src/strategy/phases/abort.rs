//! Decides what an abort does, whoever asks for it (the user, a failed analysis, the progress deadline): the
//! revision in flight is marked aborted, its pods wait for their delay, its analysis stops.

use super::super::context::{add_deadline, terminate_runs_of, Ctx, Out};
use super::super::status::{end_step_pauses, previous_degraded};
use crate::crd::{reason, RolloutStatus};

/// Why the rollout is aborted, for the Progressing and Degraded conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Abort {
    pub why: String,
    pub message: String,
}

/// Aborts the revision `hash`: it scales down after `delay` seconds, its runs are stopped, and a Warning says why.
pub(crate) fn abort(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    hash: &str,
    delay: i64,
    why: &'static str,
    message: String,
) -> Abort {
    status.abort = true;
    status.aborted_at = Some(ctx.stamp());
    end_step_pauses(ctx, status);
    add_deadline(ctx, status, hash, delay);
    terminate_runs_of(ctx, out, hash);
    if why == reason::ANALYSIS_FAILED {
        status.analysis.get_or_insert_with(Default::default).message = Some(message.clone());
    }
    out.event(true, reason::ABORTED, message.clone());
    Abort {
        why: why.to_string(),
        message,
    }
}

/// The reason to report for an abort: the one decided in this plan, else the one recorded when it happened
/// (an aborted state outlives the plan that decided it).
pub(crate) fn abort_reason(ctx: &Ctx<'_>, aborting: Option<Abort>) -> Abort {
    aborting.unwrap_or_else(|| {
        let (why, message) = previous_degraded(ctx)
            .unwrap_or_else(|| (reason::ABORTED.to_string(), "rollout aborted".to_string()));
        Abort { why, message }
    })
}
