//! Reads what a Rollout owns and names (ReplicaSets, Services, AnalysisRuns, templates) into one `Observed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};

use super::act::Written;
use super::cached::{CachedAnalysisRun, CachedReplicaSet, CachedService, StoredRollout};
use super::expectations::{Expectations, NamedWrite, ReplicaSetWrite};
use super::index::{referenced_objects, IndexedCache};
use super::neighbours::NeighbourIndex;
use super::routes::RouteCaches;
use super::sync::{Cache, CacheGate};

use crate::crd::analysis::AnalysisRun;
use crate::crd::rollout::{AnalysisTemplateRef, RolloutStrategy};
use crate::crd::{
    labels, AnalysisTemplate, AnalysisTemplateSpec, ClusterAnalysisTemplate, Rollout,
};
use crate::strategy::{
    pod_template_hash, AnalysisPurpose, Neighbour, Observed, ObservedAnalysisRun,
    ObservedReplicaSet, ObservedService, TemplateKey,
};
use crate::strategy::{Action, DesiredTraffic, ObservedTraffic, RouteState};
use crate::traffic::{router_for, ObjectKey, RouteInvalid, RouterObjects, RoutingKind};

/// Values of the `serin.dev/analysis` label on AnalysisRuns.
pub mod analysis_kind {
    pub const STEP: &str = "step";
    pub const BACKGROUND: &str = "background";
    pub const PRE_PROMOTION: &str = "pre-promotion";
    pub const POST_PROMOTION: &str = "post-promotion";
}

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("the Rollout has no namespace")]
    RolloutWithoutNamespace,
    #[error("listing ReplicaSets failed: {0}")]
    ListReplicaSets(#[source] kube::Error),
    #[error("reading Service {name} failed: {source}")]
    ReadService {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing AnalysisRuns failed: {0}")]
    ListAnalysisRuns(#[source] kube::Error),
    #[error("reading ReplicaSet {name} failed: {source}")]
    ReadReplicaSet {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing Rollouts failed: {0}")]
    ListRollouts(#[source] kube::Error),
    #[error("reading analysis template {name} failed: {source}")]
    ReadTemplate {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ObserveError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ObserveError::RolloutWithoutNamespace => "rollout_without_namespace",
            ObserveError::ListReplicaSets(_) => "list_replicasets",
            ObserveError::ReadService { .. } => "read_service",
            ObserveError::ListAnalysisRuns(_) => "list_analysisruns",
            ObserveError::ReadReplicaSet { .. } => "read_replicaset",
            ObserveError::ListRollouts(_) => "list_rollouts",
            ObserveError::ReadTemplate { .. } => "read_template",
        }
    }
}

/// The controller's watch caches, indexed for the lookups a reconcile makes, and its own writes that they
/// may not show yet.
#[derive(Clone)]
pub struct Caches {
    pub replica_sets: Arc<IndexedCache<CachedReplicaSet>>,
    pub services: Arc<IndexedCache<CachedService>>,
    pub analysis_runs: Arc<IndexedCache<CachedAnalysisRun>>,
    pub routes: RouteCaches,
    pub expectations: Arc<Expectations>,
    /// Which caches are synced: routing objects are read from theirs only then.
    pub gate: Arc<CacheGate>,
    /// The Rollouts the controller watches, for the Services and pods two of them must not share, and
    /// the index that narrows which of them to compare.
    pub rollouts: Option<(Store<StoredRollout>, Arc<NeighbourIndex>)>,
}

impl Caches {
    /// Empty caches whose state `gate` tracks.
    pub fn new(gate: Arc<CacheGate>) -> Caches {
        Caches {
            replica_sets: Default::default(),
            services: Default::default(),
            analysis_runs: Default::default(),
            routes: RouteCaches::new(),
            expectations: Default::default(),
            gate,
            rollouts: None,
        }
    }

    /// The same caches, reading the other Rollouts of a namespace from `rollouts`, narrowed by `index`.
    pub fn with_rollouts(
        self,
        rollouts: Store<StoredRollout>,
        index: Arc<NeighbourIndex>,
    ) -> Caches {
        Caches {
            rollouts: Some((rollouts, index)),
            ..self
        }
    }

    /// Whether every object in `keys` can be read from a synced cache.
    fn serves(&self, keys: &[ObjectKey]) -> bool {
        keys.iter()
            .all(|key| self.gate.synced(Cache::of_routing(key.kind)))
    }

    /// Whether the routing objects the Rollout names are watched (true without a router): then a change
    /// to them triggers its reconcile and no periodic look is needed.
    pub fn routes_watched(&self, rollout: &Rollout) -> bool {
        match router_for(rollout) {
            Some(Ok(router)) => self.serves(&router.objects()),
            Some(Err(_)) | None => true,
        }
    }

    /// The objects as the router reads them, from the caches; `None` when one of their caches is not synced.
    fn router_objects(&self, keys: &[ObjectKey]) -> Option<RouterObjects> {
        if !self.serves(keys) {
            return None;
        }
        let mut objects = RouterObjects::new();
        for key in keys {
            let found = match key.kind {
                RoutingKind::Service => self
                    .services
                    .get(&key.namespace, &key.name)
                    .map(|service| service.to_value()),
                kind => self.routes.object(kind, &key.namespace, &key.name),
            };
            if let Some(object) = found {
                objects.insert(key.clone(), object);
            }
        }
        Some(objects)
    }

    /// The resourceVersions the caches hold for `keys` (None: not there).
    fn versions(&self, keys: &[ObjectKey]) -> BTreeMap<ObjectKey, Option<String>> {
        keys.iter()
            .map(|key| {
                let version = match key.kind {
                    RoutingKind::Service => self
                        .services
                        .get(&key.namespace, &key.name)
                        .and_then(|service| service.resource_version.as_deref().map(String::from)),
                    kind => self
                        .routes
                        .cache(kind)
                        .and_then(|cache| cache.get(&key.namespace, &key.name))
                        .and_then(|object| object.resource_version()),
                };
                (key.clone(), version)
            })
            .collect()
    }

    /// The resourceVersion the Service cache holds for `name`, keyed as the expectations keep it.
    fn service_version(&self, namespace: &str, name: &str) -> BTreeMap<ObjectKey, Option<String>> {
        let key = ObjectKey::new(RoutingKind::Service, namespace, name);
        self.versions(std::slice::from_ref(&key))
    }

    /// The cached versions of every object `rollout` reads by name, taken before a reconcile writes to
    /// them: an expectation must hold only while the cache shows exactly what it showed before the write.
    /// Read after the write, a hand edit that reached the cache meanwhile would be taken for the state our
    /// write replaced, and hidden behind it until the expectation expired. Empty when `actions` write
    /// nothing read by name, so a reconcile that changes no selector or route pays nothing for it.
    pub fn versions_before(
        &self,
        rollout: &Rollout,
        actions: &[Action],
    ) -> BTreeMap<ObjectKey, Option<String>> {
        let by_name = actions.iter().any(|action| {
            matches!(
                action,
                Action::SetServiceSelector { .. } | Action::SetTraffic(_)
            )
        });
        if !by_name {
            return BTreeMap::new();
        }
        let keys: Vec<ObjectKey> = referenced_objects(rollout).into_iter().collect();
        self.versions(&keys)
    }

    /// Remembers what a reconcile of `rollout` wrote, until the caches show it; `before` is what
    /// [`Caches::versions_before`] answered before the writes.
    pub fn record(
        &self,
        rollout: &Rollout,
        written: &[Written],
        before: &BTreeMap<ObjectKey, Option<String>>,
        now: Instant,
    ) {
        // What `before` holds of `keys`, keyed as the expectations keep it.
        let versions_before = |keys: &[ObjectKey]| -> BTreeMap<ObjectKey, Option<String>> {
            keys.iter()
                .map(|key| (key.clone(), before.get(key).cloned().flatten()))
                .collect()
        };
        let (Some(uid), Some(namespace)) = (rollout.uid(), rollout.namespace()) else {
            return;
        };
        for write in written {
            match write {
                Written::ReplicaSet { object, created } => self.expectations.replica_set(
                    &uid,
                    &object.name_any(),
                    ReplicaSetWrite::written(object, *created, now),
                ),
                Written::ReplicaSetDeleted { name, uid: deleted } => self.expectations.replica_set(
                    &uid,
                    name,
                    ReplicaSetWrite::Deleted {
                        uid: deleted.clone(),
                        at: now,
                    },
                ),
                Written::Selector {
                    service,
                    pod_template_hash,
                } => self.expectations.selector(
                    &uid,
                    service,
                    NamedWrite {
                        versions: versions_before(&[ObjectKey::new(
                            RoutingKind::Service,
                            &namespace,
                            service,
                        )]),
                        value: pod_template_hash.clone(),
                        at: now,
                    },
                ),
                Written::Traffic(desired) => {
                    // Without synced caches the routing objects are read from the API server, which
                    // already shows the write.
                    let Some(Ok(router)) = router_for(rollout) else {
                        continue;
                    };
                    let keys = router.objects();
                    if self.serves(&keys) {
                        self.expectations.traffic(
                            &uid,
                            NamedWrite {
                                versions: versions_before(&keys),
                                value: carried(desired),
                                at: now,
                            },
                        );
                    }
                }
            }
        }
    }
}

/// Where observations come from: the controller's watch caches when it runs them, the API otherwise.
#[derive(Clone)]
pub struct Sources {
    pub client: Client,
    pub caches: Option<Caches>,
}

impl Sources {
    /// Observations read straight from the API server (no caches).
    pub fn direct(client: Client) -> Sources {
        Sources {
            client,
            caches: None,
        }
    }

    /// Observations read from `caches`.
    pub fn cached(client: Client, caches: Caches) -> Sources {
        Sources {
            client,
            caches: Some(caches),
        }
    }
}

/// Reads everything the planner needs about one Rollout.
pub async fn observe(sources: &Sources, rollout: &Rollout) -> Result<Observed, ObserveError> {
    let namespace = rollout
        .namespace()
        .ok_or(ObserveError::RolloutWithoutNamespace)?;
    let name = rollout.name_any();
    let uid = rollout.uid().unwrap_or_default();
    let selector = format!("{}={}", labels::ROLLOUT_NAME, name);

    let now = Instant::now();
    let replica_sets: Vec<ObservedReplicaSet> = match &sources.caches {
        Some(caches) => caches.expectations.overlay_replica_sets(
            &uid,
            &caches.replica_sets.controlled_by(&namespace, &uid),
            now,
        ),
        None => {
            let api: Api<ReplicaSet> = Api::namespaced(sources.client.clone(), &namespace);
            api.list(&ListParams::default().labels(&selector))
                .await
                .map_err(ObserveError::ListReplicaSets)?
                .items
                .iter()
                .filter(|rs| is_controlled_by(*rs, &uid))
                .map(observed_replica_set)
                .collect()
        }
    };

    let services = observe_services(sources, rollout, &namespace, &uid, now).await?;

    let analysis_runs: Vec<ObservedAnalysisRun> = match &sources.caches {
        Some(caches) => caches
            .analysis_runs
            .controlled_by(&namespace, &uid)
            .iter()
            .filter_map(|run| run.view.clone())
            .collect(),
        None => {
            let api: Api<AnalysisRun> = Api::namespaced(sources.client.clone(), &namespace);
            api.list(&ListParams::default().labels(&selector))
                .await
                .map_err(ObserveError::ListAnalysisRuns)?
                .items
                .iter()
                .filter(|run| is_controlled_by(*run, &uid))
                .filter_map(observed_analysis_run)
                .collect()
        }
    };

    let mut analysis_templates = BTreeMap::new();
    for reference in template_refs(&rollout.spec.strategy) {
        let key = TemplateKey {
            name: reference.template_name.clone(),
            cluster_scope: reference.cluster_scope,
        };
        if analysis_templates.contains_key(&key) {
            continue;
        }
        let found = read_template(&sources.client, &namespace, &key).await?;
        analysis_templates.insert(key, found);
    }

    let foreign_replica_set =
        foreign_replica_set(sources, rollout, &namespace, &uid, &replica_sets).await?;
    let neighbours = neighbours(sources, rollout, &namespace).await?;

    Ok(Observed {
        foreign_replica_set,
        neighbours,
        replica_sets,
        services,
        // Without a router (None) the planner routes by replica counts behind the Services.
        traffic: observe_traffic(sources, rollout, &uid, now).await,
        analysis_runs,
        analysis_templates,
    })
}

/// The Services the strategy names, as the planner reads them: from the cache with the controller's
/// own last selector write laid over it, from the API server when the cache does not show one.
async fn observe_services(
    sources: &Sources,
    rollout: &Rollout,
    namespace: &str,
    uid: &str,
    now: Instant,
) -> Result<BTreeMap<String, ObservedService>, ObserveError> {
    let mut services = BTreeMap::new();
    for service_name in service_names(&rollout.spec.strategy) {
        let cached = sources.caches.as_ref().and_then(|caches| {
            caches.services.get(namespace, &service_name).map(|svc| {
                let mut observed = svc.view();
                let current = caches.service_version(namespace, &service_name);
                if let Some(written) =
                    caches
                        .expectations
                        .selector_written(uid, &service_name, &current, now)
                {
                    pin_hash(&mut observed, written);
                }
                observed
            })
        });
        // A Service the cache does not show may have been created just before the Rollout whose event
        // came first: it is only missing once the API server says so.
        let found = match cached {
            Some(service) => Some(service),
            None => {
                let api: Api<Service> = Api::namespaced(sources.client.clone(), namespace);
                api.get_opt(&service_name)
                    .await
                    .map_err(|source| ObserveError::ReadService {
                        name: service_name.clone(),
                        source,
                    })?
                    .map(|svc| observed_service(&svc))
            }
        };
        if let Some(service) = found {
            services.insert(service_name.clone(), service);
        }
    }
    Ok(services)
}

/// The name of the ReplicaSet the current template would get, when an object Serin does not control holds
/// it. Looked up only while no owned ReplicaSet has the current hash (before the create), so a settled
/// Rollout costs no request.
async fn foreign_replica_set(
    sources: &Sources,
    rollout: &Rollout,
    namespace: &str,
    uid: &str,
    owned: &[ObservedReplicaSet],
) -> Result<Option<String>, ObserveError> {
    let hash = pod_template_hash(&rollout.spec.template);
    if owned.iter().any(|rs| rs.pod_template_hash == hash) {
        return Ok(None);
    }
    let name = format!("{}-{hash}", rollout.name_any());
    // The watch cache holds only ReplicaSets labelled as Serin's; a squatter need not be.
    let api: Api<ReplicaSet> = Api::namespaced(sources.client.clone(), namespace);
    let found = api
        .get_opt(&name)
        .await
        .map_err(|source| ObserveError::ReadReplicaSet {
            name: name.clone(),
            source,
        })?;
    Ok(found.filter(|rs| !is_controlled_by(rs, uid)).map(|_| name))
}

/// The other Rollouts of the namespace that may collide with this one: from the watch store, narrowed by
/// the neighbourhood index, or listed (one by one decoded, so one that
/// does not decode is left out rather than failing the list).
async fn neighbours(
    sources: &Sources,
    rollout: &Rollout,
    namespace: &str,
) -> Result<Vec<Neighbour>, ObserveError> {
    let others: Vec<Rollout> = match sources.caches.as_ref().and_then(|c| c.rollouts.as_ref()) {
        Some((store, index)) => index
            .candidates(rollout)
            .into_iter()
            .filter_map(|name| store.get(&ObjectRef::new(&name).within(namespace)))
            .filter_map(|stored| stored.unpack().ok())
            .collect(),
        None => {
            let api: Api<DynamicObject> = Api::namespaced_with(
                sources.client.clone(),
                namespace,
                &ApiResource::erase::<Rollout>(&()),
            );
            api.list(&ListParams::default())
                .await
                .map_err(ObserveError::ListRollouts)?
                .items
                .into_iter()
                .filter_map(|object| super::undecodable::decode(object).ok())
                .collect()
        }
    };
    Ok(others
        .iter()
        .filter(|other| other.uid() != rollout.uid() && other.metadata.deletion_timestamp.is_none())
        .map(|other| neighbour(rollout, other))
        .collect())
}

/// How `other` can collide with `rollout`.
pub fn neighbour(rollout: &Rollout, other: &Rollout) -> Neighbour {
    let created = |r: &Rollout| {
        (
            r.metadata.creation_timestamp.as_ref().map(|t| t.0),
            r.name_any(),
        )
    };
    Neighbour {
        name: other.name_any(),
        older: created(other) < created(rollout),
        services: service_names(&other.spec.strategy),
        selector: other.spec.selector.clone(),
        pod_labels: other
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|meta| meta.labels.clone())
            .unwrap_or_default(),
    }
}

/// What the Rollout's router carries: from the caches when they are synced (with the controller's own
/// last write laid over them until they show it), from the API server otherwise.
async fn observe_traffic(
    sources: &Sources,
    rollout: &Rollout,
    uid: &str,
    now: Instant,
) -> RouteState {
    let router = match router_for(rollout) {
        None => return RouteState::NotConfigured,
        Some(Ok(router)) => router,
        Some(Err(error)) => return RouteState::Invalid(error.to_string()),
    };
    let keys = router.objects();
    let cached = sources
        .caches
        .as_ref()
        .and_then(|caches| Some((caches, caches.router_objects(&keys)?)));
    let Some((caches, objects)) = cached else {
        let observed = crate::traffic::observe(&sources.client, rollout).await;
        // A routing object missing because its resource cannot be listed at all (a CRD not installed)
        // says so, beside the router's own message.
        let unavailable: std::collections::BTreeSet<String> = sources
            .caches
            .iter()
            .flat_map(|caches| {
                keys.iter().filter_map(|key| {
                    let cache = Cache::of_routing(key.kind);
                    let reason = caches.gate.unavailable_reason(cache)?;
                    Some(format!("listing {} failed: {reason}", cache.name()))
                })
            })
            .collect();
        return match observed {
            RouteState::Invalid(message) if !unavailable.is_empty() => {
                let reasons: Vec<String> = unavailable.into_iter().collect();
                RouteState::Invalid(format!("{message} ({})", reasons.join("; ")))
            }
            observed => observed,
        };
    };
    if let Some(written) = caches
        .expectations
        .traffic_written(uid, &caches.versions(&keys), now)
    {
        return RouteState::Observed(written);
    }
    match router.observe(&objects) {
        // A watch shows an object some milliseconds after it was created, and the Rollout naming it may
        // arrive first: "missing" is only said once the API server confirms it.
        Err(RouteInvalid::Missing { .. }) => {
            crate::traffic::observe(&sources.client, rollout).await
        }
        observed => crate::traffic::observed_state(observed),
    }
}

/// What a router carries once it was made to carry `desired`.
pub fn carried(desired: &DesiredTraffic) -> ObservedTraffic {
    ObservedTraffic {
        canary_weight: desired.canary_weight,
        header_routes: desired
            .header_routes
            .iter()
            .map(|route| route.name.clone())
            .collect(),
        mirror_routes: desired
            .mirror_routes
            .iter()
            .map(|route| route.name.clone())
            .collect(),
    }
}

async fn read_template(
    client: &Client,
    namespace: &str,
    key: &TemplateKey,
) -> Result<Result<AnalysisTemplateSpec, String>, ObserveError> {
    let read_error = |source| ObserveError::ReadTemplate {
        name: key.name.clone(),
        source,
    };
    if key.cluster_scope {
        let api: Api<ClusterAnalysisTemplate> = Api::all(client.clone());
        Ok(match api.get_opt(&key.name).await.map_err(read_error)? {
            Some(template) => Ok(AnalysisTemplateSpec {
                args: template.spec.args,
                metrics: template.spec.metrics,
                dry_run: template.spec.dry_run,
            }),
            None => Err(format!("ClusterAnalysisTemplate {} not found", key.name)),
        })
    } else {
        let api: Api<AnalysisTemplate> = Api::namespaced(client.clone(), namespace);
        Ok(match api.get_opt(&key.name).await.map_err(read_error)? {
            Some(template) => Ok(template.spec),
            None => Err(format!(
                "AnalysisTemplate {} not found in namespace {namespace}",
                key.name
            )),
        })
    }
}

/// Whether `object` has a controller ownerReference to the object with `uid`.
pub fn is_controlled_by<K: Resource>(object: &K, uid: &str) -> bool {
    !uid.is_empty()
        && object
            .meta()
            .owner_references
            .iter()
            .flatten()
            .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// The Services a strategy names, in a stable order.
pub fn service_names(strategy: &RolloutStrategy) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(canary) = &strategy.canary {
        names.extend(canary.stable_service.iter().cloned());
        names.extend(canary.canary_service.iter().cloned());
    }
    if let Some(blue_green) = &strategy.blue_green {
        names.push(blue_green.active_service.clone());
        names.extend(blue_green.preview_service.iter().cloned());
    }
    names.retain(|name| !name.is_empty());
    names.dedup();
    names
}

/// Every analysis template a strategy refers to.
pub fn template_refs(strategy: &RolloutStrategy) -> Vec<&AnalysisTemplateRef> {
    let mut refs = Vec::new();
    if let Some(canary) = &strategy.canary {
        if let Some(background) = &canary.analysis {
            refs.extend(background.templates.iter());
        }
        for step in &canary.steps {
            if let Some(analysis) = &step.analysis {
                refs.extend(analysis.templates.iter());
            }
        }
    }
    if let Some(blue_green) = &strategy.blue_green {
        for analysis in [
            &blue_green.pre_promotion_analysis,
            &blue_green.post_promotion_analysis,
        ]
        .into_iter()
        .flatten()
        {
            refs.extend(analysis.templates.iter());
        }
    }
    refs
}

/// The planner's view of a ReplicaSet.
pub fn observed_replica_set(rs: &ReplicaSet) -> ObservedReplicaSet {
    let status = rs.status.as_ref();
    ObservedReplicaSet {
        name: rs.name_any(),
        pod_template_hash: rs
            .labels()
            .get(labels::POD_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        revision: rs
            .annotations()
            .get(labels::REVISION)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0),
        spec_replicas: rs.spec.replicas.unwrap_or(1),
        replicas: status.map(|s| s.replicas).unwrap_or(0),
        ready_replicas: status.and_then(|s| s.ready_replicas).unwrap_or(0),
        available_replicas: status.and_then(|s| s.available_replicas).unwrap_or(0),
        status_current: match (
            rs.metadata.generation,
            status.and_then(|s| s.observed_generation),
        ) {
            (Some(generation), Some(observed)) => observed >= generation,
            (None, _) => true,
            (Some(_), None) => false,
        },
        deleting: rs.metadata.deletion_timestamp.is_some(),
    }
}

/// The planner's view of a Service.
pub fn observed_service(service: &Service) -> ObservedService {
    ObservedService {
        name: service.name_any(),
        selector: service
            .spec
            .as_ref()
            .and_then(|spec| spec.selector.clone())
            .unwrap_or_default(),
    }
}

/// A Service as it selects after Serin pinned its pod-template hash (`Some`) or unpinned it (`None`).
fn pin_hash(service: &mut ObservedService, hash: Option<String>) {
    match hash {
        Some(hash) => {
            service
                .selector
                .insert(labels::POD_TEMPLATE_HASH.to_string(), hash);
        }
        None => {
            service.selector.remove(labels::POD_TEMPLATE_HASH);
        }
    }
}

/// The planner's view of an AnalysisRun; `None` for a run without Serin's purpose labels.
pub fn observed_analysis_run(run: &AnalysisRun) -> Option<ObservedAnalysisRun> {
    let run_labels = run.labels();
    let purpose = match run_labels.get(labels::ANALYSIS_KIND)?.as_str() {
        analysis_kind::STEP => {
            AnalysisPurpose::Step(run_labels.get(labels::STEP_INDEX)?.parse().ok()?)
        }
        analysis_kind::BACKGROUND => AnalysisPurpose::Background,
        analysis_kind::PRE_PROMOTION => AnalysisPurpose::PrePromotion,
        analysis_kind::POST_PROMOTION => AnalysisPurpose::PostPromotion,
        _ => return None,
    };
    let status = run.status.as_ref();
    Some(ObservedAnalysisRun {
        name: run.name_any(),
        purpose,
        pod_template_hash: run_labels
            .get(labels::POD_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        phase: status.and_then(|s| s.phase).unwrap_or_default(),
        message: status.and_then(|s| s.message.clone()),
        terminating: run.spec.terminate,
        latest_successful: status.is_some_and(|s| latest_successful(&s.metric_results)),
    })
}

/// Every metric that is not a dry run has a latest measurement, and it was Successful.
fn latest_successful(metrics: &[crate::crd::analysis::MetricResult]) -> bool {
    let mut counted = metrics.iter().filter(|m| !m.dry_run).peekable();
    counted.peek().is_some()
        && counted.all(|m| {
            m.measurements
                .last()
                .is_some_and(|last| last.phase == crate::crd::AnalysisPhase::Successful)
        })
}

/// The labels that mark an AnalysisRun's purpose (the inverse of [`observed_analysis_run`]).
pub fn purpose_labels(purpose: AnalysisPurpose) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let kind = match purpose {
        AnalysisPurpose::Step(index) => {
            out.insert(labels::STEP_INDEX.to_string(), index.to_string());
            analysis_kind::STEP
        }
        AnalysisPurpose::Background => analysis_kind::BACKGROUND,
        AnalysisPurpose::PrePromotion => analysis_kind::PRE_PROMOTION,
        AnalysisPurpose::PostPromotion => analysis_kind::POST_PROMOTION,
    };
    out.insert(labels::ANALYSIS_KIND.to_string(), kind.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::analysis::{AnalysisRunSpec, AnalysisRunStatus};
    use crate::crd::AnalysisPhase;
    use k8s_openapi::api::apps::v1::{ReplicaSetSpec, ReplicaSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::runtime::watcher;
    use serde_json::json;

    fn owned_rs(uid: &str, controller: bool) -> ReplicaSet {
        let mut rs = ReplicaSet::default();
        rs.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "serin.dev/v1alpha1".into(),
            kind: "Rollout".into(),
            name: "web".into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: Some(true),
        }]);
        rs
    }

    #[test]
    fn a_hand_edit_that_reaches_the_cache_before_the_write_is_recorded_is_not_hidden() {
        let caches = Caches::new(Arc::new(CacheGate::new(|| ())));
        let service = |version: &str, hash: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "shop", "resourceVersion": version},
                "spec": {"selector": {"app": "web", labels::POD_TEMPLATE_HASH: hash}}
            }))
            .expect("a service")
        };
        let rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}},
                     "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary"}}}
        }))
        .expect("a rollout");
        caches
            .services
            .apply(&watcher::Event::Apply(service("1", "old")));
        let selector = [Action::SetServiceSelector {
            service: "web".into(),
            pod_template_hash: Some("h2".into()),
        }];
        assert!(caches.versions_before(&rollout, &[]).is_empty());
        let before = caches.versions_before(&rollout, &selector);
        // The controller pins the selector to h2 (resourceVersion 2); before it records that write, the
        // cache has already seen it and a hand edit after it (resourceVersion 3).
        caches
            .services
            .apply(&watcher::Event::Apply(service("3", "hand")));
        let written = [Written::Selector {
            service: "web".into(),
            pod_template_hash: Some("h2".into()),
        }];
        let now = Instant::now();
        caches.record(&rollout, &written, &before, now);
        let current = caches.service_version("shop", "web");
        assert_eq!(
            caches
                .expectations
                .selector_written("u", "web", &current, now),
            None,
            "the hand edit must be observed, not our write laid over it"
        );
        // While the cache still shows what it showed before the write, the write is laid over it.
        caches
            .services
            .apply(&watcher::Event::Apply(service("1", "old")));
        caches.record(&rollout, &written, &before, now);
        let current = caches.service_version("shop", "web");
        assert_eq!(
            caches
                .expectations
                .selector_written("u", "web", &current, now),
            Some(Some("h2".into()))
        );
    }

    #[tokio::test]
    async fn a_route_the_cache_does_not_show_yet_is_read_from_the_api_before_it_is_called_missing()
    {
        let sim = serin_sim::SimCluster::start(serin_sim::SimConfig::api_only())
            .await
            .expect("sim starts");
        let client = sim.client().await.expect("client");
        let create = |object: serde_json::Value| {
            let client = client.clone();
            async move {
                let object: DynamicObject = serde_json::from_value(object).expect("an object");
                let resource = match object.types.as_ref().map(|t| t.kind.as_str()) {
                    Some("Service") => ApiResource::erase::<Service>(&()),
                    _ => ApiResource::erase::<k8s_openapi::api::networking::v1::Ingress>(&()),
                };
                Api::<DynamicObject>::namespaced_with(client, "shop", &resource)
                    .create(&Default::default(), &object)
                    .await
                    .expect("created");
            }
        };
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let shop =
            serde_json::from_value(json!({"metadata": {"name": "shop"}})).expect("a namespace");
        namespaces
            .create(&Default::default(), &shop)
            .await
            .expect("namespace");
        for name in ["web", "web-canary"] {
            create(
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                          "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
            )
            .await;
        }
        create(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
            "spec": {"ingressClassName": "nginx", "rules": [{"host": "shop.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}
        }))
        .await;
        let rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}},
                     "strategy": {"canary": {"stableService": "web", "canaryService": "web-canary",
                                             "trafficRouting": {"nginx": {"stableIngress": "web"}}}}}
        }))
        .expect("a rollout");
        // Synced caches that have not seen the Services and the Ingress yet.
        let caches = Caches::new(Arc::new(CacheGate::new(|| ())));
        for cache in [Cache::Services, Cache::Ingresses] {
            caches.gate.observe::<Service>(cache, &watcher::Event::Init);
            caches
                .gate
                .observe::<Service>(cache, &watcher::Event::InitDone);
        }
        let sources = Sources::cached(client, caches);
        let state = observe_traffic(&sources, &rollout, "u", Instant::now()).await;
        assert!(
            matches!(&state, RouteState::Observed(traffic) if traffic.canary_weight == 0),
            "{state:?}"
        );
        sim.shutdown().await;
    }

    #[test]
    fn only_a_controller_reference_with_the_same_uid_counts_as_ownership() {
        assert!(is_controlled_by(&owned_rs("u1", true), "u1"));
        assert!(!is_controlled_by(&owned_rs("u1", true), "u2"));
        assert!(!is_controlled_by(&owned_rs("u1", false), "u1"));
        assert!(!is_controlled_by(&owned_rs("", true), ""));
    }

    #[test]
    fn replica_set_counts_hash_and_revision_are_read_from_labels_spec_and_status() {
        let mut rs = owned_rs("u1", true);
        rs.metadata.name = Some("web-abc".into());
        rs.metadata.generation = Some(3);
        rs.metadata.labels =
            Some([(labels::POD_TEMPLATE_HASH.to_string(), "abc".to_string())].into());
        rs.metadata.annotations = Some([(labels::REVISION.to_string(), "4".to_string())].into());
        rs.spec = ReplicaSetSpec {
            replicas: Some(5),
            ..Default::default()
        };
        rs.status = Some(ReplicaSetStatus {
            replicas: 5,
            ready_replicas: Some(4),
            available_replicas: Some(3),
            observed_generation: Some(2),
            ..Default::default()
        });
        let observed = observed_replica_set(&rs);
        assert_eq!(observed.name, "web-abc");
        assert_eq!(observed.pod_template_hash, "abc");
        assert_eq!(observed.revision, 4);
        assert_eq!((observed.spec_replicas, observed.replicas), (5, 5));
        assert_eq!(
            (observed.ready_replicas, observed.available_replicas),
            (4, 3)
        );
        assert!(
            !observed.status_current,
            "status of generation 2 does not describe generation 3"
        );
    }

    #[test]
    fn a_garbled_revision_annotation_reads_as_zero_instead_of_failing() {
        let mut rs = owned_rs("u1", true);
        rs.metadata.annotations = Some([(labels::REVISION.to_string(), "x".to_string())].into());
        assert_eq!(observed_replica_set(&rs).revision, 0);
    }

    #[test]
    fn analysis_purpose_labels_round_trip() {
        for purpose in [
            AnalysisPurpose::Step(3),
            AnalysisPurpose::Background,
            AnalysisPurpose::PrePromotion,
            AnalysisPurpose::PostPromotion,
        ] {
            let mut run = AnalysisRun::new("run", AnalysisRunSpec::default());
            let mut run_labels = purpose_labels(purpose);
            run_labels.insert(labels::POD_TEMPLATE_HASH.into(), "h2".into());
            run.metadata.labels = Some(run_labels);
            run.status = Some(AnalysisRunStatus {
                phase: Some(AnalysisPhase::Failed),
                message: Some("error-rate 0.3".into()),
                ..Default::default()
            });
            let observed = observed_analysis_run(&run);
            assert_eq!(
                observed,
                Some(ObservedAnalysisRun {
                    name: "run".into(),
                    purpose,
                    pod_template_hash: "h2".into(),
                    phase: AnalysisPhase::Failed,
                    message: Some("error-rate 0.3".into()),
                    terminating: false,
                    latest_successful: false,
                })
            );
        }
    }

    #[test]
    fn an_analysis_run_without_purpose_labels_is_ignored() {
        let run = AnalysisRun::new("run", AnalysisRunSpec::default());
        assert_eq!(observed_analysis_run(&run), None);
    }

    #[test]
    fn services_and_templates_named_by_both_strategies_are_listed() {
        let strategy: RolloutStrategy = serde_json::from_value(json!({
            "canary": {
                "stableService": "web", "canaryService": "web-canary",
                "analysis": {"templates": [{"templateName": "bg"}]},
                "steps": [{"analysis": {"templates": [{"templateName": "step", "clusterScope": true}]}}]
            },
            "blueGreen": {"activeService": "web-active", "previewService": "web-preview",
                          "prePromotionAnalysis": {"templates": [{"templateName": "pre"}]}}
        }))
        .expect("valid strategy");
        assert_eq!(
            service_names(&strategy),
            ["web", "web-canary", "web-active", "web-preview"]
        );
        let names: Vec<_> = template_refs(&strategy)
            .iter()
            .map(|r| r.template_name.as_str())
            .collect();
        assert_eq!(names, ["bg", "step", "pre"]);
    }
}
