//! `serin demo` end to end (the real binary, as `make demo` runs it) and the Prometheus launcher against
//! the simulated cluster's traffic metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use serin_sim::prometheus::{PrometheusOptions, PrometheusServer, ScrapeTarget};
use serin_sim::{SimCluster, SimConfig};

#[tokio::test]
async fn prometheus_scrapes_the_simulated_cluster_and_stops() {
    serin_sim::install_crypto_provider();
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    let target = ScrapeTarget::from_url(&sim.metrics_url()).unwrap();
    let mut prometheus =
        PrometheusServer::start(std::slice::from_ref(&target), &PrometheusOptions::default())
            .await
            .unwrap();
    let up = prometheus
        .query(&format!("up{{instance=\"{}\"}}", target.address))
        .await;
    assert_eq!(
        up,
        Some(1.0),
        "start() returns only after a successful scrape"
    );
    assert_eq!(
        prometheus.query("count(up)").await,
        Some(1.0),
        "one target, one job"
    );
    let work_dir = prometheus.work_dir().to_path_buf();
    let url = prometheus.url().to_string();
    prometheus.stop();
    let client = reqwest::Client::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("{url}/-/ready")).send(),
    )
    .await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "prometheus still answers after stop()"
    );
    drop(prometheus);
    assert!(!work_dir.exists(), "the work directory is removed on drop");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_demo_rolls_v2_out_and_v3_back_by_itself() {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["demo", "--fast"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(360), child.wait_with_output())
        .await
        .expect("the demo finishes on its own within its global timeout")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status.code()
    );
    for expected in [
        "v1 is Healthy",
        "v2 promoted to 100%",
        "v3 aborted by analysis",
        "traffic back on v2: v2 100%",
        "all as expected",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let failed_error_rate = stdout
        .lines()
        .any(|line| line.contains("analysis error-rate") && line.ends_with("-> Failed"));
    assert!(
        failed_error_rate,
        "no failed error-rate measurement shown:\n{stdout}"
    );
    let summary = stdout.split("== summary").nth(1).unwrap_or_default();
    assert!(!summary.contains("FAILED"), "{summary}");
    assert!(
        summary.lines().filter(|line| line.ends_with(" ok")).count() >= 7,
        "{summary}"
    );
}
