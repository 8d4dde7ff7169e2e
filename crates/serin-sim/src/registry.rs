//! Which resources the simulated API server serves (built-ins plus registered CRDs) and their discovery documents.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

/// Which name syntax a kind accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    Dns1035Label,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// Everything the server needs to know to serve one resource.
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    pub group: String,
    /// Served versions, highest priority first.
    pub versions: Vec<String>,
    pub storage_version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    pub scale: Option<ScalePaths>,
    pub custom: bool,
    pub name_rule: NameRule,
    /// openAPIV3Schema per served version (custom resources only).
    pub schemas: BTreeMap<String, Value>,
    pub printer_columns: BTreeMap<String, Vec<Value>>,
}

impl ResourceInfo {
    /// Storage key shared by every served version.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    pub fn tracks_generation(&self, object: &Value) -> bool {
        self.custom || object.get("spec").is_some()
    }
}

const BUILTIN_VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    scale: bool,
}

const fn builtin(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Builtin {
    Builtin {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names: &[],
        categories: &[],
        status: false,
        scale: false,
    }
}

fn builtins() -> Vec<Builtin> {
    vec![
        Builtin {
            short_names: &["ns"],
            status: true,
            ..builtin("", "v1", "namespaces", "namespace", "Namespace", false)
        },
        Builtin {
            short_names: &["po"],
            categories: &["all"],
            status: true,
            ..builtin("", "v1", "pods", "pod", "Pod", true)
        },
        Builtin {
            short_names: &["svc"],
            categories: &["all"],
            status: true,
            ..builtin("", "v1", "services", "service", "Service", true)
        },
        Builtin {
            short_names: &["ep"],
            ..builtin("", "v1", "endpoints", "endpoints", "Endpoints", true)
        },
        Builtin {
            short_names: &["cm"],
            ..builtin("", "v1", "configmaps", "configmap", "ConfigMap", true)
        },
        builtin("", "v1", "secrets", "secret", "Secret", true),
        Builtin {
            short_names: &["ev"],
            ..builtin("", "v1", "events", "event", "Event", true)
        },
        Builtin {
            short_names: &["sa"],
            ..builtin(
                "",
                "v1",
                "serviceaccounts",
                "serviceaccount",
                "ServiceAccount",
                true,
            )
        },
        Builtin {
            short_names: &["rs"],
            categories: &["all"],
            status: true,
            scale: true,
            ..builtin(
                "apps",
                "v1",
                "replicasets",
                "replicaset",
                "ReplicaSet",
                true,
            )
        },
        Builtin {
            short_names: &["deploy"],
            categories: &["all"],
            status: true,
            scale: true,
            ..builtin(
                "apps",
                "v1",
                "deployments",
                "deployment",
                "Deployment",
                true,
            )
        },
        Builtin {
            short_names: &["ev"],
            ..builtin("events.k8s.io", "v1", "events", "event", "Event", true)
        },
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "lease",
            "Lease",
            true,
        ),
        Builtin {
            short_names: &["ing"],
            status: true,
            ..builtin(
                "networking.k8s.io",
                "v1",
                "ingresses",
                "ingress",
                "Ingress",
                true,
            )
        },
        Builtin {
            short_names: &["crd", "crds"],
            categories: &["api-extensions"],
            status: true,
            ..builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "customresourcedefinition",
                "CustomResourceDefinition",
                false,
            )
        },
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "role",
            "Role",
            true,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "rolebinding",
            "RoleBinding",
            true,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "clusterrole",
            "ClusterRole",
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "clusterrolebinding",
            "ClusterRoleBinding",
            false,
        ),
        // Answered by the RBAC authorizer, never stored (`kubectl auth can-i`).
        builtin(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "selfsubjectaccessreview",
            "SelfSubjectAccessReview",
            false,
        ),
        Builtin {
            short_names: &["pdb"],
            status: true,
            ..builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "poddisruptionbudget",
                "PodDisruptionBudget",
                true,
            )
        },
    ]
}

/// Orders API versions the way Kubernetes does: GA before beta before alpha, higher numbers first.
pub fn version_priority(version: &str) -> (u8, u32, u32) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let Ok(major) = digits.parse::<u32>() else {
        return (0, 0, 0);
    };
    let tail = &rest[digits.len()..];
    let (stability, minor_text) = if tail.is_empty() {
        (3, "")
    } else if let Some(minor) = tail.strip_prefix("beta") {
        (2, minor)
    } else if let Some(minor) = tail.strip_prefix("alpha") {
        (1, minor)
    } else {
        return (0, 0, 0);
    };
    let minor = if minor_text.is_empty() {
        0
    } else {
        minor_text.parse().unwrap_or(0)
    };
    (stability, major, minor)
}

/// Served resources, keyed by (group, plural).
#[derive(Default)]
pub struct Registry {
    resources: RwLock<BTreeMap<(String, String), Arc<ResourceInfo>>>,
}

impl Registry {
    pub fn with_builtins() -> Registry {
        let registry = Registry::default();
        for entry in builtins() {
            let name_rule = match entry.plural {
                "namespaces" => NameRule::Label,
                "services" => NameRule::Dns1035Label,
                _ => NameRule::Subdomain,
            };
            let scale = entry.scale.then(|| ScalePaths {
                spec_replicas: ".spec.replicas".into(),
                status_replicas: ".status.replicas".into(),
                label_selector: None,
            });
            registry.insert(ResourceInfo {
                group: entry.group.into(),
                versions: vec![entry.version.into()],
                storage_version: entry.version.into(),
                plural: entry.plural.into(),
                singular: entry.singular.into(),
                kind: entry.kind.into(),
                namespaced: entry.namespaced,
                short_names: entry.short_names.iter().map(|s| s.to_string()).collect(),
                categories: entry.categories.iter().map(|s| s.to_string()).collect(),
                status_subresource: entry.status,
                scale,
                custom: false,
                name_rule,
                schemas: BTreeMap::new(),
                printer_columns: BTreeMap::new(),
            });
        }
        registry
    }

    pub fn insert(&self, info: ResourceInfo) {
        if let Ok(mut resources) = self.resources.write() {
            resources.insert((info.group.clone(), info.plural.clone()), Arc::new(info));
        }
    }

    pub fn remove(&self, group: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        self.resources
            .write()
            .ok()?
            .remove(&(group.to_string(), plural.to_string()))
    }

    /// The resource served at `group/version/plural`, if any.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        let resources = self.resources.read().ok()?;
        let info = resources.get(&(group.to_string(), plural.to_string()))?;
        info.versions
            .iter()
            .any(|v| v == version)
            .then(|| info.clone())
    }

    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        self.resources
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Groups (other than core) with their versions, highest priority first.
    fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for info in self.all() {
            if info.group.is_empty() {
                continue;
            }
            let versions = groups.entry(info.group.clone()).or_default();
            for version in &info.versions {
                if !versions.contains(version) {
                    versions.push(version.clone());
                }
            }
        }
        for versions in groups.values_mut() {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        groups
    }

    fn group_document(group: &str, versions: &[String]) -> Value {
        let entries: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        json!({
            "name": group,
            "versions": entries,
            "preferredVersion": entries.first().cloned().unwrap_or(Value::Null),
        })
    }

    pub fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(group, versions)| Registry::group_document(group, versions))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    pub fn api_group(&self, group: &str) -> Option<Value> {
        let groups = self.groups();
        let versions = groups.get(group)?;
        let mut document = Registry::group_document(group, versions);
        if let Some(map) = document.as_object_mut() {
            map.insert("kind".into(), json!("APIGroup"));
            map.insert("apiVersion".into(), json!("v1"));
        }
        Some(document)
    }

    /// The APIResourceList of one group/version, or None when nothing is served there.
    pub fn api_resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for info in self.all() {
            if info.group != group || !info.versions.iter().any(|v| v == version) {
                continue;
            }
            let mut entry = json!({
                "name": info.plural,
                "singularName": info.singular,
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": BUILTIN_VERBS,
            });
            if let Some(map) = entry.as_object_mut() {
                if !info.short_names.is_empty() {
                    map.insert("shortNames".into(), json!(info.short_names));
                }
                if !info.categories.is_empty() {
                    map.insert("categories".into(), json!(info.categories));
                }
            }
            resources.push(entry);
            if info.status_subresource {
                resources.push(json!({
                    "name": format!("{}/status", info.plural),
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            if info.scale.is_some() {
                resources.push(json!({
                    "name": format!("{}/scale", info.plural),
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": ["get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }

    fn group_versions(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for info in self.all() {
            for version in &info.versions {
                let pair = (info.group.clone(), version.clone());
                if !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
        }
        pairs.sort();
        pairs
    }

    /// `/openapi/v3`: where each group/version's document lives. kubectl reads it to learn that the
    /// server validates fields itself (`fieldValidation`), so it skips client-side schema validation.
    pub fn openapi_v3_root(&self) -> Value {
        let mut paths = serde_json::Map::new();
        for (group, version) in self.group_versions() {
            let prefix = if group.is_empty() {
                format!("api/{version}")
            } else {
                format!("apis/{group}/{version}")
            };
            paths.insert(
                prefix.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{prefix}")}),
            );
        }
        json!({"paths": paths})
    }

    /// A minimal OpenAPI v3 document for one group/version: each resource's PATCH operation, tagged
    /// with its group/version/kind and the `fieldValidation` parameter.
    pub fn openapi_v3_document(&self, group: &str, version: &str) -> Option<Value> {
        let mut paths = serde_json::Map::new();
        let mut schemas = serde_json::Map::new();
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        for info in self.all() {
            if info.group != group || !info.versions.iter().any(|v| v == version) {
                continue;
            }
            let gvk = json!({"group": group, "version": version, "kind": info.kind});
            let path = if info.namespaced {
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", info.plural)
            } else {
                format!("{prefix}/{}/{{name}}", info.plural)
            };
            let parameters = json!([
                {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "force", "in": "query", "schema": {"type": "boolean"}},
            ]);
            paths.insert(
                path,
                json!({"patch": {
                    "operationId": format!("patch{}", info.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                }}),
            );
            if let Some(schema) = info.schemas.get(version) {
                let mut schema = schema.clone();
                if let Some(map) = schema.as_object_mut() {
                    map.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
                }
                let reversed_group: Vec<&str> = group.split('.').rev().collect();
                schemas.insert(
                    format!("{}.{version}.{}", reversed_group.join("."), info.kind),
                    schema,
                );
            }
        }
        if paths.is_empty() {
            return None;
        }
        Some(json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }))
    }

    /// Builds the resource a CustomResourceDefinition object declares.
    pub fn info_from_crd(crd: &Value) -> Result<ResourceInfo, String> {
        let spec = crd.get("spec").ok_or("spec: Required value")?;
        let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_string);
        let group = text(spec.get("group")).ok_or("spec.group: Required value")?;
        let names = spec.get("names").ok_or("spec.names: Required value")?;
        let plural = text(names.get("plural")).ok_or("spec.names.plural: Required value")?;
        let kind = text(names.get("kind")).ok_or("spec.names.kind: Required value")?;
        let singular = text(names.get("singular")).unwrap_or_else(|| kind.to_lowercase());
        let strings = |value: Option<&Value>| -> Vec<String> {
            value
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let namespaced = match spec.get("scope").and_then(Value::as_str) {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
        };
        let version_entries = spec
            .get("versions")
            .and_then(Value::as_array)
            .ok_or("spec.versions: Required value")?;
        let mut versions = Vec::new();
        let mut storage_version = None;
        let mut schemas = BTreeMap::new();
        let mut printer_columns = BTreeMap::new();
        let mut status_subresource = false;
        let mut scale = None;
        for entry in version_entries {
            let name = text(entry.get("name")).ok_or("spec.versions[].name: Required value")?;
            if entry.get("storage").and_then(Value::as_bool) == Some(true) {
                storage_version = Some(name.clone());
            }
            if entry.get("served").and_then(Value::as_bool) != Some(true) {
                continue;
            }
            if let Some(schema) = entry.get("schema").and_then(|s| s.get("openAPIV3Schema")) {
                schemas.insert(name.clone(), schema.clone());
            }
            if let Some(columns) = entry
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
            {
                printer_columns.insert(name.clone(), columns.clone());
            }
            if let Some(subresources) = entry.get("subresources") {
                status_subresource |= subresources.get("status").is_some();
                if let Some(scale_spec) = subresources.get("scale") {
                    scale = Some(ScalePaths {
                        spec_replicas: text(scale_spec.get("specReplicasPath"))
                            .unwrap_or_else(|| ".spec.replicas".into()),
                        status_replicas: text(scale_spec.get("statusReplicasPath"))
                            .unwrap_or_else(|| ".status.replicas".into()),
                        label_selector: text(scale_spec.get("labelSelectorPath")),
                    });
                }
            }
            versions.push(name);
        }
        let storage_version = storage_version.ok_or(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        )?;
        if versions.is_empty() {
            return Err(
                "spec.versions: Invalid value: must have at least one served version".into(),
            );
        }
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        Ok(ResourceInfo {
            group,
            versions,
            storage_version,
            plural,
            singular,
            kind,
            namespaced,
            short_names: strings(names.get("shortNames")),
            categories: strings(names.get("categories")),
            status_subresource,
            scale,
            custom: true,
            name_rule: NameRule::Subdomain,
            schemas,
            printer_columns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_ga_then_beta_then_alpha() {
        let mut versions = vec!["v1alpha1", "v1beta1", "v1", "v2", "v2beta2", "v1beta2"];
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(
            versions,
            vec!["v2", "v1", "v2beta2", "v1beta2", "v1beta1", "v1alpha1"]
        );
    }

    #[test]
    fn builtins_include_scale_subresource_in_discovery() {
        let registry = Registry::with_builtins();
        let list = registry.api_resource_list("apps", "v1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"deployments/scale"));
        assert!(names.contains(&"replicasets/status"));
        assert!(registry.lookup("apps", "v1beta1", "deployments").is_none());
    }
}
