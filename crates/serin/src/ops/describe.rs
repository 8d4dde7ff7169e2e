//! `serin status`: renders where a rollout stands (steps, weights, revisions, pods, conditions, events).

use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::OpsError;
use crate::controller::observe::{is_controlled_by, observed_replica_set};
use crate::crd::rollout::CanaryStep;
use crate::crd::{labels, Rollout, RolloutPhase};

/// An event about the Rollout, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLine {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub count: i32,
    /// For ordering only; never printed, so the output stays stable.
    pub at: Option<Timestamp>,
}

impl EventLine {
    fn from_event(event: &Event) -> EventLine {
        let at = event
            .series
            .as_ref()
            .map(|series| series.last_observed_time.0)
            .or_else(|| event.event_time.as_ref().map(|time| time.0))
            .or_else(|| event.deprecated_last_timestamp.as_ref().map(|time| time.0))
            .or_else(|| {
                event
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|time| time.0)
            });
        EventLine {
            warning: event.type_.as_deref() == Some("Warning"),
            reason: event.reason.clone().unwrap_or_default(),
            note: event.note.clone().unwrap_or_default(),
            count: event
                .series
                .as_ref()
                .map(|series| series.count)
                .unwrap_or(1),
            at,
        }
    }
}

/// How many events `status` shows.
pub const EVENTS_SHOWN: usize = 5;

/// A canary step in a few words: its kind and what it sets.
pub fn describe_step(step: &CanaryStep) -> String {
    if let Some(weight) = step.set_weight {
        format!("setWeight {weight}%")
    } else if let Some(pause) = &step.pause {
        match &pause.duration {
            Some(duration) => format!("pause {duration}"),
            None => "pause (until promoted)".to_string(),
        }
    } else if let Some(analysis) = &step.analysis {
        let names: Vec<&str> = analysis
            .templates
            .iter()
            .map(|t| t.template_name.as_str())
            .collect();
        format!("analysis {}", names.join(", "))
    } else if let Some(scale) = &step.set_canary_scale {
        if let Some(replicas) = scale.replicas {
            format!("setCanaryScale {replicas} pods")
        } else if let Some(weight) = scale.weight {
            format!("setCanaryScale {weight}%")
        } else {
            "setCanaryScale matchTrafficWeight".to_string()
        }
    } else if let Some(route) = &step.set_header_route {
        format!("setHeaderRoute {}", route.name)
    } else if let Some(route) = &step.set_mirror_route {
        format!(
            "setMirrorRoute {} {}%",
            route.name,
            route.percentage.unwrap_or(0)
        )
    } else {
        "(empty step)".to_string()
    }
}

/// The status text: readable at a glance, and stable (no ages or times) so that it can be compared.
pub fn render(rollout: &Rollout, replica_sets: &[ReplicaSet], events: &[EventLine]) -> String {
    let mut out = String::new();
    let status = rollout.status.clone().unwrap_or_default();
    let strategy = if rollout.spec.strategy.canary.is_some() {
        "Canary"
    } else if rollout.spec.strategy.blue_green.is_some() {
        "BlueGreen"
    } else {
        "(none)"
    };
    let phase = status.phase.map(|p| p.as_str()).unwrap_or("Unknown");
    let _ = writeln!(out, "Name:       {}", rollout.name_any());
    let _ = writeln!(
        out,
        "Namespace:  {}",
        rollout.namespace().unwrap_or_default()
    );
    let _ = writeln!(out, "Strategy:   {strategy}");
    let pause_reasons: Vec<&str> = status
        .pause_conditions
        .iter()
        .map(|c| c.reason.as_str())
        .collect();
    if pause_reasons.is_empty() {
        let _ = writeln!(out, "Phase:      {phase}");
    } else {
        let _ = writeln!(out, "Phase:      {phase} ({})", pause_reasons.join(", "));
    }
    if let Some(message) = &status.message {
        let _ = writeln!(out, "Message:    {message}");
    }
    let revision = |r: &Option<crate::crd::rollout::RevisionRef>| match r {
        Some(r) => format!("revision {} (hash {})", r.revision, r.pod_template_hash),
        None => "-".to_string(),
    };
    let _ = writeln!(out, "Stable:     {}", revision(&status.stable_revision));
    let _ = writeln!(out, "Canary:     {}", revision(&status.canary_revision));
    let percent = |w: Option<i32>| {
        w.map(|w| format!("{w}%"))
            .unwrap_or_else(|| "-".to_string())
    };
    let _ = writeln!(
        out,
        "Weight:     current {}, desired {}",
        percent(status.current_weight),
        percent(status.desired_weight)
    );
    let _ = writeln!(
        out,
        "Replicas:   desired {}, updated {}, ready {}, available {}",
        rollout.spec.replicas.unwrap_or(1),
        status.updated_replicas.unwrap_or(0),
        status.ready_replicas.unwrap_or(0),
        status.available_replicas.unwrap_or(0)
    );

    if let Some(canary) = &rollout.spec.strategy.canary {
        let _ = writeln!(out, "\nSteps:");
        let current = status.current_step_index.unwrap_or(0).max(0) as usize;
        for (index, step) in canary.steps.iter().enumerate() {
            let state = match index.cmp(&current) {
                std::cmp::Ordering::Less => "done",
                std::cmp::Ordering::Equal => "current",
                std::cmp::Ordering::Greater => "next",
            };
            let _ = writeln!(out, "  {state:<8} {index:>2}  {}", describe_step(step));
        }
        if canary.steps.is_empty() {
            let _ = writeln!(out, "  (no steps: the new version is promoted once ready)");
        } else if current >= canary.steps.len() {
            let _ = writeln!(out, "  all {} steps done", canary.steps.len());
        }
    }
    if let Some(blue_green) = &status.blue_green {
        let _ = writeln!(out, "\nServices:");
        let _ = writeln!(
            out,
            "  active   {}",
            blue_green.active_selector.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "  preview  {}",
            blue_green.preview_selector.as_deref().unwrap_or("-")
        );
    }

    let _ = writeln!(out, "\nReplicaSets:");
    let mut sets: Vec<_> = replica_sets.iter().map(observed_replica_set).collect();
    sets.sort_by_key(|rs| std::cmp::Reverse(rs.revision));
    if sets.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let stable_hash = status
        .stable_revision
        .as_ref()
        .map(|r| r.pod_template_hash.as_str());
    let canary_hash = status
        .canary_revision
        .as_ref()
        .map(|r| r.pod_template_hash.as_str());
    for rs in &sets {
        let role = if Some(rs.pod_template_hash.as_str()) == stable_hash {
            "stable"
        } else if Some(rs.pod_template_hash.as_str()) == canary_hash {
            "canary"
        } else {
            "old"
        };
        let _ = writeln!(
            out,
            "  {:<32} rev {:<3} {:<7} pods {}/{} ready",
            rs.name, rs.revision, role, rs.ready_replicas, rs.spec_replicas
        );
    }

    let _ = writeln!(out, "\nConditions:");
    if status.conditions.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for condition in &status.conditions {
        let _ = writeln!(
            out,
            "  {:<16} {:<6} {:<28} {}",
            condition.type_, condition.status, condition.reason, condition.message
        );
    }

    if let Some(analysis) = &status.analysis {
        let _ = writeln!(out, "\nAnalysis:");
        for (kind, run) in [
            ("step", &analysis.current_run),
            ("background", &analysis.background_run),
        ] {
            if let Some(run) = run {
                let _ = writeln!(
                    out,
                    "  {kind:<10} {} {}",
                    run.name,
                    run.phase.as_deref().unwrap_or("Pending")
                );
            }
        }
        if let Some(message) = &analysis.message {
            let _ = writeln!(out, "  {message}");
        }
    }

    let _ = writeln!(out, "\nEvents (last {EVENTS_SHOWN}):");
    let mut events: Vec<&EventLine> = events.iter().collect();
    events.sort_by_key(|event| event.at);
    let skip = events.len().saturating_sub(EVENTS_SHOWN);
    if events.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for event in events.into_iter().skip(skip) {
        let kind = if event.warning { "Warning" } else { "Normal" };
        let repeat = if event.count > 1 {
            format!(" (x{})", event.count)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {kind:<8} {:<26} {}{repeat}",
            event.reason, event.note
        );
    }
    out
}

/// Whether `--watch` can stop: the rollout settled on the current spec.
pub fn settled(rollout: &Rollout) -> bool {
    let Some(status) = &rollout.status else {
        return false;
    };
    let current = status.observed_generation.is_some()
        && status.observed_generation == rollout.metadata.generation;
    current
        && matches!(
            status.phase,
            Some(RolloutPhase::Healthy) | Some(RolloutPhase::Aborted)
        )
}

/// Reads the Rollout, its ReplicaSets and events.
pub async fn fetch(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(Rollout, Vec<ReplicaSet>, Vec<EventLine>), OpsError> {
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), namespace);
    let rollout = rollouts
        .get_opt(name)
        .await
        .map_err(OpsError::Api)?
        .ok_or_else(|| OpsError::RolloutNotFound {
            name: name.to_string(),
            namespace: namespace.to_string(),
        })?;
    let uid = rollout.uid().unwrap_or_default();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let sets = replica_sets
        .list(&ListParams::default().labels(&format!("{}={name}", labels::ROLLOUT_NAME)))
        .await
        .map_err(OpsError::Api)?
        .items
        .into_iter()
        .filter(|rs| is_controlled_by(rs, &uid))
        .collect();
    let events_api: Api<Event> = Api::namespaced(client.clone(), namespace);
    // Events are extra: a cluster that refuses to list them still gets a status.
    let events = match events_api.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .iter()
            .filter(|event| {
                event.regarding.as_ref().is_some_and(|regarding| {
                    regarding.kind.as_deref() == Some("Rollout")
                        && regarding.name.as_deref() == Some(name)
                        && (regarding.uid.is_none()
                            || regarding.uid.as_deref() == Some(uid.as_str()))
                })
            })
            .map(EventLine::from_event)
            .collect(),
        Err(error) => {
            tracing::debug!(%error, "listing events failed");
            Vec::new()
        }
    };
    Ok((rollout, sets, events))
}

/// The status text of one Rollout, read now.
pub async fn fetch_and_render(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<String, OpsError> {
    let (rollout, sets, events) = fetch(client, namespace, name).await?;
    Ok(render(&rollout, &sets, &events))
}

/// Redraws the status whenever it changes, until the rollout settles (or the process is interrupted).
pub async fn watch(
    client: &Client,
    namespace: &str,
    name: &str,
    every: Duration,
    out: &mut impl std::io::Write,
) -> Result<(), OpsError> {
    use std::io::IsTerminal;
    let redraw = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let (rollout, sets, events) = fetch(client, namespace, name).await?;
        let text = render(&rollout, &sets, &events);
        if text != last {
            let frame = if redraw {
                format!("\x1b[2J\x1b[H{text}")
            } else {
                format!("{text}---\n")
            };
            out.write_all(frame.as_bytes()).map_err(OpsError::Output)?;
            out.flush().map_err(OpsError::Output)?;
            last = text;
        }
        if settled(&rollout) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::{RevisionRef, RolloutStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use serde_json::json;

    fn rollout() -> Rollout {
        let mut rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "generation": 2},
            "spec": {"replicas": 10, "selector": {"matchLabels": {"app": "web"}}, "template": {},
                     "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary", "steps": [
                        {"setWeight": 20}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {}},
                        {"analysis": {"templates": [{"templateName": "http-health"}]}}]}}}
        }))
        .expect("valid rollout");
        rollout.status = Some(RolloutStatus {
            observed_generation: Some(2),
            phase: Some(RolloutPhase::Paused),
            message: Some("waiting at step 3 for promotion".into()),
            current_step_index: Some(3),
            stable_revision: Some(RevisionRef {
                pod_template_hash: "aaa".into(),
                revision: 1,
            }),
            canary_revision: Some(RevisionRef {
                pod_template_hash: "bbb".into(),
                revision: 2,
            }),
            current_weight: Some(50),
            desired_weight: Some(50),
            conditions: vec![Condition {
                type_: "Paused".into(),
                status: "True".into(),
                reason: "CanaryPauseStep".into(),
                message: "waiting for promotion".into(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: Some(2),
            }],
            ..Default::default()
        });
        rollout
    }

    fn rs(hash: &str, revision: i64, desired: i32, ready: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": format!("web-{hash}"), "labels": {labels::POD_TEMPLATE_HASH: hash},
                         "annotations": {labels::REVISION: revision.to_string()}},
            "spec": {"replicas": desired, "selector": {}},
            "status": {"replicas": desired, "readyReplicas": ready}
        }))
        .expect("valid replicaset")
    }

    fn event(reason: &str, second: i64) -> EventLine {
        EventLine {
            warning: false,
            reason: reason.into(),
            note: format!("note {reason}"),
            count: 1,
            at: Timestamp::from_second(second).ok(),
        }
    }

    #[test]
    fn steps_are_marked_done_current_and_next_with_their_kind() {
        let text = render(&rollout(), &[], &[]);
        assert!(text.contains("  done      0  setWeight 20%\n"), "{text}");
        assert!(text.contains("  done      1  pause 2s\n"), "{text}");
        assert!(
            text.contains("  current   3  pause (until promoted)\n"),
            "{text}"
        );
        assert!(
            text.contains("  next      4  analysis http-health\n"),
            "{text}"
        );
    }

    #[test]
    fn revisions_weights_pods_and_conditions_are_shown() {
        let text = render(&rollout(), &[rs("aaa", 1, 5, 5), rs("bbb", 2, 5, 3)], &[]);
        assert!(text.contains("Phase:      Paused\n"), "{text}");
        assert!(
            text.contains("Stable:     revision 1 (hash aaa)\n"),
            "{text}"
        );
        assert!(
            text.contains("Canary:     revision 2 (hash bbb)\n"),
            "{text}"
        );
        assert!(
            text.contains("Weight:     current 50%, desired 50%\n"),
            "{text}"
        );
        assert!(text.contains("web-bbb"), "{text}");
        assert!(text.contains("canary  pods 3/5 ready"), "{text}");
        assert!(text.contains("stable  pods 5/5 ready"), "{text}");
        assert!(
            text.contains("Paused           True   CanaryPauseStep"),
            "{text}"
        );
        let bbb = text.find("web-bbb").unwrap_or(usize::MAX);
        let aaa = text.find("web-aaa").unwrap_or(0);
        assert!(bbb < aaa, "newest revision first:\n{text}");
    }

    #[test]
    fn only_the_last_five_events_are_shown_oldest_first() {
        let events: Vec<EventLine> = (0..7)
            .rev()
            .map(|i| event(&format!("Reason{i}"), i))
            .collect();
        let text = render(&rollout(), &[], &events);
        assert!(!text.contains("Reason1 "), "{text}");
        assert!(text.contains("Reason2"), "{text}");
        let r2 = text.find("Reason2").unwrap_or(usize::MAX);
        let r6 = text.find("Reason6").unwrap_or(0);
        assert!(r2 < r6, "{text}");
    }

    #[test]
    fn output_is_stable_for_the_same_state() {
        let sets = [rs("aaa", 1, 5, 5)];
        let events = [event("StepReached", 1)];
        assert_eq!(
            render(&rollout(), &sets, &events),
            render(&rollout(), &sets, &events)
        );
    }

    #[test]
    fn watch_stops_only_when_the_current_generation_settled() {
        let mut rollout = rollout();
        assert!(!settled(&rollout));
        if let Some(status) = rollout.status.as_mut() {
            status.phase = Some(RolloutPhase::Healthy);
        }
        assert!(settled(&rollout));
        rollout.metadata.generation = Some(3);
        assert!(
            !settled(&rollout),
            "a status of an older generation is not final"
        );
    }
}
