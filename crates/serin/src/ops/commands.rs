//! Manual commands (`promote`, `abort`, `retry`, `pause`, `resume`): decides whether one makes sense now and
//! writes it into the Rollout's status subresource, never its spec (GitOps sees no drift).

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use super::OpsError;
use crate::crd::rollout::PromoteCommand;
use crate::crd::{Rollout, RolloutPhase};

/// A manual command a user sends to the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManualCommand {
    Promote,
    PromoteFull,
    Abort,
    Retry,
    Pause,
    Resume,
}

impl ManualCommand {
    fn verb(&self) -> &'static str {
        match self {
            ManualCommand::Promote => "promote",
            ManualCommand::PromoteFull => "promote --full",
            ManualCommand::Abort => "abort",
            ManualCommand::Retry => "retry",
            ManualCommand::Pause => "pause",
            ManualCommand::Resume => "resume",
        }
    }
}

/// Why a command makes no sense in the rollout's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} rollout {name}: {why}")]
pub struct RejectedCommand {
    pub verb: &'static str,
    pub name: String,
    pub why: String,
}

/// The JSON merge patch of `status.commands` that carries `command`, or why it makes no sense now.
pub fn command_patch(rollout: &Rollout, command: ManualCommand) -> Result<Value, RejectedCommand> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let reject = |why: &str| RejectedCommand {
        verb: command.verb(),
        name: name.clone(),
        why: why.to_string(),
    };
    let status = rollout.status.clone().unwrap_or_default();
    let aborted = status.abort || status.phase == Some(RolloutPhase::Aborted);
    let updating = status.canary_revision.is_some();
    let user_paused = status.commands.as_ref().and_then(|c| c.paused) == Some(true);
    let commands = match command {
        ManualCommand::Promote | ManualCommand::PromoteFull => {
            if aborted {
                return Err(reject(
                    "it was aborted; run `serin retry` to start its steps again",
                ));
            }
            if !updating {
                return Err(reject(
                    "no update is in progress, there is nothing to promote",
                ));
            }
            let kind = if command == ManualCommand::PromoteFull {
                PromoteCommand::Full
            } else {
                PromoteCommand::Step
            };
            json!({"promote": kind})
        }
        ManualCommand::Abort => {
            if aborted {
                return Err(reject("it is already aborted"));
            }
            if !updating {
                return Err(reject(
                    "no update is in progress, there is nothing to abort",
                ));
            }
            json!({"abort": true})
        }
        ManualCommand::Retry => {
            if !aborted {
                return Err(reject(
                    "it is not aborted; only an aborted rollout can be retried",
                ));
            }
            json!({"retry": true})
        }
        ManualCommand::Pause => {
            if user_paused {
                return Err(reject("it is already paused"));
            }
            json!({"paused": true})
        }
        ManualCommand::Resume => {
            if !user_paused {
                let why = if status.phase == Some(RolloutPhase::Paused) {
                    "it waits at a pause step, not for resume; run `serin promote` to go on"
                } else {
                    "it is not paused"
                };
                return Err(reject(why));
            }
            json!({"paused": false})
        }
    };
    Ok(json!({"status": {"commands": commands}}))
}

/// Sends `command` to the Rollout; returns the line to print.
pub async fn send(
    client: &Client,
    namespace: &str,
    name: &str,
    command: ManualCommand,
) -> Result<String, OpsError> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), namespace);
    let rollout = api
        .get_opt(name)
        .await
        .map_err(OpsError::Api)?
        .ok_or_else(|| OpsError::RolloutNotFound {
            name: name.to_string(),
            namespace: namespace.to_string(),
        })?;
    let patch = command_patch(&rollout, command)?;
    let params = PatchParams {
        field_manager: Some(format!("{}-cli", crate::crd::FIELD_MANAGER)),
        ..Default::default()
    };
    api.patch_status(name, &params, &Patch::Merge(patch))
        .await
        .map_err(OpsError::Api)?;
    Ok(format!("rollout {name}: {} requested", command.verb()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::{ManualCommands, RevisionRef};
    use crate::crd::RolloutStatus;

    fn rollout(status: RolloutStatus) -> Rollout {
        let mut rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {},
                     "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}}
        }))
        .expect("valid rollout");
        rollout.status = Some(status);
        rollout
    }

    fn updating(phase: RolloutPhase) -> RolloutStatus {
        RolloutStatus {
            phase: Some(phase),
            canary_revision: Some(RevisionRef {
                pod_template_hash: "h2".into(),
                revision: 2,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn promote_writes_only_status_commands() {
        let patch = command_patch(
            &rollout(updating(RolloutPhase::Paused)),
            ManualCommand::Promote,
        );
        assert_eq!(
            patch,
            Ok(json!({"status": {"commands": {"promote": "Step"}}}))
        );
        let patch = command_patch(
            &rollout(updating(RolloutPhase::Progressing)),
            ManualCommand::PromoteFull,
        );
        assert_eq!(
            patch,
            Ok(json!({"status": {"commands": {"promote": "Full"}}}))
        );
    }

    #[test]
    fn promote_and_abort_need_an_update_in_progress() {
        let healthy = RolloutStatus {
            phase: Some(RolloutPhase::Healthy),
            ..Default::default()
        };
        for command in [
            ManualCommand::Promote,
            ManualCommand::PromoteFull,
            ManualCommand::Abort,
        ] {
            let error =
                command_patch(&rollout(healthy.clone()), command).expect_err("nothing to act on");
            assert!(
                error.to_string().contains("no update is in progress"),
                "{error}"
            );
        }
    }

    #[test]
    fn an_aborted_rollout_is_retried_not_promoted() {
        let mut aborted = updating(RolloutPhase::Aborted);
        aborted.abort = true;
        let error =
            command_patch(&rollout(aborted.clone()), ManualCommand::Promote).expect_err("aborted");
        assert!(error.to_string().contains("serin retry"), "{error}");
        assert!(command_patch(&rollout(aborted.clone()), ManualCommand::Abort).is_err());
        assert_eq!(
            command_patch(&rollout(aborted), ManualCommand::Retry),
            Ok(json!({"status": {"commands": {"retry": true}}}))
        );
        assert!(command_patch(
            &rollout(updating(RolloutPhase::Paused)),
            ManualCommand::Retry
        )
        .is_err());
    }

    #[test]
    fn pause_and_resume_toggle_the_user_pause() {
        let running = updating(RolloutPhase::Progressing);
        assert_eq!(
            command_patch(&rollout(running.clone()), ManualCommand::Pause),
            Ok(json!({"status": {"commands": {"paused": true}}}))
        );
        assert!(command_patch(&rollout(running.clone()), ManualCommand::Resume).is_err());
        let mut paused = running;
        paused.commands = Some(ManualCommands {
            paused: Some(true),
            ..Default::default()
        });
        assert!(command_patch(&rollout(paused.clone()), ManualCommand::Pause).is_err());
        assert_eq!(
            command_patch(&rollout(paused), ManualCommand::Resume),
            Ok(json!({"status": {"commands": {"paused": false}}}))
        );
    }

    #[test]
    fn resume_at_a_pause_step_points_to_promote() {
        let error = command_patch(
            &rollout(updating(RolloutPhase::Paused)),
            ManualCommand::Resume,
        )
        .expect_err("not a user pause");
        assert!(error.to_string().contains("serin promote"), "{error}");
    }
}
