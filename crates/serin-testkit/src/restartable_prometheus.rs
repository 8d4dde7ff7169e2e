//! A real `prometheus` process a test can stop (SIGKILL, like a crashed or evicted pod) and start again on the
//! same port, keeping its data directory or starting from an empty one: the outages an analysis meets when
//! the monitoring stack restarts under it. Used by the analysis fault tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serin_sim::prometheus::{find_binary, scrape_config, single_value, ScrapeTarget};

/// What a restarted Prometheus finds on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// The data directory of the previous process (its WAL is replayed: old samples are still there).
    Kept,
    /// An empty data directory: every series starts again from nothing.
    Fresh,
}

/// How long a start may take on a loaded 2-core machine.
const READY_WITHIN: Duration = Duration::from_secs(60);
const FIRST_SCRAPE_WITHIN: Duration = Duration::from_secs(30);

/// A `prometheus` process bound to one port for its whole life; killed when dropped.
pub struct RestartablePrometheus {
    /// Base URL, such as `http://127.0.0.1:39123`; the same after every restart.
    pub url: String,
    listen: String,
    binary: PathBuf,
    dir: tempfile::TempDir,
    targets: Vec<ScrapeTarget>,
    child: Option<Child>,
    /// Which data directory the process uses (`data-<n>`); a fresh start moves to the next one.
    data_generation: u32,
    /// Starts so far, to keep each process's log apart.
    starts: u32,
    http: reqwest::Client,
}

impl RestartablePrometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) every second on a free port, and
    /// waits until it is ready and has scraped each target.
    pub async fn start(targets: &[SocketAddr]) -> RestartablePrometheus {
        let binary = find_binary().unwrap_or_else(|error| panic!("{error}"));
        let dir = tempfile::Builder::new()
            .prefix("serin-prometheus-restartable-")
            .tempdir()
            .expect("a temporary directory for prometheus");
        let targets: Vec<ScrapeTarget> = targets
            .iter()
            .map(|address| ScrapeTarget {
                address: *address,
                metrics_path: "/metrics".to_string(),
            })
            .collect();
        std::fs::write(dir.path().join("prometheus.yml"), scrape_config(&targets))
            .expect("prometheus configuration written");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut prometheus = RestartablePrometheus {
            url: format!("http://{listen}"),
            listen,
            binary,
            dir,
            targets,
            child: None,
            data_generation: 0,
            starts: 0,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        };
        prometheus.spawn_and_wait().await;
        prometheus
    }

    /// Kills the process now and waits for it to exit; idempotent. Queries are refused from here on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether a process was started and not stopped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a stopped Prometheus again on the same port, with the previous data or none, and waits until
    /// it is ready and has scraped each target since this restart.
    pub async fn restart(&mut self, data: Data) {
        assert!(
            self.child.is_none(),
            "restart of a Prometheus that is still running"
        );
        if data == Data::Fresh {
            self.data_generation += 1;
        }
        self.spawn_and_wait().await;
    }

    /// The data directory the current (or next) process uses.
    pub fn data_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("data-{}", self.data_generation))
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("prometheus-{}.log", self.starts))
    }

    async fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let log = std::fs::File::create(self.log_path()).expect("prometheus log file");
        let child = Command::new(&self.binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", self.data_dir().display()))
            .arg(format!("--web.listen-address={}", self.listen))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready().await;
        // Samples from before a restart are still in a kept data directory: only a scrape stamped after
        // this start proves the new process scrapes.
        for target in self.targets.clone() {
            let query = format!(
                "timestamp(up{{instance=\"{}\"}} == 1) >= {started}",
                target.address
            );
            let deadline = Instant::now() + FIRST_SCRAPE_WITHIN;
            for _ in 0..(FIRST_SCRAPE_WITHIN.as_millis() / 200 + 1) {
                self.fail_if_exited();
                if self.query(&query).await.is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus at {} never scraped {} within {FIRST_SCRAPE_WITHIN:?}",
                    self.url,
                    target.address
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        let ready = format!("{}/-/ready", self.url);
        for _ in 0..(READY_WITHIN.as_millis() / 100 + 1) {
            self.fail_if_exited();
            if let Ok(response) = self.http.get(&ready).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus at {} not ready within {READY_WITHIN:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus at {} never became ready", self.url);
    }

    /// Panics with the end of the log if the process has exited (e.g. the port was taken meanwhile).
    fn fail_if_exited(&mut self) {
        let status = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status,
            _ => return,
        };
        self.child = None;
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        panic!(
            "prometheus on {} exited ({status}): {}",
            self.listen,
            tail.join(" | ")
        );
    }

    /// The one finite value of an instant query, `None` for anything else (no data, several series, an
    /// error, Prometheus down).
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

    /// How many series an instant query returns (0 on any error).
    pub async fn series_count(&self, promql: &str) -> usize {
        let Ok(response) = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
        else {
            return 0;
        };
        let Ok(body) = response.json::<serde_json::Value>().await else {
            return 0;
        };
        body["data"]["result"]
            .as_array()
            .map(|series| series.len())
            .unwrap_or(0)
    }

    /// Waits (bounded) until `promql` returns at least one series.
    pub async fn wait_for(&self, promql: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for _ in 0..(within.as_millis() / 200 + 1) {
            if self.series_count(promql).await > 0 {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "prometheus at {} never returned data for {promql}",
            self.url
        );
    }

    /// Where the configuration, data directories and logs live.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RestartablePrometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
