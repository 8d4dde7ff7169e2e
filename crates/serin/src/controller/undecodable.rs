//! Rollouts the API server stored but Serin cannot decode: reported on their own status, never allowed to
//! stop the watch of every other Rollout.
//!
//! The schema keeps unknown fields in the pod template (the full PodSpec schema is too large for a CRD),
//! so the API server accepts `containers: 5`. Decoded as a list, one such object fails the whole list and
//! no Rollout of the cluster is reconciled again until it is fixed; decoded one object at a time, only that
//! Rollout is skipped and its status says which field is wrong.

use futures::channel::mpsc;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::leader::Fence;
use crate::crd::{condition, reason, Rollout};
use crate::events::{Note, Publisher, Severity};

/// A Rollout that does not decode: the object as stored and the first field at fault.
#[derive(Clone, Debug)]
pub struct Undecodable {
    pub object: DynamicObject,
    /// Path of the field at fault, as in the spec (`spec.template.spec.containers`).
    pub field: String,
    /// What is wrong with it, as the decoder says.
    pub problem: String,
}

impl Undecodable {
    /// The message written to the status and the event.
    pub fn message(&self) -> String {
        format!("{}: {}", self.field, self.problem)
    }
}

/// Decodes one stored Rollout, naming the field at fault when it cannot be.
pub fn decode(object: DynamicObject) -> Result<Rollout, Box<Undecodable>> {
    let undecodable = |object: DynamicObject, field: String, problem: String| {
        Box::new(Undecodable {
            object,
            field,
            problem,
        })
    };
    let value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(error) => return Err(undecodable(object, ".".into(), error.to_string())),
    };
    serde_path_to_error::deserialize::<_, Rollout>(value).map_err(|error| {
        let field = error.path().to_string();
        let problem = error.inner().to_string();
        undecodable(object, field, problem)
    })
}

/// Turns a watch event of stored objects into one of Rollouts. A Rollout that does not decode is sent to
/// `report`; as an update it reads as a deletion, so the last version that did decode is not planned from.
pub fn decode_event(
    event: watcher::Event<DynamicObject>,
    report: &mpsc::UnboundedSender<Undecodable>,
) -> Option<watcher::Event<Rollout>> {
    let decoded = |object: DynamicObject| -> Result<Rollout, Option<Box<Rollout>>> {
        decode(object).map_err(|undecodable| {
            let stub = stub_of(&undecodable.object).map(Box::new);
            let _ = report.unbounded_send(*undecodable);
            stub
        })
    };
    match event {
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
        watcher::Event::InitApply(object) => decoded(object).ok().map(watcher::Event::InitApply),
        watcher::Event::Apply(object) => match decoded(object) {
            Ok(rollout) => Some(watcher::Event::Apply(rollout)),
            Err(stub) => stub.map(|stub| watcher::Event::Delete(*stub)),
        },
        watcher::Event::Delete(object) => match decode(object) {
            Ok(rollout) => Some(watcher::Event::Delete(rollout)),
            Err(undecodable) => stub_of(&undecodable.object).map(watcher::Event::Delete),
        },
    }
}

/// A Rollout with only the identity of `object`, for removing it from the store.
fn stub_of(object: &DynamicObject) -> Option<Rollout> {
    let spec =
        serde_json::from_value(json!({"selector": {}, "template": {}, "strategy": {}})).ok()?;
    let mut stub = Rollout::new(&object.metadata.name.clone()?, spec);
    stub.metadata.namespace = object.metadata.namespace.clone();
    stub.metadata.uid = object.metadata.uid.clone();
    Some(stub)
}

/// The status that reports `message` as an invalid spec, from the status as stored; `None` when it already
/// says so for this generation (a reconcile that finds nothing to change writes nothing).
pub fn invalid_status(
    status: &Value,
    generation: Option<i64>,
    message: &str,
    now: Timestamp,
) -> Option<Value> {
    let mut conditions: Vec<Value> = status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let reported = conditions.iter().any(|c| {
        c["type"] == condition::INVALID_SPEC && c["status"] == "True" && c["message"] == message
    });
    let observed = status.get("observedGeneration").and_then(Value::as_i64);
    if reported && observed == generation {
        return None;
    }
    let set = |conditions: &mut Vec<Value>, type_: &str, value: &str| {
        let since = conditions
            .iter()
            .find(|c| c["type"] == type_ && c["status"] == value)
            .and_then(|c| c.get("lastTransitionTime").cloned());
        conditions.retain(|c| c["type"] != type_);
        let condition = Condition {
            type_: type_.to_string(),
            status: value.to_string(),
            reason: reason::INVALID_SPEC.to_string(),
            message: message.to_string(),
            observed_generation: generation,
            last_transition_time: Time(now),
        };
        let mut condition = serde_json::to_value(condition).unwrap_or(Value::Null);
        if let Some(since) = since {
            condition["lastTransitionTime"] = since;
        }
        conditions.push(condition);
    };
    set(&mut conditions, condition::INVALID_SPEC, "True");
    set(&mut conditions, condition::PROGRESSING, "False");
    set(&mut conditions, condition::DEGRADED, "True");
    set(&mut conditions, condition::READY, "False");
    let mut status = match status {
        Value::Object(_) => status.clone(),
        _ => json!({}),
    };
    status["conditions"] = Value::Array(conditions);
    status["phase"] = json!("Degraded");
    status["message"] = json!(format!("invalid spec: {message}"));
    status["observedGeneration"] = json!(generation);
    Some(status)
}

/// Writes the invalid-spec status and a Warning event for every Rollout sent to it, until the sender goes.
pub async fn report(
    client: Client,
    recorder: Publisher,
    fence: Fence,
    mut undecodable: mpsc::UnboundedReceiver<Undecodable>,
) {
    let resource = ApiResource::erase::<Rollout>(&());
    while let Some(found) = undecodable.next().await {
        let object = &found.object;
        let (Some(namespace), name) = (object.namespace(), object.name_any()) else {
            continue;
        };
        let message = found.message();
        let status = object.data.get("status").cloned().unwrap_or(Value::Null);
        let Some(status) = invalid_status(
            &status,
            object.metadata.generation,
            &message,
            Timestamp::now(),
        ) else {
            continue;
        };
        if fence.check().is_err() {
            continue;
        }
        tracing::warn!(rollout = %format!("{namespace}/{name}"), %message, "Rollout cannot be decoded");
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
        // The resourceVersion makes the write fail rather than overwrite a status written meanwhile.
        let patch = json!({
            "metadata": {"resourceVersion": object.resource_version()},
            "status": status,
        });
        let params = PatchParams {
            field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        if let Err(error) = api.patch_status(&name, &params, &Patch::Merge(patch)).await {
            tracing::warn!(%error, rollout = %name, "writing the invalid-spec status failed");
            continue;
        }
        let event = Note {
            severity: Severity::Warning,
            reason: reason::INVALID_SPEC,
            message: &message,
        };
        if let Err(error) = recorder
            .publish(&event, &object.object_ref(&resource))
            .await
        {
            tracing::warn!(%error, reason = reason::INVALID_SPEC, "recording an event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "generation": 2, "resourceVersion": "7"},
            "spec": spec
        }))
        .expect("a stored object")
    }

    fn good_spec() -> Value {
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "web:1"}]}},
            "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}
        })
    }

    #[test]
    fn a_rollout_that_decodes_is_passed_on_and_one_that_does_not_names_the_field() {
        let rollout = decode(stored(good_spec())).expect("decodes");
        assert_eq!(rollout.name_any(), "web");
        let mut bad = good_spec();
        bad["template"]["spec"]["containers"] = json!(5);
        let undecodable = decode(stored(bad)).expect_err("does not decode");
        assert_eq!(undecodable.field, "spec.template.spec.containers");
        assert!(
            undecodable.message().starts_with(
                "spec.template.spec.containers: invalid type: integer `5`, expected a sequence"
            ),
            "{}",
            undecodable.message()
        );
    }

    #[test]
    fn an_update_that_does_not_decode_removes_the_old_version_and_is_reported() {
        let (sender, mut receiver) = mpsc::unbounded();
        let mut bad = good_spec();
        bad["replicas"] = json!("many");
        match decode_event(watcher::Event::Apply(stored(bad.clone())), &sender) {
            Some(watcher::Event::Delete(stub)) => {
                assert_eq!(
                    (stub.name_any(), stub.namespace()),
                    ("web".into(), Some("shop".into()))
                )
            }
            other => panic!("expected a deletion, got {other:?}"),
        }
        assert!(decode_event(watcher::Event::InitApply(stored(bad)), &sender).is_none());
        let reported: Vec<String> = std::iter::from_fn(|| receiver.try_recv().ok())
            .map(|u| u.field)
            .collect();
        assert_eq!(reported, ["spec.replicas", "spec.replicas"]);
        assert!(matches!(
            decode_event(watcher::Event::Apply(stored(good_spec())), &sender),
            Some(watcher::Event::Apply(_))
        ));
    }

    #[test]
    fn the_invalid_status_is_written_once_per_generation_and_message() {
        let now = Timestamp::UNIX_EPOCH;
        let status = invalid_status(&Value::Null, Some(2), "spec.x: bad", now).expect("written");
        assert_eq!(status["phase"], "Degraded");
        assert_eq!(status["observedGeneration"], 2);
        let invalid = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "InvalidSpec").cloned())
            .expect("InvalidSpec condition");
        assert_eq!(
            (&invalid["status"], &invalid["reason"], &invalid["message"]),
            (&json!("True"), &json!("InvalidSpec"), &json!("spec.x: bad"))
        );
        assert_eq!(invalid_status(&status, Some(2), "spec.x: bad", now), None);
        assert!(invalid_status(&status, Some(3), "spec.x: bad", now).is_some());
        assert!(invalid_status(&status, Some(2), "spec.y: bad", now).is_some());
    }
}
