//! The planner's working state for one reconcile: the inputs, the actions decided so far, and the view of
//! the cluster as it will be once those actions are applied.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::types::{
    Action, AnalysisPurpose, Observed, ObservedAnalysisRun, ObservedReplicaSet, PlannedEvent,
};
use super::types::{DesiredTraffic, ObservedTraffic};
use crate::crd::labels::POD_TEMPLATE_HASH;
use crate::crd::rollout::{
    AnalysisArgument, AnalysisRunRef, AnalysisStatus, AnalysisTemplateRef, RevisionRef,
    ScaleDownDeadline,
};
use crate::crd::{Rollout, RolloutStatus};

/// AnalysisRuns of revisions that are neither stable nor canary kept for inspection.
pub(crate) const OLD_ANALYSIS_RUNS_KEPT: usize = 5;
/// How often to look again while waiting for the router to report a weight we set.
pub(crate) const ROUTER_FOLLOW_UP_SECS: i64 = 5;

/// Inputs of one reconcile.
pub(crate) struct Ctx<'a> {
    pub rollout: &'a Rollout,
    pub name: String,
    pub observed: &'a Observed,
    pub now: Timestamp,
    pub now_s: i64,
    pub prev: RolloutStatus,
    /// `spec.replicas` (default 1).
    pub replicas: i32,
    /// Pod-template hash of `spec.template`.
    pub hash: String,
}

impl<'a> Ctx<'a> {
    /// Time stamps are whole seconds, as the API server stores them, so a re-plan from stored status
    /// sees exactly what this plan wrote.
    pub(crate) fn stamp(&self) -> Time {
        Time(Timestamp::from_second(self.now_s).unwrap_or(self.now))
    }

    /// The live (not deleting) ReplicaSet of a hash, or else a deleting one.
    pub(crate) fn rs(&self, hash: &str) -> Option<&'a ObservedReplicaSet> {
        let mut candidates = self
            .observed
            .replica_sets
            .iter()
            .filter(|rs| rs.pod_template_hash == hash);
        let all: Vec<&ObservedReplicaSet> = candidates.by_ref().collect();
        all.iter()
            .find(|rs| !rs.deleting)
            .or_else(|| all.first())
            .copied()
    }

    pub(crate) fn rs_name(&self, hash: &str) -> String {
        format!("{}-{}", self.name, hash)
    }

    pub(crate) fn max_revision(&self) -> i64 {
        let observed = self
            .observed
            .replica_sets
            .iter()
            .map(|rs| rs.revision)
            .max()
            .unwrap_or(0);
        let stable = self
            .prev
            .stable_revision
            .as_ref()
            .map(|r| r.revision)
            .unwrap_or(0);
        let canary = self
            .prev
            .canary_revision
            .as_ref()
            .map(|r| r.revision)
            .unwrap_or(0);
        observed.max(stable).max(canary)
    }

    /// The revision a template gets when it becomes the newest: a ReplicaSet that already carries the
    /// highest revision keeps it (a plan whose status was not written), anything else gets max + 1.
    pub(crate) fn next_revision_for(&self, hash: &str) -> i64 {
        let max = self.max_revision();
        match self.rs(hash) {
            Some(rs) if rs.revision == max && max > 0 && !self.others_have_revision(hash, max) => {
                max
            }
            _ => max + 1,
        }
    }

    fn others_have_revision(&self, hash: &str, revision: i64) -> bool {
        self.observed
            .replica_sets
            .iter()
            .any(|rs| rs.pod_template_hash != hash && rs.revision == revision)
            || self
                .prev
                .stable_revision
                .as_ref()
                .is_some_and(|r| r.pod_template_hash != hash && r.revision == revision)
    }

    /// Available pods of a hash's ReplicaSet that count: never more than its spec, and none while its status
    /// describes an older spec.
    pub(crate) fn available(&self, hash: &str) -> i32 {
        self.rs(hash)
            .filter(|rs| !rs.deleting)
            .map(|rs| rs.available_replicas.min(rs.spec_replicas).max(0))
            .unwrap_or(0)
    }

    pub(crate) fn ready(&self, hash: &str) -> i32 {
        self.rs(hash)
            .filter(|rs| !rs.deleting)
            .map(|rs| rs.ready_replicas.max(0))
            .unwrap_or(0)
    }

    /// The ReplicaSet is at `target` with all of it available, per a current status.
    pub(crate) fn fully_available(&self, hash: &str, target: i32) -> bool {
        self.rs(hash).is_some_and(|rs| {
            !rs.deleting
                && rs.status_current
                && rs.spec_replicas >= target
                && rs.available_replicas >= target
        })
    }

    /// The ReplicaSet is down to `target` pods, per a current status.
    pub(crate) fn shrunk_to(&self, hash: &str, target: i32) -> bool {
        match self.rs(hash) {
            None => target <= 0,
            Some(rs) => rs.status_current && rs.spec_replicas <= target && rs.replicas <= target,
        }
    }

    pub(crate) fn run(&self, name: &str) -> Option<&'a ObservedAnalysisRun> {
        self.observed
            .analysis_runs
            .iter()
            .find(|run| run.name == name)
    }

    pub(crate) fn deadline(&self, status: &RolloutStatus, hash: &str) -> Option<i64> {
        status
            .scale_down_deadlines
            .iter()
            .find(|d| d.pod_template_hash == hash)
            .map(|d| d.after.0.as_second())
    }
}

/// The cluster as it will be after the actions decided so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Projection {
    /// What the router carries, `None` when unknown (no router, or the router cannot be read).
    pub traffic: Option<ObservedTraffic>,
    /// Service name -> the hash its selector is pinned to.
    pub selectors: BTreeMap<String, Option<String>>,
    /// Hash -> `spec.replicas` of its ReplicaSet.
    pub rs_spec: BTreeMap<String, i32>,
}

/// What the planner has decided so far.
pub(crate) struct Out {
    pub actions: Vec<Action>,
    pub events: Vec<PlannedEvent>,
    pub requeue_at: Option<i64>,
    pub projected: Projection,
}

impl Out {
    pub(crate) fn new(observed: &Observed) -> Self {
        let mut world = Projection::default();
        for (name, service) in &observed.services {
            world.selectors.insert(
                name.clone(),
                service.selector.get(POD_TEMPLATE_HASH).cloned(),
            );
        }
        for rs in observed.replica_sets.iter().filter(|rs| !rs.deleting) {
            world
                .rs_spec
                .insert(rs.pod_template_hash.clone(), rs.spec_replicas);
        }
        if let Some(traffic) = observed.traffic.observed() {
            world.traffic = Some(traffic.clone());
        }
        Out {
            actions: Vec::new(),
            events: Vec::new(),
            requeue_at: None,
            projected: world,
        }
    }

    pub(crate) fn event(
        &mut self,
        warning: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) {
        self.events.push(PlannedEvent {
            warning,
            reason,
            message: message.into(),
        });
    }

    pub(crate) fn requeue_at(&mut self, at_s: i64) {
        self.requeue_at = Some(self.requeue_at.map_or(at_s, |current| current.min(at_s)));
    }

    pub(crate) fn requeue_after(&self, now_s: i64) -> Option<Duration> {
        self.requeue_at
            .map(|at| Duration::from_secs(u64::try_from((at - now_s).max(1)).unwrap_or(1)))
    }

    pub(crate) fn spec_of(&self, hash: &str) -> Option<i32> {
        self.projected.rs_spec.get(hash).copied()
    }

    pub(crate) fn set_selector(&mut self, service: Option<&str>, hash: Option<&str>) {
        let Some(service) = service else { return };
        let wanted = hash.map(str::to_string);
        if self.projected.selectors.get(service) != Some(&wanted) {
            self.actions.push(Action::SetServiceSelector {
                service: service.to_string(),
                pod_template_hash: wanted.clone(),
            });
            self.projected.selectors.insert(service.to_string(), wanted);
        }
    }

    pub(crate) fn scale(&mut self, ctx: &Ctx<'_>, hash: &str, replicas: i32) {
        let Some(rs) = ctx.rs(hash).filter(|rs| !rs.deleting) else {
            return;
        };
        if self.spec_of(hash) != Some(replicas) {
            self.actions.push(Action::ScaleReplicaSet {
                name: rs.name.clone(),
                replicas,
            });
            self.projected.rs_spec.insert(hash.to_string(), replicas);
        }
    }

    /// Creates the ReplicaSet of the current template when it does not exist; fixes its revision when it
    /// does. Returns false while an old copy is still being deleted.
    pub(crate) fn ensure_rs(
        &mut self,
        ctx: &Ctx<'_>,
        hash: &str,
        revision: i64,
        replicas: i32,
    ) -> bool {
        match ctx.rs(hash) {
            Some(rs) if rs.deleting => false,
            Some(rs) => {
                if rs.revision != revision {
                    self.actions.push(Action::SetRevision {
                        name: rs.name.clone(),
                        revision,
                    });
                }
                true
            }
            None => {
                let mut template = ctx.rollout.spec.template.clone();
                template
                    .metadata
                    .get_or_insert_with(Default::default)
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert(POD_TEMPLATE_HASH.to_string(), hash.to_string());
                self.actions.push(Action::CreateReplicaSet {
                    name: ctx.rs_name(hash),
                    pod_template_hash: hash.to_string(),
                    revision,
                    replicas,
                    template: Box::new(template.into()),
                });
                self.projected.rs_spec.insert(hash.to_string(), replicas);
                true
            }
        }
    }

    /// Emits SetTraffic when the router does not carry `desired` yet. Never when the router's state is
    /// unknown: a weight must not be written to a route that cannot be read.
    pub(crate) fn set_traffic(&mut self, desired: DesiredTraffic) {
        let Some(current) = &self.projected.traffic else {
            return;
        };
        let header: Vec<String> = desired
            .header_routes
            .iter()
            .map(|r| r.name.clone())
            .collect();
        let mirror: Vec<String> = desired
            .mirror_routes
            .iter()
            .map(|r| r.name.clone())
            .collect();
        if current.canary_weight != desired.canary_weight
            || current.header_routes != header
            || current.mirror_routes != mirror
        {
            self.projected.traffic = Some(ObservedTraffic {
                canary_weight: desired.canary_weight,
                header_routes: header,
                mirror_routes: mirror,
            });
            self.actions.push(Action::SetTraffic(desired));
        }
    }

    pub(crate) fn terminate_run(&mut self, ctx: &Ctx<'_>, name: &str) {
        if let Some(run) = ctx.run(name) {
            if !run.terminating && !run.phase.is_completed() {
                let action = Action::TerminateAnalysisRun {
                    name: name.to_string(),
                };
                if !self.actions.contains(&action) {
                    self.actions.push(action);
                }
            }
        }
    }
}

/// Where an analysis stands after this plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    /// Created in this plan, or still measuring.
    Waiting,
    Successful,
    /// Failed or errored, with the run's message.
    Failed(String),
    Inconclusive(String),
}

/// Which slot of `status.analysis` tracks a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunSlot {
    Current,
    Background,
}

/// Makes sure the analysis for `purpose` has a run and reports its state. The run's name is recorded in
/// status so that a retried analysis gets a fresh run instead of re-reading the old verdict.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ensure_run(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &mut RolloutStatus,
    slot: RunSlot,
    purpose: AnalysisPurpose,
    base_name: &str,
    templates: &[AnalysisTemplateRef],
    args: &[AnalysisArgument],
    stable_hash: &str,
) -> RunState {
    let analysis = status.analysis.get_or_insert_with(AnalysisStatus::default);
    let recorded = match slot {
        RunSlot::Current => analysis.current_run.clone(),
        RunSlot::Background => analysis.background_run.clone(),
    };
    let belongs = |name: &str| {
        name == base_name
            || name
                .strip_prefix(base_name)
                .is_some_and(|rest| rest.starts_with('-'))
    };
    let name = match recorded.filter(|r| belongs(&r.name)) {
        Some(reference) => reference.name,
        None => {
            // Adopt a run that is still measuring (created by a plan whose status was not written);
            // never adopt a finished one, which may be the verdict of an earlier attempt.
            let adoptable = ctx.observed.analysis_runs.iter().find(|run| {
                belongs(&run.name)
                    && run.pod_template_hash == ctx.hash
                    && !run.terminating
                    && !run.phase.is_completed()
            });
            match adoptable {
                Some(run) => run.name.clone(),
                None => fresh_run_name(ctx, base_name),
            }
        }
    };
    let state = match ctx.run(&name) {
        None => {
            let request = crate::analysis::AnalysisRequest { templates, args };
            match crate::analysis::build_run_spec(
                request,
                &ctx.observed.analysis_templates,
                ctx.rollout,
                stable_hash,
                &ctx.hash,
            ) {
                Ok(spec) => {
                    out.actions.push(Action::CreateAnalysisRun {
                        name: name.clone(),
                        purpose,
                        pod_template_hash: ctx.hash.clone(),
                        spec: Box::new(spec),
                    });
                    RunState::Waiting
                }
                Err(error) => RunState::Failed(format!("analysis {name} cannot start: {error}")),
            }
        }
        Some(run) => match run.phase {
            crate::crd::AnalysisPhase::Pending | crate::crd::AnalysisPhase::Running => {
                RunState::Waiting
            }
            crate::crd::AnalysisPhase::Successful => RunState::Successful,
            crate::crd::AnalysisPhase::Failed | crate::crd::AnalysisPhase::Error => {
                RunState::Failed(format!(
                    "analysis {name} {}: {}",
                    run.phase.as_str(),
                    run.message.clone().unwrap_or_default()
                ))
            }
            crate::crd::AnalysisPhase::Inconclusive => RunState::Inconclusive(format!(
                "analysis {name} is inconclusive: {}",
                run.message.clone().unwrap_or_default()
            )),
        },
    };
    let phase = ctx
        .run(&name)
        .map(|run| run.phase.as_str().to_string())
        .or_else(|| Some("Pending".to_string()));
    let reference = Some(AnalysisRunRef { name, phase });
    match slot {
        RunSlot::Current => analysis.current_run = reference,
        RunSlot::Background => analysis.background_run = reference,
    }
    state
}

fn fresh_run_name(ctx: &Ctx<'_>, base: &str) -> String {
    if ctx.run(base).is_none() {
        return base.to_string();
    }
    (2..1000)
        .map(|attempt| format!("{base}-{attempt}"))
        .find(|name| ctx.run(name).is_none())
        .unwrap_or_else(|| format!("{base}-{}", ctx.observed.analysis_runs.len() + 1))
}

/// Forgets the run of a slot (it ended, or a human moved past it) after asking it to stop.
pub(crate) fn release_run(ctx: &Ctx<'_>, out: &mut Out, status: &mut RolloutStatus, slot: RunSlot) {
    if let Some(analysis) = status.analysis.as_mut() {
        let reference = match slot {
            RunSlot::Current => analysis.current_run.take(),
            RunSlot::Background => analysis.background_run.take(),
        };
        if let Some(reference) = reference {
            out.terminate_run(ctx, &reference.name);
        }
    }
}

/// Stops every run of the current template that is still measuring.
pub(crate) fn terminate_runs_of(ctx: &Ctx<'_>, out: &mut Out, hash: &str) {
    for run in ctx
        .observed
        .analysis_runs
        .iter()
        .filter(|run| run.pod_template_hash == hash)
    {
        out.terminate_run(ctx, &run.name);
    }
}

/// Stops runs of revisions that are neither stable nor canary, and deletes finished ones beyond a small bound.
pub(crate) fn prune_runs(ctx: &Ctx<'_>, out: &mut Out, keep: &[&str]) {
    let revision_of = |hash: &str| ctx.rs(hash).map(|rs| rs.revision).unwrap_or(0);
    let mut old: Vec<&ObservedAnalysisRun> = ctx
        .observed
        .analysis_runs
        .iter()
        .filter(|run| !keep.contains(&run.pod_template_hash.as_str()))
        .collect();
    for run in &old {
        out.terminate_run(ctx, &run.name);
    }
    old.sort_by(|a, b| {
        revision_of(&b.pod_template_hash)
            .cmp(&revision_of(&a.pod_template_hash))
            .then(a.name.cmp(&b.name))
    });
    for run in old.iter().skip(OLD_ANALYSIS_RUNS_KEPT) {
        if run.phase.is_completed() || run.terminating {
            out.actions
                .push(crate::strategy::types::Action::DeleteAnalysisRun {
                    name: run.name.clone(),
                });
        }
    }
}

/// Adds a scale-down deadline for a hash unless one is already running.
pub(crate) fn add_deadline(ctx: &Ctx<'_>, status: &mut RolloutStatus, hash: &str, delay_secs: i64) {
    if status
        .scale_down_deadlines
        .iter()
        .any(|d| d.pod_template_hash == hash)
    {
        return;
    }
    let after = Timestamp::from_second(ctx.now_s + delay_secs.max(0)).unwrap_or(ctx.now);
    status.scale_down_deadlines.push(ScaleDownDeadline {
        pod_template_hash: hash.to_string(),
        after: Time(after),
    });
}

pub(crate) fn remove_deadline(status: &mut RolloutStatus, hash: &str) {
    status
        .scale_down_deadlines
        .retain(|d| d.pod_template_hash != hash);
}

/// Scales a ReplicaSet that waits for its deadline: held before it, to zero after it.
/// Returns true when it is (or now goes) to zero.
pub(crate) fn scale_after_deadline(
    ctx: &Ctx<'_>,
    out: &mut Out,
    status: &RolloutStatus,
    hash: &str,
    hold: bool,
) -> bool {
    let due = ctx.deadline(status, hash).unwrap_or(ctx.now_s);
    if hold || due > ctx.now_s {
        if !hold {
            out.requeue_at(due);
        }
        return out.spec_of(hash).unwrap_or(0) == 0;
    }
    out.scale(ctx, hash, 0);
    true
}

/// Deletes ReplicaSets at zero beyond `revisionHistoryLimit`, oldest revision first.
pub(crate) fn prune_history(ctx: &Ctx<'_>, out: &mut Out, status: &RolloutStatus, keep: &[&str]) {
    let limit =
        usize::try_from(ctx.rollout.spec.revision_history_limit.unwrap_or(10).max(0)).unwrap_or(10);
    let mut idle: Vec<&ObservedReplicaSet> = ctx
        .observed
        .replica_sets
        .iter()
        .filter(|rs| {
            !rs.deleting
                && !keep.contains(&rs.pod_template_hash.as_str())
                && out.spec_of(&rs.pod_template_hash) == Some(0)
                && rs.spec_replicas == 0
                && rs.replicas == 0
                && !status
                    .scale_down_deadlines
                    .iter()
                    .any(|d| d.pod_template_hash == rs.pod_template_hash)
        })
        .collect();
    idle.sort_by(|a, b| a.revision.cmp(&b.revision).then(a.name.cmp(&b.name)));
    let excess = idle.len().saturating_sub(limit);
    for rs in idle.into_iter().take(excess) {
        out.actions.push(Action::DeleteReplicaSet {
            name: rs.name.clone(),
        });
    }
}

/// Drops deadlines whose ReplicaSet is gone or already at zero.
pub(crate) fn tidy_deadlines(ctx: &Ctx<'_>, out: &Out, status: &mut RolloutStatus) {
    status.scale_down_deadlines.retain(|d| {
        ctx.rs(&d.pod_template_hash).is_some() && out.spec_of(&d.pod_template_hash).unwrap_or(0) > 0
    });
}

/// Which version is stable, as the status records it and the ReplicaSets show it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Stable {
    /// The recorded stable version has its ReplicaSet (or is the current template, which can recreate it).
    Known(String),
    /// No stable version is recorded: the current template becomes stable without steps.
    First,
    /// The status names a stable version whose ReplicaSet is not observed (deleted, unlabelled, or not yet
    /// in the cache) while the template is another version. Its pod template is lost, so nothing may move:
    /// making the current template stable here would promote an unproven version (safety rule 9).
    Missing(RevisionRef),
}

/// Resolves the stable version; never promotes the current template while another stable is recorded.
pub(crate) fn resolve_stable(ctx: &Ctx<'_>, status: &RolloutStatus) -> Stable {
    match status.stable_revision.clone() {
        None => Stable::First,
        Some(stable) if stable.pod_template_hash == ctx.hash => {
            Stable::Known(stable.pod_template_hash)
        }
        Some(stable)
            if ctx
                .rs(&stable.pod_template_hash)
                .is_some_and(|rs| !rs.deleting) =>
        {
            Stable::Known(stable.pod_template_hash)
        }
        Some(stable) => Stable::Missing(stable),
    }
}

/// A missing stable is accepted only when a human asks for it: `promote --full` makes the current template
/// stable (the one way forward once the stable's pod template is lost), with an event saying so.
pub(crate) fn accept_missing_stable(
    out: &mut Out,
    stable: Stable,
    commands: &crate::crd::rollout::ManualCommands,
) -> Stable {
    match stable {
        Stable::Missing(missing)
            if commands.promote == Some(crate::crd::rollout::PromoteCommand::Full) =>
        {
            out.event(
                true,
                crate::crd::reason::PROMOTED_FULL,
                format!(
                    "stable revision {} ({}) has no ReplicaSet; full promotion makes the current template stable",
                    missing.revision, missing.pod_template_hash
                ),
            );
            Stable::First
        }
        other => other,
    }
}

/// The revision record of a hash's ReplicaSet.
pub(crate) fn revision_ref(ctx: &Ctx<'_>, hash: &str) -> RevisionRef {
    RevisionRef {
        pod_template_hash: hash.to_string(),
        revision: ctx.rs(hash).map(|rs| rs.revision).unwrap_or(0),
    }
}

/// Pins a Service to `hash`, unless `hold` and the Service still reaches available pods of another version.
pub(crate) fn pin_unless_serving_elsewhere(
    ctx: &Ctx<'_>,
    out: &mut Out,
    service: Option<&str>,
    hash: &str,
    hold: bool,
) {
    let Some(name) = service else { return };
    if hold {
        let serving_elsewhere = match out.projected.selectors.get(name).cloned().flatten() {
            Some(current) => current != hash && ctx.available(&current) > 0,
            None => ctx.observed.replica_sets.iter().any(|rs| {
                rs.pod_template_hash != hash && !rs.deleting && rs.available_replicas > 0
            }),
        };
        if serving_elsewhere {
            return;
        }
    }
    out.set_selector(Some(name), Some(hash));
}

/// Hashes of live ReplicaSets that are neither of `roles`, oldest revision first.
pub(crate) fn others<'a>(ctx: &Ctx<'a>, roles: &[&str]) -> Vec<&'a ObservedReplicaSet> {
    let mut list: Vec<&ObservedReplicaSet> = ctx
        .observed
        .replica_sets
        .iter()
        .filter(|rs| !rs.deleting && !roles.contains(&rs.pod_template_hash.as_str()))
        .collect();
    list.sort_by(|a, b| a.revision.cmp(&b.revision).then(a.name.cmp(&b.name)));
    list
}
