//! The chart's outbound values reach the controller, through the real command line, as its outbound policy
//! and default Prometheus address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::time::Duration;

use serin::analysis::outbound::{Limits, OutboundConfig};

/// The controller's arguments as the chart renders them with these `--set` values.
fn chart_controller_args(values: &[&str]) -> Vec<String> {
    let mut command = std::process::Command::new("helm");
    command
        .args([
            "template",
            "serin",
            "charts/serin",
            "--namespace",
            "serin-system",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    for value in values {
        command.args(["--set", value]);
    }
    let output = command
        .output()
        .expect("helm is installed (https://helm.sh/docs/intro/install/)");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8_lossy(&output.stdout).into_owned();
    let deployment = rendered
        .split("\n---")
        .filter_map(|document| serde_yaml::from_str::<Value>(document).ok())
        .find(|document| document["kind"] == "Deployment")
        .expect("the chart renders a Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the controller has arguments")
        .iter()
        .filter_map(|arg| arg.as_str().map(str::to_string))
        .collect()
}

/// What the real command line makes of those arguments.
fn controller_config(args: &[String]) -> serin::controller::ControllerConfig {
    use clap::Parser;
    let cli = serin_cli::Cli::try_parse_from(
        std::iter::once("serin".to_string()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("the chart's arguments do not parse: {e}\n{args:?}"));
    match cli.command {
        serin_cli::Command::Controller(controller) => controller.config(),
        other => panic!("the chart runs `serin controller`, not {other:?}"),
    }
}

#[test]
fn the_charts_outbound_values_reach_the_controller_as_its_policy() {
    // By default the chart opens nothing: every measurement would be refused until the operator says where.
    let config = controller_config(&chart_controller_args(&[]));
    assert_eq!(config.outbound, OutboundConfig::default());
    assert_eq!(config.default_prometheus_address, None);

    let config = controller_config(&chart_controller_args(&[
        "outbound.allowedDestinations={prometheus.monitoring:9090,10.0.0.0/8,*.svc.cluster.local}",
        "analysis.defaultPrometheusAddress=http://thanos.monitoring:10902",
        "outbound.maxResponseBytes=2097152",
        "outbound.maxRequestTime=45s",
    ]));
    let listed: Vec<String> = config
        .outbound
        .policy
        .destinations()
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        listed,
        [
            "prometheus.monitoring:9090",
            "10.0.0.0/8",
            "*.svc.cluster.local"
        ]
    );
    assert_eq!(
        config.default_prometheus_address.as_deref(),
        Some("http://thanos.monitoring:10902")
    );
    assert_eq!(
        config.outbound.limits,
        Limits {
            max_response_bytes: 2 * 1024 * 1024,
            max_request_time: Duration::from_secs(45),
        }
    );
}
