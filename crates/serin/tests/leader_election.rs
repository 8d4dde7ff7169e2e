//! Leader election against the simulated cluster: one holder at a time, takeover after a crash, handover on
//! release, fencing when renewals fail (the write fence closes with it), and clear errors for bad config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::Api;
use serin::controller::leader::{acquire, Fenced, Leadership, LeaseConfig};
use serin_sim::{RequestRecord, SimCluster, SimConfig};
use tokio::task::JoinHandle;

/// Upper bound for any single wait; generous because the machine running the tests is small and busy.
const WAIT: Duration = Duration::from_secs(30);
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_PERIOD: Duration = Duration::from_millis(200);
const LEASE_NAME: &str = "serin-leader";

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_name: LEASE_NAME.into(),
        lease_namespace: "default".into(),
        identity: identity.into(),
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY_PERIOD,
    }
}

async fn start() -> SimCluster {
    SimCluster::start(SimConfig::default())
        .await
        .expect("sim starts")
}

async fn candidate(sim: &SimCluster, identity: &str) -> JoinHandle<Leadership> {
    let client = sim.client_as(identity).await.expect("client");
    let config = config(identity);
    tokio::spawn(async move { acquire(client, config).await.expect("acquire") })
}

async fn leadership_of(task: JoinHandle<Leadership>) -> Leadership {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("acquired in time")
        .expect("acquire task")
}

/// The Lease as stored, read as the admin (reads are never faulted by these tests).
async fn stored_lease(sim: &SimCluster) -> LeaseSpec {
    let api: Api<Lease> = Api::namespaced(sim.client().await.expect("client"), "default");
    api.get(LEASE_NAME)
        .await
        .expect("lease exists")
        .spec
        .expect("lease has a spec")
}

fn renew_time(spec: &LeaseSpec) -> SystemTime {
    SystemTime::from(spec.renew_time.as_ref().expect("renewTime").0)
}

fn acquire_time(spec: &LeaseSpec) -> SystemTime {
    SystemTime::from(spec.acquire_time.as_ref().expect("acquireTime").0)
}

/// Lease writes the API server accepted, in the order it served them.
fn accepted_lease_writes(sim: &SimCluster) -> Vec<RequestRecord> {
    sim.request_log().filter(|record| {
        record.resource == "leases"
            && matches!(
                record.verb.as_str(),
                "create" | "update" | "patch" | "delete"
            )
            && record.status < 300
    })
}

/// The identities of the successive writers: one entry per uninterrupted run of writes by one user.
fn writer_terms(records: &[RequestRecord]) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for record in records {
        if terms.last() != Some(&record.user) {
            terms.push(record.user.clone());
        }
    }
    terms
}

#[tokio::test]
async fn two_candidates_one_leader_and_only_the_holder_writes() {
    let sim = start().await;
    let mut task_a = candidate(&sim, "serin-a").await;
    let mut task_b = candidate(&sim, "serin-b").await;
    let first = tokio::time::timeout(WAIT, async {
        tokio::select! {
            leadership = &mut task_a => ("serin-a", leadership.expect("task a")),
            leadership = &mut task_b => ("serin-b", leadership.expect("task b")),
        }
    })
    .await
    .expect("someone becomes leader");
    let (winner, leadership) = first;
    let (loser, loser_task) = if winner == "serin-a" {
        ("serin-b", task_b)
    } else {
        ("serin-a", task_a)
    };

    // Longer than a lease term: the holder keeps renewing, the other candidate keeps waiting.
    for _ in 0..20 {
        assert!(leadership.is_leader(), "{winner} should still lead");
        assert!(
            !loser_task.is_finished(),
            "{loser} must not become leader while {winner} renews"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let writes = accepted_lease_writes(&sim);
    assert!(
        writes.len() >= 5,
        "the holder renews every retry period: {writes:?}"
    );
    assert_eq!(writer_terms(&writes), vec![winner.to_string()]);
    let loser_accepted: Vec<RequestRecord> = sim
        .request_log()
        .filter(|r| r.resource == "leases" && r.user == loser && r.status < 300);
    assert!(
        !loser_accepted.is_empty(),
        "the waiting candidate looks at the lease"
    );
    assert!(
        loser_accepted.iter().all(|r| r.verb == "get"),
        "{loser} only reads: {loser_accepted:?}"
    );
    assert_eq!(
        stored_lease(&sim).await.holder_identity.as_deref(),
        Some(winner)
    );

    leadership.release().await;
    let successor = leadership_of(loser_task).await;
    assert!(successor.is_leader());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        writer_terms(&accepted_lease_writes(&sim)),
        vec![winner.to_string(), loser.to_string()]
    );
    let stored = stored_lease(&sim).await;
    assert_eq!(stored.holder_identity.as_deref(), Some(loser));
    assert_eq!(stored.lease_duration_seconds, Some(3));
}

#[tokio::test]
async fn killed_leader_is_replaced_after_its_lease_expires() {
    let sim = start().await;
    let client_a = sim.client_as("serin-a").await.expect("client");
    let (lost_sender, lost_receiver) = tokio::sync::oneshot::channel();
    let leader_a = tokio::spawn(async move {
        let leadership = acquire(client_a, config("serin-a"))
            .await
            .expect("a acquires");
        let _ = lost_sender.send(leadership.lost());
        std::future::pending::<()>().await;
        drop(leadership);
    });
    let lost_a = tokio::time::timeout(WAIT, lost_receiver)
        .await
        .expect("a leads in time")
        .expect("lost token");
    let task_b = candidate(&sim, "serin-b").await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    leader_a.abort();
    let _ = leader_a.await;
    assert!(lost_a.is_cancelled(), "a dropped leadership is a lost one");
    // A renewal aborted mid-flight may still land; after that nothing from serin-a can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_term = stored_lease(&sim).await;
    assert_eq!(last_term.holder_identity.as_deref(), Some("serin-a"));
    let expiry = renew_time(&last_term) + LEASE_DURATION;

    let leadership_b = leadership_of(task_b).await;
    let taken = stored_lease(&sim).await;
    assert_eq!(taken.holder_identity.as_deref(), Some("serin-b"));
    assert_eq!(taken.lease_transitions, Some(1));
    let taken_at = acquire_time(&taken);
    assert!(taken_at >= expiry, "b took over before a's lease expired");
    // b looks every retry period; the slack absorbs scheduling delays on a busy machine.
    let latest = expiry + RETRY_PERIOD + Duration::from_secs(1);
    assert!(
        taken_at <= latest,
        "b took over {:?} after expiry",
        taken_at.duration_since(expiry)
    );
    assert!(leadership_b.is_leader());
    assert_eq!(
        writer_terms(&accepted_lease_writes(&sim)),
        vec!["serin-a".to_string(), "serin-b".to_string()]
    );
}

#[tokio::test]
async fn release_hands_over_at_once() {
    let sim = start().await;
    let leadership_a = leadership_of(candidate(&sim, "serin-a").await).await;
    let task_b = candidate(&sim, "serin-b").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!task_b.is_finished());

    let lost_a = leadership_a.lost();
    let fence_a = leadership_a.fence();
    let released_at = SystemTime::now();
    leadership_a.release().await;
    assert!(
        lost_a.is_cancelled(),
        "a stops writing before it gives the lease up"
    );
    assert_eq!(fence_a.check(), Err(Fenced), "a's writes are fenced off");

    let leadership_b = leadership_of(task_b).await;
    let taken = stored_lease(&sim).await;
    assert_eq!(taken.holder_identity.as_deref(), Some("serin-b"));
    // Waiting for expiry would take at least LEASE_DURATION - RETRY_PERIOD after the release.
    let taken_after = acquire_time(&taken)
        .duration_since(released_at)
        .unwrap_or_default();
    assert!(
        taken_after < LEASE_DURATION - RETRY_PERIOD * 2,
        "b waited {taken_after:?}"
    );
    assert!(leadership_b.is_leader());
    assert_eq!(
        writer_terms(&accepted_lease_writes(&sim)),
        vec!["serin-a".to_string(), "serin-b".to_string()]
    );
}

/// Fails serin-a's renewals with `inject`; a must fence itself before its lease expires, b must wait for expiry.
async fn failing_renewals_fence_the_leader(inject: impl FnOnce(&SimCluster)) {
    let sim = start().await;
    let leadership_a = leadership_of(candidate(&sim, "serin-a").await).await;
    let task_b = candidate(&sim, "serin-b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(leadership_a.is_leader());

    let fence = leadership_a.fence();
    assert_eq!(fence.check(), Ok(()), "the holder may write");
    inject(&sim);
    let lost = leadership_a.lost();
    tokio::time::timeout(WAIT, lost.cancelled())
        .await
        .expect("a notices it cannot renew");
    let lost_at = SystemTime::now();
    assert!(!leadership_a.is_leader());
    assert_eq!(fence.check(), Err(Fenced), "writes are fenced off");
    let last_term = stored_lease(&sim).await;
    assert_eq!(last_term.holder_identity.as_deref(), Some("serin-a"));
    let expiry = renew_time(&last_term) + LEASE_DURATION;
    assert!(
        lost_at < expiry,
        "lost fired {:?} after the lease expired",
        lost_at.duration_since(expiry)
    );
    assert!(
        lost_at >= renew_time(&last_term) + RENEW_DEADLINE,
        "a gave up before its renew deadline"
    );
    assert!(
        !task_b.is_finished(),
        "b must not lead while a's lease is valid"
    );
    sim.faults().clear();

    let leadership_b = leadership_of(task_b).await;
    let taken = stored_lease(&sim).await;
    assert_eq!(taken.holder_identity.as_deref(), Some("serin-b"));
    assert!(
        acquire_time(&taken) >= expiry,
        "b took over before a's lease expired"
    );
    assert!(leadership_b.is_leader());
    assert!(!leadership_a.is_leader());
    assert_eq!(
        writer_terms(&accepted_lease_writes(&sim)),
        vec!["serin-a".to_string(), "serin-b".to_string()]
    );
}

#[tokio::test]
async fn renewals_failing_with_500_fence_the_leader_before_expiry() {
    failing_renewals_fence_the_leader(|sim| {
        sim.faults().fail_next("update", "leases", 10_000, 500)
    })
    .await;
}

#[tokio::test]
async fn renewals_timing_out_fence_the_leader_before_expiry() {
    failing_renewals_fence_the_leader(|sim| {
        sim.faults()
            .timeout_next("update", "leases", 10_000, Duration::from_secs(20))
    })
    .await;
}

#[tokio::test]
async fn bad_config_is_a_clear_error() {
    let sim = start().await;
    let client = sim.client_as("serin-a").await.expect("client");

    let renew_too_long = LeaseConfig {
        renew_deadline: LEASE_DURATION,
        ..config("serin-a")
    };
    let error = acquire(client.clone(), renew_too_long)
        .await
        .err()
        .expect("rejected");
    assert_eq!(error.category(), "invalid_timing");
    assert!(error.to_string().contains("renew deadline"), "{error}");

    let retry_too_long = LeaseConfig {
        retry_period: RENEW_DEADLINE,
        ..config("serin-a")
    };
    let error = acquire(client.clone(), retry_too_long)
        .await
        .err()
        .expect("rejected");
    assert_eq!(error.category(), "invalid_timing");
    assert!(error.to_string().contains("retry period"), "{error}");

    let bad_name = LeaseConfig {
        lease_name: "Serin_Leader".into(),
        ..config("serin-a")
    };
    let error = acquire(client.clone(), bad_name)
        .await
        .err()
        .expect("rejected");
    assert_eq!(error.category(), "invalid_lease_name");
    assert!(error.to_string().contains("Serin_Leader"), "{error}");

    let missing_namespace = LeaseConfig {
        lease_namespace: "no-such-namespace".into(),
        ..config("serin-a")
    };
    let error = tokio::time::timeout(WAIT, acquire(client, missing_namespace))
        .await
        .expect("a missing namespace ends the wait")
        .err()
        .expect("rejected");
    assert_eq!(error.category(), "lease_namespace_missing");
    assert!(
        error
            .to_string()
            .contains("\"no-such-namespace\" does not exist"),
        "{error}"
    );
    assert!(accepted_lease_writes(&sim).is_empty());
}
