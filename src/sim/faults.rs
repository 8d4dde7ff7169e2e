//! Fault injection and the request log: which requests to fail or delay, and what clients asked for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// What an injected fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this status code and the reason a real server pairs with it (409, 429, 500, ...).
    Fail(u16),
    /// Hold the request this long, then answer 504 Timeout.
    Timeout(Duration),
}

/// Fail the next `remaining` requests that match verb/resource/subresource (`"*"` matches any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub remaining: usize,
    pub action: FaultAction,
}

/// Injected faults; shared by the server and the test holding the SimCluster.
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
    latency_micros: AtomicU64,
    close_watches: tokio::sync::watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rules: Mutex::new(Vec::new()),
            latency_micros: AtomicU64::new(0),
            close_watches: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Faults {
    pub fn inject(&self, rule: FaultRule) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(rule);
        }
    }

    /// The next `count` requests with this verb on this resource (main resource or any subresource) fail with `code`.
    pub fn fail_next(&self, verb: &str, resource: &str, count: usize, code: u16) {
        self.inject(FaultRule {
            verb: verb.into(),
            resource: resource.into(),
            subresource: None,
            remaining: count,
            action: FaultAction::Fail(code),
        });
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
        self.inject(FaultRule {
            verb: verb.into(),
            resource: resource.into(),
            subresource: Some(subresource.into()),
            remaining: count,
            action: FaultAction::Fail(code),
        });
    }

    /// The next `count` matching requests are held for `hold` and then answered 504.
    pub fn timeout_next(&self, verb: &str, resource: &str, count: usize, hold: Duration) {
        self.inject(FaultRule {
            verb: verb.into(),
            resource: resource.into(),
            subresource: None,
            remaining: count,
            action: FaultAction::Timeout(hold),
        });
    }

    /// Ends every open watch stream now (clients see the stream close and re-watch).
    pub fn close_watches(&self) {
        self.close_watches
            .send_modify(|generation| *generation += 1);
    }

    pub fn watch_closer(&self) -> tokio::sync::watch::Receiver<u64> {
        self.close_watches.subscribe()
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

    /// Removes every rule and the added latency.
    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.clear();
        }
        self.set_latency(Duration::ZERO);
    }

    pub fn pending_rules(&self) -> Vec<FaultRule> {
        self.rules.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Consumes one use of the first rule matching this request.
    pub fn take_matching(
        &self,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
    ) -> Option<FaultAction> {
        let mut rules = self.rules.lock().ok()?;
        let position = rules.iter().position(|rule| {
            rule.remaining > 0
                && (rule.verb == "*" || rule.verb == verb)
                && (rule.resource == "*" || rule.resource == resource)
                && rule
                    .subresource
                    .as_deref()
                    .is_none_or(|wanted| Some(wanted) == subresource)
        })?;
        let rule = &mut rules[position];
        rule.remaining -= 1;
        let action = rule.action.clone();
        if rule.remaining == 0 {
            rules.remove(position);
        }
        Some(action)
    }
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

/// Bounded log of served requests, oldest dropped first.
pub struct RequestLog {
    entries: Mutex<VecDeque<RequestRecord>>,
    capacity: usize,
}

impl RequestLog {
    pub fn new(capacity: usize) -> RequestLog {
        RequestLog {
            entries: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    pub fn record(&self, record: RequestRecord) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= self.capacity {
                entries.pop_front();
            }
            entries.push_back(record);
        }
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.entries
            .lock()
            .map(|e| e.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }

    pub fn filter(&self, predicate: impl Fn(&RequestRecord) -> bool) -> Vec<RequestRecord> {
        self.entries
            .lock()
            .map(|e| e.iter().filter(|r| predicate(r)).cloned().collect())
            .unwrap_or_default()
    }

    /// Requests with this verb on this resource (any subresource).
    pub fn matching(&self, verb: &str, resource: &str) -> Vec<RequestRecord> {
        self.filter(|r| r.verb == verb && r.resource == resource)
    }

    /// Writes (create, update, patch, delete, deletecollection) made by one user.
    pub fn writes_by(&self, user: &str) -> Vec<RequestRecord> {
        self.filter(|r| {
            r.user == user
                && matches!(
                    r.verb.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
