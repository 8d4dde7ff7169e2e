//! Decides which version is stable: the recorded one, the current template on a first rollout (or when a
//! human's `promote --full` replaces a stable whose ReplicaSet is gone), or nothing at all (hold).

use super::super::context::{
    accept_missing_stable, remove_deadline, resolve_stable, Ctx, Out, Stable,
};
use super::super::status::{end_step_pauses, stable_missing, Verdict};
use crate::crd::rollout::{ManualCommands, RevisionRef};
use crate::crd::RolloutStatus;

/// The stable version this plan works from.
#[derive(Clone, Debug)]
pub(crate) struct StableVersion {
    pub hash: String,
    /// No stable was recorded: the current template became stable without steps.
    pub first_rollout: bool,
    /// The recorded stable was replaced by a human's full promotion while its ReplicaSet was not observed:
    /// its pods may still serve (a lagging cache), so the Services stay where they are until the new stable
    /// can carry everything.
    pub replacing: bool,
}

/// Resolves the stable version, or the verdict that holds the rollout when the stable is missing.
pub(crate) fn resolve(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    commands: &ManualCommands,
) -> Result<StableVersion, Box<Verdict>> {
    let resolved = resolve_stable(ctx, status);
    let replacing = matches!(resolved, Stable::Missing(_));
    let (hash, first_rollout) = match accept_missing_stable(out, resolved, commands) {
        Stable::Known(hash) => (hash, false),
        Stable::Missing(stable) => return Err(Box::new(stable_missing(ctx, out, status, &stable))),
        Stable::First => {
            status.stable_revision = Some(RevisionRef {
                pod_template_hash: ctx.hash.clone(),
                revision: ctx.next_revision_for(&ctx.hash),
            });
            status.canary_revision = None;
            status.abort = false;
            status.aborted_at = None;
            end_step_pauses(ctx, status);
            (ctx.hash.clone(), true)
        }
    };
    remove_deadline(status, &hash);
    Ok(StableVersion {
        hash,
        first_rollout,
        replacing,
    })
}

/// Recreates the stable version's ReplicaSet when it is gone (the current template is the stable one, so its
/// pod template is known), at full size.
pub(crate) fn ensure_stable_replica_set(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    stable_hash: &str,
) {
    if ctx.rs(stable_hash).is_none() {
        let revision = status
            .stable_revision
            .as_ref()
            .map(|r| r.revision)
            .unwrap_or(1);
        out.ensure_rs(ctx, stable_hash, revision, ctx.replicas);
    }
}
