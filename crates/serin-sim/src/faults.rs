//! Fault injection and the request log: which requests to fail or delay, which watch events to hold
//! back or drop, and what clients asked for.
//!
//! Everything here decides; the server (`server.rs`) acts on the decisions.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Verbs a request can have in the request log and in fault rules.
pub const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// How many close requests watches can look back over; a watch that slept through more closes than
/// this ends, which is what it would have done for one of them anyway.
const CLOSE_HISTORY: usize = 256;

/// The longest a request can be held or a watch window can last: a typo of a few zeros must not wedge
/// a test run for days.
pub const MAX_FAULT_DURATION: Duration = Duration::from_secs(3600);

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FaultError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl FaultError {
    pub fn category(&self) -> &'static str {
        match self {
            FaultError::Invalid { .. } => "invalid",
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> FaultError {
        FaultError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// What an injected fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this status code and the `Status` body a real server sends with it (409, 429, 500, ...),
    /// without executing the request. On a watch, 410 is sent as an `ERROR` event, like kube-apiserver's
    /// watch cache does for an expired resourceVersion.
    Fail(u16),
    /// Hold the request this long, then answer 504 Timeout without executing it.
    Timeout(Duration),
    /// Execute the request, then hold the answer this long and answer 504 Timeout instead: the write
    /// landed but the client cannot know (what a real timeout often is).
    TimeoutAfterApply(Duration),
}

/// The request a fault rule is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// Plural resource name (`replicasets`).
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// The object's name; for list and watch, the name a `metadata.name=` field selector pins.
    pub name: Option<&'a str>,
    /// The user of the bearer token.
    pub user: &'a str,
}

/// Fail or delay the next `remaining` requests that match.
///
/// `verb` and `resource` take `"*"` for any; `resource` is the plural (`replicasets`) or the plural
/// qualified by its group (`replicasets.apps`). `subresource`: None matches the main resource and every
/// subresource, `Some("")` only the main resource, `Some("status")` only that subresource. `name`,
/// `namespace` and `user`: None matches any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub user: Option<String>,
    pub remaining: usize,
    pub action: FaultAction,
}

impl FaultRule {
    fn new(verb: &str, resource: &str, action: FaultAction) -> FaultRule {
        FaultRule {
            verb: verb.into(),
            resource: resource.into(),
            subresource: None,
            name: None,
            namespace: None,
            user: None,
            remaining: 1,
            action,
        }
    }

    /// The next matching request is answered `code` (use [`times`](Self::times) for more).
    pub fn fail(verb: &str, resource: &str, code: u16) -> FaultRule {
        FaultRule::new(verb, resource, FaultAction::Fail(code))
    }

    /// The next matching request is held for `hold`, not executed, and answered 504.
    pub fn timeout(verb: &str, resource: &str, hold: Duration) -> FaultRule {
        FaultRule::new(verb, resource, FaultAction::Timeout(hold))
    }

    /// The next matching request is executed, then its answer held for `hold` and replaced by 504.
    pub fn timeout_after_apply(verb: &str, resource: &str, hold: Duration) -> FaultRule {
        FaultRule::new(verb, resource, FaultAction::TimeoutAfterApply(hold))
    }

    pub fn times(mut self, count: usize) -> FaultRule {
        self.remaining = count;
        self
    }

    /// Only this subresource; `""` only the main resource.
    pub fn subresource(mut self, subresource: &str) -> FaultRule {
        self.subresource = Some(subresource.into());
        self
    }

    pub fn name(mut self, name: &str) -> FaultRule {
        self.name = Some(name.into());
        self
    }

    pub fn namespace(mut self, namespace: &str) -> FaultRule {
        self.namespace = Some(namespace.into());
        self
    }

    /// Only requests whose bearer token is this user's.
    pub fn user(mut self, user: &str) -> FaultRule {
        self.user = Some(user.into());
        self
    }

    /// Refuses rules that could never match or that ask for something a server would not answer.
    pub fn validate(&self) -> Result<(), FaultError> {
        if self.verb != "*" && !VERBS.contains(&self.verb.as_str()) {
            return Err(FaultError::invalid(
                "verb",
                format!(
                    "unknown verb {:?}; expected \"*\" or one of {}",
                    self.verb,
                    VERBS.join(", ")
                ),
            ));
        }
        if self.resource.is_empty() {
            return Err(FaultError::invalid(
                "resource",
                "must not be empty (\"*\" matches any)",
            ));
        }
        if self.remaining == 0 {
            return Err(FaultError::invalid("count", "must be at least 1"));
        }
        for (field, value) in [
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("user", &self.user),
        ] {
            if value.as_deref() == Some("") {
                return Err(FaultError::invalid(
                    field,
                    "must not be empty (leave it out to match any)",
                ));
            }
        }
        match self.action {
            FaultAction::Fail(code) if !(400..=599).contains(&code) => Err(FaultError::invalid(
                "code",
                format!("{code} is not an error status (expected 400-599)"),
            )),
            FaultAction::Timeout(hold) | FaultAction::TimeoutAfterApply(hold)
                if hold > MAX_FAULT_DURATION =>
            {
                Err(FaultError::invalid(
                    "timeoutMillis",
                    format!("at most {} ms", MAX_FAULT_DURATION.as_millis()),
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn matches(&self, request: &RequestFacts<'_>) -> bool {
        let optional = |wanted: &Option<String>, actual: Option<&str>| {
            wanted.as_deref().is_none_or(|w| Some(w) == actual)
        };
        let resource_matches = self.resource == "*"
            || self.resource == request.resource
            || (!request.group.is_empty()
                && self
                    .resource
                    .strip_prefix(request.resource)
                    .and_then(|rest| rest.strip_prefix('.'))
                    == Some(request.group));
        let subresource_matches = match self.subresource.as_deref() {
            None => true,
            Some("") => request.subresource.is_none(),
            Some(wanted) => request.subresource == Some(wanted),
        };
        (self.verb == "*" || self.verb == request.verb)
            && resource_matches
            && subresource_matches
            && optional(&self.name, request.name)
            && optional(&self.namespace, request.namespace)
            && self.user.as_deref().is_none_or(|u| u == request.user)
    }
}

/// Which watches and events a watch fault applies to: one resource, optionally one namespace and one
/// user (the identity of the watching client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchScope {
    /// API group, `""` for the core group.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    pub namespace: Option<String>,
    pub user: Option<String>,
}

impl WatchScope {
    pub fn new(group: &str, resource: &str) -> WatchScope {
        WatchScope {
            group: group.into(),
            resource: resource.into(),
            namespace: None,
            user: None,
        }
    }

    pub fn namespace(mut self, namespace: &str) -> WatchScope {
        self.namespace = Some(namespace.into());
        self
    }

    pub fn user(mut self, user: &str) -> WatchScope {
        self.user = Some(user.into());
        self
    }

    /// True when a watch (or list) of this resource as this user can see objects of the scope's namespace.
    pub fn covers(&self, watch: &WatchFacts<'_>) -> bool {
        self.group == watch.group
            && self.resource == watch.resource
            && self.user.as_deref().is_none_or(|u| u == watch.user)
            && match (&self.namespace, watch.namespace) {
                (Some(scope), Some(watched)) => scope == watched,
                _ => true,
            }
    }

    /// True for an event of an object in `namespace` (`""` for cluster-scoped objects).
    pub fn covers_event(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

/// One watch (or list) request, as watch faults see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchFacts<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    /// None for a watch across all namespaces.
    pub namespace: Option<&'a str>,
    pub user: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchFaultKind {
    /// Events are delayed until the window ends, then delivered in order.
    Hold,
    /// Events are not delivered; at the end of the window the watch is closed and resuming from before
    /// the end answers 410 Gone, so clients relist.
    Drop,
}

impl WatchFaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchFaultKind::Hold => "hold",
            WatchFaultKind::Drop => "drop",
        }
    }
}

/// A hold or drop window on the watch events of one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchFault {
    pub scope: WatchScope,
    pub kind: WatchFaultKind,
    /// Events with a higher resourceVersion (committed after the window opened) are affected.
    pub after_version: u64,
    pub until: Instant,
    /// For a drop that ended: the resourceVersion from which watches can resume again.
    pub resume_from: Option<u64>,
}

impl WatchFault {
    pub fn active(&self, now: Instant) -> bool {
        now < self.until
    }

    /// True when this window, while active, keeps `event` (of an object in `namespace`) from a watch.
    fn affects(&self, namespace: &str, resource_version: u64) -> bool {
        resource_version > self.after_version && self.scope.covers_event(namespace)
    }
}

/// What a watch must do with its events right now, from the windows that cover it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchGate {
    windows: Vec<WatchFault>,
}

/// What happens to one event at the head of a watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventFate {
    Deliver,
    /// Stop here; this and every later event wait until the instant.
    HoldUntil(Instant),
    Drop,
}

impl WatchGate {
    /// A hold wins over a drop: a held event is delivered later, so nothing is lost by waiting.
    pub fn fate(&self, namespace: &str, resource_version: u64) -> EventFate {
        let mut fate = EventFate::Deliver;
        for window in &self.windows {
            if !window.affects(namespace, resource_version) {
                continue;
            }
            match window.kind {
                WatchFaultKind::Hold => {
                    let until = match fate {
                        EventFate::HoldUntil(other) => other.max(window.until),
                        _ => window.until,
                    };
                    fate = EventFate::HoldUntil(until);
                }
                WatchFaultKind::Drop => {
                    if fate == EventFate::Deliver {
                        fate = EventFate::Drop;
                    }
                }
            }
        }
        fate
    }

    /// When the latest drop window covering this watch ends (the watch is closed then).
    pub fn drop_ends(&self) -> Option<Instant> {
        self.windows
            .iter()
            .filter(|w| w.kind == WatchFaultKind::Drop)
            .map(|w| w.until)
            .max()
    }

    pub fn is_open(&self) -> bool {
        self.windows.is_empty()
    }
}

/// A request to close open watches: all of them, or those of one scope.
#[derive(Clone, Debug)]
struct CloseRequest {
    generation: u64,
    scope: Option<WatchScope>,
}

#[derive(Default)]
struct WatchFaults {
    windows: Vec<WatchFault>,
    /// Watches to answer 410 Gone at once, like `remaining` of a fault rule.
    expiries: Vec<(WatchScope, usize)>,
    closes: VecDeque<CloseRequest>,
}

/// Injected faults; shared by the server and the test holding the SimCluster.
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
    latency_micros: AtomicU64,
    /// Bumped whenever watches must look again: a close, a new or cleared window.
    watch_signal: tokio::sync::watch::Sender<u64>,
    watch_faults: Mutex<WatchFaults>,
    /// The store's latest resourceVersion, so windows know which events came after them.
    versions: Option<tokio::sync::watch::Receiver<u64>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rules: Mutex::new(Vec::new()),
            latency_micros: AtomicU64::new(0),
            watch_signal: tokio::sync::watch::channel(0).0,
            watch_faults: Mutex::default(),
            versions: None,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Faults {
    /// Faults whose watch windows start at the store's current resourceVersion.
    pub fn tracking(versions: tokio::sync::watch::Receiver<u64>) -> Faults {
        Faults {
            versions: Some(versions),
            ..Faults::default()
        }
    }

    fn current_version(&self) -> u64 {
        self.versions.as_ref().map_or(0, |v| *v.borrow())
    }

    /// Adds a rule as given (see [`add_rule`](Self::add_rule) for one that is checked first).
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.rules).push(rule);
    }

    /// Adds a rule after checking it: unknown verbs, non-error codes, empty filters are refused.
    pub fn add_rule(&self, rule: FaultRule) -> Result<(), FaultError> {
        rule.validate()?;
        self.inject(rule);
        Ok(())
    }

    /// The next `count` requests with this verb on this resource (main resource or any subresource) fail with `code`.
    pub fn fail_next(&self, verb: &str, resource: &str, count: usize, code: u16) {
        self.inject(FaultRule::fail(verb, resource, code).times(count));
    }

    /// Like `fail_next`, restricted to one subresource (`status`, `scale`).
    pub fn fail_next_subresource(
        &self,
        verb: &str,
        resource: &str,
        subresource: &str,
        count: usize,
        code: u16,
    ) {
        self.inject(
            FaultRule::fail(verb, resource, code)
                .subresource(subresource)
                .times(count),
        );
    }

    /// Like `fail_next`, only for requests made by `user` (the identity of the bearer token).
    pub fn fail_next_as(&self, user: &str, verb: &str, resource: &str, count: usize, code: u16) {
        self.inject(
            FaultRule::fail(verb, resource, code)
                .user(user)
                .times(count),
        );
    }

    /// The next `count` matching requests are held for `hold` and then answered 504.
    pub fn timeout_next(&self, verb: &str, resource: &str, count: usize, hold: Duration) {
        self.inject(FaultRule::timeout(verb, resource, hold).times(count));
    }

    /// Like `timeout_next`, only for requests made by `user`.
    pub fn timeout_next_as(
        &self,
        user: &str,
        verb: &str,
        resource: &str,
        count: usize,
        hold: Duration,
    ) {
        self.inject(
            FaultRule::timeout(verb, resource, hold)
                .user(user)
                .times(count),
        );
    }

    /// Ends every open watch stream now (clients see the stream close and re-watch).
    pub fn close_watches(&self) {
        self.request_close(None);
    }

    /// Ends the open watch streams of one scope now; other watches stay open.
    pub fn close_watches_of(&self, scope: WatchScope) {
        self.request_close(Some(scope));
    }

    fn request_close(&self, scope: Option<WatchScope>) {
        // The record is in place before the signal, and both under the lock, so a watch woken by the
        // signal always finds the close it was woken for.
        let mut faults = lock(&self.watch_faults);
        let generation = *self.watch_signal.borrow() + 1;
        faults.closes.push_back(CloseRequest { generation, scope });
        while faults.closes.len() > CLOSE_HISTORY {
            faults.closes.pop_front();
        }
        self.watch_signal.send_replace(generation);
    }

    fn signal_watches(&self) {
        let _faults = lock(&self.watch_faults);
        self.watch_signal.send_modify(|generation| *generation += 1);
    }

    /// Changes whenever open watches must look at the faults again (a close, a new or cleared window).
    pub fn watch_closer(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watch_signal.subscribe()
    }

    /// True when a close requested after generation `seen` (up to `now`) applies to this watch.
    pub fn closed_since(&self, seen: u64, now: u64, watch: &WatchFacts<'_>) -> bool {
        let faults = lock(&self.watch_faults);
        let oldest = faults.closes.front().map_or(u64::MAX, |c| c.generation);
        if seen + 1 < oldest && faults.closes.len() >= CLOSE_HISTORY {
            return true;
        }
        faults
            .closes
            .iter()
            .filter(|c| c.generation > seen && c.generation <= now)
            .any(|c| c.scope.as_ref().is_none_or(|scope| scope.covers(watch)))
    }

    /// Events of the scope committed from now on are delivered only after `duration`, in order; lists
    /// of the scope wait until then too (a lagging watch cache).
    pub fn hold_watch_events(&self, scope: WatchScope, duration: Duration) {
        self.open_window(scope, WatchFaultKind::Hold, duration);
    }

    /// Events of the scope committed during the next `duration` are never delivered; then the watches
    /// covering the scope are closed and resuming them answers 410 Gone, so clients relist.
    pub fn drop_watch_events(&self, scope: WatchScope, duration: Duration) {
        self.open_window(scope, WatchFaultKind::Drop, duration);
    }

    fn open_window(&self, scope: WatchScope, kind: WatchFaultKind, duration: Duration) {
        let fault = WatchFault {
            scope,
            kind,
            after_version: self.current_version(),
            until: Instant::now() + duration.min(MAX_FAULT_DURATION),
            resume_from: None,
        };
        lock(&self.watch_faults).windows.push(fault);
        self.signal_watches();
    }

    /// The next `count` watches of the scope are answered with a 410 Gone `ERROR` event.
    pub fn expire_next_watches(&self, scope: WatchScope, count: usize) {
        if count > 0 {
            lock(&self.watch_faults).expiries.push((scope, count));
        }
    }

    /// Takes one pending expiry for this watch, if any.
    pub fn take_expiry(&self, watch: &WatchFacts<'_>) -> bool {
        let mut faults = lock(&self.watch_faults);
        let Some(position) = faults
            .expiries
            .iter()
            .position(|(scope, remaining)| *remaining > 0 && scope.covers(watch))
        else {
            return false;
        };
        faults.expiries[position].1 -= 1;
        if faults.expiries[position].1 == 0 {
            faults.expiries.remove(position);
        }
        true
    }

    /// The windows covering this watch that are open at `now`.
    pub fn watch_gate(&self, watch: &WatchFacts<'_>, now: Instant) -> WatchGate {
        let faults = lock(&self.watch_faults);
        WatchGate {
            windows: faults
                .windows
                .iter()
                .filter(|w| w.active(now) && w.scope.covers(watch))
                .cloned()
                .collect(),
        }
    }

    /// Until when a list (or a watch's initial objects) of this scope must wait for a lagging cache.
    pub fn hold_until(&self, watch: &WatchFacts<'_>, now: Instant) -> Option<Instant> {
        lock(&self.watch_faults)
            .windows
            .iter()
            .filter(|w| w.kind == WatchFaultKind::Hold && w.active(now) && w.scope.covers(watch))
            .map(|w| w.until)
            .max()
    }

    /// The resourceVersion a watch of this scope must resume from at least, after a drop window ended;
    /// an older one is answered 410 Gone. The first look after a window ended fixes that version at
    /// `current_version`.
    pub fn resume_floor(
        &self,
        watch: &WatchFacts<'_>,
        current_version: u64,
        now: Instant,
    ) -> Option<u64> {
        let mut faults = lock(&self.watch_faults);
        let mut floor = None;
        for window in faults.windows.iter_mut() {
            if window.kind != WatchFaultKind::Drop || window.active(now) {
                continue;
            }
            let resume_from = *window.resume_from.get_or_insert(current_version);
            if window.scope.covers(watch) {
                floor = Some(floor.map_or(resume_from, |f: u64| f.max(resume_from)));
            }
        }
        floor
    }

    /// Open and finished windows (finished drops are kept: they still answer 410 to old resumes).
    pub fn watch_faults(&self) -> Vec<WatchFault> {
        lock(&self.watch_faults).windows.clone()
    }

    /// Pending "next watch answers 410" counts per scope.
    pub fn pending_expiries(&self) -> Vec<(WatchScope, usize)> {
        lock(&self.watch_faults).expiries.clone()
    }

    /// Extra latency added before every request is answered.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_micros.store(
            latency.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_micros.load(Ordering::Relaxed))
    }

    /// Removes every rule, watch window (held events are delivered at once) and pending expiry, and
    /// the added latency.
    pub fn clear(&self) {
        lock(&self.rules).clear();
        {
            let mut faults = lock(&self.watch_faults);
            faults.windows.clear();
            faults.expiries.clear();
        }
        self.set_latency(Duration::ZERO);
        self.signal_watches();
    }

    /// True while any request rule is pending (so requests need not be looked at otherwise).
    pub fn has_rules(&self) -> bool {
        !lock(&self.rules).is_empty()
    }

    pub fn pending_rules(&self) -> Vec<FaultRule> {
        lock(&self.rules).clone()
    }

    /// Consumes one use of the first rule matching this request (any namespace, name and user).
    pub fn take_matching(
        &self,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
    ) -> Option<FaultAction> {
        let mut rules = lock(&self.rules);
        let position = rules.iter().position(|rule| {
            rule.remaining > 0
                && rule.name.is_none()
                && rule.namespace.is_none()
                && rule.user.is_none()
                && (rule.verb == "*" || rule.verb == verb)
                && (rule.resource == "*" || rule.resource == resource)
                && match rule.subresource.as_deref() {
                    None => true,
                    Some("") => subresource.is_none(),
                    Some(wanted) => Some(wanted) == subresource,
                }
        })?;
        Some(consume(&mut rules, position))
    }

    /// Consumes one use of the first rule matching this request.
    pub fn take_matching_request(&self, request: &RequestFacts<'_>) -> Option<FaultAction> {
        let mut rules = lock(&self.rules);
        let position = rules
            .iter()
            .position(|rule| rule.remaining > 0 && rule.matches(request))?;
        Some(consume(&mut rules, position))
    }
}

fn consume(rules: &mut Vec<FaultRule>, position: usize) -> FaultAction {
    let rule = &mut rules[position];
    rule.remaining -= 1;
    let action = rule.action.clone();
    if rule.remaining == 0 {
        rules.remove(position);
    }
    action
}

/// One request as the server understood it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub time: SystemTime,
    pub user: String,
    /// get, list, watch, create, update, patch, delete, deletecollection; `get` for discovery.
    pub verb: String,
    pub method: String,
    pub path: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub patch_content_type: Option<String>,
    pub status: u16,
}

/// How many distinct (user, verb, resource, subresource) totals [`RequestLog::counts`] keeps apart; any
/// further combination is added to [`OTHER_USER`]'s, so a client inventing user names cannot grow memory.
pub const MAX_COUNT_KEYS: usize = 4096;
/// The user under which requests beyond [`MAX_COUNT_KEYS`] combinations are counted.
pub const OTHER_USER: &str = "(other)";

/// (user, verb, resource, subresource) of a request total.
type CountKey = (String, String, String, Option<String>);

/// How many requests one user made with one verb on one resource since the sim started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestCount {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub count: u64,
}

impl RequestCount {
    /// Whether the request changed an object (create, update, patch, delete, deletecollection).
    pub fn is_write(&self) -> bool {
        is_write_verb(&self.verb)
    }
}

/// create, update, patch, delete and deletecollection.
pub fn is_write_verb(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// Bounded log of served requests, oldest dropped first, plus totals per user, verb and resource that
/// are never dropped (a benchmark of thousands of objects overflows any log it could afford to keep).
pub struct RequestLog {
    entries: Mutex<VecDeque<RequestRecord>>,
    capacity: usize,
    totals: Mutex<BTreeMap<CountKey, u64>>,
}

impl RequestLog {
    pub fn new(capacity: usize) -> RequestLog {
        RequestLog {
            entries: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            totals: Mutex::default(),
        }
    }

    pub fn record(&self, record: RequestRecord) {
        self.count(&record);
        let mut entries = lock(&self.entries);
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(record);
    }

    fn count(&self, record: &RequestRecord) {
        let mut totals = lock(&self.totals);
        let key = (
            record.user.clone(),
            record.verb.clone(),
            record.resource.clone(),
            record.subresource.clone(),
        );
        if let Some(total) = totals.get_mut(&key) {
            *total += 1;
            return;
        }
        let key = if totals.len() < MAX_COUNT_KEYS {
            key
        } else {
            (OTHER_USER.to_string(), String::new(), String::new(), None)
        };
        *totals.entry(key).or_default() += 1;
    }

    /// Requests since the sim started by user, verb, resource and subresource (clearing the log keeps
    /// them).
    pub fn counts(&self) -> Vec<RequestCount> {
        lock(&self.totals)
            .iter()
            .map(
                |((user, verb, resource, subresource), count)| RequestCount {
                    user: user.clone(),
                    verb: verb.clone(),
                    resource: resource.clone(),
                    subresource: subresource.clone(),
                    count: *count,
                },
            )
            .collect()
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        lock(&self.entries).iter().cloned().collect()
    }

    pub fn clear(&self) {
        lock(&self.entries).clear();
    }

    pub fn filter(&self, predicate: impl Fn(&RequestRecord) -> bool) -> Vec<RequestRecord> {
        lock(&self.entries)
            .iter()
            .filter(|r| predicate(r))
            .cloned()
            .collect()
    }

    /// Requests with this verb on this resource (any subresource).
    pub fn matching(&self, verb: &str, resource: &str) -> Vec<RequestRecord> {
        self.filter(|r| r.verb == verb && r.resource == resource)
    }

    /// Writes (create, update, patch, delete, deletecollection) made by one user.
    pub fn writes_by(&self, user: &str) -> Vec<RequestRecord> {
        self.filter(|r| r.user == user && is_write_verb(&r.verb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(verb: &'a str, resource: &'a str, user: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            verb,
            group: "apps",
            resource,
            subresource: None,
            namespace: Some("shop"),
            name: Some("web"),
            user,
        }
    }

    #[test]
    fn rules_are_consumed_then_requests_pass() {
        let faults = Faults::default();
        faults.fail_next("create", "configmaps", 2, 500);
        assert_eq!(faults.take_matching("get", "configmaps", None), None);
        assert_eq!(
            faults.take_matching("create", "configmaps", None),
            Some(FaultAction::Fail(500))
        );
        assert_eq!(
            faults.take_matching("create", "configmaps", None),
            Some(FaultAction::Fail(500))
        );
        assert_eq!(faults.take_matching("create", "configmaps", None), None);
        faults.fail_next_subresource("update", "pods", "status", 1, 409);
        assert_eq!(faults.take_matching("update", "pods", None), None);
        assert_eq!(
            faults.take_matching("update", "pods", Some("status")),
            Some(FaultAction::Fail(409))
        );
    }

    #[test]
    fn rules_match_name_namespace_user_and_qualified_resource() {
        let rule = FaultRule::fail("patch", "replicasets.apps", 500)
            .name("web")
            .namespace("shop")
            .user("serin-a");
        assert!(rule.matches(&request("patch", "replicasets", "serin-a")));
        assert!(!rule.matches(&request("patch", "replicasets", "serin-b")));
        assert!(!rule.matches(&request("update", "replicasets", "serin-a")));
        let other_name = RequestFacts {
            name: Some("api"),
            ..request("patch", "replicasets", "serin-a")
        };
        assert!(!rule.matches(&other_name));
        let other_namespace = RequestFacts {
            namespace: Some("default"),
            ..request("patch", "replicasets", "serin-a")
        };
        assert!(!rule.matches(&other_namespace));
        let other_group = RequestFacts {
            group: "extensions",
            ..request("patch", "replicasets", "serin-a")
        };
        assert!(!rule.matches(&other_group));
        let wildcard = FaultRule::fail("*", "*", 500);
        assert!(wildcard.matches(&request("watch", "pods", "anyone")));
    }

    #[test]
    fn subresource_none_matches_all_empty_only_main() {
        let status = RequestFacts {
            subresource: Some("status"),
            ..request("patch", "rollouts", "u")
        };
        let main = request("patch", "rollouts", "u");
        let any = FaultRule::fail("patch", "rollouts", 500);
        let only_main = FaultRule::fail("patch", "rollouts", 500).subresource("");
        let only_status = FaultRule::fail("patch", "rollouts", 500).subresource("status");
        assert!(any.matches(&status) && any.matches(&main));
        assert!(!only_main.matches(&status) && only_main.matches(&main));
        assert!(only_status.matches(&status) && !only_status.matches(&main));
    }

    #[test]
    fn user_rules_are_skipped_by_the_legacy_matcher_and_taken_by_the_full_one() {
        let faults = Faults::default();
        faults.fail_next_as("alice", "get", "configmaps", 1, 500);
        assert_eq!(faults.take_matching("get", "configmaps", None), None);
        let bob = RequestFacts {
            group: "",
            ..request("get", "configmaps", "bob")
        };
        assert_eq!(faults.take_matching_request(&bob), None);
        let alice = RequestFacts {
            user: "alice",
            ..bob
        };
        assert_eq!(
            faults.take_matching_request(&alice),
            Some(FaultAction::Fail(500))
        );
        assert!(faults.pending_rules().is_empty());
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let faults = Faults::default();
        let error = |rule: FaultRule| match faults.add_rule(rule) {
            Err(FaultError::Invalid { field, .. }) => field,
            Ok(()) => "accepted",
        };
        assert_eq!(error(FaultRule::fail("fetch", "pods", 500)), "verb");
        assert_eq!(error(FaultRule::fail("get", "", 500)), "resource");
        assert_eq!(error(FaultRule::fail("get", "pods", 200)), "code");
        assert_eq!(error(FaultRule::fail("get", "pods", 500).times(0)), "count");
        assert_eq!(error(FaultRule::fail("get", "pods", 500).user("")), "user");
        assert_eq!(
            error(FaultRule::timeout(
                "get",
                "pods",
                MAX_FAULT_DURATION + Duration::from_secs(1)
            )),
            "timeoutMillis"
        );
        assert!(faults.pending_rules().is_empty());
        assert_eq!(error(FaultRule::fail("get", "pods", 429)), "accepted");
    }

    fn watch<'a>(namespace: Option<&'a str>, user: &'a str) -> WatchFacts<'a> {
        WatchFacts {
            group: "apps",
            resource: "replicasets",
            namespace,
            user,
        }
    }

    #[test]
    fn scopes_cover_watches_of_their_resource_namespace_and_user() {
        let scope = WatchScope::new("apps", "replicasets")
            .namespace("shop")
            .user("ctl");
        assert!(scope.covers(&watch(Some("shop"), "ctl")));
        assert!(
            scope.covers(&watch(None, "ctl")),
            "an all-namespaces watch sees shop"
        );
        assert!(!scope.covers(&watch(Some("other"), "ctl")));
        assert!(!scope.covers(&watch(Some("shop"), "sim")));
        assert!(!WatchScope::new("", "replicasets").covers(&watch(None, "ctl")));
        assert!(scope.covers_event("shop") && !scope.covers_event("other"));
    }

    #[test]
    fn gate_holds_later_events_of_the_scope_and_drops_win_only_without_a_hold() {
        let now = Instant::now();
        let versions = tokio::sync::watch::channel(10u64);
        let faults = Faults::tracking(versions.1);
        faults.hold_watch_events(
            WatchScope::new("apps", "replicasets").namespace("shop"),
            Duration::from_secs(2),
        );
        let gate = faults.watch_gate(&watch(None, "ctl"), now);
        assert_eq!(
            gate.fate("shop", 10),
            EventFate::Deliver,
            "committed before"
        );
        assert!(matches!(gate.fate("shop", 11), EventFate::HoldUntil(_)));
        assert_eq!(gate.fate("other", 11), EventFate::Deliver);
        assert!(faults.hold_until(&watch(Some("shop"), "x"), now).is_some());
        assert!(faults.hold_until(&watch(Some("other"), "x"), now).is_none());
        assert!(faults
            .watch_gate(&watch(None, "ctl"), now + Duration::from_secs(3))
            .is_open());

        faults.clear();
        faults.drop_watch_events(
            WatchScope::new("apps", "replicasets"),
            Duration::from_secs(1),
        );
        let gate = faults.watch_gate(&watch(None, "ctl"), now);
        assert_eq!(gate.fate("shop", 11), EventFate::Drop);
        assert!(gate.drop_ends().is_some());
        assert_eq!(
            faults.resume_floor(&watch(None, "ctl"), 40, now),
            None,
            "no floor while the window is open"
        );
        let later = Instant::now() + Duration::from_secs(2);
        assert_eq!(
            faults.resume_floor(&watch(None, "ctl"), 40, later),
            Some(40)
        );
        assert_eq!(
            faults.resume_floor(&watch(None, "ctl"), 55, later),
            Some(40),
            "the floor is fixed by the first look after the window"
        );
    }

    #[test]
    fn closes_reach_only_their_scope_and_expiries_are_counted() {
        let faults = Faults::default();
        let seen = *faults.watch_closer().borrow();
        faults.close_watches_of(WatchScope::new("apps", "replicasets"));
        let now = *faults.watch_closer().borrow();
        assert!(faults.closed_since(seen, now, &watch(None, "x")));
        let pods = WatchFacts {
            group: "",
            resource: "pods",
            namespace: None,
            user: "x",
        };
        assert!(!faults.closed_since(seen, now, &pods));
        faults.close_watches();
        let all = *faults.watch_closer().borrow();
        assert!(faults.closed_since(now, all, &pods));

        faults.expire_next_watches(WatchScope::new("", "pods"), 2);
        assert!(!faults.take_expiry(&watch(None, "x")));
        assert!(faults.take_expiry(&pods));
        assert!(faults.take_expiry(&pods));
        assert!(!faults.take_expiry(&pods));
    }

    #[test]
    fn log_is_bounded() {
        let log = RequestLog::new(2);
        for index in 0..3u16 {
            log.record(RequestRecord {
                time: SystemTime::now(),
                user: "admin".into(),
                verb: "get".into(),
                method: "GET".into(),
                path: "/api".into(),
                group: String::new(),
                version: String::new(),
                resource: String::new(),
                subresource: None,
                namespace: None,
                name: None,
                patch_content_type: None,
                status: 200 + index,
            });
        }
        let statuses: Vec<u16> = log.snapshot().iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![201, 202]);
        log.clear();
        let counts = log.counts();
        assert_eq!(counts.len(), 1, "one user, verb and resource: {counts:?}");
        assert_eq!(
            counts[0].count, 3,
            "totals keep what the bounded log dropped"
        );
        assert!(!counts[0].is_write());
    }

    #[test]
    fn request_totals_are_bounded_in_distinct_keys() {
        let log = RequestLog::new(1);
        let total = MAX_COUNT_KEYS + 10;
        for index in 0..total {
            log.record(RequestRecord {
                time: SystemTime::now(),
                user: format!("user-{index}"),
                verb: "patch".into(),
                method: "PATCH".into(),
                path: "/api/v1/namespaces/a/pods/b".into(),
                group: String::new(),
                version: "v1".into(),
                resource: "pods".into(),
                subresource: None,
                namespace: Some("a".into()),
                name: Some("b".into()),
                patch_content_type: None,
                status: 200,
            });
        }
        let counts = log.counts();
        assert_eq!(counts.len(), MAX_COUNT_KEYS + 1);
        assert_eq!(counts.iter().map(|c| c.count).sum::<u64>(), total as u64);
        let other = counts.iter().find(|c| c.user == OTHER_USER);
        assert_eq!(other.map(|c| c.count), Some(10));
    }
}
