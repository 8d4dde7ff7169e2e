//! Decides the next move of a canary rollout: steps, weights, replica counts, promotion, abort.

use super::context::{
    accept_missing_stable, add_deadline, ensure_run, others, pin_unless_serving_elsewhere,
    prune_history, prune_runs, release_run, remove_deadline, resolve_stable, scale_after_deadline,
    terminate_runs_of, tidy_deadlines, Ctx, Out, RunSlot, RunState, Stable, ROUTER_FOLLOW_UP_SECS,
};
use super::replicas::{
    canary_pods_needed, max_surge, max_unavailable, max_weight_carried, pods_for_weight,
    ratio_weight, scale_without_router, surge_pods_for_weight, ScaleInput,
};
use super::status::{
    apply_user_pause, end_pause, end_step_pauses, fill_counts, has_pause, previous_degraded,
    progress_deadline_exceeded, stable_missing, start_pause, Verdict,
};
use super::types::AnalysisPurpose;
use crate::crd::rollout::{CanaryStep, ManualCommands, PromoteCommand, RevisionRef, TrafficStatus};
use crate::crd::{reason, CanaryStrategy, RolloutPhase, RolloutStatus};
use crate::traffic::{DesiredTraffic, HeaderRoute, MirrorRoute};

/// Default of `abortScaleDownDelaySeconds` and `scaleDownDelaySeconds`.
pub const DEFAULT_SCALE_DOWN_DELAY_SECS: i64 = 30;

/// Weight the canary should have at step `index` (100 once all steps are done).
pub fn desired_weight(steps: &[CanaryStep], index: i32) -> i32 {
    let index = usize::try_from(index).unwrap_or(0);
    if index >= steps.len() {
        return 100;
    }
    steps[..=index]
        .iter()
        .rev()
        .find_map(|s| s.set_weight)
        .unwrap_or(0)
}

/// Canary size set by the latest setCanaryScale step up to `index`, unless it went back to the weight.
pub fn canary_scale_override(steps: &[CanaryStep], index: i32, total: i32) -> Option<i32> {
    let index = usize::try_from(index).unwrap_or(0);
    if index >= steps.len() {
        return None;
    }
    let scale = steps[..=index]
        .iter()
        .rev()
        .find_map(|s| s.set_canary_scale.as_ref())?;
    if scale.match_traffic_weight {
        return None;
    }
    scale
        .replicas
        .or_else(|| scale.weight.map(|w| pods_for_weight(total, w)))
}

/// Header and mirror routes in place at step `index` (the routes of steps up to and including it).
pub fn routes_at(steps: &[CanaryStep], index: i32) -> (Vec<HeaderRoute>, Vec<MirrorRoute>) {
    let end = usize::try_from(index.saturating_add(1))
        .unwrap_or(0)
        .min(steps.len());
    let mut headers: Vec<HeaderRoute> = Vec::new();
    let mut mirrors: Vec<MirrorRoute> = Vec::new();
    for step in &steps[..end] {
        if let Some(route) = &step.set_header_route {
            headers.retain(|r| r.name != route.name);
            if !route.matches.is_empty() {
                headers.push(HeaderRoute {
                    name: route.name.clone(),
                    matches: route.matches.clone(),
                });
            }
        }
        if let Some(route) = &step.set_mirror_route {
            mirrors.retain(|r| r.name != route.name);
            if let Some(percentage) = route.percentage.filter(|p| *p > 0) {
                mirrors.push(MirrorRoute {
                    name: route.name.clone(),
                    percentage,
                });
            }
        }
    }
    (headers, mirrors)
}

fn describe(step: &CanaryStep) -> String {
    if let Some(w) = step.set_weight {
        format!("setWeight {w}")
    } else if let Some(pause) = &step.pause {
        match &pause.duration {
            Some(d) => format!("pause {d}"),
            None => "pause until promoted".to_string(),
        }
    } else if step.set_canary_scale.is_some() {
        "setCanaryScale".to_string()
    } else if step.analysis.is_some() {
        "analysis".to_string()
    } else if let Some(route) = &step.set_header_route {
        format!("setHeaderRoute {}", route.name)
    } else if let Some(route) = &step.set_mirror_route {
        format!("setMirrorRoute {}", route.name)
    } else {
        "empty step".to_string()
    }
}

struct Abort {
    why: String,
    message: String,
}

pub(crate) fn plan_canary(
    ctx: &Ctx<'_>,
    canary: &CanaryStrategy,
    out: &mut Out,
    status: &mut RolloutStatus,
) -> Verdict {
    let steps = &canary.steps;
    let len = i32::try_from(steps.len()).unwrap_or(i32::MAX);
    let n = ctx.replicas;
    let router = canary.traffic_routing.is_some();
    let stable_svc = canary.stable_service.as_deref();
    let canary_svc = canary.canary_service.as_deref();
    let route_error: Option<String> = if router {
        match &ctx.observed.traffic {
            Some(Ok(_)) => None,
            Some(Err(message)) => Some(message.clone()),
            None => Some("the traffic router's state was not observed".to_string()),
        }
    } else {
        None
    };
    let commands = ctx.prev.commands.clone().unwrap_or_default();
    status.commands = commands.paused.map(|paused| ManualCommands {
        paused: Some(paused),
        ..Default::default()
    });
    let abort_delay = i64::from(
        canary
            .abort_scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECS as i32),
    );
    let promote_delay = i64::from(
        canary
            .scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECS as i32),
    );
    let mut aborting: Option<Abort> = None;

    // Which version is stable. Without one (first rollout) the current template becomes stable directly,
    // with no steps. A recorded stable whose ReplicaSet is not observed holds everything.
    let mut first_rollout = false;
    let resolved = resolve_stable(ctx, status);
    // A stable replaced by a human's full promotion: its pods may still serve (a lagging cache), so the
    // Services stay where they are until the new stable can carry everything.
    let replacing = matches!(resolved, Stable::Missing(_));
    let mut stable_hash = match accept_missing_stable(out, resolved, &commands) {
        Stable::Known(hash) => hash,
        Stable::Missing(stable) => return stable_missing(ctx, out, status, &stable),
        Stable::First => {
            let revision = ctx.next_revision_for(&ctx.hash);
            status.stable_revision = Some(RevisionRef {
                pod_template_hash: ctx.hash.clone(),
                revision,
            });
            status.canary_revision = None;
            status.abort = false;
            status.aborted_at = None;
            end_step_pauses(ctx, status);
            first_rollout = true;
            ctx.hash.clone()
        }
    };
    remove_deadline(status, &stable_hash);

    // Which version is the canary.
    let mut canary_hash: Option<String> = None;
    if ctx.hash == stable_hash {
        if let Some(previous) = status.canary_revision.take() {
            if previous.pod_template_hash != stable_hash {
                out.event(
                    false,
                    reason::FAST_ROLLBACK,
                    format!(
                        "template is back to stable revision {}; canary {} leaves without steps",
                        status
                            .stable_revision
                            .as_ref()
                            .map(|r| r.revision)
                            .unwrap_or(0),
                        previous.pod_template_hash
                    ),
                );
                terminate_runs_of(ctx, out, &previous.pod_template_hash);
            }
        }
        status.abort = false;
        status.aborted_at = None;
        end_step_pauses(ctx, status);
        status.current_step_index = Some(len);
    } else {
        let continuing = status
            .canary_revision
            .as_ref()
            .is_some_and(|c| c.pod_template_hash == ctx.hash);
        if !continuing {
            if let Some(previous) = &status.canary_revision {
                terminate_runs_of(ctx, out, &previous.pod_template_hash);
            }
            let revision = ctx.next_revision_for(&ctx.hash);
            status.canary_revision = Some(RevisionRef {
                pod_template_hash: ctx.hash.clone(),
                revision,
            });
            status.current_step_index = Some(0);
            status.abort = false;
            status.aborted_at = None;
            status.analysis = None;
            status.step_started_at = Some(ctx.stamp());
            end_step_pauses(ctx, status);
            remove_deadline(status, &ctx.hash);
            out.event(
                false,
                reason::NEW_REVISION,
                format!(
                    "revision {revision} ({}) started with {len} steps",
                    ctx.hash
                ),
            );
        }
        canary_hash = Some(ctx.hash.clone());
    }
    restart_changed_steps(ctx, out, status, steps, canary_hash.as_deref());

    // Manual commands.
    let mut promote_step = false;
    if let Some(hash) = canary_hash.clone() {
        if commands.retry && status.abort {
            status.abort = false;
            status.aborted_at = None;
            status.current_step_index = Some(0);
            status.analysis = None;
            status.step_started_at = Some(ctx.stamp());
            remove_deadline(status, &hash);
            end_step_pauses(ctx, status);
            out.event(
                false,
                reason::RETRIED,
                "rollout retried from the first step",
            );
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
                status.current_step_index = Some(len);
                status.step_started_at = Some(ctx.stamp());
                end_step_pauses(ctx, status);
                release_run(ctx, out, status, RunSlot::Current);
                release_run(ctx, out, status, RunSlot::Background);
                out.event(
                    false,
                    reason::PROMOTED_FULL,
                    "full promotion requested: remaining steps and analysis skipped",
                );
            }
            Some(PromoteCommand::Step) if !status.abort => promote_step = true,
            _ => {}
        }
    }
    let active = canary_hash.is_some() && !status.abort;
    let user_paused = apply_user_pause(ctx, status, active);
    let mut idx = status.current_step_index.unwrap_or(0).clamp(0, len);

    // Background analysis, then the steps.
    if let (Some(hash), Some(background), true) = (canary_hash.clone(), &canary.analysis, active) {
        let starting = background.starting_step.unwrap_or(0);
        if idx >= starting && !has_full_promotion(&commands) {
            let base = format!("{}-{}-background", ctx.name, hash);
            match ensure_run(
                ctx,
                out,
                status,
                RunSlot::Background,
                AnalysisPurpose::Background,
                &base,
                &background.templates,
                &background.args,
                &stable_hash,
            ) {
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
                }
                RunState::Inconclusive(_) if promote_step => {
                    promote_step = false;
                    release_run(ctx, out, status, RunSlot::Background);
                    end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                }
                RunState::Inconclusive(_) => {
                    start_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                }
                RunState::Waiting | RunState::Successful => {}
            }
        }
    }
    let mut step_inconclusive = false;
    if let (Some(hash), true) = (
        canary_hash.clone(),
        active && !status.abort && !user_paused && route_error.is_none(),
    ) {
        let background_inconclusive = has_pause(status, reason::PAUSED_INCONCLUSIVE)
            && status
                .analysis
                .as_ref()
                .and_then(|a| a.background_run.as_ref())
                .and_then(|r| r.phase.as_deref())
                == Some("Inconclusive");
        while idx < len && !background_inconclusive && !status.abort {
            let Some(step) = steps.get(usize::try_from(idx).unwrap_or(usize::MAX)) else {
                break;
            };
            let done = if let Some(weight) = step.set_weight {
                weight_reached(ctx, out, canary, &stable_hash, &hash, idx, weight)
            } else if let Some(pause) = &step.pause {
                let start = start_pause(ctx, status, reason::PAUSED_STEP);
                let finished = if promote_step {
                    promote_step = false;
                    true
                } else if let Some(duration) =
                    pause.duration.as_ref().and_then(|d| d.to_duration().ok())
                {
                    let secs = i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 4)
                        + i64::from(duration.subsec_nanos() > 0);
                    let end = start.saturating_add(secs);
                    if ctx.now_s >= end {
                        true
                    } else {
                        out.requeue_at(end);
                        false
                    }
                } else {
                    false
                };
                if finished {
                    end_pause(ctx, status, reason::PAUSED_STEP);
                }
                finished
            } else if step.set_canary_scale.is_some() {
                let target = canary_target(canary, steps, idx, n);
                ctx.available(&hash) >= target
            } else if let Some(analysis) = &step.analysis {
                let base = format!("{}-{}-step{}", ctx.name, hash, idx);
                match ensure_run(
                    ctx,
                    out,
                    status,
                    RunSlot::Current,
                    AnalysisPurpose::Step(idx),
                    &base,
                    &analysis.templates,
                    &analysis.args,
                    &stable_hash,
                ) {
                    RunState::Waiting => false,
                    RunState::Successful => true,
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
                        release_run(ctx, out, status, RunSlot::Current);
                        end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                        true
                    }
                    RunState::Inconclusive(_) => {
                        step_inconclusive = true;
                        start_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
                        false
                    }
                }
            } else {
                // Header or mirror route: done once the router reports the routes of this step.
                let (headers, mirrors) = routes_at(steps, idx);
                out.world.traffic.as_ref().is_some_and(|t| {
                    t.header_routes == headers.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
                        && t.mirror_routes
                            == mirrors.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
                })
            };
            if !done {
                break;
            }
            out.event(
                false,
                reason::STEP_REACHED,
                format!("step {}/{len} done: {}", idx + 1, describe(step)),
            );
            idx += 1;
            status.step_started_at = Some(ctx.stamp());
        }
    }
    if !step_inconclusive
        && has_pause(status, reason::PAUSED_INCONCLUSIVE)
        && status
            .analysis
            .as_ref()
            .and_then(|a| a.background_run.as_ref())
            .and_then(|r| r.phase.as_deref())
            != Some("Inconclusive")
    {
        end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
    }
    if canary_hash.is_some() {
        status.current_step_index = Some(idx);
    }

    // Promotion once all steps are done and the canary can carry everything.
    let background_confirms = background_confirms(ctx, canary, status, &commands);
    let can_promote = active
        && !status.abort
        && idx >= len
        && !user_paused
        && route_error.is_none()
        && status.pause_conditions.is_empty()
        && background_confirms;
    if let (Some(hash), true) = (canary_hash.clone(), can_promote) {
        let ready = if router {
            ctx.fully_available(&hash, n)
        } else {
            ctx.fully_available(&hash, n) && ctx.shrunk_to(&stable_hash, 0)
        };
        if ready {
            if router {
                // The canary Service must reach the canary before it takes everything (it may still be
                // pinned elsewhere when a revision starts and promotes in the same plan).
                out.set_selector(canary_svc, Some(&hash));
                let full = traffic(canary, 100, Vec::new(), Vec::new());
                out.set_traffic(full);
                out.set_selector(stable_svc, Some(&hash));
                out.set_traffic(traffic(canary, 0, Vec::new(), Vec::new()));
                add_deadline(ctx, status, &stable_hash, promote_delay);
            }
            let revision = status
                .canary_revision
                .take()
                .map(|r| r.revision)
                .unwrap_or_else(|| ctx.next_revision_for(&hash));
            status.stable_revision = Some(RevisionRef {
                pod_template_hash: hash.clone(),
                revision,
            });
            release_run(ctx, out, status, RunSlot::Background);
            end_step_pauses(ctx, status);
            out.event(
                false,
                reason::PROMOTED,
                format!("revision {revision} ({hash}) promoted to stable"),
            );
            stable_hash = hash;
            canary_hash = None;
        }
    }
    let active = canary_hash.is_some() && !status.abort;

    // Counts and the progress deadline, before acting: an exceeded deadline may abort.
    fill_counts(ctx, status);
    let stable_healthy_now = ctx.fully_available(&stable_hash, n);
    let watching = (active && !user_paused) || (canary_hash.is_none() && !stable_healthy_now);
    let deadline_exceeded = progress_deadline_exceeded(ctx, out, status, watching);
    if deadline_exceeded && ctx.rollout.spec.progress_deadline_abort && active {
        if let Some(hash) = &canary_hash {
            let message = "progress deadline exceeded: aborting".to_string();
            aborting = Some(abort(
                ctx,
                out,
                status,
                hash,
                abort_delay,
                reason::PROGRESS_DEADLINE_EXCEEDED,
                message,
            ));
        }
    }
    let active = canary_hash.is_some() && !status.abort;
    let aborted = canary_hash.is_some() && status.abort;

    // Act: weight decreases first, then selectors, scale-ups, weight increases, scale-downs.
    let dw = if active {
        desired_weight(steps, idx)
    } else {
        0
    };
    let revision_of_canary = status
        .canary_revision
        .as_ref()
        .map(|r| r.revision)
        .unwrap_or(0);
    let canary_spec_before = canary_hash
        .as_deref()
        .and_then(|h| out.spec_of(h))
        .unwrap_or(0);

    let mut traffic_emitted = false;
    let mut late_traffic: Option<DesiredTraffic> = None;
    if router && route_error.is_none() {
        let current = out
            .world
            .traffic
            .as_ref()
            .map(|t| t.canary_weight)
            .unwrap_or(0);
        let (routed, headers, mirrors) = match (&canary_hash, active) {
            (Some(hash), true) => {
                let available = ctx.available(hash);
                // Until the canary has the pods for the step's weight, keep the weight Serin set for this
                // canary (or what the router carries after a lost status write), whichever is higher,
                // within what the available pods can carry.
                let set_before = match &ctx.prev.canary_revision {
                    Some(previous) if previous.pod_template_hash == *hash && !ctx.prev.abort => {
                        ctx.prev.current_weight.unwrap_or(0)
                    }
                    _ => 0,
                };
                // All traffic moves only within the promotion itself (which switches the stable Service in
                // the same plan); before that the canary keeps the last step's weight.
                let target = match (idx >= len, len) {
                    (true, 0) => 0,
                    (true, _) => desired_weight(steps, len - 1).min(99),
                    (false, _) => dw,
                };
                let routed = if available >= canary_pods_needed(n, target) {
                    target
                } else {
                    [set_before, current]
                        .into_iter()
                        .filter(|w| *w <= target && canary_pods_needed(n, *w) <= available)
                        .max()
                        .unwrap_or_else(|| max_weight_carried(n, available).min(target))
                };
                let (headers, mirrors) = routes_at(steps, idx);
                (routed, headers, mirrors)
            }
            _ => (0, Vec::new(), Vec::new()),
        };
        let desired = traffic(canary, routed, headers, mirrors);
        if routed <= current {
            let before = out.actions.len();
            out.set_traffic(desired);
            traffic_emitted |= out.actions.len() > before;
        } else {
            late_traffic = Some(desired);
        }
    }

    // Selectors. When Serin takes over without a stable in status, a Service that still sends traffic to
    // older pods stays where it is until the new pods can carry everything.
    let router_state_known = route_error.is_none();
    // While the router cannot be read, the canary Service may still carry traffic: it is not re-pinned.
    let hold = first_rollout && !stable_healthy_now;
    let canary_svc_movable = if router && !router_state_known {
        None
    } else {
        canary_svc
    };
    match (&canary_hash, active) {
        (Some(hash), true) => {
            out.set_selector(stable_svc, if router { Some(&stable_hash) } else { None });
            out.set_selector(canary_svc_movable, Some(hash));
        }
        _ if replacing && !stable_healthy_now => {}
        _ => {
            pin_unless_serving_elsewhere(ctx, out, stable_svc, &stable_hash, hold);
            pin_unless_serving_elsewhere(ctx, out, canary_svc_movable, &stable_hash, hold);
        }
    }

    // Replica targets.
    let roles: Vec<&str> = [Some(stable_hash.as_str()), canary_hash.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let leftovers = others(ctx, &roles);
    let mut scale_ups: Vec<(String, i32)> = Vec::new();
    let mut scale_downs: Vec<(String, i32)> = Vec::new();
    let mut push = |hash: &str, from: i32, to: i32| {
        if to > from {
            scale_ups.push((hash.to_string(), to));
        } else if to < from {
            scale_downs.push((hash.to_string(), to));
        }
    };
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
    let stable_spec = out.spec_of(&stable_hash).unwrap_or(0);
    if router {
        push(&stable_hash, stable_spec, n);
        if let (Some(hash), true) = (&canary_hash, active) {
            // While the router cannot be read the canary may carry traffic: it never shrinks then.
            let target = if router_state_known {
                canary_target(canary, steps, idx, n)
            } else {
                canary_target(canary, steps, idx, n).max(canary_spec_before)
            };
            if ctx.rs(hash).is_none() {
                out.ensure_rs(ctx, hash, revision_of_canary, target);
            } else {
                out.ensure_rs(ctx, hash, revision_of_canary, target);
                push(hash, canary_spec_before, target);
            }
        }
    } else {
        let unavailable = max_unavailable(canary.max_unavailable.as_ref(), n).unwrap_or(0);
        // Through the steps the stable keeps its full size and the canary runs beside it (its target is
        // already limited by maxSurge, or set by setCanaryScale); only the promotion replaces the stable, and
        // a promotion on hold (a pause) keeps the last step's canary.
        let promoting =
            idx >= len && !user_paused && status.pause_conditions.is_empty() && background_confirms;
        let canary_goal = if idx >= len && !promoting && len > 0 {
            canary_target(canary, steps, len - 1, n)
        } else {
            canary_target(canary, steps, idx, n)
        };
        let configured_surge = canary_surge_cap(canary, n);
        let surge = match (&canary_hash, active, promoting) {
            (Some(_), true, false) => canary_goal.max(configured_surge),
            _ => configured_surge,
        };
        let stable_target = match (&canary_hash, active, promoting) {
            (Some(_), true, true) => 0,
            _ => n,
        };
        // Only pods behind the stable Service (as it will select after this plan) carry traffic, so only
        // they count towards the availability floor; the others may go freely.
        let pinned = stable_svc.and_then(|svc| out.world.selectors.get(svc).cloned().flatten());
        let serving = |hash: &str| match &pinned {
            Some(selected) if selected != hash => 0,
            _ => ctx.available(hash),
        };
        let stable_input = ScaleInput {
            spec: stable_spec,
            available: serving(&stable_hash),
            target: stable_target,
            hold: false,
        };
        let canary_input = match (&canary_hash, active) {
            (Some(hash), true) => Some(ScaleInput {
                spec: canary_spec_before,
                available: serving(hash),
                target: canary_goal,
                hold: false,
            }),
            _ => None,
        };
        // Old versions behind an unpinned stable Service still serve: they leave within the availability
        // budget once their delay (if any) has passed, and count for nothing while they are held.
        let other_inputs: Vec<ScaleInput> = leftovers
            .iter()
            .map(|rs| {
                let hash = rs.pod_template_hash.as_str();
                // Versions that no longer serve are kept until the stable can carry everything, for a
                // quick way back (fast rollback); those still serving leave within the budget.
                let idle_until_stable_full = serving(hash) == 0
                    && ctx.available(hash) > 0
                    && !ctx.fully_available(&stable_hash, n);
                let held = idle_until_stable_full
                    || ctx
                        .deadline(status, hash)
                        .is_some_and(|due| due > ctx.now_s);
                ScaleInput {
                    spec: out.spec_of(hash).unwrap_or(0),
                    available: if held { 0 } else { serving(hash) },
                    target: 0,
                    hold: held,
                }
            })
            .collect();
        let (stable_new, canary_new, others_new) = scale_without_router(
            n,
            surge,
            unavailable,
            &stable_input,
            canary_input.as_ref(),
            &other_inputs,
        );
        push(&stable_hash, stable_spec, stable_new);
        if let (Some(hash), Some(target)) = (&canary_hash, canary_new) {
            if ctx.rs(hash).is_none() {
                out.ensure_rs(ctx, hash, revision_of_canary, target);
            } else {
                out.ensure_rs(ctx, hash, revision_of_canary, target);
                push(hash, canary_spec_before, target);
            }
        }
        for (rs, new) in leftovers.iter().zip(others_new) {
            let hash = rs.pod_template_hash.as_str();
            match ctx.deadline(status, hash) {
                Some(due) if due > ctx.now_s => out.requeue_at(due),
                _ => push(hash, out.spec_of(hash).unwrap_or(0), new),
            }
        }
    }
    for (hash, to) in &scale_ups {
        out.scale(ctx, hash, *to);
    }
    if let Some(desired) = late_traffic {
        let before = out.actions.len();
        out.set_traffic(desired);
        traffic_emitted |= out.actions.len() > before;
    }
    for (hash, to) in &scale_downs {
        out.scale(ctx, hash, *to);
    }
    // Scale-downs that wait for a delay: the aborted canary and old versions.
    if aborted {
        if let Some(hash) = &canary_hash {
            scale_after_deadline(ctx, out, status, hash, !router_state_known);
        }
    }
    let stable_full = ctx.fully_available(&stable_hash, n);
    for rs in leftovers.iter().filter(|_| router) {
        let hash = rs.pod_template_hash.as_str();
        if ctx.deadline(status, hash).is_some() {
            scale_after_deadline(ctx, out, status, hash, !router_state_known);
        } else if router_state_known && stable_full {
            out.scale(ctx, hash, 0);
        }
    }
    if traffic_emitted {
        out.requeue_at(ctx.now_s + ROUTER_FOLLOW_UP_SECS);
        if let (Some(Ok(observed)), Some(previous)) =
            (&ctx.observed.traffic, ctx.prev.current_weight)
        {
            if observed.canary_weight != previous {
                out.event(
                    true,
                    reason::TRAFFIC_DRIFT,
                    format!(
                    "router carried {}% to the canary where Serin had set {previous}%: set again",
                    observed.canary_weight
                ),
                );
            }
        }
    }
    let keep: Vec<&str> = roles.clone();
    prune_runs(ctx, out, &keep);
    prune_history(ctx, out, status, &keep);
    tidy_deadlines(ctx, out, status);

    // Status.
    status.desired_weight = Some(dw);
    status.current_weight = Some(if router {
        match &out.world.traffic {
            Some(t) => t.canary_weight,
            None => ctx.prev.current_weight.unwrap_or(0),
        }
    } else {
        match (&canary_hash, active) {
            (Some(hash), true) => ratio_weight(ctx.ready(hash), ctx.ready(&stable_hash)),
            _ => 0,
        }
    });
    status.traffic = Some(TrafficStatus {
        router: Some(router_name(canary).to_string()),
        header_routes: out
            .world
            .traffic
            .as_ref()
            .map(|t| t.header_routes.clone())
            .unwrap_or_default(),
        mirror_routes: out
            .world
            .traffic
            .as_ref()
            .map(|t| t.mirror_routes.clone())
            .unwrap_or_default(),
    });
    if canary_hash.is_none() {
        status.current_step_index = Some(len);
    }

    let stable_revision = status
        .stable_revision
        .as_ref()
        .map(|r| r.revision)
        .unwrap_or(0);
    let leftovers_running = leftovers.iter().any(|rs| {
        ctx.deadline(status, &rs.pod_template_hash).is_none()
            && out.spec_of(&rs.pod_template_hash).unwrap_or(0) > 0
    });
    if aborted {
        let (why, message) = match aborting {
            Some(a) => (a.why, a.message),
            None => previous_degraded(ctx)
                .unwrap_or_else(|| (reason::ABORTED.to_string(), "rollout aborted".to_string())),
        };
        return Verdict {
            phase: RolloutPhase::Aborted,
            message: format!(
                "aborted, all traffic on stable revision {stable_revision}: {message}"
            ),
            progressing: ("False", why.clone(), message.clone()),
            degraded: Some((why, message)),
            invalid: None,
        };
    }
    if let (Some(message), true) = (&route_error, router) {
        let message = format!("traffic router: {message}");
        return Verdict {
            phase: RolloutPhase::Degraded,
            message: message.clone(),
            progressing: ("False", reason::ROUTE_MISSING.to_string(), message.clone()),
            degraded: Some((reason::ROUTE_MISSING.to_string(), message)),
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
                .unwrap_or(super::status::DEFAULT_PROGRESS_DEADLINE_SECS)
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
    let step_text = steps
        .get(usize::try_from(idx).unwrap_or(usize::MAX))
        .map(|s| format!("step {}/{len} ({})", idx + 1, describe(s)))
        .unwrap_or_else(|| "promotion".to_string());
    if let Some(pause) = status.pause_conditions.first() {
        let message = format!("paused at {step_text}: {}", pause.reason);
        return Verdict {
            phase: RolloutPhase::Paused,
            message: message.clone(),
            progressing: ("Unknown", pause.reason.clone(), message),
            degraded: None,
            invalid: None,
        };
    }
    if let Some(hash) = &canary_hash {
        let waiting = if idx >= len && !background_confirms {
            "; waiting for the background analysis to measure the canary healthy"
        } else {
            ""
        };
        let message = format!(
            "revision {revision_of_canary} at {step_text}: weight {}/{dw}, canary {}/{} available{waiting}",
            status.current_weight.unwrap_or(0),
            ctx.available(hash),
            canary_target(canary, steps, idx, n),
        );
        return Verdict {
            phase: RolloutPhase::Progressing,
            message: message.clone(),
            progressing: ("True", reason::NEW_REVISION.to_string(), message),
            degraded: None,
            invalid: None,
        };
    }
    if !stable_full || leftovers_running || out.spec_of(&stable_hash) != Some(n) {
        let message = format!(
            "revision {stable_revision}: {}/{n} pods available",
            ctx.available(&stable_hash)
        );
        return Verdict {
            phase: RolloutPhase::Progressing,
            message: message.clone(),
            progressing: ("True", reason::WAITING_FOR_PODS.to_string(), message),
            degraded: None,
            invalid: None,
        };
    }
    let message = format!("revision {stable_revision} is stable: {n}/{n} pods available");
    Verdict {
        phase: RolloutPhase::Healthy,
        message: message.clone(),
        progressing: ("True", reason::ROLLOUT_COMPLETED.to_string(), message),
        degraded: None,
        invalid: None,
    }
}

/// Background analysis must vouch for the canary at the moment of promotion: its run measured every metric and
/// the latest measurement of each was Successful (or the run completed Successful). A run that only errored
/// since its last success (Prometheus down) holds the promotion until it answers again or errs past its limit
/// (safety rules 9 and 10). A human's full promotion skips it.
fn background_confirms(
    ctx: &Ctx<'_>,
    canary: &CanaryStrategy,
    status: &RolloutStatus,
    commands: &ManualCommands,
) -> bool {
    if canary.analysis.is_none() || has_full_promotion(commands) {
        return true;
    }
    status
        .analysis
        .as_ref()
        .and_then(|a| a.background_run.as_ref())
        .and_then(|reference| ctx.run(&reference.name))
        .is_some_and(|run| {
            run.phase == crate::crd::AnalysisPhase::Successful
                || (run.latest_successful && !run.phase.is_completed() && !run.terminating)
        })
}

fn has_full_promotion(commands: &ManualCommands) -> bool {
    commands.promote == Some(PromoteCommand::Full)
}

fn router_name(canary: &CanaryStrategy) -> &'static str {
    match &canary.traffic_routing {
        None => "replicas",
        Some(routing) if routing.gateway_api.is_some() => "gatewayAPI",
        Some(routing) if routing.istio.is_some() => "istio",
        Some(_) => "nginx",
    }
}

fn traffic(
    canary: &CanaryStrategy,
    weight: i32,
    header_routes: Vec<HeaderRoute>,
    mirror_routes: Vec<MirrorRoute>,
) -> DesiredTraffic {
    DesiredTraffic {
        stable_service: canary.stable_service.clone().unwrap_or_default(),
        canary_service: canary.canary_service.clone().unwrap_or_default(),
        canary_weight: weight,
        header_routes,
        mirror_routes,
    }
}

/// Canary pods at step `index`: with a router, what its weight needs (never less, safety rule 1) or more
/// if setCanaryScale asks; without one, setCanaryScale or the pods that, beside the full stable, carry the
/// weight's share (safety rule 11), and the full size once all steps are done (the promotion).
fn canary_target(canary: &CanaryStrategy, steps: &[CanaryStep], index: i32, total: i32) -> i32 {
    let weight = desired_weight(steps, index);
    let scale = canary_scale_override(steps, index, total);
    if canary.traffic_routing.is_some() {
        canary_pods_needed(total, weight).max(scale.unwrap_or(0))
    } else if usize::try_from(index).map_or(true, |i| i >= steps.len()) {
        total
    } else {
        scale.unwrap_or_else(|| {
            surge_pods_for_weight(total, weight, canary_surge_cap(canary, total))
        })
    }
}

/// The most canary pods a canary without a router may run beside its full stable: `maxSurge` when set, else
/// as many as the stable has (so a rollout costs at most twice its pods, as a blue-green one does, and a
/// weight above 50% gets the closest share that allows).
fn canary_surge_cap(canary: &CanaryStrategy, total: i32) -> i32 {
    match &canary.max_surge {
        Some(surge) => max_surge(Some(surge), total).unwrap_or(1),
        None => total,
    }
}

/// A setWeight step is done when the observed split is what the weight says (safety rule 1): with a router,
/// the router carries the weight and the canary has the pods for it; without one, the canary has its pods
/// available and the stable has shrunk to the rest.
fn weight_reached(
    ctx: &Ctx<'_>,
    out: &Out,
    canary: &CanaryStrategy,
    stable: &str,
    hash: &str,
    index: i32,
    weight: i32,
) -> bool {
    let n = ctx.replicas;
    let target = canary_target(canary, &canary.steps, index, n);
    if canary.traffic_routing.is_some() {
        let Some(carried) = out.world.traffic.as_ref().map(|t| t.canary_weight) else {
            return false;
        };
        // A router already at a later step's weight (a plan whose status write was lost) counts as past
        // this step, so the weight does not step back.
        let later = usize::try_from(index)
            .ok()
            .and_then(|i| canary.steps.get(i + 1..))
            .is_some_and(|rest| rest.iter().any(|s| s.set_weight == Some(carried)));
        ctx.available(hash) >= canary_pods_needed(n, weight.max(carried))
            && (carried == weight || (carried > weight && later))
    } else {
        // The stable keeps its full size through the steps, so the canary's share is what its pods give.
        ctx.available(hash) >= target
            && ctx.shrunk_to(hash, target)
            && ctx.fully_available(stable, n)
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

/// Steps that changed under a revision in flight start again from the first (as Argo Rollouts does): an index
/// into another list of steps would skip pauses and analysis, or repeat them. An aborted revision only records
/// the new steps; `retry` starts it from the first step anyway.
fn restart_changed_steps(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    steps: &[CanaryStep],
    canary_hash: Option<&str>,
) {
    let current = super::hash::steps_hash(steps);
    let in_flight = ctx
        .prev
        .canary_revision
        .as_ref()
        .is_some_and(|c| Some(c.pod_template_hash.as_str()) == canary_hash);
    let changed = ctx
        .prev
        .steps_hash
        .as_deref()
        .is_some_and(|recorded| recorded != current);
    if let (Some(hash), true, true, false) = (canary_hash, in_flight, changed, status.abort) {
        status.current_step_index = Some(0);
        status.step_started_at = Some(ctx.stamp());
        end_step_pauses(ctx, status);
        release_run(ctx, out, status, RunSlot::Current);
        remove_deadline(status, hash);
        out.event(
            false,
            reason::STEPS_CHANGED,
            format!(
                "steps changed while revision {} was at step {}: starting again from the first step",
                status.canary_revision.as_ref().map(|r| r.revision).unwrap_or(0),
                ctx.prev.current_step_index.unwrap_or(0) + 1
            ),
        );
    }
    status.steps_hash = Some(current);
}
