//! The phases of one plan that canary and blue-green share, in the order a plan runs them: resolve the
//! stable version, start (or continue) a revision, apply the user's commands, gate on analysis, promote,
//! watch the progress deadline, scale down what waits for a delay, and word the status.
//!
//! Each strategy keeps only what is its own (canary steps and weights, blue-green preview and switch) and
//! calls these for the rest, so an abort, a retry or a deadline means the same thing in both.

pub(crate) mod abort;
pub(crate) mod commands;
pub(crate) mod deadline;
pub(crate) mod gate;
pub(crate) mod promote;
pub(crate) mod revision;
pub(crate) mod scale_down;
pub(crate) mod stable;
pub(crate) mod verdicts;

use super::blue_green::BLUE_GREEN_PROMOTE_STEP;
use super::context::{Ctx, Out};
use crate::crd::RolloutStatus;
use abort::{abort, Abort};

/// Which strategy a shared phase works for, where the two differ in a detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A canary with this many steps.
    Canary {
        steps: i32,
    },
    BlueGreen,
}

impl Kind {
    /// `currentStepIndex` once no revision is in flight: past the last step for a canary, absent for blue-green.
    pub(crate) fn settled_index(self) -> Option<i32> {
        match self {
            Kind::Canary { steps } => Some(steps),
            Kind::BlueGreen => None,
        }
    }

    /// `currentStepIndex` after `promote --full`: past every step, or the blue-green promotion step.
    pub(crate) fn full_promotion_index(self) -> i32 {
        match self {
            Kind::Canary { steps } => steps,
            Kind::BlueGreen => BLUE_GREEN_PROMOTE_STEP,
        }
    }

    /// A canary's timed pauses count from `stepStartedAt`, so a retry or a full promotion stamps it again; a
    /// blue-green preview counts from its readiness instead.
    pub(crate) fn restamps_steps(self) -> bool {
        matches!(self, Kind::Canary { .. })
    }

    /// Only a canary runs a background analysis beside its steps.
    pub(crate) fn has_background_analysis(self) -> bool {
        matches!(self, Kind::Canary { .. })
    }
}

/// What a plan carries from phase to phase, whatever the strategy.
#[derive(Clone, Debug)]
pub(crate) struct Core {
    pub stable_hash: String,
    /// The revision in flight (the canary, or the blue-green preview) until it is promoted.
    pub in_flight: Option<String>,
    /// `promote` was asked and not yet used by a gate.
    pub promote_step: bool,
    pub user_paused: bool,
    /// The abort decided in this plan, for the verdict.
    pub aborting: Option<Abort>,
    /// `abortScaleDownDelaySeconds`.
    pub abort_delay: i64,
}

impl Core {
    /// A revision is in flight and not aborted.
    pub(crate) fn active(&self, status: &RolloutStatus) -> bool {
        self.in_flight.is_some() && !status.abort
    }

    /// A revision is in flight and aborted.
    pub(crate) fn aborted(&self, status: &RolloutStatus) -> bool {
        self.in_flight.is_some() && status.abort
    }

    /// Aborts the revision `hash` (see [`abort::abort`]) and keeps why for the verdict.
    pub(crate) fn abort(
        &mut self,
        ctx: &Ctx<'_>,
        out: &mut Out,
        status: &mut RolloutStatus,
        hash: &str,
        why: &'static str,
        message: String,
    ) {
        self.aborting = Some(abort(
            ctx,
            out,
            status,
            hash,
            self.abort_delay,
            why,
            message,
        ));
    }
}
