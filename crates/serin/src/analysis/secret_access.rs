//! Decides (pure) whether an AnalysisRun may make Serin read the Secrets it names.
//!
//! Anyone who may create an AnalysisRun could otherwise make Serin read any Secret of the namespace with
//! the controller's own rights and send it wherever the run says. So a run that names no Secret is measured
//! whoever made it, but one that names a Secret must:
//! - be controlled by a Rollout (a controller ownerReference of kind Rollout), which must exist in the
//!   run's own namespace with the uid the reference gives (a reference to a deleted or recreated Rollout
//!   vouches for nothing);
//! - name only Secrets that Rollout or the analysis templates it references name for the same use: a
//!   Secret-valued argument must be given that Secret by the Rollout or a template, under the same name;
//! - use Secrets only in metrics copied verbatim from those templates (same provider: address, query,
//!   credentials, headers, TLS), so a forged run cannot send a template's token elsewhere or build a query
//!   that turns a Secret's value into its result.
//!
//! Who writes a Rollout may already read the namespace's Secrets through the pods it creates, so its
//! templates add no power; Secrets need no opt-in label.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;

use super::args;
use super::run_spec::AnalysisRequest;
use crate::crd::analysis::{AnalysisRun, AnalysisRunSpec, AnalysisTemplateSpec, Metric};
use crate::crd::rollout::{AnalysisTemplateRef, RolloutStrategy, SecretKeyRef};
use crate::crd::Rollout;

/// The Rollout that controls a run, as read from the cluster, with the templates it references.
#[derive(Clone, Debug)]
pub struct RunOwner {
    pub rollout: Rollout,
    /// The templates (namespaced and cluster-wide) the Rollout's analyses reference that exist.
    pub templates: Vec<AnalysisTemplateSpec>,
}

/// Why a run may not read its Secrets. Messages name Secrets and keys, never values.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretAccessRefused {
    #[error(
        "AnalysisRun {run} names Secret {secret} in {field}, but no Rollout controls it: Serin reads \
         Secrets only for analysis runs it created for a Rollout (a controller ownerReference to a Rollout \
         in the same namespace); nothing was read or sent"
    )]
    NotOwned {
        run: String,
        field: String,
        secret: String,
    },
    #[error(
        "AnalysisRun {run} names Secret {secret} in {field}, but the Rollout {rollout} that controls it \
         does not exist in the run's namespace with uid {uid}; nothing was read or sent"
    )]
    OwnerMissing {
        run: String,
        field: String,
        secret: String,
        rollout: String,
        uid: String,
    },
    #[error(
        "AnalysisRun {run} names Secret {secret} in {field}, which neither Rollout {rollout} nor the \
         analysis templates it references give to that argument; nothing was read or sent"
    )]
    NotNamed {
        run: String,
        field: String,
        secret: String,
        rollout: String,
    },
    #[error(
        "AnalysisRun {run}: metric {metric:?} uses a Secret, but its provider is not a metric of the \
         analysis templates Rollout {rollout} references; nothing was read or sent"
    )]
    MetricNotInTemplates {
        run: String,
        metric: String,
        rollout: String,
    },
}

impl SecretAccessRefused {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SecretAccessRefused::NotOwned { .. } => "not_owned",
            SecretAccessRefused::OwnerMissing { .. } => "owner_missing",
            SecretAccessRefused::NotNamed { .. } => "not_named",
            SecretAccessRefused::MetricNotInTemplates { .. } => "metric_not_in_templates",
        }
    }
}

/// One Secret reference in a run, with the field that holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedSecret {
    pub field: String,
    pub secret: SecretKeyRef,
}

impl NamedSecret {
    fn describe(&self) -> String {
        format!("{}/{}", self.secret.name, self.secret.key)
    }
}

/// Every Secret a run's spec names, in spec order.
pub fn secret_refs(spec: &AnalysisRunSpec) -> Vec<NamedSecret> {
    let mut found = Vec::new();
    for (index, arg) in spec.args.iter().enumerate() {
        if let (None, Some(from)) = (&arg.value, &arg.value_from) {
            found.push(NamedSecret {
                field: format!("spec.args[{index}].valueFrom.secretKeyRef"),
                secret: from.secret_key_ref.clone(),
            });
        }
    }
    for (index, metric) in spec.metrics.iter().enumerate() {
        let Some(prometheus) = &metric.provider.prometheus else {
            continue;
        };
        let base = format!("spec.metrics[{index}].provider.prometheus");
        if let Some(auth) = &prometheus.authentication {
            if let Some(token) = &auth.bearer_token {
                found.push(NamedSecret {
                    field: format!("{base}.authentication.bearerToken"),
                    secret: token.clone(),
                });
            }
            if let Some(basic) = &auth.basic_auth {
                for (key, reference) in
                    [("username", &basic.username), ("password", &basic.password)]
                {
                    found.push(NamedSecret {
                        field: format!("{base}.authentication.basicAuth.{key}"),
                        secret: reference.clone(),
                    });
                }
            }
        }
        if let Some(ca) = prometheus.tls.as_ref().and_then(|tls| tls.ca.as_ref()) {
            found.push(NamedSecret {
                field: format!("{base}.tls.ca"),
                secret: ca.clone(),
            });
        }
    }
    found
}

/// The controller ownerReference to a Rollout, if the run has one.
pub fn controlling_rollout(run: &AnalysisRun) -> Option<&OwnerReference> {
    run.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| {
            owner.controller == Some(true)
                && owner.kind == "Rollout"
                && owner.api_version.starts_with("serin.dev/")
        })
}

/// Every analysis (templates and arguments) a strategy asks for.
pub fn analysis_requests(strategy: &RolloutStrategy) -> Vec<AnalysisRequest<'_>> {
    let mut requests = Vec::new();
    if let Some(canary) = &strategy.canary {
        requests.extend(canary.analysis.as_ref().map(AnalysisRequest::from));
        requests.extend(
            canary
                .steps
                .iter()
                .filter_map(|step| step.analysis.as_ref())
                .map(AnalysisRequest::from),
        );
    }
    if let Some(blue_green) = &strategy.blue_green {
        for analysis in [
            &blue_green.pre_promotion_analysis,
            &blue_green.post_promotion_analysis,
        ]
        .into_iter()
        .flatten()
        {
            requests.push(AnalysisRequest::from(analysis));
        }
    }
    requests
}

/// Every template a strategy references, each once.
pub fn template_refs(strategy: &RolloutStrategy) -> Vec<&AnalysisTemplateRef> {
    let mut refs: Vec<&AnalysisTemplateRef> = Vec::new();
    for request in analysis_requests(strategy) {
        for reference in request.templates {
            if !refs.contains(&reference) {
                refs.push(reference);
            }
        }
    }
    refs
}

/// Decides whether `run` may read the Secrets it names, given the Rollout its ownerReference points to as
/// found in the run's namespace (`None`: not found).
pub fn authorize(run: &AnalysisRun, owner: Option<&RunOwner>) -> Result<(), SecretAccessRefused> {
    let named = secret_refs(&run.spec);
    let Some(first) = named.first() else {
        return Ok(());
    };
    let run_name = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    let Some(reference) = controlling_rollout(run) else {
        return Err(SecretAccessRefused::NotOwned {
            run: run_name,
            field: first.field.clone(),
            secret: first.describe(),
        });
    };
    let owner = owner.filter(|owner| {
        owner.rollout.uid().as_deref() == Some(reference.uid.as_str())
            && owner.rollout.name_any() == reference.name
            && owner.rollout.namespace() == run.namespace()
    });
    let Some(owner) = owner else {
        return Err(SecretAccessRefused::OwnerMissing {
            run: run_name,
            field: first.field.clone(),
            secret: first.describe(),
            rollout: reference.name.clone(),
            uid: reference.uid.clone(),
        });
    };
    let rollout = owner.rollout.name_any();

    // (argument name, Secret) pairs the Rollout or its templates give.
    let mut given: Vec<(&str, &SecretKeyRef)> = Vec::new();
    for request in analysis_requests(&owner.rollout.spec.strategy) {
        for arg in request.args {
            let secret = arg
                .value_from
                .as_ref()
                .and_then(|from| from.secret_key_ref.as_ref());
            given.extend(secret.map(|secret| (arg.name.as_str(), secret)));
        }
    }
    for template in &owner.templates {
        for arg in &template.args {
            given.extend(
                arg.value_from
                    .as_ref()
                    .map(|from| (arg.name.as_str(), &from.secret_key_ref)),
            );
        }
    }
    let mut secret_args: BTreeSet<&str> = BTreeSet::new();
    for (index, arg) in run.spec.args.iter().enumerate() {
        let (None, Some(from)) = (&arg.value, &arg.value_from) else {
            continue;
        };
        if !given.contains(&(arg.name.as_str(), &from.secret_key_ref)) {
            return Err(SecretAccessRefused::NotNamed {
                run: run_name,
                field: format!("spec.args[{index}].valueFrom.secretKeyRef"),
                secret: format!("{}/{}", from.secret_key_ref.name, from.secret_key_ref.key),
                rollout,
            });
        }
        secret_args.insert(arg.name.as_str());
    }

    for metric in &run.spec.metrics {
        if !uses_secret(metric, &secret_args) {
            continue;
        }
        let in_templates = owner.templates.iter().any(|template| {
            template
                .metrics
                .iter()
                .any(|candidate| candidate.provider == metric.provider)
        });
        if !in_templates {
            return Err(SecretAccessRefused::MetricNotInTemplates {
                run: run_name,
                metric: metric.name.clone(),
                rollout,
            });
        }
    }
    Ok(())
}

/// What stands in for a Secret's value in anything Serin writes.
pub const REDACTED: &str = "<redacted>";

/// `text` with every Secret value (as written, and as escaped into a PromQL string) replaced by
/// [`REDACTED`]. A very short value takes every occurrence of its letters with it: unreadable beats leaked.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut forms: Vec<String> = secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .flat_map(|secret| [secret.clone(), args::escape_double_quoted(secret)])
        .collect();
    // Longest first, so a value containing another is replaced whole.
    forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
    forms.dedup();
    let mut out = text.to_string();
    for form in forms {
        if out.contains(&form) {
            out = out.replace(&form, REDACTED);
        }
    }
    out
}

/// Whether a metric reads a Secret: credentials, a CA, or a Secret-valued argument in its query or check.
pub fn uses_secret(metric: &Metric, secret_args: &BTreeSet<&str>) -> bool {
    let Some(prometheus) = &metric.provider.prometheus else {
        return false;
    };
    let credentials = prometheus
        .authentication
        .as_ref()
        .is_some_and(|auth| auth.bearer_token.is_some() || auth.basic_auth.is_some());
    let ca = prometheus.tls.as_ref().is_some_and(|tls| tls.ca.is_some());
    let mut texts: Vec<&str> = prometheus.query.iter().map(String::as_str).collect();
    if let Some(check) = &prometheus.check {
        texts.push(&check.service);
        texts.extend(check.pod_template_hash.as_deref());
        texts.extend(check.namespace.as_deref());
    }
    let in_text = texts.iter().any(|text| match args::referenced_names(text) {
        Ok(names) => names.iter().any(|name| secret_args.contains(name.as_str())),
        // A text that does not parse cannot be shown to stay clear of Secrets.
        Err(_) => !secret_args.is_empty(),
    });
    credentials || ca || in_text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::analysis::{
        MetricProvider, PrometheusAuthentication, PrometheusMetric, TemplateArgument,
        TemplateArgumentValueFrom,
    };
    use serde_json::json;

    fn secret(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    fn secret_arg(name: &str, from: SecretKeyRef) -> TemplateArgument {
        TemplateArgument {
            name: name.into(),
            value: None,
            value_from: Some(TemplateArgumentValueFrom {
                secret_key_ref: from,
            }),
        }
    }

    fn metric(name: &str, query: &str, token: Option<SecretKeyRef>) -> Metric {
        Metric {
            name: name.into(),
            success_condition: Some("result < 1".into()),
            provider: MetricProvider {
                prometheus: Some(PrometheusMetric {
                    address: "http://prometheus.monitoring:9090".into(),
                    query: Some(query.into()),
                    authentication: token.map(|token| PrometheusAuthentication {
                        bearer_token: Some(token),
                        basic_auth: None,
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }
    }

    fn template() -> AnalysisTemplateSpec {
        AnalysisTemplateSpec {
            args: vec![secret_arg("tenant", secret("prom", "tenant"))],
            metrics: vec![
                metric("errors", "up", Some(secret("prom", "token"))),
                metric("tenant", r#"up{tenant="{{args.tenant}}"}"#, None),
            ],
            dry_run: vec![],
        }
    }

    fn rollout(uid: &str) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": uid},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}},
                "strategy": {"canary": {
                    "analysis": {"templates": [{"templateName": "health"}],
                                 "args": [{"name": "extra", "valueFrom": {"secretKeyRef": {"name": "rollout-secret", "key": "k"}}}]},
                    "steps": [{"analysis": {"templates": [{"templateName": "health"}, {"templateName": "shared", "clusterScope": true}]}}]
                }}
            }
        }))
        .unwrap()
    }

    fn owner() -> RunOwner {
        RunOwner {
            rollout: rollout("uid-1"),
            templates: vec![template()],
        }
    }

    fn run(
        metrics: Vec<Metric>,
        args: Vec<TemplateArgument>,
        owned_by: Option<&str>,
    ) -> AnalysisRun {
        let mut run = AnalysisRun::new(
            "web-abc-1",
            AnalysisRunSpec {
                args,
                metrics,
                ..Default::default()
            },
        );
        run.metadata.namespace = Some("shop".into());
        run.metadata.owner_references = owned_by.map(|uid| {
            vec![OwnerReference {
                api_version: "serin.dev/v1alpha1".into(),
                kind: "Rollout".into(),
                name: "web".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]
        });
        run
    }

    #[test]
    fn a_run_without_secrets_needs_no_owner() {
        let plain = run(vec![metric("m", "up", None)], vec![], None);
        assert_eq!(authorize(&plain, None), Ok(()));
    }

    #[test]
    fn a_run_made_by_hand_may_not_read_secrets() {
        let tenant = run(
            vec![metric("errors", "up", Some(secret("prom", "token")))],
            vec![],
            None,
        );
        let refused = authorize(&tenant, Some(&owner())).unwrap_err();
        assert_eq!(refused.category(), "not_owned");
        let message = refused.to_string();
        assert!(message.contains("shop/web-abc-1"), "{message}");
        assert!(message.contains("prom/token"), "{message}");
        assert!(message.contains("authentication.bearerToken"), "{message}");
        // A non-controller reference, or one to another kind, vouches for nothing either.
        let mut weak = run(tenant.spec.metrics.clone(), vec![], Some("uid-1"));
        if let Some(owner) = weak
            .metadata
            .owner_references
            .as_mut()
            .and_then(|o| o.first_mut())
        {
            owner.controller = Some(false);
        }
        assert_eq!(
            authorize(&weak, Some(&owner())).unwrap_err().category(),
            "not_owned"
        );
    }

    #[test]
    fn the_owner_must_exist_with_the_referenced_uid() {
        let forged = run(
            vec![metric("errors", "up", Some(secret("prom", "token")))],
            vec![],
            Some("uid-of-a-deleted-rollout"),
        );
        assert_eq!(
            authorize(&forged, Some(&owner())).unwrap_err().category(),
            "owner_missing"
        );
        assert_eq!(
            authorize(&forged, None).unwrap_err().category(),
            "owner_missing"
        );
    }

    #[test]
    fn only_secrets_and_metrics_the_templates_name_are_used() {
        let good = run(
            template().metrics,
            vec![secret_arg("tenant", secret("prom", "tenant"))],
            Some("uid-1"),
        );
        assert_eq!(authorize(&good, Some(&owner())), Ok(()));
        // The Rollout's own analysis args may name a Secret too.
        let by_rollout = run(
            vec![],
            vec![secret_arg("extra", secret("rollout-secret", "k"))],
            Some("uid-1"),
        );
        assert_eq!(authorize(&by_rollout, Some(&owner())), Ok(()));

        let other_secret = run(
            template().metrics,
            vec![secret_arg("tenant", secret("db", "password"))],
            Some("uid-1"),
        );
        let refused = authorize(&other_secret, Some(&owner())).unwrap_err();
        assert_eq!(refused.category(), "not_named");
        assert!(refused.to_string().contains("db/password"), "{refused}");
        // The right Secret under another argument name is another use of it.
        let renamed = run(
            vec![],
            vec![secret_arg("x", secret("prom", "tenant"))],
            Some("uid-1"),
        );
        assert_eq!(
            authorize(&renamed, Some(&owner())).unwrap_err().category(),
            "not_named"
        );

        // The template's token sent to another address, or the Secret argument in a new query.
        let mut elsewhere = metric("errors", "up", Some(secret("prom", "token")));
        if let Some(p) = elsewhere.provider.prometheus.as_mut() {
            p.address = "http://prometheus.other:9090".into();
        }
        let refused =
            authorize(&run(vec![elsewhere], vec![], Some("uid-1")), Some(&owner())).unwrap_err();
        assert_eq!(refused.category(), "metric_not_in_templates");
        let oracle = metric(
            "guess",
            r#"count(label_replace(vector(1),"x","{{args.tenant}}","","") and {x=~"a.*"})"#,
            None,
        );
        let refused = authorize(
            &run(
                vec![oracle],
                vec![secret_arg("tenant", secret("prom", "tenant"))],
                Some("uid-1"),
            ),
            Some(&owner()),
        )
        .unwrap_err();
        assert_eq!(refused.category(), "metric_not_in_templates");
        // A metric that uses no Secret may be anything.
        let free = run(
            vec![metric("free", "vector(1)", None)],
            vec![secret_arg("tenant", secret("prom", "tenant"))],
            Some("uid-1"),
        );
        assert_eq!(authorize(&free, Some(&owner())), Ok(()));
    }

    #[test]
    fn secret_values_are_redacted_raw_and_escaped() {
        let secrets = vec!["s3cr\"et".to_string(), "tok".to_string(), String::new()];
        let text = r#"parse error near "s3cr\"et" and s3cr"et and token"#;
        assert_eq!(
            redact(text, &secrets),
            r#"parse error near "<redacted>" and <redacted> and <redacted>en"#
        );
        assert_eq!(redact("nothing here", &secrets), "nothing here");
    }

    #[test]
    fn every_template_the_strategy_references_is_listed_once() {
        let r = rollout("uid-1");
        let names: Vec<(&str, bool)> = template_refs(&r.spec.strategy)
            .iter()
            .map(|t| (t.template_name.as_str(), t.cluster_scope))
            .collect();
        assert_eq!(names, vec![("health", false), ("shared", true)]);
    }
}
