//! Decides the pod-template hash: the stable, DNS-safe name suffix of a template's ReplicaSet.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::crd::labels::POD_TEMPLATE_HASH;
use crate::crd::PodTemplate;

/// Consonants and digits only, as Kubernetes uses for generated names, so no hash spells a word.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const HASH_LEN: usize = 10;

/// The hash of a pod template: sha256 of its canonical JSON (keys sorted, without the hash label itself),
/// the first 10 characters in a DNS-safe alphabet. Stable across runs and Serin versions that do not
/// change the template's JSON shape. A template whose pod spec the controller's cache dropped answers the
/// hash it had before.
pub fn pod_template_hash(template: &PodTemplate) -> String {
    if let Some(hash) = elided_hash(template) {
        return hash.to_string();
    }
    let mut template = template.clone();
    if let Some(labels) = template
        .metadata
        .as_mut()
        .and_then(|meta| meta.labels.as_mut())
    {
        labels.remove(POD_TEMPLATE_HASH);
    }
    // Serializing k8s-openapi types cannot fail (string keys only); the Debug text is a deterministic
    // fallback that keeps this function total.
    let canonical = canonical_json(&template).unwrap_or_else(|| format!("{template:?}"));
    short_digest(&canonical)
}

/// The hash a template without its pod spec carries, or None when it is whole.
pub fn elided_hash(template: &PodTemplate) -> Option<&str> {
    match template.spec {
        Some(_) => None,
        None => template.elided_hash.as_deref(),
    }
}

/// Drops a template's pod spec (the bulk of a Rollout in memory), keeping its metadata and its hash, which
/// is all a reconcile reads of it until it creates a ReplicaSet.
pub fn elide_pod_spec(template: &mut PodTemplate) {
    if template.spec.is_none() {
        return;
    }
    template.elided_hash = Some(pod_template_hash(template));
    template.spec = None;
}

/// The hash of a canary's steps, kept in status: when it changes mid-rollout the steps start again, since a
/// step index means nothing in another list of steps.
pub fn steps_hash(steps: &[crate::crd::rollout::CanaryStep]) -> String {
    let canonical = canonical_json(&steps).unwrap_or_else(|| format!("{steps:?}"));
    short_digest(&canonical)
}

fn canonical_json(value: &impl serde::Serialize) -> Option<String> {
    let value = serde_json::to_value(value).ok()?;
    let mut out = String::new();
    write_canonical(&value, &mut out);
    Some(out)
}

fn short_digest(canonical: &str) -> String {
    let digest = Sha256::digest(canonical.as_bytes());
    digest
        .iter()
        .take(HASH_LEN)
        .map(|byte| SAFE_ALPHABET[usize::from(*byte) % SAFE_ALPHABET.len()] as char)
        .collect()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(*key) {
                    write_canonical(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(image: &str, extra_label: Option<(&str, &str)>) -> PodTemplate {
        let mut labels = serde_json::json!({"app": "checkout"});
        if let Some((k, v)) = extra_label {
            labels[k] = Value::String(v.to_string());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": image}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_elided_template_keeps_its_hash_and_metadata_and_drops_its_pod_spec() {
        let full = template("app:1", None);
        let mut elided = full.clone();
        elide_pod_spec(&mut elided);
        assert!(elided.spec.is_none());
        assert_eq!(pod_template_hash(&elided), pod_template_hash(&full));
        assert_eq!(
            elided_hash(&elided),
            Some(pod_template_hash(&full).as_str())
        );
        let labels = elided.metadata.as_ref().and_then(|m| m.labels.clone());
        assert_eq!(
            labels,
            full.metadata.as_ref().and_then(|m| m.labels.clone())
        );
        let again = elided.clone();
        elide_pod_spec(&mut elided);
        assert_eq!(elided, again);
        // Another template elided gets its own hash.
        let mut other = template("app:2", None);
        elide_pod_spec(&mut other);
        assert_ne!(pod_template_hash(&other), pod_template_hash(&elided));
    }

    #[test]
    fn a_whole_template_is_hashed_whole_whatever_it_was_given() {
        let mut full = template("app:1", None);
        full.elided_hash = Some("bcdfghjklm".to_string());
        assert_eq!(elided_hash(&full), None);
        assert_ne!(pod_template_hash(&full), "bcdfghjklm");
        assert_eq!(
            pod_template_hash(&full),
            pod_template_hash(&template("app:1", None))
        );
    }

    #[test]
    fn the_hash_of_a_template_is_the_hash_of_its_json_as_before() {
        // Serin before the template had a type of its own hashed k8s-openapi's PodTemplateSpec; the same
        // JSON must give the same hash, or every Rollout would start a new revision on upgrade.
        let spec: k8s_openapi::api::core::v1::PodTemplateSpec =
            serde_json::from_value(serde_json::json!({
                "metadata": {"labels": {"app": "checkout"}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]}
            }))
            .unwrap();
        let canonical = canonical_json(&spec).unwrap();
        assert_eq!(
            pod_template_hash(&template("app:1", None)),
            short_digest(&canonical)
        );
    }

    #[test]
    fn same_template_same_hash_and_dns_safe() {
        let a = pod_template_hash(&template("app:1", None));
        let b = pod_template_hash(&template("app:1", None));
        assert_eq!(a, b);
        assert_eq!(a.len(), 10);
        assert!(a.bytes().all(|c| SAFE_ALPHABET.contains(&c)), "{a}");
    }

    #[test]
    fn image_change_changes_hash_but_hash_label_does_not() {
        let base = pod_template_hash(&template("app:1", None));
        assert_ne!(base, pod_template_hash(&template("app:2", None)));
        assert_eq!(
            base,
            pod_template_hash(&template("app:1", Some((POD_TEMPLATE_HASH, "zzz"))))
        );
        assert_ne!(
            base,
            pod_template_hash(&template("app:1", Some(("tier", "web"))))
        );
    }

    #[test]
    fn known_value_is_stable_across_runs() {
        // Pinned so that a change of the canonical form (which would re-create every ReplicaSet) is noticed.
        assert_eq!(pod_template_hash(&template("app:1", None)), "w4vdm68mbt");
        assert_eq!(pod_template_hash(&template("app:2", None)), "gm82gl6rmj");
        let empty = pod_template_hash(&PodTemplate::default());
        assert_eq!(empty.len(), 10);
    }
}
