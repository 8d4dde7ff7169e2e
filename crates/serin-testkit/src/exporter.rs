//! Test bed for analysis: a real `prometheus` process on 127.0.0.1 scraping a small exporter whose series the
//! test controls. Used by `crates/serin/tests/analysis_prometheus.rs` and `crates/serin/benches/analysis.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use serin_sim::prometheus::{PrometheusOptions, PrometheusServer, ScrapeTarget};

/// How a series' value evolves.
#[derive(Clone, Debug)]
pub enum Value {
    /// A counter growing by this much per second since the exporter started.
    PerSecond(f64),
    /// A fixed value (gauges; `f64::NAN` and infinities are written as `NaN`, `+Inf`, `-Inf`).
    Fixed(f64),
}

/// One exported series.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: Value,
}

impl Series {
    pub fn new(name: &str, labels: &[(&str, &str)], value: Value) -> Self {
        Series {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }
}

/// Requests of one service version: `per_second` requests, `error_share` of them 5xx, all of them taking
/// about `latency_seconds`.
pub fn http_traffic(
    service: &str,
    hash: &str,
    per_second: f64,
    error_share: f64,
    latency_seconds: f64,
) -> Vec<Series> {
    let counter = |code: &str, rate: f64| {
        Series::new(
            "http_requests_total",
            &[
                ("service", service),
                ("pod_template_hash", hash),
                ("code", code),
            ],
            Value::PerSecond(rate),
        )
    };
    let mut series = vec![
        counter("200", per_second * (1.0 - error_share)),
        counter("500", per_second * error_share),
    ];
    for le in ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf"] {
        let bound: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(0.0)
        };
        let rate = if latency_seconds <= bound {
            per_second
        } else {
            0.0
        };
        series.push(Series::new(
            "http_request_duration_seconds_bucket",
            &[
                ("service", service),
                ("pod_template_hash", hash),
                ("le", le),
            ],
            Value::PerSecond(rate),
        ));
    }
    series
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{value}")
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An exporter serving `/metrics` in the Prometheus text format.
pub struct Exporter {
    pub address: SocketAddr,
    series: Arc<Mutex<Vec<Series>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Exporter {
    pub async fn start(series: Vec<Series>) -> Exporter {
        let series = Arc::new(Mutex::new(series));
        let started = Instant::now();
        let shared = series.clone();
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let shared = shared.clone();
                async move {
                    let elapsed = started.elapsed().as_secs_f64();
                    let series = shared.lock().map(|s| s.clone()).unwrap_or_default();
                    let mut body = String::new();
                    for s in series {
                        let labels: Vec<String> = s
                            .labels
                            .iter()
                            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                            .collect();
                        let value = match s.value {
                            Value::PerSecond(rate) => rate * elapsed,
                            Value::Fixed(v) => v,
                        };
                        body.push_str(&format!(
                            "{}{{{}}} {}\n",
                            s.name,
                            labels.join(","),
                            format_value(value)
                        ));
                    }
                    ([("content-type", "text/plain; version=0.0.4")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind exporter");
        let address = listener.local_addr().expect("exporter address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Exporter {
            address,
            series,
            server,
        }
    }

    /// Replaces every exported series.
    pub fn set(&self, series: Vec<Series>) {
        if let Ok(mut current) = self.series.lock() {
            *current = series;
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A `prometheus` process scraping given targets every second; killed when dropped (a thin test-side face
/// of `serin_sim::prometheus::PrometheusServer`, which the demo uses too).
pub struct Prometheus {
    pub url: String,
    server: PrometheusServer,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port, path `/metrics`) every second and waits until it is
    /// ready and has scraped each of them once.
    pub async fn start(targets: &[SocketAddr]) -> Prometheus {
        let targets: Vec<ScrapeTarget> = targets
            .iter()
            .map(|address| ScrapeTarget {
                address: *address,
                metrics_path: "/metrics".to_string(),
            })
            .collect();
        let server = PrometheusServer::start(&targets, &PrometheusOptions::default())
            .await
            .unwrap_or_else(|error| {
                panic!("{error} (install prometheus: apt-get install -y prometheus)")
            });
        Prometheus {
            url: server.url().to_string(),
            server,
        }
    }

    /// Runs a query and returns how many series it gave (for waiting until data is there).
    pub async fn series_count(&self, query: &str) -> usize {
        let client = reqwest::Client::new();
        let Ok(response) = client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
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
            .map(|a| a.len())
            .unwrap_or(0)
    }

    /// Waits (bounded) until `query` returns at least one series.
    pub async fn wait_for(&self, query: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for _ in 0..((within.as_millis() / 200) + 1) {
            if self.series_count(query).await > 0 {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("prometheus at {} never returned data for {query}", self.url);
    }

    /// Stops the process now.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
