//! Safety rule 13: Serin calls only the addresses its operator allows, and reads a Secret only for a run
//! that a Rollout of the same namespace vouches for.
//!
//! A raw TCP listener on 127.0.0.1 stands in for a cloud metadata endpoint: it counts every connection and
//! would answer a query with a healthy value, so a connection that should not happen shows up both in the
//! count and as a success. Tenant-made runs and a Rollout's own analysis are refused before any request,
//! with a clear message and an event; allowed addresses, the default address, redirects and oversized or
//! slow answers behave as the outbound policy says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serin_testkit as support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use serin::analysis::outbound::{Limits, OutboundConfig};
use serin::analysis::prometheus::PrometheusProvider;
use serin::analysis::runner::{self, RunnerConfig};
use serin::analysis::{advance, Measurer, StaticSecrets};
use serin::crd::analysis::{AnalysisRun, AnalysisRunStatus, AnalysisTemplate};
use serin::crd::{AnalysisPhase, RolloutPhase};
use support::{canary_rollout, World, CONTROLLER_USER, NS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of the Secret a tenant must not be able to send anywhere.
const TOKEN: &str = "tenant-must-never-see-this-9f3a";

/// A healthy Prometheus answer: whoever reaches a server answering this measures a success.
const HEALTHY_ANSWER: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"0"]}]}}"#;

/// A TCP listener that counts connections and keeps what each one sent.
struct Listener {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn start() -> Listener {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the listener");
        let address = socket.local_addr().expect("listener address");
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = socket.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    let read = stream.read(&mut buffer).await.unwrap_or(0);
                    if let Ok(mut log) = log.lock() {
                        log.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{HEALTHY_ANSWER}",
                        HEALTHY_ANSWER.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Listener {
            address,
            connections,
            received,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A metric measured once, healthy when the value is below 1, optionally sending a Secret as bearer token.
fn metric(name: &str, address: Option<&str>, token: bool) -> Value {
    let mut prometheus = json!({"query": "vector(0)", "timeout": "5s"});
    if let Some(address) = address {
        prometheus["address"] = json!(address);
    }
    if token {
        prometheus["authentication"] =
            json!({"bearerToken": {"name": "cloud-token", "key": "token"}});
    }
    json!({
        "name": name,
        "count": 1,
        "successCondition": "result < 1",
        "provider": {"prometheus": prometheus}
    })
}

fn run_manifest(name: &str, metrics: Vec<Value>, owner: Option<Value>) -> AnalysisRun {
    let mut metadata = json!({"name": name, "namespace": NS});
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisRun",
        "metadata": metadata,
        "spec": {"metrics": metrics}
    }))
    .expect("a valid AnalysisRun")
}

async fn create_token_secret(client: &Client) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "cloud-token", "namespace": NS},
        "stringData": {"token": TOKEN}
    }))
    .expect("a valid Secret");
    Api::<Secret>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .expect("Secret created");
}

/// Polls the run until it completes; at every poll the listener has seen no connection and the run is not
/// Successful.
async fn completed_without_a_connection(
    client: &Client,
    name: &str,
    listener: &Listener,
    within: Duration,
) -> AnalysisRunStatus {
    let runs: Api<AnalysisRun> = Api::namespaced(client.clone(), NS);
    let deadline = Instant::now() + within;
    for _ in 0..2000 {
        assert_eq!(
            listener.connections(),
            0,
            "the listener was reached: {:?}",
            listener
                .received
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default()
        );
        let status = runs
            .get(name)
            .await
            .expect("run exists")
            .status
            .unwrap_or_default();
        assert_ne!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
        if status.phase.is_some_and(|phase| phase.is_completed()) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "run {name} did not complete: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {name} did not complete within 2000 polls");
}

/// The events recorded about an AnalysisRun.
async fn run_events(client: &Client, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|event| {
            event.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("AnalysisRun") && r.name.as_deref() == Some(name)
            })
        })
        .collect()
}

/// Waits (bounded) for an event with `reason` about the run; returns its note.
async fn expect_run_event(client: &Client, name: &str, reason: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        let events = run_events(client, name).await;
        if let Some(event) = events.iter().find(|e| e.reason.as_deref() == Some(reason)) {
            return event.note.clone().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event about AnalysisRun {name}: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {reason} event about AnalysisRun {name}");
}

/// Everything written about a run, as text, to look for the Secret's value in.
async fn everything_written_about(client: &Client, name: &str) -> String {
    let run = Api::<AnalysisRun>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .expect("run exists");
    let events = run_events(client, name).await;
    format!(
        "{}\n{}",
        serde_json::to_string(&run).unwrap_or_default(),
        serde_json::to_string(&events).unwrap_or_default()
    )
}

/// Secret reads the controller's user made.
fn secret_reads(world: &World) -> usize {
    world
        .sim
        .request_log()
        .filter(|record| record.user == CONTROLLER_USER && record.resource == "secrets")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_run_sending_a_secret_token_to_a_loopback_listener_is_refused_without_a_connection(
) {
    let world = World::without_controller().await;
    create_token_secret(&world.admin).await;
    let listener = Listener::start().await;
    let runs: Api<AnalysisRun> = Api::namespaced(world.admin.clone(), NS);

    // 1. The operator's policy does not list loopback (the default lists nothing): the address is refused.
    let client = world
        .sim
        .client_as(CONTROLLER_USER)
        .await
        .expect("controller client");
    let runner = runner::spawn(client.clone(), RunnerConfig::default());
    let address = listener.url("/computeMetadata/v1/instance");
    runs.create(
        &PostParams::default(),
        &run_manifest(
            "steal",
            vec![metric("identity", Some(&address), true)],
            None,
        ),
    )
    .await
    .expect("a tenant may create AnalysisRuns");
    let status =
        completed_without_a_connection(&world.admin, "steal", &listener, Duration::from_secs(30))
            .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            r#"metric "identity": address "{address}" is refused: 127.0.0.1 is a loopback address"#
        )) && message.contains("--allowed-destinations"),
        "{message}"
    );
    let result = &status.metric_results[0];
    assert_eq!(
        (result.count, result.error, result.successful),
        (1, 1, 0),
        "{result:#?}"
    );
    assert_eq!(result.measurements[0].phase, AnalysisPhase::Error);
    assert_eq!(
        expect_run_event(&world.admin, "steal", "DestinationRefused").await,
        message
    );
    assert_eq!(
        secret_reads(&world),
        0,
        "no Secret was read for a refused address"
    );
    runner.shutdown().await.expect("runner stops");

    // 2. The operator opened loopback: the address passes, but no Rollout vouches for the run, so its
    //    Secret is neither read nor sent.
    let opened = OutboundConfig::allowing(["127.0.0.1"]).expect("a valid destination");
    let runner = runner::spawn(client.clone(), RunnerConfig::allowing(None, opened));
    runs.create(
        &PostParams::default(),
        &run_manifest(
            "steal-opened",
            vec![metric("identity", Some(&address), true)],
            None,
        ),
    )
    .await
    .expect("run created");
    let status = completed_without_a_connection(
        &world.admin,
        "steal-opened",
        &listener,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("names Secret cloud-token/token")
            && message.contains("no Rollout controls it"),
        "{message}"
    );
    assert_eq!(
        expect_run_event(&world.admin, "steal-opened", "SecretAccessRefused").await,
        message
    );

    // 3. A forged ownerReference to a Rollout that does not exist vouches for nothing.
    let forged = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout", "name": "checkout",
        "uid": "00000000-0000-0000-0000-000000000000", "controller": true
    });
    runs.create(
        &PostParams::default(),
        &run_manifest(
            "steal-forged",
            vec![metric("identity", Some(&address), true)],
            Some(forged),
        ),
    )
    .await
    .expect("run created");
    let status = completed_without_a_connection(
        &world.admin,
        "steal-forged",
        &listener,
        Duration::from_secs(30),
    )
    .await;
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("the Rollout checkout that controls it does not exist"),
        "{message}"
    );
    assert_eq!(
        secret_reads(&world),
        0,
        "no Secret was read for a tenant's run"
    );
    for name in ["steal", "steal-opened", "steal-forged"] {
        let written = everything_written_about(&world.admin, name).await;
        assert!(!written.contains(TOKEN), "{written}");
    }
    assert_eq!(listener.connections(), 0);
    runner.shutdown().await.expect("runner stops");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollouts_template_aimed_at_a_disallowed_address_is_refused_and_the_canary_aborted() {
    const APP: &str = "checkout";
    // The controller runs with the default policy, which allows no destination.
    // The controller's own default policy: loopback (the listener) is not allowed.
    let mut world = World::without_controller().await;
    world
        .start_controller_with(serin::controller::ControllerConfig::default().outbound)
        .await;
    create_token_secret(&world.admin).await;
    let listener = Listener::start().await;
    let address = listener.url("/latest/meta-data");
    let template: AnalysisTemplate = serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": "metadata", "namespace": NS},
        "spec": {"metrics": [metric("identity", Some(&address), true)]}
    }))
    .expect("a valid AnalysisTemplate");
    Api::<AnalysisTemplate>::namespaced(world.admin.clone(), NS)
        .create(&PostParams::default(), &template)
        .await
        .expect("template created");
    world
        .given_services(APP, &[APP, &format!("{APP}-canary")])
        .await;
    let rollout = world
        .given_rollout(canary_rollout(
            APP,
            2,
            "checkout:v1",
            json!({
                "abortScaleDownDelaySeconds": 0,
                "steps": [
                    {"setWeight": 50},
                    {"analysis": {"templates": [{"templateName": "metadata"}]}},
                    {"setWeight": 100}
                ]
            }),
        ))
        .await
        .expect("Rollout accepted");
    let v1 = world
        .then_eventually(APP, "v1 Healthy", Duration::from_secs(30), |s| {
            s.is(RolloutPhase::Healthy) && s.stable_hash().is_some()
        })
        .await
        .stable_hash()
        .expect("v1 hash");

    world.when_image_changes(APP, "checkout:v2").await;
    let aborted = world
        .then_eventually_checking(
            APP,
            "v2 aborted by its refused analysis",
            Duration::from_secs(60),
            |s| {
                assert_eq!(listener.connections(), 0, "the listener was reached");
                assert_eq!(
                    s.stable_hash().as_deref(),
                    Some(v1.as_str()),
                    "v2 never becomes stable: {s:#?}"
                );
            },
            |s| s.is(RolloutPhase::Aborted),
        )
        .await;
    assert!(
        aborted.message().contains("is refused"),
        "the Rollout says why: {}",
        aborted.message()
    );

    let runs: Vec<AnalysisRun> = Api::<AnalysisRun>::namespaced(world.admin.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("list runs")
        .items;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let run = &runs[0];
    assert!(
        serin::controller::observe::is_controlled_by(run, &rollout.uid().unwrap_or_default()),
        "Serin created the run for the Rollout: {run:#?}"
    );
    let status = run.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!(r#"address "{address}" is refused"#))
            && message.contains("--allowed-destinations"),
        "{message}"
    );
    assert_eq!(
        expect_run_event(&world.admin, &run.name_any(), "DestinationRefused").await,
        message
    );
    assert_eq!(
        secret_reads(&world),
        0,
        "the refusal came before any Secret read"
    );
    let written = everything_written_about(&world.admin, &run.name_any()).await;
    assert!(!written.contains(TOKEN), "{written}");
    assert_eq!(listener.connections(), 0);
    world.stop().await;
}

/// A Prometheus stand-in on 127.0.0.1 answering healthy at `/api/v1/query`, plus the odd paths the tests
/// need; counts the queries it answered.
struct FakePrometheus {
    base: String,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePrometheus {
    async fn start(redirect_to: Option<String>) -> FakePrometheus {
        use axum::http::{header, StatusCode, Uri};
        use axum::response::IntoResponse;
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        let healthy = move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                ([(header::CONTENT_TYPE, "application/json")], HEALTHY_ANSWER).into_response()
            }
        };
        let elsewhere = redirect_to.unwrap_or_default();
        let app = axum::Router::new()
            .route("/api/v1/query", axum::routing::get(healthy))
            .route(
                "/moved/api/v1/query",
                axum::routing::get(|uri: Uri| async move {
                    let query = uri.query().unwrap_or_default().to_string();
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(header::LOCATION, format!("/api/v1/query?{query}"))],
                    )
                        .into_response()
                }),
            )
            .route(
                "/elsewhere/api/v1/query",
                axum::routing::get(move || {
                    let target = elsewhere.clone();
                    async move {
                        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, target)])
                            .into_response()
                    }
                }),
            )
            .route(
                "/huge/api/v1/query",
                axum::routing::get(|| async {
                    // About 16 MiB, streamed without a length, starting like a real answer.
                    let head = futures::stream::once(async {
                        Ok::<_, std::io::Error>(bytes::Bytes::from_static(
                            br#"{"status":"success","data":{"resultType":"vector","result":["#,
                        ))
                    });
                    let filler = futures::stream::iter((0..256).map(|_| {
                        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 * 1024]))
                    }));
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        axum::body::Body::from_stream(futures::StreamExt::chain(head, filler)),
                    )
                        .into_response()
                }),
            )
            .route(
                "/declared/api/v1/query",
                axum::routing::get(|| async {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        vec![b' '; 4 * 1024 * 1024],
                    )
                        .into_response()
                }),
            )
            .route(
                "/slow/api/v1/query",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    ([(header::CONTENT_TYPE, "application/json")], HEALTHY_ANSWER).into_response()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakePrometheus {
            base: format!("http://{address}"),
            queries,
            task,
        }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for FakePrometheus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tenant_run(name: &str, metric: Value) -> AnalysisRun {
    run_manifest(name, vec![metric], None)
}

/// One pass of the runner over a run, as the controller makes it.
async fn measure_once(run: &AnalysisRun, measurer: &Measurer) -> AnalysisRunStatus {
    advance(run, Timestamp::now(), measurer).await.status
}

fn measurer(outbound: OutboundConfig) -> Measurer {
    Measurer::new(
        PrometheusProvider::with_outbound(outbound),
        Arc::new(StaticSecrets::default()),
    )
}

fn only_message(status: &AnalysisRunStatus) -> String {
    status.metric_results[0].measurements[0]
        .message
        .clone()
        .unwrap_or_default()
}

#[tokio::test]
async fn an_allowed_address_is_queried_and_nothing_else() {
    let prometheus = FakePrometheus::start(None).await;
    let allowed = measurer(
        OutboundConfig::allowing([format!("127.0.0.1:{}", prometheus.port())])
            .expect("a valid destination"),
    );
    let status = measure_once(
        &tenant_run("allowed", metric("m", Some(&prometheus.base), false)),
        &allowed,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
    assert_eq!(prometheus.queries(), 1);

    // The same server on another port of the same host is another destination.
    let other = FakePrometheus::start(None).await;
    let status = measure_once(
        &tenant_run("other-port", metric("m", Some(&other.base), false)),
        &allowed,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    assert!(only_message(&status).contains("is refused"), "{status:#?}");
    assert_eq!(other.queries(), 0);
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_even_when_any_is_allowed() {
    let listener = Listener::start().await;
    let any = measurer(OutboundConfig::allowing(["any"]).expect("a valid destination"));
    let address = format!("http://localhost:{}", listener.address.port());
    let status = measure_once(
        &tenant_run("by-name", metric("m", Some(&address), false)),
        &any,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("is a loopback address"), "{message}");
    assert_eq!(listener.connections(), 0);
    assert_eq!(any.provider.queries_sent(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_without_address_queries_the_default_prometheus() {
    let prometheus = FakePrometheus::start(None).await;
    let world = World::without_controller().await;
    let client = world
        .sim
        .client_as(CONTROLLER_USER)
        .await
        .expect("controller client");
    // No destination listed: the operator's default address is allowed because the operator chose it.
    let config = RunnerConfig {
        default_prometheus_address: Some(prometheus.base.clone()),
        ..RunnerConfig::default()
    };
    let runner = runner::spawn(client, config);
    let runs: Api<AnalysisRun> = Api::namespaced(world.admin.clone(), NS);
    // The CRD accepts a metric without address.
    runs.create(
        &PostParams::default(),
        &tenant_run("defaulted", metric("m", None, false)),
    )
    .await
    .expect("a metric may omit its address");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = runs
            .get("defaulted")
            .await
            .expect("run exists")
            .status
            .unwrap_or_default();
        if status.phase.is_some_and(|p| p.is_completed()) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "run did not complete: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
    assert_eq!(prometheus.queries(), 1);
    runner.shutdown().await.expect("runner stops");
    world.stop().await;

    // Without a default, the run says where to set one.
    let status = measure_once(
        &tenant_run("no-default", metric("m", None, false)),
        &measurer(OutboundConfig::default()),
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Error));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("--default-prometheus-address")
            && message.contains("analysis.defaultPrometheusAddress"),
        "{message}"
    );
}

#[tokio::test]
async fn a_redirect_to_another_host_is_not_followed_but_one_within_the_origin_is() {
    let target = FakePrometheus::start(None).await;
    let redirector = FakePrometheus::start(Some(format!(
        "http://localhost:{}/api/v1/query?query=vector(0)",
        target.port()
    )))
    .await;
    // Both hosts are allowed: only the redirect rule can stop the second request.
    let both =
        measurer(OutboundConfig::allowing(["127.0.0.1", "localhost"]).expect("valid destinations"));
    let address = format!("{}/elsewhere", redirector.base);
    let status = measure_once(
        &tenant_run("redirected", metric("m", Some(&address), false)),
        &both,
    )
    .await;
    assert_ne!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
    let message = only_message(&status);
    assert!(
        message.contains(&format!(
            "redirected to localhost:{}, another host",
            target.port()
        )),
        "{message}"
    );
    assert_eq!(target.queries(), 0, "the other host was never asked");

    let moved = format!("{}/moved", redirector.base);
    let status = measure_once(
        &tenant_run("moved", metric("m", Some(&moved), false)),
        &both,
    )
    .await;
    assert_eq!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
    assert_eq!(redirector.queries(), 1);
}

#[tokio::test]
async fn a_huge_or_slow_answer_is_cut_off_with_a_clear_error() {
    let prometheus = FakePrometheus::start(None).await;
    let bounded = measurer(OutboundConfig {
        limits: Limits {
            max_response_bytes: 256 * 1024,
            max_request_time: Duration::from_secs(1),
        },
        ..OutboundConfig::allowing(["127.0.0.1"]).expect("a valid destination")
    });
    for path in ["/huge", "/declared"] {
        let address = format!("{}{path}", prometheus.base);
        let status = measure_once(
            &tenant_run("huge", metric("m", Some(&address), false)),
            &bounded,
        )
        .await;
        assert_ne!(status.phase, Some(AnalysisPhase::Successful), "{status:#?}");
        let message = only_message(&status);
        assert!(
            message.contains("is larger than 262144 bytes; Serin stopped reading it")
                && message.contains("--outbound-max-response-bytes"),
            "{path}: {message}"
        );
    }

    // The template asks for an hour; the operator's bound wins.
    let mut slow = metric("m", Some(&format!("{}/slow", prometheus.base)), false);
    slow["provider"]["prometheus"]["timeout"] = json!("1h");
    let started = Instant::now();
    let status = measure_once(&tenant_run("slow", slow), &bounded).await;
    let took = started.elapsed();
    let message = only_message(&status);
    assert!(message.contains("did not answer within 1s"), "{message}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
