//! The `serin` command line: its arguments and their dispatch to the controller, the user operations
//! (`status`, `promote`, `abort`, ... as a kubectl plugin), the simulated cluster and the demo.

pub mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use serin::controller::leader::LeaseConfig;
use serin::controller::{ControllerConfig, ControllerError};
use serin::ops::{commands, describe, undo, ManualCommand, OpsError};

/// `serin`: progressive delivery for Kubernetes. Installed as `kubectl-serin` on PATH, it is also the
/// kubectl plugin `kubectl serin ...`.
#[derive(Debug, Parser)]
#[command(
    name = "serin",
    version,
    about = "Progressive delivery operator for Kubernetes: canary and blue-green rollouts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the cluster, as kubectl spells it.
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

/// The cluster and the namespace of the Rollout a user command acts on.
#[derive(Debug, Clone, Default, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Namespace of the Rollout (default: the context's namespace).
    #[arg(short = 'n', long, env = "SERIN_NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    // Boxed: the controller's settings outweigh every other command's arguments.
    Controller(Box<ControllerArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Show where a rollout stands: steps, weights, revisions, pods, conditions, events.
    Status(StatusArgs),
    /// End the current pause or analysis gate (`--full`: skip all remaining steps).
    Promote(PromoteArgs),
    /// Put all traffic back on the stable version.
    Abort(NameArg),
    /// Start an aborted rollout again from its first step.
    Retry(NameArg),
    /// Hold the rollout where it is.
    Pause(NameArg),
    /// Let a paused rollout go on.
    Resume(NameArg),
    /// Roll back: set the template to an earlier revision's (this changes the spec).
    Undo(UndoArgs),
    /// Run the simulated Kubernetes cluster on 127.0.0.1 until Ctrl-C (`--kubeconfig`: where to write its
    /// kubeconfig).
    Sim(SimArgs),
    /// Walk through a good and a bad canary on a simulated cluster with a real Prometheus (about 2 minutes).
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Where to write the simulated cluster's kubeconfig.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Port to listen on; 0 picks any free port.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Serve the admin endpoint under /sim/ on the same port: inject API errors and timeouts, hold or
    /// drop watch events, force pods unready, stop and start the workload simulator (docs/sim.md).
    /// Anyone who can reach the port can then break the simulated cluster.
    #[arg(long, env = "SERIN_SIM_ADMIN")]
    pub admin: bool,
    /// Authorize every request against the Roles, ClusterRoles and bindings stored in the sim, answering
    /// 403 Forbidden like a real API server. The `admin` token stays a superuser; other tokens name the
    /// user (`system:serviceaccount:<ns>:<name>` for a ServiceAccount).
    #[arg(long, env = "SERIN_SIM_ENFORCE_RBAC")]
    pub enforce_rbac: bool,
    /// Send no simulated requests (and serve no request metrics): at thousands of Services the
    /// traffic simulator costs more than the rest of the cluster, and nothing without analysis needs it.
    #[arg(long, env = "SERIN_SIM_NO_TRAFFIC")]
    pub no_traffic: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// Name of the Rollout.
    pub name: String,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Name of the Rollout.
    pub name: String,
    /// Redraw on every change until the rollout is Healthy or Aborted (or Ctrl-C).
    #[arg(short, long)]
    pub watch: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Name of the Rollout.
    pub name: String,
    /// Skip all remaining steps and analysis and make the new version stable now.
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct UndoArgs {
    /// Name of the Rollout.
    pub name: String,
    /// Revision to go back to (default: the one before the current).
    #[arg(long)]
    pub to_revision: Option<i64>,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// A namespace to watch, repeatable or comma-separated (default: all namespaces).
    #[arg(short = 'n', long, env = "SERIN_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Rollouts reconciled at the same time.
    #[arg(long, env = "SERIN_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "SERIN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "SERIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `serin=debug,kube=info`).
    #[arg(long, env = "SERIN_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Name of this instance in events and in the Lease (for example the pod name).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Reconcile only while holding a Lease, so that exactly one replica writes.
    #[arg(long, env = "SERIN_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "SERIN_LEASE_NAME", default_value = "serin-controller")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// How long the Lease stays valid without renewal (whole seconds).
    #[arg(long, env = "SERIN_LEASE_DURATION", default_value = "15s", value_parser = parse_flag_duration)]
    pub lease_duration: Duration,
    /// How long after its last renewal the holder still writes.
    #[arg(long, env = "SERIN_LEASE_RENEW", default_value = "10s", value_parser = parse_flag_duration)]
    pub lease_renew: Duration,
    /// How often the holder renews and a candidate retries.
    #[arg(long, env = "SERIN_LEASE_RETRY", default_value = "2s", value_parser = parse_flag_duration)]
    pub lease_retry: Duration,
    /// Where analysis may send requests on a user's behalf, comma-separated: host names, *.domain,
    /// host:port, IP addresses, ip:port, CIDRs, or `any`. Loopback, link-local and the API server are
    /// reached only when an IP, CIDR or exact host entry names them. Empty: only the default Prometheus.
    #[arg(
        long,
        env = "SERIN_ALLOWED_DESTINATIONS",
        value_delimiter = ',',
        value_parser = parse_destination
    )]
    pub allowed_destinations: Vec<serin::analysis::outbound::Destination>,
    /// The Prometheus that metrics without `address` query (for example
    /// http://prometheus.monitoring:9090); analysis may always call it.
    #[arg(long, env = "SERIN_DEFAULT_PROMETHEUS_ADDRESS", value_parser = parse_http_address)]
    pub default_prometheus_address: Option<String>,
    /// Largest answer analysis reads from a provider, in bytes; a longer one fails the measurement.
    #[arg(
        long,
        env = "SERIN_OUTBOUND_MAX_RESPONSE_BYTES",
        default_value_t = serin::analysis::outbound::DEFAULT_MAX_RESPONSE_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub outbound_max_response_bytes: u64,
    /// Longest time one provider request may take, whatever timeout a template asks for.
    #[arg(long, env = "SERIN_OUTBOUND_MAX_REQUEST_TIME", default_value = "30s", value_parser = parse_flag_duration)]
    pub outbound_max_request_time: Duration,
}

fn parse_destination(text: &str) -> Result<serin::analysis::outbound::Destination, String> {
    serin::analysis::outbound::Destination::parse(text).map_err(|error| error.to_string())
}

fn parse_http_address(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(format!("{text:?} is not an http:// or https:// address"));
    }
    serin::analysis::outbound::Policy::default()
        .allowing_address(text)
        .map_err(|error| format!("{text:?} is not a usable address: {}", error.reason))?;
    Ok(text.to_string())
}

fn parse_flag_duration(text: &str) -> Result<Duration, String> {
    serin::crd::parse_duration(text).map_err(|error| error.to_string())
}

impl ControllerArgs {
    /// The controller's configuration; `namespaces` are the global `-n` values it is restricted to.
    pub fn config(&self) -> ControllerConfig {
        let mut namespaces = self.namespace.clone();
        namespaces.retain(|ns| !ns.is_empty());
        namespaces.sort();
        namespaces.dedup();
        ControllerConfig {
            namespaces,
            concurrency: self.concurrency.max(1),
            metrics_addr: Some(self.metrics_addr),
            instance: self.instance.clone(),
            leader: self.leader_elect.then(|| LeaseConfig {
                lease_name: self.lease_name.clone(),
                lease_namespace: self.lease_namespace.clone(),
                identity: self
                    .instance
                    .clone()
                    .unwrap_or_else(|| format!("serin-{}", uuid::Uuid::new_v4().simple())),
                lease_duration: self.lease_duration,
                renew_deadline: self.lease_renew,
                retry_period: self.lease_retry,
            }),
            outbound: serin::analysis::outbound::OutboundConfig {
                policy: serin::analysis::outbound::Policy::new(self.allowed_destinations.clone()),
                limits: serin::analysis::outbound::Limits {
                    max_response_bytes: self.outbound_max_response_bytes,
                    max_request_time: self.outbound_max_request_time,
                },
            },
            default_prometheus_address: self.default_prometheus_address.clone(),
            ..ControllerConfig::default()
        }
    }
}

/// Why a command failed; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("cannot connect to the cluster: {0}")]
    Connect(#[source] kube::Error),
    #[error("{0}")]
    Ops(#[from] OpsError),
    #[error("cannot render the CRDs: {0}")]
    RenderCrds(#[source] serde_yaml::Error),
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
    #[error("controller: {0}")]
    Controller(#[from] ControllerError),
    #[error("simulated cluster: {0}")]
    Sim(#[from] serin_sim::SimError),
    #[error("demo: {0}")]
    Demo(#[from] crate::demo::DemoError),
}

impl CliError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            CliError::Kubeconfig(_) => "kubeconfig",
            CliError::Connect(_) => "connect",
            CliError::Ops(error) => error.category(),
            CliError::RenderCrds(_) => "render_crds",
            CliError::Output(_) => "output",
            CliError::Controller(error) => error.category(),
            CliError::Sim(error) => error.category(),
            CliError::Demo(error) => error.category(),
        }
    }
}

/// A client, and the namespace to work in: `namespace`, else the kubeconfig context's.
pub async fn connect(
    cluster: &ClusterArgs,
    namespace: Option<&str>,
) -> Result<(Client, String), CliError> {
    let options = KubeConfigOptions {
        context: cluster.context.clone(),
        ..Default::default()
    };
    let config = match &cluster.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|error| CliError::Kubeconfig(error.to_string()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|error| CliError::Kubeconfig(error.to_string()))?
        }
        None if cluster.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|error| CliError::Kubeconfig(error.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|error| CliError::Kubeconfig(error.to_string()))?,
    };
    let namespace = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(CliError::Connect)?;
    Ok((client, namespace))
}

/// Runs a parsed command, writing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut stdout = std::io::stdout();
    match &cli.command {
        Command::Crd => {
            let yaml = serin::crd::render_all().map_err(CliError::RenderCrds)?;
            use std::io::Write;
            stdout.write_all(yaml.as_bytes()).map_err(CliError::Output)
        }
        Command::Controller(args) => {
            let (client, _) = connect(&args.cluster, None).await?;
            serin::controller::run(client, args.config()).await?;
            Ok(())
        }
        Command::Status(args) => {
            let (client, namespace) = connect_to(&args.target).await?;
            if args.watch {
                describe::watch(
                    &client,
                    &namespace,
                    &args.name,
                    Duration::from_millis(500),
                    &mut stdout,
                )
                .await
                .map_err(CliError::from)
            } else {
                let text = describe::fetch_and_render(&client, &namespace, &args.name).await?;
                use std::io::Write;
                stdout.write_all(text.as_bytes()).map_err(CliError::Output)
            }
        }
        Command::Promote(args) => {
            let command = if args.full {
                ManualCommand::PromoteFull
            } else {
                ManualCommand::Promote
            };
            send(&args.target, &args.name, command).await
        }
        Command::Sim(args) => {
            let config = serin_sim::SimConfig {
                port: args.port,
                kubeconfig_path: args.kubeconfig.clone(),
                admin: args.admin,
                enforce_rbac: args.enforce_rbac,
                traffic: (!args.no_traffic).then(serin_sim::load::TrafficConfig::default),
                ..serin_sim::SimConfig::default()
            };
            let cluster = serin_sim::SimCluster::start(config).await?;
            tracing::info!(url = %cluster.base_url(), kubeconfig = %cluster.kubeconfig_path().display(), admin = args.admin, "serin sim ready; Ctrl-C to stop");
            println!(
                "serin sim listening on {}; kubeconfig: {}",
                cluster.base_url(),
                cluster.kubeconfig_path().display()
            );
            if args.admin {
                println!("admin endpoint: {} (see docs/sim.md)", cluster.admin_url());
            }
            let _ = tokio::signal::ctrl_c().await;
            cluster.shutdown().await;
            Ok(())
        }
        Command::Demo(args) => Ok(crate::demo::run(args.options()).await?),
        Command::Abort(args) => send(&args.target, &args.name, ManualCommand::Abort).await,
        Command::Retry(args) => send(&args.target, &args.name, ManualCommand::Retry).await,
        Command::Pause(args) => send(&args.target, &args.name, ManualCommand::Pause).await,
        Command::Resume(args) => send(&args.target, &args.name, ManualCommand::Resume).await,
        Command::Undo(args) => {
            let (client, namespace) = connect_to(&args.target).await?;
            let revision = undo::undo(&client, &namespace, &args.name, args.to_revision).await?;
            println!(
                "rollout {} rolled back to the template of revision {revision}",
                args.name
            );
            Ok(())
        }
    }
}

/// A client and the namespace of the Rollout a user command names.
async fn connect_to(target: &TargetArgs) -> Result<(Client, String), CliError> {
    connect(&target.cluster, target.namespace.as_deref()).await
}

async fn send(target: &TargetArgs, name: &str, command: ManualCommand) -> Result<(), CliError> {
    let (client, namespace) = connect_to(target).await?;
    let message = commands::send(&client, &namespace, name, command).await?;
    println!("{message}");
    Ok(())
}
