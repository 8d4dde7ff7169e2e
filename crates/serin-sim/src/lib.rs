//! The simulated Kubernetes cluster: API server, workload and traffic simulators, fault injection.

pub mod admin;
pub mod api;
pub mod api_error;
pub mod control;
pub mod faults;
pub mod fixtures;
pub mod load;
pub mod patch;
pub mod prometheus;
pub mod rbac;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;
pub mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use control::ControlError;
pub use faults::{
    FaultAction, FaultError, FaultRule, Faults, RequestLog, RequestRecord, WatchFaultKind,
    WatchScope,
};

/// How to start the simulated cluster.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Port on 127.0.0.1; 0 picks any free port.
    pub port: u16,
    /// Where to write the kubeconfig; a temporary file (removed on shutdown) when None.
    pub kubeconfig_path: Option<PathBuf>,
    /// How many committed events watches can resume from before they get 410 Gone.
    pub event_window: usize,
    /// How many requests the request log keeps.
    pub request_log_capacity: usize,
    /// How often watches that allow bookmarks receive one.
    pub bookmark_interval: Duration,
    /// The ReplicaSet/Deployment controller and kubelet; None serves the API alone.
    pub workload: Option<workload::WorkloadConfig>,
    /// The request stream and its metrics on `/metrics`; None serves no traffic.
    pub traffic: Option<load::TrafficConfig>,
    /// Serve the admin endpoint under `/sim/` (faults, request log, pod readiness, workload switch).
    /// Off by default: anyone who can reach the port could break the cluster with it.
    pub admin: bool,
    /// Authorize every resource request against the stored Roles, ClusterRoles and bindings, answering
    /// 403 Forbidden as kube-apiserver does (see [`rbac`]). Off by default: tests that do not set RBAC up
    /// act as users no binding names. `admin` and the simulators are superusers either way.
    pub enforce_rbac: bool,
}

/// The user the simulators write as (so request-log assertions can leave their writes out).
pub const SIMULATOR_USER: &str = "system:serin-sim";

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            port: 0,
            kubeconfig_path: None,
            event_window: 10_000,
            request_log_capacity: 100_000,
            bookmark_interval: Duration::from_secs(1),
            workload: Some(workload::WorkloadConfig::default()),
            traffic: Some(load::TrafficConfig::default()),
            admin: false,
            enforce_rbac: false,
        }
    }
}

impl SimConfig {
    /// The API server alone: no pods are made for ReplicaSets and no traffic flows.
    pub fn api_only() -> SimConfig {
        SimConfig {
            workload: None,
            traffic: None,
            ..SimConfig::default()
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum SimError {
    #[error("binding 127.0.0.1:{port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("writing kubeconfig {path}: {source}")]
    WriteKubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building a kube client: {0}")]
    Client(String),
}

impl SimError {
    pub fn category(&self) -> &'static str {
        match self {
            SimError::Bind { .. } => "bind",
            SimError::WriteKubeconfig { .. } => "write_kubeconfig",
            SimError::Client(_) => "client",
        }
    }
}

/// The kubeconfig a running sim wrote; removed on drop when it was a temporary file.
struct KubeconfigFile {
    path: PathBuf,
    temporary_dir: Option<PathBuf>,
}

impl Drop for KubeconfigFile {
    fn drop(&mut self) {
        if let Some(dir) = &self.temporary_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The kubeconfig text for a sim at `base_url`: one context whose user's token is `admin`.
pub fn kubeconfig_yaml(base_url: &str) -> String {
    kubeconfig_yaml_as(base_url, "admin")
}

/// The kubeconfig text for a sim at `base_url` whose requests are logged (and matched by fault rules)
/// as `user`: its token is `user`, and it impersonates `user` because kubectl sends no token over
/// plain http.
pub fn kubeconfig_yaml_as(base_url: &str, user: &str) -> String {
    // Quoted as a JSON string (valid YAML), so any user name survives.
    let quoted = serde_json::Value::String(user.to_string()).to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: serin-sim\n  cluster:\n    server: {base_url}\ncontexts:\n- name: serin-sim\n  context:\n    cluster: serin-sim\n    user: {quoted}\n    namespace: default\ncurrent-context: serin-sim\npreferences: {{}}\nusers:\n- name: {quoted}\n  user:\n    token: {quoted}\n    as: {quoted}\n"
    )
}

/// Writes via a temporary sibling and a rename, so a reader polling for the file never sees half of it.
fn write_atomically(path: &Path, text: &str) -> Result<(), SimError> {
    let failed = |source| SimError::WriteKubeconfig {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let staging = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&staging, text).map_err(failed)?;
    std::fs::rename(&staging, path).map_err(failed)
}

/// Picks rustls' process-wide crypto provider. The crate links both `ring` (kube) and `aws-lc-rs`
/// (reqwest), and with two candidates rustls refuses to choose one itself and panics on first use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running simulated cluster.
pub struct SimCluster {
    address: SocketAddr,
    kubeconfig: KubeconfigFile,
    state: Arc<server::ServerState>,
    server_task: tokio::task::JoinHandle<()>,
}

impl SimCluster {
    pub async fn start(config: SimConfig) -> Result<SimCluster, SimError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
            .await
            .map_err(|source| SimError::Bind {
                port: config.port,
                source,
            })?;
        let address = listener.local_addr().map_err(|source| SimError::Bind {
            port: config.port,
            source,
        })?;
        let base_url = format!("http://{address}");
        let kubeconfig = match &config.kubeconfig_path {
            Some(path) => KubeconfigFile {
                path: path.clone(),
                temporary_dir: None,
            },
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("serin-sim-{}", uuid::Uuid::new_v4().simple()));
                KubeconfigFile {
                    path: dir.join("kubeconfig"),
                    temporary_dir: Some(dir),
                }
            }
        };
        write_atomically(&kubeconfig.path, &kubeconfig_yaml(&base_url))?;
        let shutdown = CancellationToken::new();
        let api = api::ApiState::new(config.event_window);
        let faults = Arc::new(Faults::tracking(api.store.subscribe()));
        let state = Arc::new(server::ServerState {
            api,
            faults,
            log: Arc::new(RequestLog::new(config.request_log_capacity)),
            shutdown: shutdown.clone(),
            port: address.port(),
            bookmark_interval: config.bookmark_interval,
            traffic_metrics: std::sync::OnceLock::new(),
            admin: config.admin,
            workload: std::sync::OnceLock::new(),
            workload_fence: Arc::default(),
            rbac: config.enforce_rbac.then(rbac::PolicyCache::default),
        });
        let app = server::router(state.clone());
        let server_task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "simulated API server stopped");
            }
        });
        tracing::info!(%base_url, kubeconfig = %kubeconfig.path.display(), "simulated cluster started");
        let cluster = SimCluster {
            address,
            kubeconfig,
            state,
            server_task,
        };
        if let Some(workload_config) = config.workload {
            let control = Arc::new(workload::WorkloadControl::new(
                cluster.client_config(SIMULATOR_USER)?,
                workload_config,
                cluster.state.workload_fence.clone(),
            ));
            control
                .start()
                .await
                .map_err(|e| SimError::Client(e.to_string()))?;
            let _ = cluster.state.workload.set(control);
        }
        if let Some(traffic_config) = config.traffic {
            let simulator_client = cluster.client_as(SIMULATOR_USER).await?;
            let traffic = load::TrafficSimulator::spawn(simulator_client, traffic_config);
            let _ = cluster.state.traffic_metrics.set(traffic);
        }
        Ok(cluster)
    }

    /// The traffic simulator, when it runs.
    pub fn traffic(&self) -> Option<&load::TrafficSimulator> {
        self.state.traffic_metrics.get()
    }

    /// URL of the simulated request metrics, for a Prometheus scrape config.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.base_url())
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig.path
    }

    /// A client authenticated as user `admin`.
    pub async fn client(&self) -> Result<kube::Client, SimError> {
        self.client_as("admin").await
    }

    /// A client whose bearer token (and so the user in the request log) is `user`.
    pub async fn client_as(&self, user: &str) -> Result<kube::Client, SimError> {
        kube::Client::try_from(self.client_config(user)?)
            .map_err(|e| SimError::Client(e.to_string()))
    }

    fn client_config(&self, user: &str) -> Result<kube::Config, SimError> {
        install_crypto_provider();
        let url = self
            .base_url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| SimError::Client(e.to_string()))?;
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        config.auth_info.token = Some(user.to_string().into());
        Ok(config)
    }

    /// Writes a kubeconfig whose token is `user`'s, for kubectl runs that fault rules can tell apart.
    pub fn write_kubeconfig_as(&self, user: &str, path: &Path) -> Result<(), SimError> {
        write_atomically(path, &kubeconfig_yaml_as(&self.base_url(), user))
    }

    /// URL of the admin endpoint (served only when `SimConfig::admin` is on).
    pub fn admin_url(&self) -> String {
        format!("{}/sim", self.base_url())
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Forces a pod unready, like a failing readiness probe: its Ready condition turns False, its
    /// ReplicaSet's readyReplicas/availableReplicas follow, and traffic stops reaching it. Returns once
    /// the pod's status shows it (while the workload simulator runs).
    pub async fn make_pod_unready(&self, namespace: &str, pod: &str) -> Result<(), ControlError> {
        control::set_pod_ready(&self.state, namespace, pod, false).await
    }

    /// Gives a pod forced unready its own readiness back (Ready again if its template says so, with a
    /// new transition time). Returns once it is Ready again, if it was Ready when forced.
    pub async fn make_pod_ready(&self, namespace: &str, pod: &str) -> Result<(), ControlError> {
        control::set_pod_ready(&self.state, namespace, pod, true).await
    }

    /// Forces `count` Ready pods of a ReplicaSet unready (by name order, skipping pods already forced);
    /// returns their names.
    pub async fn make_pods_unready(
        &self,
        namespace: &str,
        replicaset: &str,
        count: usize,
    ) -> Result<Vec<String>, ControlError> {
        control::make_replicaset_pods_unready(&self.state, namespace, replicaset, count).await
    }

    /// Gives every forced-unready pod of a ReplicaSet its readiness back; returns their names.
    pub async fn make_pods_ready(
        &self,
        namespace: &str,
        replicaset: &str,
    ) -> Result<Vec<String>, ControlError> {
        control::make_replicaset_pods_ready(&self.state, namespace, replicaset).await
    }

    /// Stops the workload simulator (no pods created or deleted, no status written) until
    /// [`start_workload`](Self::start_workload); false when it was already stopped.
    pub async fn stop_workload(&self) -> Result<bool, ControlError> {
        control::stop_workload(&self.state).await
    }

    /// Starts the workload simulator again; it relists and catches up. False when it was running.
    pub async fn start_workload(&self) -> Result<bool, ControlError> {
        control::start_workload(&self.state).await
    }

    /// Whether the workload simulator runs (false when stopped or when the sim has none).
    pub fn workload_running(&self) -> bool {
        control::workload_running(&self.state).unwrap_or(false)
    }

    pub fn request_log(&self) -> &RequestLog {
        &self.state.log
    }

    /// Number of objects currently stored for a resource, e.g. `("", "configmaps")`.
    pub fn object_count(&self, group: &str, plural: &str) -> usize {
        self.state
            .api
            .store
            .lock()
            .count(&format!("{group}/{plural}"))
    }

    /// Stops serving: open watches end, then the listener closes.
    pub async fn shutdown(self) {
        if let Some(traffic) = self.state.traffic_metrics.get() {
            traffic.clone().shutdown().await;
        }
        if let Some(workload) = self.state.workload.get() {
            workload.stop().await;
        }
        self.state.shutdown.cancel();
        let mut task = self.server_task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
