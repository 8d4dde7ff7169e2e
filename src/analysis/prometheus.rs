//! Talks to Prometheus: runs one instant query through `prometheus-http-query` (on a reqwest client carrying
//! the metric's TLS settings) and returns the samples. It judges nothing; a query that works but shows an
//! unhealthy service is a value, only a query that cannot be answered is an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_http_query::response::Data;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};

use super::verdict::{ProviderValue, SeriesSample};

/// Why a query could not be answered. Each is an Error measurement, not a failed one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProviderError {
    #[error("prometheus address {address:?} is not a valid URL: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("header {name:?} cannot be sent: {reason}")]
    InvalidHeader { name: String, reason: String },
    #[error("TLS CA bundle cannot be used: {0}")]
    InvalidCa(String),
    #[error("HTTP client cannot be built: {0}")]
    ClientSetup(String),
    #[error("prometheus at {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("prometheus did not answer within {0:?}")]
    Timeout(Duration),
    #[error("prometheus answered HTTP {status}{detail}")]
    HttpStatus { status: u16, detail: String },
    #[error("prometheus rejected the query (bad_data): {0}")]
    BadQuery(String),
    #[error("prometheus could not run the query: {0}")]
    Query(String),
    #[error("prometheus answered with something that is not a query result: {0}")]
    BadResponse(String),
    #[error("query returned a range vector; write an instant query (wrap the range in rate(), avg_over_time(), ...)")]
    RangeVector,
}

impl ProviderError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ProviderError::InvalidAddress { .. } => "invalid_address",
            ProviderError::InvalidHeader { .. } => "invalid_header",
            ProviderError::InvalidCa(_) => "invalid_ca",
            ProviderError::ClientSetup(_) => "client_setup",
            ProviderError::Unreachable { .. } => "unreachable",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::HttpStatus { .. } => "http_status",
            ProviderError::BadQuery(_) => "bad_query",
            ProviderError::Query(_) => "query",
            ProviderError::BadResponse(_) => "bad_response",
            ProviderError::RangeVector => "range_vector",
        }
    }
}

/// Credentials, already read from their Secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    None,
    Bearer(String),
    Basic {
        username: String,
        password: String,
    },
}

/// Everything needed to query one Prometheus server, with secrets resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusTarget {
    pub address: String,
    pub timeout: Duration,
    pub credentials: Credentials,
    pub headers: Vec<(String, String)>,
    /// PEM bundle of CAs to trust instead of the system ones.
    pub ca_pem: Option<String>,
    pub insecure_skip_verify: bool,
}

/// The default query timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl PrometheusTarget {
    /// A target with no credentials and the default timeout.
    pub fn new(address: impl Into<String>) -> Self {
        PrometheusTarget {
            address: address.into(),
            timeout: DEFAULT_TIMEOUT,
            credentials: Credentials::None,
            headers: Vec::new(),
            ca_pem: None,
            insecure_skip_verify: false,
        }
    }
}

/// Clients differ only by TLS settings; auth and headers go on each request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClientKey {
    ca_pem: Option<String>,
    insecure_skip_verify: bool,
}

/// The Prometheus provider: a cache of HTTP clients and a count of the queries it sent.
#[derive(Clone, Default)]
pub struct PrometheusProvider {
    clients: Arc<Mutex<HashMap<ClientKey, reqwest::Client>>>,
    queries: Arc<AtomicU64>,
}

impl std::fmt::Debug for PrometheusProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusProvider")
            .field("queries", &self.queries_sent())
            .finish()
    }
}

impl PrometheusProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many queries were sent so far (for benchmarks and the controller's metrics).
    pub fn queries_sent(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn client(&self, target: &PrometheusTarget) -> Result<reqwest::Client, ProviderError> {
        let key = ClientKey {
            ca_pem: target.ca_pem.clone(),
            insecure_skip_verify: target.insecure_skip_verify,
        };
        // A poisoned lock only means another query panicked while inserting; the map itself is still sound.
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(pem) = &target.ca_pem {
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| ProviderError::InvalidCa(e.to_string()))?;
            builder = builder.tls_certs_only([certificate]);
        }
        if target.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| ProviderError::ClientSetup(e.to_string()))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Runs an instant query and returns its samples.
    pub async fn query(
        &self,
        target: &PrometheusTarget,
        query: &str,
    ) -> Result<ProviderValue, ProviderError> {
        let http = self.client(target)?;
        let client = prometheus_http_query::Client::from(http, &target.address).map_err(|e| {
            ProviderError::InvalidAddress {
                address: target.address.clone(),
                reason: e.to_string(),
            }
        })?;
        let mut request = client
            .query(query)
            .timeout(i64::try_from(target.timeout.as_millis()).unwrap_or(i64::MAX));
        for (name, value) in &target.headers {
            let invalid = |reason: String| ProviderError::InvalidHeader {
                name: name.clone(),
                reason,
            };
            let header_name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?;
            let header_value = HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?;
            request = request.header(header_name, header_value);
        }
        match &target.credentials {
            Credentials::None => {}
            Credentials::Bearer(token) => {
                request =
                    request.header(AUTHORIZATION, sensitive_header(&format!("Bearer {token}"))?);
            }
            Credentials::Basic { username, password } => {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                request = request.header(
                    AUTHORIZATION,
                    sensitive_header(&format!("Basic {encoded}"))?,
                );
            }
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        // Prometheus also enforces the timeout itself; this one covers a server that never answers.
        let answer = tokio::time::timeout(target.timeout, request.get())
            .await
            .map_err(|_| ProviderError::Timeout(target.timeout))?;
        let result = answer.map_err(|e| classify(&target.address, target.timeout, e))?;
        match result.into_inner().0 {
            Data::Scalar(sample) => Ok(ProviderValue::Scalar(sample.value())),
            Data::Vector(vector) => Ok(ProviderValue::Vector(
                vector
                    .into_iter()
                    .map(|series| {
                        let (labels, sample) = series.into_inner();
                        SeriesSample {
                            labels: labels.into_iter().collect(),
                            value: sample.value(),
                        }
                    })
                    .collect(),
            )),
            Data::Matrix(_) => Err(ProviderError::RangeVector),
        }
    }
}

fn sensitive_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut header = HeaderValue::from_str(value).map_err(|e| ProviderError::InvalidHeader {
        name: AUTHORIZATION.to_string(),
        reason: e.to_string(),
    })?;
    header.set_sensitive(true);
    Ok(header)
}

fn classify(
    address: &str,
    timeout: Duration,
    error: prometheus_http_query::Error,
) -> ProviderError {
    match error {
        prometheus_http_query::Error::Prometheus(e) if e.is_bad_data() => {
            ProviderError::BadQuery(e.message().to_string())
        }
        prometheus_http_query::Error::Prometheus(e) if e.is_timeout() => {
            ProviderError::Timeout(timeout)
        }
        prometheus_http_query::Error::Prometheus(e) => ProviderError::Query(e.to_string()),
        prometheus_http_query::Error::Client(e) => match e.inner() {
            Some(inner) if inner.is_timeout() => ProviderError::Timeout(timeout),
            Some(inner) if inner.is_connect() => ProviderError::Unreachable {
                address: address.to_string(),
                reason: error_chain(inner),
            },
            Some(inner) => match inner.status() {
                Some(status) => ProviderError::HttpStatus {
                    status: status.as_u16(),
                    detail: String::new(),
                },
                None => ProviderError::Unreachable {
                    address: address.to_string(),
                    reason: error_chain(inner),
                },
            },
            None => ProviderError::BadResponse(e.to_string()),
        },
        prometheus_http_query::Error::ParseUrl(e) => ProviderError::InvalidAddress {
            address: address.to_string(),
            reason: e.to_string(),
        },
        other => ProviderError::BadResponse(other.to_string()),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_and_invalid_addresses_are_errors_not_panics() {
        let provider = PrometheusProvider::new();
        // Port 1 on loopback: nothing listens there.
        let mut target = PrometheusTarget::new("http://127.0.0.1:1");
        target.timeout = Duration::from_secs(5);
        let err = provider.query(&target, "up").await.unwrap_err();
        assert_eq!(err.category(), "unreachable", "{err}");
        let err = provider
            .query(&PrometheusTarget::new("not a url"), "up")
            .await
            .unwrap_err();
        assert_eq!(err.category(), "invalid_address", "{err}");
        let mut bad_header = PrometheusTarget::new("http://127.0.0.1:1");
        bad_header
            .headers
            .push(("X-Bad".into(), "line\nbreak".into()));
        let err = provider.query(&bad_header, "up").await.unwrap_err();
        assert_eq!(err.category(), "invalid_header", "{err}");
        let mut bad_ca = PrometheusTarget::new("https://127.0.0.1:1");
        bad_ca.ca_pem = Some("not a pem".into());
        assert!(provider.query(&bad_ca, "up").await.is_err());
    }
}
