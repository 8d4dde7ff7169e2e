//! The objects the demo applies: namespace `shop`, the two Services, the `http-health` AnalysisTemplate
//! and the `checkout` Rollout at each version (pure builders, no I/O).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use serin::crd::analysis::AnalysisTemplate;
use serin::crd::Rollout;

pub const NAMESPACE: &str = "shop";
pub const ROLLOUT: &str = "checkout";
pub const APP: &str = "checkout";
pub const STABLE_SERVICE: &str = "checkout";
pub const CANARY_SERVICE: &str = "checkout-canary";
pub const TEMPLATE: &str = "http-health";
pub const REPLICAS: i32 = 5;
/// The error-rate threshold of the built-in check.
pub const MAX_ERROR_RATE: f64 = 0.05;
/// The p99 latency threshold, in seconds.
pub const MAX_P99_SECONDS: f64 = 0.5;
/// The annotation the demo uses to tell versions apart at a glance (and to change the template).
pub const VERSION_ANNOTATION: &str = "demo.serin.dev/version";

/// A manifest that does not decode into its type (a bug in this file, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("the demo's {kind} manifest does not decode: {source}")]
pub struct ManifestError {
    pub kind: &'static str,
    #[source]
    pub source: serde_json::Error,
}

/// How fast the demo moves: analysis cadence and pause length.
#[derive(Clone, Debug, PartialEq)]
pub struct Pace {
    /// Wait before the first measurement of a run, so Prometheus has the new version's series.
    pub initial_delay: Duration,
    /// Time between measurements.
    pub interval: Duration,
    /// Measurements per analysis step.
    pub count: u32,
    /// Rate window of the built-in checks.
    pub window: Duration,
    /// The final pause step.
    pub pause: Duration,
}

impl Pace {
    /// The normal walkthrough: slow enough to read along.
    pub fn normal() -> Pace {
        Pace {
            initial_delay: Duration::from_secs(5),
            interval: Duration::from_secs(5),
            count: 3,
            window: Duration::from_secs(20),
            pause: Duration::from_secs(5),
        }
    }

    /// `--fast`: fewer, closer measurements and a short pause.
    pub fn fast() -> Pace {
        Pace {
            initial_delay: Duration::from_secs(3),
            interval: Duration::from_secs(2),
            count: 2,
            window: Duration::from_secs(10),
            pause: Duration::from_secs(2),
        }
    }
}

/// One version of the checkout service.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub name: &'static str,
    pub image: &'static str,
    /// Share of requests the simulated pods answer with 500.
    pub error_rate: Option<f64>,
}

pub const V1: Version = Version {
    name: "v1",
    image: "registry.example/shop/checkout:1.0.0",
    error_rate: None,
};
pub const V2: Version = Version {
    name: "v2",
    image: "registry.example/shop/checkout:2.0.0",
    error_rate: None,
};
pub const V3: Version = Version {
    name: "v3",
    image: "registry.example/shop/checkout:3.0.0",
    error_rate: Some(0.25),
};

fn decode<T: DeserializeOwned>(kind: &'static str, value: Value) -> Result<T, ManifestError> {
    serde_json::from_value(value).map_err(|source| ManifestError { kind, source })
}

fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs().max(1))
}

pub fn namespace() -> Result<Namespace, ManifestError> {
    decode(
        "Namespace",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
}

/// The stable Service carries all user traffic (100 requests per second in the simulator); the canary
/// Service gets none of its own, so every share the demo shows is a share of the same user traffic.
pub fn services() -> Result<Vec<Service>, ManifestError> {
    let service = |name: &str, requests_per_second: &str| {
        decode(
            "Service",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": name, "namespace": NAMESPACE, "labels": {"app": APP},
                    "annotations": {"sim.serin.dev/requests-per-second": requests_per_second}
                },
                "spec": {"selector": {"app": APP}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
            }),
        )
    };
    Ok(vec![
        service(STABLE_SERVICE, "100")?,
        service(CANARY_SERVICE, "0")?,
    ])
}

/// `http-health`: the built-in error-rate check (below 5%) and a p99 latency query (at most 0.5s), both
/// on the canary's pod-template hash.
pub fn analysis_template(
    prometheus_url: &str,
    pace: &Pace,
) -> Result<AnalysisTemplate, ManifestError> {
    let window = seconds(pace.window);
    let latency_query = format!(
        "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{namespace=\"{NAMESPACE}\",service=\"{{{{args.service}}}}\",pod_template_hash=\"{{{{args.canary-hash}}}}\"}}[{window}])))"
    );
    let timing = json!({
        "initialDelay": seconds(pace.initial_delay),
        "interval": seconds(pace.interval),
        "count": pace.count,
        "failureLimit": 0,
        "inconclusiveLimit": 1,
    });
    let metric = |name: &str, condition: String, prometheus: Value| {
        let mut metric = timing.clone();
        metric["name"] = json!(name);
        metric["successCondition"] = json!(condition);
        metric["provider"] = json!({"prometheus": prometheus});
        metric
    };
    decode(
        "AnalysisTemplate",
        json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "AnalysisTemplate",
            "metadata": {"name": TEMPLATE, "namespace": NAMESPACE},
            "spec": {
                "args": [{"name": "service"}, {"name": "canary-hash"}],
                "metrics": [
                    metric("error-rate", format!("result < {MAX_ERROR_RATE}"), json!({
                        "address": prometheus_url,
                        "check": {
                            "kind": "ErrorRate",
                            "service": "{{args.service}}",
                            "podTemplateHash": "{{args.canary-hash}}",
                            "namespace": NAMESPACE,
                            "window": window,
                        }
                    })),
                    metric("p99-latency", format!("result <= {MAX_P99_SECONDS}"), json!({
                        "address": prometheus_url,
                        "query": latency_query,
                    })),
                ]
            }
        }),
    )
}

/// The `checkout` Rollout running `version`: 5 replicas, canary 20% -> analysis -> 50% -> analysis -> 80%
/// -> pause 5s (2s with `--fast`), weights approximated by ready replicas behind the stable Service.
pub fn rollout(version: &Version, pace: &Pace) -> Result<Rollout, ManifestError> {
    let analysis = json!({"analysis": {
        "templates": [{"templateName": TEMPLATE}],
        "args": [
            {"name": "service", "value": APP},
            {"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}
        ]
    }});
    let mut annotations = serde_json::Map::new();
    annotations.insert(VERSION_ANNOTATION.into(), json!(version.name));
    if let Some(rate) = version.error_rate {
        annotations.insert("sim.serin.dev/error-rate".into(), json!(rate.to_string()));
    }
    decode(
        "Rollout",
        json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": ROLLOUT, "namespace": NAMESPACE},
            "spec": {
                "replicas": REPLICAS,
                "revisionHistoryLimit": 3,
                "progressDeadlineSeconds": 120,
                "selector": {"matchLabels": {"app": APP}},
                "template": {
                    "metadata": {"labels": {"app": APP}, "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": version.image}]}
                },
                "strategy": {"canary": {
                    "stableService": STABLE_SERVICE,
                    "canaryService": CANARY_SERVICE,
                    "abortScaleDownDelaySeconds": 5,
                    "scaleDownDelaySeconds": 5,
                    "steps": [
                        {"setWeight": 20},
                        analysis.clone(),
                        {"setWeight": 50},
                        analysis,
                        {"setWeight": 80},
                        {"pause": {"duration": seconds(pace.pause)}}
                    ]
                }}
            }
        }),
    )
}

/// The JSON merge patch that moves the Rollout to `version` (what `kubectl apply` of the edited manifest
/// would change).
pub fn template_patch(version: &Version, pace: &Pace) -> Result<Value, ManifestError> {
    let rollout = rollout(version, pace)?;
    let template =
        serde_json::to_value(&rollout.spec.template).map_err(|source| ManifestError {
            kind: "Rollout template",
            source,
        })?;
    let mut patch = json!({"spec": {"template": template}});
    // A merge patch keeps annotations it does not mention: remove the error rate explicitly.
    if version.error_rate.is_none() {
        patch["spec"]["template"]["metadata"]["annotations"]["sim.serin.dev/error-rate"] =
            Value::Null;
    }
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_manifest_decodes() {
        namespace().unwrap();
        assert_eq!(services().unwrap().len(), 2);
        let template = analysis_template("http://127.0.0.1:9090", &Pace::normal()).unwrap();
        assert_eq!(template.spec.metrics.len(), 2);
        for version in [V1, V2, V3] {
            let rollout = rollout(&version, &Pace::fast()).unwrap();
            assert_eq!(rollout.spec.replicas, Some(REPLICAS));
        }
    }

    #[test]
    fn the_latency_query_keeps_its_argument_placeholders() {
        let template = analysis_template("http://p:9090", &Pace::normal()).unwrap();
        let query = template.spec.metrics[1]
            .provider
            .prometheus
            .as_ref()
            .and_then(|p| p.query.clone())
            .unwrap();
        assert!(query.contains("service=\"{{args.service}}\""), "{query}");
        assert!(
            query.contains("pod_template_hash=\"{{args.canary-hash}}\""),
            "{query}"
        );
        assert!(query.contains("[20s]"), "{query}");
    }

    #[test]
    fn only_v3_answers_with_errors_and_the_patch_clears_the_error_rate() {
        let annotations = |version: &Version| {
            rollout(version, &Pace::normal())
                .unwrap()
                .spec
                .template
                .metadata
                .and_then(|m| m.annotations)
                .unwrap_or_default()
        };
        assert_eq!(
            annotations(&V3)
                .get("sim.serin.dev/error-rate")
                .map(String::as_str),
            Some("0.25")
        );
        assert!(!annotations(&V2).contains_key("sim.serin.dev/error-rate"));
        let patch = template_patch(&V2, &Pace::normal()).unwrap();
        assert!(
            patch["spec"]["template"]["metadata"]["annotations"]["sim.serin.dev/error-rate"]
                .is_null()
        );
        assert_eq!(
            patch["spec"]["template"]["spec"]["containers"][0]["image"],
            V2.image
        );
    }
}
