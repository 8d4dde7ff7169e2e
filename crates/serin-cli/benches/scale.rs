//! Scale benchmark and soak, with `serin sim` and `serin controller` as separate child processes of the
//! release build, so the controller's RSS and CPU (`/proc/<pid>/status` VmRSS, `/proc/<pid>/stat`
//! utime + stime) are its own. Writes come from the sim's request totals (`/sim/requests/counts`).
//! Numbers go to docs/benchmarks/scale.md; nothing here is a test.
//!
//! `make bench-scale` (= `cargo bench --bench scale`): N Rollouts (`SERIN_SCALE_ROLLOUTS`, default
//! 10,000) with 2 replicas and steps `setWeight 50, pause 1s`, no router, are created and settle to
//! Healthy; the controller idles (`SERIN_SCALE_IDLE_SECONDS`, default 60); then every image changes at
//! once and the wave runs until all are Healthy on the new revision. Prints one table.
//!
//! `make bench-soak` (= `SERIN_SCALE_MODE=soak cargo bench --bench scale`): `SERIN_SOAK_ROLLOUTS`
//! (default 300) Rollouts with an analysis step on a real Prometheus (a constant query: every fourth
//! update fails it and is rolled back) get new images in rotating batches for `SERIN_SOAK_SECONDS`
//! (default 600; hours work too) while the controller's RSS is sampled every 5 s; prints the slope
//! and the growth between the first and the last quarter, and exits 1 when that is 5% or more.
//!
//! Every wait is bounded (`SERIN_SCALE_TIMEOUT_SECONDS`, default 120 s + 0.1 s per Rollout) and says
//! what it waited for when it gives up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use serin::crd::{Rollout, RolloutPhase};

const NS: &str = "scale";
const CONTROLLER_USER: &str = "serin-controller";
const SERIN: &str = env!("CARGO_BIN_EXE_serin");
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(500);
const SOAK_SAMPLE: Duration = Duration::from_secs(5);
/// Growth between the first and last quarter of the soak's RSS samples that counts as not flat.
const SOAK_MAX_GROWTH: f64 = 0.05;

type Failure = String;

fn env_number(name: &str, default: u64) -> Result<u64, Failure> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The serin binary: this build's, or `SERIN_SCALE_SERIN` (sim mode, to measure another build's sim).
fn serin_binary() -> String {
    std::env::var("SERIN_SCALE_SERIN").unwrap_or_else(|_| SERIN.to_string())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU and memory of one child process, read from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_seconds: f64,
    rss_kib: u64,
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

fn usage(pid: u32, ticks: f64) -> Result<Usage, Failure> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e} (did the process exit?)"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are fixed.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("/proc/{pid}/stat is malformed"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the state (field 3).
    let tick = |index: usize| -> Result<f64, Failure> {
        fields
            .get(index)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat field {} unreadable", index + 3))
    };
    Ok(Usage {
        cpu_seconds: (tick(11)? + tick(12)?) / ticks,
        rss_kib,
    })
}

/// A child process killed (and reaped) when dropped, so a failed run leaves nothing behind.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, args: &[String], log: PathBuf) -> Result<Process, Failure> {
        let file =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let binary = serin_binary();
        let child = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(|e| format!("starting {binary} {}: {e}", args.join(" ")))?;
        Ok(Process { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of its log when the process is no longer running.
    fn check_alive(&mut self) -> Result<(), Failure> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Request totals from the sim, by (user, verb, resource).
#[derive(Clone, Debug, Default)]
struct Counts(BTreeMap<(String, String, String), u64>);

impl Counts {
    /// The controller's writes in `self` since `earlier`: (object writes, Event writes).
    fn controller_writes_since(&self, earlier: &Counts) -> (u64, u64) {
        let mut objects = 0;
        let mut events = 0;
        for ((user, verb, resource), count) in &self.0 {
            let is_write = matches!(
                verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            );
            if user != CONTROLLER_USER || !is_write {
                continue;
            }
            let before = earlier
                .0
                .get(&(user.clone(), verb.clone(), resource.clone()))
                .copied()
                .unwrap_or(0);
            let delta = count.saturating_sub(before);
            if resource == "events" {
                events += delta;
            } else {
                objects += delta;
            }
        }
        (objects, events)
    }

    /// The controller's requests of every verb since `earlier`, by verb and resource (for the log).
    fn controller_breakdown_since(&self, earlier: &Counts) -> Vec<String> {
        self.0
            .iter()
            .filter(|((user, _, _), _)| user == CONTROLLER_USER)
            .filter_map(|(key, count)| {
                let delta = count.saturating_sub(earlier.0.get(key).copied().unwrap_or(0));
                (delta > 0).then(|| format!("{} {}: {delta}", key.1, key.2))
            })
            .collect()
    }
}

async fn request_counts(client: &Client) -> Result<Counts, Failure> {
    let request = http::Request::get("/sim/requests/counts")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client
        .request_text(request)
        .await
        .map_err(|e| format!("GET /sim/requests/counts: {e}"))?;
    let body: Value =
        serde_json::from_str(&text).map_err(|e| format!("/sim/requests/counts: {e}"))?;
    let mut counts = BTreeMap::new();
    for item in body["items"].as_array().into_iter().flatten() {
        let field = |name: &str| item[name].as_str().unwrap_or_default().to_string();
        let key = (field("user"), field("verb"), field("resource"));
        *counts.entry(key).or_default() += item["count"].as_u64().unwrap_or(0);
    }
    Ok(Counts(counts))
}

/// The sim and controller processes, a client, and the Rollouts as a watch sees them.
struct Bench {
    dir: tempfile::TempDir,
    sim: Process,
    controller: Option<Process>,
    client: Client,
    base_url: String,
    rollouts: Store<Rollout>,
    ticks: f64,
}

/// Where all phases stood at one moment.
#[derive(Clone, Debug)]
struct Mark {
    at: Instant,
    controller: Usage,
    sim: Usage,
    counts: Counts,
}

impl Bench {
    /// Starts `serin sim` with `flags` (after `sim`), installs the CRDs and the namespace.
    async fn start(flags: &[&str]) -> Result<Bench, Failure> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let kubeconfig = dir.path().join("sim.kubeconfig");
        let mut args = vec![
            "sim".to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let sim = Process::spawn("serin sim", &args, dir.path().join("sim.log"))?;
        let mut bench_sim = sim;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !kubeconfig.is_file() {
            bench_sim.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "serin sim wrote no kubeconfig at {} within 30 s",
                    kubeconfig.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let loaded = Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?;
        let base_url = loaded
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.server.clone())
            .ok_or("the sim's kubeconfig names no server")?;
        let config = kube::Config::from_custom_kubeconfig(loaded, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("reading the sim's kubeconfig: {e}"))?;
        let client = Client::try_from(config).map_err(|e| e.to_string())?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in serin::crd::all() {
            crds.create(&PostParams::default(), &crd)
                .await
                .map_err(|e| format!("installing the CRDs: {e}"))?;
        }
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": NS}})).map_err(|e| e.to_string())?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|e| format!("creating namespace {NS}: {e}"))?;
        let (rollouts, writer) = reflector::store::<Rollout>();
        let watched: Api<Rollout> = Api::namespaced(client.clone(), NS);
        tokio::spawn(
            watcher(watched, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .for_each(|_| futures::future::ready(())),
        );
        Ok(Bench {
            dir,
            sim: bench_sim,
            controller: None,
            client,
            base_url,
            rollouts,
            ticks: clock_ticks_per_second(),
        })
    }

    /// Starts `serin controller` as its own user and waits until it watches Rollouts.
    async fn start_controller(&mut self, extra: &[String]) -> Result<(), Failure> {
        let kubeconfig = self.dir.path().join("controller.kubeconfig");
        std::fs::write(
            &kubeconfig,
            serin_sim::kubeconfig_yaml_as(&self.base_url, CONTROLLER_USER),
        )
        .map_err(|e| format!("writing {}: {e}", kubeconfig.display()))?;
        let mut args = vec![
            "controller".to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        args.extend_from_slice(extra);
        self.controller = Some(Process::spawn(
            "serin controller",
            &args,
            self.dir.path().join("controller.log"),
        )?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_alive()?;
            let counts = request_counts(&self.client).await?;
            let watching = counts
                .0
                .get(&(CONTROLLER_USER.into(), "watch".into(), "rollouts".into()))
                .copied()
                .unwrap_or(0);
            if watching > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("serin controller did not start watching Rollouts within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self) -> Result<(), Failure> {
        self.sim.check_alive()?;
        match self.controller.as_mut() {
            Some(controller) => controller.check_alive(),
            None => Ok(()),
        }
    }

    fn controller_pid(&self) -> Result<u32, Failure> {
        self.controller
            .as_ref()
            .map(Process::pid)
            .ok_or_else(|| "the controller is not running".to_string())
    }

    async fn mark(&mut self) -> Result<Mark, Failure> {
        self.check_alive()?;
        Ok(Mark {
            at: Instant::now(),
            controller: usage(self.controller_pid()?, self.ticks)?,
            sim: usage(self.sim.pid(), self.ticks)?,
            counts: request_counts(&self.client).await?,
        })
    }

    fn sim_usage(&mut self) -> Result<Usage, Failure> {
        self.sim.check_alive()?;
        usage(self.sim.pid(), self.ticks)
    }

    /// Waits until `count` Rollouts are Healthy at generation `generation` or later with nothing left
    /// to observe, printing progress; `what` names the wait in messages.
    async fn wait_healthy(
        &mut self,
        what: &str,
        count: usize,
        generation: i64,
        timeout: Duration,
    ) -> Result<Duration, Failure> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut next_report = started + PROGRESS_EVERY;
        loop {
            self.check_alive()?;
            let state = self.rollouts.state();
            let done = state.iter().filter(|r| is_settled(r, generation)).count();
            if done >= count {
                return Ok(started.elapsed());
            }
            let now = Instant::now();
            if now >= next_report {
                let controller = usage(self.controller_pid()?, self.ticks)?;
                let sim = usage(self.sim.pid(), self.ticks)?;
                println!(
                    "  {what}: {done}/{count} after {:.0} s; controller {:.0} MiB, {:.1} s CPU; sim {:.1} s CPU",
                    started.elapsed().as_secs_f64(),
                    mib(controller.rss_kib),
                    controller.cpu_seconds,
                    sim.cpu_seconds
                );
                next_report = now + PROGRESS_EVERY;
            }
            if now >= deadline {
                let waiting: Vec<String> = state
                    .iter()
                    .filter(|r| !is_settled(r, generation))
                    .take(3)
                    .map(|r| describe(r))
                    .collect();
                return Err(format!(
                    "{what}: only {done} of {count} Rollouts were Healthy at generation {generation} after {:.0} s (SERIN_SCALE_TIMEOUT_SECONDS); for example:\n  {}",
                    timeout.as_secs_f64(),
                    waiting.join("\n  ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn is_settled(rollout: &Rollout, generation: i64) -> bool {
    let current = rollout.metadata.generation.unwrap_or(0);
    let status = rollout.status.as_ref();
    current >= generation
        && status.and_then(|s| s.observed_generation) == Some(current)
        && status.and_then(|s| s.phase) == Some(RolloutPhase::Healthy)
}

fn describe(rollout: &Rollout) -> String {
    let status = rollout.status.as_ref();
    format!(
        "{}: generation {:?}, observed {:?}, phase {:?}, message {:?}",
        rollout.metadata.name.as_deref().unwrap_or("?"),
        rollout.metadata.generation,
        status.and_then(|s| s.observed_generation),
        status.and_then(|s| s.phase),
        status.and_then(|s| s.message.clone()),
    )
}

fn rollout_name(index: usize) -> String {
    format!("app-{index:05}")
}

fn rollout_object(name: &str, image: &str, steps: &Value) -> Result<Rollout, Failure> {
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": image}]}},
            "strategy": {"canary": {
                "stableService": name,
                "canaryService": format!("{name}-canary"),
                "steps": steps,
            }}
        }
    }))
    .map_err(|e| format!("rollout {name}: {e}"))
}

/// Runs `work` over `0..count` with `concurrency` requests in flight; the first error ends the run.
async fn for_each_index<F, Fut>(count: usize, concurrency: usize, work: F) -> Result<(), Failure>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let mut results = futures::stream::iter(0..count)
        .map(work)
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

async fn create_services(client: &Client, count: usize, concurrency: usize) -> Result<(), Failure> {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    for_each_index(count, concurrency, |index| {
        let services = services.clone();
        async move {
            let name = rollout_name(index);
            for service in [name.clone(), format!("{name}-canary")] {
                let object: Service = serde_json::from_value(json!({
                    "metadata": {"name": service, "namespace": NS},
                    "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}
                }))
                .map_err(|e| e.to_string())?;
                services
                    .create(&PostParams::default(), &object)
                    .await
                    .map_err(|e| format!("creating Service {service}: {e}"))?;
            }
            Ok(())
        }
    })
    .await
}

async fn create_rollouts(
    client: &Client,
    count: usize,
    concurrency: usize,
    steps: &Value,
) -> Result<(), Failure> {
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), NS);
    for_each_index(count, concurrency, |index| {
        let rollouts = rollouts.clone();
        async move {
            let name = rollout_name(index);
            let object = rollout_object(&name, "app:1", steps)?;
            rollouts
                .create(&PostParams::default(), &object)
                .await
                .map_err(|e| format!("creating Rollout {name}: {e}"))?;
            Ok(())
        }
    })
    .await
}

async fn patch_rollout(rollouts: &Api<Rollout>, name: &str, spec: Value) -> Result<(), Failure> {
    rollouts
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("patching Rollout {name}: {e}"))
}

fn image_spec(image: &str) -> Value {
    json!({"template": {"spec": {"containers": [{"name": "app", "image": image}]}}})
}

/// Timed GETs of single Rollouts while a phase runs: how fast the sim answers under that load.
#[derive(Default)]
struct GetLatency(Vec<Duration>);

impl GetLatency {
    async fn sample(&mut self, client: &Client, count: usize) {
        let rollouts: Api<Rollout> = Api::namespaced(client.clone(), NS);
        let name = rollout_name(self.0.len().wrapping_mul(7919) % count.max(1));
        let started = Instant::now();
        if rollouts.get(&name).await.is_ok() {
            self.0.push(started.elapsed());
        }
    }

    fn summary(&self) -> String {
        let mut sorted = self.0.clone();
        sorted.sort();
        if sorted.is_empty() {
            return "-".into();
        }
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        format!(
            "p50 {:.1} ms, max {:.1} ms ({} GETs)",
            at(0.5).as_secs_f64() * 1e3,
            at(1.0).as_secs_f64() * 1e3,
            sorted.len()
        )
    }
}

struct Settings {
    rollouts: usize,
    idle: Duration,
    timeout: Duration,
    concurrency: usize,
}

impl Settings {
    fn from_env() -> Result<Settings, Failure> {
        let rollouts = env_number("SERIN_SCALE_ROLLOUTS", 10_000)? as usize;
        if rollouts == 0 {
            return Err("SERIN_SCALE_ROLLOUTS must be at least 1".into());
        }
        let default_timeout = 120 + rollouts as u64 / 10;
        Ok(Settings {
            rollouts,
            idle: Duration::from_secs(env_number("SERIN_SCALE_IDLE_SECONDS", 60)?),
            timeout: Duration::from_secs(env_number(
                "SERIN_SCALE_TIMEOUT_SECONDS",
                default_timeout,
            )?),
            concurrency: env_number("SERIN_SCALE_CONCURRENCY", 32)? as usize,
        })
    }
}

/// Waits `duration` while sampling GET latency; fails if a process exits meanwhile.
async fn idle_for(
    bench: &mut Bench,
    duration: Duration,
    latency: &mut GetLatency,
    count: usize,
) -> Result<(), Failure> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        bench.check_alive()?;
        latency.sample(&bench.client, count).await;
        tokio::time::sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
    Ok(())
}

/// Waits for the wave, sampling GET latency alongside.
async fn wait_sampling(
    bench: &mut Bench,
    what: &str,
    count: usize,
    generation: i64,
    timeout: Duration,
    latency: &mut GetLatency,
) -> Result<Duration, Failure> {
    let client = bench.client.clone();
    let stop = Arc::new(tokio::sync::Notify::new());
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut local = GetLatency::default();
            loop {
                local.sample(&client, count).await;
                tokio::select! {
                    _ = stop.notified() => return local,
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        })
    };
    let waited = bench.wait_healthy(what, count, generation, timeout).await;
    stop.notify_one();
    if let Ok(local) = sampler.await {
        latency.0.extend(local.0);
    }
    waited
}

struct Row {
    label: &'static str,
    value: String,
}

async fn scale(settings: Settings) -> Result<(), Failure> {
    let n = settings.rollouts;
    println!(
        "scale benchmark: {n} Rollouts, 2 replicas, steps setWeight 50 / pause 1s, no router; serin = {}",
        serin_binary()
    );
    let mut bench = Bench::start(&["--admin", "--no-traffic"]).await?;
    bench.start_controller(&[]).await?;
    let steps = json!([{"setWeight": 50}, {"pause": {"duration": "1s"}}]);

    println!("creating {n} x 2 Services");
    create_services(&bench.client, n, settings.concurrency).await?;
    println!("creating {n} Rollouts");
    let start = bench.mark().await?;
    let mut settle_latency = GetLatency::default();
    create_rollouts(&bench.client, n, settings.concurrency, &steps).await?;
    let created = start.at.elapsed();
    let settle_time = wait_sampling(
        &mut bench,
        "settle",
        n,
        1,
        settings.timeout,
        &mut settle_latency,
    )
    .await?
        + created;
    let settled = bench.mark().await?;

    println!("idle for {} s", settings.idle.as_secs());
    let mut idle_latency = GetLatency::default();
    idle_for(&mut bench, settings.idle, &mut idle_latency, n).await?;
    let idled = bench.mark().await?;

    println!("changing every image at once");
    let rollouts: Api<Rollout> = Api::namespaced(bench.client.clone(), NS);
    let mut wave_latency = GetLatency::default();
    let wave_start = bench.mark().await?;
    for_each_index(n, settings.concurrency, |index| {
        let rollouts = rollouts.clone();
        async move { patch_rollout(&rollouts, &rollout_name(index), image_spec("app:2")).await }
    })
    .await?;
    let patched = wave_start.at.elapsed();
    let wave_time = wait_sampling(
        &mut bench,
        "update wave",
        n,
        2,
        settings.timeout,
        &mut wave_latency,
    )
    .await?
        + patched;
    let waved = bench.mark().await?;

    let per = |writes: u64| writes as f64 / n as f64;
    let (settle_writes, settle_events) = settled.counts.controller_writes_since(&start.counts);
    let (idle_writes, idle_events) = idled.counts.controller_writes_since(&settled.counts);
    let (wave_writes, wave_events) = waved.counts.controller_writes_since(&wave_start.counts);
    let settle_cpu = settled.controller.cpu_seconds - start.controller.cpu_seconds;
    let idle_cpu = idled.controller.cpu_seconds - settled.controller.cpu_seconds;
    let wave_cpu = waved.controller.cpu_seconds - wave_start.controller.cpu_seconds;
    let rows = [
        Row {
            label: "Rollouts",
            value: n.to_string(),
        },
        Row {
            label: "settle: created -> all Healthy",
            value: format!(
                "{:.1} s ({:.1} s of it creating), controller CPU {settle_cpu:.1} s = {:.2} ms per Rollout",
                settle_time.as_secs_f64(),
                created.as_secs_f64(),
                settle_cpu * 1e3 / n as f64
            ),
        },
        Row {
            label: "settle: controller writes",
            value: format!(
                "{settle_writes} ({:.2} per Rollout) + {settle_events} Events",
                per(settle_writes)
            ),
        },
        Row {
            label: "controller RSS after settling",
            value: format!("{:.1} MiB", mib(settled.controller.rss_kib)),
        },
        Row {
            label: "idle",
            value: format!(
                "{} s: controller CPU {idle_cpu:.2} s, {idle_writes} writes + {idle_events} Events",
                settings.idle.as_secs()
            ),
        },
        Row {
            label: "update wave: all Healthy on the new revision",
            value: format!(
                "{:.1} s ({:.1} s of it patching), controller CPU {wave_cpu:.1} s = {:.2} ms per Rollout",
                wave_time.as_secs_f64(),
                patched.as_secs_f64(),
                wave_cpu * 1e3 / n as f64
            ),
        },
        Row {
            label: "update wave: controller writes",
            value: format!(
                "{wave_writes} = {:.2} per Rollout + {wave_events} Events",
                per(wave_writes)
            ),
        },
        Row {
            label: "controller RSS after the wave",
            value: format!("{:.1} MiB", mib(waved.controller.rss_kib)),
        },
        Row {
            label: "sim CPU settle / idle / wave",
            value: format!(
                "{:.1} s / {:.2} s / {:.1} s; RSS after the wave {:.0} MiB",
                settled.sim.cpu_seconds - start.sim.cpu_seconds,
                idled.sim.cpu_seconds - settled.sim.cpu_seconds,
                waved.sim.cpu_seconds - wave_start.sim.cpu_seconds,
                mib(waved.sim.rss_kib)
            ),
        },
        Row {
            label: "sim GET of one Rollout: settle",
            value: settle_latency.summary(),
        },
        Row {
            label: "sim GET of one Rollout: idle",
            value: idle_latency.summary(),
        },
        Row {
            label: "sim GET of one Rollout: wave",
            value: wave_latency.summary(),
        },
    ];
    println!("\n| measure | result |\n|---|---|");
    for row in &rows {
        println!("| {} | {} |", row.label, row.value);
    }
    println!(
        "\ncontroller requests during the wave: {}",
        waved
            .counts
            .controller_breakdown_since(&wave_start.counts)
            .join(", ")
    );
    Ok(())
}

/// Updates each Rollout goes through before RSS is sampled: by then it keeps as many old ReplicaSets
/// (revisionHistoryLimit 2) and old AnalysisRuns (5) as it ever will, and the caches hold the whole
/// history the cluster keeps. Memory that grows before is the cluster's state growing, not the
/// controller.
const SOAK_UPDATES_BEFORE_SAMPLING: u32 = 7;

/// The soak's warm-up: a tenth of the run, and at least the time every Rollout takes to get
/// [`SOAK_UPDATES_BEFORE_SAMPLING`] updates.
fn soak_warm_up(settings: &SoakSettings, rollouts: usize) -> Duration {
    let passes = rollouts.div_ceil(settings.batch.max(1));
    let history = settings.interval * (passes as u32).saturating_mul(SOAK_UPDATES_BEFORE_SAMPLING);
    history.max(settings.duration / 10)
}

struct SoakSettings {
    rollouts: usize,
    duration: Duration,
    interval: Duration,
    batch: usize,
    timeout: Duration,
    concurrency: usize,
}

impl SoakSettings {
    fn from_env() -> Result<SoakSettings, Failure> {
        let rollouts = env_number("SERIN_SOAK_ROLLOUTS", 300)? as usize;
        if rollouts == 0 {
            return Err("SERIN_SOAK_ROLLOUTS must be at least 1".into());
        }
        Ok(SoakSettings {
            rollouts,
            duration: Duration::from_secs(env_number("SERIN_SOAK_SECONDS", 600)?),
            interval: Duration::from_secs(env_number("SERIN_SOAK_INTERVAL_SECONDS", 3)?.max(1)),
            batch: (env_number("SERIN_SOAK_BATCH", (rollouts as u64 / 10).max(1))? as usize)
                .clamp(1, rollouts),
            timeout: Duration::from_secs(env_number(
                "SERIN_SCALE_TIMEOUT_SECONDS",
                120 + rollouts as u64 / 10,
            )?),
            concurrency: env_number("SERIN_SCALE_CONCURRENCY", 32)? as usize,
        })
    }
}

/// An AnalysisTemplate whose one measurement is a constant: `vector(0)` passes, `vector(1)` fails.
fn constant_template(
    name: &str,
    value: u8,
) -> Result<serin::crd::analysis::AnalysisTemplate, Failure> {
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"metrics": [{
            "name": "constant",
            "interval": "1s",
            "count": 1,
            "successCondition": "result < 0.5",
            "provider": {"prometheus": {"query": format!("vector({value})")}}
        }]}
    }))
    .map_err(|e| format!("template {name}: {e}"))
}

fn soak_steps(template: &str) -> Value {
    json!([
        {"setWeight": 50},
        {"analysis": {"templates": [{"templateName": template}]}},
        {"pause": {"duration": "1s"}}
    ])
}

/// Least-squares slope of (seconds, MiB) samples, in MiB per hour.
fn slope_mib_per_hour(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let covariance: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 - mean_m))
        .sum();
    let variance: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance * 3600.0
    }
}

fn mean(values: &[(f64, f64)]) -> f64 {
    values.iter().map(|s| s.1).sum::<f64>() / values.len().max(1) as f64
}

async fn soak(settings: SoakSettings) -> Result<(), Failure> {
    let n = settings.rollouts;
    let prometheus = serin_sim::prometheus::PrometheusServer::start(
        &[],
        &serin_sim::prometheus::PrometheusOptions::default(),
    )
    .await
    .map_err(|e| format!("starting Prometheus (scripts/install-deps.sh installs it): {e}"))?;
    println!(
        "soak: {n} Rollouts, a batch of {} gets a new image every {} s for {} s; every fourth update fails analysis (Prometheus {})",
        settings.batch,
        settings.interval.as_secs(),
        settings.duration.as_secs(),
        prometheus.url()
    );
    let mut bench = Bench::start(&["--admin", "--no-traffic"]).await?;
    bench
        .start_controller(&[
            "--default-prometheus-address".into(),
            prometheus.url().to_string(),
        ])
        .await?;
    let templates: Api<serin::crd::analysis::AnalysisTemplate> =
        Api::namespaced(bench.client.clone(), NS);
    for (name, value) in [("pass", 0), ("fail", 1)] {
        templates
            .create(&PostParams::default(), &constant_template(name, value)?)
            .await
            .map_err(|e| format!("creating AnalysisTemplate {name}: {e}"))?;
    }
    create_services(&bench.client, n, settings.concurrency).await?;
    create_rollouts(&bench.client, n, settings.concurrency, &soak_steps("pass")).await?;
    bench
        .wait_healthy("soak settle", n, 1, settings.timeout)
        .await?;

    let rollouts: Api<Rollout> = Api::namespaced(bench.client.clone(), NS);
    let started = Instant::now();
    let warm_up = soak_warm_up(&settings, n);
    if settings.duration < warm_up * 2 {
        return Err(format!(
            "a soak of {} s cannot measure after its {} s warm-up: run it for at least {} s, or update more \
             Rollouts at a time (SERIN_SOAK_BATCH)",
            settings.duration.as_secs(),
            warm_up.as_secs(),
            (warm_up * 2).as_secs()
        ));
    }
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut next_batch = started;
    let mut next_sample = started;
    let mut updates = 0usize;
    let mut cursor = 0usize;
    let pid = bench.controller_pid()?;
    while started.elapsed() < settings.duration {
        bench.check_alive()?;
        let now = Instant::now();
        if now >= next_batch {
            for _ in 0..settings.batch {
                let index = cursor % n;
                cursor += 1;
                updates += 1;
                let template = if updates.is_multiple_of(4) {
                    "fail"
                } else {
                    "pass"
                };
                let mut spec = image_spec(&format!("app:{}", updates + 1));
                spec["strategy"] = json!({"canary": {"steps": soak_steps(template)}});
                patch_rollout(&rollouts, &rollout_name(index), spec).await?;
            }
            next_batch += settings.interval;
        }
        if now >= next_sample {
            let elapsed = started.elapsed();
            let current = usage(pid, bench.ticks)?;
            if elapsed >= warm_up {
                samples.push((elapsed.as_secs_f64(), mib(current.rss_kib)));
            }
            println!(
                "  {:>6.0} s: controller {:.1} MiB, {:.1} s CPU; {updates} updates",
                elapsed.as_secs_f64(),
                mib(current.rss_kib),
                current.cpu_seconds
            );
            next_sample += SOAK_SAMPLE;
        }
        let wake = next_batch.min(next_sample);
        tokio::time::sleep(wake.saturating_duration_since(Instant::now())).await;
    }
    let phases =
        bench
            .rollouts
            .state()
            .iter()
            .fold(BTreeMap::<String, usize>::new(), |mut phases, r| {
                let phase = r
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .map_or("none".to_string(), |p| format!("{p:?}"));
                *phases.entry(phase).or_default() += 1;
                phases
            });
    let runs = Api::<serin::crd::analysis::AnalysisRun>::namespaced(bench.client.clone(), NS)
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| format!("listing AnalysisRuns: {e}"))?
        .items
        .len();
    let quarter = samples.len() / 4;
    if quarter == 0 {
        return Err(format!(
            "only {} RSS samples after the warm-up: run the soak for at least {} s",
            samples.len(),
            SOAK_SAMPLE.as_secs() * 40
        ));
    }
    let first = mean(&samples[..quarter]);
    let last = mean(&samples[samples.len() - quarter..]);
    let growth = (last - first) / first;
    let slope = slope_mib_per_hour(&samples);
    println!("\n| measure | result |\n|---|---|");
    println!(
        "| soak | {} s, {updates} image changes over {n} Rollouts (every fourth fails analysis), {} RSS samples after a {} s warm-up |",
        settings.duration.as_secs(),
        samples.len(),
        warm_up.as_secs()
    );
    println!("| Rollout phases at the end | {phases:?}; {runs} AnalysisRuns stored |");
    println!("| controller RSS, first quarter / last quarter | {first:.1} MiB / {last:.1} MiB |");
    println!(
        "| growth | {:+.2}% (limit {:.0}%) |",
        growth * 100.0,
        SOAK_MAX_GROWTH * 100.0
    );
    println!("| slope | {slope:+.2} MiB per hour |");
    drop(prometheus);
    if growth >= SOAK_MAX_GROWTH {
        return Err(format!(
            "controller RSS grew {:.1}% between the first and last quarter of the soak",
            growth * 100.0
        ));
    }
    Ok(())
}

fn replicaset_object(name: &str, replicas: i32) -> Result<ReplicaSet, Failure> {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
        }
    }))
    .map_err(|e| format!("replicaset {name}: {e}"))
}

/// Waits until every ReplicaSet in `store` reports `replicas` ready pods.
async fn wait_replicasets_ready(
    bench: &mut Bench,
    store: &Store<ReplicaSet>,
    count: usize,
    replicas: i32,
    timeout: Duration,
) -> Result<Duration, Failure> {
    let started = Instant::now();
    loop {
        bench.sim_usage()?;
        let ready = store
            .state()
            .iter()
            .filter(|rs| {
                rs.status.as_ref().and_then(|s| s.ready_replicas) == Some(replicas)
                    && rs.status.as_ref().map(|s| s.replicas) == Some(replicas)
            })
            .count();
        if ready >= count {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "only {ready} of {count} ReplicaSets had {replicas} ready pods after {:.0} s",
                timeout.as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The simulated cluster alone, as plain `serin sim` (traffic simulator on, no Services): N
/// ReplicaSets of 3 pods made ready, an idle minute, then every ReplicaSet scaled to 2 at once. Runs
/// against any build's `serin` (`SERIN_SCALE_SERIN`), for before/after numbers of the sim.
async fn sim_only(settings: Settings) -> Result<(), Failure> {
    let n = settings.rollouts;
    println!(
        "sim benchmark: {n} ReplicaSets x 3 pods; serin = {}",
        serin_binary()
    );
    let mut bench = Bench::start(&[]).await?;
    let api: Api<ReplicaSet> = Api::namespaced(bench.client.clone(), NS);
    let (store, writer) = reflector::store::<ReplicaSet>();
    tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
    );
    let before = bench.sim_usage()?;
    let started = Instant::now();
    for_each_index(n, settings.concurrency, |index| {
        let api = api.clone();
        async move {
            let name = rollout_name(index);
            api.create(&PostParams::default(), &replicaset_object(&name, 3)?)
                .await
                .map(|_| ())
                .map_err(|e| format!("creating ReplicaSet {name}: {e}"))
        }
    })
    .await?;
    let created = started.elapsed();
    let ready = wait_replicasets_ready(&mut bench, &store, n, 3, settings.timeout).await? + created;
    let filled = bench.sim_usage()?;
    let mut idle_latency = GetLatency::default();
    let idle_started = Instant::now();
    while idle_started.elapsed() < settings.idle {
        bench.sim_usage()?;
        let started = Instant::now();
        let name = rollout_name(idle_latency.0.len().wrapping_mul(7919) % n);
        if api.get(&name).await.is_ok() {
            idle_latency.0.push(started.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
    let idled = bench.sim_usage()?;
    let wave_started = Instant::now();
    for_each_index(n, settings.concurrency, |index| {
        let api = api.clone();
        async move {
            let name = rollout_name(index);
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("scaling ReplicaSet {name}: {e}"))
        }
    })
    .await?;
    let scaled = wait_replicasets_ready(&mut bench, &store, n, 2, settings.timeout).await?
        + wave_started.elapsed();
    let waved = bench.sim_usage()?;
    println!("\n| measure | result |\n|---|---|");
    println!(
        "| {n} ReplicaSets created, {} pods ready | {:.1} s, sim CPU {:.1} s, sim RSS {:.0} MiB |",
        n * 3,
        ready.as_secs_f64(),
        filled.cpu_seconds - before.cpu_seconds,
        mib(filled.rss_kib)
    );
    println!(
        "| idle {} s | sim CPU {:.2} s; GET of one ReplicaSet {} |",
        settings.idle.as_secs(),
        idled.cpu_seconds - filled.cpu_seconds,
        idle_latency.summary()
    );
    println!(
        "| every ReplicaSet scaled 3 -> 2 at once | {:.1} s, sim CPU {:.1} s |",
        scaled.as_secs_f64(),
        waved.cpu_seconds - idled.cpu_seconds
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    serin_sim::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mode = std::env::var("SERIN_SCALE_MODE").unwrap_or_else(|_| "scale".into());
    let outcome = runtime.block_on(async {
        match mode.as_str() {
            "scale" => scale(Settings::from_env()?).await,
            "soak" => soak(SoakSettings::from_env()?).await,
            "sim" => sim_only(Settings::from_env()?).await,
            other => Err(format!(
                "SERIN_SCALE_MODE={other:?}: expected scale, soak or sim"
            )),
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("bench failed: {failure}");
            std::process::ExitCode::FAILURE
        }
    }
}
