//! The pod template of a Rollout: a Deployment's `spec.template`, with its pod spec boxed.
//!
//! The same JSON as k8s-openapi's `PodTemplateSpec`, which holds its `PodSpec` inline: 1.8 KiB in every
//! Rollout even when the pod spec is absent. The controller's Rollout cache drops pod specs (only creating
//! a ReplicaSet needs one, and then the Rollout is read whole), so there a Rollout keeps only the template's
//! metadata and the hash of the template it was given.

use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A pod template, exactly as in a Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodTemplate {
    /// Labels and annotations of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ObjectMeta>,

    /// The pods' spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<PodSpec>>,

    /// Only in the controller's cache, where `spec` was dropped: the hash of the whole template. Never
    /// serialized, so a template without its spec cannot reach the API server as if it were whole.
    #[serde(skip)]
    pub elided_hash: Option<String>,
}

impl From<PodTemplateSpec> for PodTemplate {
    fn from(template: PodTemplateSpec) -> PodTemplate {
        PodTemplate {
            metadata: template.metadata,
            spec: template.spec.map(Box::new),
            elided_hash: None,
        }
    }
}

impl From<PodTemplate> for PodTemplateSpec {
    fn from(template: PodTemplate) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: template.metadata,
            spec: template.spec.map(|spec| *spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_same_json_as_a_deployments_template_both_ways() {
        let text = json!({
            "metadata": {"labels": {"app": "web"}, "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "app", "image": "web:2",
                                     "ports": [{"containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}],
                     "terminationGracePeriodSeconds": 5}
        });
        let ours: PodTemplate = serde_json::from_value(text.clone()).expect("decodes");
        let theirs: PodTemplateSpec = serde_json::from_value(text.clone()).expect("decodes");
        assert_eq!(serde_json::to_value(&ours).expect("encodes"), text);
        assert_eq!(PodTemplateSpec::from(ours.clone()), theirs);
        assert_eq!(PodTemplate::from(theirs), ours);
        assert!(std::mem::size_of::<PodTemplate>() < std::mem::size_of::<PodTemplateSpec>() / 4);
    }

    #[test]
    fn the_elided_hash_is_never_serialized() {
        let template = PodTemplate {
            elided_hash: Some("bcdfghjklm".into()),
            ..PodTemplate::default()
        };
        assert_eq!(serde_json::to_value(&template).expect("encodes"), json!({}));
    }
}
