//! Faults that act on the simulated workload, shared by `SimCluster` methods and the admin endpoint:
//! forcing pods unready and back, stopping and starting the workload simulator.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::server::ServerState;
use super::workload::{
    is_pod_active, is_pod_ready, ReadinessOverride, ReadinessOverrides, WorkloadControl,
    WorkloadError,
};

/// How long a readiness change may take to show in the pod's status before it counts as failed.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const PODS_KEY: &str = "/pods";
const REPLICASETS_KEY: &str = "apps/replicasets";

#[derive(thiserror::Error, Debug)]
pub enum ControlError {
    #[error("this sim runs no workload simulator (it was started with SimConfig::workload None)")]
    NoWorkloadSimulator,
    #[error("pod: {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error("replicaset: {namespace}/{name} not found")]
    ReplicaSetNotFound { namespace: String, name: String },
    #[error("count: replicaset {namespace}/{name} has {available} ready pods that are not already forced unready, {asked} asked")]
    NotEnoughReadyPods {
        namespace: String,
        name: String,
        available: usize,
        asked: usize,
    },
    #[error("pod {namespace}/{name} was deleted before its readiness changed")]
    PodGone { namespace: String, name: String },
    #[error("pod {namespace}/{name} did not report Ready={ready} within {seconds}s")]
    NotApplied {
        namespace: String,
        name: String,
        ready: bool,
        seconds: u64,
    },
    #[error("stored {what} is unreadable: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
    #[error("starting the workload simulator: {0}")]
    Start(#[from] WorkloadError),
}

impl ControlError {
    pub fn category(&self) -> &'static str {
        match self {
            ControlError::NoWorkloadSimulator => "no_workload_simulator",
            ControlError::PodNotFound { .. } => "pod_not_found",
            ControlError::ReplicaSetNotFound { .. } => "replicaset_not_found",
            ControlError::NotEnoughReadyPods { .. } => "not_enough_ready_pods",
            ControlError::PodGone { .. } => "pod_gone",
            ControlError::NotApplied { .. } => "not_applied",
            ControlError::Decode { .. } => "decode",
            ControlError::Start(_) => "start",
        }
    }

    /// The HTTP status the admin endpoint answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::PodNotFound { .. } | ControlError::ReplicaSetNotFound { .. } => 404,
            ControlError::NoWorkloadSimulator | ControlError::NotEnoughReadyPods { .. } => 409,
            ControlError::PodGone { .. } => 409,
            ControlError::NotApplied { .. } => 504,
            ControlError::Decode { .. } | ControlError::Start(_) => 500,
        }
    }
}

fn workload(state: &ServerState) -> Result<&WorkloadControl, ControlError> {
    state
        .workload
        .get()
        .map(|w| w.as_ref())
        .ok_or(ControlError::NoWorkloadSimulator)
}

fn decode<T: serde::de::DeserializeOwned>(what: String, value: Value) -> Result<T, ControlError> {
    serde_json::from_value(value).map_err(|source| ControlError::Decode { what, source })
}

fn stored_pod(
    state: &ServerState,
    namespace: &str,
    name: &str,
) -> Result<Option<Pod>, ControlError> {
    let value = {
        let inner = state.api.store.lock();
        match inner.get(PODS_KEY, namespace, name) {
            Some(stored) => stored.value(),
            None => return Ok(None),
        }
    };
    let value = value.map_err(|source| ControlError::Decode {
        what: format!("pod {namespace}/{name}"),
        source,
    })?;
    decode(format!("pod {namespace}/{name}"), value).map(Some)
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or("")
}

/// The pods of a ReplicaSet (by controller reference), in name order.
fn replicaset_pods(
    state: &ServerState,
    namespace: &str,
    replicaset: &str,
) -> Result<Vec<Pod>, ControlError> {
    let (rs_uid, pods) = {
        let inner = state.api.store.lock();
        let rs = inner
            .get(REPLICASETS_KEY, namespace, replicaset)
            .ok_or_else(|| ControlError::ReplicaSetNotFound {
                namespace: namespace.into(),
                name: replicaset.into(),
            })?;
        let pods: Vec<(String, Result<Value, serde_json::Error>)> = inner
            .range(PODS_KEY, Some(namespace), None)
            .filter(|(_, object)| object.owner_uids.contains(&rs.uid))
            .map(|((_, name), object)| (name.clone(), object.value()))
            .collect();
        (rs.uid.to_string(), pods)
    };
    let mut owned = Vec::new();
    for (name, value) in pods {
        let what = format!("pod {namespace}/{name}");
        let value = value.map_err(|source| ControlError::Decode {
            what: what.clone(),
            source,
        })?;
        let pod: Pod = decode(what, value)?;
        let controlled = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.controller == Some(true) && r.uid == rs_uid);
        if controlled {
            owned.push(pod);
        }
    }
    Ok(owned)
}

/// Which `count` pods of a ReplicaSet to make unready: active, Ready and not already forced unready,
/// first by name (so the choice is reproducible).
pub fn pick_pods_to_make_unready<'a>(
    pods: &'a [Pod],
    overrides: &ReadinessOverrides,
    count: usize,
) -> Result<Vec<&'a Pod>, usize> {
    let mut candidates: Vec<&Pod> = pods
        .iter()
        .filter(|p| is_pod_active(p) && is_pod_ready(p) && !overrides.is_forced_unready(uid(p)))
        .collect();
    candidates.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    if candidates.len() < count {
        return Err(candidates.len());
    }
    candidates.truncate(count);
    Ok(candidates)
}

/// Forces the readiness and pokes the kubelet; returns whether to wait for `Ready == ready`.
fn force(control: &WorkloadControl, pod: &Pod, ready: bool) -> bool {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let now = Timestamp::now();
    let overrides = control.readiness();
    let wait = if ready {
        match overrides.get(uid(pod)) {
            Some(ReadinessOverride::Unready { was_ready, .. }) => {
                overrides.set(uid(pod), ReadinessOverride::Restored { since: now });
                // A pod that was not Ready when forced (still starting, never-ready) need not be now.
                was_ready
            }
            _ => false,
        }
    } else {
        if !overrides.is_forced_unready(uid(pod)) {
            overrides.set(
                uid(pod),
                ReadinessOverride::Unready {
                    since: now,
                    was_ready: is_pod_ready(pod),
                },
            );
        }
        true
    };
    control.poke_pod(namespace, name);
    wait && control.is_running()
}

/// Waits (bounded) until the stored pod reports `Ready == ready`.
async fn wait_for_readiness(
    state: &ServerState,
    namespace: &str,
    name: &str,
    pod_uid: &str,
    ready: bool,
) -> Result<(), ControlError> {
    let mut latest = state.api.store.subscribe();
    let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
    // Each pass either returns or waits for a commit; the deadline bounds the passes.
    loop {
        latest.mark_unchanged();
        match stored_pod(state, namespace, name)? {
            Some(pod) if uid(&pod) == pod_uid && is_pod_active(&pod) => {
                if is_pod_ready(&pod) == ready {
                    return Ok(());
                }
            }
            _ => {
                return Err(ControlError::PodGone {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
        }
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Err(ControlError::NotApplied {
        namespace: namespace.into(),
        name: name.into(),
        ready,
        seconds: APPLY_TIMEOUT.as_secs(),
    })
}

/// Forces one pod unready (`ready` false) or gives it back its own readiness (`ready` true). While
/// the workload simulator runs this returns once the pod's status shows the change; while it is
/// stopped the change waits for its start.
pub async fn set_pod_ready(
    state: &ServerState,
    namespace: &str,
    name: &str,
    ready: bool,
) -> Result<(), ControlError> {
    let control = workload(state)?;
    let pod = stored_pod(state, namespace, name)?.ok_or_else(|| ControlError::PodNotFound {
        namespace: namespace.into(),
        name: name.into(),
    })?;
    if force(control, &pod, ready) {
        wait_for_readiness(state, namespace, name, uid(&pod), ready).await?;
    }
    Ok(())
}

/// Forces `count` Ready pods of a ReplicaSet unready (see [`pick_pods_to_make_unready`]); returns
/// their names.
pub async fn make_replicaset_pods_unready(
    state: &ServerState,
    namespace: &str,
    replicaset: &str,
    count: usize,
) -> Result<Vec<String>, ControlError> {
    let control = workload(state)?;
    let pods = replicaset_pods(state, namespace, replicaset)?;
    let picked =
        pick_pods_to_make_unready(&pods, control.readiness(), count).map_err(|available| {
            ControlError::NotEnoughReadyPods {
                namespace: namespace.into(),
                name: replicaset.into(),
                available,
                asked: count,
            }
        })?;
    // All are forced before waiting, so they turn unready together, as after one bad config push.
    let waits: Vec<(&Pod, bool)> = picked
        .iter()
        .map(|p| (*p, force(control, p, false)))
        .collect();
    for (pod, wait) in &waits {
        if *wait {
            let name = pod.metadata.name.as_deref().unwrap_or("");
            wait_for_readiness(state, namespace, name, uid(pod), false).await?;
        }
    }
    Ok(picked
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect())
}

/// Gives every forced-unready pod of a ReplicaSet its own readiness back; returns their names.
pub async fn make_replicaset_pods_ready(
    state: &ServerState,
    namespace: &str,
    replicaset: &str,
) -> Result<Vec<String>, ControlError> {
    let control = workload(state)?;
    let pods = replicaset_pods(state, namespace, replicaset)?;
    let forced: Vec<&Pod> = pods
        .iter()
        .filter(|p| control.readiness().is_forced_unready(uid(p)))
        .collect();
    let waits: Vec<(&Pod, bool)> = forced
        .iter()
        .map(|p| (*p, force(control, p, true)))
        .collect();
    for (pod, wait) in &waits {
        if *wait {
            let name = pod.metadata.name.as_deref().unwrap_or("");
            wait_for_readiness(state, namespace, name, uid(pod), true).await?;
        }
    }
    Ok(forced
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect())
}

/// Stops the workload simulator; false when it was already stopped.
pub async fn stop_workload(state: &ServerState) -> Result<bool, ControlError> {
    Ok(workload(state)?.stop().await)
}

/// Starts the workload simulator again; false when it was running.
pub async fn start_workload(state: &ServerState) -> Result<bool, ControlError> {
    Ok(workload(state)?.start().await?)
}

/// Whether the workload simulator runs; None when the sim has none.
pub fn workload_running(state: &ServerState) -> Option<bool> {
    state.workload.get().map(|w| w.is_running())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, uid: &str, ready: bool, deleting: bool) -> Pod {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]}
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
        }
        serde_json::from_value(value).unwrap_or_default()
    }

    #[test]
    fn picks_ready_active_unforced_pods_by_name() {
        let pods = vec![
            pod("web-c", "c", true, false),
            pod("web-a", "a", true, false),
            pod("web-b", "b", false, false),
            pod("web-d", "d", true, true),
            pod("web-e", "e", true, false),
        ];
        let overrides = ReadinessOverrides::default();
        let names = |picked: Vec<&Pod>| -> Vec<String> {
            picked
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect()
        };
        assert_eq!(
            names(pick_pods_to_make_unready(&pods, &overrides, 2).unwrap_or_default()),
            vec!["web-a", "web-c"]
        );
        overrides.set(
            "a",
            ReadinessOverride::Unready {
                since: Timestamp::UNIX_EPOCH,
                was_ready: true,
            },
        );
        assert_eq!(
            names(pick_pods_to_make_unready(&pods, &overrides, 2).unwrap_or_default()),
            vec!["web-c", "web-e"]
        );
        assert_eq!(
            pick_pods_to_make_unready(&pods, &overrides, 3).map(|p| p.len()),
            Err(2),
            "unready, deleting and already forced pods do not count"
        );
    }
}
