//! Decides whether a Rollout's spec can be carried out, naming every problem by its field path.
//!
//! Every analysis the spec names (canary steps and background, blue-green pre- and post-promotion) is built
//! into an AnalysisRun spec here, with the templates observed, exactly as it will be built when it starts:
//! an analysis that could not start is an invalid spec found before anything is scaled, not an abort after
//! the canary took traffic. Pod-template hashes are placeholders at this point (only whether an argument
//! resolves matters), and Secret-valued arguments stay references the runner reads when it measures.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::replicas::{max_surge, max_unavailable, ReplicaMathError};
use super::types::{Observed, TemplateKey};
use crate::analysis::{build_run_spec, AnalysisRequest, RunSpecError};
use crate::crd::rollout::{AnalysisArgument, AnalysisTemplateRef, CanaryStep};
use crate::crd::{AnalysisTemplateSpec, Rollout, MAX_REPLICAS, MAX_STEPS};

#[cfg(test)]
#[path = "validate_analysis_tests.rs"]
mod analysis_tests;

/// Stand-ins for the stable and canary pod-template hashes when an analysis is checked: the real ones may
/// not exist yet (no stable before the first rollout), and the check only needs them to be known.
const PLACEHOLDER_STABLE_HASH: &str = "stable-hash";
const PLACEHOLDER_CANARY_HASH: &str = "canary-hash";

/// One problem in the spec, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: is required")]
    Missing { field: String },
    #[error("{field}: set exactly one of canary or blueGreen")]
    StrategyCount { field: String },
    #[error("{field}: {value} is not between {min} and {max}")]
    OutOfRange {
        field: String,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{field}: a step sets exactly one of setWeight, pause, setCanaryScale, analysis, setHeaderRoute, setMirrorRoute (found {found})")]
    StepActionCount { field: String, found: usize },
    #[error("{field}: set exactly one of {choices} (found {found})")]
    ChoiceCount {
        field: String,
        choices: &'static str,
        found: usize,
    },
    #[error("{field}: {problem}")]
    Duration { field: String, problem: String },
    #[error("{field}: {source}")]
    IntOrPercent {
        field: String,
        source: ReplicaMathError,
    },
    #[error("{field}: must differ from {other} ({name:?})")]
    SameService {
        field: String,
        other: &'static str,
        name: String,
    },
    #[error("{field}: Service {name:?} not found")]
    ServiceNotFound { field: String, name: String },
    #[error("{field}: must not be empty")]
    EmptySelector { field: String },
    #[error("{field}: does not match spec.selector ({requirement})")]
    SelectorMismatch { field: String, requirement: String },
    #[error("{field}: unknown operator {operator:?}")]
    SelectorOperator { field: String, operator: String },
    #[error("{field}: {kind} {name:?} not found")]
    TemplateNotFound {
        field: String,
        kind: &'static str,
        name: String,
    },
    #[error("{field}: {kind} {name:?} cannot be used: {reason}")]
    TemplateUnusable {
        field: String,
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("{field}: argument {arg:?} of template {template:?} has no value")]
    ArgumentMissing {
        field: String,
        arg: String,
        template: String,
    },
    #[error("{field}: analysis cannot start: {source}")]
    AnalysisCannotStart { field: String, source: RunSpecError },
    #[error("{field}: needs spec.strategy.canary.trafficRouting")]
    NeedsTrafficRouting { field: String },
    #[error("{field}: without trafficRouting the canary runs beside the full stable, so maxSurge must allow at least one pod")]
    NoRoomToRoll { field: String },
    #[error("{field}: {count} steps; at most {max} are allowed")]
    TooManySteps {
        field: String,
        count: usize,
        max: usize,
    },
    #[error("{field}: {value:?} is more than {max}")]
    TooLarge {
        field: String,
        value: String,
        max: String,
    },
    #[error("{field}: ReplicaSet {name:?} already exists and is not controlled by this Rollout; Serin neither adopts, scales nor deletes it (rename or delete it, or change the template)")]
    NameTaken { field: String, name: String },
    #[error("{field}: Service {name:?} is already managed by Rollout {other:?}, created earlier; two Rollouts pinning one Service's selector would take its traffic from each other")]
    ServiceShared {
        field: String,
        name: String,
        other: String,
    },
    #[error("{field}: selects the pods of Rollout {other:?}, created earlier, or its selector selects these pods; each Rollout must select only its own pods")]
    SelectorOverlap { field: String, other: String },
}

impl SpecError {
    /// The field path at fault.
    pub fn field(&self) -> &str {
        match self {
            SpecError::Missing { field }
            | SpecError::StrategyCount { field }
            | SpecError::OutOfRange { field, .. }
            | SpecError::StepActionCount { field, .. }
            | SpecError::ChoiceCount { field, .. }
            | SpecError::Duration { field, .. }
            | SpecError::IntOrPercent { field, .. }
            | SpecError::SameService { field, .. }
            | SpecError::ServiceNotFound { field, .. }
            | SpecError::EmptySelector { field }
            | SpecError::SelectorMismatch { field, .. }
            | SpecError::SelectorOperator { field, .. }
            | SpecError::TemplateNotFound { field, .. }
            | SpecError::TemplateUnusable { field, .. }
            | SpecError::ArgumentMissing { field, .. }
            | SpecError::AnalysisCannotStart { field, .. }
            | SpecError::NeedsTrafficRouting { field }
            | SpecError::NoRoomToRoll { field }
            | SpecError::TooManySteps { field, .. }
            | SpecError::TooLarge { field, .. }
            | SpecError::NameTaken { field, .. }
            | SpecError::ServiceShared { field, .. }
            | SpecError::SelectorOverlap { field, .. } => field,
        }
    }

    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            SpecError::Missing { .. } => "missing",
            SpecError::StrategyCount { .. } => "strategy_count",
            SpecError::OutOfRange { .. } => "out_of_range",
            SpecError::StepActionCount { .. } => "step_action_count",
            SpecError::ChoiceCount { .. } => "choice_count",
            SpecError::Duration { .. } => "duration",
            SpecError::IntOrPercent { .. } => "int_or_percent",
            SpecError::SameService { .. } => "same_service",
            SpecError::ServiceNotFound { .. } => "service_not_found",
            SpecError::EmptySelector { .. } => "empty_selector",
            SpecError::SelectorMismatch { .. } => "selector_mismatch",
            SpecError::SelectorOperator { .. } => "selector_operator",
            SpecError::TemplateNotFound { .. } => "template_not_found",
            SpecError::TemplateUnusable { .. } => "template_unusable",
            SpecError::ArgumentMissing { .. } => "argument_missing",
            SpecError::AnalysisCannotStart { .. } => "analysis_cannot_start",
            SpecError::NeedsTrafficRouting { .. } => "needs_traffic_routing",
            SpecError::NoRoomToRoll { .. } => "no_room_to_roll",
            SpecError::TooManySteps { .. } => "too_many_steps",
            SpecError::TooLarge { .. } => "too_large",
            SpecError::NameTaken { .. } => "name_taken",
            SpecError::ServiceShared { .. } => "service_shared",
            SpecError::SelectorOverlap { .. } => "selector_overlap",
        }
    }
}

/// Checks everything the planner relies on. The API server's CEL rules catch most of these already; the
/// planner must still never act on a spec that slipped through (safety rule 7).
pub fn validate(rollout: &Rollout, observed: &Observed) -> Result<(), Vec<SpecError>> {
    let mut errors = Vec::new();
    let spec = &rollout.spec;
    if rollout
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        errors.push(SpecError::Missing {
            field: "metadata.name".into(),
        });
    }
    range(
        &mut errors,
        "spec.replicas",
        spec.replicas,
        0,
        i64::from(MAX_REPLICAS),
    );
    range(
        &mut errors,
        "spec.revisionHistoryLimit",
        spec.revision_history_limit,
        0,
        i64::from(i32::MAX),
    );
    range(
        &mut errors,
        "spec.progressDeadlineSeconds",
        spec.progress_deadline_seconds,
        1,
        i64::from(i32::MAX),
    );
    range(
        &mut errors,
        "spec.minReadySeconds",
        spec.min_ready_seconds,
        0,
        i64::from(i32::MAX),
    );
    check_selector(&mut errors, rollout);
    check_neighbours(&mut errors, rollout, observed);
    if let Some(name) = &observed.foreign_replica_set {
        errors.push(SpecError::NameTaken {
            field: "spec.template".into(),
            name: name.clone(),
        });
    }

    match (&spec.strategy.canary, &spec.strategy.blue_green) {
        (Some(_), Some(_)) | (None, None) => errors.push(SpecError::StrategyCount {
            field: "spec.strategy".into(),
        }),
        (Some(canary), None) => {
            let base = "spec.strategy.canary";
            let router = canary.traffic_routing.is_some();
            if let Some(routing) = &canary.traffic_routing {
                let found = [
                    routing.gateway_api.is_some(),
                    routing.istio.is_some(),
                    routing.nginx.is_some(),
                ]
                .into_iter()
                .filter(|set| *set)
                .count();
                if found != 1 {
                    errors.push(SpecError::ChoiceCount {
                        field: format!("{base}.trafficRouting"),
                        choices: "gatewayAPI, istio, nginx",
                        found,
                    });
                }
                for (name, field) in [
                    (&canary.stable_service, "stableService"),
                    (&canary.canary_service, "canaryService"),
                ] {
                    if name.as_deref().unwrap_or_default().is_empty() {
                        errors.push(SpecError::Missing {
                            field: format!("{base}.{field}"),
                        });
                    }
                }
            }
            if let (Some(stable), Some(canary_svc)) =
                (&canary.stable_service, &canary.canary_service)
            {
                if stable == canary_svc {
                    errors.push(SpecError::SameService {
                        field: format!("{base}.canaryService"),
                        other: "stableService",
                        name: stable.clone(),
                    });
                }
            }
            service_exists(
                &mut errors,
                observed,
                &format!("{base}.stableService"),
                canary.stable_service.as_deref(),
            );
            service_exists(
                &mut errors,
                observed,
                &format!("{base}.canaryService"),
                canary.canary_service.as_deref(),
            );
            let total = spec.replicas.unwrap_or(1);
            int_or_percent_bound(
                &mut errors,
                &format!("{base}.maxSurge"),
                canary.max_surge.as_ref(),
            );
            int_or_percent_bound(
                &mut errors,
                &format!("{base}.maxUnavailable"),
                canary.max_unavailable.as_ref(),
            );
            let surge = max_surge(canary.max_surge.as_ref(), total).map_err(|source| {
                SpecError::IntOrPercent {
                    field: format!("{base}.maxSurge"),
                    source,
                }
            });
            let unavailable =
                max_unavailable(canary.max_unavailable.as_ref(), total).map_err(|source| {
                    SpecError::IntOrPercent {
                        field: format!("{base}.maxUnavailable"),
                        source,
                    }
                });
            match (surge, unavailable) {
                (Ok(0), unavailable) if !router && total > 0 => {
                    errors.push(SpecError::NoRoomToRoll {
                        field: format!("{base}.maxSurge"),
                    });
                    errors.extend(unavailable.err());
                }
                (surge, unavailable) => {
                    errors.extend(surge.err());
                    errors.extend(unavailable.err());
                }
            }
            range(
                &mut errors,
                &format!("{base}.abortScaleDownDelaySeconds"),
                canary.abort_scale_down_delay_seconds,
                0,
                i64::from(i32::MAX),
            );
            range(
                &mut errors,
                &format!("{base}.scaleDownDelaySeconds"),
                canary.scale_down_delay_seconds,
                0,
                i64::from(i32::MAX),
            );
            if canary.steps.len() > MAX_STEPS {
                // One message per step of 100,000 would not fit in the status.
                errors.push(SpecError::TooManySteps {
                    field: format!("{base}.steps"),
                    count: canary.steps.len(),
                    max: MAX_STEPS,
                });
            }
            for (index, step) in canary.steps.iter().enumerate().take(MAX_STEPS) {
                check_step(
                    &mut errors,
                    rollout,
                    observed,
                    &format!("{base}.steps[{index}]"),
                    step,
                    router,
                );
            }
            if let Some(background) = &canary.analysis {
                let field = format!("{base}.analysis");
                check_analysis(&mut errors, rollout, observed, &field, background.into());
                range(
                    &mut errors,
                    &format!("{field}.startingStep"),
                    background.starting_step,
                    0,
                    canary.steps.len() as i64,
                );
            }
        }
        (None, Some(blue_green)) => {
            let base = "spec.strategy.blueGreen";
            if blue_green.active_service.is_empty() {
                errors.push(SpecError::Missing {
                    field: format!("{base}.activeService"),
                });
            } else {
                service_exists(
                    &mut errors,
                    observed,
                    &format!("{base}.activeService"),
                    Some(&blue_green.active_service),
                );
            }
            if let Some(preview) = &blue_green.preview_service {
                if *preview == blue_green.active_service {
                    errors.push(SpecError::SameService {
                        field: format!("{base}.previewService"),
                        other: "activeService",
                        name: preview.clone(),
                    });
                }
                service_exists(
                    &mut errors,
                    observed,
                    &format!("{base}.previewService"),
                    Some(preview),
                );
            }
            range(
                &mut errors,
                &format!("{base}.autoPromotionSeconds"),
                blue_green.auto_promotion_seconds,
                0,
                i64::from(i32::MAX),
            );
            range(
                &mut errors,
                &format!("{base}.previewReplicaCount"),
                blue_green.preview_replica_count,
                1,
                i64::from(MAX_REPLICAS),
            );
            range(
                &mut errors,
                &format!("{base}.scaleDownDelaySeconds"),
                blue_green.scale_down_delay_seconds,
                0,
                i64::from(i32::MAX),
            );
            range(
                &mut errors,
                &format!("{base}.abortScaleDownDelaySeconds"),
                blue_green.abort_scale_down_delay_seconds,
                0,
                i64::from(i32::MAX),
            );
            for (analysis, field) in [
                (&blue_green.pre_promotion_analysis, "prePromotionAnalysis"),
                (&blue_green.post_promotion_analysis, "postPromotionAnalysis"),
            ] {
                if let Some(analysis) = analysis {
                    check_analysis(
                        &mut errors,
                        rollout,
                        observed,
                        &format!("{base}.{field}"),
                        analysis.into(),
                    );
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn range(errors: &mut Vec<SpecError>, field: &str, value: Option<i32>, min: i64, max: i64) {
    if let Some(value) = value {
        let value = i64::from(value);
        if value < min || value > max {
            errors.push(SpecError::OutOfRange {
                field: field.to_string(),
                value,
                min,
                max,
            });
        }
    }
}

fn service_exists(
    errors: &mut Vec<SpecError>,
    observed: &Observed,
    field: &str,
    name: Option<&str>,
) {
    if let Some(name) = name {
        if name.is_empty() {
            errors.push(SpecError::Missing {
                field: field.to_string(),
            });
        } else if !observed.services.contains_key(name) {
            errors.push(SpecError::ServiceNotFound {
                field: field.to_string(),
                name: name.to_string(),
            });
        }
    }
}

fn check_step(
    errors: &mut Vec<SpecError>,
    rollout: &Rollout,
    observed: &Observed,
    field: &str,
    step: &CanaryStep,
    router: bool,
) {
    let found = [
        step.set_weight.is_some(),
        step.pause.is_some(),
        step.set_canary_scale.is_some(),
        step.analysis.is_some(),
        step.set_header_route.is_some(),
        step.set_mirror_route.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count();
    if found != 1 {
        errors.push(SpecError::StepActionCount {
            field: field.to_string(),
            found,
        });
        return;
    }
    range(
        errors,
        &format!("{field}.setWeight"),
        step.set_weight,
        0,
        100,
    );
    if let Some(duration) = step
        .pause
        .as_ref()
        .and_then(|pause| pause.duration.as_ref())
    {
        if let Err(source) = duration.to_duration() {
            errors.push(SpecError::Duration {
                field: format!("{field}.pause.duration"),
                problem: source.to_string(),
            });
        }
    }
    if let Some(scale) = &step.set_canary_scale {
        let found = [
            scale.replicas.is_some(),
            scale.weight.is_some(),
            scale.match_traffic_weight,
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if found != 1 {
            errors.push(SpecError::ChoiceCount {
                field: format!("{field}.setCanaryScale"),
                choices: "replicas, weight, matchTrafficWeight",
                found,
            });
        }
        range(
            errors,
            &format!("{field}.setCanaryScale.replicas"),
            scale.replicas,
            0,
            i64::from(MAX_REPLICAS),
        );
        range(
            errors,
            &format!("{field}.setCanaryScale.weight"),
            scale.weight,
            0,
            100,
        );
    }
    if let Some(analysis) = &step.analysis {
        check_analysis(
            errors,
            rollout,
            observed,
            &format!("{field}.analysis"),
            analysis.into(),
        );
    }
    if let Some(route) = &step.set_header_route {
        if !router {
            errors.push(SpecError::NeedsTrafficRouting {
                field: format!("{field}.setHeaderRoute"),
            });
        }
        if route.name.is_empty() {
            errors.push(SpecError::Missing {
                field: format!("{field}.setHeaderRoute.name"),
            });
        }
    }
    if let Some(route) = &step.set_mirror_route {
        if !router {
            errors.push(SpecError::NeedsTrafficRouting {
                field: format!("{field}.setMirrorRoute"),
            });
        }
        if route.name.is_empty() {
            errors.push(SpecError::Missing {
                field: format!("{field}.setMirrorRoute.name"),
            });
        }
        range(
            errors,
            &format!("{field}.setMirrorRoute.percentage"),
            route.percentage,
            0,
            100,
        );
    }
}

/// Looks a template up in the observed snapshot.
pub(crate) fn lookup_template<'a>(
    observed: &'a Observed,
    reference: &AnalysisTemplateRef,
) -> Option<&'a Result<AnalysisTemplateSpec, String>> {
    observed.analysis_templates.get(&TemplateKey {
        name: reference.template_name.clone(),
        cluster_scope: reference.cluster_scope,
    })
}

/// Checks one analysis: each template reference on its own (all problems, by template), then, if those are
/// fine, the whole analysis through the run-spec builder (the first problem that would stop it starting).
fn check_analysis(
    errors: &mut Vec<SpecError>,
    rollout: &Rollout,
    observed: &Observed,
    field: &str,
    analysis: AnalysisRequest<'_>,
) {
    let before = errors.len();
    check_templates(errors, observed, field, analysis.templates, analysis.args);
    if errors.len() > before {
        return;
    }
    if let Err(source) = build_run_spec(
        analysis,
        &observed.analysis_templates,
        rollout,
        PLACEHOLDER_STABLE_HASH,
        PLACEHOLDER_CANARY_HASH,
    ) {
        let at = source.path_in(analysis, &observed.analysis_templates);
        errors.push(SpecError::AnalysisCannotStart {
            field: format!("{field}.{at}"),
            source,
        });
    }
}

fn check_templates(
    errors: &mut Vec<SpecError>,
    observed: &Observed,
    field: &str,
    templates: &[AnalysisTemplateRef],
    args: &[AnalysisArgument],
) {
    if templates.is_empty() {
        errors.push(SpecError::Missing {
            field: format!("{field}.templates"),
        });
    }
    let given: BTreeSet<&str> = args
        .iter()
        .filter(|arg| arg.value.is_some() || arg.value_from.is_some())
        .map(|arg| arg.name.as_str())
        .collect();
    for (index, reference) in templates.iter().enumerate() {
        let kind = if reference.cluster_scope {
            "ClusterAnalysisTemplate"
        } else {
            "AnalysisTemplate"
        };
        let item = format!("{field}.templates[{index}]");
        match lookup_template(observed, reference) {
            None => errors.push(SpecError::TemplateNotFound {
                field: item,
                kind,
                name: reference.template_name.clone(),
            }),
            Some(Err(reason)) => errors.push(SpecError::TemplateUnusable {
                field: item,
                kind,
                name: reference.template_name.clone(),
                reason: reason.clone(),
            }),
            Some(Ok(template)) => {
                if template.metrics.is_empty() {
                    errors.push(SpecError::TemplateUnusable {
                        field: item,
                        kind,
                        name: reference.template_name.clone(),
                        reason: "it has no metrics".into(),
                    });
                }
                for declared in &template.args {
                    let has_default = declared.value.is_some() || declared.value_from.is_some();
                    if !has_default && !given.contains(declared.name.as_str()) {
                        errors.push(SpecError::ArgumentMissing {
                            field: format!("{field}.args"),
                            arg: declared.name.clone(),
                            template: reference.template_name.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// maxSurge and maxUnavailable: at most [`MAX_REPLICAS`] pods or 100%.
fn int_or_percent_bound(errors: &mut Vec<SpecError>, field: &str, value: Option<&IntOrString>) {
    let too_large = match value {
        Some(IntOrString::Int(pods)) => *pods > MAX_REPLICAS,
        Some(IntOrString::String(text)) => {
            let trimmed = text.trim();
            match trimmed.strip_suffix('%') {
                Some(percent) => percent.parse::<u64>().is_ok_and(|p| p > 100),
                None => trimmed
                    .parse::<u64>()
                    .is_ok_and(|pods| pods > MAX_REPLICAS.unsigned_abs().into()),
            }
        }
        None => false,
    };
    if let (true, Some(value)) = (too_large, value) {
        let (shown, max) = match value {
            IntOrString::String(text) if text.trim().ends_with('%') => (text.clone(), "100%"),
            IntOrString::String(text) => (text.clone(), "100000 pods"),
            IntOrString::Int(pods) => (pods.to_string(), "100000 pods"),
        };
        errors.push(SpecError::TooLarge {
            field: field.to_string(),
            value: shown,
            max: max.to_string(),
        });
    }
}

/// The Services this Rollout names, with the field that names each.
fn named_services(rollout: &Rollout) -> Vec<(String, &str)> {
    let strategy = &rollout.spec.strategy;
    let mut out = Vec::new();
    if let Some(canary) = &strategy.canary {
        for (field, name) in [
            ("stableService", &canary.stable_service),
            ("canaryService", &canary.canary_service),
        ] {
            if let Some(name) = name.as_deref().filter(|n| !n.is_empty()) {
                out.push((format!("spec.strategy.canary.{field}"), name));
            }
        }
    }
    if let Some(blue_green) = &strategy.blue_green {
        for (field, name) in [
            ("activeService", Some(&blue_green.active_service)),
            ("previewService", blue_green.preview_service.as_ref()),
        ] {
            if let Some(name) = name.map(String::as_str).filter(|n| !n.is_empty()) {
                out.push((format!("spec.strategy.blueGreen.{field}"), name));
            }
        }
    }
    out
}

/// What two Rollouts of one namespace must not share: a Service (each pins its selector to its own pods)
/// and pods (each scales only its own ReplicaSets, but Services and the traffic ratio count pods by
/// selector). The older Rollout keeps what both claim; the newer one gets the error and changes nothing.
fn check_neighbours(errors: &mut Vec<SpecError>, rollout: &Rollout, observed: &Observed) {
    let older = || observed.neighbours.iter().filter(|n| n.older);
    for (field, name) in named_services(rollout) {
        if let Some(other) = older().find(|n| n.services.iter().any(|s| s == name)) {
            errors.push(SpecError::ServiceShared {
                field,
                name: name.to_string(),
                other: other.name.clone(),
            });
        }
    }
    let labels = rollout
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    if let Some(other) = older()
        .find(|n| selects(&rollout.spec.selector, &n.pod_labels) || selects(&n.selector, &labels))
    {
        errors.push(SpecError::SelectorOverlap {
            field: "spec.selector".into(),
            other: other.name.clone(),
        });
    }
}

/// Whether `selector` selects an object with `labels`. An empty selector selects nothing here: it is an
/// error of its own Rollout, not a claim on every pod.
pub(crate) fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector.match_labels.clone().unwrap_or_default();
    let expressions = selector.match_expressions.clone().unwrap_or_default();
    if match_labels.is_empty() && expressions.is_empty() {
        return false;
    }
    match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
        && expressions.iter().all(|expression| {
            let values = expression.values.clone().unwrap_or_default();
            let actual = labels.get(&expression.key);
            match expression.operator.as_str() {
                "In" => actual.is_some_and(|v| values.contains(v)),
                "NotIn" => actual.is_none_or(|v| !values.contains(v)),
                "Exists" => actual.is_some(),
                "DoesNotExist" => actual.is_none(),
                _ => false,
            }
        })
}

fn check_selector(errors: &mut Vec<SpecError>, rollout: &Rollout) {
    let selector: &LabelSelector = &rollout.spec.selector;
    let match_labels = selector.match_labels.clone().unwrap_or_default();
    let expressions = selector.match_expressions.clone().unwrap_or_default();
    if match_labels.is_empty() && expressions.is_empty() {
        errors.push(SpecError::EmptySelector {
            field: "spec.selector".into(),
        });
        return;
    }
    let labels = rollout
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    let field = "spec.template.metadata.labels".to_string();
    for (key, value) in &match_labels {
        if labels.get(key) != Some(value) {
            errors.push(SpecError::SelectorMismatch {
                field: field.clone(),
                requirement: format!("{key}={value}"),
            });
        }
    }
    for (index, expression) in expressions.iter().enumerate() {
        let values = expression.values.clone().unwrap_or_default();
        let actual = labels.get(&expression.key);
        let holds = match expression.operator.as_str() {
            "In" => actual.is_some_and(|v| values.contains(v)),
            "NotIn" => actual.is_none_or(|v| !values.contains(v)),
            "Exists" => actual.is_some(),
            "DoesNotExist" => actual.is_none(),
            other => {
                errors.push(SpecError::SelectorOperator {
                    field: format!("spec.selector.matchExpressions[{index}].operator"),
                    operator: other.to_string(),
                });
                continue;
            }
        };
        if !holds {
            errors.push(SpecError::SelectorMismatch {
                field: field.clone(),
                requirement: format!(
                    "{} {} ({})",
                    expression.key,
                    expression.operator,
                    values.join(",")
                ),
            });
        }
    }
}

#[cfg(test)]
mod tenant_tests {
    use super::*;
    use crate::strategy::Neighbour;
    use serde_json::json;

    fn rollout(edit: impl FnOnce(&mut serde_json::Value)) -> Rollout {
        let mut manifest = json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "b", "namespace": "shop"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "b"}},
                "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "app", "image": "b:1"}]}},
                "strategy": {"canary": {"stableService": "b", "canaryService": "b-canary"}}
            }
        });
        edit(&mut manifest);
        serde_json::from_value(manifest).expect("valid rollout")
    }

    fn observed(neighbours: Vec<Neighbour>) -> Observed {
        let mut observed = Observed {
            neighbours,
            ..Default::default()
        };
        for name in ["b", "b-canary"] {
            observed.services.insert(name.into(), Default::default());
        }
        observed
    }

    fn neighbour(older: bool, services: &[&str], app: &str) -> Neighbour {
        Neighbour {
            name: "a".into(),
            older,
            services: services.iter().map(|s| s.to_string()).collect(),
            selector: serde_json::from_value(json!({"matchLabels": {"app": app}}))
                .expect("selector"),
            pod_labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    fn fields(rollout: &Rollout, observed: &Observed) -> Vec<String> {
        validate(rollout, observed)
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| format!("{} {}", e.field(), e.category()))
            .collect()
    }

    #[test]
    fn only_an_older_rollout_keeps_a_shared_service_or_overlapping_pods() {
        let b = rollout(|_| {});
        let older = observed(vec![neighbour(true, &["b"], "b")]);
        assert_eq!(
            fields(&b, &older),
            [
                "spec.strategy.canary.stableService service_shared",
                "spec.selector selector_overlap"
            ]
        );
        let newer = observed(vec![neighbour(false, &["b"], "b")]);
        assert!(
            fields(&b, &newer).is_empty(),
            "the older Rollout keeps going"
        );
        let apart = observed(vec![neighbour(true, &["a"], "a")]);
        assert!(fields(&b, &apart).is_empty());
    }

    #[test]
    fn a_squatted_replica_set_name_is_an_invalid_template() {
        let observed = Observed {
            foreign_replica_set: Some("b-abc".into()),
            ..observed(Vec::new())
        };
        assert_eq!(
            fields(&rollout(|_| {}), &observed),
            ["spec.template name_taken"]
        );
    }

    #[test]
    fn counts_past_the_bounds_are_refused_naming_the_field() {
        let many = rollout(|m| {
            m["spec"]["strategy"]["canary"]["steps"] = serde_json::Value::Array(
                (0..=MAX_STEPS).map(|_| json!({"setWeight": 200})).collect(),
            );
        });
        // One error for the count, none per step: 100,000 messages would not fit in a status.
        assert_eq!(
            fields(&many, &observed(Vec::new()))
                .first()
                .map(String::as_str),
            Some("spec.strategy.canary.steps too_many_steps")
        );
        assert_eq!(fields(&many, &observed(Vec::new())).len(), 1 + MAX_STEPS);
        for (field, value, expected) in [
            (
                "maxSurge",
                json!("101%"),
                "spec.strategy.canary.maxSurge too_large",
            ),
            (
                "maxSurge",
                json!(MAX_REPLICAS + 1),
                "spec.strategy.canary.maxSurge too_large",
            ),
            (
                "maxUnavailable",
                json!("100001"),
                "spec.strategy.canary.maxUnavailable too_large",
            ),
        ] {
            let bad = rollout(|m| m["spec"]["strategy"]["canary"][field] = value);
            assert!(
                fields(&bad, &observed(Vec::new())).contains(&expected.to_string()),
                "{expected}"
            );
        }
        let fine = rollout(|m| m["spec"]["strategy"]["canary"]["maxSurge"] = json!("100%"));
        assert!(fields(&fine, &observed(Vec::new())).is_empty());
        let replicas = rollout(|m| m["spec"]["replicas"] = json!(MAX_REPLICAS + 1));
        assert_eq!(
            fields(&replicas, &observed(Vec::new())),
            ["spec.replicas out_of_range"]
        );
    }
}
