//! The reconciler: observe the cluster, call the pure planner, apply its actions in safe order, write status.

pub mod act;
pub mod cached;
pub mod expectations;
pub mod index;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod neighbours;
pub mod observe;
pub mod routes;
pub mod status_write;
pub mod sync;
pub mod undecodable;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::{Action as Requeue, Config as RuntimeConfig, Controller};
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use act::{act, act_fenced, act_recorded, ActError, Written};
use cached::StoredRollout;
pub use leader::{Fence, Fenced};
pub use metrics::Metrics;
pub use observe::{observe, Caches, ObserveError, Sources};
pub use status_write::{
    pods_at_rest, progress_write_interval, status_differs, status_write, weight_follows_pods,
    StatusWrite, WriteContext,
};
pub use sync::{Cache, CacheGate, CacheState, GateVerdict};

use crate::crd::analysis::AnalysisRun;
use crate::crd::{labels, Rollout, RolloutStatus};
use crate::events::{Note, Publisher, Severity};
use crate::strategy::Plan;
use crate::traffic::{ObjectKey, RoutingKind};
use index::ReferenceIndex;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaces to watch; empty means all namespaces.
    pub namespaces: Vec<String>,
    /// Rollouts reconciled at the same time (per namespace scope).
    pub concurrency: u16,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Wait before retrying a reconcile that failed for a reason other than a status conflict.
    pub error_backoff: Duration,
    /// Reconcile every Rollout at least this often even when nothing triggers it.
    pub resync: Duration,
    /// Name of this instance in events (`reportingInstance`).
    pub instance: Option<String>,
    /// Leader election: reconcile only while holding this Lease (used by [`run`] and [`run_until`]).
    pub leader: Option<leader::LeaseConfig>,
    /// Also run the AnalysisRun measuring controller (Prometheus queries) in this process.
    pub measure_analysis: bool,
    /// Whom that runner may call on a user's behalf and how much it reads (`--allowed-destinations`,
    /// `--outbound-max-*`); the default allows no destination at all.
    pub outbound: crate::analysis::outbound::OutboundConfig,
    /// The Prometheus a metric without `address` queries (`--default-prometheus-address`); the outbound
    /// policy allows its host and port.
    pub default_prometheus_address: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            namespaces: Vec::new(),
            concurrency: 4,
            metrics_addr: None,
            error_backoff: Duration::from_secs(2),
            resync: Duration::from_secs(300),
            instance: None,
            measure_analysis: true,
            leader: None,
            outbound: Default::default(),
            default_prometheus_address: None,
        }
    }
}

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot serve metrics on {addr}: {source}")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a controller task ended abnormally: {0}")]
    TaskFailed(#[source] tokio::task::JoinError),
    #[error("leader election: {0}")]
    Leader(#[from] leader::LeaderError),
}

impl ControllerError {
    /// A bounded label for logs.
    pub fn category(&self) -> &'static str {
        match self {
            ControllerError::BindMetrics { .. } => "bind_metrics",
            ControllerError::TaskFailed(_) => "task_failed",
            ControllerError::Leader(error) => error.category(),
        }
    }
}

/// Why one reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("observing the cluster failed: {0}")]
    Observe(#[from] ObserveError),
    #[error("applying the plan failed: {0}")]
    Act(#[from] ActError),
    #[error("writing status failed: {0}")]
    WriteStatus(#[source] kube::Error),
    #[error("the Rollout changed while its status was being written")]
    StatusConflict,
    #[error("re-reading the Rollout failed: {0}")]
    ReadRollout(#[source] kube::Error),
    #[error("decoding the Rollout from the controller's store failed: {0}")]
    UnpackRollout(#[source] serde_json::Error),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl ReconcileError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Observe(error) => error.category(),
            ReconcileError::Act(error) => error.category(),
            ReconcileError::WriteStatus(_) => "write_status",
            ReconcileError::StatusConflict => "status_conflict",
            ReconcileError::ReadRollout(_) => "read_rollout",
            ReconcileError::UnpackRollout(_) => "unpack_rollout",
            ReconcileError::Fenced(fenced) => fenced.category(),
        }
    }
}

/// Runs the controller until Ctrl-C.
pub async fn run(client: Client, config: ControllerConfig) -> Result<(), ControllerError> {
    let interrupted = CancellationToken::new();
    let on_signal = interrupted.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("interrupted, stopping");
        on_signal.cancel();
    });
    run_until(client, config, Arc::new(Metrics::new()), interrupted).await
}

/// Runs the controller until `shutdown` is cancelled, counting into `metrics`; with `config.leader`, it
/// reconciles only while it holds the Lease and stands again as candidate whenever it loses it.
///
/// Dropping the returned future (aborting its task) stops everything at once, like a killed process: the
/// Lease is neither renewed nor released, so another replica takes over when it expires.
pub async fn run_until(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    // One metrics endpoint for the life of the process, so a standby replica still answers /healthz.
    if config.leader.is_some() {
        metrics.set_ready_as_standby();
    }
    let _metrics_server = match config.metrics_addr {
        Some(addr) => {
            let (_, task) = metrics::serve(addr, metrics.clone(), shutdown.clone())
                .await
                .map_err(|source| ControllerError::BindMetrics { addr, source })?;
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let reconciler_config = ControllerConfig {
        metrics_addr: None,
        ..config.clone()
    };
    let Some(lease) = config.leader.clone() else {
        metrics.set_leader(true);
        let handle =
            ControllerHandle::start_with_metrics(client, reconciler_config, metrics).await?;
        let cancel = handle.cancel.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            cancel.cancel();
        });
        return handle.wait_for_exit().await;
    };
    let mut lost_before = false;
    loop {
        if lost_before {
            // The Lease still names this replica until it expires, and a candidate may take a Lease that
            // names itself: without this pause the replica whose renewals just failed would win it back
            // before a healthy standby could take over.
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(lease.lease_duration) => {}
            }
        }
        let leadership = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            acquired = leader::acquire(client.clone(), lease.clone()) => acquired?,
        };
        tracing::info!(identity = %lease.identity, "leading: starting the reconcilers");
        metrics.set_leader(true);
        let handle = ControllerHandle::start_fenced(
            client.clone(),
            reconciler_config.clone(),
            metrics.clone(),
            leadership.fence(),
        )
        .await?;
        let lost = leadership.lost();
        tokio::select! {
            _ = lost.cancelled() => {
                // Safety rule 8: a controller that can no longer prove it holds the Lease stops writing at
                // once (every write also checks the fence); in-flight reconciles are dropped wherever they
                // are, and it stands again as candidate.
                tracing::warn!("lost the lease: stopping every write");
                handle.kill();
                metrics.set_leader(false);
                drop(leadership);
                lost_before = true;
            }
            _ = shutdown.cancelled() => {
                let stopped = handle.stop().await;
                leadership.release().await;
                return stopped;
            }
        }
    }
}

/// Aborts a task when dropped, so a dropped [`run_until`] leaves nothing running.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends a pod it stops).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// A controller running in this process: stop it, kill it, read its counters. Dropping it kills it.
pub struct ControllerHandle {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    scopes: Vec<ScopeState>,
}

impl ControllerHandle {
    /// Starts the controller on its own tasks and returns at once.
    pub async fn start(
        client: Client,
        config: ControllerConfig,
    ) -> Result<ControllerHandle, ControllerError> {
        ControllerHandle::start_with_metrics(client, config, Arc::new(Metrics::new())).await
    }

    /// Starts the controller counting into `metrics` (shared across restarts of the reconcilers).
    pub async fn start_with_metrics(
        client: Client,
        config: ControllerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ControllerHandle, ControllerError> {
        ControllerHandle::start_fenced(client, config, metrics, Fence::open()).await
    }

    /// Starts the controller writing only while `fence` allows it (see [`leader::Leadership::fence`]).
    pub async fn start_fenced(
        client: Client,
        config: ControllerConfig,
        metrics: Arc<Metrics>,
        fence: Fence,
    ) -> Result<ControllerHandle, ControllerError> {
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_addr {
            let (bound, task) = metrics::serve(addr, metrics.clone(), cancel.clone())
                .await
                .map_err(|source| ControllerError::BindMetrics { addr, source })?;
            metrics_addr = Some(bound);
            tasks.push(task);
        }
        let recorder = Publisher::new(
            client.clone(),
            crate::crd::FIELD_MANAGER,
            config.instance.clone(),
        );
        let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().cloned().map(Some).collect()
        };
        let unsynced_scopes = Arc::new(AtomicUsize::new(namespaces.len()));
        let mut scopes = Vec::new();
        for scope in namespaces {
            if config.measure_analysis {
                let runner = crate::analysis::RunnerConfig {
                    namespace: scope.clone(),
                    outbound: config.outbound.clone(),
                    default_prometheus_address: config.default_prometheus_address.clone(),
                };
                tasks.push(spawn_analysis_runner(
                    client.clone(),
                    runner,
                    &cancel,
                    metrics.clone(),
                ));
            }
            let ready = {
                let (metrics, unsynced) = (metrics.clone(), unsynced_scopes.clone());
                move || {
                    if unsynced.fetch_sub(1, Ordering::AcqRel) == 1 {
                        tracing::info!("every watch cache synced: ready");
                        metrics.set_ready();
                    }
                }
            };
            let wiring = ScopeWiring {
                recorder: recorder.clone(),
                metrics: metrics.clone(),
                gate: Arc::new(CacheGate::new(ready)),
                fence: fence.clone(),
            };
            let (task, state) = spawn_scope(client.clone(), scope, &config, wiring, &cancel);
            tasks.push(task);
            scopes.push(state);
        }
        Ok(ControllerHandle {
            cancel,
            tasks,
            metrics,
            metrics_addr,
            scopes,
        })
    }

    /// The counters of this controller.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How much state the controller keeps (see [`Retained`]).
    pub fn retained(&self) -> Retained {
        let mut retained = Retained {
            rollout_series: self.metrics.rollout_series(),
            ..Retained::default()
        };
        for scope in &self.scopes {
            retained.rollouts += scope.rollouts.state().len();
            retained.replica_sets += scope.caches.replica_sets.len();
            retained.replica_set_owners += scope.caches.replica_sets.owners();
            retained.analysis_runs += scope.caches.analysis_runs.len();
            retained.analysis_run_owners += scope.caches.analysis_runs.owners();
            retained.own_status_writes += scope.written.len();
            retained.expectations += scope.caches.expectations.pending();
            retained.referencing_rollouts += scope.references.rollouts();
        }
        retained
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until every cache has synced, or `timeout` passes; returns whether they synced.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.metrics.is_ready() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.metrics.is_ready()
    }

    /// Stops gracefully: reconciles in flight finish, no new one starts.
    pub async fn stop(self) -> Result<(), ControllerError> {
        self.cancel.cancel();
        self.wait_for_exit().await
    }

    /// Stops at once, like a killed process: reconciles in flight are dropped wherever they are.
    pub fn kill(self) {
        drop(self);
    }

    async fn wait_for_exit(mut self) -> Result<(), ControllerError> {
        for task in std::mem::take(&mut self.tasks) {
            match task.await {
                Ok(()) => {}
                Err(error) if error.is_cancelled() => {}
                Err(error) => return Err(ControllerError::TaskFailed(error)),
            }
        }
        Ok(())
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The AnalysisRun measuring controller for one namespace scope, stopped with the Rollout controller (and so,
/// with leader election, running only while this replica leads).
fn spawn_analysis_runner(
    client: Client,
    config: crate::analysis::RunnerConfig,
    cancel: &CancellationToken,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    let stop = cancel.clone().cancelled_owned();
    tokio::spawn(async move {
        let measurer = crate::analysis::runner::cluster_measurer(client.clone(), &config)
            .observed_by(Arc::new(move |phase| metrics.measured(phase)));
        if let Err(error) = crate::analysis::runner::run_until(client, config, measurer, stop).await
        {
            tracing::error!(%error, "analysis runner stopped");
        }
    })
}

struct ScopeContext {
    /// Our own last status write per Rollout, until the watch shows it.
    written: Arc<lifecycle::OwnWrites>,
    /// The Rollout store: a Rollout no longer in it was deleted.
    rollouts: reflector::Store<StoredRollout>,
    client: Client,
    sources: Sources,
    recorder: Publisher,
    metrics: Arc<Metrics>,
    error_backoff: Duration,
    resync: Duration,
    /// Whether the caches `sources` reads are complete and current.
    gate: Arc<CacheGate>,
    /// Asked before every write.
    fence: Fence,
}

fn scoped_api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// What may make a Rollout need a reconcile: a spec change (generation), deletion, or a manual command.
/// Status writes, including the controller's own, change none of these, so they do not trigger one.
pub fn rollout_trigger_hash(rollout: &Rollout) -> u64 {
    let mut hasher = DefaultHasher::new();
    rollout.metadata.generation.hash(&mut hasher);
    rollout
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    rollout.metadata.uid.hash(&mut hasher);
    let commands = rollout
        .status
        .as_ref()
        .and_then(|status| status.commands.as_ref());
    serde_json::to_string(&commands)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// What one namespace scope's reconciler shares with the rest of the controller.
struct ScopeWiring {
    recorder: Publisher,
    metrics: Arc<Metrics>,
    gate: Arc<CacheGate>,
    fence: Fence,
}

fn spawn_scope(
    client: Client,
    scope: Option<String>,
    config: &ControllerConfig,
    wiring: ScopeWiring,
    cancel: &CancellationToken,
) -> (JoinHandle<()>, ScopeState) {
    let ScopeWiring {
        recorder,
        metrics,
        gate,
        fence,
    } = wiring;
    // Read as stored objects and decoded one by one, so a Rollout that does not decode stops only itself.
    let rollouts: Api<DynamicObject> = match &scope {
        Some(namespace) => Api::namespaced_with(
            client.clone(),
            namespace,
            &ApiResource::erase::<Rollout>(&()),
        ),
        None => Api::all_with(client.clone(), &ApiResource::erase::<Rollout>(&())),
    };
    let replica_sets: Api<ReplicaSet> = scoped_api(&client, &scope);
    let services: Api<Service> = scoped_api(&client, &scope);
    let runs: Api<AnalysisRun> = scoped_api(&client, &scope);

    let (rollout_reader, rollout_writer) = reflector::store::<StoredRollout>();
    let neighbour_index = Arc::new(neighbours::NeighbourIndex::new());
    let caches =
        Caches::new(gate.clone()).with_rollouts(rollout_reader.clone(), neighbour_index.clone());
    let references = Arc::new(ReferenceIndex::new());
    let written = Arc::new(lifecycle::OwnWrites::new(rollout_reader.clone()));
    let state = ScopeState {
        written: written.clone(),
        caches: caches.clone(),
        references: references.clone(),
        rollouts: rollout_reader.clone(),
    };

    let owned = watcher::Config::default().labels(labels::ROLLOUT_NAME);
    let (undecodable_tx, undecodable_rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(undecodable::report(
        client.clone(),
        recorder.clone(),
        fence.clone(),
        undecodable_rx,
    ));
    let rollout_stream = watcher(rollouts, watcher::Config::default())
        .default_backoff()
        .try_filter_map(move |event| {
            futures::future::ready(Ok(undecodable::decode_event(event, &undecodable_tx)))
        })
        .modify(cached::trim_rollout)
        .inspect_ok(references.feeder())
        .inspect_ok(neighbour_index.feeder())
        .inspect_ok(forgetter(&state, metrics.clone()))
        .map_ok(cached::stored_event)
        .reflect(rollout_writer)
        .inspect_ok(gate.tracker(Cache::Rollouts));
    let rollout_stream = triggers_once_stored(rollout_stream).predicate_filter(
        |rollout: &StoredRollout| Some(rollout.trigger_hash),
        Default::default(),
    );
    let rs_stream = watcher(replica_sets, owned.clone())
        .default_backoff()
        .inspect_ok(caches.replica_sets.feeder())
        .inspect_ok(gate.tracker(Cache::ReplicaSets))
        .touched_objects();
    let run_stream = watcher(runs, owned)
        .default_backoff()
        .inspect_ok(caches.analysis_runs.feeder())
        .inspect_ok(gate.tracker(Cache::AnalysisRuns))
        .touched_objects();
    let svc_stream = watcher(services, watcher::Config::default())
        .default_backoff()
        .inspect_ok(caches.services.feeder())
        .inspect_ok(gate.tracker(Cache::Services))
        .touched_objects();

    let route_caches = caches.routes.clone();
    let context = Arc::new(ScopeContext {
        written,
        rollouts: rollout_reader.clone(),
        client: client.clone(),
        sources: Sources::cached(client.clone(), caches),
        recorder,
        metrics,
        error_backoff: config.error_backoff,
        resync: config.resync,
        gate: gate.clone(),
        fence,
    });

    // Services and routing objects trigger only the Rollouts that name them.
    let naming = |kind: RoutingKind| {
        let references = references.clone();
        move |namespace: Option<String>, name: String| {
            references.rollouts_naming(&ObjectKey::new(kind, &namespace.unwrap_or_default(), &name))
        }
    };
    let services_naming = naming(RoutingKind::Service);
    let mut controller = Controller::for_stream(rollout_stream, rollout_reader)
        .owns_stream(rs_stream)
        .owns_stream(run_stream)
        .watches_stream(svc_stream, move |service: Service| {
            services_naming(service.namespace(), service.name_any())
        });
    for kind in routes::WATCHED {
        let Some(cache) = route_caches.cache(kind).cloned() else {
            continue;
        };
        let objects_naming = naming(kind);
        controller = controller.watches_stream_with(
            routes::route_watch(&client, &scope, kind, cache, &gate),
            move |object: DynamicObject| objects_naming(object.namespace(), object.name_any()),
            kind.api_resource(),
        );
    }
    let controller = controller
        .with_config(RuntimeConfig::default().concurrency(config.concurrency))
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile trigger failed");
            }
        });
    (tokio::spawn(controller), state)
}

/// What one namespace scope keeps per Rollout besides the Rollout store itself.
#[derive(Clone)]
struct ScopeState {
    written: Arc<lifecycle::OwnWrites>,
    caches: Caches,
    references: Arc<ReferenceIndex>,
    rollouts: reflector::Store<StoredRollout>,
}

/// A closure for `inspect_ok` on the Rollout watch: drops what the scope keeps for Rollouts that went
/// (see [`lifecycle`]) and own status writes the watch has caught up with.
fn forgetter(
    state: &ScopeState,
    metrics: Arc<Metrics>,
) -> impl FnMut(&watcher::Event<Rollout>) + Send + 'static {
    let written = state.written.clone();
    let expectations = state.caches.expectations.clone();
    let mut departures = lifecycle::Departures::new();
    move |event| {
        if let watcher::Event::Apply(rollout) | watcher::Event::InitApply(rollout) = event {
            written.observed(rollout);
        }
        for departed in departures.apply(event) {
            if let Some(uid) = &departed.uid {
                expectations.forget(uid);
            }
            written.forget(&departed.key);
            if departed.name_gone {
                metrics.forget_rollout(&departed.key.namespace, &departed.key.name);
            }
        }
    }
}

/// How much state a running controller keeps, summed over its namespace scopes: everything kept per
/// Rollout or per owned object, for checking that it all goes when the Rollouts go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retained {
    /// Rollouts in the Rollout store.
    pub rollouts: usize,
    /// ReplicaSets in the ReplicaSet cache, and Rollouts the cache indexes them under.
    pub replica_sets: usize,
    pub replica_set_owners: usize,
    /// AnalysisRuns in the AnalysisRun cache, and Rollouts the cache indexes them under.
    pub analysis_runs: usize,
    pub analysis_run_owners: usize,
    /// Own status writes the watch has not shown yet.
    pub own_status_writes: usize,
    /// Rollouts with writes laid over lagging caches.
    pub expectations: usize,
    /// Rollouts in the index of the Services and routing objects they name.
    pub referencing_rollouts: usize,
    /// Rollouts with metric series of their own.
    pub rollout_series: usize,
}

/// The Rollouts to reconcile from the Rollout watch, each emitted once the reflector's store holds it.
/// During a (re)list the store keeps the listed objects aside until the list completes, and kube-runtime
/// drops a reconcile asked for an object its store does not hold yet: a Rollout first seen in a relist (one
/// created while the watch was down) would never be reconciled. So listed objects are held back until the
/// list is done, then emitted together.
///
/// A relist of every Rollout comes exactly when the cluster is busiest (a watch that fell behind a burst
/// is closed), and the reflector holds a second copy of the store meanwhile; so what is held back here is
/// only a trigger (see [`StoredRollout::trigger`]), boxed, and emitted one at a time.
pub fn triggers_once_stored<S>(
    events: S,
) -> impl futures::Stream<Item = Result<StoredRollout, watcher::Error>> + Send
where
    S: futures::Stream<Item = Result<watcher::Event<StoredRollout>, watcher::Error>> + Send,
{
    events
        .scan(Vec::new(), |listed: &mut Vec<Box<StoredRollout>>, event| {
            let ready: Vec<Result<Box<StoredRollout>, watcher::Error>> = match event {
                Ok(watcher::Event::Init) => {
                    *listed = Vec::new();
                    Vec::new()
                }
                Ok(watcher::Event::InitApply(rollout)) => {
                    listed.push(Box::new(rollout.trigger()));
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    std::mem::take(listed).into_iter().map(Ok).collect()
                }
                Ok(watcher::Event::Apply(rollout)) => vec![Ok(Box::new(rollout))],
                Ok(watcher::Event::Delete(_)) => Vec::new(),
                Err(error) => vec![Err(error)],
            };
            futures::future::ready(Some(futures::stream::iter(ready)))
        })
        .flatten()
        .map_ok(|rollout| *rollout)
}

/// How long a reconcile waits for the caches before it gives its slot back and comes again.
const CACHE_WAIT: Duration = Duration::from_secs(1);

async fn reconcile(
    rollout: Arc<StoredRollout>,
    context: Arc<ScopeContext>,
) -> Result<Requeue, ReconcileError> {
    let started = Instant::now();
    if let GateVerdict::Closed { waiting } = context.gate.wait_open(CACHE_WAIT).await {
        // An incomplete cache reads as "these objects do not exist", which the planner would answer by
        // creating or promoting: nothing is planned until every cache holds a complete list.
        tracing::debug!(
            rollout = %rollout.name_any(),
            waiting = ?waiting,
            "watch caches not synced: not planning yet"
        );
        context
            .metrics
            .reconciled("caches_not_synced", started.elapsed());
        return Ok(Requeue::requeue(CACHE_WAIT));
    }
    let result = match rollout.unpack() {
        Ok(rollout) => reconcile_rollout(&context, &rollout).await,
        Err(error) => Err(ReconcileError::UnpackRollout(error)),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(error) => error.category(),
    };
    context.metrics.reconciled(outcome, started.elapsed());
    result
}

async fn reconcile_rollout(
    context: &ScopeContext,
    rollout: &Rollout,
) -> Result<Requeue, ReconcileError> {
    if rollout.metadata.deletion_timestamp.is_some() {
        // Owned objects go with the Rollout through their ownerReferences.
        return Ok(Requeue::await_change());
    }
    let Some(namespace) = rollout.namespace() else {
        return Ok(Requeue::await_change());
    };
    let api: Api<Rollout> = Api::namespaced(context.client.clone(), &namespace);
    let key = format!("{namespace}/{}", rollout.name_any());
    let mut current = context.written.fresher(rollout);
    // A status write that loses a race (a `serin promote` landed meanwhile) is planned again at once on the
    // fresh object, so the command is neither lost nor overwritten.
    for _attempt in 0..3 {
        let observed = observe(&context.sources, &current).await?;
        let plan = crate::strategy::plan(&current, &observed, Timestamp::now());
        if cached::needs_pod_spec(&current, &plan.actions) {
            current = api
                .get(&current.name_any())
                .await
                .map_err(ReconcileError::ReadRollout)?;
            continue;
        }
        let before = context
            .sources
            .caches
            .as_ref()
            .map(|caches| caches.versions_before(&current, &plan.actions))
            .unwrap_or_default();
        let mut written = Vec::new();
        let acted = act_recorded(
            &context.client,
            &context.fence,
            &current,
            &plan.actions,
            &mut written,
        )
        .await;
        // Also the writes made before a failure: the next plan must not send them again.
        if let Some(caches) = &context.sources.caches {
            caches.record(&current, &written, &before, Instant::now());
        }
        let applied = match acted {
            Ok(applied) => applied,
            Err(error) => {
                let reason = failure_reason(error.category());
                publish(context, &current, true, &reason, &error.to_string()).await;
                return Err(error.into());
            }
        };
        context.metrics.wrote(applied as u64);
        let when = status_write(
            current.status.as_ref(),
            &plan.status,
            &WriteContext {
                now: Timestamp::now(),
                interval: progress_write_interval(&current),
                announces: !plan.events.is_empty(),
                pods_at_rest: pods_at_rest(&observed, &plan.actions),
                weight_follows_pods: weight_follows_pods(&current),
            },
        );
        let routes_watched = match &context.sources.caches {
            Some(caches) => caches.routes_watched(&current),
            None => crate::traffic::router_for(&current).is_none(),
        };
        let resync = spread_resync(
            current.metadata.uid.as_deref().unwrap_or_default(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            resync_for(routes_watched, context.resync),
        );
        let resync = match when {
            StatusWrite::Later(wait) => resync.min(wait),
            StatusWrite::Now | StatusWrite::Unchanged => resync,
        };
        if tracing::enabled!(tracing::Level::DEBUG) && when != StatusWrite::Unchanged {
            tracing::debug!(
                rollout = %key,
                ?when,
                fields = ?status_write::changed_fields(current.status.as_ref(), &plan.status),
                "status differs"
            );
        }
        let write = match when {
            StatusWrite::Now => write_status(&api, &context.fence, &current, &plan.status).await,
            StatusWrite::Later(_) | StatusWrite::Unchanged => Ok(None),
        };
        match write {
            Ok(written) => {
                context.metrics.wrote(u64::from(written.is_some()));
                if let Some(written) = written {
                    context.written.remember(&current, written);
                }
                for event in &plan.events {
                    context.metrics.decided(event.reason);
                    publish(
                        context,
                        &current,
                        event.warning,
                        event.reason,
                        &event.message,
                    )
                    .await;
                }
                let reference = reflector::ObjectRef::new(&current.name_any()).within(&namespace);
                context.metrics.rollout_state(
                    &namespace,
                    &current.name_any(),
                    plan.status.phase,
                    plan.status.current_weight,
                    || {
                        context
                            .rollouts
                            .get(&reference)
                            .is_some_and(|stored| stored.metadata.uid == current.metadata.uid)
                    },
                );
                return Ok(requeue_for(&plan, resync));
            }
            Err(StatusWriteError::Conflict) => {
                current = api
                    .get(&current.name_any())
                    .await
                    .map_err(ReconcileError::ReadRollout)?;
            }
            Err(StatusWriteError::Other(error)) => return Err(ReconcileError::WriteStatus(error)),
            Err(StatusWriteError::Fenced(fenced)) => return Err(fenced.into()),
        }
    }
    Err(ReconcileError::StatusConflict)
}

/// How often a Rollout is looked at when nothing triggers it: the configured resync, and for a routed
/// Rollout whose routing objects are not watched (their resource cannot be listed) at most
/// [`routes::UNWATCHED_ROUTE_RESYNC`], so a hand edit of its weights is still found; a look that finds
/// nothing wrong writes nothing (safety rule 5).
fn resync_for(routes_watched: bool, resync: Duration) -> Duration {
    if routes_watched {
        resync
    } else {
        resync.min(routes::UNWATCHED_ROUTE_RESYNC)
    }
}

/// How long until a settled Rollout is looked at again: the time to its own slot in the resync period.
///
/// Every Rollout has a fixed slot within the period (from a hash of its uid) and is looked at when the
/// clock passes it, at most `period` after the last look. So settled Rollouts are looked at evenly spread
/// over the period whenever they settled: a wave that settles 10,000 Rollouts within a minute does not
/// come back as a burst of 10,000 reconciles every period. A look that happens to fall just before the
/// slot (a trigger) is followed by another one soon after; that costs one no-op reconcile, not a burst.
pub fn spread_resync(uid: &str, since_epoch: Duration, period: Duration) -> Duration {
    let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut hasher = DefaultHasher::new();
    uid.hash(&mut hasher);
    let slot = hasher.finish() % period_ms;
    let now = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX) % period_ms;
    let wait = (slot + period_ms - now) % period_ms;
    Duration::from_millis(if wait == 0 { period_ms } else { wait })
}

fn requeue_for(plan: &Plan, resync: Duration) -> Requeue {
    match plan.requeue_after {
        Some(after) => Requeue::requeue(after.min(resync)),
        None => Requeue::requeue(resync),
    }
}

fn error_policy(
    _rollout: Arc<StoredRollout>,
    error: &ReconcileError,
    context: Arc<ScopeContext>,
) -> Requeue {
    tracing::warn!(category = error.category(), %error, "reconcile failed");
    match error {
        ReconcileError::StatusConflict => Requeue::requeue(Duration::from_millis(10)),
        _ => Requeue::requeue(context.error_backoff),
    }
}

enum StatusWriteError {
    Conflict,
    Fenced(Fenced),
    Other(kube::Error),
}

/// Writes the planned status; the write carries the Rollout's resourceVersion, so it fails with a conflict
/// instead of erasing a command written meanwhile.
async fn write_status(
    api: &Api<Rollout>,
    fence: &Fence,
    rollout: &Rollout,
    status: &RolloutStatus,
) -> Result<Option<Rollout>, StatusWriteError> {
    fence.check().map_err(StatusWriteError::Fenced)?;
    let mut updated = rollout.clone();
    updated.status = Some(status.clone());
    updated.metadata.managed_fields = None;
    let params = PostParams {
        field_manager: Some(crate::crd::FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match api
        .replace_status(&rollout.name_any(), &params, &updated)
        .await
    {
        Ok(written) => Ok(Some(written)),
        Err(kube::Error::Api(status)) if status.is_conflict() => Err(StatusWriteError::Conflict),
        Err(error) => Err(StatusWriteError::Other(error)),
    }
}

/// The event reason for a failed action: its bounded category in PascalCase (`scale_replicaset` ->
/// `ScaleReplicasetFailed`), so events and metrics name failures alike.
pub fn failure_reason(category: &str) -> String {
    let mut reason: String = category
        .split('_')
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    reason.push_str("Failed");
    reason
}

async fn publish(
    context: &ScopeContext,
    rollout: &Rollout,
    warning: bool,
    reason: &str,
    message: &str,
) {
    if context.fence.check().is_err() {
        tracing::debug!(reason, "not leading any more: event not recorded");
        return;
    }
    let recorded = Note {
        severity: if warning {
            Severity::Warning
        } else {
            Severity::Normal
        },
        reason,
        message,
    };
    if let Err(error) = context
        .recorder
        .publish(&recorded, &rollout.object_ref(&()))
        .await
    {
        tracing::warn!(%error, reason, "recording an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rollout::{ManualCommands, PromoteCommand};
    use crate::crd::RolloutPhase;
    use serde_json::json;

    fn rollout() -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "generation": 1},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}},
                "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}
            }
        }))
        .expect("valid rollout")
    }

    #[test]
    fn status_only_changes_do_not_trigger_but_commands_and_spec_changes_do() {
        let base = rollout();
        let mut status_only = base.clone();
        status_only.status = Some(RolloutStatus {
            phase: Some(RolloutPhase::Paused),
            current_weight: Some(20),
            ..Default::default()
        });
        status_only.metadata.resource_version = Some("99".into());
        assert_eq!(
            rollout_trigger_hash(&base),
            rollout_trigger_hash(&status_only)
        );

        let mut promoted = status_only.clone();
        promoted
            .status
            .get_or_insert_with(Default::default)
            .commands = Some(ManualCommands {
            promote: Some(PromoteCommand::Step),
            ..Default::default()
        });
        assert_ne!(
            rollout_trigger_hash(&status_only),
            rollout_trigger_hash(&promoted)
        );

        let mut new_spec = base.clone();
        new_spec.metadata.generation = Some(2);
        assert_ne!(rollout_trigger_hash(&base), rollout_trigger_hash(&new_spec));

        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        assert_ne!(rollout_trigger_hash(&base), rollout_trigger_hash(&deleting));
    }

    #[test]
    fn failure_reasons_are_the_category_in_pascal_case() {
        assert_eq!(failure_reason("scale_replicaset"), "ScaleReplicasetFailed");
        assert_eq!(failure_reason("set_traffic"), "SetTrafficFailed");
    }

    #[test]
    fn settled_rollouts_are_looked_at_spread_over_the_resync_period() {
        let period = Duration::from_secs(300);
        let now = Duration::from_secs(1_000_000);
        // 10,000 Rollouts that settled at the same moment: their next looks fall evenly over the period.
        let mut per_tenth = [0u32; 10];
        for index in 0..10_000 {
            let wait = spread_resync(&format!("uid-{index}"), now, period);
            assert!(wait > Duration::ZERO && wait <= period, "{wait:?}");
            per_tenth[(wait.as_secs_f64() / 30.0) as usize % 10] += 1;
        }
        for count in per_tenth {
            assert!((850..=1150).contains(&count), "{per_tenth:?}");
        }
        // One Rollout keeps its slot: looked at again one period after its slot passed, whenever it was
        // reconciled in between.
        let first = spread_resync("uid-7", now, period);
        let slot = now + first;
        assert_eq!(spread_resync("uid-7", slot, period), period);
        let halfway = Duration::from_millis(first.as_millis() as u64 / 2);
        assert_eq!(
            spread_resync("uid-7", now + halfway, period),
            first - halfway
        );
    }

    #[test]
    fn requeue_follows_the_plan_but_never_later_than_the_resync() {
        let plan = Plan {
            requeue_after: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(
            requeue_for(&plan, Duration::from_secs(300)),
            Requeue::requeue(Duration::from_secs(2))
        );
        assert_eq!(
            requeue_for(&Plan::default(), Duration::from_secs(300)),
            Requeue::requeue(Duration::from_secs(300))
        );
    }

    #[tokio::test]
    async fn listed_rollouts_are_triggered_only_once_the_list_is_done() {
        use futures::StreamExt;
        use kube::runtime::watcher::Event as W;
        let named = |name: &str| -> Rollout {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "a"}},
                         "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": []}},
                         "strategy": {"canary": {}}}
            }))
            .expect("a rollout")
        };
        let stored = |name: &str| StoredRollout::pack(&named(name));
        let events = vec![
            Ok(W::Apply(stored("before"))),
            Ok(W::Init),
            Ok(W::InitApply(stored("a"))),
            Ok(W::InitApply(stored("b"))),
            Ok(W::InitDone),
            Ok(W::Delete(stored("a"))),
            Ok(W::Apply(stored("c"))),
        ];
        let names: Vec<String> = triggers_once_stored(futures::stream::iter(events))
            .map(|r| r.map(|r| r.name_any()).unwrap_or_default())
            .collect()
            .await;
        assert_eq!(names, ["before", "a", "b", "c"]);
    }

    #[test]
    fn a_listed_rollouts_trigger_hashes_as_the_rollout_does() {
        let mut rollout = rollout();
        rollout.metadata.generation = Some(4);
        rollout.metadata.uid = Some("u-1".into());
        rollout.status = Some(RolloutStatus {
            commands: Some(ManualCommands {
                promote: Some(PromoteCommand::Step),
                ..Default::default()
            }),
            message: Some("revision 4 is stable".into()),
            ..Default::default()
        });
        let trigger = StoredRollout::pack(&rollout).trigger();
        assert_eq!(trigger.trigger_hash, rollout_trigger_hash(&rollout));
        assert_eq!(trigger.name_any(), rollout.name_any());
        assert_eq!(trigger.namespace(), rollout.namespace());
        assert!(
            trigger.unpack().is_err(),
            "a trigger carries no spec or status"
        );
    }
}
