//! Property tests of the planner against a small in-memory cluster: random step lists, pod readiness,
//! commands, new revisions, failed actions and lost status writes, with the safety invariants checked after
//! every reconcile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use proptest::prelude::*;
use serde_json::json;
use serin::crd::PodTemplate;

use serin::crd::labels::POD_TEMPLATE_HASH;
use serin::crd::rollout::{
    AnalysisTemplateRef, BackgroundAnalysis, BlueGreenStrategy, CanaryStep, GatewayApiRouting,
    ManualCommands, PauseStep, PromoteCommand, RolloutAnalysis,
};
use serin::crd::{
    AnalysisPhase, AnalysisTemplateSpec, CanaryStrategy, ManifestDuration, Metric, Rollout,
    RolloutPhase, RolloutSpec, RolloutStrategy, TrafficRouting,
};
use serin::strategy::replicas::{canary_pods_needed, max_unavailable, pods_for_weight};
use serin::strategy::{
    plan, Action, Observed, ObservedAnalysisRun, ObservedReplicaSet, ObservedService, Plan,
    TemplateKey,
};
use serin::strategy::{ObservedTraffic, RouteState};

const T0: i64 = 1_800_000_000;
const STABLE: &str = "web";
const CANARY: &str = "web-canary";

#[derive(Clone, Debug)]
enum Kind {
    CanaryReplicas,
    CanaryRouter,
    BlueGreen,
}

#[derive(Clone, Debug)]
enum Op {
    Reconcile,
    /// The action at this index fails: the controller stops there and writes no status.
    ReconcileFailingAt(usize),
    /// The controller acts, then dies before writing status; the next one re-plans from the stored status.
    CrashAfterActing,
    PodsReady {
        rs: usize,
        count: i32,
    },
    Tick(i64),
    Promote(bool),
    Abort,
    Retry,
    Pause(bool),
    NewTemplate(u8),
    Verdict {
        run: usize,
        phase: u8,
    },
    Drift(i32),
    /// The route becomes unreadable (true) or readable again (false), keeping its weight.
    RouteBroken(bool),
    /// The stable ReplicaSet drops out of the cache (true: a lagging cache, a deletion) or comes back.
    HideStable(bool),
    /// The steps are re-applied from Git shortened to this many.
    TruncateSteps(usize),
    /// `spec.replicas` changed (an HPA through the scale subresource).
    Scale(i32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Reconcile),
        1 => (0usize..6).prop_map(Op::ReconcileFailingAt),
        1 => Just(Op::CrashAfterActing),
        5 => (0usize..4, 1i32..6).prop_map(|(rs, count)| Op::PodsReady { rs, count }),
        2 => (1i64..200).prop_map(Op::Tick),
        1 => any::<bool>().prop_map(Op::Promote),
        1 => Just(Op::Abort),
        1 => Just(Op::Retry),
        1 => any::<bool>().prop_map(Op::Pause),
        1 => (0u8..3).prop_map(Op::NewTemplate),
        1 => (0usize..4, 0u8..5).prop_map(|(run, phase)| Op::Verdict { run, phase }),
        1 => (0i32..=100).prop_map(Op::Drift),
        1 => any::<bool>().prop_map(Op::RouteBroken),
        1 => any::<bool>().prop_map(Op::HideStable),
        1 => (0usize..4).prop_map(Op::TruncateSteps),
        1 => (1i32..8).prop_map(Op::Scale),
    ]
}

fn step() -> impl Strategy<Value = CanaryStep> {
    prop_oneof![
        3 => (1i32..40).prop_map(|w| CanaryStep { set_weight: Some(w), ..Default::default() }),
        1 => Just(CanaryStep { pause: Some(PauseStep { duration: None }), ..Default::default() }),
        1 => (0i64..120).prop_map(|s| CanaryStep {
            pause: Some(PauseStep { duration: Some(ManifestDuration::Seconds(s)) }),
            ..Default::default()
        }),
        1 => Just(CanaryStep { analysis: Some(analysis()), ..Default::default() }),
    ]
}

fn analysis() -> RolloutAnalysis {
    RolloutAnalysis {
        templates: vec![AnalysisTemplateRef {
            template_name: "health".into(),
            cluster_scope: false,
        }],
        args: vec![],
    }
}

/// Setweight increments become a non-decreasing weight sequence capped at 100.
fn monotone(mut steps: Vec<CanaryStep>) -> Vec<CanaryStep> {
    let mut weight = 0;
    for step in &mut steps {
        if let Some(increment) = step.set_weight {
            weight = (weight + increment).min(100);
            step.set_weight = Some(weight);
        }
    }
    steps
}

fn template(version: u8) -> PodTemplate {
    serde_json::from_value(json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": format!("web:{version}")}]}
    }))
    .unwrap()
}

fn build_rollout(
    kind: &Kind,
    replicas: i32,
    steps: Vec<CanaryStep>,
    background: bool,
    max_unavailable: i32,
) -> Rollout {
    let strategy = match kind {
        Kind::BlueGreen => RolloutStrategy {
            canary: None,
            blue_green: Some(BlueGreenStrategy {
                active_service: STABLE.into(),
                preview_service: Some(CANARY.into()),
                auto_promotion_enabled: Some(!background),
                auto_promotion_seconds: Some(30),
                pre_promotion_analysis: background.then(analysis),
                ..Default::default()
            }),
        },
        Kind::CanaryReplicas | Kind::CanaryRouter => RolloutStrategy {
            canary: Some(CanaryStrategy {
                stable_service: Some(STABLE.into()),
                canary_service: Some(CANARY.into()),
                traffic_routing: matches!(kind, Kind::CanaryRouter).then(|| TrafficRouting {
                    gateway_api: Some(GatewayApiRouting {
                        http_route: "web".into(),
                    }),
                    ..Default::default()
                }),
                analysis: background.then(|| BackgroundAnalysis {
                    templates: analysis().templates,
                    args: vec![],
                    starting_step: Some(steps.len().min(1) as i32),
                }),
                steps: monotone(steps),
                max_unavailable: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(max_unavailable),
                ),
                ..Default::default()
            }),
            blue_green: None,
        },
    };
    let mut rollout = Rollout::new(
        "web",
        RolloutSpec {
            replicas: Some(replicas),
            selector: serde_json::from_value(json!({"matchLabels": {"app": "web"}})).unwrap(),
            template: template(0),
            revision_history_limit: Some(2),
            progress_deadline_seconds: Some(300),
            progress_deadline_abort: background,
            min_ready_seconds: None,
            paused: false,
            strategy,
        },
    );
    rollout.metadata = ObjectMeta {
        name: Some("web".into()),
        namespace: Some("ns".into()),
        generation: Some(1),
        ..Default::default()
    };
    rollout
}

struct Model {
    kind: Kind,
    rollout: Rollout,
    observed: Observed,
    now: i64,
    /// Router weight and canary hash after the last reconcile, for the "weights only move forward" check.
    last: Option<(String, i32, i32)>,
    /// A status write was lost or an action failed since the last check.
    excused: bool,
    /// The router's weight was edited by hand and no complete reconcile has reverted it yet.
    drifted: bool,
    /// The route cannot be read; its weight stays what it was.
    broken_route: Option<ObservedTraffic>,
    /// The stable ReplicaSet, while it is out of the cache.
    hidden_stable: Option<ObservedReplicaSet>,
    /// A full promotion was asked for since the stable went out of the cache.
    full_promotion_asked: bool,
    /// `spec.replicas` as of the last complete reconcile: a scale-up is owed only once a reconcile ran.
    settled_n: Option<i32>,
}

impl Model {
    fn new(kind: Kind, rollout: Rollout) -> Self {
        let mut observed = Observed::default();
        for name in [STABLE, CANARY] {
            observed.services.insert(
                name.into(),
                ObservedService {
                    name: name.into(),
                    selector: [("app".to_string(), "web".to_string())].into(),
                },
            );
        }
        if matches!(kind, Kind::CanaryRouter) {
            observed.traffic = RouteState::Observed(ObservedTraffic::default());
        }
        observed.analysis_templates.insert(
            TemplateKey {
                name: "health".into(),
                cluster_scope: false,
            },
            Ok(AnalysisTemplateSpec {
                metrics: vec![Metric {
                    name: "m".into(),
                    success_condition: Some("result < 0.05".into()),
                    provider: serin_metric_provider(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
        Model {
            kind,
            rollout,
            observed,
            now: 0,
            last: None,
            excused: false,
            drifted: false,
            broken_route: None,
            hidden_stable: None,
            full_promotion_asked: false,
            settled_n: None,
        }
    }

    /// The hidden stable ReplicaSet comes back into the cache (unless a new one of that name was created).
    fn restore_stable(&mut self) {
        if let Some(rs) = self.hidden_stable.take() {
            if !self.observed.replica_sets.iter().any(|r| r.name == rs.name) {
                self.observed.replica_sets.push(rs);
            }
        }
        self.full_promotion_asked = false;
    }

    fn n(&self) -> i32 {
        self.rollout.spec.replicas.unwrap_or(1)
    }

    fn plan(&self) -> Plan {
        plan(
            &self.rollout,
            &self.observed,
            Timestamp::from_second(T0 + self.now).unwrap(),
        )
    }

    /// Applies actions in order; false when one failed (the rest are not applied).
    fn apply(&mut self, actions: &[Action]) -> bool {
        for action in actions {
            // Creating a ReplicaSet the cache did not show yet fails with AlreadyExists, and the reconcile
            // stops there; by the retry the cache has caught up.
            if let Action::CreateReplicaSet { name, .. } = action {
                if self
                    .hidden_stable
                    .as_ref()
                    .is_some_and(|rs| rs.name == *name)
                {
                    self.restore_stable();
                    return false;
                }
            }
            match action {
                Action::CreateReplicaSet {
                    name,
                    pod_template_hash,
                    revision,
                    replicas,
                    ..
                } => {
                    assert!(
                        !self.observed.replica_sets.iter().any(|rs| rs.name == *name),
                        "duplicate ReplicaSet {name}"
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
                    let rs = self
                        .observed
                        .replica_sets
                        .iter_mut()
                        .find(|rs| rs.name == *name)
                        .expect("scale of unknown ReplicaSet");
                    rs.spec_replicas = *replicas;
                    // Scaling down removes not-ready pods first.
                    rs.replicas = rs.replicas.min(*replicas);
                    rs.ready_replicas = rs.ready_replicas.min(*replicas);
                    rs.available_replicas = rs.available_replicas.min(*replicas);
                }
                Action::SetRevision { name, revision } => {
                    if let Some(rs) = self
                        .observed
                        .replica_sets
                        .iter_mut()
                        .find(|rs| rs.name == *name)
                    {
                        rs.revision = *revision;
                    }
                }
                Action::DeleteReplicaSet { name } => {
                    self.observed.replica_sets.retain(|rs| rs.name != *name)
                }
                Action::SetServiceSelector {
                    service,
                    pod_template_hash,
                } => {
                    let svc = self
                        .observed
                        .services
                        .get_mut(service)
                        .expect("selector of unknown Service");
                    match pod_template_hash {
                        Some(hash) => svc.selector.insert(POD_TEMPLATE_HASH.into(), hash.clone()),
                        None => svc.selector.remove(POD_TEMPLATE_HASH),
                    };
                }
                Action::SetTraffic(desired) => {
                    assert!(
                        matches!(self.kind, Kind::CanaryRouter),
                        "SetTraffic without a router"
                    );
                    assert!(
                        self.broken_route.is_none(),
                        "SetTraffic to a route that cannot be read"
                    );
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
                    });
                }
                Action::CreateAnalysisRun {
                    name,
                    purpose,
                    pod_template_hash,
                    ..
                } => {
                    assert!(
                        !self.observed.analysis_runs.iter().any(|r| r.name == *name),
                        "duplicate AnalysisRun {name}"
                    );
                    self.observed.analysis_runs.push(ObservedAnalysisRun {
                        name: name.clone(),
                        purpose: *purpose,
                        pod_template_hash: pod_template_hash.clone(),
                        phase: AnalysisPhase::Running,
                        message: None,
                        terminating: false,
                        latest_successful: true,
                    });
                }
                Action::TerminateAnalysisRun { name } => {
                    if let Some(run) = self
                        .observed
                        .analysis_runs
                        .iter_mut()
                        .find(|r| r.name == *name)
                    {
                        run.terminating = true;
                        if !run.phase.is_completed() {
                            run.phase = AnalysisPhase::Successful;
                        }
                    }
                }
                Action::DeleteAnalysisRun { name } => {
                    self.observed.analysis_runs.retain(|r| r.name != *name)
                }
            }
        }
        true
    }

    fn selected(&self, service: &str) -> Option<String> {
        self.observed.services[service]
            .selector
            .get(POD_TEMPLATE_HASH)
            .cloned()
    }

    /// A ReplicaSet as it is in the cluster (a hidden one still runs its pods).
    fn rs(&self, hash: &str) -> Option<&ObservedReplicaSet> {
        self.observed
            .replica_sets
            .iter()
            .chain(self.hidden_stable.iter())
            .find(|rs| rs.pod_template_hash == hash)
    }

    fn weight(&self) -> i32 {
        if let Some(hidden) = &self.broken_route {
            return hidden.canary_weight;
        }
        match &self.observed.traffic {
            RouteState::Observed(t) => t.canary_weight,
            _ => 0,
        }
    }

    /// Available pods of `replica_sets` behind a Service (all versions when its selector is not pinned).
    fn serving(&self, service: &str, replica_sets: &[ObservedReplicaSet]) -> i32 {
        let pinned = self.selected(service);
        replica_sets
            .iter()
            .filter(|rs| pinned.as_ref().is_none_or(|h| *h == rs.pod_template_hash))
            .map(|rs| rs.available_replicas.min(rs.spec_replicas))
            .sum()
    }

    fn command(&mut self, change: impl FnOnce(&mut ManualCommands)) {
        let mut status = self.rollout.status.clone().unwrap_or_default();
        let mut commands = status.commands.clone().unwrap_or_default();
        change(&mut commands);
        status.commands = Some(commands);
        self.rollout.status = Some(status);
    }

    /// One reconcile. `fail_at`: index of the action that fails; `write_status`: whether status is stored.
    fn reconcile(
        &mut self,
        fail_at: Option<usize>,
        write_status: bool,
    ) -> Result<(), TestCaseError> {
        let plan = self.plan();
        prop_assert_eq!(
            &plan,
            &self.plan(),
            "the same input must give the same plan"
        );
        let before = self.observed.replica_sets.clone();
        let floor = self.floor();
        let applied = match fail_at {
            Some(i) if i < plan.actions.len() => &plan.actions[..i],
            _ => &plan.actions[..],
        };
        let failed = !self.apply(applied) || applied.len() < plan.actions.len();
        if write_status && !failed {
            self.rollout.status = Some(plan.status.clone());
        } else {
            self.excused = true;
        }
        // An invalid spec changes nothing (rule 7), nor does a missing stable (rule 9), so a hand edit stays
        // until the spec is valid and the stable observed again.
        let invalid = plan.status.conditions.iter().any(|c| {
            (c.type_ == serin::crd::condition::INVALID_SPEC && c.status == "True")
                || c.reason == serin::crd::reason::STABLE_MISSING
        });
        if !failed && self.broken_route.is_none() && !invalid {
            self.drifted = false;
        }
        self.check(&plan, &before, floor)
    }

    fn floor(&self) -> i32 {
        let n = self.n();
        let unavailable = self
            .rollout
            .spec
            .strategy
            .canary
            .as_ref()
            .map(|c| max_unavailable(c.max_unavailable.as_ref(), n).unwrap_or(0))
            .unwrap_or(0);
        n - unavailable
    }

    fn check(
        &mut self,
        plan: &Plan,
        before: &[ObservedReplicaSet],
        floor: i32,
    ) -> Result<(), TestCaseError> {
        let status = self.rollout.status.clone().unwrap_or_default();
        let n = self.n().min(self.settled_n.unwrap_or(i32::MAX));
        let invalid = status
            .conditions
            .iter()
            .any(|c| c.type_ == serin::crd::condition::INVALID_SPEC && c.status == "True");
        let stable_selected = status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.clone())
            == self.selected(STABLE);
        if !self.excused
            && self.hidden_stable.is_none()
            && self.broken_route.is_none()
            && !invalid
            && stable_selected
        {
            self.settled_n = Some(self.n());
        }
        let Some(stable) = status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.clone())
        else {
            self.excused = false;
            return Ok(());
        };
        // Rule 9: nothing observed missing counts as progress: while the stable ReplicaSet is out of the cache
        // the stable revision stays, unless a human asked for a full promotion.
        if let Some(hidden) = &self.hidden_stable {
            if !self.full_promotion_asked {
                prop_assert_eq!(
                    &stable,
                    &hidden.pod_template_hash,
                    "stable changed while its ReplicaSet was not observed"
                );
            }
        }
        let scaled_down = plan.actions.iter().any(|a| match a {
            Action::ScaleReplicaSet { name, replicas } => before
                .iter()
                .any(|rs| rs.name == *name && rs.spec_replicas > *replicas),
            _ => false,
        });
        match self.kind {
            Kind::CanaryRouter if !self.drifted => {
                let w = self.weight();
                // Rule 3: the version behind the stable Service keeps the pods its share needs.
                if let Some(hash) = self.selected(STABLE) {
                    let spec = self.rs(&hash).map(|rs| rs.spec_replicas).unwrap_or(0);
                    prop_assert!(
                        spec >= pods_for_weight(n, 100 - w),
                        "stable {hash} at {spec} pods carries {}%",
                        100 - w
                    );
                }
                // Rule 1: the canary has the available pods for its weight.
                if w > 0 {
                    let hash = self.selected(CANARY).expect("canary Service pinned");
                    let available = self
                        .rs(&hash)
                        .map(|rs| rs.available_replicas.min(rs.spec_replicas))
                        .unwrap_or(0);
                    prop_assert!(
                        available >= canary_pods_needed(n, w),
                        "canary {hash} with {available} pods carries {w}%"
                    );
                }
            }
            Kind::CanaryReplicas => {
                // Rule 11: through the steps the stable keeps its full size beside the canary.
                let steps = self
                    .rollout
                    .spec
                    .strategy
                    .canary
                    .as_ref()
                    .map(|c| c.steps.len())
                    .unwrap_or(0);
                let in_steps = status.canary_revision.is_some()
                    && !status.abort
                    && usize::try_from(status.current_step_index.unwrap_or(0)).unwrap_or(0) < steps;
                if in_steps && !self.excused && self.hidden_stable.is_none() {
                    let spec = self.rs(&stable).map(|rs| rs.spec_replicas).unwrap_or(0);
                    prop_assert!(
                        spec >= n,
                        "stable {stable} at {spec} of {n} during the steps"
                    );
                }
                // Rule 3: a scale-down never takes the pods serving behind the stable Service below the floor
                // (selectors as they are after the plan: an abort moves them first, on purpose).
                if scaled_down {
                    let serving_before = self.serving(STABLE, before);
                    let after = self.serving(STABLE, &self.observed.replica_sets);
                    prop_assert!(
                        after >= floor.min(serving_before),
                        "serving {serving_before} -> {after}, floor {floor}"
                    );
                }
            }
            Kind::CanaryRouter => {}
            Kind::BlueGreen => {
                if let Some(hash) = self.selected(STABLE) {
                    let spec = self.rs(&hash).map(|rs| rs.spec_replicas).unwrap_or(0);
                    prop_assert!(spec >= n, "active {hash} at {spec} of {n}");
                }
            }
        }
        // After an abort: no traffic on the canary, both Services on stable.
        if status.abort
            && status.phase == Some(RolloutPhase::Aborted)
            && !self.excused
            && !self.drifted
            && self.broken_route.is_none()
        {
            prop_assert_eq!(self.selected(STABLE), Some(stable.clone()));
            prop_assert_eq!(self.selected(CANARY), Some(stable.clone()));
            prop_assert_eq!(self.weight(), 0);
        }
        // Weights move forward within one canary, except on abort.
        if let Kind::CanaryRouter = self.kind {
            let canary = status
                .canary_revision
                .as_ref()
                .map(|r| r.pod_template_hash.clone());
            let step = status.current_step_index.unwrap_or(0);
            if let (Some((last_hash, last_weight, last_step)), Some(hash)) = (&self.last, &canary) {
                // Steps changed and not yet restarted (a hold): the weight may step back once they restart.
                let steps_current = status.steps_hash
                    == self
                        .rollout
                        .spec
                        .strategy
                        .canary
                        .as_ref()
                        .map(|c| serin::strategy::hash::steps_hash(&c.steps));
                let restarted = plan
                    .events
                    .iter()
                    .any(|e| e.reason == serin::crd::reason::STEPS_CHANGED);
                if last_hash == hash
                    && !status.abort
                    && !self.excused
                    && !self.drifted
                    && steps_current
                    && !restarted
                {
                    prop_assert!(
                        self.weight() >= *last_weight,
                        "weight {} after {}",
                        self.weight(),
                        last_weight
                    );
                    prop_assert!(step >= *last_step, "step {} after {}", step, last_step);
                }
            }
            // A failed action or lost status write may have half-applied a decision the planner no longer
            // remembers (a scale-down of the canary, say): forward motion is checked between complete
            // reconciles only.
            self.last = match (
                canary,
                status.abort,
                self.excused || self.drifted || self.broken_route.is_some(),
            ) {
                (Some(hash), false, false) => Some((hash, self.weight(), step)),
                _ => None,
            };
        }
        self.excused = false;
        Ok(())
    }
}

fn run_case(
    kind: Kind,
    replicas: i32,
    steps: Vec<CanaryStep>,
    background: bool,
    unavailable: i32,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let rollout = build_rollout(&kind, replicas, steps, background, unavailable);
    let mut model = Model::new(kind, rollout);
    for op in ops {
        match op {
            Op::Reconcile => model.reconcile(None, true)?,
            Op::ReconcileFailingAt(i) => model.reconcile(Some(i), false)?,
            Op::CrashAfterActing => model.reconcile(None, false)?,
            Op::PodsReady { rs, count } => {
                let len = model.observed.replica_sets.len();
                if len > 0 {
                    let rs = &mut model.observed.replica_sets[rs % len];
                    rs.replicas = rs.spec_replicas;
                    rs.ready_replicas = (rs.ready_replicas + count).min(rs.spec_replicas);
                    rs.available_replicas = rs.ready_replicas;
                }
            }
            Op::Tick(secs) => model.now += secs,
            Op::Promote(full) => {
                model.full_promotion_asked |= full && model.hidden_stable.is_some();
                model.command(|c| {
                    c.promote = Some(if full {
                        PromoteCommand::Full
                    } else {
                        PromoteCommand::Step
                    })
                })
            }
            Op::Abort => model.command(|c| c.abort = true),
            Op::Retry => model.command(|c| c.retry = true),
            Op::Pause(paused) => model.command(|c| c.paused = Some(paused)),
            Op::NewTemplate(version) => {
                model.rollout.spec.template = template(version);
                model.rollout.metadata.generation =
                    model.rollout.metadata.generation.map(|g| g + 1);
            }
            Op::Verdict { run, phase } => {
                let len = model.observed.analysis_runs.len();
                if len > 0 {
                    let run = &mut model.observed.analysis_runs[run % len];
                    if !run.phase.is_completed() {
                        run.phase = [
                            AnalysisPhase::Successful,
                            AnalysisPhase::Failed,
                            AnalysisPhase::Inconclusive,
                            AnalysisPhase::Error,
                            AnalysisPhase::Running,
                        ][usize::from(phase) % 5];
                        run.message = Some("verdict".into());
                    }
                }
            }
            Op::RouteBroken(true) => {
                if let RouteState::Observed(traffic) = model.observed.traffic.clone() {
                    model.broken_route = Some(traffic);
                    model.observed.traffic = RouteState::Invalid("HTTPRoute web not found".into());
                }
            }
            Op::RouteBroken(false) => {
                if let Some(traffic) = model.broken_route.take() {
                    model.observed.traffic = RouteState::Observed(traffic);
                }
            }
            Op::HideStable(true) => {
                let stable = model
                    .rollout
                    .status
                    .as_ref()
                    .and_then(|s| s.stable_revision.as_ref())
                    .map(|r| r.pod_template_hash.clone());
                if let (None, Some(hash)) = (&model.hidden_stable, stable) {
                    if let Some(i) = model
                        .observed
                        .replica_sets
                        .iter()
                        .position(|rs| rs.pod_template_hash == hash)
                    {
                        model.hidden_stable = Some(model.observed.replica_sets.remove(i));
                        model.full_promotion_asked = model
                            .rollout
                            .status
                            .as_ref()
                            .and_then(|s| s.commands.as_ref())
                            .is_some_and(|c| c.promote == Some(PromoteCommand::Full));
                    }
                }
            }
            Op::HideStable(false) => model.restore_stable(),
            Op::TruncateSteps(keep) => {
                if let Some(canary) = model.rollout.spec.strategy.canary.as_mut() {
                    canary.steps.truncate(keep);
                    // New steps start again from the first: forward motion is measured from here.
                    model.last = None;
                    model.rollout.metadata.generation =
                        model.rollout.metadata.generation.map(|g| g + 1);
                }
            }
            Op::Scale(replicas) => {
                // Fewer replicas are needed at once; more only once a complete reconcile has asked for them.
                model.settled_n = Some(model.settled_n.unwrap_or(model.n()).min(replicas));
                // More replicas may need more canary pods for the same weight: it may step back (rule 1).
                model.last = None;
                model.rollout.spec.replicas = Some(replicas);
                model.rollout.metadata.generation =
                    model.rollout.metadata.generation.map(|g| g + 1);
            }
            Op::Drift(weight) => {
                if let RouteState::Observed(traffic) = &mut model.observed.traffic {
                    traffic.canary_weight = weight;
                    model.drifted = true;
                }
            }
        }
    }
    // Left alone with every pod ready, the rollout settles: a reconcile that changes nothing (rule 5).
    model.command(|c| c.paused = Some(false));
    model.restore_stable();
    if let Some(traffic) = model.broken_route.take() {
        model.observed.traffic = RouteState::Observed(traffic);
    }
    let mut settled = false;
    for _ in 0..60 {
        for rs in &mut model.observed.replica_sets {
            rs.replicas = rs.spec_replicas;
            rs.ready_replicas = rs.spec_replicas;
            rs.available_replicas = rs.spec_replicas;
        }
        model.now += 400;
        let plan = model.plan();
        if plan.actions.is_empty()
            && plan.events.is_empty()
            && Some(&plan.status) == model.rollout.status.as_ref()
        {
            settled = true;
            break;
        }
        let before = model.observed.replica_sets.clone();
        let floor = model.floor();
        let _ = model.apply(&plan.actions);
        model.rollout.status = Some(plan.status.clone());
        model.check(&plan, &before, floor)?;
    }
    prop_assert!(settled, "did not settle: {:?}", model.rollout.status);
    Ok(())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::CanaryReplicas),
        Just(Kind::CanaryRouter),
        Just(Kind::BlueGreen)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn planner_keeps_the_safety_invariants(
        kind in kind(),
        replicas in 1i32..8,
        steps in prop::collection::vec(step(), 0..5),
        background in any::<bool>(),
        unavailable in 0i32..2,
        ops in prop::collection::vec(op(), 0..80),
    ) {
        run_case(kind, replicas, steps, background, unavailable, ops)?;
    }
}

#[test]
fn model_reaches_healthy_on_a_simple_canary() {
    let steps = vec![CanaryStep {
        set_weight: Some(50),
        ..Default::default()
    }];
    let ops = vec![
        Op::Reconcile,
        Op::PodsReady { rs: 0, count: 10 },
        Op::Reconcile,
        Op::NewTemplate(1),
    ];
    run_case(Kind::CanaryRouter, 4, steps, false, 0, ops).unwrap();
    let _ = BTreeMap::<String, String>::new();
}

/// A Prometheus metric as a template would hold it (the run-spec builder rejects metrics without a provider).
fn serin_metric_provider() -> serin::crd::analysis::MetricProvider {
    serin::crd::analysis::MetricProvider {
        prometheus: Some(serin::crd::analysis::PrometheusMetric {
            address: "http://prometheus:9090".into(),
            query: Some("sum(rate(http_requests_total[1m]))".into()),
            ..Default::default()
        }),
    }
}
