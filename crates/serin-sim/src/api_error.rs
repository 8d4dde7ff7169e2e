//! Kubernetes `Status` error bodies: which code, reason and message a real kube-apiserver answers with.

use serde_json::{json, Value};

/// One failed API request, rendered as a `meta.k8s.io/v1 Status` body.
#[derive(thiserror::Error, Debug, Clone)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    pub retry_after_seconds: Option<u64>,
}

/// The request an injected error answers, for wording the error as a real server would.
#[derive(Clone, Copy, Debug)]
pub struct InjectedRequest<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub user: &'a str,
}

/// How a resource is named in error messages: `configmaps` or `httproutes.gateway.networking.k8s.io`.
#[derive(Clone, Debug)]
pub struct ResourceName<'a> {
    pub group: &'a str,
    pub plural: &'a str,
}

impl ResourceName<'_> {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn details(&self, name: &str) -> Value {
        json!({"name": name, "group": self.group, "kind": self.plural})
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after_seconds: None,
        }
    }

    pub fn category(&self) -> &'static str {
        self.reason
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unknown_resource() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    pub fn not_found(resource: &ResourceName<'_>, name: &str) -> ApiError {
        ApiError {
            details: Some(resource.details(name)),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", resource.qualified(), name),
            )
        }
    }

    pub fn already_exists(resource: &ResourceName<'_>, name: &str) -> ApiError {
        ApiError {
            details: Some(resource.details(name)),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", resource.qualified(), name),
            )
        }
    }

    pub fn conflict(resource: &ResourceName<'_>, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(resource.details(name)),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": {}",
                    resource.qualified(),
                    name,
                    why
                ),
            )
        }
    }

    pub fn stale_update(resource: &ResourceName<'_>, name: &str) -> ApiError {
        ApiError::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 Invalid with one cause per field error, formatted like apimachinery's `NewInvalid`.
    pub fn invalid(
        kind: &str,
        group: &str,
        name: &str,
        causes: &[(String, &str, String)],
    ) -> ApiError {
        let qualified_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let rendered: Vec<String> = causes
            .iter()
            .map(|(field, _, message)| format!("{field}: {message}"))
            .collect();
        let summary = if rendered.len() == 1 {
            rendered[0].clone()
        } else {
            format!("[{}]", rendered.join(", "))
        };
        let cause_values: Vec<Value> = causes
            .iter()
            .map(|(field, reason, message)| json!({"reason": reason, "message": message, "field": field}))
            .collect();
        ApiError {
            details: Some(
                json!({"name": name, "group": group, "kind": kind, "causes": cause_values}),
            ),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{qualified_kind} \"{name}\" is invalid: {summary}"),
            )
        }
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn too_large() -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        )
    }

    /// What a real server answers when the object would not fit in etcd (kube-apiserver passes etcd's
    /// refusal on as an internal error).
    pub fn object_too_large() -> ApiError {
        ApiError::new(500, "InternalError", "etcdserver: request is too large")
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> ApiError {
        tracing::debug!(content_type, "unsupported media type");
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: {}", accepted.join(", ")),
        )
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn too_many_requests(retry_after_seconds: u64) -> ApiError {
        ApiError {
            retry_after_seconds: Some(retry_after_seconds),
            details: Some(json!({"retryAfterSeconds": retry_after_seconds})),
            ..ApiError::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
            )
        }
    }

    pub fn timeout() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(
                504,
                "Timeout",
                "Timeout: request did not complete within requested timeout - context deadline exceeded",
            )
        }
    }

    /// The error a fault rule asks for, worded as kube-apiserver words it for this request.
    pub fn injected(code: u16, request: &InjectedRequest<'_>) -> ApiError {
        let resource = ResourceName {
            group: request.group,
            plural: request.resource,
        };
        let name = request.name.unwrap_or("");
        match code {
            401 => ApiError {
                details: None,
                ..ApiError::new(401, "Unauthorized", "Unauthorized")
            },
            403 => {
                let scope = match request.namespace {
                    Some(namespace) => format!(" in the namespace \"{namespace}\""),
                    None => " at the cluster scope".to_string(),
                };
                let object = if name.is_empty() {
                    resource.qualified()
                } else {
                    format!("{} \"{}\"", resource.qualified(), name)
                };
                let subresource = request
                    .subresource
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default();
                ApiError {
                    details: Some(resource.details(name)),
                    ..ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{object} is forbidden: User \"{}\" cannot {} resource \"{}{subresource}\" in API group \"{}\"{scope}",
                            request.user, request.verb, request.resource, request.group
                        ),
                    )
                }
            }
            404 if !name.is_empty() => ApiError::not_found(&resource, name),
            409 if request.verb == "create" && !name.is_empty() => {
                ApiError::already_exists(&resource, name)
            }
            409 if !name.is_empty() => ApiError::stale_update(&resource, name),
            500 => ApiError {
                details: Some(json!({"causes": [{"message": "injected fault"}]})),
                ..ApiError::new(
                    500,
                    "InternalError",
                    "Internal error occurred: injected fault",
                )
            },
            504 => ApiError::timeout(),
            other => ApiError::for_code(other),
        }
    }

    /// The error a fault rule asks for, with the reason a real server pairs with that code.
    pub fn for_code(code: u16) -> ApiError {
        match code {
            400 => ApiError::bad_request("injected fault"),
            404 => ApiError::new(404, "NotFound", "injected fault: not found"),
            409 => ApiError::new(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
            ),
            410 => ApiError::gone("injected fault: too old resource version"),
            429 => ApiError::too_many_requests(1),
            503 => ApiError::new(503, "ServiceUnavailable", "injected fault: service unavailable"),
            504 => ApiError::timeout(),
            _ => ApiError { code, ..ApiError::internal("injected fault: internal error") },
        }
    }

    pub fn body(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(map)) = (&self.details, status.as_object_mut()) {
            map.insert("details".into(), details.clone());
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(verb: &'a str, name: Option<&'a str>) -> InjectedRequest<'a> {
        InjectedRequest {
            verb,
            group: "apps",
            resource: "replicasets",
            subresource: None,
            namespace: Some("shop"),
            name,
            user: "alice",
        }
    }

    #[test]
    fn injected_errors_read_like_kube_apiserver() {
        let conflict = ApiError::injected(409, &request("update", Some("web")));
        assert_eq!(conflict.reason, "Conflict");
        assert_eq!(
            conflict.message,
            "Operation cannot be fulfilled on replicasets.apps \"web\": the object has been modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(conflict.body()["details"]["name"], "web");
        let exists = ApiError::injected(409, &request("create", Some("web")));
        assert_eq!(exists.reason, "AlreadyExists");
        let throttled = ApiError::injected(429, &request("get", Some("web")));
        assert_eq!(
            (throttled.reason, throttled.retry_after_seconds),
            ("TooManyRequests", Some(1))
        );
        assert_eq!(throttled.body()["details"]["retryAfterSeconds"], 1);
        let internal = ApiError::injected(500, &request("patch", Some("web")));
        assert_eq!(internal.message, "Internal error occurred: injected fault");
        assert_eq!(
            internal.body()["details"]["causes"][0]["message"],
            "injected fault"
        );
        let timeout = ApiError::injected(504, &request("patch", Some("web")));
        assert_eq!((timeout.code, timeout.reason), (504, "Timeout"));
        let forbidden = ApiError::injected(403, &request("patch", Some("web")));
        assert_eq!(
            forbidden.message,
            "replicasets.apps \"web\" is forbidden: User \"alice\" cannot patch resource \"replicasets\" in API group \"apps\" in the namespace \"shop\""
        );
        let other = ApiError::injected(418, &request("get", None));
        assert_eq!(other.code, 418);
    }
}
