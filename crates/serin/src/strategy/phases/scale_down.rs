//! Decides when versions that are neither stable nor in flight leave: after their scale-down delay, and
//! otherwise only once the stable can carry everything; then prunes their runs, history and deadlines.

use super::super::context::{
    prune_history, prune_runs, scale_after_deadline, tidy_deadlines, Ctx, Out,
};
use super::super::types::ObservedReplicaSet;
use crate::crd::RolloutStatus;

/// The hashes that keep their pods and runs: the stable version and the one in flight.
pub(crate) fn roles<'a>(stable_hash: &'a str, in_flight: Option<&'a str>) -> Vec<&'a str> {
    [Some(stable_hash), in_flight]
        .into_iter()
        .flatten()
        .collect()
}

/// Scales leftovers to zero: those with a deadline once it passed, the others once the stable is fully
/// available. `hold(hash)` keeps one at its size whatever its deadline (a way back, or traffic not known).
pub(crate) fn scale_down_after_delay(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    leftovers: &[&ObservedReplicaSet],
    stable_full: bool,
    hold: impl Fn(&str) -> bool,
) {
    for rs in leftovers {
        let hash = rs.pod_template_hash.as_str();
        if ctx.deadline(status, hash).is_some() {
            scale_after_deadline(ctx, out, status, hash, hold(hash));
        } else if stable_full && !hold(hash) {
            out.scale(ctx, hash, 0);
        }
    }
}

/// Some leftover still runs pods with no deadline to take them down: the rollout is not done.
pub(crate) fn leftovers_running(
    ctx: &Ctx<'_>,
    out: &Out,
    status: &RolloutStatus,
    leftovers: &[&ObservedReplicaSet],
) -> bool {
    leftovers.iter().any(|rs| {
        ctx.deadline(status, &rs.pod_template_hash).is_none()
            && out.spec_of(&rs.pod_template_hash).unwrap_or(0) > 0
    })
}

/// Stops and prunes the runs, ReplicaSets and deadlines of versions outside `roles`.
pub(crate) fn tidy(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, roles: &[&str]) {
    prune_runs(ctx, out, roles);
    prune_history(ctx, out, status, roles);
    tidy_deadlines(ctx, out, status);
}
