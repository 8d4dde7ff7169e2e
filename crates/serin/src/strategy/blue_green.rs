//! Decides the next move of a blue-green rollout: preview, pre-promotion gate, switch of the active
//! Service, post-promotion analysis and rollback, scale-down of the old version after its delay.

use super::canary::DEFAULT_SCALE_DOWN_DELAY_SECS;
use super::context::{
    accept_missing_stable, add_deadline, ensure_run, others, pin_unless_serving_elsewhere,
    prune_history, prune_runs, release_run, remove_deadline, resolve_stable, revision_ref,
    scale_after_deadline, terminate_runs_of, tidy_deadlines, Ctx, Out, RunSlot, RunState, Stable,
};
use super::status::{
    apply_user_pause, end_pause, end_step_pauses, fill_counts, previous_degraded,
    progress_deadline_exceeded, stable_missing, start_pause, Verdict,
    DEFAULT_PROGRESS_DEADLINE_SECS,
};
use super::types::AnalysisPurpose;
use crate::crd::rollout::{ManualCommands, PromoteCommand, RevisionRef};
use crate::crd::{reason, BlueGreenStrategy, RolloutPhase, RolloutStatus};

/// `currentStepIndex` of a blue-green rollout: the preview is up and waits for its gate.
pub const BLUE_GREEN_PREVIEW_STEP: i32 = 0;
/// `currentStepIndex` of a blue-green rollout: promotion was decided; the new version scales to full size
/// and the active Service switches to it.
pub const BLUE_GREEN_PROMOTE_STEP: i32 = 1;

pub(crate) fn plan_blue_green(
    ctx: &Ctx<'_>,
    bg: &BlueGreenStrategy,
    out: &mut Out,
    status: &mut RolloutStatus,
) -> Verdict {
    let n = ctx.replicas;
    let active_svc = Some(bg.active_service.as_str());
    let preview_svc = bg.preview_service.as_deref();
    let commands = ctx.prev.commands.clone().unwrap_or_default();
    status.commands = commands.paused.map(|paused| ManualCommands {
        paused: Some(paused),
        ..Default::default()
    });
    let abort_delay = i64::from(
        bg.abort_scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECS as i32),
    );
    let switch_delay = i64::from(
        bg.scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECS as i32),
    );
    let preview_target = bg.preview_replica_count.unwrap_or(n);
    let mut state = status.blue_green.clone().unwrap_or_default();
    let mut aborting: Option<(String, String)> = None;

    let mut first_rollout = false;
    let resolved = resolve_stable(ctx, status);
    // A stable replaced by a human's full promotion: its pods may still serve (a lagging cache), so the
    // Services stay where they are until the new stable can carry everything.
    let replacing = matches!(resolved, Stable::Missing(_));
    let mut stable_hash = match accept_missing_stable(out, resolved, &commands) {
        Stable::Known(hash) => hash,
        Stable::Missing(stable) => return stable_missing(ctx, out, status, &stable),
        Stable::First => {
            first_rollout = true;
            let revision = ctx.next_revision_for(&ctx.hash);
            status.stable_revision = Some(RevisionRef {
                pod_template_hash: ctx.hash.clone(),
                revision,
            });
            status.canary_revision = None;
            status.abort = false;
            status.aborted_at = None;
            end_step_pauses(ctx, status);
            ctx.hash.clone()
        }
    };
    remove_deadline(status, &stable_hash);

    let mut new_hash: Option<String> = None;
    if ctx.hash == stable_hash {
        if let Some(previous) = status.canary_revision.take() {
            if previous.pod_template_hash != stable_hash && !status.abort {
                out.event(
                    false,
                    reason::FAST_ROLLBACK,
                    format!(
                        "template is back to the active revision; preview {} leaves",
                        previous.pod_template_hash
                    ),
                );
            }
            terminate_runs_of(ctx, out, &previous.pod_template_hash);
        }
        status.abort = false;
        status.aborted_at = None;
        status.current_step_index = None;
        state.preview_ready_at = None;
        end_step_pauses(ctx, status);
    } else {
        let continuing = status
            .canary_revision
            .as_ref()
            .is_some_and(|c| c.pod_template_hash == ctx.hash);
        if !continuing {
            if let Some(previous) = &status.canary_revision {
                terminate_runs_of(ctx, out, &previous.pod_template_hash);
            }
            if state.post_promotion_pending {
                terminate_runs_of(ctx, out, &stable_hash);
                state.post_promotion_pending = false;
            }
            let revision = ctx.next_revision_for(&ctx.hash);
            status.canary_revision = Some(RevisionRef {
                pod_template_hash: ctx.hash.clone(),
                revision,
            });
            status.current_step_index = Some(BLUE_GREEN_PREVIEW_STEP);
            status.abort = false;
            status.aborted_at = None;
            status.analysis = None;
            status.step_started_at = Some(ctx.stamp());
            state.preview_ready_at = None;
            end_step_pauses(ctx, status);
            remove_deadline(status, &ctx.hash);
            out.event(
                false,
                reason::NEW_REVISION,
                format!(
                    "revision {revision} ({}) started behind the preview Service",
                    ctx.hash
                ),
            );
        }
        new_hash = Some(ctx.hash.clone());
    }

    let mut promote_step = false;
    if let Some(hash) = new_hash.clone() {
        if commands.retry && status.abort {
            status.abort = false;
            status.aborted_at = None;
            status.current_step_index = Some(BLUE_GREEN_PREVIEW_STEP);
            status.analysis = None;
            state.preview_ready_at = None;
            remove_deadline(status, &hash);
            end_step_pauses(ctx, status);
            out.event(false, reason::RETRIED, "rollout retried");
        }
        if commands.abort && !status.abort {
            aborting = Some(abort(
                ctx,
                out,
                status,
                &hash,
                abort_delay,
                reason::ABORTED,
                "rollout aborted by the user".into(),
            ));
        }
        match commands.promote {
            Some(PromoteCommand::Full) if !status.abort => {
                status.current_step_index = Some(BLUE_GREEN_PROMOTE_STEP);
                end_step_pauses(ctx, status);
                release_run(ctx, out, status, RunSlot::Current);
                out.event(
                    false,
                    reason::PROMOTED_FULL,
                    "full promotion requested: pre-promotion analysis skipped",
                );
            }
            Some(PromoteCommand::Step) if !status.abort => promote_step = true,
            _ => {}
        }
    }
    let in_progress = (new_hash.is_some() && !status.abort) || state.post_promotion_pending;
    let user_paused = apply_user_pause(ctx, status, in_progress);

    // Post-promotion analysis of the version just switched to.
    if new_hash.is_none() && state.post_promotion_pending {
        match &bg.post_promotion_analysis {
            None => state.post_promotion_pending = false,
            Some(post) => {
                let base = format!("{}-{}-post", ctx.name, stable_hash);
                let previous = state
                    .previous_active_selector
                    .clone()
                    .filter(|h| ctx.rs(h).is_some_and(|rs| !rs.deleting));
                match ensure_run(
                    ctx,
                    out,
                    status,
                    RunSlot::Current,
                    AnalysisPurpose::PostPromotion,
                    &base,
                    &post.templates,
                    &post.args,
                    &stable_hash,
                ) {
                    RunState::Successful => state.post_promotion_pending = false,
                    RunState::Waiting => {}
                    RunState::Inconclusive(_) if promote_step => {
                        promote_step = false;
                        end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                        release_run(ctx, out, status, RunSlot::Current);
                        state.post_promotion_pending = false;
                    }
                    RunState::Inconclusive(_) => {
                        start_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                    }
                    RunState::Failed(message) => match previous {
                        Some(old) => {
                            // Switch back to the version kept running for exactly this.
                            let failed = stable_hash.clone();
                            status.canary_revision = status.stable_revision.take();
                            status.stable_revision = Some(revision_ref(ctx, &old));
                            remove_deadline(status, &old);
                            state.post_promotion_pending = false;
                            aborting = Some(abort(
                                ctx,
                                out,
                                status,
                                &failed,
                                abort_delay,
                                reason::ANALYSIS_FAILED,
                                message,
                            ));
                            stable_hash = old;
                            new_hash = Some(failed);
                        }
                        None => {
                            state.post_promotion_pending = false;
                            aborting = Some((
                                reason::ANALYSIS_FAILED.to_string(),
                                format!("{message}; no previous version to switch back to"),
                            ));
                            out.event(true, reason::ANALYSIS_FAILED, message);
                        }
                    },
                }
            }
        }
    }

    // Preview, gate, promotion decision, switch.
    let mut idx = status.current_step_index.unwrap_or(BLUE_GREEN_PREVIEW_STEP);
    if let (Some(hash), false, false) = (new_hash.clone(), status.abort, user_paused) {
        if idx == BLUE_GREEN_PREVIEW_STEP && ctx.fully_available(&hash, preview_target) {
            let ready_at = state
                .preview_ready_at
                .get_or_insert_with(|| ctx.stamp())
                .0
                .as_second();
            let gate_passed = match &bg.pre_promotion_analysis {
                None => true,
                Some(pre) => {
                    let base = format!("{}-{}-pre", ctx.name, hash);
                    match ensure_run(
                        ctx,
                        out,
                        status,
                        RunSlot::Current,
                        AnalysisPurpose::PrePromotion,
                        &base,
                        &pre.templates,
                        &pre.args,
                        &stable_hash,
                    ) {
                        RunState::Successful => true,
                        RunState::Waiting => false,
                        RunState::Failed(message) => {
                            aborting = Some(abort(
                                ctx,
                                out,
                                status,
                                &hash,
                                abort_delay,
                                reason::ANALYSIS_FAILED,
                                message,
                            ));
                            false
                        }
                        RunState::Inconclusive(_) if promote_step => {
                            promote_step = false;
                            end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                            true
                        }
                        RunState::Inconclusive(_) => {
                            start_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                            false
                        }
                    }
                }
            };
            if gate_passed && !status.abort {
                if promote_step {
                    end_pause(ctx, status, reason::PAUSED_BLUE_GREEN);
                    idx = BLUE_GREEN_PROMOTE_STEP;
                } else if bg.auto_promotion_enabled.unwrap_or(true) {
                    let at = ready_at + i64::from(bg.auto_promotion_seconds.unwrap_or(0));
                    if ctx.now_s >= at {
                        idx = BLUE_GREEN_PROMOTE_STEP;
                    } else {
                        out.requeue_at(at);
                    }
                } else {
                    start_pause(ctx, status, reason::PAUSED_BLUE_GREEN);
                }
                if idx == BLUE_GREEN_PROMOTE_STEP {
                    out.event(false, reason::PROMOTED, format!("preview {hash} promoted"));
                    status.step_started_at = Some(ctx.stamp());
                }
            }
        }
        if idx == BLUE_GREEN_PROMOTE_STEP && !status.abort && ctx.fully_available(&hash, n) {
            out.set_selector(active_svc, Some(&hash));
            out.set_selector(preview_svc, Some(&hash));
            state.previous_active_selector = Some(stable_hash.clone());
            add_deadline(ctx, status, &stable_hash, switch_delay);
            let revision = status
                .canary_revision
                .take()
                .map(|r| r.revision)
                .unwrap_or_else(|| ctx.next_revision_for(&hash));
            status.stable_revision = Some(RevisionRef {
                pod_template_hash: hash.clone(),
                revision,
            });
            state.post_promotion_pending = bg.post_promotion_analysis.is_some();
            end_step_pauses(ctx, status);
            if let Some(analysis) = status.analysis.as_mut() {
                analysis.current_run = None;
            }
            out.event(
                false,
                reason::SWITCHED_ACTIVE,
                format!(
                    "active Service {} now selects revision {revision} ({hash})",
                    bg.active_service
                ),
            );
            stable_hash = hash;
            new_hash = None;
            idx = BLUE_GREEN_PREVIEW_STEP;
        }
    }
    status.current_step_index = new_hash.as_ref().map(|_| idx);

    fill_counts(ctx, status);
    let active_new = new_hash.is_some() && !status.abort;
    let stable_healthy_now = ctx.fully_available(&stable_hash, n);
    let watching = (active_new && !user_paused) || (new_hash.is_none() && !stable_healthy_now);
    let deadline_exceeded = progress_deadline_exceeded(ctx, out, status, watching);
    if deadline_exceeded && ctx.rollout.spec.progress_deadline_abort && active_new {
        if let Some(hash) = &new_hash {
            aborting = Some(abort(
                ctx,
                out,
                status,
                hash,
                abort_delay,
                reason::PROGRESS_DEADLINE_EXCEEDED,
                "progress deadline exceeded: aborting".into(),
            ));
        }
    }
    let active_new = new_hash.is_some() && !status.abort;
    let aborted = new_hash.is_some() && status.abort;

    // Act: selectors first (a rollback switches back before anything shrinks), then replicas.
    let hold = first_rollout && !stable_healthy_now;
    if !replacing || stable_healthy_now {
        pin_unless_serving_elsewhere(ctx, out, active_svc, &stable_hash, hold);
        match (&new_hash, active_new) {
            (Some(hash), true) => out.set_selector(preview_svc, Some(hash)),
            _ => pin_unless_serving_elsewhere(ctx, out, preview_svc, &stable_hash, hold),
        }
    }
    if ctx.rs(&stable_hash).is_none() {
        out.ensure_rs(
            ctx,
            &stable_hash,
            status
                .stable_revision
                .as_ref()
                .map(|r| r.revision)
                .unwrap_or(1),
            n,
        );
    }
    out.scale(ctx, &stable_hash, n);
    if let (Some(hash), true) = (&new_hash, active_new) {
        let target = if idx == BLUE_GREEN_PROMOTE_STEP {
            n
        } else {
            preview_target
        };
        let revision = status
            .canary_revision
            .as_ref()
            .map(|r| r.revision)
            .unwrap_or(0);
        out.ensure_rs(ctx, hash, revision, target);
        out.scale(ctx, hash, target);
    }
    if let (Some(hash), true) = (&new_hash, aborted) {
        scale_after_deadline(ctx, out, status, hash, false);
    }
    let roles: Vec<&str> = [Some(stable_hash.as_str()), new_hash.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let leftovers = others(ctx, &roles);
    let stable_full = ctx.fully_available(&stable_hash, n);
    for rs in &leftovers {
        let hash = rs.pod_template_hash.as_str();
        let kept_for_rollback =
            state.post_promotion_pending && state.previous_active_selector.as_deref() == Some(hash);
        if ctx.deadline(status, hash).is_some() {
            scale_after_deadline(ctx, out, status, hash, kept_for_rollback);
        } else if stable_full && !kept_for_rollback {
            out.scale(ctx, hash, 0);
        }
    }
    prune_runs(ctx, out, &roles);
    prune_history(ctx, out, status, &roles);
    tidy_deadlines(ctx, out, status);

    state.active_selector = out
        .world
        .selectors
        .get(&bg.active_service)
        .cloned()
        .flatten();
    state.preview_selector =
        preview_svc.and_then(|s| out.world.selectors.get(s).cloned().flatten());
    if new_hash.is_none() {
        state.preview_ready_at = None;
    }
    status.blue_green = Some(state.clone());
    status.current_weight = Some(0);
    status.desired_weight = Some(0);
    status.traffic = None;

    let stable_revision = status
        .stable_revision
        .as_ref()
        .map(|r| r.revision)
        .unwrap_or(0);
    if aborted || (aborting.is_some() && new_hash.is_none()) {
        let (why, message) = aborting
            .or_else(|| previous_degraded(ctx))
            .unwrap_or_else(|| (reason::ABORTED.to_string(), "rollout aborted".to_string()));
        let phase = if aborted {
            RolloutPhase::Aborted
        } else {
            RolloutPhase::Degraded
        };
        return Verdict {
            phase,
            message: format!("active Service on revision {stable_revision}: {message}"),
            progressing: ("False", why.clone(), message.clone()),
            degraded: Some((why, message)),
            invalid: None,
        };
    }
    if deadline_exceeded {
        let message = format!(
            "no progress for {}s",
            ctx.rollout
                .spec
                .progress_deadline_seconds
                .map(i64::from)
                .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECS)
        );
        return Verdict {
            phase: RolloutPhase::Degraded,
            message: message.clone(),
            progressing: (
                "False",
                reason::PROGRESS_DEADLINE_EXCEEDED.to_string(),
                message.clone(),
            ),
            degraded: Some((reason::PROGRESS_DEADLINE_EXCEEDED.to_string(), message)),
            invalid: None,
        };
    }
    if let Some(pause) = status.pause_conditions.first() {
        let message = format!("paused: {}", pause.reason);
        return Verdict {
            phase: RolloutPhase::Paused,
            message: message.clone(),
            progressing: ("Unknown", pause.reason.clone(), message),
            degraded: None,
            invalid: None,
        };
    }
    if let Some(hash) = &new_hash {
        let target = if idx == BLUE_GREEN_PROMOTE_STEP {
            n
        } else {
            preview_target
        };
        let stage = if idx == BLUE_GREEN_PROMOTE_STEP {
            "promoting"
        } else {
            "preview"
        };
        let message = format!(
            "{stage}: revision {} has {}/{target} pods available",
            status
                .canary_revision
                .as_ref()
                .map(|r| r.revision)
                .unwrap_or(0),
            ctx.available(hash)
        );
        return Verdict {
            phase: RolloutPhase::Progressing,
            message: message.clone(),
            progressing: ("True", reason::NEW_REVISION.to_string(), message),
            degraded: None,
            invalid: None,
        };
    }
    let leftovers_running = leftovers.iter().any(|rs| {
        ctx.deadline(status, &rs.pod_template_hash).is_none()
            && out.spec_of(&rs.pod_template_hash).unwrap_or(0) > 0
    });
    if state.post_promotion_pending || !stable_full || leftovers_running {
        let message = if state.post_promotion_pending {
            format!("revision {stable_revision} is active; post-promotion analysis running")
        } else {
            format!(
                "revision {stable_revision}: {}/{n} pods available",
                ctx.available(&stable_hash)
            )
        };
        return Verdict {
            phase: RolloutPhase::Progressing,
            message: message.clone(),
            progressing: ("True", reason::WAITING_FOR_PODS.to_string(), message),
            degraded: None,
            invalid: None,
        };
    }
    let message = format!("revision {stable_revision} is active: {n}/{n} pods available");
    Verdict {
        phase: RolloutPhase::Healthy,
        message: message.clone(),
        progressing: ("True", reason::ROLLOUT_COMPLETED.to_string(), message),
        degraded: None,
        invalid: None,
    }
}

fn abort(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    hash: &str,
    delay: i64,
    why: &'static str,
    message: String,
) -> (String, String) {
    status.abort = true;
    status.aborted_at = Some(ctx.stamp());
    end_step_pauses(ctx, status);
    add_deadline(ctx, status, hash, delay);
    terminate_runs_of(ctx, out, hash);
    if why == reason::ANALYSIS_FAILED {
        status.analysis.get_or_insert_with(Default::default).message = Some(message.clone());
    }
    out.event(true, reason::ABORTED, message.clone());
    (why.to_string(), message)
}
