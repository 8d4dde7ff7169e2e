//! Table-driven tests of the planner's decisions, with a tiny cluster that applies plans.

use std::collections::BTreeMap;

use crate::crd::PodTemplate;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use serde_json::json;

use super::*;
use crate::crd::labels::POD_TEMPLATE_HASH;
use crate::crd::rollout::{
    AnalysisTemplateRef, BlueGreenStrategy, CanaryStep, GatewayApiRouting, ManualCommands,
    PauseStep, PromoteCommand, RolloutAnalysis, SetCanaryScale,
};
use crate::crd::{
    condition, reason, AnalysisPhase, AnalysisTemplateSpec, CanaryStrategy, ManifestDuration,
    Metric, Rollout, RolloutPhase, RolloutSpec, RolloutStatus, RolloutStrategy, TrafficRouting,
};
use crate::strategy::{ObservedTraffic, RouteState};

const T0: i64 = 1_800_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn template(image: &str) -> PodTemplate {
    serde_json::from_value(json!({
        "metadata": {"labels": {"app": "checkout"}},
        "spec": {"containers": [{"name": "app", "image": image}]}
    }))
    .unwrap()
}

fn weight(w: i32) -> CanaryStep {
    CanaryStep {
        set_weight: Some(w),
        ..Default::default()
    }
}
fn pause(secs: Option<i64>) -> CanaryStep {
    CanaryStep {
        pause: Some(PauseStep {
            duration: secs.map(ManifestDuration::Seconds),
        }),
        ..Default::default()
    }
}
fn analysis_step(template: &str) -> CanaryStep {
    CanaryStep {
        analysis: Some(RolloutAnalysis {
            templates: vec![AnalysisTemplateRef {
                template_name: template.into(),
                cluster_scope: false,
            }],
            args: vec![],
        }),
        ..Default::default()
    }
}

fn canary_rollout(steps: Vec<CanaryStep>, router: bool) -> Rollout {
    let canary = CanaryStrategy {
        stable_service: Some("checkout".into()),
        canary_service: Some("checkout-canary".into()),
        traffic_routing: router.then(|| TrafficRouting {
            gateway_api: Some(GatewayApiRouting {
                http_route: "checkout".into(),
            }),
            ..Default::default()
        }),
        steps,
        ..Default::default()
    };
    rollout(RolloutStrategy {
        canary: Some(canary),
        blue_green: None,
    })
}

fn blue_green_rollout(configure: impl FnOnce(&mut BlueGreenStrategy)) -> Rollout {
    let mut bg = BlueGreenStrategy {
        active_service: "checkout".into(),
        preview_service: Some("checkout-preview".into()),
        ..Default::default()
    };
    configure(&mut bg);
    rollout(RolloutStrategy {
        canary: None,
        blue_green: Some(bg),
    })
}

fn rollout(strategy: RolloutStrategy) -> Rollout {
    let mut ro = Rollout::new(
        "checkout",
        RolloutSpec {
            replicas: Some(10),
            selector: serde_json::from_value(json!({"matchLabels": {"app": "checkout"}})).unwrap(),
            template: template("app:1"),
            revision_history_limit: None,
            progress_deadline_seconds: None,
            progress_deadline_abort: false,
            min_ready_seconds: None,
            paused: false,
            strategy,
        },
    );
    ro.metadata = ObjectMeta {
        name: Some("checkout".into()),
        namespace: Some("shop".into()),
        generation: Some(1),
        ..Default::default()
    };
    ro
}

/// A cluster that applies plans; pods become ready only when told.
#[derive(Clone, Debug)]
struct Cluster {
    observed: Observed,
    rollout: Rollout,
}

impl Cluster {
    fn new(rollout: Rollout) -> Self {
        let mut observed = Observed::default();
        for name in ["checkout", "checkout-canary", "checkout-preview"] {
            observed.services.insert(
                name.to_string(),
                ObservedService {
                    name: name.into(),
                    selector: [("app".to_string(), "checkout".to_string())].into(),
                },
            );
        }
        if rollout
            .spec
            .strategy
            .canary
            .as_ref()
            .is_some_and(|c| c.traffic_routing.is_some())
        {
            observed.traffic = RouteState::Observed(ObservedTraffic::default());
        }
        observed.analysis_templates.insert(
            TemplateKey {
                name: "http-health".into(),
                cluster_scope: false,
            },
            Ok(AnalysisTemplateSpec {
                metrics: vec![Metric {
                    name: "error-rate".into(),
                    success_condition: Some("result < 0.05".into()),
                    provider: serin_metric_provider(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
        Cluster { observed, rollout }
    }

    fn plan(&self, secs: i64) -> Plan {
        plan(&self.rollout, &self.observed, at(secs))
    }

    fn apply(&mut self, plan: &Plan) {
        for action in &plan.actions {
            match action {
                Action::CreateReplicaSet {
                    name,
                    pod_template_hash,
                    revision,
                    replicas,
                    template,
                } => {
                    assert_eq!(
                        template
                            .metadata
                            .as_ref()
                            .and_then(|m| m.labels.as_ref())
                            .and_then(|l| l.get(POD_TEMPLATE_HASH)),
                        Some(pod_template_hash)
                    );
                    assert!(
                        !self.observed.replica_sets.iter().any(|rs| rs.name == *name),
                        "duplicate {name}"
                    );
                    self.observed.replica_sets.push(ObservedReplicaSet {
                        name: name.clone(),
                        pod_template_hash: pod_template_hash.clone(),
                        revision: *revision,
                        spec_replicas: *replicas,
                        status_current: true,
                        ..Default::default()
                    });
                }
                Action::ScaleReplicaSet { name, replicas } => {
                    let rs = self.rs_named(name);
                    rs.spec_replicas = *replicas;
                    for count in [
                        &mut rs.replicas,
                        &mut rs.ready_replicas,
                        &mut rs.available_replicas,
                    ] {
                        *count = (*count).min(*replicas);
                    }
                }
                Action::SetRevision { name, revision } => self.rs_named(name).revision = *revision,
                Action::DeleteReplicaSet { name } => {
                    self.observed.replica_sets.retain(|rs| rs.name != *name)
                }
                Action::SetServiceSelector {
                    service,
                    pod_template_hash,
                } => {
                    let svc = self.observed.services.get_mut(service).unwrap();
                    match pod_template_hash {
                        Some(h) => svc.selector.insert(POD_TEMPLATE_HASH.into(), h.clone()),
                        None => svc.selector.remove(POD_TEMPLATE_HASH),
                    };
                }
                Action::SetTraffic(desired) => {
                    self.observed.traffic = RouteState::Observed(ObservedTraffic {
                        canary_weight: desired.canary_weight,
                        header_routes: desired
                            .header_routes
                            .iter()
                            .map(|r| r.name.clone())
                            .collect(),
                        mirror_routes: desired
                            .mirror_routes
                            .iter()
                            .map(|r| r.name.clone())
                            .collect(),
                    })
                }
                Action::CreateAnalysisRun {
                    name,
                    purpose,
                    pod_template_hash,
                    ..
                } => self.observed.analysis_runs.push(ObservedAnalysisRun {
                    name: name.clone(),
                    purpose: *purpose,
                    pod_template_hash: pod_template_hash.clone(),
                    phase: AnalysisPhase::Running,
                    message: None,
                    terminating: false,
                    latest_successful: true,
                }),
                Action::TerminateAnalysisRun { name } => {
                    if let Some(run) = self
                        .observed
                        .analysis_runs
                        .iter_mut()
                        .find(|r| r.name == *name)
                    {
                        run.terminating = true;
                    }
                }
                Action::DeleteAnalysisRun { name } => {
                    self.observed.analysis_runs.retain(|r| r.name != *name)
                }
            }
        }
        self.rollout.status = Some(plan.status.clone());
    }

    fn rs_named(&mut self, name: &str) -> &mut ObservedReplicaSet {
        self.observed
            .replica_sets
            .iter_mut()
            .find(|rs| rs.name == name)
            .unwrap()
    }

    fn rs(&self, hash: &str) -> &ObservedReplicaSet {
        self.observed
            .replica_sets
            .iter()
            .find(|rs| rs.pod_template_hash == hash)
            .unwrap()
    }

    /// Every pod of every ReplicaSet becomes ready and available.
    fn pods_ready(&mut self) {
        for rs in &mut self.observed.replica_sets {
            rs.replicas = rs.spec_replicas;
            rs.ready_replicas = rs.spec_replicas;
            rs.available_replicas = rs.spec_replicas;
        }
    }

    fn selector(&self, service: &str) -> Option<String> {
        self.observed.services[service]
            .selector
            .get(POD_TEMPLATE_HASH)
            .cloned()
    }

    fn weight(&self) -> i32 {
        match &self.observed.traffic {
            RouteState::Observed(t) => t.canary_weight,
            _ => -1,
        }
    }

    fn status(&self) -> RolloutStatus {
        self.rollout.status.clone().unwrap_or_default()
    }

    /// Plans and applies, with pods becoming ready after every plan, until nothing changes.
    fn settle(&mut self, secs: i64) -> Vec<PlannedEvent> {
        let mut events = Vec::new();
        for _ in 0..60 {
            let plan = self.plan(secs);
            events.extend(plan.events.clone());
            let mut changed =
                !plan.actions.is_empty() || Some(&plan.status) != self.rollout.status.as_ref();
            self.apply(&plan);
            let before = self.observed.replica_sets.clone();
            self.pods_ready();
            changed |= before != self.observed.replica_sets;
            if !changed {
                return events;
            }
        }
        panic!("did not settle: {:?}", self.status());
    }

    fn set_template(&mut self, image: &str) {
        self.rollout.spec.template = template(image);
        self.rollout.metadata.generation = Some(self.rollout.metadata.generation.unwrap_or(1) + 1);
    }

    fn command(&mut self, commands: ManualCommands) {
        let mut status = self.status();
        status.commands = Some(commands);
        self.rollout.status = Some(status);
    }

    fn set_run_phase(&mut self, name: &str, phase: AnalysisPhase) {
        let run = self
            .observed
            .analysis_runs
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap();
        run.phase = phase;
        run.message = Some("error-rate 0.2 > 0.01".into());
    }
}

fn hash_of(image: &str) -> String {
    pod_template_hash(&template(image))
}

fn condition_of(status: &RolloutStatus, type_: &str) -> (String, String) {
    let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
    (c.status.clone(), c.reason.clone())
}

fn healthy(rollout: Rollout) -> Cluster {
    let mut cluster = Cluster::new(rollout);
    cluster.settle(0);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    cluster
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn first_rollout_creates_full_size_stable_and_becomes_healthy() {
    let mut cluster = Cluster::new(canary_rollout(vec![weight(20), pause(None)], false));
    let plan = cluster.plan(0);
    let h1 = hash_of("app:1");
    assert!(plan.actions.iter().any(|a| matches!(a, Action::CreateReplicaSet { name, replicas: 10, revision: 1, .. } if *name == format!("checkout-{h1}"))));
    assert!(plan.actions.contains(&Action::SetServiceSelector {
        service: "checkout".into(),
        pod_template_hash: Some(h1.clone())
    }));
    assert!(plan.actions.contains(&Action::SetServiceSelector {
        service: "checkout-canary".into(),
        pod_template_hash: Some(h1.clone())
    }));
    assert_eq!(plan.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(
        plan.status.stable_revision.as_ref().map(|r| r.revision),
        Some(1)
    );
    assert_eq!(plan.status.current_step_index, Some(2));
    cluster.apply(&plan);
    cluster.pods_ready();
    let plan = cluster.plan(1);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RolloutPhase::Healthy));
    assert_eq!(condition_of(&plan.status, condition::READY).0, "True");
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::ROLLOUT_COMPLETED));
    assert_eq!(plan.status.selector.as_deref(), Some("app=checkout"));
    assert_eq!(plan.status.observed_generation, Some(1));
}

/// Safety rule 5: a reconcile that finds everything as it should be writes nothing.
#[test]
fn rule5_steady_state_is_an_empty_plan_with_identical_status() {
    for rollout in [
        canary_rollout(vec![weight(20)], false),
        canary_rollout(vec![weight(20)], true),
        blue_green_rollout(|_| {}),
    ] {
        let cluster = healthy(rollout);
        for later in [5, 3600, 86_400] {
            let plan = cluster.plan(later);
            assert!(plan.actions.is_empty(), "{:?}", plan.actions);
            assert!(plan.events.is_empty(), "{:?}", plan.events);
            assert_eq!(Some(&plan.status), cluster.rollout.status.as_ref());
            assert_eq!(plan.requeue_after, None);
        }
    }
}

/// Without a router the canary runs beside the full stable (safety rule 11): each step's share is the closest
/// the pod count gives, the stable keeps all its pods until the promotion replaces it.
#[test]
fn canary_without_router_moves_through_steps_to_promotion() {
    let mut cluster = healthy(canary_rollout(
        vec![weight(20), pause(None), weight(50), pause(Some(60))],
        false,
    ));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    let plan = cluster.plan(10);
    // 3 canary pods beside 10 stable ones carry 23%, the closest share to 20% (2 would carry 17%).
    assert!(
        matches!(&plan.actions[..], [
        Action::SetServiceSelector { service: s1, pod_template_hash: None },
        Action::SetServiceSelector { service: s2, pod_template_hash: Some(c) },
        Action::CreateReplicaSet { replicas: 3, revision: 2, .. },
    ] if s1 == "checkout" && s2 == "checkout-canary" && *c == h2),
        "{:?}",
        plan.actions
    );
    assert!(plan.events.iter().any(|e| e.reason == reason::NEW_REVISION));
    cluster.apply(&plan);
    cluster.pods_ready();
    let plan = cluster.plan(11);
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::ScaleReplicaSet { name, .. } if *name == format!("checkout-{h1}"))),
        "the stable keeps its size through the steps: {:?}",
        plan.actions
    );
    assert_eq!(plan.status.current_step_index, Some(1));
    assert_eq!(plan.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(plan.status.current_weight, Some(23));
    assert_eq!(plan.status.desired_weight, Some(20));
    assert_eq!(plan.status.pause_conditions[0].reason, reason::PAUSED_STEP);
    cluster.apply(&plan);
    // Indefinite pause: time alone does not end it.
    cluster.settle(5000);
    assert_eq!(cluster.status().current_step_index, Some(1));
    assert_eq!(
        (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
        (10, 3)
    );
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Step),
        ..Default::default()
    });
    cluster.settle(5001);
    let status = cluster.status();
    assert_eq!(status.current_step_index, Some(3));
    assert_eq!(status.commands, None);
    assert_eq!(status.current_weight, Some(50));
    assert_eq!(
        (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
        (10, 10)
    );
    let plan = cluster.plan(5010);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(51)));
    cluster.settle(5061);
    let status = cluster.status();
    assert_eq!(status.phase, Some(RolloutPhase::Healthy));
    assert_eq!(
        status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.clone()),
        Some(h2.clone())
    );
    assert_eq!(status.canary_revision, None);
    assert_eq!(
        (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
        (0, 10)
    );
    assert_eq!(cluster.selector("checkout"), Some(h2.clone()));
    assert_eq!(cluster.selector("checkout-canary"), Some(h2));
}

/// Safety rules 3 and 11: without a router the stable keeps its full size through the steps, whatever the
/// canary does; only the promotion shrinks it, and only by what the canary has available.
#[test]
fn rule3_stable_never_shrinks_below_what_canary_cannot_cover() {
    let mut cluster = healthy(canary_rollout(vec![weight(50)], false));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    for secs in 1..20 {
        let plan = cluster.plan(secs);
        cluster.apply(&plan);
        // Canary pods never become available.
        assert_eq!(cluster.rs(&h1).spec_replicas, 10, "at {secs}");
    }
    assert_eq!(cluster.rs(&h2).spec_replicas, 10);
    let set_available = |cluster: &mut Cluster, pods: i32| {
        let canary = cluster
            .observed
            .replica_sets
            .iter_mut()
            .find(|rs| rs.pod_template_hash == h2)
            .unwrap();
        canary.replicas = canary.spec_replicas;
        canary.ready_replicas = pods;
        canary.available_replicas = pods;
    };
    // Two canary pods available: the step is not reached, the stable stays whole.
    set_available(&mut cluster, 2);
    let plan = cluster.plan(30);
    assert!(
        !plan.actions.iter().any(|a| matches!(a, Action::ScaleReplicaSet { name, .. } if *name == format!("checkout-{h1}"))),
        "{:?}",
        plan.actions
    );
    assert_eq!(plan.status.current_step_index, Some(0));
    // All ten available: the step is done and the promotion replaces the stable by what the canary carries.
    set_available(&mut cluster, 10);
    let plan = cluster.plan(31);
    assert_eq!(plan.status.current_step_index, Some(1));
    assert!(
        plan.actions.contains(&Action::ScaleReplicaSet {
            name: format!("checkout-{h1}"),
            replicas: 0
        }),
        "{:?}",
        plan.actions
    );
}

/// Safety rule 1: with a router, the weight goes to the canary only once it has the pods for it.
#[test]
fn rule1_router_weight_waits_for_canary_pods() {
    let mut cluster = healthy(canary_rollout(vec![weight(30), pause(None)], true));
    cluster.set_template("app:2");
    let plan = cluster.plan(1);
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetTraffic(t) if t.canary_weight > 0)),
        "{:?}",
        plan.actions
    );
    assert!(plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::CreateReplicaSet { replicas: 3, .. })));
    cluster.apply(&plan);
    // Two of three pods: still no weight.
    let h2 = hash_of("app:2");
    let canary = cluster
        .observed
        .replica_sets
        .iter_mut()
        .find(|rs| rs.pod_template_hash == h2)
        .unwrap();
    canary.available_replicas = 2;
    canary.ready_replicas = 2;
    let plan = cluster.plan(2);
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetTraffic(t) if t.canary_weight > 20)),
        "{:?}",
        plan.actions
    );
    cluster.apply(&plan);
    cluster.pods_ready();
    let plan = cluster.plan(3);
    assert!(plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::SetTraffic(t) if t.canary_weight == 30)));
    // Step done only once the router reports the weight.
    assert_eq!(plan.status.current_step_index, Some(0));
    cluster.apply(&plan);
    let plan = cluster.plan(4);
    assert_eq!(plan.status.current_step_index, Some(1));
    // Stable keeps full size with a router.
    assert_eq!(cluster.rs(&hash_of("app:1")).spec_replicas, 10);
}

/// Safety rule 2: abort sets the weight first, then the selectors, and scales the canary down only after
/// the delay.
#[test]
fn rule2_abort_order_with_router() {
    let mut cluster = healthy(canary_rollout(vec![weight(40), pause(None)], true));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.weight(), 40);
    assert_eq!(cluster.selector("checkout-canary"), Some(h2.clone()));
    cluster.command(ManualCommands {
        abort: true,
        ..Default::default()
    });
    let plan = cluster.plan(100);
    assert_eq!(
        plan.actions,
        vec![
            Action::SetTraffic(crate::strategy::DesiredTraffic {
                stable_service: "checkout".into(),
                canary_service: "checkout-canary".into(),
                canary_weight: 0,
                header_routes: vec![],
                mirror_routes: vec![],
            }),
            Action::SetServiceSelector {
                service: "checkout-canary".into(),
                pod_template_hash: Some(h1.clone())
            },
        ]
    );
    assert_eq!(plan.status.phase, Some(RolloutPhase::Aborted));
    assert!(plan.status.abort);
    assert_eq!(
        condition_of(&plan.status, condition::DEGRADED),
        ("True".into(), reason::ABORTED.into())
    );
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::ABORTED && e.warning));
    assert_eq!(plan.status.scale_down_deadlines[0].after.0, at(130));
    cluster.apply(&plan);
    assert_eq!(
        cluster.plan(101).requeue_after,
        Some(std::time::Duration::from_secs(29))
    );
    let plan = cluster.plan(129);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    let plan = cluster.plan(130);
    assert_eq!(
        plan.actions,
        vec![Action::ScaleReplicaSet {
            name: format!("checkout-{h2}"),
            replicas: 0
        }]
    );
    cluster.apply(&plan);
    let plan = cluster.plan(131);
    cluster.apply(&plan);
    // Aborted stays aborted: no steps, no weight.
    let plan = cluster.plan(500);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(Some(&plan.status), cluster.rollout.status.as_ref());
}

#[test]
fn rule2_abort_order_without_router_and_retry() {
    let mut cluster = healthy(canary_rollout(vec![weight(50), pause(None)], false));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(
        (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
        (10, 10)
    );
    cluster.command(ManualCommands {
        abort: true,
        ..Default::default()
    });
    // Selectors back to stable first; the canary leaves only after the abort delay.
    let plan = cluster.plan(10);
    assert_eq!(
        plan.actions,
        vec![
            Action::SetServiceSelector {
                service: "checkout".into(),
                pod_template_hash: Some(h1.clone())
            },
            Action::SetServiceSelector {
                service: "checkout-canary".into(),
                pod_template_hash: Some(h1.clone())
            },
        ]
    );
    cluster.apply(&plan);
    cluster.pods_ready();
    cluster.settle(40);
    assert_eq!(cluster.rs(&h2).spec_replicas, 0);
    assert_eq!(cluster.rs(&h1).spec_replicas, 10);
    assert_eq!(cluster.status().current_weight, Some(0));
    cluster.command(ManualCommands {
        retry: true,
        ..Default::default()
    });
    let plan = cluster.plan(50);
    assert!(plan.events.iter().any(|e| e.reason == reason::RETRIED));
    assert!(!plan.status.abort);
    assert_eq!(plan.status.current_step_index, Some(0));
    cluster.apply(&plan);
    cluster.settle(51);
    assert_eq!(cluster.status().current_step_index, Some(1));
    assert_eq!(cluster.rs(&h2).spec_replicas, 10);
}

#[test]
fn promotion_with_router_switches_in_order_and_scales_old_down_after_delay() {
    let mut cluster = healthy(canary_rollout(vec![weight(50)], true));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    // Bring the canary to its last step, then to full size.
    for secs in 1..5 {
        let plan = cluster.plan(secs);
        if plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetTraffic(t) if t.canary_weight == 100))
        {
            let order: Vec<_> = plan.actions.clone();
            let full = order
                .iter()
                .position(|a| matches!(a, Action::SetTraffic(t) if t.canary_weight == 100))
                .unwrap();
            assert_eq!(
                order[full + 1],
                Action::SetServiceSelector {
                    service: "checkout".into(),
                    pod_template_hash: Some(h2.clone())
                }
            );
            assert!(matches!(&order[full + 2], Action::SetTraffic(t) if t.canary_weight == 0));
            assert_eq!(
                plan.status
                    .stable_revision
                    .as_ref()
                    .map(|r| r.pod_template_hash.clone()),
                Some(h2.clone())
            );
            assert!(plan.events.iter().any(|e| e.reason == reason::PROMOTED));
            assert_eq!(plan.status.phase, Some(RolloutPhase::Healthy));
            cluster.apply(&plan);
            break;
        }
        cluster.apply(&plan);
        cluster.pods_ready();
    }
    assert_eq!(cluster.selector("checkout"), Some(h2.clone()));
    assert_eq!(
        cluster.rs(&h1).spec_replicas,
        10,
        "old stable kept for the delay"
    );
    let deadline = cluster.status().scale_down_deadlines.clone();
    assert_eq!(deadline.len(), 1);
    let plan = cluster.plan(20);
    assert!(plan.actions.is_empty());
    cluster.settle(100);
    assert_eq!(cluster.rs(&h1).spec_replicas, 0);
    assert!(cluster.status().scale_down_deadlines.is_empty());
    assert_eq!(cluster.weight(), 0);
}

#[test]
fn full_promotion_skips_steps_and_analysis() {
    let mut cluster = healthy(canary_rollout(
        vec![weight(10), analysis_step("http-health"), pause(None)],
        false,
    ));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.status().current_step_index, Some(1));
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Full),
        ..Default::default()
    });
    let events = cluster.settle(2);
    assert!(events.iter().any(|e| e.reason == reason::PROMOTED_FULL));
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    assert_eq!(
        cluster.status().stable_revision.unwrap().pod_template_hash,
        hash_of("app:2")
    );
}

#[test]
fn analysis_step_outcomes() {
    let steps = vec![weight(10), analysis_step("http-health"), weight(60)];
    let run = format!("checkout-{}-step1", hash_of("app:2"));
    // Successful: next step.
    let mut cluster = healthy(canary_rollout(steps.clone(), false));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert!(cluster
        .observed
        .analysis_runs
        .iter()
        .any(|r| r.name == run && r.purpose == AnalysisPurpose::Step(1)));
    assert_eq!(cluster.status().current_step_index, Some(1));
    cluster.set_run_phase(&run, AnalysisPhase::Successful);
    cluster.settle(2);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));

    // Failed: abort with the run's message (rule 4: never promotes).
    let mut cluster = healthy(canary_rollout(steps.clone(), false));
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster.set_run_phase(&run, AnalysisPhase::Failed);
    let events = cluster.settle(2);
    let status = cluster.status();
    assert_eq!(status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(
        condition_of(&status, condition::DEGRADED),
        ("True".into(), reason::ANALYSIS_FAILED.into())
    );
    assert!(status.message.unwrap().contains("error-rate 0.2"));
    assert!(events.iter().any(|e| e.reason == reason::ABORTED));
    assert_eq!(
        status.stable_revision.unwrap().pod_template_hash,
        hash_of("app:1")
    );

    // Inconclusive: pause for a human; promote Step moves on.
    let mut cluster = healthy(canary_rollout(steps, false));
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster.set_run_phase(&run, AnalysisPhase::Inconclusive);
    cluster.settle(2);
    let status = cluster.status();
    assert_eq!(status.phase, Some(RolloutPhase::Paused));
    assert_eq!(
        status.pause_conditions[0].reason,
        reason::PAUSED_INCONCLUSIVE
    );
    cluster.settle(10_000);
    assert_eq!(
        cluster.status().current_step_index,
        Some(1),
        "inconclusive never promotes by itself"
    );
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Step),
        ..Default::default()
    });
    cluster.settle(10_001);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
}

#[test]
fn background_analysis_failure_aborts_and_success_is_terminated_at_promotion() {
    let mut rollout = canary_rollout(vec![weight(20), pause(Some(10)), weight(50)], false);
    rollout.spec.strategy.canary.as_mut().unwrap().analysis =
        Some(crate::crd::rollout::BackgroundAnalysis {
            templates: vec![AnalysisTemplateRef {
                template_name: "http-health".into(),
                cluster_scope: false,
            }],
            args: vec![],
            starting_step: Some(1),
        });
    let run = format!("checkout-{}-background", hash_of("app:2"));
    let mut cluster = healthy(rollout.clone());
    cluster.set_template("app:2");
    cluster.settle(1);
    assert!(cluster.observed.analysis_runs.iter().any(|r| r.name == run));
    cluster.set_run_phase(&run, AnalysisPhase::Failed);
    cluster.settle(2);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Aborted));

    let mut cluster = healthy(rollout);
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster.settle(20);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    assert!(
        cluster
            .observed
            .analysis_runs
            .iter()
            .find(|r| r.name == run)
            .unwrap()
            .terminating
    );
}

#[test]
fn invalid_analysis_template_is_invalid_spec() {
    let mut cluster = healthy(canary_rollout(vec![analysis_step("http-health")], false));
    cluster.observed.analysis_templates.clear();
    cluster.set_template("app:2");
    let plan = cluster.plan(1);
    assert!(plan.actions.is_empty());
    assert!(plan.status.message.unwrap().contains("spec.strategy.canary.steps[0].analysis.templates[0]: AnalysisTemplate \"http-health\" not found"));
}

/// Safety rule 7: an invalid spec changes nothing, with the field path in the message and one event.
#[test]
fn rule7_invalid_specs_yield_no_actions_and_name_the_field() {
    let base = || canary_rollout(vec![weight(20)], false);
    let cases: Vec<(Rollout, Option<&str>, &str)> = vec![
        ({ let mut r = base(); r.spec.strategy.canary.as_mut().unwrap().steps = vec![weight(150)]; r }, None,
            "spec.strategy.canary.steps[0].setWeight: 150 is not between 0 and 100"),
        ({ let mut r = base(); r.spec.strategy.blue_green = blue_green_rollout(|_| {}).spec.strategy.blue_green; r }, None,
            "spec.strategy: set exactly one of canary or blueGreen"),
        ({ let mut r = base(); r.spec.strategy.canary = None; r }, None, "spec.strategy: set exactly one"),
        (base(), Some("checkout"), "spec.strategy.canary.stableService: Service \"checkout\" not found"),
        ({ let mut r = base(); r.spec.strategy.canary.as_mut().unwrap().canary_service = Some("checkout".into()); r }, None,
            "spec.strategy.canary.canaryService: must differ from stableService"),
        ({ let mut r = base(); r.spec.strategy.canary.as_mut().unwrap().steps = vec![pause(Some(-5))]; r }, None,
            "spec.strategy.canary.steps[0].pause.duration: duration \"-5\" is negative"),
        ({ let mut r = base(); r.spec.template = serde_json::from_value(json!({"metadata": {"labels": {"app": "other"}}})).unwrap(); r }, None,
            "spec.template.metadata.labels: does not match spec.selector (app=checkout)"),
        ({ let mut r = base(); r.spec.selector = Default::default(); r }, None, "spec.selector: must not be empty"),
        ({ let mut r = base(); r.spec.replicas = Some(-1); r }, None, "spec.replicas: -1 is not between"),
        ({ let mut r = base(); r.spec.strategy.canary.as_mut().unwrap().steps = vec![CanaryStep { set_weight: Some(5), pause: Some(PauseStep::default()), ..Default::default() }]; r }, None,
            "spec.strategy.canary.steps[0]: a step sets exactly one"),
        (blue_green_rollout(|bg| bg.preview_service = Some("checkout".into())), None, "spec.strategy.blueGreen.previewService: must differ from activeService"),
        ({ let mut r = base(); r.spec.strategy.canary.as_mut().unwrap().steps = vec![CanaryStep { set_canary_scale: Some(SetCanaryScale { replicas: Some(1), weight: Some(2), match_traffic_weight: false }), ..Default::default() }]; r }, None,
            "spec.strategy.canary.steps[0].setCanaryScale: set exactly one of replicas, weight, matchTrafficWeight"),
    ];
    for (rollout, remove_service, expected) in cases {
        let mut cluster = Cluster::new(rollout);
        if let Some(name) = remove_service {
            cluster.observed.services.remove(name);
        }
        let plan = cluster.plan(0);
        assert!(plan.actions.is_empty(), "{expected}: {:?}", plan.actions);
        assert_eq!(
            plan.status.phase,
            Some(RolloutPhase::Degraded),
            "{expected}"
        );
        assert_eq!(
            condition_of(&plan.status, condition::INVALID_SPEC),
            ("True".into(), reason::INVALID_SPEC.into())
        );
        assert_eq!(condition_of(&plan.status, condition::STALLED).0, "True");
        let message = plan.status.message.clone().unwrap();
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
        assert_eq!(plan.events.len(), 1);
        assert!(plan.events[0].warning && plan.events[0].reason == reason::INVALID_SPEC);
        cluster.apply(&plan);
        let again = cluster.plan(60);
        assert!(
            again.events.is_empty() && again.actions.is_empty(),
            "{expected}"
        );
        assert_eq!(
            Some(&again.status),
            cluster.rollout.status.as_ref(),
            "{expected}"
        );
    }
}

#[test]
fn invalid_spec_mid_rollout_touches_nothing_but_abort_still_works() {
    let mut cluster = healthy(canary_rollout(vec![weight(20), pause(None)], true));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.weight(), 20);
    cluster
        .rollout
        .spec
        .strategy
        .canary
        .as_mut()
        .unwrap()
        .steps
        .push(weight(101));
    let plan = cluster.plan(2);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(
        condition_of(&plan.status, condition::INVALID_SPEC).0,
        "True"
    );
    cluster.apply(&plan);
    // An abort must not wait for a valid spec: traffic goes back to stable first, then the selectors.
    cluster.command(ManualCommands {
        abort: true,
        ..Default::default()
    });
    let plan = cluster.plan(3);
    assert!(
        matches!(&plan.actions[..], [Action::SetTraffic(t), Action::SetServiceSelector { service, pod_template_hash: Some(h) }, ..]
            if t.canary_weight == 0 && service == "checkout-canary" && *h == h1),
        "{:?}",
        plan.actions
    );
    assert!(plan.status.abort);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(plan.status.commands, None);
    assert_eq!(
        condition_of(&plan.status, condition::INVALID_SPEC).0,
        "True"
    );
    assert_eq!(
        plan.status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.clone()),
        Some(h1.clone())
    );
    cluster.apply(&plan);
    cluster.settle(100);
    assert_eq!(cluster.rs(&h2).spec_replicas, 0);
    assert_eq!(cluster.weight(), 0);
    // A retry is taken while the spec is invalid, but nothing moves until it is valid again.
    cluster.command(ManualCommands {
        retry: true,
        ..Default::default()
    });
    let plan = cluster.plan(101);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert!(!plan.status.abort);
    assert_eq!(plan.status.commands, None);
    assert!(plan.events.iter().any(|e| e.reason == reason::RETRIED));
    cluster.apply(&plan);
    cluster
        .rollout
        .spec
        .strategy
        .canary
        .as_mut()
        .unwrap()
        .steps
        .pop();
    cluster.settle(102);
    assert_eq!(cluster.status().current_step_index, Some(1));
    assert_eq!(cluster.weight(), 20);
}

#[test]
fn user_pause_and_resume_do_not_count_against_the_deadline() {
    let mut rollout = canary_rollout(vec![weight(20), weight(40)], false);
    rollout.spec.progress_deadline_seconds = Some(100);
    let mut cluster = healthy(rollout);
    cluster.set_template("app:2");
    let plan = cluster.plan(0);
    cluster.apply(&plan);
    // Canary pods never ready. Pause at 50 for 1000 seconds.
    let plan = cluster.plan(50);
    cluster.apply(&plan);
    cluster.command(ManualCommands {
        paused: Some(true),
        ..Default::default()
    });
    let plan = cluster.plan(50);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Paused));
    assert_eq!(
        plan.status.commands,
        Some(ManualCommands {
            paused: Some(true),
            ..Default::default()
        })
    );
    cluster.apply(&plan);
    let plan = cluster.plan(1050);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Paused));
    cluster.apply(&plan);
    cluster.command(ManualCommands {
        paused: Some(false),
        ..Default::default()
    });
    let plan = cluster.plan(1050);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(plan.status.paused_seconds_in_step, Some(1000));
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(50)));
    cluster.apply(&plan);
    assert_eq!(
        cluster.plan(1099).status.phase,
        Some(RolloutPhase::Progressing)
    );
    let plan = cluster.plan(1100);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
    assert_eq!(
        condition_of(&plan.status, condition::PROGRESSING),
        ("False".into(), reason::PROGRESS_DEADLINE_EXCEEDED.into())
    );
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::PROGRESS_DEADLINE_EXCEEDED));
    assert!(!plan.status.abort, "no abort unless progressDeadlineAbort");
    assert!(plan.actions.is_empty());
}

#[test]
fn progress_deadline_abort_rolls_back() {
    let mut rollout = canary_rollout(vec![weight(20)], true);
    rollout.spec.progress_deadline_seconds = Some(60);
    rollout.spec.progress_deadline_abort = true;
    let mut cluster = healthy(rollout);
    let h1 = hash_of("app:1");
    cluster.set_template("app:2");
    let plan = cluster.plan(0);
    cluster.apply(&plan);
    let plan = cluster.plan(61);
    assert!(plan.status.abort);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(
        condition_of(&plan.status, condition::DEGRADED).1,
        reason::PROGRESS_DEADLINE_EXCEEDED
    );
    assert_eq!(
        plan.actions,
        vec![Action::SetServiceSelector {
            service: "checkout-canary".into(),
            pod_template_hash: Some(h1.clone())
        }]
    );
    cluster.apply(&plan);
    assert_eq!(cluster.rs(&h1).spec_replicas, 10);
}

#[test]
fn new_revision_mid_rollout_restarts_steps_and_drops_old_canary() {
    let mut cluster = healthy(canary_rollout(vec![weight(40), pause(None)], true));
    let (h2, h3) = (hash_of("app:2"), hash_of("app:3"));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.weight(), 40);
    cluster.set_template("app:3");
    let plan = cluster.plan(2);
    assert!(
        matches!(&plan.actions[0], Action::SetTraffic(t) if t.canary_weight == 0),
        "{:?}",
        plan.actions
    );
    assert_eq!(
        plan.actions[1],
        Action::SetServiceSelector {
            service: "checkout-canary".into(),
            pod_template_hash: Some(h3.clone())
        }
    );
    let old_down = plan.actions.iter().position(|a| {
        *a == Action::ScaleReplicaSet {
            name: format!("checkout-{h2}"),
            replicas: 0,
        }
    });
    assert!(old_down.is_some(), "{:?}", plan.actions);
    assert_eq!(
        plan.status.canary_revision.as_ref().map(|r| r.revision),
        Some(3)
    );
    assert_eq!(plan.status.current_step_index, Some(0));
    cluster.apply(&plan);
    cluster.pods_ready();
    cluster.settle(3);
    assert_eq!(cluster.weight(), 40);
    assert_eq!(cluster.status().current_step_index, Some(1));
}

#[test]
fn template_back_to_stable_is_a_fast_rollback() {
    let mut cluster = healthy(canary_rollout(vec![weight(40), pause(None)], false));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster.set_template("app:1");
    let plan = cluster.plan(2);
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::FAST_ROLLBACK));
    assert_eq!(
        plan.actions[0],
        Action::SetServiceSelector {
            service: "checkout".into(),
            pod_template_hash: Some(h1.clone())
        }
    );
    // The stable kept its full size through the steps: nothing to scale back up.
    assert!(!plan.actions.iter().any(
        |a| matches!(a, Action::ScaleReplicaSet { name, .. } if *name == format!("checkout-{h1}"))
    ));
    cluster.apply(&plan);
    cluster.pods_ready();
    cluster.settle(3);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    assert_eq!(cluster.rs(&h2).spec_replicas, 0);
    assert_eq!(cluster.status().canary_revision, None);
}

#[test]
fn a_template_that_comes_back_reuses_its_replica_set_with_a_new_revision() {
    let mut cluster = healthy(canary_rollout(vec![weight(50)], false));
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster.set_template("app:3");
    cluster.settle(2);
    cluster.set_template("app:2");
    let plan = cluster.plan(3);
    assert!(
        plan.actions.contains(&Action::SetRevision {
            name: format!("checkout-{}", hash_of("app:2")),
            revision: 4
        }),
        "{:?}",
        plan.actions
    );
    assert!(!plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::CreateReplicaSet { .. })));
}

#[test]
fn old_replica_sets_are_pruned_beyond_the_history_limit_oldest_first() {
    let mut rollout = canary_rollout(vec![weight(50)], false);
    rollout.spec.revision_history_limit = Some(1);
    let mut cluster = healthy(rollout);
    for (i, image) in ["app:2", "app:3", "app:4"].iter().enumerate() {
        cluster.set_template(image);
        cluster.settle(10 * (i as i64 + 1));
    }
    let names: Vec<String> = cluster
        .observed
        .replica_sets
        .iter()
        .map(|rs| rs.name.clone())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&format!("checkout-{}", hash_of("app:4"))));
    assert!(names.contains(&format!("checkout-{}", hash_of("app:3"))));
}

#[test]
fn traffic_drift_is_reverted_with_an_event() {
    let mut cluster = healthy(canary_rollout(vec![weight(20), pause(None)], true));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.weight(), 20);
    cluster.observed.traffic = RouteState::Observed(ObservedTraffic {
        canary_weight: 70,
        ..Default::default()
    });
    let plan = cluster.plan(2);
    assert!(
        matches!(&plan.actions[..], [Action::SetTraffic(t)] if t.canary_weight == 20),
        "{:?}",
        plan.actions
    );
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::TRAFFIC_DRIFT));
}

#[test]
fn missing_route_stops_progress_without_writing_weights() {
    let mut cluster = healthy(canary_rollout(vec![weight(20), pause(None)], true));
    cluster.set_template("app:2");
    cluster.observed.traffic = RouteState::Invalid("HTTPRoute checkout not found".into());
    for secs in 1..5 {
        let plan = cluster.plan(secs);
        assert!(!plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetTraffic(_))));
        cluster.apply(&plan);
        cluster.pods_ready();
    }
    let status = cluster.status();
    assert_eq!(status.current_step_index, Some(0));
    assert_eq!(
        condition_of(&status, condition::PROGRESSING),
        ("False".into(), reason::ROUTE_MISSING.into())
    );
    assert!(status
        .message
        .unwrap()
        .contains("HTTPRoute checkout not found"));
}

#[test]
fn unreadable_route_holds_without_writing_weights_and_is_not_degraded() {
    let mut cluster = healthy(canary_rollout(vec![weight(20), pause(None)], true));
    cluster.set_template("app:2");
    cluster.observed.traffic = RouteState::Unreadable {
        category: "read",
        message: "reading HTTPRoute checkout: connection reset".into(),
    };
    for secs in 1..5 {
        let plan = cluster.plan(secs);
        assert!(!plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetTraffic(_))));
        cluster.apply(&plan);
        cluster.pods_ready();
    }
    let status = cluster.status();
    assert_eq!(status.current_step_index, Some(0));
    assert_eq!(status.phase, Some(RolloutPhase::Progressing));
    assert_eq!(
        condition_of(&status, condition::PROGRESSING).1,
        reason::ROUTE_UNREADABLE.to_string()
    );
    assert!(status.message.unwrap().contains("connection reset"));
}

#[test]
fn header_routes_are_set_by_steps_and_removed_on_promotion() {
    let steps = vec![
        weight(10),
        CanaryStep {
            set_header_route: Some(crate::crd::rollout::SetHeaderRoute {
                name: "beta".into(),
                matches: vec![crate::crd::rollout::HeaderMatch {
                    header_name: "X-Beta".into(),
                    header_value: crate::crd::rollout::StringMatch {
                        exact: Some("1".into()),
                        ..Default::default()
                    },
                }],
            }),
            ..Default::default()
        },
        pause(None),
    ];
    let mut cluster = healthy(canary_rollout(steps, true));
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.status().current_step_index, Some(2));
    match &cluster.observed.traffic {
        RouteState::Observed(t) => assert_eq!(t.header_routes, vec!["beta".to_string()]),
        other => panic!("{other:?}"),
    }
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Step),
        ..Default::default()
    });
    cluster.settle(2);
    match &cluster.observed.traffic {
        RouteState::Observed(t) => assert!(t.header_routes.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
}

#[test]
fn blue_green_preview_auto_promotion_switch_and_delayed_scale_down() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.auto_promotion_seconds = Some(60)
    }));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    assert_eq!(cluster.selector("checkout"), Some(h1.clone()));
    assert_eq!(cluster.selector("checkout-preview"), Some(h1.clone()));
    cluster.set_template("app:2");
    cluster.settle(0);
    assert_eq!(cluster.selector("checkout"), Some(h1.clone()));
    assert_eq!(cluster.selector("checkout-preview"), Some(h2.clone()));
    assert_eq!(cluster.rs(&h2).spec_replicas, 10);
    assert_eq!(
        cluster
            .status()
            .blue_green
            .unwrap()
            .preview_ready_at
            .map(|t| t.0),
        Some(at(0))
    );
    assert_eq!(
        cluster.plan(30).requeue_after,
        Some(std::time::Duration::from_secs(30))
    );
    let plan = cluster.plan(60);
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::SWITCHED_ACTIVE));
    assert_eq!(
        plan.actions[0],
        Action::SetServiceSelector {
            service: "checkout".into(),
            pod_template_hash: Some(h2.clone())
        }
    );
    cluster.apply(&plan);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    assert_eq!(
        cluster.rs(&h1).spec_replicas,
        10,
        "old kept for scaleDownDelaySeconds"
    );
    cluster.settle(89);
    assert_eq!(cluster.rs(&h1).spec_replicas, 10);
    cluster.settle(90);
    assert_eq!(cluster.rs(&h1).spec_replicas, 0);
}

#[test]
fn blue_green_manual_promotion_waits_for_promote() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.auto_promotion_enabled = Some(false)
    }));
    let h2 = hash_of("app:2");
    cluster.set_template("app:2");
    cluster.settle(0);
    cluster.settle(10_000);
    let status = cluster.status();
    assert_eq!(status.phase, Some(RolloutPhase::Paused));
    assert_eq!(status.pause_conditions[0].reason, reason::PAUSED_BLUE_GREEN);
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Step),
        ..Default::default()
    });
    cluster.settle(10_001);
    assert_eq!(cluster.selector("checkout"), Some(h2));
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
}

#[test]
fn blue_green_post_promotion_failure_switches_back() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.post_promotion_analysis = Some(RolloutAnalysis {
            templates: vec![AnalysisTemplateRef {
                template_name: "http-health".into(),
                cluster_scope: false,
            }],
            args: vec![],
        })
    }));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(0);
    assert_eq!(cluster.selector("checkout"), Some(h2.clone()));
    let run = format!("checkout-{h2}-post");
    assert!(cluster.observed.analysis_runs.iter().any(|r| r.name == run));
    // Old version is kept while post-promotion analysis decides, even past the delay.
    cluster.settle(1000);
    assert_eq!(cluster.rs(&h1).spec_replicas, 10);
    cluster.set_run_phase(&run, AnalysisPhase::Failed);
    let plan = cluster.plan(1001);
    assert_eq!(
        plan.actions[0],
        Action::SetServiceSelector {
            service: "checkout".into(),
            pod_template_hash: Some(h1.clone())
        }
    );
    assert_eq!(plan.status.phase, Some(RolloutPhase::Aborted));
    assert_eq!(
        plan.status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.clone()),
        Some(h1.clone())
    );
    cluster.apply(&plan);
    cluster.settle(1040);
    assert_eq!(cluster.rs(&h2).spec_replicas, 0);
    assert_eq!(cluster.rs(&h1).spec_replicas, 10);
    assert_eq!(cluster.selector("checkout-preview"), Some(h1));
}

#[test]
fn blue_green_pre_promotion_gate_and_abort() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.pre_promotion_analysis = Some(RolloutAnalysis {
            templates: vec![AnalysisTemplateRef {
                template_name: "http-health".into(),
                cluster_scope: false,
            }],
            args: vec![],
        })
    }));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    cluster.settle(0);
    let run = format!("checkout-{h2}-pre");
    assert!(cluster.observed.analysis_runs.iter().any(|r| r.name == run));
    assert_eq!(
        cluster.selector("checkout"),
        Some(h1.clone()),
        "gate holds the switch"
    );
    cluster.set_run_phase(&run, AnalysisPhase::Failed);
    cluster.settle(1);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Aborted));
    assert_eq!(cluster.selector("checkout-preview"), Some(h1.clone()));
    cluster.settle(31);
    assert_eq!(cluster.rs(&h2).spec_replicas, 0);
}

#[test]
fn never_panics_on_odd_input() {
    let mut rollout = canary_rollout(vec![weight(20)], true);
    rollout.metadata.name = None;
    rollout.metadata.generation = None;
    let cluster = Cluster::new(rollout);
    let plan = cluster.plan(0);
    assert!(plan.actions.is_empty());
    let mut rollout = canary_rollout(vec![], false);
    rollout.spec.replicas = Some(0);
    let mut cluster = Cluster::new(rollout);
    cluster.settle(0);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
    // Status from a stranger: step index past the end, unknown stable.
    let mut cluster = healthy(canary_rollout(vec![weight(20)], false));
    let mut status = cluster.status();
    status.current_step_index = Some(99);
    status.stable_revision = Some(crate::crd::rollout::RevisionRef {
        pod_template_hash: "gone".into(),
        revision: 7,
    });
    cluster.rollout.status = Some(status);
    let _ = cluster.plan(1);
    let _ = BTreeMap::<String, String>::new();
}

#[test]
fn set_canary_scale_grows_the_canary_but_never_below_its_weight() {
    let steps = vec![
        CanaryStep {
            set_canary_scale: Some(SetCanaryScale {
                replicas: Some(5),
                weight: None,
                match_traffic_weight: false,
            }),
            ..Default::default()
        },
        weight(10),
        pause(None),
        CanaryStep {
            set_canary_scale: Some(SetCanaryScale {
                replicas: Some(1),
                weight: None,
                match_traffic_weight: false,
            }),
            ..Default::default()
        },
        weight(50),
        pause(None),
    ];
    let mut cluster = healthy(canary_rollout(steps, true));
    let h2 = hash_of("app:2");
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.status().current_step_index, Some(2));
    assert_eq!(cluster.rs(&h2).spec_replicas, 5);
    assert_eq!(cluster.weight(), 10);
    cluster.command(ManualCommands {
        promote: Some(PromoteCommand::Step),
        ..Default::default()
    });
    cluster.settle(2);
    // setCanaryScale 1 with weight 50: the weight needs 5 pods, so 5 it is (rule 1).
    assert_eq!(cluster.status().current_step_index, Some(5));
    assert_eq!(cluster.rs(&h2).spec_replicas, 5);
    assert_eq!(cluster.weight(), 50);
}

#[test]
fn pause_step_with_duration_requeues_at_its_end_and_records_the_pause() {
    let mut cluster = healthy(canary_rollout(
        vec![weight(10), pause(Some(90)), weight(20)],
        true,
    ));
    cluster.set_template("app:2");
    cluster.settle(100);
    let status = cluster.status();
    assert_eq!(status.current_step_index, Some(1));
    assert_eq!(status.pause_conditions[0].start_time.0, at(100));
    let plan = cluster.plan(150);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(40)));
    assert_eq!(
        condition_of(&plan.status, condition::PAUSED),
        ("True".into(), reason::PAUSED_STEP.into())
    );
    cluster.settle(190);
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
}

#[test]
fn analysis_runs_of_old_revisions_are_stopped_and_pruned() {
    let mut cluster = healthy(canary_rollout(vec![weight(10), pause(None)], false));
    for i in 0..8 {
        cluster.observed.analysis_runs.push(ObservedAnalysisRun {
            name: format!("checkout-old{i}-step1"),
            purpose: AnalysisPurpose::Step(1),
            pod_template_hash: format!("old{i}"),
            phase: if i == 0 {
                AnalysisPhase::Running
            } else {
                AnalysisPhase::Failed
            },
            message: None,
            terminating: false,
            latest_successful: false,
        });
    }
    let plan = cluster.plan(1);
    assert!(plan.actions.contains(&Action::TerminateAnalysisRun {
        name: "checkout-old0-step1".into()
    }));
    let deleted = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::DeleteAnalysisRun { .. }))
        .count();
    assert_eq!(deleted, 3, "{:?}", plan.actions);
}

#[test]
fn conditions_keep_their_transition_time_while_unchanged() {
    let mut cluster = healthy(canary_rollout(vec![weight(10), pause(None)], false));
    let ready_since = cluster
        .status()
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap()
        .last_transition_time
        .clone();
    cluster.set_template("app:2");
    cluster.settle(500);
    let status = cluster.status();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.last_transition_time.0),
        ("False", at(500))
    );
    let invalid = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::INVALID_SPEC)
        .unwrap();
    assert_eq!(
        invalid.last_transition_time, ready_since,
        "InvalidSpec stayed False since the start"
    );
    assert!(status
        .conditions
        .iter()
        .all(|c| c.observed_generation == Some(2)));
}

/// A Prometheus metric as a template would hold it (the run-spec builder rejects metrics without a provider).
fn serin_metric_provider() -> crate::crd::analysis::MetricProvider {
    crate::crd::analysis::MetricProvider {
        prometheus: Some(crate::crd::analysis::PrometheusMetric {
            address: "http://prometheus:9090".into(),
            query: Some("sum(rate(http_requests_total[1m]))".into()),
            ..Default::default()
        }),
    }
}

// --- Faults: nothing observed missing and nothing changed underneath counts as progress (safety rule 9) ---

fn paused_canary(router: bool, replicas: i32) -> Cluster {
    let mut ro = canary_rollout(
        vec![
            weight(25),
            pause(None),
            weight(50),
            pause(None),
            weight(75),
            pause(None),
        ],
        router,
    );
    ro.spec.replicas = Some(replicas);
    let mut cluster = healthy(ro);
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.status().current_step_index, Some(1));
    cluster
}

#[test]
fn rule9_deleted_stable_replica_set_holds_instead_of_promoting() {
    for router in [false, true] {
        let mut cluster = paused_canary(router, 4);
        let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
        let stable = cluster.rs(&h1).clone();
        cluster
            .observed
            .replica_sets
            .retain(|rs| rs.pod_template_hash != h1);
        for secs in 2..10 {
            let plan = cluster.plan(secs);
            assert!(
                plan.actions.is_empty(),
                "router {router}: {:?}",
                plan.actions
            );
            assert_eq!(
                plan.status
                    .stable_revision
                    .as_ref()
                    .map(|r| r.pod_template_hash.clone()),
                Some(h1.clone())
            );
            assert_eq!(plan.status.current_step_index, Some(1));
            assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
            let (state, why) = condition_of(&plan.status, condition::PROGRESSING);
            assert_eq!(
                (state.as_str(), why.as_str()),
                ("False", reason::STABLE_MISSING)
            );
            cluster.apply(&plan);
        }
        // A ReplicaSet that was only late in the cache: the rollout resumes where it was.
        cluster.observed.replica_sets.push(stable.clone());
        cluster.settle(20);
        assert_eq!(cluster.status().current_step_index, Some(1));
        assert_eq!(cluster.status().phase, Some(RolloutPhase::Paused));
        // Gone for good: only a human's full promotion makes the canary stable.
        cluster
            .observed
            .replica_sets
            .retain(|rs| rs.pod_template_hash != h1);
        cluster.settle(30);
        assert_eq!(
            cluster
                .status()
                .stable_revision
                .map(|r| r.pod_template_hash),
            Some(h1.clone())
        );
        cluster.command(ManualCommands {
            promote: Some(PromoteCommand::Full),
            ..Default::default()
        });
        cluster.settle(40);
        let status = cluster.status();
        assert_eq!(
            status.stable_revision.map(|r| r.pod_template_hash),
            Some(h2.clone())
        );
        assert_eq!(status.phase, Some(RolloutPhase::Healthy));
    }
}

#[test]
fn rule9_unlabelled_stable_replica_set_is_missing_too() {
    let mut cluster = paused_canary(false, 4);
    let h1 = hash_of("app:1");
    cluster
        .observed
        .replica_sets
        .iter_mut()
        .filter(|rs| rs.pod_template_hash == h1)
        .for_each(|rs| rs.pod_template_hash = String::new());
    let plan = cluster.plan(5);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
    assert!(plan
        .events
        .iter()
        .any(|e| e.reason == reason::STABLE_MISSING));
}

#[test]
fn blue_green_with_missing_active_replica_set_holds() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.auto_promotion_enabled = Some(false)
    }));
    let h1 = hash_of("app:1");
    cluster.set_template("app:2");
    cluster.settle(1);
    cluster
        .observed
        .replica_sets
        .retain(|rs| rs.pod_template_hash != h1);
    let plan = cluster.plan(5);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(
        plan.status.stable_revision.map(|r| r.pod_template_hash),
        Some(h1)
    );
}

#[test]
fn rule9_changed_steps_start_again_from_the_first() {
    for router in [false, true] {
        let mut cluster = paused_canary(router, 4);
        let h1 = hash_of("app:1");
        // Re-applied from Git with fewer steps: index 1 would be past the end (a promotion).
        cluster.rollout.spec.strategy.canary.as_mut().unwrap().steps = vec![weight(25)];
        let plan = cluster.plan(5);
        // Restarted from the first step, which the canary already satisfies, so it is done in this plan.
        let reasons: Vec<&str> = plan.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons,
            vec![reason::STEPS_CHANGED, reason::STEP_REACHED],
            "router {router}"
        );
        assert_eq!(plan.status.current_step_index, Some(1), "router {router}");
        cluster.apply(&plan);
        cluster.settle(6);
        // One step of 25% and then the promotion: it happens, but only after the (new) steps ran.
        let status = cluster.status();
        assert_eq!(
            status.phase,
            Some(RolloutPhase::Healthy),
            "router {router}: {status:?}"
        );
        cluster.settle(100);
        assert_eq!(cluster.rs(&h1).spec_replicas, 0, "router {router}");
    }
    // An analysis step moved below the current index runs; it is not skipped.
    let mut cluster = paused_canary(true, 4);
    cluster.observed.analysis_templates.insert(
        TemplateKey {
            name: "http".into(),
            cluster_scope: false,
        },
        Ok(AnalysisTemplateSpec {
            metrics: vec![Metric {
                name: "m".into(),
                success_condition: Some("result > 0".into()),
                provider: serin_metric_provider(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    );
    cluster.rollout.spec.strategy.canary.as_mut().unwrap().steps =
        vec![analysis_step("http"), weight(25), pause(None)];
    cluster.settle(10);
    let status = cluster.status();
    assert_eq!(status.current_step_index, Some(0));
    assert!(cluster
        .observed
        .analysis_runs
        .iter()
        .any(|r| r.purpose == AnalysisPurpose::Step(0)));
    // Unrelated changes (an annotation, the same steps re-applied) restart nothing.
    let mut cluster = paused_canary(true, 4);
    let steps = cluster
        .rollout
        .spec
        .strategy
        .canary
        .as_ref()
        .unwrap()
        .steps
        .clone();
    cluster.rollout.spec.strategy.canary.as_mut().unwrap().steps = steps;
    cluster
        .rollout
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("argocd.argoproj.io/sync".into(), "now".into());
    let plan = cluster.plan(10);
    assert_eq!(plan.status.current_step_index, Some(1));
    assert!(plan.events.is_empty(), "{:?}", plan.events);
}

/// Safety rule 11 without a router: the canary never carries more than the step asks plus one pod's share,
/// and the stable keeps `spec.replicas` pods until the promotion.
#[test]
fn rule11_without_router_a_step_never_sends_everything_to_the_canary() {
    for (replicas, step, stable, canary, carried) in [
        (1, 50, 1, 1, 50),
        (3, 20, 3, 1, 25),
        (4, 25, 4, 1, 20),
        (4, 50, 4, 4, 50),
        (10, 20, 10, 3, 23),
        (2, 90, 2, 2, 50),
    ] {
        let mut ro = canary_rollout(vec![weight(step), pause(None)], false);
        ro.spec.replicas = Some(replicas);
        let mut cluster = healthy(ro);
        let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
        cluster.set_template("app:2");
        cluster.settle(1);
        let status = cluster.status();
        let case = format!("{replicas} replicas at {step}%");
        assert_eq!(status.current_step_index, Some(1), "{case}");
        assert_eq!(status.phase, Some(RolloutPhase::Paused), "{case}");
        assert_eq!(
            (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
            (stable, canary),
            "{case}"
        );
        assert_eq!(status.current_weight, Some(carried), "{case}");
    }
    // maxSurge bounds the canary when set.
    let mut ro = canary_rollout(vec![weight(50), pause(None)], false);
    ro.spec.strategy.canary.as_mut().unwrap().max_surge =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2));
    let mut cluster = healthy(ro);
    cluster.set_template("app:2");
    cluster.settle(1);
    assert_eq!(cluster.rs(&hash_of("app:2")).spec_replicas, 2);
    assert_eq!(cluster.rs(&hash_of("app:1")).spec_replicas, 10);
}

/// `spec.replicas` changed mid-canary (an HPA through the scale subresource, `kubectl scale`, Git): the
/// stable follows it at once, the canary is re-sized for the current step's weight, and the step waits.
#[test]
fn replica_count_changes_mid_canary_are_split_by_the_step_weight() {
    for router in [false, true] {
        let mut cluster = paused_canary(router, 4);
        let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
        for (replicas, stable, canary) in [(8, 8, if router { 2 } else { 3 }), (2, 2, 1)] {
            cluster.rollout.spec.replicas = Some(replicas);
            cluster.settle(10 + i64::from(replicas));
            let status = cluster.status();
            let case = format!("router {router}, {replicas} replicas");
            assert_eq!(status.current_step_index, Some(1), "{case}");
            assert_eq!(
                (cluster.rs(&h1).spec_replicas, cluster.rs(&h2).spec_replicas),
                (stable, canary),
                "{case}"
            );
            assert_eq!(status.replicas, Some(stable + canary), "{case}");
            assert_eq!(status.selector.as_deref(), Some("app=checkout"), "{case}");
        }
    }
}

/// Safety rules 9 and 10: a background analysis whose latest measurements errored (Prometheus down) holds the
/// promotion, with or without a router, until it measures the canary healthy again.
#[test]
fn background_analysis_must_vouch_for_the_canary_at_promotion() {
    for router in [false, true] {
        let mut ro = canary_rollout(vec![weight(40), pause(Some(10))], router);
        ro.spec.strategy.canary.as_mut().unwrap().analysis =
            Some(crate::crd::rollout::BackgroundAnalysis {
                templates: vec![AnalysisTemplateRef {
                    template_name: "http".into(),
                    cluster_scope: false,
                }],
                args: vec![],
                starting_step: None,
            });
        let mut cluster = Cluster::new(ro);
        cluster.observed.analysis_templates.insert(
            TemplateKey {
                name: "http".into(),
                cluster_scope: false,
            },
            Ok(AnalysisTemplateSpec {
                metrics: vec![Metric {
                    name: "m".into(),
                    success_condition: Some("result > 0".into()),
                    provider: serin_metric_provider(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
        cluster.settle(0);
        let h1 = hash_of("app:1");
        cluster.set_template("app:2");
        cluster.settle(1);
        // Prometheus goes down: the run keeps Running, its latest measurement is an error.
        for run in &mut cluster.observed.analysis_runs {
            run.latest_successful = false;
        }
        for secs in [20, 40, 200] {
            cluster.settle(secs);
            let status = cluster.status();
            assert_eq!(
                status.stable_revision.map(|r| r.pod_template_hash),
                Some(h1.clone()),
                "router {router}: promoted while the background analysis could not vouch"
            );
            assert_eq!(
                cluster.rs(&h1).spec_replicas,
                10,
                "router {router}: stable replaced"
            );
            assert!(
                status
                    .message
                    .unwrap_or_default()
                    .contains("background analysis"),
                "router {router}"
            );
        }
        // It answers healthy again: the promotion goes ahead.
        for run in &mut cluster.observed.analysis_runs {
            run.latest_successful = true;
        }
        cluster.settle(300);
        assert_eq!(
            cluster.status().phase,
            Some(RolloutPhase::Healthy),
            "router {router}"
        );
        assert_eq!(
            cluster
                .status()
                .stable_revision
                .map(|r| r.pod_template_hash),
            Some(hash_of("app:2"))
        );
    }
}

/// Safety rule 1 for blue-green: the active Service switches only once the new version has every pod available,
/// even when the preview ran with fewer pods (previewReplicaCount).
#[test]
fn blue_green_switch_waits_for_the_new_version_at_full_size() {
    let mut cluster = healthy(blue_green_rollout(|bg| {
        bg.preview_replica_count = Some(3);
        bg.auto_promotion_seconds = Some(0);
    }));
    let (h1, h2) = (hash_of("app:1"), hash_of("app:2"));
    cluster.set_template("app:2");
    let plan = cluster.plan(1);
    cluster.apply(&plan);
    cluster.pods_ready();
    assert_eq!(cluster.rs(&h2).spec_replicas, 3);
    // Promotion decided: the new version grows to 10, but only 3 of them are available.
    for secs in 2..6 {
        let plan = cluster.plan(secs);
        cluster.apply(&plan);
        assert_eq!(cluster.rs(&h2).spec_replicas, 10, "at {secs}");
        assert_eq!(
            cluster.selector("checkout"),
            Some(h1.clone()),
            "active switched to a version with 3 of 10 pods available"
        );
    }
    cluster.pods_ready();
    let plan = cluster.plan(10);
    cluster.apply(&plan);
    assert_eq!(cluster.selector("checkout"), Some(h2.clone()));
    assert_eq!(cluster.status().phase, Some(RolloutPhase::Healthy));
}
