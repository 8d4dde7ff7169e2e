//! Words the status of a plan: the phase and the Progressing and Degraded conditions, one shape per outcome.

use super::super::status::Verdict;
use crate::crd::{reason, RolloutPhase};

/// A rollout that cannot go on (aborted, degraded): Progressing False and Degraded with `why`.
pub(crate) fn failed(phase: RolloutPhase, message: String, why: String, detail: String) -> Verdict {
    Verdict {
        phase,
        message,
        progressing: ("False", why.clone(), detail.clone()),
        degraded: Some((why, detail)),
        invalid: None,
    }
}

/// A rollout held by a pause whose reason is `why`.
pub(crate) fn paused(why: String, message: String) -> Verdict {
    Verdict {
        phase: RolloutPhase::Paused,
        message: message.clone(),
        progressing: ("Unknown", why, message),
        degraded: None,
        invalid: None,
    }
}

/// A rollout on its way: a revision in flight (`NewReplicaSetProgressing`-like reasons) or pods still coming.
pub(crate) fn progressing(why: &'static str, message: String) -> Verdict {
    Verdict {
        phase: RolloutPhase::Progressing,
        message: message.clone(),
        progressing: ("True", why.to_string(), message),
        degraded: None,
        invalid: None,
    }
}

/// A rollout in its desired state.
pub(crate) fn healthy(message: String) -> Verdict {
    Verdict {
        phase: RolloutPhase::Healthy,
        message: message.clone(),
        progressing: ("True", reason::ROLLOUT_COMPLETED.to_string(), message),
        degraded: None,
        invalid: None,
    }
}
