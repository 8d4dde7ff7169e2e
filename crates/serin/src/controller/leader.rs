//! Leader election: decides from the `coordination.k8s.io/v1` Lease stored in the API server whether this
//! replica may write, takes the Lease when it is free or expired, renews it, and gives it up on shutdown.
//!
//! Written by hand with optimistic concurrency (get, then replace with the read `resourceVersion`, a 409
//! means someone else wrote first) rather than with `kube-lease-manager`: that crate counts durations in
//! whole seconds (no sub-second renew deadline or retry period), has no renew deadline at all (a holder
//! whose renewals fail keeps believing it leads while its watch channel stays `true`), and panics on
//! invalid parameters. Serin needs the holder to stop the moment it can no longer prove it holds the Lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the Lease lives, who we are, and the timing of the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Written to `holderIdentity`; unique per replica (the pod name, typically).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal; other candidates wait this long.
    /// Whole seconds, because `leaseDurationSeconds` is an integer.
    pub lease_duration: Duration,
    /// How long after its last successful renewal the holder still considers itself leader.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate looks at the Lease.
    pub retry_period: Duration,
}

#[derive(thiserror::Error, Debug)]
pub enum LeaderError {
    #[error("invalid leader election config: lease name {name:?} {reason}")]
    InvalidLeaseName { name: String, reason: String },
    #[error("invalid leader election config: lease namespace {namespace:?} {reason}")]
    InvalidLeaseNamespace { namespace: String, reason: String },
    #[error("invalid leader election config: identity must not be empty")]
    EmptyIdentity,
    #[error("invalid leader election config: {0}")]
    InvalidTiming(String),
    #[error(
        "lease namespace {namespace:?} does not exist: create it or choose another lease namespace"
    )]
    LeaseNamespaceMissing { namespace: String },
    #[error("not allowed to {verb} leases in namespace {namespace:?}: {message}")]
    Forbidden {
        verb: &'static str,
        namespace: String,
        message: String,
    },
}

impl LeaderError {
    pub fn category(&self) -> &'static str {
        match self {
            LeaderError::InvalidLeaseName { .. } => "invalid_lease_name",
            LeaderError::InvalidLeaseNamespace { .. } => "invalid_lease_namespace",
            LeaderError::EmptyIdentity => "empty_identity",
            LeaderError::InvalidTiming(_) => "invalid_timing",
            LeaderError::LeaseNamespaceMissing { .. } => "lease_namespace_missing",
            LeaderError::Forbidden { .. } => "forbidden",
        }
    }
}

impl LeaseConfig {
    /// Checks names and timing: retry < renew deadline < lease duration, all positive.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if let Err(reason) = check_dns1123_subdomain(&self.lease_name) {
            return Err(LeaderError::InvalidLeaseName {
                name: self.lease_name.clone(),
                reason,
            });
        }
        if let Err(reason) = check_dns1123_label(&self.lease_namespace) {
            return Err(LeaderError::InvalidLeaseNamespace {
                namespace: self.lease_namespace.clone(),
                reason,
            });
        }
        if self.identity.trim().is_empty() {
            return Err(LeaderError::EmptyIdentity);
        }
        let duration = self.lease_duration;
        if duration < Duration::from_secs(1) || duration.subsec_nanos() != 0 {
            return Err(LeaderError::InvalidTiming(format!(
                "lease duration must be a whole number of seconds, at least 1s (got {duration:?})"
            )));
        }
        if duration.as_secs() > i32::MAX as u64 {
            return Err(LeaderError::InvalidTiming(format!(
                "lease duration {duration:?} is too long"
            )));
        }
        if self.renew_deadline.is_zero() || self.renew_deadline >= duration {
            return Err(LeaderError::InvalidTiming(format!(
                "renew deadline ({:?}) must be positive and shorter than the lease duration ({duration:?})",
                self.renew_deadline
            )));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(LeaderError::InvalidTiming(format!(
                "retry period ({:?}) must be positive and shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            )));
        }
        Ok(())
    }

    fn lease_duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// A DNS-1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
fn check_dns1123_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 63 {
        return Err("must be at most 63 characters (DNS-1123 label)".into());
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let starts_and_ends_alphanumeric = value.chars().next().is_some_and(alphanumeric)
        && value.chars().last().is_some_and(alphanumeric);
    if !value.chars().all(allowed) || !starts_and_ends_alphanumeric {
        return Err(
            "must consist of lowercase alphanumeric characters or '-', and start and end with an \
                    alphanumeric character (DNS-1123 label)"
                .into(),
        );
    }
    Ok(())
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels.
fn check_dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 253 {
        return Err("must be at most 253 characters (DNS-1123 subdomain)".into());
    }
    if value
        .split('.')
        .any(|part| check_dns1123_label(part).is_err())
    {
        return Err("must consist of lowercase alphanumeric characters, '-' or '.', and start and end with an \
                    alphanumeric character (DNS-1123 subdomain)"
            .into());
    }
    Ok(())
}

/// What the stored Lease says about who may hold it right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseVerdict {
    /// Nobody holds it (never held, or released).
    Free,
    /// Held by someone whose term ran out without a renewal.
    Expired { holder: String },
    /// Held by us (we renewed it, or a previous run with our identity did).
    Ours { expires_at: SystemTime },
    /// Held by someone else until `expires_at`.
    HeldByOther {
        holder: String,
        expires_at: SystemTime,
    },
}

impl LeaseVerdict {
    pub fn may_take(&self) -> bool {
        !matches!(self, LeaseVerdict::HeldByOther { .. })
    }
}

fn to_system_time(time: &MicroTime) -> SystemTime {
    SystemTime::from(time.0)
}

fn micro_time(now: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// When a stored Lease term ends: `renewTime + leaseDurationSeconds`. A held Lease missing either field
/// proves nothing about its holder, so it counts as already expired.
pub fn lease_expiry(spec: &LeaseSpec) -> Option<SystemTime> {
    let renewed = spec.renew_time.as_ref().map(to_system_time)?;
    let seconds = u64::try_from(spec.lease_duration_seconds?).ok()?;
    renewed.checked_add(Duration::from_secs(seconds))
}

/// Judges the stored Lease at `now` from `identity`'s point of view.
pub fn judge(spec: Option<&LeaseSpec>, identity: &str, now: SystemTime) -> LeaseVerdict {
    let Some(spec) = spec else {
        return LeaseVerdict::Free;
    };
    let holder = match spec.holder_identity.as_deref() {
        Some(holder) if !holder.is_empty() => holder.to_string(),
        _ => return LeaseVerdict::Free,
    };
    let expires_at = match lease_expiry(spec) {
        Some(expires_at) if expires_at > now => expires_at,
        _ if holder == identity => return LeaseVerdict::Ours { expires_at: now },
        _ => return LeaseVerdict::Expired { holder },
    };
    if holder == identity {
        LeaseVerdict::Ours { expires_at }
    } else {
        LeaseVerdict::HeldByOther { holder, expires_at }
    }
}

/// The spec that makes `identity` the holder from `now`; a change of holder counts as a transition.
pub fn claimed_spec(
    previous: Option<&LeaseSpec>,
    identity: &str,
    lease_duration_seconds: i32,
    now: SystemTime,
) -> LeaseSpec {
    let previous_holder = previous
        .and_then(|spec| spec.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    let previous_transitions = previous
        .and_then(|spec| spec.lease_transitions)
        .unwrap_or(0);
    let (acquire_time, transitions) = match previous_holder {
        Some(holder) if holder == identity => (
            previous
                .and_then(|spec| spec.acquire_time.clone())
                .unwrap_or_else(|| micro_time(now)),
            previous_transitions,
        ),
        Some(_) => (micro_time(now), previous_transitions.saturating_add(1)),
        None => (micro_time(now), previous_transitions),
    };
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        acquire_time: Some(acquire_time),
        renew_time: Some(micro_time(now)),
        lease_duration_seconds: Some(lease_duration_seconds),
        lease_transitions: Some(transitions),
        ..previous.cloned().unwrap_or_default()
    }
}

/// The spec that gives the Lease up: no holder, so the next candidate may take it without waiting.
pub fn released_spec(previous: &LeaseSpec, now: SystemTime) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        acquire_time: None,
        renew_time: Some(micro_time(now)),
        ..previous.clone()
    }
}

/// Until when the holder of a stored Lease may act as leader: its stored `renewTime + renew_deadline`.
pub fn fenced_until(spec: &LeaseSpec, renew_deadline: Duration) -> Option<SystemTime> {
    spec.renew_time
        .as_ref()
        .map(to_system_time)?
        .checked_add(renew_deadline)
}

/// How a failed API call should be treated.
enum Failure {
    /// Someone else wrote first (409): read again and decide again.
    Conflict,
    /// Worth retrying after the retry period (5xx, 429, network, timeouts).
    Transient(String),
    /// Retrying cannot help.
    Fatal(LeaderError),
}

fn classify(error: kube::Error, verb: &'static str, namespace: &str) -> Failure {
    match error {
        kube::Error::Api(status) if status.code == 409 => Failure::Conflict,
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            Failure::Fatal(LeaderError::Forbidden {
                verb,
                namespace: namespace.to_string(),
                message: status.message.clone(),
            })
        }
        // Creating a namespaced object answers 404 only when its namespace is missing.
        kube::Error::Api(status) if status.code == 404 && verb == "create" => {
            Failure::Fatal(LeaderError::LeaseNamespaceMissing {
                namespace: namespace.to_string(),
            })
        }
        other => Failure::Transient(other.to_string()),
    }
}

/// Runs one API call, bounded so a hanging request cannot hold up the election.
async fn bounded<T>(
    limit: Duration,
    verb: &'static str,
    namespace: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(classify(error, verb, namespace)),
        Err(_) => Err(Failure::Transient(format!(
            "{verb} lease timed out after {limit:?}"
        ))),
    }
}

/// One look at the Lease: take it when free, expired or ours; `None` while someone else holds it.
async fn try_claim(api: &Api<Lease>, config: &LeaseConfig) -> Result<Option<Lease>, Failure> {
    let namespace = config.lease_namespace.as_str();
    let limit = config.renew_deadline;
    let stored = bounded(limit, "get", namespace, api.get_opt(&config.lease_name)).await?;
    let now = SystemTime::now();
    let verdict = judge(
        stored.as_ref().and_then(|lease| lease.spec.as_ref()),
        &config.identity,
        now,
    );
    if !verdict.may_take() {
        return Ok(None);
    }
    let spec = claimed_spec(
        stored.as_ref().and_then(|lease| lease.spec.as_ref()),
        &config.identity,
        config.lease_duration_seconds(),
        now,
    );
    let written = match stored {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            bounded(
                limit,
                "create",
                namespace,
                api.create(&PostParams::default(), &lease),
            )
            .await
        }
        Some(mut lease) => {
            lease.spec = Some(spec);
            bounded(
                limit,
                "update",
                namespace,
                api.replace(&config.lease_name, &PostParams::default(), &lease),
            )
            .await
        }
    };
    match written {
        Ok(lease) => Ok(Some(lease)),
        Err(Failure::Conflict) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Waits until `config.identity` holds the Lease, then keeps renewing it in the background.
///
/// Errors only when retrying cannot help: invalid config, a missing lease namespace, no permission.
pub async fn acquire(client: kube::Client, config: LeaseConfig) -> Result<Leadership, LeaderError> {
    config.validate()?;
    let api: Api<Lease> = Api::namespaced(client, &config.lease_namespace);
    let stored = loop {
        match try_claim(&api, &config).await {
            Ok(Some(lease)) => break lease,
            Ok(None) | Err(Failure::Conflict) => {}
            Err(Failure::Transient(reason)) => {
                tracing::warn!(lease = %config.lease_name, %reason, "could not look at the leader lease, retrying");
            }
            Err(Failure::Fatal(error)) => return Err(error),
        }
        tokio::time::sleep(config.retry_period).await;
    };
    let valid_until = stored
        .spec
        .as_ref()
        .and_then(|spec| fenced_until(spec, config.renew_deadline))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let shared = Arc::new(Shared {
        lost: CancellationToken::new(),
        valid_until: Mutex::new(valid_until),
    });
    tracing::info!(lease = %config.lease_name, identity = %config.identity, "became leader");
    let renewer = tokio::spawn(keep_renewing(
        api.clone(),
        config.clone(),
        stored,
        shared.clone(),
    ));
    Ok(Leadership {
        api,
        config,
        shared,
        renewer: Some(renewer),
    })
}

/// State the renewer and the holder of `Leadership` share.
struct Shared {
    lost: CancellationToken,
    /// Stored `renewTime` of our last successful renewal plus the renew deadline.
    valid_until: Mutex<SystemTime>,
}

impl Shared {
    fn valid_until(&self) -> SystemTime {
        self.valid_until
            .lock()
            .map(|time| *time)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn set_valid_until(&self, time: SystemTime) {
        if let Ok(mut stored) = self.valid_until.lock() {
            *stored = time;
        }
    }

    fn holds(&self, now: SystemTime) -> bool {
        !self.lost.is_cancelled() && now < self.valid_until()
    }

    fn lose(&self, reason: &str) {
        if !self.lost.is_cancelled() {
            tracing::warn!(%reason, "lost leadership");
        }
        self.set_valid_until(SystemTime::UNIX_EPOCH);
        self.lost.cancel();
    }

    /// The monotonic instant matching `valid_until`, for timers.
    fn deadline(&self) -> Instant {
        let remaining = self
            .valid_until()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Instant::now() + remaining
    }
}

/// Whether this replica may still write: cloned into everything that writes on behalf of a [`Leadership`].
///
/// The renewer stops the reconcilers when the renew deadline passes, but a timer can fire late on a busy
/// machine and a reconcile already running reaches its next write before it is stopped; the fence compares
/// the clock with the Lease's stored validity at the moment of each write, so no write leaves this replica
/// after it stopped being able to prove it holds the Lease.
#[derive(Clone)]
pub struct Fence {
    /// `None`: no leader election, every write is allowed.
    shared: Option<Arc<Shared>>,
}

/// A write was refused because this replica no longer holds the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this replica no longer holds the leader Lease (lost, or not renewed before the renew deadline): write refused")]
pub struct Fenced;

impl Fenced {
    pub fn category(&self) -> &'static str {
        "fenced"
    }
}

impl Fence {
    /// The fence of a controller that runs without leader election: it never closes.
    pub fn open() -> Fence {
        Fence { shared: None }
    }

    /// `Ok` while the Lease, as last stored by the API server, says we hold it within the renew deadline.
    pub fn check(&self) -> Result<(), Fenced> {
        match &self.shared {
            None => Ok(()),
            Some(shared) if shared.holds(SystemTime::now()) => Ok(()),
            Some(_) => Err(Fenced),
        }
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.shared {
            None => f.write_str("Fence(open)"),
            Some(shared) => write!(f, "Fence(valid until {:?})", shared.valid_until()),
        }
    }
}

enum Renewal {
    Renewed(Lease),
    /// Someone changed the Lease but we still hold it: renew again from this version.
    Refreshed(Lease),
    TakenBy(String),
}

async fn renew_once(
    api: &Api<Lease>,
    config: &LeaseConfig,
    stored: &Lease,
) -> Result<Renewal, Failure> {
    let namespace = config.lease_namespace.as_str();
    let limit = config.renew_deadline;
    let mut renewed = stored.clone();
    renewed.spec = Some(claimed_spec(
        stored.spec.as_ref(),
        &config.identity,
        config.lease_duration_seconds(),
        SystemTime::now(),
    ));
    let written = bounded(
        limit,
        "update",
        namespace,
        api.replace(&config.lease_name, &PostParams::default(), &renewed),
    )
    .await;
    match written {
        Ok(lease) => Ok(Renewal::Renewed(lease)),
        Err(Failure::Conflict) => {
            let current = bounded(limit, "get", namespace, api.get_opt(&config.lease_name)).await?;
            let Some(current) = current else {
                return Ok(Renewal::TakenBy("nobody (the lease was deleted)".into()));
            };
            match current
                .spec
                .as_ref()
                .and_then(|spec| spec.holder_identity.clone())
            {
                Some(holder) if holder == config.identity => Ok(Renewal::Refreshed(current)),
                Some(holder) if !holder.is_empty() => Ok(Renewal::TakenBy(holder)),
                _ => Ok(Renewal::TakenBy("nobody (the lease was released)".into())),
            }
        }
        Err(other) => Err(other),
    }
}

/// Renews every retry period; gives up (fires `lost`) the moment the renew deadline passes.
async fn keep_renewing(
    api: Api<Lease>,
    config: LeaseConfig,
    mut stored: Lease,
    shared: Arc<Shared>,
) {
    loop {
        let deadline = shared.deadline();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                shared.lose("the lease could not be renewed before the renew deadline");
                return;
            }
            _ = tokio::time::sleep(config.retry_period) => {}
        }
        match tokio::time::timeout_at(deadline, renew_once(&api, &config, &stored)).await {
            Err(_) => {
                shared.lose("the lease could not be renewed before the renew deadline");
                return;
            }
            Ok(Ok(Renewal::Renewed(lease))) => {
                match lease
                    .spec
                    .as_ref()
                    .and_then(|spec| fenced_until(spec, config.renew_deadline))
                {
                    Some(valid_until) => shared.set_valid_until(valid_until),
                    None => {
                        shared.lose("the renewed lease has no renewTime");
                        return;
                    }
                }
                stored = lease;
            }
            Ok(Ok(Renewal::Refreshed(lease))) => stored = lease,
            Ok(Ok(Renewal::TakenBy(holder))) => {
                shared.lose(&format!("the lease is now held by {holder}"));
                return;
            }
            Ok(Err(Failure::Conflict)) => {}
            Ok(Err(Failure::Transient(reason))) => {
                tracing::warn!(lease = %config.lease_name, %reason, "lease renewal failed, retrying");
            }
            Ok(Err(Failure::Fatal(error))) => {
                shared.lose(&error.to_string());
                return;
            }
        }
    }
}

/// Proof of holding the Lease. The controller runs its reconcilers only while it has one, checks its
/// [`Fence`] before every write, and stops the reconcilers when `lost()` fires so it stands again as a
/// candidate.
///
/// Dropping it stops renewing without giving the Lease up (as a crash would);
/// `release` gives it up so another replica takes over at once.
pub struct Leadership {
    api: Api<Lease>,
    config: LeaseConfig,
    shared: Arc<Shared>,
    renewer: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Cancelled the moment the Lease is lost or could not be renewed in time; cancel writes on it.
    pub fn lost(&self) -> CancellationToken {
        self.shared.lost.clone()
    }

    /// True while the Lease as last stored by the API server says we hold it, within the renew deadline.
    pub fn is_leader(&self) -> bool {
        self.shared.holds(SystemTime::now())
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// The fence every write made on behalf of this leadership checks first.
    pub fn fence(&self) -> Fence {
        Fence {
            shared: Some(self.shared.clone()),
        }
    }

    /// Stops renewing and clears `holderIdentity`, unless someone else already holds the Lease.
    pub async fn release(mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
            let _ = renewer.await;
        }
        // Fence first: nothing may write on our behalf once we start giving the lease away.
        self.shared.set_valid_until(SystemTime::UNIX_EPOCH);
        self.shared.lost.cancel();
        let namespace = self.config.lease_namespace.clone();
        let limit = self.config.renew_deadline;
        // A renewal aborted mid-flight can still land and bump the version: a conflict means read again.
        for _ in 0..3 {
            let current = match bounded(
                limit,
                "get",
                &namespace,
                self.api.get_opt(&self.config.lease_name),
            )
            .await
            {
                Ok(Some(lease)) => lease,
                Ok(None) => return,
                Err(_) => {
                    tracing::warn!(lease = %self.config.lease_name, "could not read the lease to release it");
                    return;
                }
            };
            let Some(spec) = current.spec.as_ref() else {
                return;
            };
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return;
            }
            let mut released = current.clone();
            released.spec = Some(released_spec(spec, SystemTime::now()));
            let post = PostParams::default();
            let replaced = self.api.replace(&self.config.lease_name, &post, &released);
            match bounded(limit, "update", &namespace, replaced).await {
                Ok(_) => {
                    tracing::info!(lease = %self.config.lease_name, "released leadership");
                    return;
                }
                Err(Failure::Conflict) => continue,
                Err(_) => {
                    tracing::warn!(lease = %self.config.lease_name, "could not release the lease; it will expire");
                    return;
                }
            }
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        self.shared.lose("leadership dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            lease_name: "serin-leader".into(),
            lease_namespace: "serin-system".into(),
            identity: "serin-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn held(holder: Option<&str>, renewed: SystemTime, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(micro_time(renewed)),
            lease_duration_seconds: Some(seconds),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn valid_config_passes() {
        assert!(config().validate().is_ok());
        let dotted = LeaseConfig {
            lease_name: "leader.serin.dev".into(),
            ..config()
        };
        assert!(dotted.validate().is_ok());
    }

    #[test]
    fn bad_configs_are_rejected_with_their_category() {
        let cases = [
            (
                LeaseConfig {
                    renew_deadline: Duration::from_secs(15),
                    ..config()
                },
                "invalid_timing",
                "renew deadline",
            ),
            (
                LeaseConfig {
                    renew_deadline: Duration::ZERO,
                    ..config()
                },
                "invalid_timing",
                "renew deadline",
            ),
            (
                LeaseConfig {
                    retry_period: Duration::from_secs(10),
                    ..config()
                },
                "invalid_timing",
                "retry period",
            ),
            (
                LeaseConfig {
                    retry_period: Duration::ZERO,
                    ..config()
                },
                "invalid_timing",
                "retry period",
            ),
            (
                LeaseConfig {
                    lease_duration: Duration::from_millis(15_500),
                    ..config()
                },
                "invalid_timing",
                "whole",
            ),
            (
                LeaseConfig {
                    lease_duration: Duration::ZERO,
                    ..config()
                },
                "invalid_timing",
                "whole",
            ),
            (
                LeaseConfig {
                    lease_name: "Serin_Leader".into(),
                    ..config()
                },
                "invalid_lease_name",
                "DNS-1123",
            ),
            (
                LeaseConfig {
                    lease_name: "".into(),
                    ..config()
                },
                "invalid_lease_name",
                "empty",
            ),
            (
                LeaseConfig {
                    lease_name: "a..b".into(),
                    ..config()
                },
                "invalid_lease_name",
                "DNS-1123",
            ),
            (
                LeaseConfig {
                    lease_name: "x".repeat(254),
                    ..config()
                },
                "invalid_lease_name",
                "253",
            ),
            (
                LeaseConfig {
                    lease_namespace: "serin.system".into(),
                    ..config()
                },
                "invalid_lease_namespace",
                "label",
            ),
            (
                LeaseConfig {
                    lease_namespace: "-serin".into(),
                    ..config()
                },
                "invalid_lease_namespace",
                "label",
            ),
            (
                LeaseConfig {
                    lease_namespace: "n".repeat(64),
                    ..config()
                },
                "invalid_lease_namespace",
                "63",
            ),
            (
                LeaseConfig {
                    identity: " ".into(),
                    ..config()
                },
                "empty_identity",
                "identity",
            ),
        ];
        for (config, category, phrase) in cases {
            let error = config.validate().expect_err("config should be rejected");
            assert_eq!(error.category(), category, "{config:?}");
            assert!(
                error.to_string().contains(phrase),
                "{error} should mention {phrase}"
            );
        }
    }

    #[test]
    fn verdicts_follow_holder_and_expiry() {
        let now = SystemTime::now();
        assert_eq!(judge(None, "serin-a", now), LeaseVerdict::Free);
        assert_eq!(
            judge(Some(&held(None, now, 15)), "serin-a", now),
            LeaseVerdict::Free
        );
        assert_eq!(
            judge(Some(&held(Some(""), now, 15)), "serin-a", now),
            LeaseVerdict::Free
        );

        let fresh = held(Some("serin-b"), now - Duration::from_secs(5), 15);
        let verdict = judge(Some(&fresh), "serin-a", now);
        assert!(
            matches!(&verdict, LeaseVerdict::HeldByOther { holder, .. } if holder == "serin-b")
        );
        assert!(!verdict.may_take());

        let stale = held(Some("serin-b"), now - Duration::from_secs(16), 15);
        assert_eq!(
            judge(Some(&stale), "serin-a", now),
            LeaseVerdict::Expired {
                holder: "serin-b".into()
            }
        );
        assert!(judge(Some(&stale), "serin-a", now).may_take());

        let ours = held(Some("serin-a"), now - Duration::from_secs(5), 15);
        assert!(matches!(
            judge(Some(&ours), "serin-a", now),
            LeaseVerdict::Ours { .. }
        ));

        let no_renew_time = LeaseSpec {
            holder_identity: Some("serin-b".into()),
            ..LeaseSpec::default()
        };
        assert!(judge(Some(&no_renew_time), "serin-a", now).may_take());
    }

    #[test]
    fn expiry_is_exact_at_the_boundary() {
        let renewed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let spec = held(Some("serin-b"), renewed, 15);
        let boundary = renewed + Duration::from_secs(15);
        assert!(!judge(Some(&spec), "serin-a", boundary - Duration::from_millis(1)).may_take());
        assert!(judge(Some(&spec), "serin-a", boundary).may_take());
    }

    #[test]
    fn claims_count_transitions_only_on_a_new_holder() {
        let now = SystemTime::now();
        let first = claimed_spec(None, "serin-a", 15, now);
        assert_eq!(first.holder_identity.as_deref(), Some("serin-a"));
        assert_eq!(first.lease_transitions, Some(0));
        assert_eq!(first.lease_duration_seconds, Some(15));

        let renewed = claimed_spec(Some(&first), "serin-a", 15, now + Duration::from_secs(2));
        assert_eq!(renewed.lease_transitions, Some(0));
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert!(renewed.renew_time > first.renew_time);

        let taken = claimed_spec(Some(&renewed), "serin-b", 15, now + Duration::from_secs(30));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, taken.renew_time);

        let released = released_spec(&taken, now + Duration::from_secs(31));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_transitions, Some(1));
        let after_release = claimed_spec(
            Some(&released),
            "serin-a",
            15,
            now + Duration::from_secs(32),
        );
        assert_eq!(after_release.lease_transitions, Some(1));
    }

    #[test]
    fn the_fence_closes_at_the_renew_deadline_even_before_lost_fires() {
        assert_eq!(Fence::open().check(), Ok(()));
        let shared = Arc::new(Shared {
            lost: CancellationToken::new(),
            valid_until: Mutex::new(SystemTime::now() + Duration::from_secs(60)),
        });
        let fence = Fence {
            shared: Some(shared.clone()),
        };
        assert_eq!(fence.check(), Ok(()));
        // The renewer's timer has not fired (a busy machine): the clock alone closes the fence.
        shared.set_valid_until(SystemTime::now() - Duration::from_millis(1));
        assert!(!shared.lost.is_cancelled());
        assert_eq!(fence.check(), Err(Fenced));
        assert_eq!(Fenced.category(), "fenced");

        shared.set_valid_until(SystemTime::now() + Duration::from_secs(60));
        assert_eq!(fence.check(), Ok(()));
        shared.lost.cancel();
        assert_eq!(fence.check(), Err(Fenced));
    }

    #[test]
    fn fencing_uses_the_stored_renew_time() {
        let renewed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let spec = held(Some("serin-a"), renewed, 15);
        assert_eq!(
            fenced_until(&spec, Duration::from_secs(10)),
            Some(renewed + Duration::from_secs(10))
        );
        assert_eq!(
            fenced_until(&LeaseSpec::default(), Duration::from_secs(10)),
            None
        );
    }
}
