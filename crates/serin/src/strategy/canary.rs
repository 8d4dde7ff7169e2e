//! Decides the next move of a canary rollout: steps, weights, replica counts, promotion, abort.

use super::context::{
    add_deadline, others, pin_unless_serving_elsewhere, release_run, remove_deadline,
    scale_after_deadline, Ctx, Out, RunSlot, ROUTER_FOLLOW_UP_SECS,
};
use super::phases::abort::{abort_reason, Abort};
use super::phases::commands::{apply_commands, delay_secs, has_full_promotion, take_commands};
use super::phases::deadline::{deadline_verdict, watch_progress, Progress};
use super::phases::gate::{analysis_gate, Analysis, Gate};
use super::phases::promote::{canary_revision, record_stable, stable_revision};
use super::phases::revision::start_revision;
use super::phases::scale_down::{leftovers_running, roles, scale_down_after_delay, tidy};
use super::phases::stable::{ensure_stable_replica_set, resolve, StableVersion};
use super::phases::verdicts::{failed, healthy, paused, progressing};
use super::phases::{Core, Kind};
use super::replicas::{
    canary_pods_needed, max_surge, max_unavailable, max_weight_carried, pods_for_weight,
    ratio_weight, scale_without_router, surge_pods_for_weight, ScaleInput,
};
use super::status::{end_pause, end_step_pauses, has_pause, start_pause, Verdict};
use super::types::{AnalysisPurpose as Purpose, ObservedReplicaSet};
use super::types::{DesiredTraffic, HeaderRoute, MirrorRoute, ObservedTraffic, RouteState};
use crate::crd::rollout::{CanaryStep, ManualCommands, TrafficStatus};
use crate::crd::{reason, CanaryStrategy, RolloutPhase, RolloutStatus};

pub use super::phases::commands::DEFAULT_SCALE_DOWN_DELAY_SECS;

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

/// The working state of one canary plan, passed from phase to phase.
struct Flight<'c> {
    core: Core,
    canary: &'c CanaryStrategy,
    /// Number of steps.
    len: i32,
    router: bool,
    /// Why the router's state is unknown (never set without a router).
    /// Why the router cannot be relied on: the reason and the message.
    route_error: Option<(&'static str, String)>,
    commands: ManualCommands,
    idx: i32,
    /// The background analysis vouches for the canary now (or there is none to ask).
    background_confirms: bool,
}

pub(crate) fn plan_canary(
    ctx: &Ctx<'_>,
    canary: &CanaryStrategy,
    out: &mut Out,
    status: &mut RolloutStatus,
) -> Verdict {
    let len = i32::try_from(canary.steps.len()).unwrap_or(i32::MAX);
    let route_error = route_error(ctx, canary);
    let commands = take_commands(ctx, status);
    let stable = match resolve(ctx, out, status, &commands) {
        Ok(stable) => stable,
        Err(verdict) => return *verdict,
    };
    let kind = Kind::Canary { steps: len };
    let canary_hash = start_revision(ctx, out, status, &stable.hash, kind).hash();
    restart_changed_steps(ctx, out, status, &canary.steps, canary_hash.as_deref());
    let (core, _) = apply_commands(ctx, out, status, &stable, canary_hash, kind, false);
    let mut f = Flight {
        core,
        canary,
        len,
        router: canary.traffic_routing.is_some(),
        route_error,
        commands,
        idx: status.current_step_index.unwrap_or(0).clamp(0, len),
        background_confirms: false,
    };
    background_analysis(ctx, out, status, &mut f);
    run_steps(ctx, out, status, &mut f);
    f.background_confirms = background_confirms(ctx, canary, status, &f.commands);
    promote(ctx, out, status, &mut f);
    let progress = watch_progress(ctx, out, status, &mut f.core);
    let leftovers = route_and_scale(ctx, out, status, &f, &stable, progress);
    record_canary_status(ctx, out, status, &f);
    verdict(ctx, out, status, f, &leftovers, progress)
}

/// Why the router's state is unknown, when the canary has a router.
fn route_error(ctx: &Ctx<'_>, canary: &CanaryStrategy) -> Option<(&'static str, String)> {
    canary.traffic_routing.as_ref()?;
    match &ctx.observed.traffic {
        RouteState::Observed(_) => None,
        RouteState::Invalid(message) => Some((reason::ROUTE_MISSING, message.clone())),
        RouteState::Unreadable { category, message } => {
            Some((reason::ROUTE_UNREADABLE, format!("{message} ({category})")))
        }
        RouteState::NotConfigured => Some((
            reason::ROUTE_UNREADABLE,
            "the traffic router's state was not observed".to_string(),
        )),
    }
}

/// The background analysis measures the canary from its starting step on; a failure aborts it.
fn background_analysis(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
) {
    let (Some(hash), Some(background), true) = (
        f.core.in_flight.clone(),
        &f.canary.analysis,
        f.core.active(status),
    ) else {
        return;
    };
    if f.idx < background.starting_step.unwrap_or(0) || has_full_promotion(&f.commands) {
        return;
    }
    let analysis = Analysis::of(Purpose::Background, &background.templates, &background.args);
    let release = Some(RunSlot::Background);
    if let Gate::Failed(message) =
        analysis_gate(ctx, out, status, &mut f.core, analysis, &hash, release)
    {
        f.core
            .abort(ctx, out, status, &hash, reason::ANALYSIS_FAILED, message);
    }
}

/// Runs the steps from the current one for as long as each is done; then records where the canary is.
fn run_steps(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, f: &mut Flight<'_>) {
    let mut step_inconclusive = false;
    let runnable = f.core.active(status) && !f.core.user_paused && f.route_error.is_none();
    if let (Some(hash), true) = (f.core.in_flight.clone(), runnable) {
        let background_inconclusive = has_pause(status, reason::PAUSED_INCONCLUSIVE)
            && background_phase(status) == Some("Inconclusive");
        while f.idx < f.len && !background_inconclusive && !status.abort {
            let Some(step) = f
                .canary
                .steps
                .get(usize::try_from(f.idx).unwrap_or(usize::MAX))
            else {
                break;
            };
            let done = match step_gate(ctx, out, status, f, &hash, step) {
                Gate::Passed => true,
                Gate::Paused => {
                    step_inconclusive = true;
                    false
                }
                Gate::Waiting | Gate::Failed(_) => false,
            };
            if !done {
                break;
            }
            let message = format!("step {}/{} done: {}", f.idx + 1, f.len, describe(step));
            out.event(false, reason::STEP_REACHED, message);
            f.idx += 1;
            status.step_started_at = Some(ctx.stamp());
        }
    }
    // An inconclusive pause that neither this step's analysis nor the background one holds any more ends.
    if !step_inconclusive
        && has_pause(status, reason::PAUSED_INCONCLUSIVE)
        && background_phase(status) != Some("Inconclusive")
    {
        end_pause(ctx, status, reason::PAUSED_INCONCLUSIVE);
    }
    if f.core.in_flight.is_some() {
        status.current_step_index = Some(f.idx);
    }
}

fn background_phase(status: &RolloutStatus) -> Option<&str> {
    status
        .analysis
        .as_ref()
        .and_then(|a| a.background_run.as_ref())
        .and_then(|r| r.phase.as_deref())
}

/// Whether step `f.idx` is done. A failed step analysis aborts the canary.
fn step_gate(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    hash: &str,
    step: &CanaryStep,
) -> Gate {
    let passed = |done: bool| if done { Gate::Passed } else { Gate::Waiting };
    let (canary, idx, n) = (f.canary, f.idx, ctx.replicas);
    if let Some(weight) = step.set_weight {
        passed(weight_reached(
            ctx,
            out,
            canary,
            &f.core.stable_hash,
            hash,
            idx,
            weight,
        ))
    } else if let Some(pause) = &step.pause {
        passed(pause_done(ctx, out, status, f, pause))
    } else if step.set_canary_scale.is_some() {
        passed(ctx.available(hash) >= canary_target(canary, &canary.steps, idx, n))
    } else if let Some(analysis) = &step.analysis {
        let analysis = Analysis::of(Purpose::Step(idx), &analysis.templates, &analysis.args);
        let release = Some(RunSlot::Current);
        let gate = analysis_gate(ctx, out, status, &mut f.core, analysis, hash, release);
        if let Gate::Failed(message) = &gate {
            let message = message.clone();
            f.core
                .abort(ctx, out, status, hash, reason::ANALYSIS_FAILED, message);
        }
        gate
    } else {
        // Header or mirror route: done once the router reports the routes of this step.
        let (headers, mirrors) = routes_at(&canary.steps, idx);
        passed(out.projected.traffic.as_ref().is_some_and(|t| {
            t.header_routes == headers.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
                && t.mirror_routes == mirrors.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
        }))
    }
}

/// A pause step ends after its duration, or with `promote` when it has none (or is still running).
fn pause_done(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &mut Flight<'_>,
    pause: &crate::crd::rollout::PauseStep,
) -> bool {
    let start = start_pause(ctx, status, reason::PAUSED_STEP);
    let finished = if f.core.promote_step {
        f.core.promote_step = false;
        true
    } else if let Some(duration) = pause.duration.as_ref().and_then(|d| d.to_duration().ok()) {
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
}

/// Promotion once all steps are done, nothing holds it, and the canary can carry everything: with a router,
/// the canary Service takes all traffic and then the stable Service is switched in the same plan.
fn promote(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, f: &mut Flight<'_>) {
    let can_promote = f.core.active(status)
        && f.idx >= f.len
        && !f.core.user_paused
        && f.route_error.is_none()
        && status.pause_conditions.is_empty()
        && f.background_confirms;
    let Some(hash) = f.core.in_flight.clone().filter(|_| can_promote) else {
        return;
    };
    let n = ctx.replicas;
    let ready =
        ctx.fully_available(&hash, n) && (f.router || ctx.shrunk_to(&f.core.stable_hash, 0));
    if !ready {
        return;
    }
    if f.router {
        // The canary Service must reach the canary before it takes everything (it may still be pinned
        // elsewhere when a revision starts and promotes in the same plan).
        out.set_selector(f.canary.canary_service.as_deref(), Some(&hash));
        out.set_traffic(traffic(f.canary, 100, Vec::new(), Vec::new()));
        out.set_selector(f.canary.stable_service.as_deref(), Some(&hash));
        out.set_traffic(traffic(f.canary, 0, Vec::new(), Vec::new()));
        let promote_delay = delay_secs(f.canary.scale_down_delay_seconds);
        add_deadline(ctx, status, &f.core.stable_hash, promote_delay);
    }
    let revision = record_stable(ctx, status, &hash);
    release_run(ctx, out, status, RunSlot::Background);
    end_step_pauses(ctx, status);
    let message = format!("revision {revision} ({hash}) promoted to stable");
    out.event(false, reason::PROMOTED, message);
    f.core.stable_hash = hash;
    f.core.in_flight = None;
}

/// Weight the canary should have now (0 once it is not active).
fn desired_weight_now(status: &RolloutStatus, f: &Flight<'_>) -> i32 {
    if f.core.active(status) {
        desired_weight(&f.canary.steps, f.idx)
    } else {
        0
    }
}

/// Acts in the safe order (safety rules 1-3): weight decreases, selectors, scale-ups, weight increases,
/// scale-downs, then what waits for a delay. Returns the leftovers (neither stable nor canary).
fn route_and_scale<'a>(
    ctx: &Ctx<'a>,
    out: &mut Out,
    status: &mut RolloutStatus,
    f: &Flight<'_>,
    stable: &StableVersion,
    progress: Progress,
) -> Vec<&'a ObservedReplicaSet> {
    let canary_spec_before = f
        .core
        .in_flight
        .as_deref()
        .and_then(|h| out.spec_of(h))
        .unwrap_or(0);
    let mut routed = route(ctx, out, status, f);
    pin_services(ctx, out, status, f, stable, progress.stable_healthy);
    let roles = roles(&f.core.stable_hash, f.core.in_flight.as_deref());
    let leftovers = others(ctx, &roles);
    ensure_stable_replica_set(ctx, out, status, &f.core.stable_hash);
    let moves = if f.router {
        moves_with_router(ctx, out, status, f, canary_spec_before)
    } else {
        moves_without_router(ctx, out, status, f, &leftovers, canary_spec_before)
    };
    for (hash, to) in &moves.ups {
        out.scale(ctx, hash, *to);
    }
    if let Some(desired) = routed.late.take() {
        routed.emitted |= emit_traffic(out, desired);
    }
    for (hash, to) in &moves.downs {
        out.scale(ctx, hash, *to);
    }
    let router_state_known = f.route_error.is_none();
    if let (Some(hash), true) = (&f.core.in_flight, f.core.aborted(status)) {
        scale_after_deadline(ctx, out, status, hash, !router_state_known);
    }
    if f.router {
        let stable_full = ctx.fully_available(&f.core.stable_hash, ctx.replicas);
        let hold = |_: &str| !router_state_known;
        scale_down_after_delay(ctx, out, status, &leftovers, stable_full, hold);
    }
    if routed.emitted {
        follow_up_traffic(ctx, out);
    }
    tidy(ctx, out, status, &roles);
    leftovers
}

/// Traffic decided in this plan: what was written now, and an increase that waits for the scale-ups.
struct Routed {
    emitted: bool,
    late: Option<DesiredTraffic>,
}

fn emit_traffic(out: &mut Out, desired: DesiredTraffic) -> bool {
    let before = out.actions.len();
    out.set_traffic(desired);
    out.actions.len() > before
}

/// The weight to route: a decrease is written now, an increase only after the scale-ups, and never more
/// than the available canary pods carry (safety rule 1).
fn route(ctx: &Ctx<'_>, out: &mut Out, status: &RolloutStatus, f: &Flight<'_>) -> Routed {
    let mut routed = Routed {
        emitted: false,
        late: None,
    };
    if !f.router || f.route_error.is_some() {
        return routed;
    }
    let current = out
        .projected
        .traffic
        .as_ref()
        .map(|t| t.canary_weight)
        .unwrap_or(0);
    let (weight, headers, mirrors) = match (&f.core.in_flight, f.core.active(status)) {
        (Some(hash), true) => {
            let weight = routed_weight(ctx, status, f, hash, current);
            let (headers, mirrors) = routes_at(&f.canary.steps, f.idx);
            (weight, headers, mirrors)
        }
        _ => (0, Vec::new(), Vec::new()),
    };
    let desired = traffic(f.canary, weight, headers, mirrors);
    if weight <= current {
        routed.emitted = emit_traffic(out, desired);
    } else {
        routed.late = Some(desired);
    }
    routed
}

/// The weight the active canary gets, given what the router carries (`current`).
fn routed_weight(
    ctx: &Ctx<'_>,
    status: &RolloutStatus,
    f: &Flight<'_>,
    hash: &str,
    current: i32,
) -> i32 {
    let n = ctx.replicas;
    let available = ctx.available(hash);
    // Until the canary has the pods for the step's weight, keep the weight Serin set for this canary (or
    // what the router carries after a lost status write), whichever is higher, within what the available
    // pods can carry.
    let set_before = match &ctx.prev.canary_revision {
        Some(previous) if previous.pod_template_hash == hash && !ctx.prev.abort => {
            ctx.prev.current_weight.unwrap_or(0)
        }
        _ => 0,
    };
    // All traffic moves only within the promotion itself (which switches the stable Service in the same
    // plan); before that the canary keeps the last step's weight.
    let target = match (f.idx >= f.len, f.len) {
        (true, 0) => 0,
        (true, _) => desired_weight(&f.canary.steps, f.len - 1).min(99),
        (false, _) => desired_weight_now(status, f),
    };
    if available >= canary_pods_needed(n, target) {
        target
    } else {
        [set_before, current]
            .into_iter()
            .filter(|w| *w <= target && canary_pods_needed(n, *w) <= available)
            .max()
            .unwrap_or_else(|| max_weight_carried(n, available).min(target))
    }
}

/// Selectors. When Serin takes over without a stable in status, a Service that still sends traffic to older
/// pods stays where it is until the new pods can carry everything. While the router cannot be read, the
/// canary Service may still carry traffic: it is not re-pinned.
fn pin_services(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    f: &Flight<'_>,
    stable: &StableVersion,
    stable_healthy: bool,
) {
    let stable_svc = f.canary.stable_service.as_deref();
    let canary_svc = match (f.router, f.route_error.is_none()) {
        (true, false) => None,
        _ => f.canary.canary_service.as_deref(),
    };
    let hold = stable.first_rollout && !stable_healthy;
    match (&f.core.in_flight, f.core.active(status)) {
        (Some(hash), true) => {
            let pinned = f.router.then_some(f.core.stable_hash.as_str());
            out.set_selector(stable_svc, pinned);
            out.set_selector(canary_svc, Some(hash));
        }
        _ if stable.replacing && !stable_healthy => {}
        _ => {
            pin_unless_serving_elsewhere(ctx, out, stable_svc, &f.core.stable_hash, hold);
            pin_unless_serving_elsewhere(ctx, out, canary_svc, &f.core.stable_hash, hold);
        }
    }
}

/// Replica changes, split so that every scale-up happens before any scale-down.
#[derive(Default)]
struct Moves {
    ups: Vec<(String, i32)>,
    downs: Vec<(String, i32)>,
}

impl Moves {
    fn push(&mut self, hash: &str, from: i32, to: i32) {
        if to > from {
            self.ups.push((hash.to_string(), to));
        } else if to < from {
            self.downs.push((hash.to_string(), to));
        }
    }

    /// Creates the canary's ReplicaSet at `target`, or moves the existing one there.
    fn canary(
        &mut self,
        ctx: &Ctx<'_>,
        out: &mut Out,
        status: &RolloutStatus,
        hash: &str,
        from: i32,
        target: i32,
    ) {
        let exists = ctx.rs(hash).is_some();
        out.ensure_rs(ctx, hash, canary_revision(status), target);
        if exists {
            self.push(hash, from, target);
        }
    }
}

/// With a router the stable keeps its full size; the canary has the pods its weight needs.
fn moves_with_router(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    f: &Flight<'_>,
    canary_spec_before: i32,
) -> Moves {
    let n = ctx.replicas;
    let mut moves = Moves::default();
    moves.push(
        &f.core.stable_hash,
        out.spec_of(&f.core.stable_hash).unwrap_or(0),
        n,
    );
    if let (Some(hash), true) = (&f.core.in_flight, f.core.active(status)) {
        let target = canary_target(f.canary, &f.canary.steps, f.idx, n);
        // While the router cannot be read the canary may carry traffic: it never shrinks then.
        let target = match f.route_error {
            None => target,
            Some(_) => target.max(canary_spec_before),
        };
        moves.canary(ctx, out, status, hash, canary_spec_before, target);
    }
    moves
}

/// Targets without a router, before the availability budget: the canary's size, the room beside the
/// stable, and the stable's size.
struct Goals {
    canary_goal: i32,
    surge: i32,
    stable_target: i32,
}

fn goals_without_router(ctx: &Ctx<'_>, status: &RolloutStatus, f: &Flight<'_>) -> Goals {
    let (n, len, idx, canary) = (ctx.replicas, f.len, f.idx, f.canary);
    let promoting = idx >= len
        && !f.core.user_paused
        && status.pause_conditions.is_empty()
        && f.background_confirms;
    let canary_goal = if idx >= len && !promoting && len > 0 {
        canary_target(canary, &canary.steps, len - 1, n)
    } else {
        canary_target(canary, &canary.steps, idx, n)
    };
    let configured_surge = canary_surge_cap(canary, n);
    let (surge, stable_target) = match (&f.core.in_flight, f.core.active(status), promoting) {
        (Some(_), true, false) => (canary_goal.max(configured_surge), n),
        (Some(_), true, true) => (configured_surge, 0),
        _ => (configured_surge, n),
    };
    Goals {
        canary_goal,
        surge,
        stable_target,
    }
}

/// Without a router, through the steps the stable keeps its full size and the canary runs beside it (its
/// target is already limited by maxSurge, or set by setCanaryScale); only the promotion replaces the stable,
/// within maxSurge/maxUnavailable, and a promotion on hold (a pause) keeps the last step's canary.
fn moves_without_router(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    f: &Flight<'_>,
    leftovers: &[&ObservedReplicaSet],
    canary_spec_before: i32,
) -> Moves {
    let (n, canary) = (ctx.replicas, f.canary);
    let active = f.core.active(status);
    let unavailable = max_unavailable(canary.max_unavailable.as_ref(), n).unwrap_or(0);
    let Goals {
        canary_goal,
        surge,
        stable_target,
    } = goals_without_router(ctx, status, f);
    // Only pods behind the stable Service (as it will select after this plan) carry traffic, so only they
    // count towards the availability floor; the others may go freely.
    let pinned = canary
        .stable_service
        .as_deref()
        .and_then(|svc| out.projected.selectors.get(svc).cloned().flatten());
    let serving = |hash: &str| match &pinned {
        Some(selected) if selected != hash => 0,
        _ => ctx.available(hash),
    };
    let stable_spec = out.spec_of(&f.core.stable_hash).unwrap_or(0);
    let stable_input = ScaleInput {
        spec: stable_spec,
        available: serving(&f.core.stable_hash),
        target: stable_target,
        hold: false,
    };
    let canary_input = match (&f.core.in_flight, active) {
        (Some(hash), true) => Some(ScaleInput {
            spec: canary_spec_before,
            available: serving(hash),
            target: canary_goal,
            hold: false,
        }),
        _ => None,
    };
    let other_inputs: Vec<ScaleInput> = leftovers
        .iter()
        .map(|rs| leftover_input(ctx, out, status, f, &serving, &rs.pod_template_hash))
        .collect();
    let (stable_new, canary_new, others_new) = scale_without_router(
        n,
        surge,
        unavailable,
        &stable_input,
        canary_input.as_ref(),
        &other_inputs,
    );
    let mut moves = Moves::default();
    moves.push(&f.core.stable_hash, stable_spec, stable_new);
    if let (Some(hash), Some(target)) = (&f.core.in_flight, canary_new) {
        moves.canary(ctx, out, status, hash, canary_spec_before, target);
    }
    for (rs, new) in leftovers.iter().zip(others_new) {
        let hash = rs.pod_template_hash.as_str();
        match ctx.deadline(status, hash) {
            Some(due) if due > ctx.now_s => out.requeue_at(due),
            _ => moves.push(hash, out.spec_of(hash).unwrap_or(0), new),
        }
    }
    moves
}

/// Old versions behind an unpinned stable Service still serve: they leave within the availability budget
/// once their delay (if any) has passed, and count for nothing while they are held. Versions that no longer
/// serve are kept until the stable can carry everything, for a quick way back (fast rollback).
fn leftover_input(
    ctx: &Ctx<'_>,
    out: &Out,
    status: &RolloutStatus,
    f: &Flight<'_>,
    serving: &dyn Fn(&str) -> i32,
    hash: &str,
) -> ScaleInput {
    let idle_until_stable_full = serving(hash) == 0
        && ctx.available(hash) > 0
        && !ctx.fully_available(&f.core.stable_hash, ctx.replicas);
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
}

/// After a weight was written, look again soon to see the router carry it; a router found carrying another
/// weight than Serin set was changed behind its back.
fn follow_up_traffic(ctx: &Ctx<'_>, out: &mut Out) {
    out.requeue_at(ctx.now_s + ROUTER_FOLLOW_UP_SECS);
    if let (Some(observed), Some(previous)) =
        (ctx.observed.traffic.observed(), ctx.prev.current_weight)
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

/// The weights and routes the status reports.
fn record_canary_status(ctx: &Ctx<'_>, out: &Out, status: &mut RolloutStatus, f: &Flight<'_>) {
    status.desired_weight = Some(desired_weight_now(status, f));
    status.current_weight = Some(if f.router {
        match &out.projected.traffic {
            Some(t) => t.canary_weight,
            None => ctx.prev.current_weight.unwrap_or(0),
        }
    } else {
        match (&f.core.in_flight, f.core.active(status)) {
            (Some(hash), true) => ratio_weight(ctx.ready(hash), ctx.ready(&f.core.stable_hash)),
            _ => 0,
        }
    });
    let routes = |pick: fn(&ObservedTraffic) -> &Vec<String>| {
        out.projected
            .traffic
            .as_ref()
            .map(|t| pick(t).clone())
            .unwrap_or_default()
    };
    status.traffic = Some(TrafficStatus {
        router: Some(router_name(f.canary).to_string()),
        header_routes: routes(|t| &t.header_routes),
        mirror_routes: routes(|t| &t.mirror_routes),
    });
    if f.core.in_flight.is_none() {
        status.current_step_index = Some(f.len);
    }
}

fn verdict(
    ctx: &Ctx<'_>,
    out: &Out,
    status: &RolloutStatus,
    f: Flight<'_>,
    leftovers: &[&ObservedReplicaSet],
    progress: Progress,
) -> Verdict {
    let (n, len, idx) = (ctx.replicas, f.len, f.idx);
    let stable_revision = stable_revision(status);
    if f.core.aborted(status) {
        let Abort { why, message } = abort_reason(ctx, f.core.aborting);
        let summary =
            format!("aborted, all traffic on stable revision {stable_revision}: {message}");
        return failed(RolloutPhase::Aborted, summary, why, message);
    }
    if let Some((why, message)) = &f.route_error {
        if *why == reason::ROUTE_UNREADABLE {
            // Nothing is known of the routes: hold where the rollout stands, which is not a failure.
            let message = format!("traffic router unreadable, holding: {message}");
            return progressing(reason::ROUTE_UNREADABLE, message);
        }
        let message = format!("traffic router: {message}");
        return failed(
            RolloutPhase::Degraded,
            message.clone(),
            why.to_string(),
            message,
        );
    }
    if progress.exceeded {
        return deadline_verdict(ctx);
    }
    let step_text = f
        .canary
        .steps
        .get(usize::try_from(idx).unwrap_or(usize::MAX))
        .map(|s| format!("step {}/{len} ({})", idx + 1, describe(s)))
        .unwrap_or_else(|| "promotion".to_string());
    if let Some(pause) = status.pause_conditions.first() {
        let message = format!("paused at {step_text}: {}", pause.reason);
        return paused(pause.reason.clone(), message);
    }
    if let Some(hash) = &f.core.in_flight {
        let waiting = if idx >= len && !f.background_confirms {
            "; waiting for the background analysis to measure the canary healthy"
        } else {
            ""
        };
        let message = format!(
            "revision {} at {step_text}: weight {}/{}, canary {}/{} available{waiting}",
            canary_revision(status),
            status.current_weight.unwrap_or(0),
            status.desired_weight.unwrap_or(0),
            ctx.available(hash),
            canary_target(f.canary, &f.canary.steps, idx, n),
        );
        return progressing(reason::NEW_REVISION, message);
    }
    let stable_full = ctx.fully_available(&f.core.stable_hash, n);
    if !stable_full
        || leftovers_running(ctx, out, status, leftovers)
        || out.spec_of(&f.core.stable_hash) != Some(n)
    {
        let message = format!(
            "revision {stable_revision}: {}/{n} pods available",
            ctx.available(&f.core.stable_hash)
        );
        return progressing(reason::WAITING_FOR_PODS, message);
    }
    healthy(format!(
        "revision {stable_revision} is stable: {n}/{n} pods available"
    ))
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
        let Some(carried) = out.projected.traffic.as_ref().map(|t| t.canary_weight) else {
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
