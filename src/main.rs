//! The `serin` command line: `serin sim` runs the simulated cluster until Ctrl-C.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serin::sim::{SimCluster, SimConfig};

#[derive(Parser)]
#[command(name = "serin", about = "Progressive delivery operator for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the simulated Kubernetes cluster on 127.0.0.1 until Ctrl-C.
    Sim {
        /// Port to listen on; 0 picks any free port.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Where to write a kubeconfig that kubectl and kube-rs use unchanged.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Sim { port, kubeconfig } => {
            let cluster = SimCluster::start(SimConfig {
                port,
                kubeconfig_path: kubeconfig,
                ..SimConfig::default()
            })
            .await?;
            tracing::info!(url = %cluster.base_url(), kubeconfig = %cluster.kubeconfig_path().display(), "serin sim ready; Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
            tracing::info!("stopping");
            cluster.shutdown().await;
        }
    }
    Ok(())
}
