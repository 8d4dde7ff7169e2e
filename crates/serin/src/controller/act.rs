//! Applies a plan's actions to the cluster, in order, stopping at the first failure (safety rule 2).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::leader::{Fence, Fenced};
use super::observe::purpose_labels;
use crate::crd::analysis::{AnalysisRun, AnalysisRunSpec};
use crate::crd::{labels, Rollout};
use crate::strategy::hash::elided_hash;
use crate::strategy::DesiredTraffic;
use crate::strategy::{Action, AnalysisPurpose};

/// Why an action could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("the Rollout has no namespace or uid")]
    RolloutWithoutIdentity,
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("creating ReplicaSet {name} failed: {source}")]
    CreateReplicaSet {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("ReplicaSet {name} exists with pod-template hash {found:?}, not {expected}")]
    ReplicaSetNameTaken {
        name: String,
        expected: String,
        found: Option<String>,
    },
    #[error("ReplicaSet {name} was to be created from a template without its pod spec")]
    ElidedTemplate { name: String },
    #[error("ReplicaSet {name} exists and is not controlled by this Rollout; Serin neither adopts, scales nor deletes it")]
    ReplicaSetNotOwned { name: String },
    #[error("AnalysisRun {name} exists and is not controlled by this Rollout; Serin neither reads its verdict nor changes it")]
    AnalysisRunNotOwned { name: String },
    #[error("scaling ReplicaSet {name} failed: {source}")]
    ScaleReplicaSet {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("setting the revision of ReplicaSet {name} failed: {source}")]
    SetRevision {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting ReplicaSet {name} failed: {source}")]
    DeleteReplicaSet {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("pinning the selector of Service {name} failed: {source}")]
    SetServiceSelector {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("setting traffic weights failed: {0}")]
    SetTraffic(#[source] crate::traffic::TrafficError),
    #[error("creating AnalysisRun {name} failed: {source}")]
    CreateAnalysisRun {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("terminating AnalysisRun {name} failed: {source}")]
    TerminateAnalysisRun {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting AnalysisRun {name} failed: {source}")]
    DeleteAnalysisRun {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ActError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ActError::RolloutWithoutIdentity => "rollout_without_identity",
            ActError::Fenced(fenced) => fenced.category(),
            ActError::CreateReplicaSet { .. } => "create_replicaset",
            ActError::ReplicaSetNameTaken { .. } => "replicaset_name_taken",
            ActError::ElidedTemplate { .. } => "elided_template",
            ActError::ReplicaSetNotOwned { .. } => "replicaset_not_owned",
            ActError::AnalysisRunNotOwned { .. } => "analysisrun_not_owned",
            ActError::ScaleReplicaSet { .. } => "scale_replicaset",
            ActError::SetRevision { .. } => "set_revision",
            ActError::DeleteReplicaSet { .. } => "delete_replicaset",
            ActError::SetServiceSelector { .. } => "set_service_selector",
            ActError::SetTraffic(_) => "set_traffic",
            ActError::CreateAnalysisRun { .. } => "create_analysisrun",
            ActError::TerminateAnalysisRun { .. } => "terminate_analysisrun",
            ActError::DeleteAnalysisRun { .. } => "delete_analysisrun",
        }
    }
}

/// A write that succeeded, as the server answered it (for the expectations laid over lagging caches).
#[derive(Clone, Debug)]
pub enum Written {
    /// A ReplicaSet created (or found already created with the same hash), scaled or annotated.
    ReplicaSet {
        object: Box<ReplicaSet>,
        created: bool,
    },
    /// A ReplicaSet deleted (the uid when the server returned the object).
    ReplicaSetDeleted { name: String, uid: Option<String> },
    /// A Service's selector pinned to a hash, or unpinned.
    Selector {
        service: String,
        pod_template_hash: Option<String>,
    },
    /// The router made to carry this traffic.
    Traffic(DesiredTraffic),
}

/// Applies `actions` in order; the first failure stops the rest, so a later action never runs without the
/// earlier ones it depends on (weight before selectors before scale-down).
pub async fn act(
    client: &Client,
    rollout: &Rollout,
    actions: &[Action],
) -> Result<usize, ActError> {
    act_fenced(client, &Fence::open(), rollout, actions).await
}

/// Like [`act`], asking `fence` before each action: once this replica can no longer prove it holds the
/// leader Lease, the action about to be sent and every one after it are refused (safety rule 8).
pub async fn act_fenced(
    client: &Client,
    fence: &Fence,
    rollout: &Rollout,
    actions: &[Action],
) -> Result<usize, ActError> {
    act_recorded(client, fence, rollout, actions, &mut Vec::new()).await
}

/// Like [`act_fenced`], adding each write that succeeded to `written`, also when a later one fails.
pub async fn act_recorded(
    client: &Client,
    fence: &Fence,
    rollout: &Rollout,
    actions: &[Action],
    written: &mut Vec<Written>,
) -> Result<usize, ActError> {
    let namespace = rollout
        .namespace()
        .ok_or(ActError::RolloutWithoutIdentity)?;
    let owner = owner_reference(rollout).ok_or(ActError::RolloutWithoutIdentity)?;
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), &namespace);
    let patch_params = PatchParams::default();
    let post_params = PostParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let patch_params = PatchParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..patch_params
    };

    for action in actions {
        fence.check()?;
        match action {
            Action::CreateReplicaSet {
                name,
                pod_template_hash,
                revision,
                replicas,
                template,
            } => {
                // The Rollout cache drops pod specs; a ReplicaSet without one would run no pods.
                if elided_hash(&rollout.spec.template).is_some() {
                    return Err(ActError::ElidedTemplate { name: name.clone() });
                }
                let rs = replica_set_for(
                    rollout,
                    &owner,
                    name,
                    pod_template_hash,
                    *revision,
                    *replicas,
                    template,
                );
                match replica_sets.create(&post_params, &rs).await {
                    Ok(created) => written.push(Written::ReplicaSet {
                        object: Box::new(created),
                        created: true,
                    }),
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {
                        // After a restart the ReplicaSet may already be there: the same hash means the same
                        // pods, so the create already happened.
                        let existing = replica_sets.get_opt(name).await.map_err(|source| {
                            ActError::CreateReplicaSet {
                                name: name.clone(),
                                source,
                            }
                        })?;
                        // Someone else's ReplicaSet under this name, even with the right hash label, is not
                        // this Rollout's: taking it for created would scale and later delete it.
                        if existing
                            .as_ref()
                            .is_some_and(|rs| !owned_by(rs, &owner.uid))
                        {
                            return Err(ActError::ReplicaSetNotOwned { name: name.clone() });
                        }
                        let found = existing
                            .as_ref()
                            .and_then(|rs| rs.labels().get(labels::POD_TEMPLATE_HASH).cloned());
                        if found.as_deref() != Some(pod_template_hash.as_str()) {
                            return Err(ActError::ReplicaSetNameTaken {
                                name: name.clone(),
                                expected: pod_template_hash.clone(),
                                found,
                            });
                        }
                        if let Some(existing) = existing {
                            written.push(Written::ReplicaSet {
                                object: Box::new(existing),
                                created: true,
                            });
                        }
                    }
                    Err(source) => {
                        return Err(ActError::CreateReplicaSet {
                            name: name.clone(),
                            source,
                        })
                    }
                }
            }
            Action::ScaleReplicaSet { name, replicas } => {
                let scaled = replica_sets
                    .patch(
                        name,
                        &patch_params,
                        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
                    )
                    .await
                    .map_err(|source| ActError::ScaleReplicaSet {
                        name: name.clone(),
                        source,
                    })?;
                written.push(Written::ReplicaSet {
                    object: Box::new(scaled),
                    created: false,
                });
            }
            Action::SetRevision { name, revision } => {
                let patch =
                    json!({"metadata": {"annotations": {labels::REVISION: revision.to_string()}}});
                let annotated = replica_sets
                    .patch(name, &patch_params, &Patch::Merge(patch))
                    .await
                    .map_err(|source| ActError::SetRevision {
                        name: name.clone(),
                        source,
                    })?;
                written.push(Written::ReplicaSet {
                    object: Box::new(annotated),
                    created: false,
                });
            }
            Action::DeleteReplicaSet { name } => {
                let params = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                };
                match replica_sets.delete(name, &params).await {
                    Ok(deleted) => written.push(Written::ReplicaSetDeleted {
                        name: name.clone(),
                        uid: deleted.left().and_then(|rs| rs.uid()),
                    }),
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(source) => {
                        return Err(ActError::DeleteReplicaSet {
                            name: name.clone(),
                            source,
                        })
                    }
                }
            }
            Action::SetServiceSelector {
                service,
                pod_template_hash,
            } => {
                services
                    .patch(
                        service,
                        &patch_params,
                        &Patch::Merge(service_selector_patch(pod_template_hash.as_deref())),
                    )
                    .await
                    .map_err(|source| ActError::SetServiceSelector {
                        name: service.clone(),
                        source,
                    })?;
                written.push(Written::Selector {
                    service: service.clone(),
                    pod_template_hash: pod_template_hash.clone(),
                });
            }
            Action::SetTraffic(desired) => {
                // Without a traffic router the Service selectors and replica counts carry the weight, and the
                // planner expresses those as other actions.
                if has_traffic_router(rollout) {
                    crate::traffic::apply(client, rollout, desired)
                        .await
                        .map_err(ActError::SetTraffic)?;
                    written.push(Written::Traffic(desired.clone()));
                }
            }
            Action::CreateAnalysisRun {
                name,
                purpose,
                pod_template_hash,
                spec,
            } => {
                let run =
                    analysis_run_for(rollout, &owner, name, *purpose, pod_template_hash, spec);
                match runs.create(&post_params, &run).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {
                        // The run is there when an earlier create went through (a restart, a cache that
                        // lags). An answer of "already exists" for a run that is not there created
                        // nothing: taken as done, the step would wait for a run no event will announce.
                        let existing = runs.get_opt(name).await.map_err(|source| {
                            ActError::CreateAnalysisRun {
                                name: name.clone(),
                                source,
                            }
                        })?;
                        if existing
                            .as_ref()
                            .is_some_and(|run| !owned_by(run, &owner.uid))
                        {
                            return Err(ActError::AnalysisRunNotOwned { name: name.clone() });
                        }
                        if existing.is_none() {
                            return Err(ActError::CreateAnalysisRun {
                                name: name.clone(),
                                source: kube::Error::Api(status),
                            });
                        }
                    }
                    Err(source) => {
                        return Err(ActError::CreateAnalysisRun {
                            name: name.clone(),
                            source,
                        })
                    }
                }
            }
            Action::TerminateAnalysisRun { name } => {
                match runs
                    .patch(
                        name,
                        &patch_params,
                        &Patch::Merge(json!({"spec": {"terminate": true}})),
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(source) => {
                        return Err(ActError::TerminateAnalysisRun {
                            name: name.clone(),
                            source,
                        })
                    }
                }
            }
            Action::DeleteAnalysisRun { name } => {
                match runs.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(source) => {
                        return Err(ActError::DeleteAnalysisRun {
                            name: name.clone(),
                            source,
                        })
                    }
                }
            }
        }
    }
    Ok(actions.len())
}

/// Whether `object` has a controller ownerReference to the object with `uid`.
fn owned_by<K: Resource>(object: &K, uid: &str) -> bool {
    super::observe::is_controlled_by(object, uid)
}

fn has_traffic_router(rollout: &Rollout) -> bool {
    rollout
        .spec
        .strategy
        .canary
        .as_ref()
        .is_some_and(|canary| canary.traffic_routing.is_some())
}

/// The controller ownerReference that makes the Rollout own (and garbage-collect) an object.
pub fn owner_reference(rollout: &Rollout) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Rollout::api_version(&()).into_owned(),
        kind: Rollout::kind(&()).into_owned(),
        name: rollout.name_any(),
        uid: rollout.uid()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// A JSON merge patch that pins (or, with `None`, unpins) only the pod-template-hash key of a Service's
/// selector, leaving every other key the user set alone.
pub fn service_selector_patch(pod_template_hash: Option<&str>) -> Value {
    let value = match pod_template_hash {
        Some(hash) => Value::String(hash.to_string()),
        None => Value::Null,
    };
    json!({"spec": {"selector": {labels::POD_TEMPLATE_HASH: value}}})
}

/// The ReplicaSet of one pod-template hash of a Rollout.
pub fn replica_set_for(
    rollout: &Rollout,
    owner: &OwnerReference,
    name: &str,
    pod_template_hash: &str,
    revision: i64,
    replicas: i32,
    template: &PodTemplateSpec,
) -> ReplicaSet {
    let mut rs_labels: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    rs_labels.insert(
        labels::POD_TEMPLATE_HASH.to_string(),
        pod_template_hash.to_string(),
    );
    rs_labels.insert(labels::ROLLOUT_NAME.to_string(), rollout.name_any());

    let mut selector: LabelSelector = rollout.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(
            labels::POD_TEMPLATE_HASH.to_string(),
            pod_template_hash.to_string(),
        );

    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: rollout.namespace(),
            labels: Some(rs_labels),
            annotations: Some([(labels::REVISION.to_string(), revision.to_string())].into()),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: rollout.spec.min_ready_seconds,
            selector,
            template: Some(template.clone()),
        },
        status: None,
    }
}

/// An AnalysisRun owned by the Rollout, labelled with what it is for and which revision it measures.
pub fn analysis_run_for(
    rollout: &Rollout,
    owner: &OwnerReference,
    name: &str,
    purpose: AnalysisPurpose,
    pod_template_hash: &str,
    spec: &AnalysisRunSpec,
) -> AnalysisRun {
    let mut run_labels = purpose_labels(purpose);
    run_labels.insert(labels::ROLLOUT_NAME.to_string(), rollout.name_any());
    run_labels.insert(
        labels::POD_TEMPLATE_HASH.to_string(),
        pod_template_hash.to_string(),
    );
    let mut run = AnalysisRun::new(name, spec.clone());
    run.metadata.namespace = rollout.namespace();
    run.metadata.labels = Some(run_labels);
    run.metadata.owner_references = Some(vec![owner.clone()]);
    run
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::observe::observed_analysis_run;
    use serde_json::json;

    fn rollout() -> Rollout {
        let mut rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1"},
            "spec": {
                "replicas": 4, "minReadySeconds": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "web:1"}]}},
                "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}
            }
        }))
        .expect("valid rollout");
        rollout.metadata.uid = Some("uid-1".into());
        rollout
    }

    #[test]
    fn selector_patch_touches_only_the_hash_key() {
        assert_eq!(
            service_selector_patch(Some("abc")),
            json!({"spec": {"selector": {"serin.dev/pod-template-hash": "abc"}}})
        );
        assert_eq!(
            service_selector_patch(None),
            json!({"spec": {"selector": {"serin.dev/pod-template-hash": null}}})
        );
    }

    #[test]
    fn replica_set_is_owned_labelled_and_selects_only_its_hash() {
        let rollout = rollout();
        let owner = owner_reference(&rollout).expect("rollout has a uid");
        assert_eq!(owner.api_version, "serin.dev/v1alpha1");
        assert_eq!(owner.kind, "Rollout");
        let mut template: PodTemplateSpec = rollout.spec.template.clone().into();
        template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(labels::POD_TEMPLATE_HASH.into(), "h1".into());
        let rs = replica_set_for(&rollout, &owner, "web-h1", "h1", 3, 2, &template);
        let rs_labels = rs.metadata.labels.clone().unwrap_or_default();
        assert_eq!(rs_labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            rs_labels.get(labels::POD_TEMPLATE_HASH).map(String::as_str),
            Some("h1")
        );
        assert_eq!(
            rs_labels.get(labels::ROLLOUT_NAME).map(String::as_str),
            Some("web")
        );
        assert_eq!(
            rs.metadata
                .annotations
                .unwrap_or_default()
                .get(labels::REVISION)
                .map(String::as_str),
            Some("3")
        );
        let owners = rs.metadata.owner_references.unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, "uid-1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        let spec = rs.spec;
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.min_ready_seconds, Some(2));
        let selector = spec.selector.match_labels.unwrap_or_default();
        assert_eq!(selector.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            selector.get(labels::POD_TEMPLATE_HASH).map(String::as_str),
            Some("h1")
        );
        assert_eq!(spec.template, Some(template));
    }

    #[test]
    fn analysis_run_carries_labels_that_observe_reads_back() {
        let rollout = rollout();
        let owner = owner_reference(&rollout).expect("rollout has a uid");
        let run = analysis_run_for(
            &rollout,
            &owner,
            "web-h2-step-2",
            AnalysisPurpose::Step(2),
            "h2",
            &AnalysisRunSpec::default(),
        );
        assert_eq!(
            run.labels().get(labels::ROLLOUT_NAME).map(String::as_str),
            Some("web")
        );
        let observed = observed_analysis_run(&run).expect("purpose labels present");
        assert_eq!(observed.purpose, AnalysisPurpose::Step(2));
        assert_eq!(observed.pod_template_hash, "h2");
        assert_eq!(
            run.metadata.owner_references.unwrap_or_default()[0].uid,
            "uid-1"
        );
    }

    #[test]
    fn a_rollout_without_uid_has_no_owner_reference() {
        let mut rollout = rollout();
        rollout.metadata.uid = None;
        assert!(owner_reference(&rollout).is_none());
    }
}
