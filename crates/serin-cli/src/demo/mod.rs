//! `serin demo`: runs the simulated cluster, a real Prometheus, the controller and the analysis runner in
//! this process, and walks through a good canary (v2) and a bad one (v3) that analysis rolls back, printing
//! each decision as it happens and a summary of what was expected against what was seen.

pub mod manifests;
pub mod summary;
pub mod watch;
pub mod wiring;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

use manifests::{ManifestError, Pace, Version, NAMESPACE, ROLLOUT, V1, V2, V3};
use serin::crd::analysis::{AnalysisPhase, AnalysisTemplate};
use serin::crd::{Rollout, RolloutPhase};
use serin_sim::prometheus::{PrometheusError, PrometheusOptions, PrometheusServer, ScrapeTarget};
use serin_sim::{SimCluster, SimConfig, SimError};
use summary::{Observations, ALL_TRAFFIC};
use watch::{Printer, RolloutWatch};
use wiring::{Operators, OperatorsError};

/// Exit code when Prometheus is not installed.
pub const EXIT_PROMETHEUS_MISSING: u8 = 2;
/// Exit code when the demo ran but something did not happen as expected, or it could not run.
pub const EXIT_FAILED: u8 = 1;

/// The whole demo may take this long before it gives up cleanly.
pub const GLOBAL_TIMEOUT: Duration = Duration::from_secs(300);

/// `serin demo` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Leave the simulated cluster (and Prometheus) up after the summary, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Shorter analysis intervals and pause (about a minute instead of two).
    #[arg(long)]
    pub fast: bool,
    /// Show the operators' logs (info level) on stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

impl DemoArgs {
    pub fn options(&self) -> DemoOptions {
        DemoOptions {
            keep_running: self.keep_running,
            fast: self.fast,
        }
    }
}

/// How the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Leave the cluster up after the summary, until Ctrl-C.
    pub keep_running: bool,
    /// Shorter analysis and pause.
    pub fast: bool,
}

/// Why the demo could not run or did not go as expected.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Prometheus(#[from] PrometheusError),
    #[error("simulated cluster: {0}")]
    Sim(#[from] SimError),
    #[error("{0}")]
    Operators(#[from] OperatorsError),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("the simulated cluster exports no metrics URL Prometheus can scrape: {0}")]
    MetricsUrl(String),
    #[error("applying {what} failed: {source}")]
    Apply {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: &'static str,
        waited: Duration,
        last: String,
    },
    #[error("the demo did not finish within {0:?}")]
    GlobalTimeout(Duration),
    #[error("not as expected: {0}")]
    Unexpected(String),
}

impl DemoError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            DemoError::Prometheus(error) => error.category(),
            DemoError::Sim(error) => error.category(),
            DemoError::Operators(error) => error.category(),
            DemoError::Manifest(_) => "manifest",
            DemoError::MetricsUrl(_) => "metrics_url",
            DemoError::Apply { .. } => "apply",
            DemoError::Timeout { .. } => "timeout",
            DemoError::GlobalTimeout(_) => "global_timeout",
            DemoError::Unexpected(_) => "unexpected",
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            DemoError::Prometheus(PrometheusError::NotInstalled) => EXIT_PROMETHEUS_MISSING,
            _ => EXIT_FAILED,
        }
    }
}

/// Runs the demo and returns the exit code (printing the reason of a failure on stderr).
pub async fn main(options: DemoOptions) -> u8 {
    match run(options).await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("serin demo failed: {error}");
            error.exit_code()
        }
    }
}

/// Everything the demo started, stopped in reverse order.
struct Stack {
    sim: SimCluster,
    prometheus: PrometheusServer,
    operators: Operators,
}

impl Stack {
    async fn stop(self) {
        self.operators.stop().await;
        let mut prometheus = self.prometheus;
        prometheus.stop();
        self.sim.shutdown().await;
    }
}

/// Runs the demo; `Ok` only when everything happened as expected.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    // Fail before starting anything when Prometheus is missing.
    serin_sim::prometheus::find_binary()?;
    let printer = Printer::new();
    let pace = if options.fast {
        Pace::fast()
    } else {
        Pace::normal()
    };
    printer.say("starting the simulated cluster, Prometheus and the controller");
    let stack = start(&printer).await?;
    let outcome = tokio::time::timeout(GLOBAL_TIMEOUT, walkthrough(&stack, &printer, &pace)).await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(_) => Err(DemoError::GlobalTimeout(GLOBAL_TIMEOUT)),
    };
    if options.keep_running {
        keep_running(&stack).await;
    }
    stack.stop().await;
    outcome
}

async fn start(printer: &Printer) -> Result<Stack, DemoError> {
    let sim = SimCluster::start(SimConfig::default()).await?;
    let target = ScrapeTarget::from_url(&sim.metrics_url())
        .ok_or_else(|| DemoError::MetricsUrl(sim.metrics_url()))?;
    let prometheus = PrometheusServer::start(&[target], &PrometheusOptions::default()).await?;
    printer.say(&format!(
        "cluster {} · Prometheus {} (scraping every 1s)",
        sim.base_url(),
        prometheus.url()
    ));
    let admin = sim.client().await?;
    install_crds(&admin).await?;
    let operators = Operators::start(sim.client_as("serin-controller").await?, NAMESPACE).await?;
    printer.say("controller and analysis runner started");
    Ok(Stack {
        sim,
        prometheus,
        operators,
    })
}

async fn install_crds(client: &Client) -> Result<(), DemoError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in serin::crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(|source| DemoError::Apply {
                what: "the CRDs",
                source,
            })?;
    }
    // A CRD's resources become servable shortly after it is created.
    let rollouts: Api<Rollout> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rollouts.list(&Default::default()).await {
            Ok(_) => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(DemoError::Apply {
                    what: "the CRDs (never servable)",
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn walkthrough(stack: &Stack, printer: &Printer, pace: &Pace) -> Result<(), DemoError> {
    let admin = stack.sim.client().await?;
    let mut watch = RolloutWatch::new(admin.clone(), &stack.sim, printer);
    let mut seen = Observations::default();

    printer.heading("1. v1: the first version");
    apply_first_version(&admin, stack.prometheus.url(), pace).await?;
    let v1 = watch
        .wait_for("v1 Healthy", Duration::from_secs(60), |r| {
            is_healthy_on_current(r)
        })
        .await?;
    seen.v1_healthy = true;
    let v1_hash = current_hash(&v1);
    watch
        .wait_for_share(&v1_hash, ALL_TRAFFIC, Duration::from_secs(10))
        .await;
    printer.say(&format!(
        "v1 is Healthy: {} ready pods, traffic: {}",
        v1.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        watch.traffic_line(Duration::from_secs(2))
    ));

    printer.heading("2. v2: a healthy version, step by step with analysis");
    let act_start = watch.mark_act();
    update_version(&admin, &V2, pace).await?;
    let v2 = watch
        .wait_for("v2 promoted", Duration::from_secs(120), |r| {
            is_healthy_on_current(r) && current_hash(r) != v1_hash
        })
        .await?;
    let v2_hash = current_hash(&v2);
    // Promotion is the last step: all traffic on the new version.
    seen.v2_weights = summary::ending_at_full(watch.desired_weights_since(act_start));
    seen.v2_actual_weights = summary::ending_at_full(watch.weights_since(act_start));
    let v2_runs = watch.runs_since(act_start);
    seen.v2_runs_successful = v2_runs
        .iter()
        .filter(|run| run.phase == Some(AnalysisPhase::Successful))
        .count();
    seen.v2_runs_unsuccessful = v2_runs.len() - seen.v2_runs_successful;
    seen.v2_promoted = true;
    seen.v2_share_after_promotion = watch
        .wait_for_share(&v2_hash, ALL_TRAFFIC, Duration::from_secs(15))
        .await;
    printer.say(&format!(
        "v2 promoted to 100%: stable, traffic: {}",
        watch.traffic_line(Duration::from_secs(2))
    ));

    printer.heading("3. v3: a version answering 25% of requests with errors");
    let act_start = watch.mark_act();
    update_version(&admin, &V3, pace).await?;
    let v3 = watch
        .wait_for("v3 aborted", Duration::from_secs(90), |r| {
            phase(r) == Some(RolloutPhase::Aborted)
        })
        .await?;
    let status = v3.status.clone().unwrap_or_default();
    seen.v3_phase = status.phase.map(|p| p.as_str().to_string());
    seen.v3_message = status.message.clone();
    let v3_runs = watch.runs_since(act_start);
    if let Some(failed) = v3_runs.iter().find(|run| {
        run.phase
            .is_some_and(|p| p.is_completed() && p != AnalysisPhase::Successful)
    }) {
        seen.v3_failed_run = failed.phase.map(|p| p.as_str().to_string());
        seen.v3_abort_step = failed.step_index;
    }
    seen.v3_error_rate = v3_runs
        .iter()
        .filter_map(|run| run.max_error_rate)
        .fold(None, |max: Option<f64>, rate| {
            Some(max.map_or(rate, |m| m.max(rate)))
        });
    seen.v2_share_after_abort = watch
        .wait_for_share(&v2_hash, ALL_TRAFFIC, Duration::from_secs(15))
        .await;
    printer.say(&format!(
        "v3 aborted by analysis: {}",
        seen.v3_message.as_deref().unwrap_or("no message")
    ));
    printer.say(&format!(
        "traffic back on v2: {}",
        watch.traffic_line(Duration::from_secs(2))
    ));

    printer.heading("summary");
    let checks = summary::checks(&seen);
    printer.raw(&summary::render(&checks));
    printer.raw(&format!(
        "  {} Prometheus queries by the analysis runner, {:.0}s in all\n",
        stack.operators.queries_sent(),
        printer.elapsed().as_secs_f64()
    ));
    match summary::verdict(&checks) {
        Ok(()) => {
            printer.raw("\nall as expected: the good version went out step by step, the bad one was rolled back by analysis\n");
            Ok(())
        }
        Err(reason) => Err(DemoError::Unexpected(reason)),
    }
}

fn phase(rollout: &Rollout) -> Option<RolloutPhase> {
    rollout.status.as_ref().and_then(|s| s.phase)
}

fn current_hash(rollout: &Rollout) -> String {
    rollout
        .status
        .as_ref()
        .and_then(|s| s.current_pod_hash.clone())
        .unwrap_or_default()
}

/// Healthy, for the current spec, with the current template stable and all replicas ready.
fn is_healthy_on_current(rollout: &Rollout) -> bool {
    let Some(status) = &rollout.status else {
        return false;
    };
    status.observed_generation == rollout.metadata.generation
        && status.phase == Some(RolloutPhase::Healthy)
        && status.current_pod_hash.is_some()
        && status
            .stable_revision
            .as_ref()
            .map(|s| &s.pod_template_hash)
            == status.current_pod_hash.as_ref()
        && status.ready_replicas.unwrap_or(0) >= manifests::REPLICAS
}

async fn apply_first_version(
    client: &Client,
    prometheus_url: &str,
    pace: &Pace,
) -> Result<(), DemoError> {
    let post = PostParams::default();
    let apply = |what: &'static str| move |source| DemoError::Apply { what, source };
    Api::<Namespace>::all(client.clone())
        .create(&post, &manifests::namespace()?)
        .await
        .map_err(apply("namespace shop"))?;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    for service in manifests::services()? {
        services
            .create(&post, &service)
            .await
            .map_err(apply("the Services"))?;
    }
    Api::<AnalysisTemplate>::namespaced(client.clone(), NAMESPACE)
        .create(&post, &manifests::analysis_template(prometheus_url, pace)?)
        .await
        .map_err(apply("the AnalysisTemplate"))?;
    Api::<Rollout>::namespaced(client.clone(), NAMESPACE)
        .create(&post, &manifests::rollout(&V1, pace)?)
        .await
        .map_err(apply("the v1 Rollout"))?;
    Ok(())
}

async fn update_version(client: &Client, version: &Version, pace: &Pace) -> Result<(), DemoError> {
    let patch = manifests::template_patch(version, pace)?;
    Api::<Rollout>::namespaced(client.clone(), NAMESPACE)
        .patch(ROLLOUT, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| DemoError::Apply {
            what: "the new version",
            source,
        })?;
    Ok(())
}

async fn keep_running(stack: &Stack) {
    let kubeconfig = stack.sim.kubeconfig_path().display().to_string();
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "\nthe cluster stays up until Ctrl-C; try:\n  \
         kubectl --kubeconfig {kubeconfig} get rollouts,analysisruns,replicasets,pods -n {NAMESPACE}\n  \
         serin status {ROLLOUT} -n {NAMESPACE} --kubeconfig {kubeconfig}\n  \
         serin retry {ROLLOUT} -n {NAMESPACE} --kubeconfig {kubeconfig}\n\
         Prometheus: {}/graph",
        stack.prometheus.url()
    );
    let _ = out.flush();
    let _ = tokio::signal::ctrl_c().await;
}

/// Hash -> version name, from the demo's version annotation on ReplicaSet templates.
pub type VersionNames = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_prometheus_says_how_to_install_it_and_exits_2() {
        let error = DemoError::from(PrometheusError::NotInstalled);
        assert_eq!(error.exit_code(), EXIT_PROMETHEUS_MISSING);
        assert!(error
            .to_string()
            .contains("sudo apt-get install -y prometheus"));
        let other = DemoError::Unexpected("v3 aborted: expected Aborted, saw Paused".into());
        assert_eq!(other.exit_code(), EXIT_FAILED);
        assert_eq!(other.category(), "unexpected");
    }

    #[test]
    fn healthy_means_the_current_template_is_stable_and_ready() {
        use serin::crd::rollout::RevisionRef;
        use serin::crd::RolloutStatus;
        let mut rollout = manifests::rollout(&V1, &Pace::fast()).unwrap();
        rollout.metadata.generation = Some(2);
        let healthy = RolloutStatus {
            observed_generation: Some(2),
            phase: Some(RolloutPhase::Healthy),
            current_pod_hash: Some("abc".into()),
            stable_revision: Some(RevisionRef {
                pod_template_hash: "abc".into(),
                revision: 1,
            }),
            ready_replicas: Some(manifests::REPLICAS),
            ..RolloutStatus::default()
        };
        rollout.status = Some(healthy.clone());
        assert!(is_healthy_on_current(&rollout));
        rollout.status = Some(RolloutStatus {
            observed_generation: Some(1),
            ..healthy.clone()
        });
        assert!(
            !is_healthy_on_current(&rollout),
            "an older generation's status"
        );
        rollout.status = Some(RolloutStatus {
            current_pod_hash: Some("def".into()),
            ..healthy.clone()
        });
        assert!(
            !is_healthy_on_current(&rollout),
            "the new template is not stable yet"
        );
        rollout.status = Some(RolloutStatus {
            ready_replicas: Some(4),
            ..healthy
        });
        assert!(!is_healthy_on_current(&rollout), "not every pod ready");
    }
}
