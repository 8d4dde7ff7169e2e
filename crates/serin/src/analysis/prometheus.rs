//! Talks to Prometheus: runs one instant query through `prometheus-http-query` (on a reqwest client carrying
//! the metric's TLS settings) and returns the samples. It judges nothing; a query that works but shows an
//! unhealthy service is a value, only a query that cannot be answered is an error.
//!
//! Every query first passes the outbound policy ([`super::outbound`]): the address is resolved once and
//! checked, the connection goes only to the checked addresses, redirects leave neither the origin nor the
//! pinned addresses, the whole exchange is bounded in time and the answer in size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_http_query::error::PrometheusError;
use prometheus_http_query::response::{Data, PromqlResult};
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};

use super::outbound::{self, Admitted, OutboundConfig, OutboundError, Refused};
use super::verdict::{ProviderValue, SeriesSample};

/// Why a query could not be answered. Each is an Error measurement, not a failed one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProviderError {
    #[error("prometheus address {address:?} is not a valid URL: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Outbound(OutboundError),
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

impl From<OutboundError> for ProviderError {
    fn from(error: OutboundError) -> Self {
        match error {
            OutboundError::Refused(refused) => ProviderError::Refused(refused),
            other => ProviderError::Outbound(other),
        }
    }
}

impl ProviderError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ProviderError::InvalidAddress { .. } => "invalid_address",
            ProviderError::Refused(_) => "refused",
            ProviderError::Outbound(error) => error.category(),
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

/// Credentials, already read from their Secrets. Their `Debug` never shows the values.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    None,
    Bearer(String),
    Basic {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Bearer(_) => "Bearer(<redacted>)",
            Credentials::Basic { .. } => "Basic(<redacted>)",
        })
    }
}

impl Credentials {
    /// The secret values in these credentials (to keep them out of anything written or logged).
    pub fn values(&self) -> Vec<String> {
        match self {
            Credentials::None => Vec::new(),
            Credentials::Bearer(token) => vec![token.clone()],
            Credentials::Basic { username, password } => vec![username.clone(), password.clone()],
        }
    }
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

/// Clients differ by TLS settings and by the addresses they are pinned to; auth and headers go on each
/// request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClientKey {
    ca_pem: Option<String>,
    insecure_skip_verify: bool,
    host: Option<String>,
    pinned: Vec<SocketAddr>,
}

/// Clients kept at most; past it the cache starts over (addresses that moved leave stale entries).
const MAX_CACHED_CLIENTS: usize = 64;

/// The Prometheus provider: the outbound policy, a cache of HTTP clients and a count of the queries it sent.
#[derive(Clone, Default)]
pub struct PrometheusProvider {
    outbound: Arc<OutboundConfig>,
    clients: Arc<Mutex<HashMap<ClientKey, reqwest::Client>>>,
    queries: Arc<AtomicU64>,
}

impl std::fmt::Debug for PrometheusProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusProvider")
            .field("outbound", &self.outbound)
            .field("queries", &self.queries_sent())
            .finish()
    }
}

impl PrometheusProvider {
    /// A provider with the default outbound settings, which allow no destination at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// A provider calling only what `outbound` allows.
    pub fn with_outbound(outbound: OutboundConfig) -> Self {
        PrometheusProvider {
            outbound: Arc::new(outbound),
            ..Self::default()
        }
    }

    /// The outbound settings this provider enforces.
    pub fn outbound(&self) -> &OutboundConfig {
        &self.outbound
    }

    /// The same provider (same counters), with the outbound settings changed.
    pub fn reconfigured(&self, outbound: OutboundConfig) -> Self {
        PrometheusProvider {
            outbound: Arc::new(outbound),
            clients: Arc::default(),
            queries: self.queries.clone(),
        }
    }

    /// How many queries were sent so far (for benchmarks and the controller's metrics).
    pub fn queries_sent(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Resolves and checks an address against the outbound policy; nothing is sent.
    pub async fn admit(&self, address: &str) -> Result<Admitted, ProviderError> {
        let limit = self.outbound.limits.max_request_time;
        tokio::time::timeout(limit, outbound::admit(address, &self.outbound.policy))
            .await
            .map_err(|_| ProviderError::Timeout(limit))?
            .map_err(ProviderError::from)
    }

    fn client(
        &self,
        target: &PrometheusTarget,
        admitted: &Admitted,
    ) -> Result<reqwest::Client, ProviderError> {
        let key = ClientKey {
            ca_pem: target.ca_pem.clone(),
            insecure_skip_verify: target.insecure_skip_verify,
            host: admitted.url.host_str().map(str::to_string),
            pinned: admitted.pinned.clone(),
        };
        // A poisoned lock only means another query panicked while inserting; the map itself is still sound.
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = outbound::client_builder(admitted);
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
            .map_err(|e| ProviderError::ClientSetup(e.without_url().to_string()))?;
        if clients.len() >= MAX_CACHED_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Checks the address against the outbound policy, then runs an instant query and returns its samples.
    pub async fn query(
        &self,
        target: &PrometheusTarget,
        query: &str,
    ) -> Result<ProviderValue, ProviderError> {
        let admitted = self.admit(&target.address).await?;
        self.query_admitted(&admitted, target, query).await
    }

    /// Runs an instant query against an address [`PrometheusProvider::admit`] allowed, connecting only to
    /// the addresses it checked.
    pub async fn query_admitted(
        &self,
        admitted: &Admitted,
        target: &PrometheusTarget,
        query: &str,
    ) -> Result<ProviderValue, ProviderError> {
        let http = self.client(target, admitted)?;
        let client =
            prometheus_http_query::Client::from(http, admitted.url.as_str()).map_err(|e| {
                ProviderError::InvalidAddress {
                    address: target.address.clone(),
                    reason: e.to_string(),
                }
            })?;
        let timeout = self.outbound.limits.request_time(target.timeout);
        let mut request = client
            .query(query)
            .timeout(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
        for (name, value) in &target.headers {
            let invalid = |reason: String| ProviderError::InvalidHeader {
                name: name.clone(),
                reason,
            };
            let header_name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?;
            if header_name == HOST {
                // Another Host on an allowed address could reach a virtual host nobody allowed.
                return Err(invalid(
                    "Serin sends the Host of the address itself".to_string(),
                ));
            }
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
        let limit = self.outbound.limits.max_response_bytes;
        let address = target.address.as_str();
        // Prometheus also enforces the timeout itself; this one covers a server that never answers or
        // trickles its answer.
        let exchange = async move {
            let response = request
                .get_raw()
                .await
                .map_err(|e| classify_send(address, timeout, e))?;
            let status = response.status();
            let json = is_json(response.headers().get(CONTENT_TYPE));
            let body = outbound::read_body(address, response, limit)
                .await
                .map_err(|e| match e {
                    outbound::ReadError::Outbound(error) => ProviderError::from(error),
                    outbound::ReadError::Http(error) => classify_reqwest(address, timeout, &error),
                })?;
            decode(status, json, &body, timeout)
        };
        let data = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ProviderError::Timeout(timeout))??;
        match data {
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

/// The JSON envelope of every Prometheus API answer.
#[derive(serde::Deserialize)]
#[serde(tag = "status")]
enum Envelope {
    #[serde(rename = "success")]
    Success { data: PromqlResult },
    #[serde(rename = "error")]
    Error(PrometheusError),
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Turns an answer into a query result or the error it reports.
fn decode(
    status: reqwest::StatusCode,
    json: bool,
    body: &[u8],
    timeout: Duration,
) -> Result<Data, ProviderError> {
    let http_error = || ProviderError::HttpStatus {
        status: status.as_u16(),
        detail: String::new(),
    };
    if !json {
        return Err(if status.is_success() {
            ProviderError::BadResponse("the answer is not JSON".to_string())
        } else {
            http_error()
        });
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope::Success { data }) => Ok(data.into_inner().0),
        Ok(Envelope::Error(error)) if error.is_bad_data() => {
            Err(ProviderError::BadQuery(error.message().to_string()))
        }
        Ok(Envelope::Error(error)) if error.is_timeout() => Err(ProviderError::Timeout(timeout)),
        Ok(Envelope::Error(error)) => Err(ProviderError::Query(error.to_string())),
        Err(_) if !status.is_success() => Err(http_error()),
        Err(error) => Err(ProviderError::BadResponse(format!(
            "failed to parse the JSON answer: {error}"
        ))),
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

fn classify_send(
    address: &str,
    timeout: Duration,
    error: prometheus_http_query::Error,
) -> ProviderError {
    match error {
        prometheus_http_query::Error::Client(e) => match e.inner() {
            Some(inner) => classify_reqwest(address, timeout, inner),
            None => ProviderError::BadResponse(e.to_string()),
        },
        prometheus_http_query::Error::ParseUrl(e) => ProviderError::InvalidAddress {
            address: address.to_string(),
            reason: e.to_string(),
        },
        other => ProviderError::BadResponse(other.to_string()),
    }
}

fn classify_reqwest(address: &str, timeout: Duration, error: &reqwest::Error) -> ProviderError {
    if let Some(to) = outbound::cross_origin_redirect(error) {
        return OutboundError::Redirected {
            address: address.to_string(),
            to,
        }
        .into();
    }
    if error.is_timeout() {
        return ProviderError::Timeout(timeout);
    }
    match error.status() {
        Some(status) if !error.is_connect() => ProviderError::HttpStatus {
            status: status.as_u16(),
            detail: String::new(),
        },
        _ => ProviderError::Unreachable {
            address: address.to_string(),
            reason: describe(error),
        },
    }
}

/// What went wrong, without the request URL reqwest puts in its own message: the URL carries the query,
/// and the query may carry a Secret's value.
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_connect() {
        "connection failed".to_string()
    } else if error.is_body() || error.is_decode() {
        "reading the answer failed".to_string()
    } else {
        "the request failed".to_string()
    };
    let mut source = std::error::Error::source(error);
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

    fn loopback_provider() -> PrometheusProvider {
        PrometheusProvider::with_outbound(OutboundConfig::allowing(["127.0.0.1"]).unwrap())
    }

    #[tokio::test]
    async fn unreachable_and_invalid_addresses_are_errors_not_panics() {
        let provider = loopback_provider();
        // Port 1 on loopback: nothing listens there.
        let mut target = PrometheusTarget::new("http://127.0.0.1:1");
        target.timeout = Duration::from_secs(5);
        let err = provider.query(&target, "up").await.unwrap_err();
        assert_eq!(err.category(), "unreachable", "{err}");
        let err = provider
            .query(&PrometheusTarget::new("not a url"), "up")
            .await
            .unwrap_err();
        assert_eq!(err.category(), "refused", "{err}");
        assert!(err.to_string().contains("not a URL"), "{err}");
        let mut bad_header = PrometheusTarget::new("http://127.0.0.1:1");
        bad_header
            .headers
            .push(("X-Bad".into(), "line\nbreak".into()));
        let err = provider.query(&bad_header, "up").await.unwrap_err();
        assert_eq!(err.category(), "invalid_header", "{err}");
        let mut host = PrometheusTarget::new("http://127.0.0.1:1");
        host.headers
            .push(("Host".into(), "internal.example".into()));
        let err = provider.query(&host, "up").await.unwrap_err();
        assert_eq!(err.category(), "invalid_header", "{err}");
        let mut bad_ca = PrometheusTarget::new("https://127.0.0.1:1");
        bad_ca.ca_pem = Some("not a pem".into());
        assert!(provider.query(&bad_ca, "up").await.is_err());
    }

    #[tokio::test]
    async fn a_refused_address_sends_nothing() {
        let provider = PrometheusProvider::new();
        for address in [
            "http://127.0.0.1:1",
            "http://169.254.169.254",
            "http://[::1]:9090",
        ] {
            let err = provider
                .query(&PrometheusTarget::new(address), "up")
                .await
                .unwrap_err();
            assert_eq!(err.category(), "refused", "{address}: {err}");
            assert!(err.to_string().contains("--allowed-destinations"), "{err}");
        }
        assert_eq!(provider.queries_sent(), 0);
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let mut target = PrometheusTarget::new("http://prometheus:9090");
        target.credentials = Credentials::Bearer("t0ken-value".into());
        assert!(!format!("{target:?}").contains("t0ken-value"));
        target.credentials = Credentials::Basic {
            username: "alice-user".into(),
            password: "pa55word".into(),
        };
        let shown = format!("{target:?}");
        assert!(
            !shown.contains("alice-user") && !shown.contains("pa55word"),
            "{shown}"
        );
    }

    #[test]
    fn answers_decode_into_results_or_the_error_they_report() {
        let ok = reqwest::StatusCode::OK;
        let limit = Duration::from_secs(3);
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1,"0.5"]}]}}"#;
        assert!(matches!(decode(ok, true, vector, limit), Ok(Data::Vector(v)) if v.len() == 1));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert!(matches!(
            decode(ok, true, scalar, limit),
            Ok(Data::Scalar(_))
        ));
        let cases: &[(u16, bool, &[u8], &str)] = &[
            (
                400,
                true,
                br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
                "bad_query",
            ),
            (
                503,
                true,
                br#"{"status":"error","errorType":"timeout","error":"query timed out"}"#,
                "timeout",
            ),
            (
                422,
                true,
                br#"{"status":"error","errorType":"execution","error":"boom"}"#,
                "query",
            ),
            (401, false, b"unauthorized", "http_status"),
            (502, true, b"<html>bad gateway</html>", "http_status"),
            (200, false, b"hello", "bad_response"),
            (200, true, b"{\"status\":\"success\"}", "bad_response"),
        ];
        for (status, json, body, category) in cases {
            let status = reqwest::StatusCode::from_u16(*status).unwrap();
            let err = decode(status, *json, body, limit).unwrap_err();
            assert_eq!(err.category(), *category, "{status} {err}");
        }
        assert!(is_json(Some(&HeaderValue::from_static(
            "application/json; charset=utf-8"
        ))));
        assert!(!is_json(Some(&HeaderValue::from_static("text/plain"))));
        assert!(!is_json(None));
    }
}
