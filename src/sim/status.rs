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
        ApiError::new(
            504,
            "Timeout",
            "Timeout: request did not complete within the allowed duration",
        )
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
