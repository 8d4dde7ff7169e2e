//! The outbound policy: which addresses Serin may call on a user's behalf (Prometheus now, every later
//! provider too), decided in pure code ([`check`]) over the URL and the IP addresses its host resolved to,
//! plus the thin client wiring that resolves once, checks, and then connects only to the addresses it
//! checked, never through a proxy, never following a redirect to another origin, reading a bounded body.
//!
//! The operator lists allowed destinations (host names, `*.domain`, `host:port`, IP addresses, `ip:port`,
//! CIDRs, or `any`). Loopback, link-local, unspecified addresses and the API server's own addresses are
//! refused unless an entry names them explicitly (a CIDR or IP containing them, or the exact host name):
//! `any` and `*.domain` never cover them, so a tenant's DNS name pointing at 169.254.169.254 is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::Url;

/// Where the operator changes the allowed destinations; every refusal names it.
pub const ALLOWED_DESTINATIONS_SETTING: &str = "the controller's allowed destinations (flag \
     --allowed-destinations, env SERIN_ALLOWED_DESTINATIONS, Helm value outbound.allowedDestinations)";

/// Where the operator changes the response size bound.
pub const MAX_RESPONSE_BYTES_SETTING: &str =
    "flag --outbound-max-response-bytes, env SERIN_OUTBOUND_MAX_RESPONSE_BYTES, Helm value outbound.maxResponseBytes";

/// Where the operator changes the request time bound.
pub const MAX_REQUEST_TIME_SETTING: &str =
    "flag --outbound-max-request-time, env SERIN_OUTBOUND_MAX_REQUEST_TIME, Helm value outbound.maxRequestTime";

/// Host names that reach the API server through its in-cluster Service, whatever they resolve to.
const API_SERVER_NAMES: &[&str] = &["kubernetes", "kubernetes.default", "kubernetes.default.svc"];

/// Why a destination list entry cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error(
    "allowed destination {entry:?}: {reason} (write a host name, *.domain, host:port, an IP address, \
     ip:port, a CIDR such as 10.0.0.0/8, or any)"
)]
pub struct DestinationError {
    pub entry: String,
    pub reason: String,
}

impl DestinationError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        "invalid_destination"
    }
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of exactly one address.
    pub fn single(address: IpAddr) -> Cidr {
        let address = canonical(address);
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        Cidr { address, prefix }
    }

    /// Whether `ip` lies in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| "a CIDR needs a /prefix".to_string())?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        let address = canonical(address);
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {prefix:?} is not a number from 0 to {max}"))?;
        let cidr = Cidr { address, prefix };
        let network = cidr.network_address();
        if network != address {
            return Err(format!(
                "{address} has bits set beyond the /{prefix} prefix; did you mean {network}/{prefix}?"
            ));
        }
        Ok(cidr)
    }

    fn network_address(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// One entry of the allowed destinations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// `any`: every address except loopback, link-local, unspecified and the API server.
    Any,
    /// `prometheus.monitoring` or `prometheus.monitoring:9090`: this exact host name.
    Host { name: String, port: Option<u16> },
    /// `*.monitoring.svc.cluster.local`: every name below the suffix (not the suffix itself).
    Subdomains { suffix: String, port: Option<u16> },
    /// `10.0.0.0/8`, `127.0.0.1`, `127.0.0.1:9090`, `[::1]:9090`: addresses in this network.
    Network { network: Cidr, port: Option<u16> },
}

impl Destination {
    /// Parses one entry of `--allowed-destinations`.
    pub fn parse(entry: &str) -> Result<Destination, DestinationError> {
        let text = entry.trim();
        let error = |reason: String| DestinationError {
            entry: entry.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(error("the entry is empty".to_string()));
        }
        if text.eq_ignore_ascii_case("any") {
            return Ok(Destination::Any);
        }
        if text.contains("://") {
            return Err(error("a URL is not a destination".to_string()));
        }
        if text.contains('/') {
            let network = Cidr::parse(text).map_err(error)?;
            return Ok(Destination::Network {
                network,
                port: None,
            });
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Destination::Network {
                network: Cidr::single(ip),
                port: None,
            });
        }
        if let Ok(socket) = text.parse::<SocketAddr>() {
            return Ok(Destination::Network {
                network: Cidr::single(socket.ip()),
                port: Some(socket.port()),
            });
        }
        if text.starts_with('[') {
            return Err(error("not an IPv6 address or [address]:port".to_string()));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                    error(format!("port {port:?} is not a number from 1 to 65535"))
                })?;
                (host, Some(port))
            }
            None => (text, None),
        };
        let host = normalize_name(host);
        if let Some(suffix) = host.strip_prefix("*.") {
            check_name(suffix).map_err(error)?;
            return Ok(Destination::Subdomains {
                suffix: suffix.to_string(),
                port,
            });
        }
        check_name(&host).map_err(error)?;
        Ok(Destination::Host { name: host, port })
    }

    fn port_matches(port: Option<u16>, wanted: u16) -> bool {
        port.is_none_or(|p| p == wanted)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let port = |port: &Option<u16>| port.map(|p| format!(":{p}")).unwrap_or_default();
        match self {
            Destination::Any => f.write_str("any"),
            Destination::Host { name, port: p } => write!(f, "{name}{}", port(p)),
            Destination::Subdomains { suffix, port: p } => write!(f, "*.{suffix}{}", port(p)),
            Destination::Network {
                network,
                port: Some(p),
            } if network.prefix == 32 || network.prefix == 128 => match network.address {
                IpAddr::V4(v4) => write!(f, "{v4}:{p}"),
                IpAddr::V6(v6) => write!(f, "[{v6}]:{p}"),
            },
            Destination::Network {
                network,
                port: None,
            } if network.prefix == 32 || network.prefix == 128 => {
                write!(f, "{}", network.address)
            }
            Destination::Network { network, port: p } => write!(f, "{network}{}", port(p)),
        }
    }
}

/// The host of a URL: a name, or an IP address (the URL parser already turned `0x7f.1` into `127.0.0.1`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum UrlHost {
    Name(String),
    Ip(IpAddr),
}

fn url_host(url: &Url) -> Option<UrlHost> {
    let host = url.host_str()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(match bare.parse::<IpAddr>() {
        Ok(ip) => UrlHost::Ip(canonical(ip)),
        Err(_) => UrlHost::Name(normalize_name(host)),
    })
}

fn normalize_name(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not a host name"))
    }
}

/// The allowed destinations and the API server's addresses. The default allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    destinations: Vec<Destination>,
    api_server: Vec<IpAddr>,
}

impl Policy {
    /// A policy allowing these destinations.
    pub fn new(destinations: Vec<Destination>) -> Policy {
        Policy {
            destinations,
            api_server: Vec::new(),
        }
    }

    /// Parses every entry; the first bad one is the error.
    pub fn parse<I, S>(entries: I) -> Result<Policy, DestinationError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        entries
            .into_iter()
            .map(|entry| Destination::parse(entry.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Policy::new)
    }

    /// The same policy, also treating these addresses as the API server's.
    pub fn with_api_server(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Policy {
        for address in addresses.into_iter().map(canonical) {
            if !self.api_server.contains(&address) {
                self.api_server.push(address);
            }
        }
        self
    }

    /// The same policy, also allowing exactly the host and port of `address` (an address the operator
    /// configured, such as the default Prometheus): it counts as explicitly listed.
    pub fn allowing_address(mut self, address: &str) -> Result<Policy, DestinationError> {
        let error = |reason: String| DestinationError {
            entry: address.to_string(),
            reason,
        };
        let url = Url::parse(address).map_err(|e| error(e.to_string()))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| error("the address has no port and no known scheme".to_string()))?;
        let destination = match url_host(&url) {
            Some(UrlHost::Name(name)) => Destination::Host {
                name,
                port: Some(port),
            },
            Some(UrlHost::Ip(ip)) => Destination::Network {
                network: Cidr::single(ip),
                port: Some(port),
            },
            None => return Err(error("the address has no host".to_string())),
        };
        if !self.destinations.contains(&destination) {
            self.destinations.push(destination);
        }
        Ok(self)
    }

    /// The allowed destinations, as listed.
    pub fn destinations(&self) -> &[Destination] {
        &self.destinations
    }

    /// The addresses treated as the API server's.
    pub fn api_server(&self) -> &[IpAddr] {
        &self.api_server
    }

    /// Entries that explicitly open a protected address range (for a warning at startup).
    pub fn protected_entries(&self) -> Vec<String> {
        self.destinations
            .iter()
            .filter_map(|d| match d {
                Destination::Network { network, .. } => {
                    let covers = PROTECTED_PROBES
                        .iter()
                        .chain(self.api_server.iter())
                        .any(|ip| network.contains(*ip));
                    covers.then(|| d.to_string())
                }
                _ => None,
            })
            .collect()
    }

    fn listed(&self) -> String {
        if self.destinations.is_empty() {
            "none are configured".to_string()
        } else {
            let entries: Vec<String> = self.destinations.iter().map(|d| d.to_string()).collect();
            format!("allowed: {}", entries.join(", "))
        }
    }
}

/// One address of each protected range, to tell which configured networks open one.
const PROTECTED_PROBES: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
];

/// Why an address is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protected {
    Loopback,
    LinkLocal,
    Unspecified,
    ApiServer,
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protected::Loopback => "a loopback address",
            Protected::LinkLocal => "a link-local address (cloud metadata lives there)",
            Protected::Unspecified => "the unspecified address (it reaches this host)",
            Protected::ApiServer => "the Kubernetes API server",
        })
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn protected_range(ip: IpAddr) -> Option<Protected> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some(Protected::Loopback),
        IpAddr::V4(v4) if v4.is_link_local() => Some(Protected::LinkLocal),
        IpAddr::V4(v4) if v4.is_unspecified() => Some(Protected::Unspecified),
        IpAddr::V6(v6) if v6.is_loopback() => Some(Protected::Loopback),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Protected::LinkLocal),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(Protected::Unspecified),
        _ => None,
    }
}

/// Why an address may not be called. Each is an Error measurement; no request is made.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Refused {
    #[error("address {address:?} is refused: {reason}")]
    Invalid { address: String, reason: String },
    #[error("address {address:?} is refused: scheme {scheme:?} is not http or https")]
    Scheme { address: String, scheme: String },
    #[error("address {address:?} is refused: host {host} resolved to no address")]
    NoAddress { address: String, host: String },
    #[error(
        "address {address:?} is refused: {ip} is {why}, which Serin calls only when {setting} list it \
         explicitly (an IP, CIDR or the exact host name; \"any\" and *.domain do not cover it)",
        setting = ALLOWED_DESTINATIONS_SETTING
    )]
    Protected {
        address: String,
        ip: IpAddr,
        why: Protected,
    },
    #[error(
        "address {address:?} is refused: {target} is not among {setting} ({listed})",
        setting = ALLOWED_DESTINATIONS_SETTING
    )]
    NotAllowed {
        address: String,
        target: String,
        listed: String,
    },
}

impl Refused {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Refused::Invalid { .. } => "invalid_address",
            Refused::Scheme { .. } => "scheme",
            Refused::NoAddress { .. } => "no_address",
            Refused::Protected { .. } => "protected_address",
            Refused::NotAllowed { .. } => "not_allowed",
        }
    }
}

/// Decides whether `url` may be called when its host resolved to `resolved` (ignored for an IP host).
///
/// Every resolved address must pass: one protected address, or one outside the allowed networks of a
/// name that is not itself allowed, refuses the whole URL.
pub fn check(url: &Url, policy: &Policy, resolved: &[IpAddr]) -> Result<(), Refused> {
    let (address, host, port) = target(url)?;
    let (name, addresses): (Option<String>, Vec<IpAddr>) = match host {
        UrlHost::Name(name) => (
            Some(name),
            resolved.iter().copied().map(canonical).collect(),
        ),
        UrlHost::Ip(ip) => (None, vec![ip]),
    };
    if addresses.is_empty() {
        return Err(Refused::NoAddress {
            address,
            host: name.unwrap_or_default(),
        });
    }
    let by_name = name
        .as_deref()
        .map(|name| policy.name_allows(name, port))
        .unwrap_or_default();
    let api_server_name = name.as_deref().is_some_and(is_api_server_name);
    let any = policy.destinations.contains(&Destination::Any);
    for ip in addresses {
        let in_network = policy.destinations.iter().any(|d| {
            matches!(d, Destination::Network { network, port: p }
                if network.contains(ip) && Destination::port_matches(*p, port))
        });
        let protected = if policy.api_server.contains(&ip) || api_server_name {
            Some(Protected::ApiServer)
        } else {
            protected_range(ip)
        };
        let allowed = match protected {
            Some(_) => in_network || by_name.exact,
            None => in_network || by_name.exact || by_name.pattern || any,
        };
        if !allowed {
            return Err(match protected {
                Some(why) => Refused::Protected { address, ip, why },
                None => Refused::NotAllowed {
                    address,
                    target: match &name {
                        Some(name) => format!("{name}:{port} ({ip})"),
                        None => SocketAddr::new(ip, port).to_string(),
                    },
                    listed: policy.listed(),
                },
            });
        }
    }
    Ok(())
}

/// The address as written, its host and its port, for an http or https URL.
fn target(url: &Url) -> Result<(String, UrlHost, u16), Refused> {
    let address = url.as_str().to_string();
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused::Scheme {
            address,
            scheme: url.scheme().to_string(),
        });
    }
    let Some(host) = url_host(url) else {
        return Err(Refused::Invalid {
            address,
            reason: "it has no host".to_string(),
        });
    };
    let Some(port) = url.port_or_known_default() else {
        return Err(Refused::Invalid {
            address,
            reason: "it has no port".to_string(),
        });
    };
    Ok((address, host, port))
}

fn is_api_server_name(name: &str) -> bool {
    API_SERVER_NAMES.contains(&name) || name.starts_with("kubernetes.default.svc.")
}

/// How the destinations allow a host name by the name alone.
#[derive(Clone, Copy, Debug, Default)]
struct NameMatch {
    /// An entry names exactly this host: it may open protected addresses.
    exact: bool,
    /// `any` or a `*.domain` entry covers it: only unprotected addresses.
    pattern: bool,
}

impl Policy {
    fn name_allows(&self, name: &str, port: u16) -> NameMatch {
        let mut found = NameMatch::default();
        for destination in &self.destinations {
            match destination {
                Destination::Host {
                    name: listed,
                    port: p,
                } if listed == name && Destination::port_matches(*p, port) => found.exact = true,
                Destination::Any => found.pattern = true,
                Destination::Subdomains { suffix, port: p }
                    if name.len() > suffix.len() + 1
                        && name.ends_with(suffix.as_str())
                        && name[..name.len() - suffix.len()].ends_with('.')
                        && Destination::port_matches(*p, port) =>
                {
                    found.pattern = true
                }
                _ => {}
            }
        }
        found
    }
}

/// Bounds on every outbound request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A response body longer than this is cut off and the request fails.
    pub max_response_bytes: u64,
    /// No request (resolution, connection, answer and body) takes longer than this, whatever a template asks.
    pub max_request_time: Duration,
}

/// The default response size bound: a Prometheus instant query a condition can judge is far smaller.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// The default request time bound.
pub const DEFAULT_MAX_REQUEST_TIME: Duration = Duration::from_secs(30);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_request_time: DEFAULT_MAX_REQUEST_TIME,
        }
    }
}

impl Limits {
    /// The time a request may take when its caller asks for `requested`.
    pub fn request_time(&self, requested: Duration) -> Duration {
        requested.min(self.max_request_time)
    }
}

/// The outbound settings of a controller: whom it may call and how much it reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboundConfig {
    pub policy: Policy,
    pub limits: Limits,
}

impl OutboundConfig {
    /// Settings allowing these destinations, with the default limits.
    pub fn allowing<I, S>(entries: I) -> Result<OutboundConfig, DestinationError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(OutboundConfig {
            policy: Policy::parse(entries)?,
            limits: Limits::default(),
        })
    }
}

/// Why an outbound request failed in the wiring (before or while talking to the server).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OutboundError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("host {host} of address {address:?} cannot be resolved: {reason}")]
    Resolve {
        address: String,
        host: String,
        reason: String,
    },
    #[error(
        "the answer from {address} is larger than {limit} bytes; Serin stopped reading it ({setting})",
        setting = MAX_RESPONSE_BYTES_SETTING
    )]
    TooLarge { address: String, limit: u64 },
    #[error(
        "{address} redirected to {to}, another host; Serin does not follow redirects to other hosts \
         (set the address to where the server really answers)"
    )]
    Redirected { address: String, to: String },
}

impl OutboundError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            OutboundError::Refused(refused) => refused.category(),
            OutboundError::Resolve { .. } => "resolve",
            OutboundError::TooLarge { .. } => "response_too_large",
            OutboundError::Redirected { .. } => "redirected",
        }
    }
}

/// A URL that passed the policy, with the only addresses a connection to it may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub url: Url,
    /// The checked addresses of a host name; empty for an IP host (which needs no resolution).
    pub pinned: Vec<SocketAddr>,
}

/// Resolves the address's host once and checks the URL and every address it resolved to.
pub async fn admit(address: &str, policy: &Policy) -> Result<Admitted, OutboundError> {
    let url = Url::parse(address).map_err(|e| Refused::Invalid {
        address: address.to_string(),
        reason: format!("not a URL: {e}"),
    })?;
    let (written, host, port) = target(&url)?;
    let name = match host {
        UrlHost::Ip(_) => {
            check(&url, policy, &[])?;
            return Ok(Admitted {
                url,
                pinned: Vec::new(),
            });
        }
        UrlHost::Name(name) => name,
    };
    // A name no entry can allow is refused before it reaches the resolver.
    let by_name = policy.name_allows(&name, port);
    let has_networks = policy
        .destinations
        .iter()
        .any(|d| matches!(d, Destination::Network { .. }));
    if !by_name.exact && !by_name.pattern && !has_networks {
        return Err(Refused::NotAllowed {
            address: written,
            target: format!("{name}:{port}"),
            listed: policy.listed(),
        }
        .into());
    }
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map_err(|e| OutboundError::Resolve {
            address: address.to_string(),
            host: name.clone(),
            reason: e.to_string(),
        })?
        .collect();
    let ips: Vec<IpAddr> = resolved.iter().map(SocketAddr::ip).collect();
    check(&url, policy, &ips)?;
    Ok(Admitted {
        url,
        pinned: resolved,
    })
}

/// The marker a redirect policy leaves in a reqwest error when it stops at another origin.
#[derive(Debug, thiserror::Error)]
#[error("redirect to {0}")]
pub struct CrossOriginRedirect(pub String);

/// The other origin a reqwest error stopped at, when a redirect is why it failed.
pub fn cross_origin_redirect(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(redirect) = e.downcast_ref::<CrossOriginRedirect>() {
            return Some(redirect.0.clone());
        }
        current = e.source();
    }
    None
}

/// Redirects are followed only within the same scheme, host and port (whose addresses are the pinned,
/// checked ones), at most a few times.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if !same_origin {
            let to = match (
                attempt.url().host_str(),
                attempt.url().port_or_known_default(),
            ) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                _ => attempt.url().scheme().to_string(),
            };
            attempt.error(CrossOriginRedirect(to))
        } else if attempt.previous().len() > 5 {
            // The redirect answer itself then comes back, and is an HTTP error like any other.
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// A client builder that connects only to the admitted addresses, never through a proxy (which would
/// connect to whatever the proxy resolves), and follows redirects only within the origin.
pub fn client_builder(admitted: &Admitted) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(redirect_policy())
        .connect_timeout(Duration::from_secs(5));
    if let (Some(host), false) = (admitted.url.host_str(), admitted.pinned.is_empty()) {
        builder = builder.resolve_to_addrs(host, &admitted.pinned);
    }
    builder
}

/// Reads a response body, failing as soon as it grows past `limit` bytes.
pub async fn read_body(
    address: &str,
    mut response: reqwest::Response,
    limit: u64,
) -> Result<Vec<u8>, ReadError> {
    let too_large = || OutboundError::TooLarge {
        address: address.to_string(),
        limit,
    };
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        return Err(ReadError::Outbound(too_large()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(ReadError::Outbound(too_large()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Outbound(OutboundError),
    #[error("reading the answer failed: {0}")]
    Http(#[source] reqwest::Error),
}

impl ReadError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ReadError::Outbound(error) => error.category(),
            ReadError::Http(_) => "read_body",
        }
    }
}

/// The API server's addresses as seen from inside the cluster: its Service's IP from the environment every
/// pod gets, and what `kubernetes.default.svc` resolves to. Outside a cluster there is none to find.
pub async fn api_server_addresses() -> Vec<IpAddr> {
    let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") else {
        return Vec::new();
    };
    let mut addresses: Vec<IpAddr> = host.parse().into_iter().collect();
    let lookup = tokio::net::lookup_host(("kubernetes.default.svc", 443));
    if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(2), lookup).await {
        addresses.extend(found.map(|socket| socket.ip()));
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn policy(entries: &[&str]) -> Policy {
        Policy::parse(entries).unwrap()
    }

    #[test]
    fn entries_parse_into_hosts_patterns_networks_and_any() {
        let table: &[(&str, Destination)] = &[
            ("any", Destination::Any),
            (
                "Prometheus.Monitoring.",
                Destination::Host {
                    name: "prometheus.monitoring".into(),
                    port: None,
                },
            ),
            (
                "prometheus.monitoring:9090",
                Destination::Host {
                    name: "prometheus.monitoring".into(),
                    port: Some(9090),
                },
            ),
            (
                "*.svc.cluster.local",
                Destination::Subdomains {
                    suffix: "svc.cluster.local".into(),
                    port: None,
                },
            ),
            (
                "10.0.0.0/8",
                Destination::Network {
                    network: Cidr::parse("10.0.0.0/8").unwrap(),
                    port: None,
                },
            ),
            (
                "127.0.0.1",
                Destination::Network {
                    network: Cidr::single(ip("127.0.0.1")),
                    port: None,
                },
            ),
            (
                "127.0.0.1:9090",
                Destination::Network {
                    network: Cidr::single(ip("127.0.0.1")),
                    port: Some(9090),
                },
            ),
            (
                "[::1]:9090",
                Destination::Network {
                    network: Cidr::single(ip("::1")),
                    port: Some(9090),
                },
            ),
        ];
        for (text, expected) in table {
            assert_eq!(&Destination::parse(text).unwrap(), expected, "{text}");
        }
        assert_eq!(
            Destination::parse("[::1]:9090").unwrap().to_string(),
            "[::1]:9090"
        );
        assert_eq!(
            Destination::parse("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn bad_entries_are_errors_naming_the_entry() {
        for (entry, reason) in [
            ("", "empty"),
            ("http://prometheus:9090", "a URL"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "prefix"),
            ("prometheus:0", "port"),
            ("prometheus:http", "port"),
            ("bad host", "not a host name"),
            ("[::1", "IPv6"),
        ] {
            let error = Destination::parse(entry).unwrap_err();
            assert_eq!(error.entry, entry);
            assert!(error.to_string().contains(reason), "{entry}: {error}");
            assert_eq!(error.category(), "invalid_destination");
        }
    }

    #[test]
    fn the_default_policy_allows_nothing_and_says_where_to_change_it() {
        let refused = check(
            &url("http://prometheus.monitoring:9090"),
            &Policy::default(),
            &[ip("10.1.2.3")],
        )
        .unwrap_err();
        assert_eq!(refused.category(), "not_allowed");
        let message = refused.to_string();
        assert!(
            message.contains("http://prometheus.monitoring:9090/"),
            "{message}"
        );
        assert!(message.contains("--allowed-destinations"), "{message}");
        assert!(message.contains("none are configured"), "{message}");
    }

    #[test]
    fn listed_hosts_ports_and_networks_are_allowed_and_nothing_else() {
        let p = policy(&["prometheus.monitoring:9090", "*.example.org", "10.0.0.0/8"]);
        let ok = |u: &str, ips: &[&str]| {
            let ips: Vec<IpAddr> = ips.iter().map(|i| ip(i)).collect();
            check(&url(u), &p, &ips)
        };
        assert_eq!(
            ok("http://prometheus.monitoring:9090", &["192.0.2.1"]),
            Ok(())
        );
        assert_eq!(
            ok("http://PROMETHEUS.monitoring.:9090/x", &["192.0.2.1"]),
            Ok(())
        );
        assert_eq!(ok("https://a.example.org", &["192.0.2.7"]), Ok(()));
        assert_eq!(ok("https://a.b.example.org:8443", &["192.0.2.7"]), Ok(()));
        assert_eq!(ok("http://10.3.4.5:1234", &[]), Ok(()));
        // A name no entry lists, resolving into an allowed network.
        assert_eq!(ok("http://thanos.monitoring:9090", &["10.9.9.9"]), Ok(()));
        for (u, ips) in [
            ("http://prometheus.monitoring:9091", &["192.0.2.1"][..]),
            ("https://example.org", &["192.0.2.7"]),
            ("https://badexample.org", &["192.0.2.7"]),
            ("http://11.0.0.1", &[]),
            // One resolved address outside the networks refuses the name.
            ("http://thanos.monitoring:9090", &["10.9.9.9", "192.0.2.1"]),
        ] {
            let refused = ok(u, ips).unwrap_err();
            assert_eq!(refused.category(), "not_allowed", "{u}: {refused}");
        }
    }

    #[test]
    fn protected_addresses_need_an_explicit_entry_even_with_any() {
        let any = policy(&["any", "*.example.org"]);
        let cases = [
            ("http://127.0.0.1:9090", "", Protected::Loopback),
            ("http://127.8.9.1", "", Protected::Loopback),
            ("http://[::1]:9090", "", Protected::Loopback),
            (
                "http://169.254.169.254/latest/meta-data",
                "",
                Protected::LinkLocal,
            ),
            ("http://[fe80::1]", "", Protected::LinkLocal),
            ("http://[::ffff:169.254.169.254]", "", Protected::LinkLocal),
            ("http://0.0.0.0:80", "", Protected::Unspecified),
            // Decimal and hex spellings are normalized by the URL parser.
            ("http://2852039166", "", Protected::LinkLocal),
            ("http://0x7f.1", "", Protected::Loopback),
            // Names resolving to protected addresses.
            (
                "http://metadata.example.org",
                "169.254.169.254",
                Protected::LinkLocal,
            ),
            ("http://localhost:8080", "127.0.0.1", Protected::Loopback),
            (
                "http://evil.example.org",
                "::ffff:127.0.0.1",
                Protected::Loopback,
            ),
            (
                "https://kubernetes.default.svc",
                "10.96.0.1",
                Protected::ApiServer,
            ),
            (
                "https://kubernetes.default.svc.cluster.local",
                "10.96.0.1",
                Protected::ApiServer,
            ),
        ];
        for (u, resolved, why) in cases {
            let resolved: Vec<IpAddr> = (!resolved.is_empty())
                .then(|| ip(resolved))
                .into_iter()
                .collect();
            match check(&url(u), &any, &resolved) {
                Err(Refused::Protected { why: found, .. }) => assert_eq!(found, why, "{u}"),
                other => panic!("{u}: {other:?}"),
            }
        }
        // The API server's own Service IP, learnt at startup, by any name.
        let with_api = any.clone().with_api_server([ip("10.96.0.1")]);
        let refused = check(
            &url("https://api.example.org"),
            &with_api,
            &[ip("10.96.0.1")],
        )
        .unwrap_err();
        assert!(
            matches!(
                refused,
                Refused::Protected {
                    why: Protected::ApiServer,
                    ..
                }
            ),
            "{refused}"
        );
        let refused = check(&url("https://10.96.0.1:443"), &with_api, &[]).unwrap_err();
        assert!(
            refused.to_string().contains("Kubernetes API server"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("--allowed-destinations"),
            "{refused}"
        );
    }

    #[test]
    fn an_explicit_network_or_exact_host_opens_a_protected_address() {
        let p = policy(&[
            "127.0.0.1",
            "169.254.169.254:80",
            "metadata.internal",
            "10.96.0.0/12",
        ])
        .with_api_server([ip("10.96.0.1")]);
        assert_eq!(check(&url("http://127.0.0.1:9090"), &p, &[]), Ok(()));
        assert_eq!(check(&url("http://169.254.169.254/"), &p, &[]), Ok(()));
        assert_eq!(
            check(
                &url("http://metadata.internal"),
                &p,
                &[ip("169.254.169.254")]
            ),
            Ok(())
        );
        assert_eq!(check(&url("https://10.96.0.1"), &p, &[]), Ok(()));
        // The port of an ip:port entry still counts, and 127.0.0.2 is not 127.0.0.1.
        assert!(check(&url("http://169.254.169.254:8080/"), &p, &[]).is_err());
        assert!(check(&url("http://127.0.0.2:9090"), &p, &[]).is_err());
        // An ip:port entry opens that address under any name; an exact host entry opens only that name.
        assert!(check(&url("http://other.internal"), &p, &[ip("169.254.169.254")]).is_ok());
        let narrow = policy(&["metadata.internal"]);
        assert!(check(
            &url("http://other.internal"),
            &narrow,
            &[ip("169.254.169.254")]
        )
        .is_err());
        assert_eq!(
            p.protected_entries(),
            vec!["127.0.0.1", "169.254.169.254:80", "10.96.0.0/12"]
        );
    }

    #[test]
    fn schemes_other_than_http_and_hostless_urls_are_refused() {
        let any = policy(&["any"]);
        for (u, category) in [
            ("file:///etc/passwd", "scheme"),
            ("gopher://example.org", "scheme"),
            ("ftp://example.org", "scheme"),
        ] {
            assert_eq!(
                check(&url(u), &any, &[]).unwrap_err().category(),
                category,
                "{u}"
            );
        }
        assert_eq!(
            check(&url("http://example.org"), &any, &[])
                .unwrap_err()
                .category(),
            "no_address"
        );
    }

    #[test]
    fn the_operators_own_address_is_allowed_exactly() {
        let p = Policy::default()
            .allowing_address("http://prometheus.monitoring:9090")
            .unwrap()
            .allowing_address("http://127.0.0.1:19090")
            .unwrap();
        assert_eq!(
            check(
                &url("http://prometheus.monitoring:9090/x"),
                &p,
                &[ip("10.0.0.5")]
            ),
            Ok(())
        );
        assert_eq!(check(&url("http://127.0.0.1:19090"), &p, &[]), Ok(()));
        assert!(check(&url("http://127.0.0.1:19091"), &p, &[]).is_err());
        assert!(check(
            &url("http://prometheus.monitoring:80"),
            &p,
            &[ip("10.0.0.5")]
        )
        .is_err());
        assert!(Policy::default().allowing_address("not a url").is_err());
    }

    #[test]
    fn request_time_is_bounded_by_the_limit() {
        let limits = Limits::default();
        assert_eq!(
            limits.request_time(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            limits.request_time(Duration::from_secs(3600)),
            DEFAULT_MAX_REQUEST_TIME
        );
    }

    #[tokio::test]
    async fn admit_refuses_before_resolving_a_name_nothing_allows() {
        // A name that does not resolve anywhere: refused by the policy, not by the resolver.
        let refused = admit(
            "http://nothing-allows-this.invalid:9090",
            &Policy::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.category(), "not_allowed", "{refused}");
        let admitted = admit("http://127.0.0.1:9", &policy(&["127.0.0.1"]))
            .await
            .unwrap();
        assert!(admitted.pinned.is_empty());
        let admitted = admit("http://localhost:9", &policy(&["localhost"]))
            .await
            .unwrap();
        assert!(
            admitted.pinned.iter().all(|a| a.ip().is_loopback()),
            "{admitted:?}"
        );
        let refused = admit("http://localhost:9", &policy(&["any"]))
            .await
            .unwrap_err();
        assert_eq!(refused.category(), "protected_address", "{refused}");
    }
}
