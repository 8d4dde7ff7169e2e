//! Decides which version is in flight: none when the template is the stable one (a fast rollback when a
//! revision was under way), the same one as before, or a new revision that starts from its first step.

use super::super::context::{remove_deadline, terminate_runs_of, Ctx, Out};
use super::super::status::end_step_pauses;
use super::promote::stable_revision;
use super::Kind;
use crate::crd::rollout::RevisionRef;
use crate::crd::{reason, RolloutStatus};

/// The version in flight after this phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum InFlight {
    /// The template is the stable version.
    None,
    /// The revision recorded before goes on.
    Continuing(String),
    /// A new revision starts in this plan.
    Started(String),
}

impl InFlight {
    pub(crate) fn hash(&self) -> Option<String> {
        match self {
            InFlight::None => None,
            InFlight::Continuing(hash) | InFlight::Started(hash) => Some(hash.clone()),
        }
    }
}

/// Starts, continues or ends the revision in flight for the current template.
pub(crate) fn start_revision(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    stable_hash: &str,
    kind: Kind,
) -> InFlight {
    if ctx.hash == stable_hash {
        back_to_stable(ctx, out, status, stable_hash, kind);
        return InFlight::None;
    }
    let continuing = status
        .canary_revision
        .as_ref()
        .is_some_and(|c| c.pod_template_hash == ctx.hash);
    if continuing {
        return InFlight::Continuing(ctx.hash.clone());
    }
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
    let message = match kind {
        Kind::Canary { steps } => {
            format!(
                "revision {revision} ({}) started with {steps} steps",
                ctx.hash
            )
        }
        Kind::BlueGreen => format!(
            "revision {revision} ({}) started behind the preview Service",
            ctx.hash
        ),
    };
    out.event(false, reason::NEW_REVISION, message);
    InFlight::Started(ctx.hash.clone())
}

/// The template is back to the stable version: the revision in flight leaves without steps (fast rollback).
/// An aborted blue-green preview leaves quietly, its abort was already reported; a canary names the stable
/// revision users are back on.
fn back_to_stable(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    stable_hash: &str,
    kind: Kind,
) {
    if let Some(previous) = status.canary_revision.take() {
        let leaving = previous.pod_template_hash != stable_hash;
        let message = match kind {
            Kind::Canary { .. } => Some(format!(
                "template is back to stable revision {}; canary {} leaves without steps",
                stable_revision(status),
                previous.pod_template_hash
            )),
            Kind::BlueGreen if !status.abort => Some(format!(
                "template is back to the active revision; preview {} leaves",
                previous.pod_template_hash
            )),
            Kind::BlueGreen => None,
        };
        if let (true, Some(message)) = (leaving, message) {
            out.event(false, reason::FAST_ROLLBACK, message);
        }
        if leaving || kind == Kind::BlueGreen {
            terminate_runs_of(ctx, out, &previous.pod_template_hash);
        }
    }
    status.abort = false;
    status.aborted_at = None;
    status.current_step_index = kind.settled_index();
    end_step_pauses(ctx, status);
}
