//! Serin's test harness: a simulated cluster with Serin's CRDs installed, controllers started and killed,
//! Given/When/Then helpers, the invariants checked at every poll, and real Prometheus test beds. Every
//! end-to-end test and benchmark starts its world here.
// A harness fails the test at the first surprise, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin::controller::observe::{is_controlled_by, observed_replica_set};
use serin::controller::{ControllerConfig, ControllerHandle};
use serin::crd::{labels, Rollout, RolloutPhase};
use serin::ops::ManualCommand;
use serin::strategy::ObservedReplicaSet;
use serin_sim::workload::WorkloadConfig;
use serin_sim::{RequestRecord, SimCluster, SimConfig};

/// Namespace every test works in.
pub const NS: &str = "default";
/// User the controller authenticates as, to tell its requests apart in the sim's request log.
pub const CONTROLLER_USER: &str = "serin-controller";
/// How long a simulated pod takes to turn ready.
pub const POD_READY_DELAY: Duration = Duration::from_millis(100);

/// A simulated cluster with the workload simulator and, usually, a controller.
pub struct World {
    pub sim: SimCluster,
    pub admin: Client,
    controllers: Vec<ControllerHandle>,
}

impl World {
    /// A cluster with Serin's CRDs and one running controller.
    pub async fn start() -> World {
        let mut world = World::without_controller().await;
        world.start_controller().await;
        world
    }

    /// A cluster with Serin's CRDs and no controller.
    pub async fn without_controller() -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sim = SimCluster::start(SimConfig {
            workload: Some(WorkloadConfig {
                default_ready_delay: POD_READY_DELAY,
                resync: Duration::from_secs(2),
            }),
            traffic: None,
            ..SimConfig::default()
        })
        .await
        .expect("sim starts");
        let admin = sim.client().await.expect("admin client");
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("CRD is accepted");
        }
        let rollouts: Api<Rollout> = Api::namespaced(admin.clone(), NS);
        let deadline = Instant::now() + Duration::from_secs(10);
        while rollouts.list(&ListParams::default()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "Rollout resource never became servable"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        World {
            sim,
            admin,
            controllers: Vec::new(),
        }
    }

    /// A World over a cluster the caller set up (e.g. with the traffic simulator), without a controller.
    pub fn from_parts(sim: SimCluster, admin: Client) -> World {
        World {
            sim,
            admin,
            controllers: Vec::new(),
        }
    }

    /// Starts one more controller (as the controller user) and waits for its caches.
    pub async fn start_controller(&mut self) {
        self.start_controller_with(loopback_prometheus()).await;
    }

    /// Starts a controller whose outbound policy is `outbound` (the default one allows nothing).
    pub async fn start_controller_with(
        &mut self,
        outbound: serin::analysis::outbound::OutboundConfig,
    ) {
        let client = self
            .sim
            .client_as(CONTROLLER_USER)
            .await
            .expect("controller client");
        let config = ControllerConfig {
            error_backoff: Duration::from_millis(200),
            outbound,
            ..ControllerConfig::default()
        };
        let handle = ControllerHandle::start(client, config)
            .await
            .expect("controller starts");
        assert!(
            handle.wait_ready(Duration::from_secs(10)).await,
            "controller caches never synced"
        );
        self.controllers.push(handle);
    }

    /// Kills every controller at once, like `kill -9`.
    pub fn kill_controllers(&mut self) {
        for handle in self.controllers.drain(..) {
            handle.kill();
        }
    }

    /// The first running controller.
    pub fn controller(&self) -> &ControllerHandle {
        self.controllers.first().expect("a controller is running")
    }

    pub async fn stop(mut self) {
        for handle in self.controllers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle.stop()).await;
        }
        self.sim.shutdown().await;
    }

    /// Given Services selecting `app`, one per name.
    pub async fn given_services(&self, app: &str, names: &[&str]) {
        let services: Api<Service> = Api::namespaced(self.admin.clone(), NS);
        for name in names {
            let service: Service = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}
            }))
            .expect("valid service");
            services
                .create(&PostParams::default(), &service)
                .await
                .expect("service created");
        }
    }

    /// Given a Rollout manifest applied by the user; the API server's answer.
    pub async fn given_rollout(&self, manifest: Value) -> Result<Rollout, kube::Error> {
        let rollouts: Api<Rollout> = Api::namespaced(self.admin.clone(), NS);
        let rollout: Rollout =
            serde_json::from_value(manifest).expect("manifest decodes as a Rollout");
        rollouts.create(&PostParams::default(), &rollout).await
    }

    /// Given a Rollout sent as raw JSON (for specs the typed API cannot even express).
    pub async fn given_raw_rollout(&self, manifest: Value) -> Result<(), kube::Error> {
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            self.admin.clone(),
            NS,
            &kube::api::ApiResource::erase::<Rollout>(&()),
        );
        let object: kube::api::DynamicObject =
            serde_json::from_value(manifest).expect("manifest decodes");
        api.create(&PostParams::default(), &object)
            .await
            .map(|_| ())
    }

    /// When the user changes the image of the Rollout's template.
    pub async fn when_image_changes(&self, name: &str, image: &str) {
        self.when_template_changes(
            name,
            json!({"spec": {"containers": [{"name": "app", "image": image}]}}),
        )
        .await;
    }

    /// When the user merges `template_patch` into the Rollout's template.
    pub async fn when_template_changes(&self, name: &str, template_patch: Value) {
        let rollouts: Api<Rollout> = Api::namespaced(self.admin.clone(), NS);
        rollouts
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": template_patch}})),
            )
            .await
            .expect("template patched");
    }

    /// When the user runs a manual command (`serin promote`, ...).
    pub async fn when_command(&self, name: &str, command: ManualCommand) {
        serin::ops::commands::send(&self.admin, NS, name, command)
            .await
            .expect("command accepted");
    }

    /// What the Rollout, its ReplicaSets and the Services look like now.
    pub async fn state(&self, name: &str) -> State {
        let rollouts: Api<Rollout> = Api::namespaced(self.admin.clone(), NS);
        let rollout = rollouts.get(name).await.expect("rollout exists");
        let uid = rollout.uid().unwrap_or_default();
        let replica_sets: Api<ReplicaSet> = Api::namespaced(self.admin.clone(), NS);
        let sets = replica_sets
            .list(&ListParams::default())
            .await
            .expect("list replicasets")
            .items
            .into_iter()
            .filter(|rs| is_controlled_by(rs, &uid))
            .map(|rs| observed_replica_set(&rs))
            .collect();
        let services: Api<Service> = Api::namespaced(self.admin.clone(), NS);
        let selectors = services
            .list(&ListParams::default())
            .await
            .expect("list services")
            .items
            .into_iter()
            .map(|svc| {
                let selector = svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.clone())
                    .unwrap_or_default();
                (svc.name_any(), selector)
            })
            .collect();
        State {
            rollout,
            replica_sets: sets,
            selectors,
        }
    }

    /// Then, within `timeout`, the state satisfies `condition`; every observed state is passed to
    /// `invariant` first (which panics on a broken safety rule). Returns the state that satisfied it.
    pub async fn then_eventually_checking(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut invariant: impl FnMut(&State),
        condition: impl Fn(&State) -> bool,
    ) -> State {
        let deadline = Instant::now() + timeout;
        let mut polls = 0u32;
        loop {
            polls += 1;
            let state = self.state(name).await;
            invariant(&state);
            if condition(&state) {
                return state;
            }
            if Instant::now() >= deadline || polls > 10_000 {
                panic!("timed out after {timeout:?} waiting for: {what}\nlast state:\n{state:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Then, within `timeout`, the state satisfies `condition`.
    pub async fn then_eventually(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&State) -> bool,
    ) -> State {
        self.then_eventually_checking(name, what, timeout, |_| {}, condition)
            .await
    }

    /// Events recorded about the Rollout.
    pub async fn events(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.admin.clone(), NS);
        events
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|event| {
                event.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Rollout") && r.name.as_deref() == Some(name)
                })
            })
            .collect()
    }

    /// Then, within `timeout`, an event with `reason` was recorded about the Rollout; returns its note.
    pub async fn expect_event(&self, name: &str, reason: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(name).await;
            if let Some(event) = events.iter().find(|e| e.reason.as_deref() == Some(reason)) {
                return event.note.clone().unwrap_or_default();
            }
            if Instant::now() >= deadline {
                let reasons: Vec<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
                panic!("no {reason} event about {name} within {timeout:?}; events: {reasons:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Writes the controller made (create, update, patch, delete), oldest first.
    pub fn controller_writes(&self) -> Vec<RequestRecord> {
        self.sim.request_log().writes_by(CONTROLLER_USER)
    }

    /// Writes the controller made, except Events (which record decisions, not cluster changes).
    pub fn controller_object_writes(&self) -> Vec<RequestRecord> {
        self.controller_writes()
            .into_iter()
            .filter(|r| r.resource != "events")
            .collect()
    }
}

/// A snapshot of a Rollout and what it owns.
#[derive(Debug, Clone)]
pub struct State {
    pub rollout: Rollout,
    pub replica_sets: Vec<ObservedReplicaSet>,
    /// Selector of every Service in the namespace, by name.
    pub selectors: BTreeMap<String, BTreeMap<String, String>>,
}

impl State {
    pub fn phase(&self) -> Option<RolloutPhase> {
        self.rollout.status.as_ref().and_then(|s| s.phase)
    }

    pub fn step(&self) -> Option<i32> {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.current_step_index)
    }

    pub fn weight(&self) -> i32 {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.current_weight)
            .unwrap_or(0)
    }

    pub fn message(&self) -> String {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.message.clone())
            .unwrap_or_default()
    }

    /// The status is about the current spec.
    pub fn observed(&self) -> bool {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.observed_generation)
            == self.rollout.metadata.generation
    }

    pub fn stable_hash(&self) -> Option<String> {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.stable_revision.as_ref())
            .map(|r| r.pod_template_hash.clone())
    }

    pub fn canary_hash(&self) -> Option<String> {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.canary_revision.as_ref())
            .map(|r| r.pod_template_hash.clone())
    }

    pub fn current_hash(&self) -> Option<String> {
        self.rollout
            .status
            .as_ref()
            .and_then(|s| s.current_pod_hash.clone())
    }

    pub fn is(&self, phase: RolloutPhase) -> bool {
        self.observed() && self.phase() == Some(phase)
    }

    pub fn rs(&self, hash: &str) -> Option<&ObservedReplicaSet> {
        self.replica_sets
            .iter()
            .find(|rs| rs.pod_template_hash == hash)
    }

    /// `spec.replicas` of the ReplicaSet of `hash` (0 when there is none).
    pub fn replicas_of(&self, hash: &str) -> i32 {
        self.rs(hash).map(|rs| rs.spec_replicas).unwrap_or(0)
    }

    /// Ready pods of the ReplicaSet of `hash` (0 when there is none).
    pub fn ready_of(&self, hash: &str) -> i32 {
        self.rs(hash).map(|rs| rs.ready_replicas).unwrap_or(0)
    }

    /// The pod-template hash a Service's selector is pinned to, if any.
    pub fn selector_hash(&self, service: &str) -> Option<String> {
        self.selectors
            .get(service)
            .and_then(|s| s.get(labels::POD_TEMPLATE_HASH).cloned())
    }

    pub fn condition(&self, type_: &str) -> Option<(String, String)> {
        self.rollout.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status.clone(), c.reason.clone()))
        })
    }
}

/// Asserts where the Services' selectors point.
pub fn expect_selectors(state: &State, expected: &[(&str, Option<&str>)]) {
    for (service, hash) in expected {
        assert_eq!(
            state.selector_hash(service).as_deref(),
            *hash,
            "selector of Service {service}; state:\n{state:#?}"
        );
    }
}

/// A pod template running `image`, with extra pod annotations.
pub fn template(app: &str, image: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": image}]}
    })
}

/// A canary Rollout manifest.
pub fn canary_rollout(name: &str, replicas: i32, image: &str, canary: Value) -> Value {
    let mut strategy = json!({"stableService": name, "canaryService": format!("{name}-canary")});
    if let (Some(target), Some(extra)) = (strategy.as_object_mut(), canary.as_object()) {
        for (key, value) in extra {
            target.insert(key.clone(), value.clone());
        }
    }
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template(name, image, json!({})),
            "strategy": {"canary": strategy}
        }
    })
}

/// A blue-green Rollout manifest.
pub fn blue_green_rollout(name: &str, replicas: i32, image: &str, blue_green: Value) -> Value {
    let mut strategy = json!({"activeService": name, "previewService": format!("{name}-preview")});
    if let (Some(target), Some(extra)) = (strategy.as_object_mut(), blue_green.as_object()) {
        for (key, value) in extra {
            target.insert(key.clone(), value.clone());
        }
    }
    json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template(name, image, json!({})),
            "strategy": {"blueGreen": strategy}
        }
    })
}

// Controller fault tests: restarts with lagging caches, replicas under leader election, who wrote when.

/// Where a controller started by [`World::start_controller_unsynced`] serves `/readyz`.
pub struct Probe {
    pub addr: std::net::SocketAddr,
}

impl Probe {
    /// Whether `/readyz` answers 200 right now.
    pub async fn ready(&self) -> bool {
        let url = format!("http://{}/readyz", self.addr);
        match reqwest::get(&url).await {
            Ok(response) => response.status().is_success(),
            Err(error) => panic!("/readyz at {url} did not answer: {error}"),
        }
    }
}

impl World {
    /// Starts one more controller (as the controller user) without waiting for its caches; it serves
    /// `/readyz` on a free port.
    pub async fn start_controller_unsynced(&mut self) -> Probe {
        let client = self
            .sim
            .client_as(CONTROLLER_USER)
            .await
            .expect("controller client");
        let config = ControllerConfig {
            error_backoff: Duration::from_millis(200),
            metrics_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            outbound: loopback_prometheus(),
            ..ControllerConfig::default()
        };
        let handle = ControllerHandle::start(client, config)
            .await
            .expect("controller starts");
        let addr = handle.metrics_addr().expect("metrics served");
        self.controllers.push(handle);
        Probe { addr }
    }

    /// Like [`World::state`], reading the named ReplicaSets with `get` instead of listing them (for tests
    /// that fault `list replicasets`); a ReplicaSet that does not exist is left out.
    pub async fn state_by_name(&self, name: &str, replica_sets: &[String]) -> State {
        let rollouts: Api<Rollout> = Api::namespaced(self.admin.clone(), NS);
        let rollout = rollouts.get(name).await.expect("rollout exists");
        let api: Api<ReplicaSet> = Api::namespaced(self.admin.clone(), NS);
        let mut sets = Vec::new();
        for rs_name in replica_sets {
            if let Some(rs) = api.get_opt(rs_name).await.expect("get replicaset") {
                sets.push(observed_replica_set(&rs));
            }
        }
        let services: Api<Service> = Api::namespaced(self.admin.clone(), NS);
        let selectors = services
            .list(&ListParams::default())
            .await
            .expect("list services")
            .items
            .into_iter()
            .map(|svc| {
                let selector = svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.clone())
                    .unwrap_or_default();
                (svc.name_any(), selector)
            })
            .collect();
        State {
            rollout,
            replica_sets: sets,
            selectors,
        }
    }

    /// Waits (bounded) until the controller user has made no write for `quiet`.
    pub async fn wait_for_quiet_controller(&self, quiet: Duration, timeout: Duration) {
        self.wait_for_quiet_writer(CONTROLLER_USER, quiet, timeout)
            .await;
    }

    /// Waits (bounded) until `user` has made no write, Lease renewals aside, for `quiet`.
    pub async fn wait_for_quiet_writer(&self, user: &str, quiet: Duration, timeout: Duration) {
        let writes = || {
            self.sim
                .request_log()
                .filter(|r| r.user == user && is_write(r) && r.resource != "leases")
                .len()
        };
        let deadline = Instant::now() + timeout;
        let mut seen = writes();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = writes();
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user} kept writing for {timeout:?}"
            );
        }
    }
}

/// Name of the Lease replicas started by [`Replica::start`] compete for.
pub const LEASE_NAME: &str = "serin-controller";

/// Leader-election timing for replicas in tests: short, so takeovers happen within a test's patience.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(200),
        }
    }
}

/// The Lease config of replica `identity`.
pub fn lease_config(identity: &str, timing: LeaseTiming) -> serin::controller::leader::LeaseConfig {
    serin::controller::leader::LeaseConfig {
        lease_name: LEASE_NAME.into(),
        lease_namespace: NS.into(),
        identity: identity.into(),
        lease_duration: timing.lease_duration,
        renew_deadline: timing.renew_deadline,
        retry_period: timing.retry_period,
    }
}

/// One controller replica with leader election, run in-process as `serin controller --leader-elect` runs
/// it, authenticated as its own user (its identity), so the request log tells its requests apart.
pub struct Replica {
    pub identity: String,
    pub metrics: std::sync::Arc<serin::controller::Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), serin::controller::ControllerError>>>,
}

impl Replica {
    /// Starts the replica; it becomes a candidate for the Lease at once.
    pub async fn start(world: &World, identity: &str, timing: LeaseTiming) -> Replica {
        let client = world.sim.client_as(identity).await.expect("replica client");
        let config = ControllerConfig {
            error_backoff: Duration::from_millis(200),
            instance: Some(identity.to_string()),
            leader: Some(lease_config(identity, timing)),
            outbound: loopback_prometheus(),
            ..ControllerConfig::default()
        };
        let metrics = std::sync::Arc::new(serin::controller::Metrics::new());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(serin::controller::run_until(
            client,
            config,
            metrics.clone(),
            shutdown.clone(),
        ));
        Replica {
            identity: identity.to_string(),
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    /// Kills the replica like `kill -9`: nothing is released, in-flight requests are dropped.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Stops the replica gracefully (it releases the Lease when it holds it).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("replica stops in time")
                .expect("replica task");
            stopped.expect("replica ran without error");
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Who holds the Lease as stored now, read as the admin.
pub async fn lease_holder(world: &World) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(world.admin.clone(), NS);
    leases
        .get_opt(LEASE_NAME)
        .await
        .expect("get lease")
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.holder_identity)
}

/// Whether a request record is a write (create, update, patch, delete).
pub fn is_write(record: &RequestRecord) -> bool {
    matches!(
        record.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// Lease writes the API server accepted, oldest first: every renewal and every takeover.
pub fn accepted_lease_writes(records: &[RequestRecord]) -> Vec<RequestRecord> {
    let mut writes: Vec<RequestRecord> = records
        .iter()
        .filter(|r| {
            // A create is sent to the collection, so it names no object; tests use one Lease.
            r.resource == "leases"
                && (r.name.as_deref() == Some(LEASE_NAME) || r.verb == "create")
                && is_write(r)
                && r.status < 300
        })
        .cloned()
        .collect();
    writes.sort_by_key(|r| r.time);
    writes
}

/// One holder's uninterrupted run of accepted Lease writes, from the request log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTerm {
    pub holder: String,
    /// When its first accepted Lease write (the takeover) was received.
    pub acquired: std::time::SystemTime,
    /// When its last accepted Lease write (a renewal) was received.
    pub last_renewal: std::time::SystemTime,
}

/// The holders of the Lease in order, each with when it took the Lease and last renewed it.
pub fn lease_terms(records: &[RequestRecord]) -> Vec<LeaseTerm> {
    let mut terms: Vec<LeaseTerm> = Vec::new();
    for write in accepted_lease_writes(records) {
        match terms.last_mut() {
            Some(term) if term.holder == write.user => term.last_renewal = write.time,
            _ => terms.push(LeaseTerm {
                holder: write.user.clone(),
                acquired: write.time,
                last_renewal: write.time,
            }),
        }
    }
    terms
}

/// Writes by `users` to anything but the Lease that their writer made while it did not hold the Lease: the
/// holder at a time is the writer of the latest accepted Lease write received before it, and holds it for
/// `lease_duration` after that write. (A graceful release is a Lease write by the holder too, so check
/// before stopping replicas gracefully.)
pub fn writes_without_the_lease(
    records: &[RequestRecord],
    users: &[&str],
    lease_duration: Duration,
) -> Vec<RequestRecord> {
    let lease_writes = accepted_lease_writes(records);
    records
        .iter()
        .filter(|r| is_write(r) && r.resource != "leases" && users.contains(&r.user.as_str()))
        .filter(|write| {
            let holder = lease_writes.iter().rev().find(|l| l.time <= write.time);
            !holder.is_some_and(|holder| {
                holder.user == write.user
                    && write
                        .time
                        .duration_since(holder.time)
                        .is_ok_and(|since| since < lease_duration)
            })
        })
        .cloned()
        .collect()
}

/// The tests' Prometheus listens on loopback, which the outbound policy opens only when it is listed.
pub fn loopback_prometheus() -> serin::analysis::outbound::OutboundConfig {
    serin::analysis::outbound::OutboundConfig::allowing(["127.0.0.1"]).expect("a valid destination")
}

pub mod exporter;
pub mod invariants;
pub mod restartable_prometheus;

pub use serin_sim::fixtures;
