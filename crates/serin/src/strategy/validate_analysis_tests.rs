//! Planner-level tests: an analysis that could not start (missing template, metric without provider or
//! condition, an argument that does not resolve, no templates) is an invalid spec found before anything is
//! scaled, for canary step and background analysis and blue-green pre- and post-promotion analysis.

use crate::crd::PodTemplate;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::crd::labels::POD_TEMPLATE_HASH;
use crate::crd::{condition, reason, AnalysisTemplateSpec, Rollout, RolloutPhase};
use crate::strategy::{
    plan, pod_template_hash, Action, AnalysisPurpose, Observed, ObservedAnalysisRun,
    ObservedReplicaSet, ObservedService, Plan, TemplateKey,
};

const T0: i64 = 1_800_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn pod_template(image: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": "checkout"}},
        "spec": {"containers": [{"name": "app", "image": image}]}
    })
}

fn hash_of(image: &str) -> String {
    let template: PodTemplate = serde_json::from_value(pod_template(image)).unwrap();
    pod_template_hash(&template)
}

/// The analysis every valid Rollout here uses: one template, its argument from the Rollout's name.
fn good_analysis() -> Value {
    json!({
        "templates": [{"templateName": "http-health"}],
        "args": [{"name": "service", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    })
}

fn rollout(strategy: Value) -> Rollout {
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "checkout", "namespace": "shop", "generation": 1},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "checkout"}},
            "template": pod_template("app:1"),
            "strategy": strategy
        }
    }))
    .unwrap()
}

/// Canary without a router: 25%, pause, analysis (step 2), 75%; background analysis from step 1.
fn canary() -> Rollout {
    rollout(json!({"canary": {
        "stableService": "checkout",
        "canaryService": "checkout-canary",
        "analysis": {
            "templates": [{"templateName": "http-health"}],
            "args": [{"name": "service", "value": "checkout"}],
            "startingStep": 1
        },
        "steps": [{"setWeight": 25}, {"pause": {}}, {"analysis": good_analysis()}, {"setWeight": 75}]
    }}))
}

fn blue_green() -> Rollout {
    rollout(json!({"blueGreen": {
        "activeService": "checkout",
        "previewService": "checkout-preview",
        "autoPromotionEnabled": false,
        "prePromotionAnalysis": good_analysis(),
        "postPromotionAnalysis": good_analysis()
    }}))
}

fn key(name: &str) -> TemplateKey {
    TemplateKey {
        name: name.into(),
        cluster_scope: false,
    }
}

fn analysis_template(spec: Value) -> AnalysisTemplateSpec {
    serde_json::from_value(spec).unwrap()
}

/// A template measuring the canary's error rate; `metric` is merged into its one metric.
fn http_health(metric: Value) -> AnalysisTemplateSpec {
    let mut base = json!({
        "name": "error-rate",
        "interval": "30s",
        "count": 3,
        "successCondition": "result < 0.05",
        "provider": {"prometheus": {
            "address": "http://prometheus:9090",
            "query": "sum(rate(http_requests_total{service=\"{{args.service}}\",code=~\"5..\"}[1m]))"
        }}
    });
    if let (Some(base), Some(extra)) = (base.as_object_mut(), metric.as_object()) {
        for (field, value) in extra {
            if value.is_null() {
                base.remove(field);
            } else {
                base.insert(field.clone(), value.clone());
            }
        }
    }
    analysis_template(json!({"args": [{"name": "service"}], "metrics": [base]}))
}

/// The snapshot a controller would observe, and a Rollout; plans are applied to it.
struct Cluster {
    rollout: Rollout,
    observed: Observed,
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
        observed
            .analysis_templates
            .insert(key("http-health"), Ok(http_health(json!({}))));
        Cluster { rollout, observed }
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
                    ..
                } => self.observed.replica_sets.push(ObservedReplicaSet {
                    name: name.clone(),
                    pod_template_hash: pod_template_hash.clone(),
                    revision: *revision,
                    spec_replicas: *replicas,
                    status_current: true,
                    ..Default::default()
                }),
                Action::ScaleReplicaSet { name, replicas } => {
                    if let Some(rs) = self
                        .observed
                        .replica_sets
                        .iter_mut()
                        .find(|rs| rs.name == *name)
                    {
                        rs.spec_replicas = *replicas;
                    }
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
                    if let Some(svc) = self.observed.services.get_mut(service) {
                        match pod_template_hash {
                            Some(h) => svc.selector.insert(POD_TEMPLATE_HASH.into(), h.clone()),
                            None => svc.selector.remove(POD_TEMPLATE_HASH),
                        };
                    }
                }
                Action::SetTraffic(_) => {}
                Action::CreateAnalysisRun {
                    name,
                    purpose,
                    pod_template_hash,
                    ..
                } => self.observed.analysis_runs.push(ObservedAnalysisRun {
                    name: name.clone(),
                    purpose: *purpose,
                    pod_template_hash: pod_template_hash.clone(),
                    phase: crate::crd::AnalysisPhase::Running,
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

    /// Plans and applies, every pod turning ready after each plan, until nothing changes; returns every
    /// action taken.
    fn settle(&mut self, secs: i64) -> Vec<Action> {
        let mut taken = Vec::new();
        for _ in 0..60 {
            let plan = self.plan(secs);
            let mut changed =
                !plan.actions.is_empty() || Some(&plan.status) != self.rollout.status.as_ref();
            taken.extend(plan.actions.iter().cloned());
            self.apply(&plan);
            for rs in &mut self.observed.replica_sets {
                changed |= rs.ready_replicas != rs.spec_replicas;
                rs.replicas = rs.spec_replicas;
                rs.ready_replicas = rs.spec_replicas;
                rs.available_replicas = rs.spec_replicas;
            }
            if !changed {
                return taken;
            }
        }
        panic!("did not settle: {:?}", self.rollout.status);
    }

    /// The user applies a new version of the Rollout: a new image and `edit` on the spec.
    fn apply_new_revision(&mut self, image: &str, edit: impl FnOnce(&mut Rollout)) {
        self.rollout.spec.template = serde_json::from_value(pod_template(image)).unwrap();
        edit(&mut self.rollout);
        self.rollout.metadata.generation = Some(self.rollout.metadata.generation.unwrap_or(1) + 1);
    }
}

fn healthy(rollout: Rollout) -> Cluster {
    let mut cluster = Cluster::new(rollout);
    cluster.settle(0);
    let status = cluster.rollout.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(RolloutPhase::Healthy), "{status:#?}");
    cluster
}

fn condition_of(plan: &Plan, type_: &str) -> Option<(String, String)> {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Safety rule 7 for one plan: nothing is written to the cluster, the Rollout is Degraded with
/// InvalidSpec, and the message names `expected`.
fn assert_invalid(plan: &Plan, expected: &str) {
    assert!(
        plan.actions.is_empty(),
        "{expected}: an invalid spec must change nothing, planned {:#?}",
        plan.actions
    );
    assert_eq!(
        plan.status.phase,
        Some(RolloutPhase::Degraded),
        "{expected}"
    );
    assert_eq!(
        condition_of(plan, condition::INVALID_SPEC),
        Some(("True".into(), reason::INVALID_SPEC.into())),
        "{expected}"
    );
    let message = plan.status.message.clone().unwrap_or_default();
    assert!(
        message.contains(expected),
        "expected {expected:?} in {message:?}"
    );
    assert!(
        plan.events
            .iter()
            .any(|e| e.warning && e.reason == reason::INVALID_SPEC && e.message.contains(expected)),
        "{expected}: {:?}",
        plan.events
    );
}

fn creates_replica_set_of(actions: &[Action], hash: &str) -> bool {
    actions.iter().any(|a| {
        matches!(a, Action::CreateReplicaSet { pod_template_hash, .. } if pod_template_hash == hash)
    })
}

fn step_analysis(rollout: &mut Rollout, index: usize, analysis: Value) {
    if let Some(canary) = rollout.spec.strategy.canary.as_mut() {
        canary.steps[index] = serde_json::from_value(json!({ "analysis": analysis })).unwrap();
    }
}

#[test]
fn new_revision_referencing_a_missing_template_is_invalid_and_scales_nothing() {
    let mut cluster = healthy(canary());
    let v1 = hash_of("app:1");
    let stable_before = cluster.observed.replica_sets.clone();
    cluster.apply_new_revision("app:2", |r| {
        step_analysis(
            r,
            2,
            json!({
                "templates": [{"templateName": "http-health"}, {"templateName": "ghost"}],
                "args": [{"name": "service", "value": "checkout"}]
            }),
        )
    });
    let plan = cluster.plan(10);
    assert_invalid(
        &plan,
        r#"spec.strategy.canary.steps[2].analysis.templates[1]: AnalysisTemplate "ghost" not found"#,
    );
    assert!(!creates_replica_set_of(&plan.actions, &hash_of("app:2")));
    assert_eq!(
        plan.status
            .stable_revision
            .as_ref()
            .map(|r| r.pod_template_hash.as_str()),
        Some(v1.as_str())
    );
    // Later passes change nothing either: no ReplicaSet is created or scaled while the spec is invalid.
    cluster.apply(&plan);
    let taken = cluster.settle(600);
    assert!(taken.is_empty(), "{taken:#?}");
    assert_eq!(cluster.observed.replica_sets, stable_before);

    // Once the template exists the same revision starts: the InvalidSpec was what held it.
    cluster
        .observed
        .analysis_templates
        .insert(key("ghost"), Ok(http_health(json!({"name": "p99"}))));
    let plan = cluster.plan(601);
    assert!(
        creates_replica_set_of(&plan.actions, &hash_of("app:2")),
        "{:#?}",
        plan.actions
    );
    assert_eq!(
        condition_of(&plan, condition::INVALID_SPEC).map(|c| c.0),
        Some("False".into())
    );
}

#[test]
fn first_rollout_whose_analysis_cannot_start_creates_nothing() {
    let mut rollout = canary();
    step_analysis(
        &mut rollout,
        2,
        json!({"templates": [{"templateName": "http-health"}], "args": []}),
    );
    let cluster = Cluster::new(rollout);
    assert_invalid(
        &cluster.plan(0),
        r#"spec.strategy.canary.steps[2].analysis.args: argument "service" of template "http-health" has no value"#,
    );
}

/// Every kind of analysis that could not start, on every kind of analysis, found by `validate()` when the
/// new revision is applied: nothing is created, scaled or re-pointed, and the message names the field.
#[test]
fn analyses_that_cannot_start_are_invalid_specs_naming_the_field() {
    type Edit = Box<dyn Fn(&mut Cluster)>;
    let broken_template = |metric: Value| -> Edit {
        Box::new(move |c: &mut Cluster| {
            c.observed
                .analysis_templates
                .insert(key("http-health"), Ok(http_health(metric.clone())));
        })
    };
    let step = |analysis: Value| -> Edit {
        Box::new(move |c: &mut Cluster| step_analysis(&mut c.rollout, 2, analysis.clone()))
    };
    let cases: Vec<(Rollout, Edit, &str)> = vec![
        (
            canary(),
            broken_template(json!({"provider": {}})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": set a provider (prometheus)"#,
        ),
        (
            canary(),
            broken_template(json!({"successCondition": null})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": set a successCondition, a failureCondition or both"#,
        ),
        (
            canary(),
            broken_template(json!({"successCondition": "result <"})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": condition "result <" does not parse"#,
        ),
        (
            canary(),
            broken_template(json!({"count": "many"})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": count "many" is not a positive whole number"#,
        ),
        (
            canary(),
            broken_template(json!({"interval": "soon"})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": interval: duration "soon" is not"#,
        ),
        (
            canary(),
            broken_template(json!({"provider": {"prometheus": {
                "address": "http://prometheus:9090", "query": "up{job=\"{{args.job}}\"}"
            }}})),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: analysis cannot start: metric "error-rate": query refers to argument "job", which no template declares"#,
        ),
        (
            canary(),
            step(
                json!({"templates": [{"templateName": "http-health"}], "args": [
                    {"name": "service", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['absent']"}}}
                ]}),
            ),
            r#"spec.strategy.canary.steps[2].analysis.args[0].valueFrom.fieldRef.fieldPath: analysis cannot start: argument "service": field "metadata.labels['absent']" does not exist in the Rollout"#,
        ),
        (
            canary(),
            step(
                json!({"templates": [{"templateName": "http-health"}], "args": [
                    {"name": "service", "valueFrom": {}}
                ]}),
            ),
            r#"spec.strategy.canary.steps[2].analysis.args[0].valueFrom: analysis cannot start: argument "service" sets valueFrom without secretKeyRef, fieldRef or podTemplateHashValue"#,
        ),
        (
            canary(),
            step(json!({"templates": []})),
            "spec.strategy.canary.steps[2].analysis.templates: is required",
        ),
        (
            canary(),
            step(
                json!({"templates": [{"templateName": "http-health", "clusterScope": true}],
                        "args": [{"name": "service", "value": "checkout"}]}),
            ),
            r#"spec.strategy.canary.steps[2].analysis.templates[0]: ClusterAnalysisTemplate "http-health" not found"#,
        ),
        (
            canary(),
            Box::new(|c: &mut Cluster| {
                if let Some(background) = c
                    .rollout
                    .spec
                    .strategy
                    .canary
                    .as_mut()
                    .and_then(|canary| canary.analysis.as_mut())
                {
                    background.templates[0].template_name = "ghost".into();
                }
            }),
            r#"spec.strategy.canary.analysis.templates[0]: AnalysisTemplate "ghost" not found"#,
        ),
        (
            canary(),
            Box::new(|c: &mut Cluster| {
                if let Some(background) = c
                    .rollout
                    .spec
                    .strategy
                    .canary
                    .as_mut()
                    .and_then(|canary| canary.analysis.as_mut())
                {
                    background.args[0].value = None;
                }
            }),
            r#"spec.strategy.canary.analysis.args: argument "service" of template "http-health" has no value"#,
        ),
        (
            blue_green(),
            broken_template(json!({"provider": {}})),
            r#"spec.strategy.blueGreen.prePromotionAnalysis.templates[0]: analysis cannot start: metric "error-rate": set a provider (prometheus)"#,
        ),
        (
            blue_green(),
            Box::new(|c: &mut Cluster| {
                if let Some(post) = c
                    .rollout
                    .spec
                    .strategy
                    .blue_green
                    .as_mut()
                    .and_then(|bg| bg.post_promotion_analysis.as_mut())
                {
                    post.args[0].value_from = Some(Default::default());
                }
            }),
            r#"spec.strategy.blueGreen.postPromotionAnalysis.args[0].valueFrom: analysis cannot start"#,
        ),
    ];
    for (rollout, edit, expected) in cases {
        let mut cluster = healthy(rollout);
        let stable_before = cluster.observed.replica_sets.clone();
        let selectors_before = cluster.observed.services.clone();
        cluster.apply_new_revision("app:2", |_| {});
        edit(&mut cluster);
        let plan = cluster.plan(10);
        assert_invalid(&plan, expected);
        cluster.apply(&plan);
        assert_eq!(cluster.observed.replica_sets, stable_before, "{expected}");
        assert_eq!(cluster.observed.services, selectors_before, "{expected}");
    }
}

/// The other side of the check: what can start is not refused. Secret-valued arguments are not read here
/// (the runner reads them), the stable hash is asked for before any stable exists, a metric may have only
/// a failure condition; and the runs created later carry the real hashes, never the placeholders.
#[test]
fn analyses_that_can_start_are_valid_and_their_runs_carry_real_hashes() {
    let mut rollout = canary();
    step_analysis(
        &mut rollout,
        2,
        json!({"templates": [{"templateName": "hashes"}], "args": [
            {"name": "token", "valueFrom": {"secretKeyRef": {"name": "prometheus", "key": "token"}}},
            {"name": "stable", "valueFrom": {"podTemplateHashValue": "Stable"}},
            {"name": "canary", "valueFrom": {"podTemplateHashValue": "Latest"}}
        ]}),
    );
    let mut cluster = Cluster::new(rollout);
    cluster.observed.analysis_templates.insert(
        key("hashes"),
        Ok(analysis_template(json!({
            "args": [{"name": "token"}, {"name": "stable"}, {"name": "canary"}],
            "metrics": [{
                "name": "error-rate",
                "failureCondition": "result > 0.05",
                "provider": {"prometheus": {
                    "address": "http://prometheus:9090",
                    "query": "x{t=\"{{args.token}}\",s=\"{{args.stable}}\",c=\"{{args.canary}}\"}"
                }}
            }]
        }))),
    );
    let first = cluster.plan(0);
    assert!(
        creates_replica_set_of(&first.actions, &hash_of("app:1")),
        "{:#?}",
        first.status
    );
    cluster.settle(0);
    cluster.apply_new_revision("app:2", |_| {});
    let actions = cluster.settle(10);
    assert!(creates_replica_set_of(&actions, &hash_of("app:2")));
    // Paused at step 1; promote past it to reach the analysis step.
    let mut status = cluster.rollout.status.clone().unwrap_or_default();
    status.commands = Some(crate::crd::rollout::ManualCommands {
        promote: Some(crate::crd::rollout::PromoteCommand::Step),
        ..Default::default()
    });
    cluster.rollout.status = Some(status);
    let actions = cluster.settle(20);
    let spec = actions
        .iter()
        .find_map(|a| match a {
            Action::CreateAnalysisRun {
                purpose: AnalysisPurpose::Step(2),
                spec,
                ..
            } => Some(spec.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the analysis step created its run: {actions:#?}"));
    let value = |name: &str| {
        spec.args
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.value.clone())
    };
    assert_eq!(value("stable"), Some(hash_of("app:1")));
    assert_eq!(value("canary"), Some(hash_of("app:2")));
    let token = spec.args.iter().find(|a| a.name == "token");
    assert!(
        token.is_some_and(|a| a.value.is_none() && a.value_from.is_some()),
        "the Secret stays a reference: {token:?}"
    );
}
