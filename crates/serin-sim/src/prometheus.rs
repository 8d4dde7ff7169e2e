//! Launches a real `prometheus` process on 127.0.0.1 that scrapes given targets every second (for the demo,
//! the tests and the benchmarks), and asks it simple questions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// How to install the server when it is missing (Debian/Ubuntu package).
pub const INSTALL_HINT: &str = "sudo apt-get install -y prometheus";

/// Why Prometheus could not be started or asked.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("prometheus is not installed (looked on PATH and at /usr/bin/prometheus); install it with: {INSTALL_HINT}")]
    NotInstalled,
    #[error("cannot prepare the prometheus working directory: {0}")]
    WorkDir(#[source] std::io::Error),
    #[error("cannot find a free port: {0}")]
    FreePort(#[source] std::io::Error),
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("prometheus exited during startup ({status}): {log}")]
    ExitedEarly { status: String, log: String },
    #[error("prometheus at {url} was not ready within {waited:?}")]
    NotReady { url: String, waited: Duration },
    #[error("prometheus at {url} had not scraped {target} within {waited:?}")]
    NeverScraped {
        url: String,
        target: String,
        waited: Duration,
    },
}

impl PrometheusError {
    /// A bounded label.
    pub fn category(&self) -> &'static str {
        match self {
            PrometheusError::NotInstalled => "not_installed",
            PrometheusError::WorkDir(_) => "work_dir",
            PrometheusError::FreePort(_) => "free_port",
            PrometheusError::Spawn { .. } => "spawn",
            PrometheusError::ExitedEarly { .. } => "exited_early",
            PrometheusError::NotReady { .. } => "not_ready",
            PrometheusError::NeverScraped { .. } => "never_scraped",
        }
    }
}

/// One scrape target: `host:port` and the path of its metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeTarget {
    pub address: SocketAddr,
    pub metrics_path: String,
}

impl ScrapeTarget {
    /// A target from a full metrics URL such as `http://127.0.0.1:4321/metrics`; `None` if it is not one.
    pub fn from_url(url: &str) -> Option<ScrapeTarget> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/metrics"),
        };
        let address: SocketAddr = authority.parse().ok()?;
        Some(ScrapeTarget {
            address,
            metrics_path: path.to_string(),
        })
    }
}

/// How long to wait for startup and the first scrape.
#[derive(Clone, Debug)]
pub struct PrometheusOptions {
    pub ready_timeout: Duration,
    pub first_scrape_timeout: Duration,
}

impl Default for PrometheusOptions {
    fn default() -> Self {
        PrometheusOptions {
            ready_timeout: Duration::from_secs(60),
            first_scrape_timeout: Duration::from_secs(30),
        }
    }
}

/// The `prometheus` binary: the first on PATH, else `/usr/bin/prometheus`.
pub fn find_binary() -> Result<PathBuf, PrometheusError> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("prometheus"))
        .find(|candidate| candidate.is_file());
    if let Some(path) = on_path {
        return Ok(path);
    }
    let fallback = PathBuf::from("/usr/bin/prometheus");
    if fallback.is_file() {
        Ok(fallback)
    } else {
        Err(PrometheusError::NotInstalled)
    }
}

/// The configuration file: every target in one job, scraped every second.
pub fn scrape_config(targets: &[ScrapeTarget]) -> String {
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
    );
    for (index, target) in targets.iter().enumerate() {
        config.push_str(&format!(
            "  - job_name: target-{index}\n    metrics_path: \"{}\"\n    static_configs:\n      - targets: [\"{}\"]\n",
            target.metrics_path.replace('\\', "\\\\").replace('"', "\\\""),
            target.address
        ));
    }
    config
}

/// A `prometheus` process; stopped (kill + wait) on `stop()` or when dropped.
pub struct PrometheusServer {
    url: String,
    child: Option<Child>,
    http: reqwest::Client,
    dir: WorkDir,
}

/// A private directory for the configuration, data and log; removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> std::io::Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("serin-prometheus-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` every second and waits until it is ready and has scraped each
    /// target at least once.
    pub async fn start(
        targets: &[ScrapeTarget],
        options: &PrometheusOptions,
    ) -> Result<PrometheusServer, PrometheusError> {
        let binary = find_binary()?;
        let dir = WorkDir::create().map_err(PrometheusError::WorkDir)?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, scrape_config(targets)).map_err(PrometheusError::WorkDir)?;
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).map_err(PrometheusError::WorkDir)?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| PrometheusError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let mut server = PrometheusServer {
            url: format!("http://{listen}"),
            child: Some(child),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            dir,
        };
        server.wait_ready(options.ready_timeout).await?;
        for target in targets {
            server
                .wait_scraped(target, options.first_scrape_timeout)
                .await?;
        }
        Ok(server)
    }

    /// Base URL, such as `http://127.0.0.1:39123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where its configuration, data and log live.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), PrometheusError> {
        let deadline = Instant::now() + within;
        let ready_url = format!("{}/-/ready", self.url);
        loop {
            self.fail_if_exited()?;
            if let Ok(response) = self.http.get(&ready_url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(PrometheusError::NotReady {
                    url: self.url.clone(),
                    waited: within,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_scraped(
        &mut self,
        target: &ScrapeTarget,
        within: Duration,
    ) -> Result<(), PrometheusError> {
        let deadline = Instant::now() + within;
        let query = format!("up{{instance=\"{}\"}} == 1", target.address);
        loop {
            self.fail_if_exited()?;
            if self.query(&query).await.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PrometheusError::NeverScraped {
                    url: self.url.clone(),
                    target: target.address.to_string(),
                    waited: within,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn fail_if_exited(&mut self) -> Result<(), PrometheusError> {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            _ => None,
        };
        match exited {
            Some(status) => {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"))
                    .unwrap_or_default();
                let log = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                Err(PrometheusError::ExitedEarly { status, log })
            }
            None => Ok(()),
        }
    }

    /// The value of an instant query that returns one sample (a scalar or a one-series vector), for
    /// display; `None` for no data, several series, NaN or any error.
    pub async fn query(&self, promql: &str) -> Option<f64> {
        let response = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        single_value(&body)
    }

    /// Stops the process now (kill + wait); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The one finite value of a `/api/v1/query` answer.
pub fn single_value(body: &serde_json::Value) -> Option<f64> {
    if body.get("status")?.as_str()? != "success" {
        return None;
    }
    let data = body.get("data")?;
    let sample = match data.get("resultType")?.as_str()? {
        "scalar" => data.get("result")?,
        "vector" => {
            let result = data.get("result")?.as_array()?;
            if result.len() != 1 {
                return None;
            }
            result[0].get("value")?
        }
        _ => return None,
    };
    let value: f64 = sample.get(1)?.as_str()?.parse().ok()?;
    value.is_finite().then_some(value)
}

fn free_port() -> Result<u16, PrometheusError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(PrometheusError::FreePort)?;
    Ok(listener
        .local_addr()
        .map_err(PrometheusError::FreePort)?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn target_from_a_metrics_url() {
        let target = ScrapeTarget::from_url("http://127.0.0.1:4321/metrics").unwrap();
        assert_eq!(target.address.port(), 4321);
        assert_eq!(target.metrics_path, "/metrics");
        assert_eq!(
            ScrapeTarget::from_url("http://127.0.0.1:9/")
                .unwrap()
                .metrics_path,
            "/"
        );
        assert!(ScrapeTarget::from_url("https://127.0.0.1:9/metrics").is_none());
        assert!(ScrapeTarget::from_url("http://localhost:9/metrics").is_none());
    }

    #[test]
    fn config_scrapes_every_target_every_second() {
        let targets = [
            ScrapeTarget::from_url("http://127.0.0.1:1000/metrics").unwrap(),
            ScrapeTarget::from_url("http://127.0.0.1:2000/x").unwrap(),
        ];
        let config: serde_yaml::Value = serde_yaml::from_str(&scrape_config(&targets)).unwrap();
        assert_eq!(config["global"]["scrape_interval"], "1s");
        let jobs = config["scrape_configs"].as_sequence().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1]["metrics_path"], "/x");
        assert_eq!(jobs[1]["static_configs"][0]["targets"][0], "127.0.0.1:2000");
    }

    #[test]
    fn only_one_finite_sample_is_a_value() {
        let vector = |result: serde_json::Value| json!({"status": "success", "data": {"resultType": "vector", "result": result}});
        assert_eq!(
            single_value(&vector(json!([{"metric": {}, "value": [1.0, "0.25"]}]))),
            Some(0.25)
        );
        assert_eq!(single_value(&vector(json!([]))), None);
        assert_eq!(
            single_value(&vector(json!([
                {"metric": {"a": "1"}, "value": [1.0, "1"]},
                {"metric": {"a": "2"}, "value": [1.0, "2"]}
            ]))),
            None
        );
        assert_eq!(
            single_value(&vector(json!([{"metric": {}, "value": [1.0, "NaN"]}]))),
            None
        );
        assert_eq!(
            single_value(
                &json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}})
            ),
            Some(3.0)
        );
        assert_eq!(single_value(&json!({"status": "error"})), None);
    }
}
