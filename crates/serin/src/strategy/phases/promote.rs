//! Decides what a promotion records: the revision in flight becomes the stable one, keeping its number.

use super::super::context::Ctx;
use crate::crd::rollout::RevisionRef;
use crate::crd::RolloutStatus;

/// Makes `hash` the stable version with the revision it had in flight (or the next one, when the status
/// lost it). Returns that revision.
pub(crate) fn record_stable(ctx: &Ctx<'_>, status: &mut RolloutStatus, hash: &str) -> i64 {
    let revision = status
        .canary_revision
        .take()
        .map(|r| r.revision)
        .unwrap_or_else(|| ctx.next_revision_for(hash));
    status.stable_revision = Some(RevisionRef {
        pod_template_hash: hash.to_string(),
        revision,
    });
    revision
}

/// The number of the recorded stable revision (0 when none).
pub(crate) fn stable_revision(status: &RolloutStatus) -> i64 {
    status
        .stable_revision
        .as_ref()
        .map(|r| r.revision)
        .unwrap_or(0)
}

/// The number of the revision in flight (0 when none).
pub(crate) fn canary_revision(status: &RolloutStatus) -> i64 {
    status
        .canary_revision
        .as_ref()
        .map(|r| r.revision)
        .unwrap_or(0)
}
