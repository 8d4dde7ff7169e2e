//! Decides what the user's commands do to the revision in flight: `retry` starts an aborted revision again,
//! `abort` takes it back, `promote --full` skips what is left, `promote` lets the current gate pass once.
//! `pause`/`resume` stay in status until the user changes them; every other command is taken once.

use super::super::context::{release_run, remove_deadline, Ctx, Out, RunSlot};
use super::super::status::{apply_user_pause, end_step_pauses};
use super::stable::StableVersion;
use super::{Core, Kind};
use crate::crd::rollout::{ManualCommands, PromoteCommand};
use crate::crd::{reason, RolloutStatus};

/// Default of `abortScaleDownDelaySeconds` and `scaleDownDelaySeconds`.
pub const DEFAULT_SCALE_DOWN_DELAY_SECS: i64 = 30;

/// A scale-down delay as configured, or the default.
pub(crate) fn delay_secs(configured: Option<i32>) -> i64 {
    i64::from(configured.unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECS as i32))
}

/// The commands the user left for this plan; the status keeps only the user's pause, as the others are
/// taken now.
pub(crate) fn take_commands(ctx: &Ctx<'_>, status: &mut RolloutStatus) -> ManualCommands {
    let commands = ctx.prev.commands.clone().unwrap_or_default();
    status.commands = commands.paused.map(|paused| ManualCommands {
        paused: Some(paused),
        ..Default::default()
    });
    commands
}

/// `abortScaleDownDelaySeconds` of the rollout's strategy, or the default.
pub(crate) fn abort_delay(ctx: &Ctx<'_>) -> i64 {
    let strategy = &ctx.rollout.spec.strategy;
    let canary = strategy.canary.as_ref();
    let blue_green = strategy.blue_green.as_ref();
    delay_secs(
        canary
            .and_then(|c| c.abort_scale_down_delay_seconds)
            .or_else(|| blue_green.and_then(|b| b.abort_scale_down_delay_seconds)),
    )
}

/// Applies retry, abort and promote to the revision in flight (nothing happens without one), then the
/// user's pause, which holds a revision in progress (or a blue-green post-promotion analysis, `post_pending`).
/// Returns the state the next phases carry, and whether a retry restarted the revision.
pub(crate) fn apply_commands(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    stable: &StableVersion,
    in_flight: Option<String>,
    kind: Kind,
    post_pending: bool,
) -> (Core, bool) {
    let commands = ctx.prev.commands.clone().unwrap_or_default();
    let mut core = Core {
        stable_hash: stable.hash.clone(),
        in_flight,
        promote_step: false,
        user_paused: false,
        aborting: None,
        abort_delay: abort_delay(ctx),
    };
    let mut retried = false;
    if let Some(hash) = core.in_flight.clone() {
        if commands.retry && status.abort {
            retry(ctx, out, status, &hash, kind);
            retried = true;
        }
        if commands.abort && !status.abort {
            let message = "rollout aborted by the user".to_string();
            core.abort(ctx, out, status, &hash, reason::ABORTED, message);
        }
        match commands.promote {
            Some(PromoteCommand::Full) if !status.abort => promote_full(ctx, out, status, kind),
            Some(PromoteCommand::Step) if !status.abort => core.promote_step = true,
            _ => {}
        }
    }
    let in_progress = core.active(status) || post_pending;
    core.user_paused = apply_user_pause(ctx, status, in_progress);
    (core, retried)
}

fn retry(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, hash: &str, kind: Kind) {
    status.abort = false;
    status.aborted_at = None;
    status.current_step_index = Some(0);
    status.analysis = None;
    if kind.restamps_steps() {
        status.step_started_at = Some(ctx.stamp());
    }
    remove_deadline(status, hash);
    end_step_pauses(ctx, status);
    let message = match kind {
        Kind::Canary { .. } => "rollout retried from the first step",
        Kind::BlueGreen => "rollout retried",
    };
    out.event(false, reason::RETRIED, message);
}

fn promote_full(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, kind: Kind) {
    status.current_step_index = Some(kind.full_promotion_index());
    if kind.restamps_steps() {
        status.step_started_at = Some(ctx.stamp());
    }
    end_step_pauses(ctx, status);
    release_run(ctx, out, status, RunSlot::Current);
    if kind.has_background_analysis() {
        release_run(ctx, out, status, RunSlot::Background);
    }
    let message = match kind {
        Kind::Canary { .. } => "full promotion requested: remaining steps and analysis skipped",
        Kind::BlueGreen => "full promotion requested: pre-promotion analysis skipped",
    };
    out.event(false, reason::PROMOTED_FULL, message);
}

/// `promote --full` was asked: it skips every gate, the background analysis included.
pub(crate) fn has_full_promotion(commands: &ManualCommands) -> bool {
    commands.promote == Some(PromoteCommand::Full)
}
