//! Talks to the API server for the routers: reads the routing objects a Rollout names, and writes the
//! routers' changes as JSON patches guarded by the resourceVersion that was read.

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::Client;
use serde_json::{json, Value};

use super::{
    router_for, Change, ObjectKey, RouteInvalid, RouterObjects, TrafficError, TrafficRouter,
};
use crate::crd::Rollout;
use crate::crd::FIELD_MANAGER;
use crate::strategy::{DesiredTraffic, ObservedTraffic, RouteState};

/// What `apply` wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The router in use (gatewayAPI, istio, nginx).
    pub router: &'static str,
    /// One line per write, in order: `patched HTTPRoute shop/checkout`, `created Ingress ...`, `deleted ...`.
    pub written: Vec<String>,
}

impl ApplyOutcome {
    /// The router already carried the desired traffic.
    pub fn wrote_nothing(&self) -> bool {
        self.written.is_empty()
    }
}

/// What the Rollout's router carries: not configured, observed, invalid (missing or wrong objects, why), or
/// unreadable (the API server did not answer the read).
pub async fn observe(client: &kube::Client, rollout: &Rollout) -> RouteState {
    let router = match router_for(rollout) {
        None => return RouteState::NotConfigured,
        Some(Ok(router)) => router,
        Some(Err(error)) => return RouteState::Invalid(error.to_string()),
    };
    match read_objects(client, router.as_ref()).await {
        Ok(objects) => observed_state(router.observe(&objects)),
        Err(error) => RouteState::Unreadable {
            category: error.category(),
            message: error.to_string(),
        },
    }
}

/// A router's reading of its objects as a route state.
pub fn observed_state(observed: Result<ObservedTraffic, RouteInvalid>) -> RouteState {
    match observed {
        Ok(traffic) => RouteState::Observed(traffic),
        Err(invalid) => RouteState::Invalid(invalid.to_string()),
    }
}

/// Make the router carry `desired`; writes nothing when it already does. Err: nothing was written.
///
/// (With an Istio DestinationRule, the subsets are written before the VirtualService; if the
/// VirtualService write then fails, the subsets' hash labels were already pinned, which moves no traffic.)
pub async fn apply(
    client: &kube::Client,
    rollout: &Rollout,
    desired: &DesiredTraffic,
) -> Result<ApplyOutcome, TrafficError> {
    let router = router_for(rollout).ok_or_else(|| TrafficError::NoTrafficRouting {
        rollout: rollout.metadata.name.clone().unwrap_or_default(),
    })??;
    let objects = read_objects(client, router.as_ref()).await?;
    let changes = router.desired(&objects, desired)?;
    let mut outcome = ApplyOutcome {
        router: router.name(),
        written: Vec::new(),
    };
    if changes.is_empty() {
        return Ok(outcome);
    }
    if desired.sends_to_canary() {
        let namespace = changes[0].key().namespace.clone();
        let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
        let object = format!("Service {namespace}/{}", desired.canary_service);
        let found = services
            .get_opt(&desired.canary_service)
            .await
            .map_err(|source| TrafficError::Read { object, source })?;
        if found.is_none() {
            return Err(TrafficError::CanaryServiceMissing {
                namespace,
                service: desired.canary_service.clone(),
            });
        }
    }
    for change in changes {
        outcome.written.push(write(client, change).await?);
    }
    Ok(outcome)
}

fn api_for(client: &Client, key: &ObjectKey) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), &key.namespace, &key.kind.api_resource())
}

async fn read_objects(
    client: &Client,
    router: &dyn TrafficRouter,
) -> Result<RouterObjects, TrafficError> {
    let mut objects = RouterObjects::new();
    for key in router.objects() {
        let found = api_for(client, &key)
            .get_opt(&key.name)
            .await
            .map_err(|source| TrafficError::Read {
                object: key.to_string(),
                source,
            })?;
        if let Some(found) = found {
            let value =
                serde_json::to_value(&found).map_err(|error| TrafficError::EncodePatch {
                    object: key.to_string(),
                    reason: error.to_string(),
                })?;
            objects.insert(key, value);
        }
    }
    Ok(objects)
}

fn resource_version(object: &Value) -> Option<String> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A patch from what was read to what is wanted, failing on the server if the object changed in between.
pub(crate) fn guarded_patch(current: &Value, desired: &Value) -> Result<json_patch::Patch, String> {
    let mut operations = Vec::new();
    if let Some(version) = resource_version(current) {
        operations.push(
            serde_json::from_value::<json_patch::PatchOperation>(
                json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}),
            )
            .map_err(|error| error.to_string())?,
        );
    }
    operations.extend(json_patch::diff(current, desired).0);
    Ok(json_patch::Patch(operations))
}

fn is_conflict(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == 409
                || status.code == 404
                || (status.code == 422 && status.message.to_ascii_lowercase().contains("test"))
        }
        _ => false,
    }
}

async fn write(client: &Client, change: Change) -> Result<String, TrafficError> {
    let object = change.key().to_string();
    let api = api_for(client, change.key());
    let failed = |source: kube::Error| {
        if is_conflict(&source) {
            TrafficError::Conflict {
                object: object.clone(),
            }
        } else {
            TrafficError::Write {
                object: object.clone(),
                source,
            }
        }
    };
    match change {
        Change::Update {
            key,
            current,
            desired,
        } => {
            let patch =
                guarded_patch(&current, &desired).map_err(|reason| TrafficError::EncodePatch {
                    object: object.clone(),
                    reason,
                })?;
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            };
            api.patch(&key.name, &params, &Patch::<()>::Json(patch))
                .await
                .map_err(failed)?;
            Ok(format!("patched {object}"))
        }
        Change::Create { object: value, .. } => {
            let dynamic: DynamicObject =
                serde_json::from_value(value).map_err(|error| TrafficError::EncodePatch {
                    object: object.clone(),
                    reason: error.to_string(),
                })?;
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PostParams::default()
            };
            api.create(&params, &dynamic).await.map_err(failed)?;
            Ok(format!("created {object}"))
        }
        Change::Delete { key, current } => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: resource_version(&current),
                    uid: current
                        .pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                }),
                ..DeleteParams::default()
            };
            match api.delete(&key.name, &params).await {
                Ok(_) => Ok(format!("deleted {object}")),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    Ok(format!("{object} already gone"))
                }
                Err(error) => Err(failed(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_patch_tests_the_resource_version_and_reproduces_the_desired_object() {
        let current = json!({
            "metadata": {"name": "r", "resourceVersion": "7"},
            "spec": {"rules": [{"backendRefs": [{"name": "a", "weight": 100}, {"name": "b", "weight": 0}]}, {"x": 1}]}
        });
        let mut desired = current.clone();
        desired["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(90);
        desired["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(10);
        if let Some(rules) = desired["spec"]["rules"].as_array_mut() {
            rules.push(json!({"name": "serin-h"}));
        }
        let patch = guarded_patch(&current, &desired).expect("patch");
        assert_eq!(
            serde_json::to_value(&patch.0[0]).expect("op"),
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
        );
        let mut patched = current.clone();
        json_patch::patch(&mut patched, &patch).expect("applies");
        assert_eq!(patched, desired);

        let mut moved = current.clone();
        moved["metadata"]["resourceVersion"] = json!("8");
        assert!(
            json_patch::patch(&mut moved, &patch).is_err(),
            "a concurrent edit must fail the patch"
        );
    }
}
