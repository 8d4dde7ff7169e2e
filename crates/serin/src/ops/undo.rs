//! `serin undo`: picks an earlier revision's ReplicaSet and puts its template back into the Rollout's spec.

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::OpsError;
use crate::controller::observe::{is_controlled_by, observed_replica_set};
use crate::crd::{labels, PodTemplate, Rollout};

/// Why there is nothing to roll back to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoError {
    #[error("rollout {name} has no revision {revision} (known revisions: {known})")]
    RevisionNotFound {
        name: String,
        revision: i64,
        known: String,
    },
    #[error("rollout {name} has no earlier revision to go back to")]
    NoEarlierRevision { name: String },
    #[error("rollout {name} already runs the template of revision {revision}")]
    AlreadyCurrent { name: String, revision: i64 },
    #[error("the ReplicaSet of revision {revision} has no pod template")]
    TemplateMissing { revision: i64 },
}

impl UndoError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            UndoError::RevisionNotFound { .. } => "revision_not_found",
            UndoError::NoEarlierRevision { .. } => "no_earlier_revision",
            UndoError::AlreadyCurrent { .. } => "already_current",
            UndoError::TemplateMissing { .. } => "template_missing",
        }
    }
}

/// The template to restore and its revision: revision `to_revision`, or the newest one that is not the
/// Rollout's current template. The pod-template-hash label Serin added is removed, so the spec reads as
/// the user wrote it.
pub fn undo_target(
    rollout: &Rollout,
    replica_sets: &[ReplicaSet],
    to_revision: Option<i64>,
) -> Result<(i64, PodTemplate), UndoError> {
    let name = rollout.name_any();
    let current_hash = rollout
        .status
        .as_ref()
        .and_then(|status| status.current_pod_hash.clone());
    let mut by_revision: Vec<(i64, &ReplicaSet)> = replica_sets
        .iter()
        .map(|rs| (observed_replica_set(rs).revision, rs))
        .filter(|(revision, _)| *revision > 0)
        .collect();
    by_revision.sort_by_key(|(revision, _)| std::cmp::Reverse(*revision));
    let is_current = |rs: &ReplicaSet| {
        current_hash.is_some()
            && rs.labels().get(labels::POD_TEMPLATE_HASH) == current_hash.as_ref()
    };
    let (revision, rs) = match to_revision {
        Some(wanted) => by_revision
            .iter()
            .find(|(revision, _)| *revision == wanted)
            .copied()
            .ok_or_else(|| UndoError::RevisionNotFound {
                name: name.clone(),
                revision: wanted,
                known: by_revision
                    .iter()
                    .map(|(revision, _)| revision.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None => {
            let current_revision = by_revision
                .iter()
                .find(|(_, rs)| is_current(rs))
                .map(|(revision, _)| *revision)
                .unwrap_or(i64::MAX);
            by_revision
                .iter()
                .find(|(revision, rs)| *revision < current_revision && !is_current(rs))
                .copied()
                .ok_or(UndoError::NoEarlierRevision { name: name.clone() })?
        }
    };
    let mut template: PodTemplate = rs
        .spec
        .template
        .clone()
        .ok_or(UndoError::TemplateMissing { revision })?
        .into();
    if let Some(template_labels) = template
        .metadata
        .as_mut()
        .and_then(|meta| meta.labels.as_mut())
    {
        template_labels.remove(labels::POD_TEMPLATE_HASH);
    }
    if template == rollout.spec.template {
        return Err(UndoError::AlreadyCurrent { name, revision });
    }
    Ok((revision, template))
}

/// Rolls the Rollout back; returns the revision whose template it now has. The replace carries the
/// resourceVersion read, so a concurrent edit is retried on the fresh object instead of being overwritten.
pub async fn undo(
    client: &Client,
    namespace: &str,
    name: &str,
    to_revision: Option<i64>,
) -> Result<i64, OpsError> {
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), namespace);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut rollout = rollouts
            .get_opt(name)
            .await
            .map_err(OpsError::Api)?
            .ok_or_else(|| OpsError::RolloutNotFound {
                name: name.to_string(),
                namespace: namespace.to_string(),
            })?;
        let uid = rollout.uid().unwrap_or_default();
        let owned: Vec<ReplicaSet> = replica_sets
            .list(&ListParams::default().labels(&format!("{}={name}", labels::ROLLOUT_NAME)))
            .await
            .map_err(OpsError::Api)?
            .items
            .into_iter()
            .filter(|rs| is_controlled_by(rs, &uid))
            .collect();
        let (revision, template) = undo_target(&rollout, &owned, to_revision)?;
        rollout.spec.template = template;
        rollout.metadata.managed_fields = None;
        let params = PostParams {
            field_manager: Some(format!("{}-cli", crate::crd::FIELD_MANAGER)),
            ..Default::default()
        };
        match rollouts.replace(name, &params, &rollout).await {
            Ok(_) => return Ok(revision),
            Err(kube::Error::Api(status)) if status.is_conflict() && attempts < 3 => continue,
            Err(error) => return Err(OpsError::Api(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RolloutStatus;
    use serde_json::json;

    fn rollout(image: &str, current_hash: &str) -> Rollout {
        let mut rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": image}]}},
                     "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}}
        }))
        .expect("valid rollout");
        rollout.status = Some(RolloutStatus {
            current_pod_hash: Some(current_hash.into()),
            ..Default::default()
        });
        rollout
    }

    fn rs(hash: &str, revision: i64, image: &str) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": format!("web-{hash}"), "labels": {labels::POD_TEMPLATE_HASH: hash},
                         "annotations": {labels::REVISION: revision.to_string()}},
            "spec": {"selector": {}, "template": {
                "metadata": {"labels": {"app": "web", labels::POD_TEMPLATE_HASH: hash}},
                "spec": {"containers": [{"name": "app", "image": image}]}}}
        }))
        .expect("valid replicaset")
    }

    fn image(template: &PodTemplate) -> String {
        template
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    }

    #[test]
    fn default_target_is_the_newest_revision_before_the_current_one() {
        let sets = [
            rs("h1", 1, "web:1"),
            rs("h2", 2, "web:2"),
            rs("h3", 3, "web:3"),
        ];
        let (revision, template) =
            undo_target(&rollout("web:3", "h3"), &sets, None).expect("target");
        assert_eq!(revision, 2);
        assert_eq!(image(&template), "web:2");
        let template_labels = template.metadata.and_then(|m| m.labels).unwrap_or_default();
        assert!(!template_labels.contains_key(labels::POD_TEMPLATE_HASH));
        assert_eq!(template_labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn an_explicit_revision_is_honoured_or_reported_missing() {
        let sets = [rs("h1", 1, "web:1"), rs("h2", 2, "web:2")];
        let (revision, template) =
            undo_target(&rollout("web:2", "h2"), &sets, Some(1)).expect("target");
        assert_eq!((revision, image(&template)), (1, "web:1".to_string()));
        let error =
            undo_target(&rollout("web:2", "h2"), &sets, Some(7)).expect_err("no revision 7");
        assert!(
            error.to_string().contains("known revisions: 2, 1"),
            "{error}"
        );
    }

    #[test]
    fn nothing_to_undo_with_a_single_revision_or_the_current_template() {
        let sets = [rs("h1", 1, "web:1")];
        assert!(matches!(
            undo_target(&rollout("web:1", "h1"), &sets, None),
            Err(UndoError::NoEarlierRevision { .. })
        ));
        assert!(matches!(
            undo_target(&rollout("web:1", "h1"), &sets, Some(1)),
            Err(UndoError::AlreadyCurrent { .. })
        ));
    }
}
