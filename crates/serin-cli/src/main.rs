//! The `serin` binary: parses the command line and dispatches; also the kubectl plugin `kubectl-serin`.

use clap::Parser;
use serin_cli::{Cli, Command, LogFormat};

// The controller's memory is watch caches filled and refilled object by object while events stream in;
// glibc's malloc kept what bursts (a relist, an update wave) freed, jemalloc returns it after a few
// seconds (docs/benchmarks/scale.md has both).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    serin::install_crypto_provider();
    init_logging(&cli);
    if let Command::Demo(args) = &cli.command {
        return std::process::ExitCode::from(serin_cli::demo::main(args.options()).await);
    }
    match serin_cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &Cli) {
    let (format, level) = match &cli.command {
        Command::Controller(args) => (args.log_format, args.log_level.clone()),
        Command::Demo(args) if args.verbose => (LogFormat::Text, "info".into()),
        // User commands print their results; logs only on request, and only warnings by default.
        _ => (
            LogFormat::Text,
            std::env::var("SERIN_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        ),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
