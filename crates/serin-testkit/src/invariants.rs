//! Safety invariants of a canary Rollout under faults, written once and checked at every poll of every fault
//! scenario: traffic is carried by ready pods, the stable keeps the pods its share needs, a revision becomes
//! stable only after its steps and analysis, an abort moves the weight before anything else, only the Lease
//! holder writes, a manual command acts once, and the Rollout converges once the faults stop. A broken
//! invariant panics with everything the poll saw.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client, ResourceExt};
use serin::crd::{labels, AnalysisPhase, AnalysisRun, CanaryStep, RolloutPhase};
use serin::ops::ManualCommand;
use serin::strategy::replicas::{canary_pods_needed, pods_for_weight};
use serin::strategy::ObservedReplicaSet;
use serin_sim::RequestRecord;

use crate::{is_write, writes_without_the_lease, State, World, CONTROLLER_USER, NS};

/// Time between two polls: short enough to see every step, long enough to leave the sim some CPU.
pub const POLL_EVERY: Duration = Duration::from_millis(40);
/// Upper bound on the polls of one wait, whatever the clock says.
pub const MAX_POLLS: u32 = 3_000;
/// How long Serin has to correct what a fault outside its control broke (pods turning unready, a Git
/// re-apply, a new replica count) before the invariants hold strictly again.
pub const REACTION: Duration = Duration::from_secs(5);
/// A weight raised this soon after a disruption may have been decided before Serin could see it (a canary
/// pod turned ready, Serin raised the weight, and the scenario forced that pod unready while the route
/// write was on its way): such a raise counts as a violation to correct within [`REACTION`], not as a
/// decision against what Serin saw.
pub const IN_FLIGHT: Duration = Duration::from_secs(2);

/// How long the pods a scale-up adds may take to start (the sim's kubelet on a loaded machine).
pub const POD_START: Duration = Duration::from_secs(20);
/// Once the faults stop, the Rollout is Healthy or Aborted within this long (invariant 7).
pub const CONVERGENCE: Duration = Duration::from_secs(30);

/// The Rollout a scenario watches and the objects that carry its traffic.
#[derive(Clone, Debug)]
pub struct Target {
    pub rollout: String,
    pub stable_service: String,
    pub canary_service: String,
    /// The HTTPRoute whose backendRef weights Serin manages; None without a traffic router.
    pub route: Option<String>,
}

impl Target {
    /// Rollout `name` with Services `name` and `name-canary` and no router.
    pub fn plain(name: &str) -> Target {
        Target {
            rollout: name.to_string(),
            stable_service: name.to_string(),
            canary_service: format!("{name}-canary"),
            route: None,
        }
    }

    /// Like [`Target::plain`], with the HTTPRoute `name`.
    pub fn routed(name: &str) -> Target {
        Target {
            route: Some(name.to_string()),
            ..Target::plain(name)
        }
    }
}

/// The weights of the stable and canary backendRefs in the route rule Serin manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteWeights {
    pub stable: i64,
    pub canary: i64,
}

impl RouteWeights {
    /// Percent of the rule's traffic each Service receives: (stable, canary).
    pub fn percents(&self) -> (f64, f64) {
        let total = self.stable.max(0) + self.canary.max(0);
        if total == 0 {
            return (0.0, 0.0);
        }
        let share = |weight: i64| weight.max(0) as f64 * 100.0 / total as f64;
        (share(self.stable), share(self.canary))
    }
}

/// What an invariant needs to know about one AnalysisRun.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub name: String,
    pub hash: String,
    pub phase: Option<AnalysisPhase>,
    pub terminated: bool,
    pub successful: i32,
    /// Failed, errored and inconclusive measurements.
    pub unsuccessful: i32,
    pub message: Option<String>,
}

impl RunSummary {
    fn of(run: &AnalysisRun) -> RunSummary {
        let status = run.status.clone().unwrap_or_default();
        let sum = |count: fn(&serin::crd::MetricResult) -> i32| -> i32 {
            status.metric_results.iter().map(count).sum()
        };
        RunSummary {
            name: run.name_any(),
            hash: run
                .labels()
                .get(labels::POD_TEMPLATE_HASH)
                .cloned()
                .unwrap_or_default(),
            phase: status.phase,
            terminated: run.spec.terminate,
            successful: sum(|r| r.successful),
            unsuccessful: sum(|r| r.failed + r.error + r.inconclusive),
            message: status.message.clone(),
        }
    }

    /// Successful, or still measuring (a background run the promotion terminates) with nothing but
    /// successful measurements so far and at least one of them.
    pub fn allows_promotion(&self) -> bool {
        match self.phase {
            Some(AnalysisPhase::Successful) => true,
            Some(AnalysisPhase::Running) | Some(AnalysisPhase::Pending) | None => {
                self.unsuccessful == 0 && self.successful > 0
            }
            _ => false,
        }
    }
}

/// Everything one poll saw. The route is read first: Serin raises a weight only once the pods are ready,
/// so pods read after a raised weight are at least that ready, and a poll never blames Serin for a race of
/// its own reads.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub route: Option<RouteWeights>,
    pub state: State,
    pub runs: Vec<RunSummary>,
}

/// The HTTPRoutes of the test namespace.
pub fn http_routes(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    Api::namespaced_with(client.clone(), NS, &resource)
}

/// The weights of the rule that has a backendRef to `stable` (a missing weight is 1, as in Gateway API).
pub fn managed_weights(route: &DynamicObject, stable: &str, canary: &str) -> Option<RouteWeights> {
    let rules = route.data["spec"]["rules"].as_array()?;
    let refs = rules.iter().find_map(|rule| {
        let refs = rule["backendRefs"].as_array()?;
        refs.iter()
            .any(|backend| backend["name"] == stable)
            .then_some(refs)
    })?;
    let weight_of = |name: &str| {
        refs.iter()
            .find(|backend| backend["name"] == name)
            .map_or(0, |backend| backend["weight"].as_i64().unwrap_or(1))
    };
    Some(RouteWeights {
        stable: weight_of(stable),
        canary: weight_of(canary),
    })
}

/// Reads the route, then the Rollout with its ReplicaSets and Services, then its AnalysisRuns.
pub async fn snapshot(world: &World, target: &Target) -> Snapshot {
    let route = match &target.route {
        Some(name) => http_routes(&world.admin)
            .get_opt(name)
            .await
            .expect("read the HTTPRoute")
            .and_then(|route| {
                managed_weights(&route, &target.stable_service, &target.canary_service)
            }),
        None => None,
    };
    let mut state = world.state(&target.rollout).await;
    // Who wrote which field says nothing about safety and buries the rest of a failure report.
    state.rollout.metadata.managed_fields = None;
    let runs = Api::<AnalysisRun>::namespaced(world.admin.clone(), NS)
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            labels::ROLLOUT_NAME,
            target.rollout
        )))
        .await
        .expect("list AnalysisRuns")
        .items
        .iter()
        .map(RunSummary::of)
        .collect();
    Snapshot { route, state, runs }
}

/// The pod-template hash of a ReplicaSet: its label, or, when the label was removed, its name's suffix (its
/// pods keep the label, so they still carry traffic).
pub fn hash_of(rollout: &str, rs: &ObservedReplicaSet) -> String {
    if !rs.pod_template_hash.is_empty() {
        return rs.pod_template_hash.clone();
    }
    rs.name
        .strip_prefix(&format!("{rollout}-"))
        .unwrap_or_default()
        .to_string()
}

/// Ready pods of the ReplicaSets of `hash`.
pub fn ready_of(target: &Target, state: &State, hash: &str) -> i32 {
    state
        .replica_sets
        .iter()
        .filter(|rs| hash_of(&target.rollout, rs) == hash)
        .map(|rs| rs.ready_replicas)
        .sum()
}

/// Where the Rollout's traffic goes: the percent each pod-template hash receives through the route
/// weights (or, without a router, the stable Service alone) and the Services' selectors, and the Services
/// that receive traffic with no ready pod behind them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub by_hash: BTreeMap<String, f64>,
    pub unserved: Vec<(String, f64)>,
}

impl Traffic {
    pub fn of(&self, hash: &str) -> f64 {
        self.by_hash.get(hash).copied().unwrap_or(0.0)
    }
}

pub fn traffic(target: &Target, snap: &Snapshot) -> Traffic {
    let state = &snap.state;
    let services: Vec<(&str, f64)> = match (&target.route, snap.route) {
        (Some(_), Some(weights)) => {
            let (stable, canary) = weights.percents();
            vec![
                (target.stable_service.as_str(), stable),
                (target.canary_service.as_str(), canary),
            ]
        }
        // A router whose route is missing sends nothing anywhere Serin could be blamed for.
        (Some(_), None) => Vec::new(),
        (None, _) => vec![(target.stable_service.as_str(), 100.0)],
    };
    let mut result = Traffic::default();
    for (service, percent) in services {
        if percent <= 0.0 || !state.selectors.contains_key(service) {
            continue;
        }
        let pinned = state.selector_hash(service);
        let behind: Vec<(String, i32)> = state
            .replica_sets
            .iter()
            .map(|rs| (hash_of(&target.rollout, rs), rs.ready_replicas.max(0)))
            .filter(|(hash, _)| pinned.as_deref().is_none_or(|p| p == hash))
            .collect();
        let total: i32 = behind.iter().map(|(_, ready)| ready).sum();
        if total == 0 {
            result.unserved.push((service.to_string(), percent));
            continue;
        }
        for (hash, ready) in behind {
            *result.by_hash.entry(hash).or_default() +=
                percent * f64::from(ready) / f64::from(total);
        }
    }
    result
}

/// Ready pods `total` replicas need to carry `percent` of the traffic: [`canary_pods_needed`] for the
/// canary, [`pods_for_weight`] for the others, computed exactly when the percent is not whole (a share of
/// pods behind an unpinned Service).
pub fn pods_needed(total: i32, percent: f64, canary: bool) -> i32 {
    if percent <= 1e-9 {
        return 0;
    }
    let whole = percent.round();
    if (percent - whole).abs() < 1e-6 {
        let weight = whole as i32;
        return if canary {
            canary_pods_needed(total, weight)
        } else {
            pods_for_weight(total, weight)
        };
    }
    let exact = (f64::from(total.max(0)) * percent / 100.0 - 1e-6).ceil() as i32;
    if canary {
        exact.max(1)
    } else {
        exact
    }
}

/// Indefinite pauses are where a canary waits for a human; every other step goes on by itself.
fn waits_for_promote(step: &CanaryStep) -> bool {
    step.pause.as_ref().is_some_and(|p| p.duration.is_none())
}

/// The first step at or after `from` that waits for a promote, or the number of steps (promotion).
pub fn next_stop(steps: &[CanaryStep], from: i32) -> i32 {
    let len = i32::try_from(steps.len()).unwrap_or(i32::MAX);
    (from.max(0)..len)
        .find(|&i| waits_for_promote(&steps[i as usize]))
        .unwrap_or(len)
}

/// The weight the steps up to `index` ask for at most; 100 at the promotion.
pub fn weight_up_to(steps: &[CanaryStep], index: i32) -> f64 {
    if index >= i32::try_from(steps.len()).unwrap_or(i32::MAX) {
        return 100.0;
    }
    steps
        .iter()
        .take(usize::try_from(index.max(0)).unwrap_or(0) + 1)
        .filter_map(|step| step.set_weight)
        .max()
        .map_or(0.0, f64::from)
}

fn steps_of(state: &State) -> Vec<CanaryStep> {
    state
        .rollout
        .spec
        .strategy
        .canary
        .as_ref()
        .map(|c| c.steps.clone())
        .unwrap_or_default()
}

fn len_of(steps: &[CanaryStep]) -> i32 {
    i32::try_from(steps.len()).unwrap_or(i32::MAX)
}

/// What the commands issued so far allow the canary under way to do.
#[derive(Clone, Debug)]
struct Model {
    canary: String,
    steps: Vec<CanaryStep>,
    /// The highest step index the commands allow; the number of steps allows the promotion.
    limit: i32,
    /// The highest step index seen: steps move forward only, except on a retry or new steps.
    highest: i32,
    /// The canary was seen at its last step with a current status.
    at_last_step: bool,
}

impl Model {
    fn start(canary: &str, steps: Vec<CanaryStep>) -> Model {
        Model {
            canary: canary.to_string(),
            limit: next_stop(&steps, 0),
            steps,
            highest: 0,
            at_last_step: false,
        }
    }
}

/// What a poll found wrong; `strict` ones fail even while Serin is given time to react to a disruption.
struct Violation {
    invariant: u8,
    strict: bool,
    message: String,
}

/// An abort the test issued: what the abort-order check (invariant 4) needs.
#[derive(Clone, Debug)]
pub struct AbortMark {
    pub since: SystemTime,
    /// The canary's route weight when the abort was sent.
    pub route_canary_weight: Option<i64>,
    /// Whether the stable Service already selected only the stable pods.
    pub stable_service_pinned: bool,
    /// The canary ReplicaSet's name.
    pub canary_rs: String,
}

/// The invariants of one Rollout across a scenario. Call [`Invariants::poll`] (or the waits built on it) as
/// the scenario goes, note every command through [`Invariants::command`] and every fault outside Serin's
/// control through [`Invariants::disrupt`], and end with [`Invariants::finish`].
pub struct Invariants {
    pub target: Target,
    /// Users whose writes are Serin's (the controller, or each replica under leader election).
    pub writers: Vec<String>,
    /// Checks invariant 5 in [`Invariants::finish`] with this Lease duration.
    lease_duration: Option<Duration>,
    /// Why invariant 2 is not checked (the scenario removes the stable's pods on purpose).
    stable_exempt: Option<String>,
    grace_until: Option<Instant>,
    disrupted_at: Option<Instant>,
    /// The replica count before the last scale-up, and when it came.
    scaled_up: Option<(i32, Instant)>,
    disruptions: Vec<String>,
    pub polls: u64,
    pub tolerated: u64,
    model: Option<Model>,
    stable: Option<String>,
    promoted_full: BTreeSet<String>,
    previous_allowance: Option<f64>,
    previous_route_canary: Option<f64>,
    abort_ceiling: Option<f64>,
    aborts: Vec<AbortMark>,
    /// Traffic is checked once the Rollout first was Healthy: before that no version serves anyone.
    serving: bool,
}

impl Invariants {
    pub fn new(target: Target) -> Invariants {
        Invariants {
            target,
            writers: vec![CONTROLLER_USER.to_string()],
            lease_duration: None,
            stable_exempt: None,
            grace_until: None,
            disrupted_at: None,
            scaled_up: None,
            disruptions: Vec::new(),
            polls: 0,
            tolerated: 0,
            model: None,
            stable: None,
            promoted_full: BTreeSet::new(),
            previous_allowance: None,
            previous_route_canary: None,
            abort_ceiling: None,
            aborts: Vec::new(),
            serving: false,
        }
    }

    /// Serin's writes come from these replicas, each writing only while it holds the Lease (invariant 5).
    pub fn with_replicas(mut self, users: &[&str], lease_duration: Duration) -> Invariants {
        self.writers = users.iter().map(|u| u.to_string()).collect();
        self.lease_duration = Some(lease_duration);
        self
    }

    /// Stops checking invariant 2: the scenario deletes or hides the stable's pods on purpose.
    pub fn exempt_stable(&mut self, why: &str) {
        self.stable_exempt = Some(why.to_string());
    }

    /// Checks invariant 2 again (the stable the scenario removed was replaced).
    pub fn check_stable_again(&mut self) {
        self.stable_exempt = None;
    }

    /// Something outside Serin's control just broke what the invariants promise (pods turned unready, Git
    /// re-applied a Service, the replica count changed): Serin has [`REACTION`] to put it right. Raising a
    /// weight beyond what is ready stays a failure even then, unless it comes within [`IN_FLIGHT`].
    pub fn disrupt(&mut self, what: &str) {
        self.grace_until = Some(Instant::now() + REACTION);
        self.disrupted_at = Some(Instant::now());
        self.disruptions.push(what.to_string());
    }

    /// The replica count just went up from `before`. The pods it adds take the kubelet's time to start, and
    /// the load they are for does not arrive with the number: until they could have started (within
    /// [`POD_START`]), ready pods are checked against the traffic of `before` replicas. Serin's own sizing
    /// of the ReplicaSets is checked against the new count at once.
    pub fn scaled_up_from(&mut self, before: i32) {
        self.scaled_up = Some((before, Instant::now()));
    }

    /// The replica count whose traffic the ready pods must carry.
    fn load_of(&self, total: i32) -> i32 {
        match self.scaled_up {
            Some((before, at)) if at.elapsed() < POD_START => before.min(total),
            _ => total,
        }
    }

    fn writer_refs(&self) -> Vec<&str> {
        self.writers.iter().map(String::as_str).collect()
    }

    /// One poll: reads everything and checks invariants 1, 2, 3 and 6 on it.
    pub async fn poll(&mut self, world: &World) -> Snapshot {
        let snap = snapshot(world, &self.target).await;
        self.check(&snap);
        snap
    }

    /// Checks one snapshot; panics with all of it on a broken invariant.
    pub fn check(&mut self, snap: &Snapshot) {
        self.polls += 1;
        let mut violations = Vec::new();
        self.check_promotion(snap, &mut violations);
        self.follow_model(snap, &mut violations);
        self.check_traffic(snap, &mut violations);
        self.report(snap, violations);
    }

    fn report(&mut self, snap: &Snapshot, violations: Vec<Violation>) {
        if violations.is_empty() {
            return;
        }
        let in_grace = self.grace_until.is_some_and(|until| Instant::now() < until);
        let in_flight = self.disrupted_at.is_some_and(|at| at.elapsed() < IN_FLIGHT);
        if in_grace && (in_flight || violations.iter().all(|v| !v.strict)) {
            self.tolerated += 1;
            return;
        }
        let lines: Vec<String> = violations
            .iter()
            .map(|v| format!("invariant {}: {}", v.invariant, v.message))
            .collect();
        panic!(
            "broken at poll {} of {} (disruptions so far: {:?}; invariant 2 skipped for the stable: {:?}):\n{}\n\
             route: {:?}\nruns: {:#?}\nstate: {:#?}",
            self.polls,
            self.target.rollout,
            self.disruptions,
            self.stable_exempt,
            lines.join("\n"),
            snap.route,
            snap.runs,
            snap.state
        );
    }

    /// Invariant 3: a new stable went through every step (as far as the commands allowed) and every
    /// analysis run of it allows the promotion, unless a human asked for a full promotion.
    fn check_promotion(&mut self, snap: &Snapshot, violations: &mut Vec<Violation>) {
        let now = snap.state.stable_hash();
        if let (Some(before), Some(after)) = (&self.stable, &now) {
            if before != after && !self.promoted_full.contains(after) {
                match &self.model {
                    Some(model)
                        if model.canary == *after
                            && model.at_last_step
                            && model.limit >= len_of(&model.steps) => {}
                    model => violations.push(Violation {
                        invariant: 3,
                        strict: true,
                        message: format!(
                            "{after} became stable (was {before}) without being seen at its last step with \
                             a promote allowing it; what the commands allowed: {model:?}"
                        ),
                    }),
                }
                for run in snap.runs.iter().filter(|r| r.hash == *after) {
                    if !run.allows_promotion() {
                        violations.push(Violation {
                            invariant: 3,
                            strict: true,
                            message: format!("{after} became stable with analysis run {run:?}"),
                        });
                    }
                }
            }
        }
        if now.is_some() {
            self.stable = now;
        }
    }

    /// Invariant 6 and the step half of invariant 3: steps move forward, never past what the commands allow.
    fn follow_model(&mut self, snap: &Snapshot, violations: &mut Vec<Violation>) {
        let state = &snap.state;
        if !state.observed() {
            return;
        }
        let Some(canary) = state.canary_hash() else {
            return;
        };
        let steps = steps_of(state);
        let fresh = self
            .model
            .as_ref()
            .is_none_or(|m| m.canary != canary || m.steps != steps);
        if fresh {
            // A new revision starts afresh; new steps for the same revision do not undo its abort.
            if self.model.as_ref().is_none_or(|m| m.canary != canary) {
                self.abort_ceiling = None;
            }
            self.model = Some(Model::start(&canary, steps));
        }
        let Some(model) = self.model.as_mut() else {
            return;
        };
        let step = state.step().unwrap_or(0);
        if step > model.limit {
            violations.push(Violation {
                invariant: 6,
                strict: true,
                message: format!(
                    "step {step} is past step {}, as far as the commands issued allow",
                    model.limit
                ),
            });
        }
        // An aborted canary's step index means nothing until a retry starts the steps again (an abort under
        // an invalid spec records step 0): only progress past the commands counts there.
        let aborted = state.rollout.status.as_ref().is_some_and(|s| s.abort);
        if aborted {
            model.highest = step;
        }
        if step < model.highest {
            violations.push(Violation {
                invariant: 6,
                strict: true,
                message: format!(
                    "step went back from {} to {step} with no retry and no new steps",
                    model.highest
                ),
            });
        }
        model.highest = model.highest.max(step);
        if step == len_of(&model.steps) - 1 || model.steps.is_empty() {
            model.at_last_step = true;
        }
    }

    /// Invariants 1 and 2 (with safety rule 11: no more than the step asks).
    fn check_traffic(&mut self, snap: &Snapshot, violations: &mut Vec<Violation>) {
        let state = &snap.state;
        self.serving |= state.is(RolloutPhase::Healthy);
        if !self.serving {
            return;
        }
        let total = state.rollout.spec.replicas.unwrap_or(1);
        let flow = traffic(&self.target, snap);
        let route_canary = snap.route.map(|w| w.percents().1);
        let raised = match (route_canary, self.previous_route_canary) {
            (Some(now), Some(before)) => now > before + 1e-9,
            (Some(now), None) => now > 0.0,
            _ => false,
        };
        self.previous_route_canary = route_canary;
        for (service, percent) in &flow.unserved {
            if *service == self.target.stable_service && self.stable_exempt.is_some() {
                continue;
            }
            violations.push(Violation {
                invariant: 1,
                strict: raised && *service == self.target.canary_service,
                message: format!(
                    "Service {service} receives {percent:.1}% with no ready pod behind it"
                ),
            });
        }
        let canary = state.canary_hash();
        let stable = state.stable_hash();
        for (hash, percent) in &flow.by_hash {
            let is_canary = canary.as_deref() == Some(hash.as_str());
            let is_stable = stable.as_deref() == Some(hash.as_str());
            if is_stable && self.stable_exempt.is_some() {
                continue;
            }
            let load = self.load_of(total);
            let needed = pods_needed(load, *percent, is_canary);
            let ready = ready_of(&self.target, state, hash);
            if ready < needed {
                violations.push(Violation {
                    invariant: if is_stable { 2 } else { 1 },
                    strict: raised && is_canary,
                    message: format!(
                        "ReplicaSet of {hash} receives {percent:.1}% of {load} replicas' traffic with {ready} \
                         ready pods; it needs {needed}"
                    ),
                });
            }
        }
        // Serin's own decision, whatever the pods do: through the steps and after an abort the stable is
        // sized for its share (at the promotion it shrinks as the new version takes over).
        let before_promotion = self.abort_ceiling.is_some()
            || self
                .model
                .as_ref()
                .is_some_and(|m| Some(&m.canary) == canary.as_ref() && m.limit < len_of(&m.steps));
        if let (Some(hash), None, true) = (&stable, &self.stable_exempt, before_promotion) {
            let share = 100.0 - canary.as_deref().map_or(0.0, |c| flow.of(c));
            let needed = pods_needed(total, share, false);
            let spec: i32 = state
                .replica_sets
                .iter()
                .filter(|rs| hash_of(&self.target.rollout, rs) == *hash)
                .map(|rs| rs.spec_replicas)
                .sum();
            if spec < needed {
                violations.push(Violation {
                    invariant: 2,
                    strict: false,
                    message: format!(
                        "the stable ReplicaSet {hash} is sized {spec} for a {share:.1}% share that needs {needed}"
                    ),
                });
            }
        }
        let Some(canary) = canary else {
            self.previous_allowance = None;
            return;
        };
        let canary_percent = flow.of(&canary);
        if let Some(ceiling) = self.abort_ceiling {
            // After an abort the canary's traffic only goes down.
            let now = route_canary.unwrap_or(canary_percent);
            if now > ceiling + 1e-9 {
                violations.push(Violation {
                    invariant: 4,
                    strict: true,
                    message: format!(
                        "the canary's traffic rose from {ceiling:.1}% to {now:.1}% after the abort"
                    ),
                });
            }
            self.abort_ceiling = Some(ceiling.min(now));
            return;
        }
        let Some(model) = self.model.as_ref().filter(|m| m.canary == canary) else {
            return;
        };
        let allowance = weight_up_to(&model.steps, model.limit);
        // The previous poll's allowance too: a weight lowered for new steps is written before the status
        // that says so, and this poll read the route before the status.
        let allowed = allowance.max(self.previous_allowance.unwrap_or(allowance));
        self.previous_allowance = Some(allowance);
        if let Some(route) = route_canary {
            if route > allowed + 1e-9 {
                violations.push(Violation {
                    invariant: 1,
                    strict: raised,
                    message: format!(
                        "the route sends {route:.1}% to the canary where the steps allowed so far ask {allowed:.0}%"
                    ),
                });
            }
        } else {
            // Without a router a weight is a share of pods: one pod's share above the step is the closest
            // pods come (safety rule 11).
            let behind: i32 = flow
                .by_hash
                .keys()
                .map(|hash| ready_of(&self.target, state, hash))
                .sum();
            let one_pod = if behind > 0 {
                100.0 / f64::from(behind)
            } else {
                0.0
            };
            if canary_percent > allowed + one_pod + 1e-6 && allowed < 100.0 {
                violations.push(Violation {
                    invariant: 1,
                    strict: false,
                    message: format!(
                        "the canary carries {canary_percent:.1}% of the traffic where the steps allowed so far ask \
                         {allowed:.0}% (one pod is {one_pod:.1}%)"
                    ),
                });
            }
        }
    }

    /// Notes what a command allows before it is sent: a promote the next stop, a full promotion everything,
    /// a retry the first stop again; an abort lets the canary's traffic only go down.
    pub fn note(&mut self, command: ManualCommand, snap: &Snapshot) {
        let step = snap.state.step().unwrap_or(0);
        match command {
            ManualCommand::Promote => {
                if let Some(model) = self.model.as_mut() {
                    model.limit = model.limit.max(next_stop(&model.steps, step + 1));
                }
            }
            ManualCommand::PromoteFull => {
                if let Some(canary) = snap.state.canary_hash() {
                    self.promoted_full.insert(canary);
                }
                if let Some(model) = self.model.as_mut() {
                    model.limit = len_of(&model.steps);
                }
            }
            ManualCommand::Abort => {
                self.abort_ceiling = Some(f64::INFINITY);
                self.aborts.push(AbortMark {
                    since: SystemTime::now(),
                    route_canary_weight: snap.route.map(|w| w.canary),
                    stable_service_pinned: snap
                        .state
                        .selector_hash(&self.target.stable_service)
                        .is_some_and(|h| Some(h) == snap.state.stable_hash()),
                    canary_rs: format!(
                        "{}-{}",
                        self.target.rollout,
                        snap.state.canary_hash().unwrap_or_default()
                    ),
                });
            }
            ManualCommand::Retry => {
                self.abort_ceiling = None;
                if let Some(model) = self.model.as_mut() {
                    model.limit = next_stop(&model.steps, 0);
                    model.highest = 0;
                    model.at_last_step = false;
                }
            }
            ManualCommand::Pause | ManualCommand::Resume => {}
        }
    }

    /// Sends a manual command and waits (bounded) until it took effect, checking every poll: a promote
    /// reaches the next stop and goes no further, a full promotion makes the canary stable, an abort puts
    /// the traffic back on the stable, a retry starts the steps again; each command leaves the status once
    /// done (invariant 6).
    pub async fn command(&mut self, world: &World, command: ManualCommand) -> Snapshot {
        let before = self.poll(world).await;
        self.note(command, &before);
        world.when_command(&self.target.rollout, command).await;
        let steps = steps_of(&before.state);
        let len = len_of(&steps);
        let stop = next_stop(&steps, before.state.step().unwrap_or(0) + 1);
        let canary = before.state.canary_hash();
        let target = self.target.clone();
        let done = move |s: &Snapshot| {
            let st = &s.state;
            let pending = st
                .rollout
                .status
                .as_ref()
                .and_then(|status| status.commands.clone())
                .unwrap_or_default();
            if !st.observed() {
                return false;
            }
            match command {
                ManualCommand::Promote if stop < len => {
                    pending.promote.is_none()
                        && st.step() == Some(stop)
                        && st.is(RolloutPhase::Paused)
                }
                ManualCommand::Promote | ManualCommand::PromoteFull => {
                    st.is(RolloutPhase::Healthy) && st.stable_hash() == canary
                }
                ManualCommand::Abort => {
                    !pending.abort
                        && st.is(RolloutPhase::Aborted)
                        && s.route.is_none_or(|w| w.canary == 0)
                        && st.selector_hash(&target.stable_service) == st.stable_hash()
                }
                ManualCommand::Retry => {
                    !pending.retry
                        && !st
                            .rollout
                            .status
                            .as_ref()
                            .is_some_and(|status| status.abort)
                        && st.phase() != Some(RolloutPhase::Aborted)
                }
                ManualCommand::Pause => pending.paused == Some(true),
                ManualCommand::Resume => pending.paused != Some(true),
            }
        };
        self.until(
            world,
            &format!("{command:?} to take effect"),
            CONVERGENCE,
            done,
        )
        .await
    }

    /// Polls until `condition` holds, checking every poll; bounded by `timeout` and [`MAX_POLLS`].
    pub async fn until(
        &mut self,
        world: &World,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + timeout;
        for _ in 0..MAX_POLLS {
            let snap = self.poll(world).await;
            if condition(&snap) {
                return snap;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nroute: {:?}\nruns: {:#?}\nstate: {:#?}",
                    snap.route, snap.runs, snap.state
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        panic!("{what}: still not there after {MAX_POLLS} polls");
    }

    /// Polls for `period`, checking every poll.
    pub async fn hold(&mut self, world: &World, period: Duration) -> Snapshot {
        let end = Instant::now() + period;
        let mut last = self.poll(world).await;
        for _ in 0..MAX_POLLS {
            if Instant::now() >= end {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
            last = self.poll(world).await;
        }
        last
    }

    /// Waits until the canary rests at the indefinite pause `step`.
    pub async fn paused_at(&mut self, world: &World, step: i32) -> Snapshot {
        self.until(world, &format!("paused at step {step}"), CONVERGENCE, |s| {
            s.state.is(RolloutPhase::Paused) && s.state.step() == Some(step)
        })
        .await
    }

    /// Invariant 7: with the faults stopped, the Rollout is Healthy (promoted at every pause on the way) or
    /// Aborted within [`CONVERGENCE`].
    pub async fn converge(&mut self, world: &World) -> Snapshot {
        let deadline = Instant::now() + CONVERGENCE;
        for _ in 0..MAX_POLLS {
            let snap = self.poll(world).await;
            let state = &snap.state;
            let settled_healthy = state.is(RolloutPhase::Healthy)
                && state.stable_hash().is_some()
                && state.stable_hash() == state.current_hash();
            if settled_healthy || state.is(RolloutPhase::Aborted) {
                return snap;
            }
            let steps = steps_of(state);
            let waiting = state.is(RolloutPhase::Paused)
                && state
                    .step()
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| steps.get(i))
                    .is_some_and(waits_for_promote);
            if waiting {
                self.command(world, ManualCommand::Promote).await;
                continue;
            }
            if Instant::now() >= deadline {
                panic!(
                    "invariant 7: not Healthy or Aborted {CONVERGENCE:?} after the faults stopped\nroute: {:?}\n\
                     runs: {:#?}\nstate: {:#?}",
                    snap.route, snap.runs, snap.state
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        panic!("invariant 7: not converged after {MAX_POLLS} polls");
    }

    /// The checks that need the whole request log: invariant 4 for every abort issued, invariant 5 when the
    /// scenario ran replicas under leader election. Returns a one-line summary for the test output.
    pub fn finish(&self, world: &World) -> String {
        let records = world.sim.request_log().snapshot();
        for mark in &self.aborts {
            assert_abort_order(&records, &self.writer_refs(), &self.target, mark);
        }
        if let Some(lease_duration) = self.lease_duration {
            assert_only_lease_holders_wrote(&records, &self.writer_refs(), lease_duration);
        }
        format!(
            "{}: {} polls, {} tolerated within {REACTION:?} of a disruption ({:?}), {} aborts checked",
            self.target.rollout,
            self.polls,
            self.tolerated,
            self.disruptions,
            self.aborts.len()
        )
    }
}

fn succeeded_write_by(record: &RequestRecord, users: &[&str]) -> bool {
    users.contains(&record.user.as_str()) && is_write(record) && record.status < 300
}

/// Invariant 4: after the abort, the first change Serin makes to where traffic goes is the weight back to
/// the stable (the route, or without a router the stable Service pinned to the stable pods); no Service
/// selector changes and the canary is not scaled down before it. A failed weight write lets nothing else
/// through, since only successful writes count as the weight moved.
pub fn assert_abort_order(
    records: &[RequestRecord],
    users: &[&str],
    target: &Target,
    mark: &AbortMark,
) {
    let writes: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.time >= mark.since && succeeded_write_by(r, users))
        .collect();
    let named = |r: &RequestRecord, resource: &str, name: &str| {
        r.resource == resource && r.name.as_deref() == Some(name)
    };
    let service = |r: &RequestRecord| {
        named(r, "services", &target.stable_service) || named(r, "services", &target.canary_service)
    };
    let canary_rs = |r: &RequestRecord| named(r, "replicasets", &mark.canary_rs);
    let first =
        |predicate: &dyn Fn(&RequestRecord) -> bool| writes.iter().position(|r| predicate(r));
    let (weight_moved, weight_needed) = match &target.route {
        Some(route) => (
            first(&|r| named(r, "httproutes", route)),
            mark.route_canary_weight.is_some_and(|w| w > 0),
        ),
        None => (
            first(&|r| named(r, "services", &target.stable_service)),
            !mark.stable_service_pinned,
        ),
    };
    if !weight_needed {
        return;
    }
    let summary = || {
        writes
            .iter()
            .map(|r| {
                format!(
                    "{} {} {:?} {:?} -> {}",
                    r.user, r.verb, r.resource, r.name, r.status
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let Some(weight_moved) = weight_moved else {
        panic!(
            "invariant 4: the abort never moved the weight back to stable; Serin's writes since:\n{}",
            summary()
        );
    };
    let other = first(&|r| {
        canary_rs(r)
            || (service(r)
                && !(target.route.is_none() && named(r, "services", &target.stable_service)))
    });
    if let Some(other) = other {
        assert!(
            weight_moved < other,
            "invariant 4: a selector change or canary scale-down came before the weight went back to stable; \
             Serin's writes since the abort:\n{}",
            summary()
        );
    }
}

/// Invariant 5: no write (Lease writes aside) from a replica while it did not hold the Lease.
pub fn assert_only_lease_holders_wrote(
    records: &[RequestRecord],
    users: &[&str],
    lease_duration: Duration,
) {
    let intruders = writes_without_the_lease(records, users, lease_duration);
    assert!(
        intruders.is_empty(),
        "invariant 5: writes from replicas that did not hold the Lease:\n{:#?}",
        intruders
            .iter()
            .map(|r| (&r.user, &r.verb, &r.resource, &r.name, r.time))
            .collect::<Vec<_>>()
    );
}

/// Writes by `users` since `since`, Events and Leases aside: what changed the cluster or the Rollout.
pub fn writes_since(world: &World, users: &[&str], since: SystemTime) -> Vec<RequestRecord> {
    world.sim.request_log().filter(|r| {
        r.time >= since
            && users.contains(&r.user.as_str())
            && is_write(r)
            && r.resource != "events"
            && r.resource != "leases"
    })
}

/// Like [`writes_since`], without the Rollout's status: what changes the cluster (safety rule 7 says an
/// invalid spec makes no such change).
pub fn object_writes_since(world: &World, users: &[&str], since: SystemTime) -> Vec<RequestRecord> {
    writes_since(world, users, since)
        .into_iter()
        .filter(|r| !(r.resource == "rollouts" && r.subresource.as_deref() == Some("status")))
        .collect()
}
