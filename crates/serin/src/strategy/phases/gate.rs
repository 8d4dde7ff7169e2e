//! Decides what an analysis run's state means for the gate it guards (safety rule 4): a success passes, a
//! failure aborts (the caller decides how), an inconclusive result pauses until a human's `promote` lets it
//! pass once.

use super::super::context::{release_run, Ctx, Out, RunSlot, RunState};
use super::super::status::{end_pause, start_pause};
use crate::crd::{reason, RolloutStatus};

/// The gate after this plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    Passed,
    Waiting,
    /// Inconclusive: paused for a human.
    Paused,
    Failed(String),
}

/// Judges `state`. An inconclusive run passes only with `promote` (which is then used up), and `release`
/// names the slot whose run is forgotten when it does.
pub(crate) fn judge(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    state: RunState,
    promote_step: &mut bool,
    release: Option<RunSlot>,
) -> Gate {
    match state {
        RunState::Successful => Gate::Passed,
        RunState::Waiting => Gate::Waiting,
        RunState::Failed(message) => Gate::Failed(message),
        RunState::Inconclusive(_) if *promote_step => {
            *promote_step = false;
            if let Some(slot) = release {
                release_run(ctx, out, status, slot);
            }
            end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
            Gate::Passed
        }
        RunState::Inconclusive(_) => {
            start_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
            Gate::Paused
        }
    }
}
