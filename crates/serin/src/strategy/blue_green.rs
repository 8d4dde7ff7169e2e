//! Decides the next move of a blue-green rollout: preview, pre-promotion gate, switch of the active
//! Service, post-promotion analysis and rollback, scale-down of the old version after its delay.
//!
//! The phases shared with canary (stable, revision, commands, abort, deadline, scale-down, verdicts) live in
//! `phases`; this module holds what only blue-green does.

use super::context::{
    add_deadline, others, pin_unless_serving_elsewhere, remove_deadline, revision_ref,
    scale_after_deadline, terminate_runs_of, Ctx, Out, RunSlot,
};
use super::phases::abort::{abort_reason, Abort};
use super::phases::commands::{apply_commands, delay_secs, take_commands};
use super::phases::deadline::{deadline_verdict, watch_progress, Progress};
use super::phases::gate::{analysis_gate, Analysis, Gate};
use super::phases::promote::{canary_revision, record_stable, stable_revision};
use super::phases::revision::{start_revision, InFlight};
use super::phases::scale_down::{leftovers_running, roles, scale_down_after_delay, tidy};
use super::phases::stable::{ensure_stable_replica_set, resolve, StableVersion};
use super::phases::verdicts::{failed, healthy, paused, progressing};
use super::phases::{Core, Kind};
use super::status::{end_pause, end_step_pauses, start_pause, Verdict};
use super::types::AnalysisPurpose;
use crate::crd::rollout::BlueGreenStatus;
use crate::crd::{reason, BlueGreenStrategy, RolloutPhase, RolloutStatus};

/// `currentStepIndex` of a blue-green rollout: the preview is up and waits for its gate.
pub const BLUE_GREEN_PREVIEW_STEP: i32 = 0;
/// `currentStepIndex` of a blue-green rollout: promotion was decided; the new version scales to full size
/// and the active Service switches to it.
pub const BLUE_GREEN_PROMOTE_STEP: i32 = 1;

/// The working state of one blue-green plan, passed from phase to phase.
struct Flight<'b> {
    /// `core.in_flight` is the version behind the preview, until it is switched to.
    core: Core,
    bg: &'b BlueGreenStrategy,
    idx: i32,
    state: BlueGreenStatus,
}

pub(crate) fn plan_blue_green(
    ctx: &Ctx<'_>,
    bg: &BlueGreenStrategy,
    out: &mut Out,
    status: &mut RolloutStatus,
) -> Verdict {
    let commands = take_commands(ctx, status);
    let mut state = status.blue_green.clone().unwrap_or_default();
    let stable = match resolve(ctx, out, status, &commands) {
        Ok(stable) => stable,
        Err(verdict) => return *verdict,
    };
    let in_flight = start_revision(ctx, out, status, &stable.hash, Kind::BlueGreen);
    match &in_flight {
        InFlight::Started(_) if state.post_promotion_pending => {
            // The version switched to is replaced before its post-promotion analysis finished.
            terminate_runs_of(ctx, out, &stable.hash);
            state.post_promotion_pending = false;
            state.preview_ready_at = None;
        }
        InFlight::Started(_) | InFlight::None => state.preview_ready_at = None,
        InFlight::Continuing(_) => {}
    }
    let post_pending = state.post_promotion_pending;
    let (core, retried) = apply_commands(
        ctx,
        out,
        status,
        &stable,
        in_flight.hash(),
        Kind::BlueGreen,
        post_pending,
    );
    if retried {
        state.preview_ready_at = None;
    }
    let mut flight = Flight {
        core,
        bg,
        idx: BLUE_GREEN_PREVIEW_STEP,
        state,
    };
    post_promotion(ctx, out, status, &mut flight);
    flight.idx = status.current_step_index.unwrap_or(BLUE_GREEN_PREVIEW_STEP);
    preview_and_switch(ctx, out, status, &mut flight);
    status.current_step_index = flight.core.in_flight.as_ref().map(|_| flight.idx);
    let progress = watch_progress(ctx, out, status, &mut flight.core);
    route_and_scale(ctx, out, status, &flight, &stable, progress);
    record_blue_green_status(out, status, &mut flight);
    verdict(ctx, out, status, flight, progress)
}

/// Post-promotion analysis of the version just switched to; on failure the active Service switches back to
/// the version kept running for exactly this.
fn post_promotion(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, f: &mut Flight<'_>) {
    if f.core.in_flight.is_some() || !f.state.post_promotion_pending {
        return;
    }
    let Some(post) = &f.bg.post_promotion_analysis else {
        f.state.post_promotion_pending = false;
        return;
    };
    let previous = f
        .state
        .previous_active_selector
        .clone()
        .filter(|h| ctx.rs(h).is_some_and(|rs| !rs.deleting));
    let analysis = Analysis::of(AnalysisPurpose::PostPromotion, &post.templates, &post.args);
    let (stable_hash, release) = (f.core.stable_hash.clone(), Some(RunSlot::Current));
    match analysis_gate(
        ctx,
        out,
        status,
        &mut f.core,
        analysis,
        &stable_hash,
        release,
    ) {
        Gate::Passed => f.state.post_promotion_pending = false,
        Gate::Waiting | Gate::Paused => {}
        Gate::Failed(message) => {
            f.state.post_promotion_pending = false;
            switch_back(ctx, out, status, f, previous, message);
        }
    }
}

fn switch_back(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    previous: Option<String>,
    message: String,
) {
    let Some(old) = previous else {
        f.core.aborting = Some(Abort {
            why: reason::ANALYSIS_FAILED.to_string(),
            message: format!("{message}; no previous version to switch back to"),
        });
        out.event(true, reason::ANALYSIS_FAILED, message);
        return;
    };
    let failed = f.core.stable_hash.clone();
    status.canary_revision = status.stable_revision.take();
    status.stable_revision = Some(revision_ref(ctx, &old));
    remove_deadline(status, &old);
    f.core
        .abort(ctx, out, status, &failed, reason::ANALYSIS_FAILED, message);
    f.core.stable_hash = old;
    f.core.in_flight = Some(failed);
}

/// Preview, pre-promotion gate, promotion decision, then the switch once the new version is at full size.
fn preview_and_switch(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
) {
    let Some(hash) = f.core.in_flight.clone() else {
        return;
    };
    if status.abort || f.core.user_paused {
        return;
    }
    let preview_target = f.bg.preview_replica_count.unwrap_or(ctx.replicas);
    if f.idx == BLUE_GREEN_PREVIEW_STEP && ctx.fully_available(&hash, preview_target) {
        let ready_at = f
            .state
            .preview_ready_at
            .get_or_insert_with(|| ctx.stamp())
            .0
            .as_second();
        if pre_promotion_passed(ctx, out, status, f, &hash) && !status.abort {
            decide_promotion(ctx, out, status, f, &hash, ready_at);
        }
    }
    if f.idx == BLUE_GREEN_PROMOTE_STEP && !status.abort && ctx.fully_available(&hash, ctx.replicas)
    {
        switch(ctx, out, status, f, hash);
    }
}

/// The pre-promotion gate; a failed analysis aborts the preview.
fn pre_promotion_passed(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    hash: &str,
) -> bool {
    let Some(pre) = &f.bg.pre_promotion_analysis else {
        return true;
    };
    let analysis = Analysis::of(AnalysisPurpose::PrePromotion, &pre.templates, &pre.args);
    match analysis_gate(ctx, out, status, &mut f.core, analysis, hash, None) {
        Gate::Passed => true,
        Gate::Waiting | Gate::Paused => false,
        Gate::Failed(message) => {
            let why = reason::ANALYSIS_FAILED;
            f.core.abort(ctx, out, status, hash, why, message);
            false
        }
    }
}

/// Promotion is decided by `promote`, or automatically after `autoPromotionSeconds`, or waits for a human.
fn decide_promotion(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    hash: &str,
    ready_at: i64,
) {
    if f.core.promote_step {
        end_pause(ctx, status, reason::PAUSED_BLUE_GREEN);
        f.idx = BLUE_GREEN_PROMOTE_STEP;
    } else if f.bg.auto_promotion_enabled.unwrap_or(true) {
        let at = ready_at + i64::from(f.bg.auto_promotion_seconds.unwrap_or(0));
        if ctx.now_s >= at {
            f.idx = BLUE_GREEN_PROMOTE_STEP;
        } else {
            out.requeue_at(at);
        }
    } else {
        start_pause(ctx, status, reason::PAUSED_BLUE_GREEN);
    }
    if f.idx == BLUE_GREEN_PROMOTE_STEP {
        out.event(false, reason::PROMOTED, format!("preview {hash} promoted"));
        status.step_started_at = Some(ctx.stamp());
    }
}

/// Both Services select the new version, which becomes stable; the old one is kept for its delay (and for
/// a switch back while the post-promotion analysis runs).
fn switch(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    hash: String,
) {
    out.set_selector(Some(f.bg.active_service.as_str()), Some(&hash));
    out.set_selector(f.bg.preview_service.as_deref(), Some(&hash));
    f.state.previous_active_selector = Some(f.core.stable_hash.clone());
    let switch_delay = delay_secs(f.bg.scale_down_delay_seconds);
    add_deadline(ctx, status, &f.core.stable_hash, switch_delay);
    let revision = record_stable(ctx, status, &hash);
    f.state.post_promotion_pending = f.bg.post_promotion_analysis.is_some();
    end_step_pauses(ctx, status);
    if let Some(analysis) = status.analysis.as_mut() {
        analysis.current_run = None;
    }
    out.event(
        false,
        reason::SWITCHED_ACTIVE,
        format!(
            "active Service {} now selects revision {revision} ({hash})",
            f.bg.active_service
        ),
    );
    f.core.stable_hash = hash;
    f.core.in_flight = None;
    f.idx = BLUE_GREEN_PREVIEW_STEP;
}

/// Pods the new version runs at this point: the preview's count, or full size once promotion is decided.
fn new_target(f: &Flight<'_>, n: i32) -> i32 {
    if f.idx == BLUE_GREEN_PROMOTE_STEP {
        n
    } else {
        f.bg.preview_replica_count.unwrap_or(n)
    }
}

/// Selectors first (a rollback switches back before anything shrinks), then replicas.
fn route_and_scale(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &Flight<'_>,
    stable: &StableVersion,
    progress: Progress,
) {
    let n = ctx.replicas;
    let active_svc = Some(f.bg.active_service.as_str());
    let preview_svc = f.bg.preview_service.as_deref();
    let active_new = f.core.in_flight.is_some() && !status.abort;
    let hold = stable.first_rollout && !progress.stable_healthy;
    if !stable.replacing || progress.stable_healthy {
        pin_unless_serving_elsewhere(ctx, out, active_svc, &f.core.stable_hash, hold);
        match (&f.core.in_flight, active_new) {
            (Some(hash), true) => out.set_selector(preview_svc, Some(hash)),
            _ => pin_unless_serving_elsewhere(ctx, out, preview_svc, &f.core.stable_hash, hold),
        }
    }
    ensure_stable_replica_set(ctx, out, status, &f.core.stable_hash);
    out.scale(ctx, &f.core.stable_hash, n);
    match (&f.core.in_flight, active_new) {
        (Some(hash), true) => {
            let target = new_target(f, n);
            out.ensure_rs(ctx, hash, canary_revision(status), target);
            out.scale(ctx, hash, target);
        }
        (Some(hash), false) => {
            scale_after_deadline(ctx, out, status, hash, false);
        }
        (None, _) => {}
    }
    let roles = roles(&f.core.stable_hash, f.core.in_flight.as_deref());
    let leftovers = others(ctx, &roles);
    let stable_full = ctx.fully_available(&f.core.stable_hash, n);
    let kept_for_rollback = |hash: &str| {
        f.state.post_promotion_pending && f.state.previous_active_selector.as_deref() == Some(hash)
    };
    scale_down_after_delay(ctx, out, status, &leftovers, stable_full, kept_for_rollback);
    tidy(ctx, out, status, &roles);
}

fn record_blue_green_status(out: &Out, status: &mut RolloutStatus, f: &mut Flight<'_>) {
    let selector = |service: &str| out.projected.selectors.get(service).cloned().flatten();
    let active = selector(&f.bg.active_service);
    let preview = f.bg.preview_service.as_deref().and_then(selector);
    f.state.active_selector = active;
    f.state.preview_selector = preview;
    if f.core.in_flight.is_none() {
        f.state.preview_ready_at = None;
    }
    status.blue_green = Some(f.state.clone());
    status.current_weight = Some(0);
    status.desired_weight = Some(0);
    status.traffic = None;
}

fn verdict(
    ctx: &Ctx<'_>,
    out: &Out,
    status: &RolloutStatus,
    f: Flight<'_>,
    progress: Progress,
) -> Verdict {
    let n = ctx.replicas;
    let stable_revision = stable_revision(status);
    let aborted = f.core.in_flight.is_some() && status.abort;
    if aborted || (f.core.aborting.is_some() && f.core.in_flight.is_none()) {
        let Abort { why, message } = abort_reason(ctx, f.core.aborting);
        let phase = if aborted {
            RolloutPhase::Aborted
        } else {
            RolloutPhase::Degraded
        };
        let summary = format!("active Service on revision {stable_revision}: {message}");
        return failed(phase, summary, why, message);
    }
    if progress.exceeded {
        return deadline_verdict(ctx);
    }
    if let Some(pause) = status.pause_conditions.first() {
        return paused(pause.reason.clone(), format!("paused: {}", pause.reason));
    }
    if let Some(hash) = &f.core.in_flight {
        let stage = if f.idx == BLUE_GREEN_PROMOTE_STEP {
            "promoting"
        } else {
            "preview"
        };
        let message = format!(
            "{stage}: revision {} has {}/{} pods available",
            canary_revision(status),
            ctx.available(hash),
            new_target(&f, n),
        );
        return progressing(reason::NEW_REVISION, message);
    }
    let leftovers = others(ctx, &roles(&f.core.stable_hash, None));
    let stable_full = ctx.fully_available(&f.core.stable_hash, n);
    if f.state.post_promotion_pending
        || !stable_full
        || leftovers_running(ctx, out, status, &leftovers)
    {
        let message = if f.state.post_promotion_pending {
            format!("revision {stable_revision} is active; post-promotion analysis running")
        } else {
            format!(
                "revision {stable_revision}: {}/{n} pods available",
                ctx.available(&f.core.stable_hash)
            )
        };
        return progressing(reason::WAITING_FOR_PODS, message);
    }
    healthy(format!(
        "revision {stable_revision} is active: {n}/{n} pods available"
    ))
}
