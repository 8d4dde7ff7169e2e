//! Role-based access control for the simulated API server: who a token names, and whether the stored Roles,
//! ClusterRoles, RoleBindings and ClusterRoleBindings let that user make a request, decided as
//! kube-apiserver's RBAC authorizer decides it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;

use super::store::StoreInner;

/// The group whose members may do anything, as in a real cluster (no Role consulted).
pub const SUPERUSER_GROUP: &str = "system:masters";
/// The group every user but the anonymous one belongs to.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// The user a request without credentials is made as.
pub const ANONYMOUS_USER: &str = "system:anonymous";
/// Users bound to cluster-admin without any stored binding: the sim's own `admin` token (so tests can set
/// the cluster up) and the simulators.
const SUPERUSERS: &[&str] = &["admin", super::SIMULATOR_USER];
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// Who made a request: the token names the user; groups follow from the name as the usual authenticators
/// set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// The user a token names: `system:serviceaccount:<ns>:<name>` is a ServiceAccount (groups
    /// `system:serviceaccounts`, `system:serviceaccounts:<ns>`), `admin` and the simulators are in
    /// `system:masters`, and everyone but `system:anonymous` is in `system:authenticated`.
    pub fn from_name(name: &str) -> UserInfo {
        let mut groups = Vec::new();
        if SUPERUSERS.contains(&name) {
            groups.push(SUPERUSER_GROUP.to_string());
        }
        if let Some((namespace, _)) = service_account_of(name) {
            groups.push("system:serviceaccounts".to_string());
            groups.push(format!("system:serviceaccounts:{namespace}"));
        }
        if name == ANONYMOUS_USER {
            groups.push("system:unauthenticated".to_string());
        } else {
            groups.push(AUTHENTICATED_GROUP.to_string());
        }
        UserInfo {
            name: name.to_string(),
            groups,
        }
    }
}

/// The user name of a ServiceAccount.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}")
}

/// (namespace, name) of a ServiceAccount user.
fn service_account_of(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// What a resource request asks to do, as the authorizer sees it.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// The plural resource, e.g. `rollouts`.
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    /// None for cluster-scoped resources and for requests across all namespaces.
    pub namespace: Option<&'a str>,
    /// The object named by the path, or by a `metadata.name` field selector of a list or watch; never set
    /// for create, whose name the authorizer does not know.
    pub name: Option<&'a str>,
}

/// Why a stored RBAC object grants nothing.
#[derive(thiserror::Error, Debug)]
pub enum RbacError {
    #[error("{kind} {namespace}/{name} is malformed and grants nothing: {source}")]
    Malformed {
        kind: &'static str,
        namespace: String,
        name: String,
        source: serde_json::Error,
    },
}

impl RbacError {
    pub fn category(&self) -> &'static str {
        match self {
            RbacError::Malformed { .. } => "malformed",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
}

fn lists_or_star(list: &[String], wanted: &str) -> bool {
    list.iter().any(|item| item == "*" || item == wanted)
}

impl PolicyRule {
    /// Whether this rule allows the request: `resources` entries are `plural`, `plural/sub`, `*`,
    /// `*/sub` or `plural/*`; `resourceNames` restrict only requests that name an object.
    pub fn allows(&self, request: &Attributes<'_>) -> bool {
        let resource_matches = self.resources.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (plural, sub) = entry
                .split_once('/')
                .map_or((entry.as_str(), None), |(p, s)| (p, Some(s)));
            let plural_matches = plural == request.resource
                || (plural == "*" && sub.is_some() && request.subresource.is_some());
            let sub_matches = match (sub, request.subresource) {
                (None, None) => true,
                (Some("*"), Some(_)) => true,
                (Some(granted), Some(asked)) => granted == asked,
                _ => false,
            };
            plural_matches && sub_matches
        });
        let name_matches = self.resource_names.is_empty()
            || request
                .name
                .is_some_and(|name| self.resource_names.iter().any(|n| n == name));
        lists_or_star(&self.verbs, request.verb)
            && lists_or_star(&self.api_groups, request.group)
            && resource_matches
            && name_matches
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Subject {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct RoleRef {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BindingObject {
    #[serde(default)]
    subjects: Vec<Subject>,
    role_ref: RoleRef,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct RoleObject {
    #[serde(default)]
    rules: Vec<PolicyRule>,
}

/// A binding: the role it refers to, whom it binds, and (for a RoleBinding) where it applies.
#[derive(Clone, Debug)]
struct Binding {
    /// The RoleBinding's namespace; None for a ClusterRoleBinding.
    namespace: Option<String>,
    name: String,
    role_ref: RoleRef,
    subjects: Vec<Subject>,
}

impl Binding {
    fn binds(&self, user: &UserInfo) -> bool {
        self.subjects
            .iter()
            .any(|subject| match subject.kind.as_str() {
                "User" => subject.name == user.name,
                "Group" => user.groups.contains(&subject.name),
                "ServiceAccount" => {
                    // A RoleBinding's ServiceAccount subject without a namespace means the binding's own.
                    let namespace = subject.namespace.as_deref().or(self.namespace.as_deref());
                    namespace.is_some_and(|namespace| {
                        service_account_of(&user.name) == Some((namespace, subject.name.as_str()))
                    })
                }
                _ => false,
            })
    }
}

/// Every stored Role, ClusterRole and binding, ready to answer requests.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    bindings: Vec<Binding>,
}

/// The outcome of one authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, with what allowed it (for logs and tests).
    Allow(String),
    Deny,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// The stored objects of one RBAC kind: (namespace, name, object). Cluster-scoped ones have namespace "".
pub type StoredObjects<'a> = Vec<(&'a str, &'a str, Value)>;

impl Policy {
    /// Builds the policy from stored objects. Objects that do not parse grant nothing and are reported.
    pub fn from_objects(
        roles: StoredObjects<'_>,
        cluster_roles: StoredObjects<'_>,
        role_bindings: StoredObjects<'_>,
        cluster_role_bindings: StoredObjects<'_>,
    ) -> (Policy, Vec<RbacError>) {
        let mut policy = Policy::default();
        let mut errors = Vec::new();
        let malformed = |kind, namespace: &str, name: &str, source| RbacError::Malformed {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        for (namespace, name, object) in roles {
            match serde_json::from_value::<RoleObject>(object) {
                Ok(role) => {
                    policy
                        .roles
                        .insert((namespace.to_string(), name.to_string()), role.rules);
                }
                Err(source) => errors.push(malformed("Role", namespace, name, source)),
            }
        }
        for (namespace, name, object) in cluster_roles {
            match serde_json::from_value::<RoleObject>(object) {
                Ok(role) => {
                    policy.cluster_roles.insert(name.to_string(), role.rules);
                }
                Err(source) => errors.push(malformed("ClusterRole", namespace, name, source)),
            }
        }
        for (kind, objects, namespaced) in [
            ("RoleBinding", role_bindings, true),
            ("ClusterRoleBinding", cluster_role_bindings, false),
        ] {
            for (namespace, name, object) in objects {
                match serde_json::from_value::<BindingObject>(object) {
                    Ok(binding) => policy.bindings.push(Binding {
                        namespace: namespaced.then(|| namespace.to_string()),
                        name: name.to_string(),
                        role_ref: binding.role_ref,
                        subjects: binding.subjects,
                    }),
                    Err(source) => errors.push(malformed(kind, namespace, name, source)),
                }
            }
        }
        (policy, errors)
    }

    /// Whether `user` may make `request`. A ClusterRoleBinding grants its ClusterRole everywhere; a
    /// RoleBinding grants its Role or ClusterRole only for requests inside the binding's namespace.
    pub fn authorize(&self, user: &UserInfo, request: &Attributes<'_>) -> Decision {
        if user.groups.iter().any(|g| g == SUPERUSER_GROUP) {
            return Decision::Allow(format!("group {SUPERUSER_GROUP}"));
        }
        for binding in &self.bindings {
            if let Some(namespace) = &binding.namespace {
                if request.namespace != Some(namespace.as_str()) {
                    continue;
                }
            }
            if !binding.binds(user) {
                continue;
            }
            let rules = match (binding.role_ref.kind.as_str(), &binding.namespace) {
                ("ClusterRole", _) => self.cluster_roles.get(&binding.role_ref.name),
                ("Role", Some(namespace)) => self
                    .roles
                    .get(&(namespace.clone(), binding.role_ref.name.clone())),
                _ => None,
            };
            if rules.is_some_and(|rules| rules.iter().any(|rule| rule.allows(request))) {
                let kind = if binding.namespace.is_some() {
                    "RoleBinding"
                } else {
                    "ClusterRoleBinding"
                };
                return Decision::Allow(format!(
                    "{kind} {}{} of {} {}",
                    binding
                        .namespace
                        .as_deref()
                        .map(|ns| format!("{ns}/"))
                        .unwrap_or_default(),
                    binding.name,
                    binding.role_ref.kind,
                    binding.role_ref.name
                ));
            }
        }
        Decision::Deny
    }
}

/// Answers a SelfSubjectAccessReview (what `kubectl auth can-i` sends): `review` with `status.allowed`
/// for `user`, as decided by `policy` (None: the sim does not enforce RBAC, so everything is allowed).
/// Non-resource requests are always allowed, as the sim serves them to everyone.
pub fn access_review(
    policy: Option<&Policy>,
    user: &UserInfo,
    mut review: Value,
) -> Result<Value, ReviewError> {
    let field = |name: &str| -> Option<String> {
        review
            .pointer(&format!("/spec/resourceAttributes/{name}"))
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_string)
    };
    let resource_request = review.pointer("/spec/resourceAttributes").is_some();
    if !resource_request && review.pointer("/spec/nonResourceAttributes").is_none() {
        return Err(ReviewError::Missing("spec.resourceAttributes"));
    }
    let decision = if resource_request {
        let verb = field("verb").ok_or(ReviewError::Missing("spec.resourceAttributes.verb"))?;
        let resource =
            field("resource").ok_or(ReviewError::Missing("spec.resourceAttributes.resource"))?;
        let (group, subresource, namespace, name) = (
            field("group").unwrap_or_default(),
            field("subresource"),
            field("namespace"),
            field("name"),
        );
        let attributes = Attributes {
            verb: &verb,
            group: &group,
            resource: &resource,
            subresource: subresource.as_deref(),
            namespace: namespace.as_deref(),
            name: name.as_deref(),
        };
        policy.map_or(Decision::Allow("RBAC not enforced".into()), |policy| {
            policy.authorize(user, &attributes)
        })
    } else {
        Decision::Allow("non-resource requests are open".into())
    };
    let status = match decision {
        Decision::Allow(reason) => serde_json::json!({"allowed": true, "reason": reason}),
        Decision::Deny => serde_json::json!({"allowed": false}),
    };
    if let Some(object) = review.as_object_mut() {
        object.insert("status".into(), status);
    }
    Ok(review)
}

/// Why an access review could not be answered.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ReviewError {
    #[error("{0}: Required value")]
    Missing(&'static str),
    #[error("the protobuf body is malformed: {0}")]
    Protobuf(&'static str),
}

impl ReviewError {
    pub fn category(&self) -> &'static str {
        match self {
            ReviewError::Missing(_) => "missing",
            ReviewError::Protobuf(_) => "protobuf",
        }
    }
}

/// The prefix of every protobuf-encoded Kubernetes object.
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

/// One field of a protobuf message: its number and, for length-delimited fields, its bytes.
type ProtoField<'a> = (u64, Option<&'a [u8]>);

fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, ReviewError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes
            .get(*at)
            .ok_or(ReviewError::Protobuf("truncated varint"))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ReviewError::Protobuf("varint too long"))
}

/// The fields of one protobuf message, in order.
fn proto_fields(bytes: &[u8]) -> Result<Vec<ProtoField<'_>>, ReviewError> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        let skip = |at: &mut usize, n: usize| -> Result<(), ReviewError> {
            *at = at
                .checked_add(n)
                .filter(|end| *end <= bytes.len())
                .ok_or(ReviewError::Protobuf("truncated field"))?;
            Ok(())
        };
        match key & 7 {
            0 => {
                varint(bytes, &mut at)?;
                fields.push((key >> 3, None));
            }
            1 => {
                skip(&mut at, 8)?;
                fields.push((key >> 3, None));
            }
            2 => {
                let length = usize::try_from(varint(bytes, &mut at)?)
                    .map_err(|_| ReviewError::Protobuf("length too large"))?;
                let start = at;
                skip(&mut at, length)?;
                fields.push((key >> 3, Some(&bytes[start..at])));
            }
            5 => {
                skip(&mut at, 4)?;
                fields.push((key >> 3, None));
            }
            _ => return Err(ReviewError::Protobuf("unknown wire type")),
        }
    }
    Ok(fields)
}

fn proto_field(bytes: &[u8], number: u64) -> Result<Option<&[u8]>, ReviewError> {
    Ok(proto_fields(bytes)?
        .into_iter()
        .find_map(|(n, value)| (n == number).then_some(value).flatten()))
}

/// Reads a protobuf-encoded SelfSubjectAccessReview (client-go, and so `kubectl auth can-i`, sends built-in
/// kinds as protobuf) into its JSON form: the envelope's raw object, its spec, and the resource or
/// non-resource attributes.
pub fn review_from_protobuf(bytes: &[u8]) -> Result<Value, ReviewError> {
    let envelope = bytes
        .strip_prefix(PROTOBUF_MAGIC)
        .ok_or(ReviewError::Protobuf("no k8s protobuf prefix"))?;
    let raw = proto_field(envelope, 2)?.ok_or(ReviewError::Protobuf("no raw object"))?;
    let spec = proto_field(raw, 2)?.unwrap_or_default();
    let mut review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {},
        "spec": {},
    });
    if let Some(attributes) = proto_field(spec, 1)? {
        let names = [
            "namespace",
            "verb",
            "group",
            "version",
            "resource",
            "subresource",
            "name",
        ];
        let mut out = serde_json::Map::new();
        for (number, value) in proto_fields(attributes)? {
            let name = usize::try_from(number)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|index| names.get(index));
            if let (Some(name), Some(value)) = (name, value) {
                out.insert(
                    name.to_string(),
                    Value::String(String::from_utf8_lossy(value).into_owned()),
                );
            }
        }
        review["spec"]["resourceAttributes"] = Value::Object(out);
    } else if proto_field(spec, 2)?.is_some() {
        review["spec"]["nonResourceAttributes"] = serde_json::json!({});
    }
    Ok(review)
}

/// Resource keys of the four RBAC kinds in the store.
const KEYS: [&str; 4] = [
    "roles",
    "clusterroles",
    "rolebindings",
    "clusterrolebindings",
];

/// The policy built from the store, rebuilt only when an RBAC object changed (count or highest
/// resourceVersion of one of the four kinds), so authorizing a request costs a scan of a few keys.
#[derive(Default)]
pub struct PolicyCache {
    cached: Mutex<Option<(Fingerprint, Arc<Policy>)>>,
}

/// (object count, highest resourceVersion) of each RBAC kind.
type Fingerprint = Vec<(usize, u64)>;

impl PolicyCache {
    pub fn policy(&self, store: &StoreInner) -> Arc<Policy> {
        let fingerprint: Fingerprint = KEYS
            .iter()
            .map(|plural| {
                let key = format!("{RBAC_GROUP}/{plural}");
                store
                    .range(&key, None, None)
                    .fold((0, 0), |(count, highest), (_, object)| {
                        (count + 1, highest.max(object.resource_version))
                    })
            })
            .collect();
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, policy)) = cached.as_ref() {
            if *seen == fingerprint {
                return policy.clone();
            }
        }
        let objects = |plural: &str| -> StoredObjects<'_> {
            store
                .range(&format!("{RBAC_GROUP}/{plural}"), None, None)
                .filter_map(|((namespace, name), object)| {
                    Some((namespace.as_str(), name.as_str(), object.value().ok()?))
                })
                .collect()
        };
        let [roles, cluster_roles, role_bindings, cluster_role_bindings] = KEYS.map(objects);
        let (policy, errors) =
            Policy::from_objects(roles, cluster_roles, role_bindings, cluster_role_bindings);
        for error in errors {
            tracing::warn!(%error, category = error.category(), "RBAC object ignored");
        }
        let policy = Arc::new(policy);
        *cached = Some((fingerprint, policy.clone()));
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        subresource: Option<&'a str>,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Attributes<'a> {
        Attributes {
            verb,
            group,
            resource,
            subresource,
            namespace,
            name,
        }
    }

    const SA: &str = "system:serviceaccount:serin-system:serin";

    fn sa_subject() -> Value {
        json!([{"kind": "ServiceAccount", "name": "serin", "namespace": "serin-system"}])
    }

    fn role(rules: Value) -> Value {
        json!({ "rules": rules })
    }

    fn binding(kind: &str, role: &str, subjects: Value) -> Value {
        json!({"roleRef": {"apiGroup": RBAC_GROUP, "kind": kind, "name": role}, "subjects": subjects})
    }

    /// A ClusterRole `c` bound cluster-wide to the ServiceAccount.
    fn cluster_wide(rules: Value) -> Policy {
        let (policy, errors) = Policy::from_objects(
            vec![],
            vec![("", "c", role(rules))],
            vec![],
            vec![("", "c", binding("ClusterRole", "c", sa_subject()))],
        );
        assert!(errors.is_empty(), "{errors:?}");
        policy
    }

    fn allowed(policy: &Policy, user: &str, request: Attributes<'_>) -> bool {
        policy
            .authorize(&UserInfo::from_name(user), &request)
            .allowed()
    }

    #[test]
    fn users_get_the_groups_their_authenticator_would_give_them() {
        assert_eq!(
            UserInfo::from_name(SA).groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:serin-system",
                AUTHENTICATED_GROUP
            ]
        );
        assert_eq!(
            UserInfo::from_name("admin").groups,
            [SUPERUSER_GROUP, AUTHENTICATED_GROUP]
        );
        assert_eq!(UserInfo::from_name("alice").groups, [AUTHENTICATED_GROUP]);
        assert_eq!(
            UserInfo::from_name(ANONYMOUS_USER).groups,
            ["system:unauthenticated"]
        );
        // Not a ServiceAccount: too few or too many parts.
        assert_eq!(
            UserInfo::from_name("system:serviceaccount:ns").groups,
            [AUTHENTICATED_GROUP]
        );
        assert_eq!(
            UserInfo::from_name("system:serviceaccount:ns:a:b").groups,
            [AUTHENTICATED_GROUP]
        );
    }

    #[test]
    fn superusers_need_no_binding_and_others_get_nothing_without_one() {
        let empty = Policy::default();
        let get = request("get", "", "secrets", None, Some("ns"), Some("s"));
        assert!(allowed(&empty, "admin", get));
        assert!(allowed(&empty, crate::SIMULATOR_USER, get));
        assert!(!allowed(&empty, SA, get));
        assert!(!allowed(&empty, ANONYMOUS_USER, get));
    }

    #[test]
    fn verbs_groups_and_resources_must_all_match() {
        let policy = cluster_wide(json!([
            {"apiGroups": ["serin.dev"], "resources": ["rollouts"], "verbs": ["get", "list", "watch"]},
        ]));
        let rollout = |verb| request(verb, "serin.dev", "rollouts", None, Some("ns"), Some("r"));
        assert!(allowed(&policy, SA, rollout("get")));
        assert!(allowed(
            &policy,
            SA,
            request("list", "serin.dev", "rollouts", None, None, None)
        ));
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(!allowed(&policy, SA, rollout(verb)), "{verb}");
        }
        assert!(!allowed(
            &policy,
            SA,
            request(
                "get",
                "argoproj.io",
                "rollouts",
                None,
                Some("ns"),
                Some("r")
            )
        ));
        assert!(!allowed(
            &policy,
            SA,
            request(
                "get",
                "serin.dev",
                "analysisruns",
                None,
                Some("ns"),
                Some("r")
            )
        ));
        // Another user, even in the same namespace's groups, is not bound.
        assert!(!allowed(
            &policy,
            "system:serviceaccount:serin-system:other",
            rollout("get")
        ));
    }

    #[test]
    fn subresources_are_granted_only_by_name_or_wildcard() {
        let policy = cluster_wide(json!([
            {"apiGroups": ["serin.dev"], "resources": ["rollouts"], "verbs": ["patch"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["update"]},
            {"apiGroups": ["apps"], "resources": ["replicasets/*"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["*/status"], "verbs": ["patch"]},
        ]));
        let at =
            |verb, group, resource, sub| request(verb, group, resource, sub, Some("ns"), Some("x"));
        assert!(allowed(
            &policy,
            SA,
            at("patch", "serin.dev", "rollouts", None)
        ));
        assert!(
            !allowed(
                &policy,
                SA,
                at("patch", "serin.dev", "rollouts", Some("status"))
            ),
            "rollouts does not grant rollouts/status"
        );
        assert!(allowed(
            &policy,
            SA,
            at("update", "apps", "deployments", Some("scale"))
        ));
        assert!(!allowed(
            &policy,
            SA,
            at("update", "apps", "deployments", None)
        ));
        assert!(allowed(
            &policy,
            SA,
            at("get", "apps", "replicasets", Some("scale"))
        ));
        assert!(allowed(
            &policy,
            SA,
            at("get", "apps", "replicasets", Some("status"))
        ));
        assert!(!allowed(
            &policy,
            SA,
            at("get", "apps", "replicasets", None)
        ));
        assert!(allowed(
            &policy,
            SA,
            at("patch", "", "pods", Some("status"))
        ));
        assert!(!allowed(&policy, SA, at("patch", "", "pods", None)));
    }

    #[test]
    fn resource_names_restrict_only_requests_that_name_an_object() {
        let policy = cluster_wide(json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["serin"],
             "verbs": ["get", "update", "list", "watch", "create"]},
        ]));
        let lease = |verb, name| {
            request(
                verb,
                "coordination.k8s.io",
                "leases",
                None,
                Some("ns"),
                name,
            )
        };
        assert!(allowed(&policy, SA, lease("get", Some("serin"))));
        assert!(allowed(&policy, SA, lease("update", Some("serin"))));
        assert!(!allowed(&policy, SA, lease("get", Some("other"))));
        // A list or watch pinned to the name by a field selector carries it; an unpinned one does not, and
        // a create never names its object to the authorizer.
        assert!(allowed(&policy, SA, lease("watch", Some("serin"))));
        assert!(!allowed(&policy, SA, lease("list", None)));
        assert!(!allowed(&policy, SA, lease("watch", None)));
        assert!(!allowed(&policy, SA, lease("create", None)));
    }

    #[test]
    fn wildcards_grant_every_verb_group_and_resource() {
        let policy =
            cluster_wide(json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]));
        for (verb, sub) in [("deletecollection", None), ("patch", Some("status"))] {
            assert!(allowed(
                &policy,
                SA,
                request(verb, "anything.io", "widgets", sub, None, None)
            ));
        }
    }

    #[test]
    fn a_role_applies_only_in_its_namespace_and_a_cluster_role_through_a_role_binding_only_in_the_bindings(
    ) {
        let rules =
            json!([{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]}]);
        let (policy, errors) = Policy::from_objects(
            vec![("team-a", "reader", role(rules.clone()))],
            vec![("", "reader", role(rules))],
            vec![
                ("team-a", "r", binding("Role", "reader", sa_subject())),
                (
                    "team-b",
                    "c",
                    binding("ClusterRole", "reader", sa_subject()),
                ),
                // A RoleBinding to a Role of another namespace grants nothing.
                ("team-c", "r", binding("Role", "reader", sa_subject())),
            ],
            vec![],
        );
        assert!(errors.is_empty());
        let get = |namespace| request("get", "", "services", None, namespace, Some("web"));
        assert!(allowed(&policy, SA, get(Some("team-a"))));
        assert!(allowed(&policy, SA, get(Some("team-b"))));
        assert!(!allowed(&policy, SA, get(Some("team-c"))));
        assert!(!allowed(&policy, SA, get(Some("team-d"))));
        assert!(
            !allowed(
                &policy,
                SA,
                request("list", "", "services", None, None, None)
            ),
            "a RoleBinding never grants a list across all namespaces"
        );
    }

    #[test]
    fn subjects_match_users_groups_and_service_accounts() {
        let rules = json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]);
        let (policy, _) = Policy::from_objects(
            vec![],
            vec![("", "reader", role(rules))],
            vec![(
                "team-a",
                "sa-without-namespace",
                binding(
                    "ClusterRole",
                    "reader",
                    json!([{"kind": "ServiceAccount", "name": "bot"}]),
                ),
            )],
            vec![
                (
                    "",
                    "alice",
                    binding(
                        "ClusterRole",
                        "reader",
                        json!([{"kind": "User", "name": "alice"}]),
                    ),
                ),
                (
                    "",
                    "team-b-sas",
                    binding(
                        "ClusterRole",
                        "reader",
                        json!([{"kind": "Group", "name": "system:serviceaccounts:team-b"}]),
                    ),
                ),
            ],
        );
        let get = |namespace| request("get", "", "configmaps", None, Some(namespace), Some("c"));
        assert!(allowed(&policy, "alice", get("anywhere")));
        assert!(!allowed(&policy, "bob", get("anywhere")));
        assert!(allowed(
            &policy,
            "system:serviceaccount:team-b:any",
            get("x")
        ));
        assert!(!allowed(
            &policy,
            "system:serviceaccount:team-c:any",
            get("x")
        ));
        assert!(allowed(
            &policy,
            "system:serviceaccount:team-a:bot",
            get("team-a")
        ));
        assert!(!allowed(
            &policy,
            "system:serviceaccount:team-z:bot",
            get("team-a")
        ));
    }

    #[test]
    fn access_reviews_answer_what_a_request_would_get() {
        let policy = cluster_wide(json!([
            {"apiGroups": ["serin.dev"], "resources": ["rollouts/status"], "verbs": ["update"]},
        ]));
        let review = |attributes: Value| json!({"spec": {"resourceAttributes": attributes}});
        let user = UserInfo::from_name(SA);
        let allowed = |policy: Option<&Policy>, attributes: Value| {
            access_review(policy, &user, review(attributes)).expect("answered")["status"]["allowed"]
                .clone()
        };
        let status_update = json!({"verb": "update", "group": "serin.dev", "resource": "rollouts",
                                   "subresource": "status", "namespace": "shop"});
        assert_eq!(allowed(Some(&policy), status_update.clone()), json!(true));
        assert_eq!(
            allowed(
                Some(&policy),
                json!({"verb": "update", "group": "serin.dev", "resource": "rollouts"})
            ),
            json!(false)
        );
        assert_eq!(
            allowed(None, json!({"verb": "delete", "resource": "secrets"})),
            json!(true),
            "without enforcement everything is allowed"
        );
        assert_eq!(
            access_review(Some(&policy), &user, review(json!({"resource": "pods"}))),
            Err(ReviewError::Missing("spec.resourceAttributes.verb"))
        );
        assert_eq!(
            access_review(Some(&policy), &user, json!({"spec": {}})).map_err(|e| e.to_string()),
            Err("spec.resourceAttributes: Required value".to_string())
        );
    }

    /// A length-delimited protobuf field.
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, u8::try_from(bytes.len()).expect("short")];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn protobuf_access_reviews_read_as_kubectl_sends_them() {
        let attributes = [
            field(1, b"shop"),
            field(2, b"patch"),
            field(3, b"serin.dev"),
            field(5, b"rollouts"),
            field(6, b"status"),
            field(7, b"web"),
        ]
        .concat();
        let raw = [
            field(1, b""),
            field(2, &field(1, &attributes)),
            field(3, b""),
        ]
        .concat();
        // The envelope: TypeMeta, the raw object, then an empty content encoding and type.
        let envelope = [
            field(1, b"\x0a\x04skip"),
            field(2, &raw),
            field(3, b""),
            field(4, b""),
        ]
        .concat();
        let body = [PROTOBUF_MAGIC, &envelope].concat();
        let review = review_from_protobuf(&body).expect("decoded");
        assert_eq!(
            review["spec"]["resourceAttributes"],
            json!({"namespace": "shop", "verb": "patch", "group": "serin.dev", "resource": "rollouts",
                   "subresource": "status", "name": "web"})
        );
        assert_eq!(
            review_from_protobuf(b"{}"),
            Err(ReviewError::Protobuf("no k8s protobuf prefix"))
        );
        let truncated = [PROTOBUF_MAGIC, &envelope[..envelope.len() - 3]].concat();
        assert!(matches!(
            review_from_protobuf(&truncated),
            Err(ReviewError::Protobuf(_))
        ));
    }

    #[test]
    fn malformed_objects_grant_nothing_and_are_reported() {
        let (policy, errors) = Policy::from_objects(
            vec![],
            vec![("", "bad", json!({"rules": "everything"}))],
            vec![],
            vec![("", "b", binding("ClusterRole", "bad", sa_subject()))],
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].category(), "malformed");
        assert!(
            errors[0].to_string().contains("ClusterRole /bad"),
            "{}",
            errors[0]
        );
        assert!(!allowed(
            &policy,
            SA,
            request("get", "", "pods", None, Some("ns"), Some("p"))
        ));
    }
}
