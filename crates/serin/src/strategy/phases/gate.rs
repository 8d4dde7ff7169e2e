//! Decides what an analysis run's state means for the gate it guards (safety rule 4): a success passes, a
//! failure aborts (the caller decides how), an inconclusive result pauses until a human's `promote` lets it
//! pass once.

use super::super::context::{ensure_run, release_run, Ctx, Out, RunSlot, RunState};
use super::super::status::{end_pause, start_pause};
use super::super::types::AnalysisPurpose;
use super::Core;
use crate::crd::rollout::{AnalysisArgument, AnalysisTemplateRef};
use crate::crd::{reason, RolloutStatus};

/// An analysis a gate asks for: what it is for, and the templates and arguments it measures with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Analysis<'a> {
    pub purpose: AnalysisPurpose,
    pub templates: &'a [AnalysisTemplateRef],
    pub args: &'a [AnalysisArgument],
}

impl<'a> Analysis<'a> {
    pub(crate) fn of(
        purpose: AnalysisPurpose,
        templates: &'a [AnalysisTemplateRef],
        args: &'a [AnalysisArgument],
    ) -> Self {
        Analysis {
            purpose,
            templates,
            args,
        }
    }

    /// The background analysis has a slot of its own; every other one is the current run.
    fn slot(&self) -> RunSlot {
        match self.purpose {
            AnalysisPurpose::Background => RunSlot::Background,
            _ => RunSlot::Current,
        }
    }

    /// `<rollout>-<hash>-step<i>` / `-background` / `-pre` / `-post`.
    fn base_name(&self, ctx: &Ctx<'_>, hash: &str) -> String {
        let suffix = match self.purpose {
            AnalysisPurpose::Step(index) => format!("step{index}"),
            AnalysisPurpose::Background => "background".to_string(),
            AnalysisPurpose::PrePromotion => "pre".to_string(),
            AnalysisPurpose::PostPromotion => "post".to_string(),
        };
        format!("{}-{}-{suffix}", ctx.name, hash)
    }
}

/// Makes sure the run of `analysis` for the version `hash` exists, and judges it (see [`judge`]).
pub(crate) fn analysis_gate(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    core: &mut Core,
    analysis: Analysis<'_>,
    hash: &str,
    release: Option<RunSlot>,
) -> Gate {
    let run = ensure_run(
        ctx,
        out,
        status,
        analysis.slot(),
        analysis.purpose,
        &analysis.base_name(ctx, hash),
        analysis.templates,
        analysis.args,
        &core.stable_hash,
    );
    judge(ctx, out, status, run, &mut core.promote_step, release)
}

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
